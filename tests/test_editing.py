"""Animation regions and the editing sliders (model/editing.py) against the official LivePortrait's numbers, in the
engine's batched step, the portrait editing feature and the render CLI."""
import numpy as np
import pytest
import torch

from model import editing
from model import kinematics as kin
from model.editing import EYES, LIPS, SLIDERS, Edits
from model.engine import Engine

KEYS = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")

# slider value -> {(keypoint, axis): expression delta}, worked out by hand from the official
# src/gradio_pipeline.py update_delta_new_* functions (execute_image_retargeting passes -mov_x)
OFFICIAL = {
    ("smile", 1.0): {(20, 1): -0.01, (14, 1): -0.02, (17, 1): 0.0065, (17, 2): 0.003, (13, 1): -0.00275,
                     (16, 1): -0.00275, (3, 1): -0.0035, (7, 1): -0.0035},
    ("smile", -0.2): {(20, 1): 0.002, (14, 1): 0.004, (17, 1): -0.0013, (17, 2): -0.0006, (13, 1): 0.00055,
                      (16, 1): 0.00055, (3, 1): 0.0007, (7, 1): 0.0007},
    ("wink", 10.0): {(11, 1): 0.01, (13, 1): -0.003, (17, 0): 0.003, (17, 1): 0.003, (3, 1): -0.003},
    ("eyebrow", 10.0): {(1, 1): 0.01, (2, 1): -0.01},  # the "> 0" branch
    ("eyebrow", -10.0): {(1, 0): 0.01, (2, 0): -0.01, (1, 1): -0.003, (2, 1): 0.003},  # the "else" branch
    ("gaze_x", 10.0): {(11, 0): 0.007, (15, 0): 0.01},  # the "> 0" branch
    ("gaze_x", -10.0): {(11, 0): -0.01, (15, 0): -0.007},  # the "else" branch
    # -0.001*y on 11 and 15, then blink = -y/2: -0.001*blink on 11 and 15, 0.0003*blink on 13 and 16
    ("gaze_y", 10.0): {(11, 1): -0.005, (15, 1): -0.005, (13, 1): -0.0015, (16, 1): -0.0015},
    ("gaze_y", -20.0): {(11, 1): 0.01, (15, 1): 0.01, (13, 1): 0.003, (16, 1): 0.003},
    ("pout", 0.05): {(19, 0): 0.05},
    ("purse", 10.0): {(14, 1): 0.01, (3, 1): -0.005, (7, 1): -0.005, (17, 2): -0.005},
    ("grin", 10.0): {(20, 2): -0.01, (20, 1): -0.01, (14, 1): -0.01},
    ("lip_open", 100.0): {(19, 1): 0.1, (19, 2): 0.01, (17, 1): -0.01},
    ("mov_x", 0.1): {(5, 0): -0.1},
    ("mov_y", 0.1): {(5, 1): 0.1},
}


def expected_offset(deltas: dict) -> torch.Tensor:
    out = torch.zeros(21, 3)
    for (kp, axis), d in deltas.items():
        out[kp, axis] = d
    return out


def offset_of(rows: torch.Tensor) -> torch.Tensor:
    return rows[:, 69:].view(-1, 21, 3)


@pytest.fixture(scope="module")
def infos(golden):
    info = lambda tag: {k: torch.from_numpy(golden[f"M.{tag}.{k}"]) for k in KEYS}
    return info("src"), info("drv"), info("drv0")


def absolute_exp(source, driving) -> torch.Tensor:
    """The official absolute-mode expression: the driving's on its subset of entries, else the source's."""
    exp = source["exp"].clone()
    for k, (lo, hi) in kin._ABSOLUTE_EXP.items():
        exp[:, k, lo:hi] = driving["exp"][:, k, lo:hi]
    return exp


def motion(infos, region="all", relative=True, **edits):
    """Driving keypoints before stitching, through editing.select and the unchanged official formulas."""
    source, driving, reference = infos
    s, rel_d, rel_r, abs_d = editing.select(source, driving, reference, editing.expand([region], [Edits(**edits)]))
    return kin.relative_motion(s, rel_d, rel_r) if relative else kin.absolute_motion(s, abs_d)


# ---- the tables ----

def test_official_ranges_and_defaults():
    assert SLIDERS["smile"][:3] == (-0.3, 1.3, 0.0) and SLIDERS["wink"][:3] == (0.0, 39.0, 0.0)
    assert SLIDERS["eyebrow"][:3] == (-30.0, 30.0, 0.0) and SLIDERS["gaze_x"][:3] == (-30.0, 30.0, 0.0)
    assert SLIDERS["gaze_y"][:3] == (-63.0, 63.0, 0.0) and SLIDERS["lip_open"][:3] == (-90.0, 120.0, 0.0)
    assert SLIDERS["pitch"][:2] == (-15.0, 15.0) and SLIDERS["yaw"][:2] == (-25.0, 25.0)
    assert SLIDERS["mov_z"][:3] == (0.9, 1.2, 1.0) and SLIDERS["mov_x"][:2] == (-0.19, 0.19)
    assert LIPS == (6, 12, 14, 17, 19, 20) and EYES == (11, 13, 15, 16, 18)
    assert {k: v[2] for k, v in SLIDERS.items()} == Edits().values()


