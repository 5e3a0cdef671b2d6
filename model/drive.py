"""Driving formulas of the official offline pipeline that the live per-frame step does not cover (SPEC §4.4, §5.4):
a driving image (its expression measured against the fixed `lip_array`) and a source video (v2v: the source's own
motion kept, the driving expression and rotation added to it, both sequences smoothed).

The v2v smoother is the official one, re-derived: pykalman's KalmanFilter with identity transition and
observation matrices, transition covariance 1e-5·I, observation covariance 3e-7·I, initial state the first
observation and initial covariance I (pykalman's default), RTS-smoothed (`kf.smooth`). With every covariance a
multiple of I, each dimension runs the same scalar recursion, so it is a few lines of numpy here
(tests/test_drive.py checks it against pykalman's output on a test sequence).
"""
from __future__ import annotations

import numpy as np

from .editing import EYES, LIPS

# the official src/utils/resources/lip_array.pkl (SPEC Appendix B): the expression a driving image is measured against
LIP_ARRAY = np.array([
    [-9.45240e-05, 2.42220e-04, -4.00974e-05], [2.08596e-04, 4.68054e-04, 1.27464e-05],
    [-1.24602e-04, 3.24972e-04, 4.42500e-06], [1.19652e-04, -4.56624e-04, 5.40852e-05],
    [-2.65254e-04, -7.45980e-05, -1.55280e-05], [-3.34884e-05, -1.83036e-04, -3.49404e-06],
    [-4.75428e-07, -4.52466e-07, 1.59498e-06], [-5.41296e-04, 2.63280e-03, 7.24860e-06],
    [-1.16940e-05, 5.00502e-06, 9.98880e-06], [8.02860e-07, 5.19132e-06, -4.09344e-04],
    [1.66878e-04, -1.98150e-05, -8.85480e-05], [-1.51536e-05, 8.25060e-05, 5.94012e-06],
    [-2.61054e-07, 2.75910e-06, 2.21028e-06], [-6.62820e-05, -6.82860e-05, -3.45318e-06],
    [-8.32620e-04, -1.79592e-03, -2.59176e-06], [6.97140e-06, 3.65514e-05, -1.89780e-06],
    [-4.80876e-06, 7.11480e-06, -1.03236e-05], [-6.36840e-04, -1.16610e-03, 5.62314e-05],
    [2.83290e-04, -1.45656e-05, 1.09746e-05], [-4.16022e-06, -1.50906e-02, -2.54940e-03],
    [2.22474e-04, 5.62788e-03, 2.72646e-03]])[None]

OBSERVATION_VARIANCE = 3e-7  # the official driving_smooth_observation_variance
PROCESS_VARIANCE = 1e-5
EYE_THRESHOLD, EYE_OPEN = 0.18, 0.39  # source-video eye retargeting: frame 0's mean eye ratio, or this if below

# expression entries a source video takes from the driving motion (keypoint: component range), as absolute mode
_V2V_EXP = {**{k: (0, 3) for k in (1, 2, 6, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20)},
            3: (1, 2), 4: (1, 2), 5: (2, 3), 8: (2, 3), 9: (1, 3)}
_REGION_EXP = {"all": _V2V_EXP, "expression": _V2V_EXP, "pose": {},
               "lips": {k: (0, 3) for k in LIPS}, "eyes": {k: (0, 3) for k in EYES}}


def image_reference(driving: dict[str, np.ndarray], region: str = "all") -> dict[str, np.ndarray]:
    """The reference that makes the relative formula the official single-image one: the driving image's own pose,
    scale and translation (so those stay the source's) and `lip_array` as the expression (0 on the eye keypoints
    for the eyes region, as officially)."""
    exp = LIP_ARRAY.astype(np.float32)
    if region == "eyes":
        exp[:, list(EYES)] = 0
    return {**driving, "exp": exp}


def kalman_smooth(x: np.ndarray, observation_variance: float = OBSERVATION_VARIANCE,
                  process_variance: float = PROCESS_VARIANCE) -> np.ndarray:
    """RTS-smoothed (N, ...) sequence, float64, equal to the official pykalman smoother (module docstring)."""
    y = np.asarray(x, np.float64).reshape(len(x), -1)
    n = len(y)
    mean, var = np.empty_like(y), np.empty(n)
    prior_mean, prior_var = y[0], 1.0  # initial state: the first observation, covariance I
    for i in range(n):
        if i:
            prior_mean, prior_var = mean[i - 1], var[i - 1] + process_variance
        gain = prior_var / (prior_var + observation_variance)
        mean[i] = prior_mean + gain * (y[i] - prior_mean)
        var[i] = (1 - gain) * prior_var
    out = mean.copy()
    for i in range(n - 2, -1, -1):
        j = var[i] / (var[i] + process_variance)
        out[i] = mean[i] + j * (out[i + 1] - mean[i])
    return out.reshape(np.shape(x))


def source_video_keypoints(source: dict[str, np.ndarray], driving: dict[str, np.ndarray], region: str = "all",
                           image: bool = False) -> np.ndarray:
    """Driving keypoints x_d (N,21,3) for N source-video frames in relative mode (official v2v).

    `source`/`driving`: per-frame motion as stacked arrays R (N,3,3), exp and kp (N,21,3), scale (N,1), t (N,3)
    (driving: N frames, or one frame with `image`). The driving expression change (frame i minus frame 0; for a
    driving image, its expression minus `lip_array`) is added to each source frame's expression, the driving
    rotation change to its rotation, both sequences smoothed (a driving image: not smoothed); the expression is
    written only into the entries the region animates. Scale and translation stay the source frame's."""
    s = {k: np.asarray(v, np.float64) for k, v in source.items()}
    d = {k: np.asarray(v, np.float64) for k, v in driving.items()}
    n = len(s["R"])
    if image:
        exp = s["exp"] + (d["exp"][:1] - LIP_ARRAY)
        rot = s["R"]
    else:
        exp = kalman_smooth(s["exp"] + d["exp"][:n] - d["exp"][:1])
        rot = kalman_smooth(d["R"][:n] @ d["R"][:1].transpose(0, 2, 1) @ s["R"]) \
            if region in ("all", "pose") else s["R"]
    delta = s["exp"].copy()
    for k, (lo, hi) in _REGION_EXP[region].items():
        delta[:, k, lo:hi] = exp[:, k, lo:hi]
    # float32 from here, like the official tensors
    f32 = lambda a: a.astype(np.float32)
    t = f32(s["t"]).copy()
    t[:, 2] = 0
    x = (f32(s["kp"]) @ f32(rot) + f32(delta)) * f32(s["scale"])[:, :, None]
    return x + t[:, None, :]


def source_eye_target(eyes: np.ndarray) -> float:
    """The eye-open ratio a source video is retargeted to (official flag_source_video_eye_retargeting): the mean of
    frame 0's two eye ratios, or 0.39 when that is below 0.18 (closed eyes on frame 0)."""
    value = float(np.mean(eyes[0][:2]))
    return EYE_OPEN if value < EYE_THRESHOLD else value
