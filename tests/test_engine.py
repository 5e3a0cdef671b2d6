"""The Engine against the networks + keypoint math run directly (the official wrapper's order), and its promises:
the source cache, batching across sessions, reference reset, controls, flat memory, the compile fallback."""
import contextlib
import copy
import os
from typing import Iterator

import numpy as np
import pytest
import torch

from model import kinematics as kin
from model.engine import CONTROLS, KP_KEYS, Controls, Engine, control
from model.images import to_image, to_tensor


@pytest.fixture(scope="module")
def images(golden) -> dict[str, np.ndarray]:
    return {"src": golden["input.source_rgb_u8"], "ref": golden["input.driving0_rgb_u8"],
            "drv": golden["input.driving_rgb_u8"]}


def make(nets, images: dict, **kwargs) -> Engine:
    """A CPU engine with the golden source and reference; keeps the test's thread count."""
    engine = Engine(nets, device="cpu", threads=torch.get_num_threads(), **kwargs)
    engine.set_source(images["src"])
    engine.set_reference(images["ref"])
    return engine


@contextlib.contextmanager
def capture(module: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
    """The module's outputs in call order (G's float image: the engine itself returns uint8). The hook goes
    when the block ends: the networks are shared by the whole session."""
    outs: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: outs.append(out.float().clone()))
    try:
        yield outs
    finally:
        handle.remove()


@torch.inference_mode()
def reference_path(nets, source: np.ndarray, reference: np.ndarray, driving: np.ndarray) -> torch.Tensor:
    """F, M, relative motion against the reference, stitching, multiplier 1, W, G: the official wrapper's steps."""
    motion = lambda rgb: kin.refine_kp_info(nets.motion_extractor(to_tensor(rgb)))
    s = motion(source)
    x_s = kin.transform_keypoint(s)
    x_d = kin.relative_motion(s, motion(driving), motion(reference))
    x_d = kin.apply_multiplier(x_s, kin.apply_stitching(x_d, nets.stitching(kin.stitching_input(x_s, x_d))))
    feature = nets.appearance_feature_extractor(to_tensor(source))
    return nets.spade_generator(nets.warping_module(feature, x_d, x_s)["out"])


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_fp32_equals_reference_path(tiny_nets, images):
    engine = make(tiny_nets, images)
    with capture(engine.G) as g:
        out = engine.animate(images["drv"][None])
    ref = reference_path(tiny_nets, images["src"], images["ref"], images["drv"])
    assert float((g[0] - ref).abs().max()) <= 1e-5
    assert np.abs(out.astype(int) - to_image(ref)).max() <= 1


def test_full_config_matches_golden(full_nets, golden, images):
    out = make(full_nets, images).animate(images["drv"][None])[0]
    diff = out.astype(int) - golden["E2E.image_u8"]
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() <= 0.02


def test_source_cache_reused_and_replaced(tiny_nets, images):
    engine = make(tiny_nets, images)
    with capture(engine.F) as calls:
        first = [engine.animate(images[k][None]) for k in ("drv", "ref", "drv", "ref", "drv")]
        assert calls == [] and np.array_equal(first[0], first[2])
        engine.set_source(images["drv"])  # a new portrait: F runs again, the reference stays
        assert len(calls) == 1
        assert not np.array_equal(engine.animate(images["drv"][None]), first[0])
        assert len(calls) == 1


def test_batch_equals_single_calls(tiny_nets, images):
    engine = make(tiny_nets, images)
    flip = lambda im: np.ascontiguousarray(im[:, ::-1])
    setup = [("a", images["src"], images["ref"], {}),
             ("b", images["ref"], images["drv"], {"multiplier": 0.5, "lip_target": 0.4}),
             ("c", flip(images["src"]), flip(images["ref"]), {"stitching": False, "eye_target": 0.2})]
    for name, source, reference, controls in setup:
        engine.set_source(source, name)
        engine.set_reference(reference, name)
        engine.set_controls(name, **controls)
    crops = np.stack([images["drv"], flip(images["drv"]), images["ref"]])
    with capture(engine.G) as g:
        batch = engine.animate(crops, ["a", "b", "c"])
        singles = np.concatenate([engine.animate(crops[i:i + 1], [n]) for i, n in enumerate("abc")])
    assert float((g[0] - torch.cat(g[1:])).abs().max()) <= 1e-4  # batched convolutions sum in another order
    assert np.abs(batch.astype(int) - singles).max() <= 1
    assert len({im.tobytes() for im in batch}) == 3


