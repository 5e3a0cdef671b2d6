"""Keypoint math (SPEC §4), batched over B. The official code broadcasts scale (B,1) and t (B,3) against
(B,21,3) in a way that is only right for B=1; here every helper takes any B."""
import math

import torch
import torch.nn.functional as F

KpInfo = dict[str, torch.Tensor]  # pitch/yaw/roll (B,1) degrees, t (B,3), exp (B,21,3), scale (B,1), kp (B,21,3)


def headpose_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """66 bin logits (B,66) -> degrees (B,1): 3 * E[bin] - 97.5 (97.5, not Hopenet's 99)."""
    idx = torch.arange(logits.shape[1], dtype=logits.dtype, device=logits.device)
    return (torch.sum(F.softmax(logits, dim=1) * idx, dim=1) * 3 - 97.5)[:, None]


def refine_kp_info(raw: dict[str, torch.Tensor]) -> KpInfo:
    """M's raw heads -> angles in degrees and (B,21,3) keypoint/expression tensors (official get_kp_info)."""
    b = raw["kp"].shape[0]
    return {"pitch": headpose_to_degrees(raw["pitch"]), "yaw": headpose_to_degrees(raw["yaw"]),
            "roll": headpose_to_degrees(raw["roll"]), "t": raw["t"], "exp": raw["exp"].reshape(b, -1, 3),
            "scale": raw["scale"], "kp": raw["kp"].reshape(b, -1, 3)}


def rotation_matrix(pitch: torch.Tensor, yaw: torch.Tensor, roll: torch.Tensor) -> torch.Tensor:
    """Degrees (B,1) -> R = (Rz Ry Rx)^T (B,3,3), for row-vector keypoints: x @ R."""
    p, y, r = (a.reshape(-1, 1) / 180 * math.pi for a in (pitch, yaw, roll))
    one, zero = torch.ones_like(p), torch.zeros_like(p)
    rx = torch.cat([one, zero, zero, zero, p.cos(), -p.sin(), zero, p.sin(), p.cos()], 1).view(-1, 3, 3)
    ry = torch.cat([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], 1).view(-1, 3, 3)
    rz = torch.cat([r.cos(), -r.sin(), zero, r.sin(), r.cos(), zero, zero, zero, one], 1).view(-1, 3, 3)
    return (rz @ ry @ rx).transpose(1, 2)


def rotation_angles(rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `rotation_matrix`: R (B,3,3) -> pitch, yaw, roll (B,1) degrees, for motion stored as matrices
    (motion templates). Yaw is taken in [-90, 90]; any R is reproduced exactly whatever the angles it came from."""
    deg = lambda a: (a * (180 / math.pi))[:, None]
    return (deg(torch.atan2(rot[:, 1, 2], rot[:, 2, 2])), deg(torch.asin((-rot[:, 0, 2]).clamp(-1, 1))),
            deg(torch.atan2(rot[:, 0, 1], rot[:, 0, 0])))


def compose(kp: torch.Tensor, rot: torch.Tensor, exp: torch.Tensor, scale: torch.Tensor,
            t: torch.Tensor) -> torch.Tensor:
    """x = s * (kp @ R + exp) + [tx, ty, 0] for (B,21,3) kp/exp, (B,3,3) R, (B,1) s, (B,3) t; tz ignored."""
    x = (kp @ rot + exp) * scale.reshape(-1, 1, 1)
    return torch.cat([x[..., :2] + t[:, None, :2], x[..., 2:]], dim=-1)


def transform_keypoint(info: KpInfo) -> torch.Tensor:
    """Implicit keypoints x = T(x_c, R, delta, s, t) (official transform_keypoint)."""
    return compose(info["kp"], rotation_matrix(info["pitch"], info["yaw"], info["roll"]), info["exp"],
                   info["scale"], info["t"])


def relative_motion(source: KpInfo, driving: KpInfo, reference: KpInfo) -> torch.Tensor:
    """Driving keypoints in relative mode: the driving frame's motion since the reference frame, applied to the
    source (official pipeline, animation_region='all'). The canonical keypoints are always the source's."""
    r_s = rotation_matrix(source["pitch"], source["yaw"], source["roll"])
    r_d = rotation_matrix(driving["pitch"], driving["yaw"], driving["roll"])
    r_0 = rotation_matrix(reference["pitch"], reference["yaw"], reference["roll"])
    rot = (r_d @ r_0.transpose(1, 2)) @ r_s
    exp = source["exp"] + (driving["exp"] - reference["exp"])
    scale = source["scale"] * (driving["scale"] / reference["scale"])
    t = source["t"] + (driving["t"] - reference["t"])
    return compose(source["kp"], rot, exp, scale, t)


def absolute_motion(source: KpInfo, driving: KpInfo) -> torch.Tensor:
    """Driving keypoints in absolute mode: the driving pose and translation, the source scale, and the driving
    expression only on the official subset of keypoint components (SPEC §4.4)."""
    exp = source["exp"].clone()
    # slices, not lists: a list index is a host->device copy, which CUDA graph capture forbids
    for k, (lo, hi) in _ABSOLUTE_EXP.items():
        exp[:, k, lo:hi] = driving["exp"][:, k, lo:hi]
    rot = rotation_matrix(driving["pitch"], driving["yaw"], driving["roll"])
    return compose(source["kp"], rot, exp, source["scale"], driving["t"])


_ABSOLUTE_EXP = {**{k: (0, 3) for k in (1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)},
                 3: (1, 2), 4: (1, 2), 5: (2, 3), 8: (2, 3), 9: (1, 3)}  # keypoint: component range [lo, hi)


def stitching_input(x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
    """(B,126) = [flatten(x_s), flatten(x_d)], keypoint-major (x,y,z)."""
    return torch.cat([x_s.flatten(1), x_d.flatten(1)], dim=1)


def apply_stitching(x_d: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Stitching MLP output (B,65): 63 per-keypoint deltas plus one (dx, dy) added to every keypoint."""
    b, k = x_d.shape[:2]
    x = x_d + delta[:, :3 * k].reshape(b, k, 3)
    return torch.cat([x[..., :2] + delta[:, None, 3 * k:3 * k + 2], x[..., 2:]], dim=-1)


def retarget_input(x_s: torch.Tensor, ratios: torch.Tensor) -> torch.Tensor:
    """Eye MLP input (B,66) = [flatten(x_s), src_left, src_right, drv_eye]; lip (B,65) = [flatten(x_s), src, drv]."""
    return torch.cat([x_s.flatten(1), ratios.reshape(x_s.shape[0], -1)], dim=1)


def apply_multiplier(x_s: torch.Tensor, x_d: torch.Tensor, multiplier: float | torch.Tensor = 1.0) -> torch.Tensor:
    """x_d <- x_s + (x_d - x_s) * driving_multiplier (after stitching)."""
    return x_s + (x_d - x_s) * multiplier
