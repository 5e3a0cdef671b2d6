"""Batch buckets (what CUDA graphs are captured for), the start-up warm-up and the compile cache, checked on the CPU
where the same padding and splitting code runs when buckets are asked for."""
import logging
import os

import numpy as np
import pytest
import torch

from model.engine import WARMUP, Engine


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


def test_warmup_runs_every_bucket_with_progress_and_leaves_no_session(tiny_nets, caplog):
    engine = Engine(tiny_nets, device="cpu", threads=torch.get_num_threads(), buckets=(1, 2, 4))
    with caplog.at_level(logging.INFO, logger="liveportrait.engine"):
        took = engine.warmup()
    assert list(took) == [1, 2, 4] and all(s > 0 for s in took.values())
    lines = [r.getMessage() for r in caplog.records]
    assert [line for line in lines if "ready in" in line][-1].startswith("warm-up 3/3: batch 4 ready in")
    assert WARMUP not in engine.sessions
    assert list(Engine(tiny_nets, device="cpu", threads=torch.get_num_threads()).warmup()) == [1]  # no buckets


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
