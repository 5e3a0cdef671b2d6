"""Harder live clips than the nodding astronaut, and what a live tracker does on them (tests/data/live_baseline.json).

fast_face(): the astronaut moving fast on a 640x480 frame (±70 px, ±14°, scale 0.8-1.1, sensor noise), its true
crop box known from the still's. real_faces(): two real people (NASA's astronaut photo from skimage, Grace Hopper's
US Navy portrait in tests/data/faces; both public domain, tests/data/faces/LICENSE.txt) turning their heads, moving
with motion blur and under changing light. Both are photos, moved and warped: no footage of a real 3D head turn or
of changing expressions ships with any package here.

The baseline was written by the Tasks VIDEO-mode tracker that the live tracker replaced (revision 29927db):

    mkdir /tmp/t29 && git archive 29927db | tar -x -C /tmp/t29 && cp -r tests/face_clips.py tests/crop_fixture.py \
        tests/data/faces /tmp/t29/tests/ && mv /tmp/t29/tests/faces /tmp/t29/tests/data/
    cd /tmp/t29 && PYTHONPATH=.:tests python tests/face_clips.py OUT.json
"""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from crop_fixture import jitter, still_noise_frames, trackers
from stream.face import DRIVING, crop_params

FACES = Path(__file__).parent / "data" / "faces"
W, H = 640, 480


def _on_frame(photo: np.ndarray, height: int) -> np.ndarray:
    """The photo scaled to `height` px, centred on a 640x480 frame (its edges replicated outwards)."""
    k = height / photo.shape[0]
    m = np.array([[k, 0, (W - k * photo.shape[1]) / 2], [0, k, (H - height) / 2]])
    return cv2.warpAffine(photo, m, (W, H), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)


