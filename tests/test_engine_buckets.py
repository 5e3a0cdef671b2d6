"""Batch buckets (what CUDA graphs are captured for), the start-up warm-up and the compile cache, checked on the CPU
where the same padding and splitting code runs when buckets are asked for."""
import logging
import os

import numpy as np
import pytest
import torch

from model.engine import (COMPILE_RECORD, WARMUP, Engine, default_compile_mode,
                          recorded_compile_mode)


@pytest.fixture(scope="module")
def crops(golden) -> list[np.ndarray]:
    src, ref, drv = (golden[f"input.{k}_rgb_u8"] for k in ("source", "driving0", "driving"))
    flip = lambda im: np.ascontiguousarray(im[:, ::-1])
    return [src, ref, drv, flip(src), flip(drv)]


def make(nets, crops: list[np.ndarray], buckets) -> Engine:
    """A CPU engine with one session per crop, each with its own portrait and reference."""
    engine = Engine(nets, device="cpu", threads=torch.get_num_threads(), buckets=buckets)
    for i, crop in enumerate(crops):
        engine.set_source(crop, f"s{i}")
        engine.set_reference(crops[(i + 1) % len(crops)], f"s{i}")
    return engine


def test_padding_to_the_bucket_does_not_change_real_items(tiny_nets, crops):
    engine = make(tiny_nets, crops, buckets=(1, 2, 4, 8))
    names = [f"s{i}" for i in range(4)]
    drive = np.stack(crops[1:5])
    three = engine.animate(drive[:3], names[:3])  # padded to 4 with copies of item 0
    four = engine.animate(drive, names)  # a real fourth item instead
    assert three.shape == (3, *four.shape[1:])
    assert np.array_equal(three, four[:3])  # what fills the bucket never reaches the real items
    exact = make(tiny_nets, crops, buckets=()).animate(drive[:3], names[:3])
    assert np.abs(three.astype(int) - exact).max() <= 1  # batch 4 vs 3 sums convolutions in another order


def test_batches_beyond_the_largest_bucket_go_in_chunks(tiny_nets, crops):
    engine = make(tiny_nets, crops, buckets=(1, 2))
    names = [f"s{i}" for i in range(5)]
    drive = np.stack(crops)
    out = engine.animate(drive, names)
    chunks = [engine.animate(drive[i:i + 2], names[i:i + 2]) for i in range(0, 5, 2)]
    assert out.shape[0] == 5 and np.array_equal(out, np.concatenate(chunks))
    as_tensor = engine.animate(drive, names, as_tensor=True)
    assert isinstance(as_tensor, torch.Tensor) and np.array_equal(as_tensor.numpy(), out)


def test_warmup_prepares_batch_1_and_the_largest_with_progress_and_leaves_no_session(tiny_nets, caplog):
    engine = Engine(tiny_nets, device="cpu", threads=torch.get_num_threads(), buckets=(1, 2, 4))
    with caplog.at_level(logging.INFO, logger="liveportrait.engine"):
        took = engine.warmup()
    assert list(took) == [1, 4] and all(s > 0 for s in took.values())
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "ready in" in line][-1].startswith("warm-up 2/2: batch 4 ready in")
    assert WARMUP not in engine.sessions
    assert list(Engine(tiny_nets, device="cpu", threads=torch.get_num_threads()).warmup()) == [1]  # no buckets


@pytest.fixture
def identity_compile(monkeypatch, tmp_path):
    """torch.compile that compiles nothing (a real one takes minutes here), and a compile cache of the test's own."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    return tmp_path / "cache"


def test_the_other_buckets_warm_off_the_serving_path_and_batches_wait_for_none(tiny_nets, crops, identity_compile):
    engine = Engine(tiny_nets, device="cpu", threads=torch.get_num_threads(), buckets=(1, 2, 4), compile="default")
    for i in range(2):
        engine.set_source(crops[i], f"s{i}")
    assert list(engine.warmup()) == [1, 4]
    seen = []
    hook = engine.G.register_forward_hook(lambda m, a, out: seen.append(out.shape[0]))
    drive, names = np.stack(crops[2:4]), ["s0", "s1"]
    before = engine.animate(drive, names)  # bucket 2 is not ready: padded to the ready 4, not compiled now
    engine.warm_rest().join(timeout=600)
    after = engine.animate(drive, names)
    hook.remove()
    assert seen == [4, 2, 2]  # padded; warm_rest's own batch 2; then served at 2
    assert np.abs(before.astype(int) - after).max() <= 1


def test_compile_modes_and_the_mode_the_cache_holds(tiny_nets, identity_compile):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_compile_mode(cpu) == "off" and default_compile_mode(cuda) == "default"  # empty cache: cheap
    engine = Engine(tiny_nets, device="cpu", threads=torch.get_num_threads(), compile="max-autotune")
    assert any(n.startswith("torch.compile on (max-autotune mode") for n in engine.notes)
    engine.warmup()
    assert (identity_compile / COMPILE_RECORD).read_text().strip() == "max-autotune"
    assert recorded_compile_mode() == "max-autotune" == default_compile_mode(cuda)
    assert Engine(tiny_nets, device="cpu", compile=True).compile_mode == "default"
    assert Engine(tiny_nets, device="cpu", compile=False).compile_mode == "off"
    with pytest.raises(ValueError, match="expected one of max-autotune, default, off"):
        Engine(tiny_nets, device="cpu", compile="fastest")


def test_an_error_during_graph_capture_is_raised_not_run_eager(tiny_nets, crops, monkeypatch):
    def compiled(*args):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled)
    engine = Engine(tiny_nets, device="cpu", threads=torch.get_num_threads(), compile="default")
    engine.set_source(crops[0], "s0")
    engine.set_reference(crops[1], "s0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="stream is capturing"):
        engine.animate(crops[2][None], ["s0"])
    assert not any("running eager" in n for n in engine.notes)


def test_compile_cache_is_persistent_unless_one_is_given(tiny_nets, monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(os.environ["TORCHINDUCTOR_CACHE_DIR"]) or fn)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    engine = Engine(tiny_nets, device="cpu", threads=torch.get_num_threads(), compile=True)
    assert seen == [str(tmp_path / "liveportrait-live" / "torch-compile")]
    assert any(str(tmp_path / "liveportrait-live" / "torch-compile") in n for n in engine.notes)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    Engine(tiny_nets, device="cpu", threads=torch.get_num_threads(), compile=True)
    assert seen[-1] == str(tmp_path / "mine")