def test_reference_reset(tiny_nets, images):
    engine = make(tiny_nets, images)
    against_ref = engine.animate(images["drv"][None])
    engine.set_reference(None)
    first = engine.animate(images["drv"][None])  # becomes the reference: no motion, the source's own pose
    assert not np.array_equal(first, against_ref)  # changing the reference changes the output
    after = engine.animate(images["ref"][None])
    engine.set_reference(images["drv"])
    assert np.array_equal(first, engine.animate(images["drv"][None]))  # driving == reference
    assert np.array_equal(after, engine.animate(images["ref"][None]))
    # with stitching off, "no motion" is the source re-rendered at its own keypoints
    engine.set_controls(stitching=False)
    still = engine.animate(images["drv"][None])
    engine.set_controls(multiplier=0.0)  # x_d = x_s exactly
    assert np.abs(still.astype(int) - engine.animate(images["drv"][None])).max() <= 1


def test_controls(tiny_nets, images):
    engine = make(tiny_nets, images)
    drv = images["drv"][None]
    default = engine.animate(drv)
    changed = {}
    for name, value in (("stitching", False), ("relative", False), ("eye_target", 0.05), ("lip_target", 0.6)):
        engine.set_controls(**{name: value})
        changed[name] = not np.array_equal(engine.animate(drv), default)
        engine.set_controls(**{name: getattr(Controls(), name)})
    assert all(changed.values()), changed
    assert np.array_equal(engine.animate(drv), default)
    engine.set_controls(multiplier=0.0)  # the source's own keypoints, whatever drives
    still = engine.animate(drv)
    assert np.array_equal(still, engine.animate(images["src"][None]))
    engine.set_controls(multiplier=1.0, stitching=False)
    engine.set_reference(images["drv"])
    assert np.abs(still.astype(int) - engine.animate(drv)).max() <= 1  # driving == reference: no motion


def test_no_per_frame_memory_growth(tiny_nets, images):
    engine = make(tiny_nets, images)
    frames = [images["drv"][None], images["ref"][None]]
    for i in range(5):
        engine.animate(frames[i % 2])
    before = rss_mb()
    for i in range(30):
        engine.animate(frames[i % 2])
    assert rss_mb() - before < 20


