"""Animation regions and the official editing sliders, as per-item tensors for the branch-free per-frame step.

Facts from the official LivePortrait (KwaiVGI/LivePortrait), our own vectorised code:
- regions (src/live_portrait_pipeline.py, `execute`, `animation_region`): "all" animates rotation, translation,
  expression and, in relative mode, scale; "pose" rotation and translation; "exp" the expression; "lip" and "eyes"
  only the expression of their keypoints (LIPS, EYES). Whatever a region does not animate stays the source's.
- expression sliders (src/gradio_pipeline.py, `update_delta_new_*`): each adds slider * coefficient to a few
  (keypoint, axis) entries of the expression; gaze-x and eyebrow use other coefficients for negative values.
- pose sliders (`execute_image_retargeting`): pitch/yaw/roll are degrees added to the source's head angles, mov_z
  multiplies the scale, mov_x/mov_y move expression keypoint 5 (mov_x with a minus sign).
- ranges and defaults: app.py's sliders.

The step stays one graph for every combination: `expand` turns each item's region and sliders into one row of
numbers (masks, offsets), and `select` picks per item, with torch.where only, what goes into the unchanged
official formulas (kinematics.relative_motion / absolute_motion).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import torch

from . import kinematics as kin

REGIONS = ("all", "expression", "pose", "lips", "eyes")
LIPS = (6, 12, 14, 17, 19, 20)
EYES = (11, 13, 15, 16, 18)
ANGLES = ("pitch", "yaw", "roll")

# slider: (min, max, default, step, label), the official app.py ranges
SLIDERS = {
    "smile": (-0.3, 1.3, 0.0, 0.01, "Smile"),
    "wink": (0.0, 39.0, 0.0, 0.01, "Wink"),
    "eyebrow": (-30.0, 30.0, 0.0, 0.01, "Eyebrow"),
    "gaze_x": (-30.0, 30.0, 0.0, 0.01, "Gaze horizontal"),
    "gaze_y": (-63.0, 63.0, 0.0, 0.01, "Gaze vertical"),
    "pout": (-0.09, 0.09, 0.0, 0.01, "Pouting"),
    "purse": (-20.0, 15.0, 0.0, 0.01, "Pursing"),
    "grin": (0.0, 15.0, 0.0, 0.01, "Grin"),
    "lip_open": (-90.0, 120.0, 0.0, 1.0, "Lips close ↔ open"),
    "pitch": (-15.0, 15.0, 0.0, 1.0, "Head pitch (°)"),
    "yaw": (-25.0, 25.0, 0.0, 1.0, "Head yaw (°)"),
    "roll": (-15.0, 15.0, 0.0, 1.0, "Head roll (°)"),
    "mov_x": (-0.19, 0.19, 0.0, 0.01, "Move x"),
    "mov_y": (-0.19, 0.19, 0.0, 0.01, "Move y"),
    "mov_z": (0.9, 1.2, 1.0, 0.01, "Move z (zoom)"),
}

# slider: (keypoint, axis, coefficient) or (keypoint, axis, coefficient for value > 0, coefficient for value <= 0)
_EXPRESSION = {
    "smile": ((20, 1, -0.01), (14, 1, -0.02), (17, 1, 0.0065), (17, 2, 0.003), (13, 1, -0.00275),
              (16, 1, -0.00275), (3, 1, -0.0035), (7, 1, -0.0035)),
    "wink": ((11, 1, 0.001), (13, 1, -0.0003), (17, 0, 0.0003), (17, 1, 0.0003), (3, 1, -0.0003)),
    "eyebrow": ((1, 1, 0.001, 0.0003), (2, 1, -0.001, -0.0003), (1, 0, 0.0, -0.001), (2, 0, 0.0, 0.001)),
    "gaze_x": ((11, 0, 0.0007, 0.001), (15, 0, 0.001, 0.0007)),
    # -0.001 per unit on 11 and 15, plus the official "blink" term -y/2 * (-0.001 on 11 and 15, 0.0003 on 13 and 16)
    "gaze_y": ((11, 1, -0.0005), (15, 1, -0.0005), (13, 1, -0.00015), (16, 1, -0.00015)),
    "pout": ((19, 0, 1.0),),
    "purse": ((14, 1, 0.001), (3, 1, -0.0005), (7, 1, -0.0005), (17, 2, -0.0005)),
    "grin": ((20, 2, -0.001), (20, 1, -0.001), (14, 1, -0.001)),
    "lip_open": ((19, 1, 0.001), (19, 2, 0.0001), (17, 1, -0.0001)),
    "mov_x": ((5, 0, -1.0),),
    "mov_y": ((5, 1, 1.0),),
}
EXPRESSION = tuple(_EXPRESSION)


def _coefficients() -> tuple[torch.Tensor, torch.Tensor]:
    """(K,21,3) coefficient tables for positive and for non-positive slider values."""
    pos, neg = torch.zeros(len(EXPRESSION), 21, 3), torch.zeros(len(EXPRESSION), 21, 3)
    for i, entries in enumerate(_EXPRESSION.values()):
        for kp, axis, *coef in entries:
            pos[i, kp, axis], neg[i, kp, axis] = coef[0], coef[-1]
    return pos, neg


def _region_masks() -> torch.Tensor:
    """(R,21,3): which expression entries each region takes from the driving frame."""
    mask = torch.zeros(len(REGIONS), 21, 3)
    mask[REGIONS.index("all")] = mask[REGIONS.index("expression")] = 1
    mask[REGIONS.index("lips"), list(LIPS)] = 1
    mask[REGIONS.index("eyes"), list(EYES)] = 1
    return mask


_POS, _NEG = _coefficients()
_EXP_MASK = _region_masks()
_POSE = torch.tensor([[float(r in ("all", "pose"))] for r in REGIONS])  # rotation and translation from the driving
_SCALE = torch.tensor([[float(r == "all")] for r in REGIONS])  # scale from the driving (relative mode)


@dataclass
class Edits:
    """The editing sliders of one session (official ranges in SLIDERS); all defaults = no edit."""
    smile: float = 0.0
    wink: float = 0.0
    eyebrow: float = 0.0
    gaze_x: float = 0.0
    gaze_y: float = 0.0
    pout: float = 0.0
    purse: float = 0.0
    grin: float = 0.0
    lip_open: float = 0.0
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0
    mov_x: float = 0.0
    mov_y: float = 0.0
    mov_z: float = 1.0

    def values(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(Edits)}


def check_region(region: str) -> str:
    if region not in REGIONS:
        raise ValueError(f"unknown animation region {region!r}; one of {', '.join(REGIONS)}")
    return region


def check(name: str, value):
    """A control's value as the step reads it: a known region, a slider as a float; anything else as given."""
    return check_region(value) if name == "region" else float(value) if name in SLIDERS else value