@pytest.mark.parametrize("slider,value", list(OFFICIAL))
def test_each_slider_changes_the_official_entries_by_the_official_amounts(slider, value):
    rows = editing.expand(["all"], [Edits(**{slider: value})])
    offset = offset_of(rows)[0]
    expected = expected_offset(OFFICIAL[slider, value])
    assert torch.equal(offset != 0, expected != 0), f"{slider}={value} changes other entries"
    torch.testing.assert_close(offset, expected, atol=1e-8, rtol=1e-6)
    assert torch.equal(rows[:, 2:6], torch.tensor([[0.0, 0.0, 0.0, 1.0]]))  # no pose edit


def test_no_edit_and_region_all_pass_everything_through_unchanged(infos):
    source, driving, reference = infos
    s, rel_d, rel_r, abs_d = editing.select(source, driving, reference, editing.expand(["all"], [Edits()]))
    for got, want in ((s, source), (rel_d, driving), (rel_r, reference), (abs_d, driving)):
        assert all(torch.equal(got[k], want[k]) for k in KEYS)


def test_batch_rows_equal_single_rows():
    regions = ["eyes", "all", "pose", "lips", "expression"]
    edits = [Edits(gaze_x=-12.5, eyebrow=7), Edits(smile=0.7, pitch=5, mov_z=1.1), Edits(),
             Edits(eyebrow=-3, gaze_x=4, lip_open=-50, mov_x=0.1), Edits(wink=20, grin=3, roll=-9)]
    batch = editing.expand(regions, edits)
    assert torch.equal(batch, torch.cat([editing.expand([r], [e]) for r, e in zip(regions, edits)]))


# ---- regions (official animation_region), relative and absolute ----

@pytest.mark.parametrize("relative", [True, False])
def test_regions(infos, relative):
    source, driving, reference = infos
    rest = kin.transform_keypoint(source)  # the source's own keypoints (tz is ignored either way)
    r_s = kin.rotation_matrix(source["pitch"], source["yaw"], source["roll"])
    r_d = kin.rotation_matrix(driving["pitch"], driving["yaw"], driving["roll"])
    r_0 = kin.rotation_matrix(reference["pitch"], reference["yaw"], reference["roll"])
    everything = motion(infos, relative=relative)
    assert torch.equal(everything, kin.relative_motion(source, driving, reference) if relative
                       else kin.absolute_motion(source, driving))
    # pose: the driving rotation and translation, the source's expression and scale
    rot, t = ((r_d @ r_0.transpose(1, 2)) @ r_s, source["t"] + (driving["t"] - reference["t"])) if relative \
        else (r_d, driving["t"])
    torch.testing.assert_close(motion(infos, "pose", relative),
                               kin.compose(source["kp"], rot, source["exp"], source["scale"], t), atol=1e-6, rtol=0)
    # expression: the source's head pose, scale and translation; the driving expression
    exp = source["exp"] + (driving["exp"] - reference["exp"]) if relative else absolute_exp(source, driving)
    torch.testing.assert_close(motion(infos, "expression", relative),
                               kin.compose(source["kp"], r_s, exp, source["scale"], source["t"]), atol=1e-6, rtol=0)
    # lips / eyes: only their keypoints move, exactly; they move as in "expression"
    for region, idx in (("lips", LIPS), ("eyes", EYES)):
        x = motion(infos, region, relative)
        moved = (x != rest).any(-1)[0].nonzero().flatten().tolist()
        assert moved == list(idx), region
        torch.testing.assert_close(x[:, idx], motion(infos, "expression", relative)[:, idx], atol=1e-6, rtol=0)
    assert not torch.allclose(everything, motion(infos, "expression", relative))


def test_pose_sliders_follow_execute_image_retargeting(infos):
    """pitch/yaw/roll are degrees added to the source's angles; mov_z multiplies the scale. Driving == reference:
    the still portrait, as in the official image retargeting."""
    source = infos[0]
    still = (source, source, source)
    dp, dy, dr = 10.0, -20.0, 5.0
    rot = kin.rotation_matrix(source["pitch"] + dp, source["yaw"] + dy, source["roll"] + dr)
    torch.testing.assert_close(motion(still, pitch=dp, yaw=dy, roll=dr),
                               kin.compose(source["kp"], rot, source["exp"], source["scale"], source["t"]),
                               atol=1e-6, rtol=0)
    t = torch.cat([source["t"][:, :2], torch.zeros(1, 1)], 1)[:, None]
    torch.testing.assert_close(motion(still, mov_z=1.2) - t, 1.2 * (motion(still) - t), atol=1e-6, rtol=0)
    # after the driving motion: absolute mode adds them to the driving angles
    drv = infos[1]
    rot = kin.rotation_matrix(drv["pitch"] + dp, drv["yaw"], drv["roll"])
    torch.testing.assert_close(motion(infos, relative=False, pitch=dp),
                               kin.compose(source["kp"], rot, absolute_exp(source, drv), source["scale"], drv["t"]),
                               atol=1e-6, rtol=0)