@pytest.mark.parametrize("when", ["at compile()", "at the first call"])
def test_compile_fallback_runs_eager_and_says_why(tiny_nets, images, monkeypatch, caplog, when):
    def broken_compile(fn, **kwargs):
        if when == "at compile()":
            raise RuntimeError("no C++ compiler")

        def compiled(*args):
            raise RuntimeError("no C++ compiler")
        return compiled
    eager = make(tiny_nets, images).animate(images["drv"][None])
    monkeypatch.setattr(torch, "compile", broken_compile)
    engine = make(tiny_nets, images, compile=True)
    outs = [engine.animate(images["drv"][None]) for _ in range(2)]
    notes = [n for n in engine.notes if "torch.compile unavailable" in n]
    assert notes == ["torch.compile unavailable (RuntimeError: no C++ compiler); running eager"]
    assert [r.message for r in caplog.records if "torch.compile" in r.message] == notes
    assert all(np.array_equal(o, eager) for o in outs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs CUDA: this CPU has no fast fp16 kernels")
def test_fp16_psnr_against_fp32_golden(full_nets, golden, images):
    # compile off: max-autotune of the full networks takes minutes; fp16 numerics are the point here
    engine = Engine(copy.deepcopy(full_nets), device="cuda", precision="fp16", compile=False)
    engine.set_source(images["src"])
    engine.set_reference(images["ref"])
    assert psnr(engine.animate(images["drv"][None])[0], golden["E2E.image_u8"]) >= 40


def test_channels_last_matches_default_layout(tiny_nets, images):
    # F's and W's 5-D conv weights get channels_last_3d, the 4-D ones channels_last; the numbers stay the same
    default = make(tiny_nets, images).animate(images["drv"][None])
    engine = make(copy.deepcopy(tiny_nets), images, channels_last=True)
    assert engine.G.fc.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(engine.animate(images["drv"][None]).astype(int) - default).max() <= 1


class DeviceTransfers(torch.overrides.TorchFunctionMode):
    """Records every host->device transfer a CPU engine asks for: `.to(<device>)` and `torch.tensor(device=)`, with
    whether it was asynchronous (on CUDA each synchronous one is a whole-GPU sync from pageable memory)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and any(isinstance(a, (torch.device, str)) for a in (*args[1:], kwargs.get("device"))):
            self.calls.append(("to", bool(kwargs.get("non_blocking"))))
        elif func is torch.tensor and kwargs.get("device") is not None:
            self.calls.append(("tensor", False))
        return func(*args, **kwargs)


def test_a_frame_moves_nothing_to_the_device_but_changed_controls(tiny_nets, images):
    engine = make(tiny_nets, images)
    drv = images["drv"][None]
    engine.animate(drv)  # the session's first frame builds its control rows
    with DeviceTransfers() as steady:
        for _ in range(3):
            engine.animate(drv)
    engine.set_controls(multiplier=0.5, lip_target=0.3)
    with DeviceTransfers() as changed:
        engine.animate(drv)
        engine.animate(drv)
    assert steady.calls == []  # the rows stay on the device between frames
    assert changed.calls == [("to", True)]  # one asynchronous copy of the new rows, on the next frame only


def test_spectral_norm_is_computed_once_at_build(tiny_nets, images, monkeypatch):
    from model.spade import SNConv2d
    engine = make(tiny_nets, images)
    calls = []
    normalized = SNConv2d.normalized_weight
    monkeypatch.setattr(SNConv2d, "normalized_weight", lambda self: calls.append(1) or normalized(self))
    with capture(engine.G) as frozen:
        engine.animate(images["drv"][None])
    assert calls == []
    for m in engine.G.modules():
        if isinstance(m, SNConv2d):
            m.frozen = None
    with capture(engine.G) as per_call:
        engine.animate(images["drv"][None])
    assert calls and torch.equal(frozen[0], per_call[0])


def test_step_inputs_are_gathered_per_item_and_read_by_name(tiny_nets, images):
    """`_inputs` gathers each session's cache, reference and controls into one StepInputs, an item a row;
    `leaves()` is the one order a CUDA graph copies its static buffers in, and `map` keeps the structure."""
    engine = make(tiny_nets, images)
    engine.set_source(images["drv"], "b")
    engine.set_reference(images["src"], "b")
    engine.set_controls("b", multiplier=0.5, eye_target=0.25, relative=False)
    a, b = engine.sessions["default"], engine.sessions["b"]
    inputs = engine._inputs([a, b, a])
    assert torch.equal(inputs.feature, torch.cat([a.feature, b.feature, a.feature]))
    assert torch.equal(inputs.x_s[1:2], b.x_s) and torch.equal(inputs.ratios[1:2], b.ratios)
    for k in KP_KEYS:
        assert torch.equal(inputs.source[k][1:2], b.source[k]) and torch.equal(inputs.reference[k][2:], a.reference[k])
    assert control(inputs.controls, "multiplier").flatten().tolist() == [1.0, 0.5, 1.0]
    assert control(inputs.controls, "eye_target").flatten().tolist() == [0.0, 0.25, 0.0]
    assert control(inputs.controls, "relative").flatten().tolist() == [1.0, 0.0, 1.0]
    assert inputs.controls.shape == (3, len(CONTROLS)) and inputs.edits.shape[0] == 3
    leaves = inputs.leaves()
    assert len(leaves) == 5 + 2 * len(KP_KEYS) and leaves[0] is inputs.feature and leaves[1] is inputs.x_s
    motions = [inputs.source[k] for k in KP_KEYS] + [inputs.reference[k] for k in KP_KEYS]
    assert all(x is y for x, y in zip(leaves[2:-3], motions, strict=True))
    assert all(x is y for x, y in zip(leaves[-3:], [inputs.controls, inputs.ratios, inputs.edits], strict=True))
    copied = inputs.map(torch.Tensor.clone)
    assert all(torch.equal(x, y) and x is not y for x, y in zip(copied.leaves(), leaves, strict=True))