def expand(regions: Sequence[str], edits: Sequence[Edits]) -> torch.Tensor:
    """Per-item rows (B, 132) for the step: [pose from driving, scale from driving, pitch/yaw/roll offsets (deg),
    scale factor, expression mask (63), expression offset (63)]. Vectorised over the batch; the sign-dependent
    coefficients are a torch.where, so every row is computed the same way."""
    region = torch.tensor([REGIONS.index(check_region(r)) for r in regions])
    values = torch.tensor([[float(getattr(e, k)) for k in (*EXPRESSION, *ANGLES, "mov_z")] for e in edits])
    v = values[:, :len(EXPRESSION), None, None]
    offset = (v * torch.where(v > 0, _POS, _NEG)).sum(1)
    return torch.cat([_POSE[region], _SCALE[region], values[:, len(EXPRESSION):], _EXP_MASK[region].flatten(1),
                      offset.flatten(1)], 1)


def select(source: kin.KpInfo, driving: kin.KpInfo, reference: kin.KpInfo,
           rows: torch.Tensor) -> tuple[kin.KpInfo, kin.KpInfo, kin.KpInfo, kin.KpInfo]:
    """Per item, what goes into the official formulas: (source, driving, reference) for
    `relative_motion` and (source, driving) for `absolute_motion`, such that they animate only the item's region and
    apply its edits after the motion. Branch-free: one graph for any mix of regions and sliders.

    The edits go on the source: angles + offsets, expression + offset, scale * mov_z. In relative mode a part the
    region leaves alone gets no motion (driving := reference; for rotation both angles := 0, so R_d R_0^T is exactly
    I); in absolute mode it is the source's. With region "all" and no edits every tensor passes through unchanged."""
    b = rows.shape[0]
    pose, scale, angles, mov_z = rows[:, 0:1] > 0, rows[:, 1:2] > 0, rows[:, 2:5], rows[:, 5:6]
    mask, offset = rows[:, 6:69].view(b, 21, 3) > 0, rows[:, 69:132].view(b, 21, 3)
    src = {**source, "exp": source["exp"] + offset, "scale": source["scale"] * mov_z,
           **{k: source[k] + angles[:, i:i + 1] for i, k in enumerate(ANGLES)}}
    zero = torch.zeros_like(source["pitch"])
    rel_d = {**driving, "exp": torch.where(mask, driving["exp"], reference["exp"]),
             "scale": torch.where(scale, driving["scale"], reference["scale"]),
             "t": torch.where(pose, driving["t"], reference["t"]),
             **{k: torch.where(pose, driving[k], zero) for k in ANGLES}}
    rel_r = {**reference, **{k: torch.where(pose, reference[k], zero) for k in ANGLES}}
    abs_d = {**driving, "exp": torch.where(mask, driving["exp"] + offset, src["exp"]),
             "t": torch.where(pose, driving["t"], source["t"]),
             **{k: torch.where(pose, driving[k] + angles[:, i:i + 1], src[k]) for i, k in enumerate(ANGLES)}}
    return src, rel_d, rel_r, abs_d