def test_expression_sliders_move_the_keypoints_by_scale_times_offset(infos):
    source, driving, reference = infos
    base = motion(infos)
    for (slider, value), deltas in OFFICIAL.items():
        for relative in (True, False):
            delta = motion(infos, relative=relative, **{slider: value}) - motion(infos, relative=relative)
            scale = source["scale"] * (driving["scale"] / reference["scale"]) if relative else source["scale"]
            expected = scale * expected_offset(deltas)
            assert torch.equal(delta[0] != 0, expected != 0), (slider, value, relative)
            torch.testing.assert_close(delta[0], expected, atol=2e-7, rtol=1e-4)
    assert torch.equal(motion(infos, gaze_x=0.0, eyebrow=-0.0), base)


# ---- the engine ----

def make(nets, golden) -> Engine:
    engine = Engine(nets, device="cpu", threads=torch.get_num_threads())
    engine.set_source(golden["input.source_rgb_u8"])
    engine.set_reference(golden["input.driving0_rgb_u8"])
    return engine


def test_all_zero_is_todays_output_bit_for_bit(tiny_nets, golden, monkeypatch):
    """Region "all" and no edits: the step's output equals today's step, in which the official formulas get the
    session's source, driving and reference motion as they are (editing.select passing them through)."""
    engine = make(tiny_nets, golden)
    drv = golden["input.driving_rgb_u8"][None]
    base = dict(relative=True, stitching=True, multiplier=1.0, eye_target=None, lip_target=None)
    settings = [{**base, **s} for s in ({}, {"relative": False}, {"stitching": False},
                                         {"eye_target": 0.1, "lip_target": 0.5},
                                         {"multiplier": 0.6, "relative": False, "stitching": False})]
    ours = []
    for s in settings:
        engine.set_controls(**s)
        ours.append(engine.animate(drv))
    monkeypatch.setattr(editing, "select", lambda source, driving, reference, rows: (source, driving, reference,
                                                                                      driving))
    for s, out in zip(settings, ours):
        engine.set_controls(**s)
        assert np.array_equal(out, engine.animate(drv)), s


def w_input(engine: Engine, crops, names) -> torch.Tensor:
    """The driving keypoints the warping module gets."""
    got = []
    handle = engine.W.register_forward_hook(lambda m, args, out: got.append(args[1].clone()))
    try:
        engine.animate(crops, names)
    finally:
        handle.remove()
    return got[0]


def test_engine_applies_the_sliders_after_the_driving_motion(tiny_nets, golden):
    engine = make(tiny_nets, golden)
    engine.set_controls(stitching=False)
    drv = golden["input.driving_rgb_u8"][None]
    engine.set_reference(drv[0])  # no change of scale since the reference: the keypoints move by scale * offset
    base = w_input(engine, drv, ["default"])
    scale = engine.sessions["default"].source["scale"]
    for (slider, value), deltas in OFFICIAL.items():
        engine.set_controls(**{slider: value})
        delta = w_input(engine, drv, ["default"]) - base
        engine.set_controls(**{slider: SLIDERS[slider][2]})
        expected = scale * expected_offset(deltas)
        assert torch.equal(delta[0] != 0, expected != 0), (slider, value)
        torch.testing.assert_close(delta[0], expected, atol=3e-7, rtol=1e-4)
    assert torch.equal(w_input(engine, drv, ["default"]), base)
    with pytest.raises(ValueError, match="animation region"):
        engine.set_controls(region="mouth")
    with pytest.raises(ValueError):
        engine.set_controls(smile="lots")


def test_mixed_regions_and_edits_in_one_batch_equal_singles(tiny_nets, golden):
    engine = make(tiny_nets, golden)
    src, ref, drv = (golden[f"input.{k}_rgb_u8"] for k in ("source", "driving0", "driving"))
    setup = {"a": ("all", Edits()), "b": ("lips", Edits(smile=0.8, gaze_x=-10)),
             "c": ("pose", Edits(eyebrow=-12, yaw=15, mov_z=1.1)), "d": ("eyes", Edits(gaze_x=10, wink=5))}
    for name, (region, edits) in setup.items():
        engine.set_source(src, name)
        engine.set_reference(ref, name)
        engine.set_controls(name, region=region, **edits.values())
    crops = np.stack([drv, ref, drv, drv])
    batch = engine.animate(crops, list(setup))
    singles = np.concatenate([engine.animate(crops[i:i + 1], [n]) for i, n in enumerate(setup)])
    assert np.abs(batch.astype(int) - singles).max() <= 1  # batched convolutions sum in another order
    x_batch = w_input(engine, crops, list(setup))
    x_single = torch.cat([w_input(engine, crops[i:i + 1], [n]) for i, n in enumerate(setup)])
    torch.testing.assert_close(x_batch, x_single, atol=1e-5, rtol=0)
    assert len({im.tobytes() for im in batch}) == 4
