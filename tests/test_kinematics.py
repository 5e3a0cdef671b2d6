"""Keypoint math at batch B > 1 (the official code is only right at B=1)."""
import numpy as np
import torch

from model import kinematics as kin

TAGS = ("src", "drv0", "drv")
KEYS = ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")


def stacked(golden, tags):
    return {k: torch.cat([torch.from_numpy(golden[f"M.{t}.{k}"]) for t in tags]) for k in KEYS}


def test_batched_transform_equals_golden_per_item(golden):
    info = stacked(golden, TAGS)
    rot = kin.rotation_matrix(info["pitch"], info["yaw"], info["roll"])
    x = kin.transform_keypoint(info)
    for i, tag in enumerate(TAGS):
        np.testing.assert_allclose(rot[i].numpy(), golden[f"R.{tag}"][0], atol=1e-6)
        np.testing.assert_allclose(x[i].numpy(), golden[f"K.{tag}"][0], atol=1e-5)
    raw = {k: torch.cat([torch.from_numpy(golden[f"M.{t}.raw.{k}"]) for t in TAGS]) for k in KEYS}
    refined = kin.refine_kp_info(raw)
    for k in KEYS:
        np.testing.assert_allclose(refined[k].numpy(), info[k].numpy(), atol=1e-4)


def test_batched_relative_motion_differs_per_item_and_matches_single(golden):
    """B=3 sessions with different sources, drivings and references equal three B=1 calls."""
    src, drv, ref = stacked(golden, ("src", "drv", "drv0")), stacked(golden, ("drv", "src", "drv")), \
        stacked(golden, ("drv0", "drv0", "src"))
    out = kin.relative_motion(src, drv, ref)
    for i in range(3):
        one = lambda d: {k: v[i:i + 1] for k, v in d.items()}
        np.testing.assert_allclose(out[i:i + 1].numpy(), kin.relative_motion(one(src), one(drv), one(ref)).numpy(),
                                   atol=1e-6)
    np.testing.assert_allclose(out[0].numpy(), golden["REL.x_d_new"][0], atol=1e-5)
    assert not torch.allclose(out[0], out[1])


def test_relative_motion_without_driver_motion_is_the_source(golden):
    src, drv = stacked(golden, ("src", "drv")), stacked(golden, ("drv", "drv0"))
    t = src["t"].clone()
    t[:, 2] = 0  # tz is ignored anyway
    x = kin.relative_motion(src, drv, drv)
    np.testing.assert_allclose(x.numpy(), kin.transform_keypoint({**src, "t": t}).numpy(), atol=1e-5)


def test_rotation_matrix_conventions():
    deg = torch.tensor([[30.0], [0.0], [0.0], [-20.0]])
    z = torch.zeros(4, 1)
    r = kin.rotation_matrix(torch.cat([deg[:1], z[1:]]), torch.cat([z[:1], torch.tensor([[90.0]]), z[2:]]),
                            torch.cat([z[:3], deg[3:]]))
    eye = torch.eye(3).expand(4, 3, 3)
    torch.testing.assert_close(r @ r.transpose(1, 2), eye, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.linalg.det(r), torch.ones(4), atol=1e-6, rtol=0)
    torch.testing.assert_close(r[2], eye[0], atol=1e-6, rtol=0)  # all zero angles
    # yaw +90 about y, row vectors: x-axis (1,0,0) maps to (0,0,-1)
    torch.testing.assert_close(torch.tensor([[1.0, 0, 0]]) @ r[1], torch.tensor([[0.0, 0, -1]]), atol=1e-6, rtol=0)
    # roll -20 about z on row vectors: x @ Rz^T
    c, s = np.cos(np.radians(-20)), np.sin(np.radians(-20))
    np.testing.assert_allclose(r[3].numpy(), np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]]), atol=1e-6)


def test_headpose_bins():
    logits = torch.full((2, 66), -1e4)
    logits[0, 0], logits[1, 65] = 0, 0
    torch.testing.assert_close(kin.headpose_to_degrees(logits), torch.tensor([[-97.5], [97.5]]))


def test_stitching_and_retarget_layout_batched():
    x_s, x_d = torch.randn(4, 21, 3), torch.randn(4, 21, 3)
    feat = kin.stitching_input(x_s, x_d)
    assert feat.shape == (4, 126) and torch.equal(feat[2, 63:66], x_d[2, 0])
    delta = torch.zeros(4, 65)
    delta[1, 63:65] = torch.tensor([0.5, -0.25])
    delta[3, 5] = 1.0  # keypoint 1, z
    out = kin.apply_stitching(x_d, delta)
    torch.testing.assert_close(out[1] - x_d[1], torch.tensor([0.5, -0.25, 0.0]).expand(21, 3))
    assert out[3, 1, 2] == x_d[3, 1, 2] + 1 and torch.equal(out[0], x_d[0])
    eye = kin.retarget_input(x_s, torch.tensor([[0.3, 0.3, 0.1]]).expand(4, 3))
    assert eye.shape == (4, 66) and torch.equal(eye[:, 63:], torch.tensor([0.3, 0.3, 0.1]).expand(4, 3))
    assert torch.equal(kin.apply_multiplier(x_s, x_d, 0.0), x_s)


def test_absolute_motion_takes_driving_pose_and_subset_of_expression(golden):
    src, drv = stacked(golden, ("src", "src")), stacked(golden, ("drv", "drv0"))
    x = kin.absolute_motion(src, drv)
    exp = src["exp"].clone()
    exp[:, 19] = drv["exp"][:, 19]
    exp[:, 3, 1] = drv["exp"][:, 3, 1]
    x_ref = kin.compose(src["kp"], kin.rotation_matrix(drv["pitch"], drv["yaw"], drv["roll"]), exp, src["scale"],
                        drv["t"])
    torch.testing.assert_close(x[:, 19], x_ref[:, 19])
    assert not torch.allclose(x[:, 0], kin.transform_keypoint(src)[:, 0])
