"""Crop parameters and still-face jitter of whichever tracker `stream.face` holds, for tests/data/crop_fixture.json.

The fixture was written by the mediapipe 0.10.21 FaceMesh tracker before the switch to the Tasks API, so that
test_face_crops can hold the new tracker to the old crops:

    git archive c6e8785 | tar -x -C /tmp/oldtree && cp tests/crop_fixture.py /tmp/oldtree/tests/
    cd /tmp/oldtree && /tmp/oldface/bin/python tests/crop_fixture.py /work/wt16/tests/data/crop_fixture.json
"""
import json
import sys
from pathlib import Path

import cv2
import numpy as np
from skimage import data

import stream.face as face
from stream.face import DRIVING, SOURCE, crop_params
from stream.serve_bench import moving_face

GOLDEN = Path(__file__).parent / "data" / "golden_1.npz"
JITTER_FRAMES, JITTER_NOISE = 60, 4.0  # sensor-like noise: Gaussian, sigma in 8-bit levels


def _similarity(img: np.ndarray, angle: float, scale: float, tx: float, ty: float) -> np.ndarray:
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += (tx, ty)
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_CUBIC)


def still_images() -> dict[str, np.ndarray]:
    """The stills the tests crop: the astronaut, its test_face variants, a small face in a big photo, the golden
    file's three inputs and the live-driver test's 640x480 frame."""
    astronaut = data.astronaut()
    canvas = np.zeros((800, 900, 3), np.uint8)
    canvas[150:662, 200:712] = astronaut
    big = np.zeros((1400, 1400, 3), np.uint8)
    big[444:956, 444:956] = astronaut
    webcam = np.full((480, 640, 3), 90, np.uint8)
    webcam[:, 80:560] = cv2.resize(astronaut, (480, 480))
    golden = np.load(GOLDEN)
    return {"astronaut": astronaut, "canvas": canvas,
            "shifted": _similarity(canvas, 0, 1.0, -110, 70), "rot+15": _similarity(canvas, 15, 1.0, 0, 0),
            "rot-15": _similarity(canvas, -15, 1.0, 0, 0), "rot+10": _similarity(astronaut, 10, 1.0, 0, 0),
            "scale0.7": _similarity(canvas, 0, 0.7, 0, 0), "scale1.3": _similarity(canvas, 0, 1.3, 0, 0),
            "flipped": np.ascontiguousarray(canvas[:, ::-1]), "small_face": big, "webcam": webcam,
            **{k.split(".")[1]: golden[k] for k in ("input.source_rgb_u8", "input.driving0_rgb_u8",
                                                    "input.driving_rgb_u8")}}


def _params(lmk: np.ndarray | None, crop: dict) -> list[float] | None:
    return None if lmk is None else [float(v) for v in crop_params(lmk, crop["scale"], crop["vx"], crop["vy"])]


def still_noise_frames() -> list[np.ndarray]:
    """A still webcam face with fresh sensor noise in every frame."""
    rng = np.random.default_rng(0)
    still = moving_face()[0].astype(np.float64)
    return [np.clip(still + rng.normal(0, JITTER_NOISE, still.shape), 0, 255).astype(np.uint8)
            for _ in range(JITTER_FRAMES)]


def jitter(centres: np.ndarray) -> float:
    """Still-face jitter: the larger std (px) of the box centre's x and y over the frames."""
    return float(np.asarray(centres).std(0).max())


def trackers() -> tuple:
    """(still tracker, live tracker) of whichever stream.face is imported: this tree's, or an older revision's, where
    FaceTracker took `live` (mediapipe 0.10's FaceMesh, or 1.x Tasks in VIDEO mode)."""
    if hasattr(face, "LiveTracker"):
        return face.FaceTracker(), face.LiveTracker()
    return face.FaceTracker(live=False), face.FaceTracker(live=True)


def measure() -> dict:
    """Source and driving crop params of every still (IMAGE mode), driving params of every moving-face frame and the
    still-face jitter (live tracking), as (cx, cy, size, angle) lists; None where no face was found."""
    out: dict = {"stills": {}}
    tracker, live = trackers()
    for name, img in still_images().items():
        lmk = tracker.landmarks(img)
        out["stills"][name] = {"source": _params(lmk, SOURCE), "driving": _params(lmk, DRIVING)}
    tracker.close()
    out["clip"] = [_params(live.landmarks(f), DRIVING) for f in moving_face()]
    live.close()
    _, live = trackers()
    centres = [crop_params(live.landmarks(f), DRIVING["scale"], DRIVING["vx"], DRIVING["vy"])[:2]
               for f in still_noise_frames()]
    live.close()
    out["jitter_px"] = jitter(np.stack(centres))
    return out


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(measure(), indent=1) + "\n")