def _noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 4.0) -> np.ndarray:
    return np.clip(img + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def fast_moves(n: int = 60) -> list[np.ndarray]:
    """2×3 similarities of fast_face's frames: shift ±70 px, roll ±14°, scale 0.8-1.1, at up to ~30 px a frame."""
    out = []
    for i in range(n):
        m = cv2.getRotationMatrix2D((W / 2, H / 2), 14 * np.sin(2 * np.pi * i / 20),
                                    0.95 + 0.15 * np.sin(2 * np.pi * i / 25))
        m[:, 2] += (70 * np.sin(2 * np.pi * i / 15), 30 * np.sin(2 * np.pi * i / 17))
        out.append(m)
    return out


def fast_face() -> tuple[np.ndarray, list[np.ndarray]]:
    """The still frame and the fast clip made from it (fast_moves, Gaussian noise σ = 4 levels)."""
    still = _on_frame(data.astronaut(), H)
    rng = np.random.default_rng(0)
    return still, [_noise(cv2.warpAffine(still, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE),
                          rng) for m in fast_moves()]


def true_boxes(still_box: np.ndarray) -> np.ndarray:
    """The driving box (cx, cy, size, angle) of every fast_face frame, moved with the face from the still's."""
    out = []
    for m in fast_moves():
        a = m[:, :2]
        out.append([*(a @ still_box[:2] + m[:, 2]), still_box[2] * np.sqrt(np.linalg.det(a)),
                    still_box[3] + np.arctan2(a[1, 0], a[0, 0])])
    return np.array(out)


def box_errors(boxes: list[np.ndarray | None], truth: np.ndarray) -> np.ndarray:
    """Per frame: centre error in % of the true size, size error in %, angle error in degrees (all infinite on a
    frame where the face was lost)."""
    boxes = np.stack([np.full(4, np.inf) if b is None else b for b in boxes])
    return np.stack([100 * np.hypot(*(boxes[:, :2] - truth[:, :2]).T) / truth[:, 2],
                     100 * np.abs(boxes[:, 2] / truth[:, 2] - 1),
                     np.abs(np.degrees(boxes[:, 3] - truth[:, 3]))], 1)


def _turn(img: np.ndarray, yaw: float, centre: tuple[float, float], width: float) -> np.ndarray:
    """A flat face turned by `yaw` degrees about the vertical axis through `centre`, seen by a camera 3 face widths
    away: the near side grows, the far side shrinks and the face narrows."""
    cx, cy = centre
    f, t = 3 * width, np.radians(yaw)
    src = np.float32([[cx - width, cy - width], [cx + width, cy - width], [cx + width, cy + width],
                      [cx - width, cy + width]])
    x, y = src[:, 0] - cx, src[:, 1] - cy
    z = f + x * np.sin(t)
    dst = np.stack([cx + f * x * np.cos(t) / z, cy + f * y / z], 1).astype(np.float32)
    return cv2.warpPerspective(img, cv2.getPerspectiveTransform(src, dst), (W, H), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)


def _blur(img: np.ndarray, dx: float) -> np.ndarray:
    """Horizontal motion blur over |dx| px (the motion during a 1/30 s exposure)."""
    n = max(1, int(round(abs(dx))))
    return cv2.filter2D(img, -1, np.full((1, n), 1.0 / n, np.float32))


def real_faces() -> list[np.ndarray]:
    """96 frames, 48 per person: a head turn (yaw to ±35° with some roll), fast sideways moves with motion blur
    (up to 26 px a frame), then the light dimming to a third from one side and coming back brighter; sensor noise
    throughout."""
    rng = np.random.default_rng(1)
    people = [(_on_frame(data.astronaut(), 420), (W / 2 - 10, 190), 110),
              (_on_frame(cv2.imread(str(FACES / "grace_hopper.jpg"))[..., ::-1], 440), (W / 2, 200), 95)]
    side = np.linspace(0.0, 1.0, W, dtype=np.float32)[None, :, None]
    out = []
    for img, centre, width in people:
        for i in range(16):  # turning the head, right then left, with a little roll
            s = np.sin(2 * np.pi * i / 16)
            m = cv2.getRotationMatrix2D(centre, 6 * s, 1.0)
            out.append(_noise(cv2.warpAffine(_turn(img, 35 * s, centre, width), m, (W, H),
                                             borderMode=cv2.BORDER_REPLICATE), rng))
        x = 0.0
        for i in range(12):  # fast sideways, blurred along the motion
            nx = 50 * np.sin(2 * np.pi * (i + 1) / 12)
            m = np.float32([[1, 0, nx], [0, 1, 0]])
            out.append(_noise(_blur(cv2.warpAffine(img, m, (W, H), borderMode=cv2.BORDER_REPLICATE), nx - x), rng))
            x = nx
        for i in range(20):  # the light: dimmer towards one side, down to a third, then back up brighter
            gain = 1 + (0.35 - 1) * np.sin(np.pi * i / 14) if i < 14 else 1 + 0.4 * (i - 13) / 6
            light = gain * (1 - 0.5 * (1 - gain) * side) if gain < 1 else np.float32(gain)
            out.append(_noise(np.clip(img * light, 0, 255), rng, 4.0 * gain))
    return out


def track(live, frames: list[np.ndarray]) -> list[np.ndarray | None]:
    """Driving boxes of a live tracker over frames at 30 fps (None where it found no face)."""
    out = []
    for frame in frames:
        lmk = live.landmarks(frame)
        out.append(None if lmk is None else crop_params(lmk, DRIVING["scale"], DRIVING["vx"], DRIVING["vy"]))
    return out


def measure() -> dict:
    """The box errors on every frame of the fast clip (inf: lost), whether the face was found on every frame of the
    real-face clip, and the still-face jitter (crop_fixture's noisy still)."""
    still, live = trackers()
    still_frame, frames = fast_face()
    truth = true_boxes(crop_params(still.landmarks(still_frame), DRIVING["scale"], DRIVING["vx"], DRIVING["vy"]))
    boxes = track(live, frames)
    live.close()
    still.close()
    _, live = trackers()
    found = [b is not None for b in track(live, real_faces())]
    live.close()
    _, live = trackers()
    still_jitter = jitter(np.stack(track(live, still_noise_frames()))[:, :2])
    live.close()
    return {"fast_errors": box_errors(boxes, truth).tolist(), "real_found": found, "still_jitter_px": still_jitter}


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(measure()) + "\n")
