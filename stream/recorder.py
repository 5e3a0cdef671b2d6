"""Record the animated output to MP4 while it streams.

Frames arrive at whatever rate the engine manages, so they are stamped with wall-clock time (millisecond time
base) instead of a fixed frame rate: the file plays back at the speed the user saw. Every open recorder is
finalised at interpreter exit too, so a server stopped with Ctrl-C still leaves playable files.
"""
import atexit
import threading
import time
import weakref
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

CODEC = "libx264" if "libx264" in av.codecs_available else "mpeg4"
TIME_BASE = Fraction(1, 1000)
_open: "weakref.WeakSet[Recorder]" = weakref.WeakSet()


class Recorder:
    """H.264 (else MPEG-4 part 2) yuv420p MP4 writer; thread-safe, so a worker can write while a handler stops it."""

    def __init__(self, path: str | Path, max_seconds: float | None = None):
        self.path = Path(path)
        self.frames = 0
        self.max_seconds = max_seconds
        self.full = False  # stopped at max_seconds: finalised, later frames are not written
        self._lock = threading.Lock()
        self._container = av.open(str(self.path), "w")
        self._stream = self._container.add_stream(CODEC, rate=30)
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.time_base = TIME_BASE
        if CODEC == "libx264":
            self._stream.options = {"preset": "veryfast", "crf": "20"}
        self._t0: float | None = None
        self._pts = -1
        _open.add(self)

    @property
    def active(self) -> bool:
        return self._container is not None

    def write(self, rgb: np.ndarray, t: float | None = None) -> None:
        """Append an RGB uint8 frame taken at wall-clock time `t` (default: now); no-op once closed. The first
        frame fixes the size (even, for yuv420p); later frames of another size are resized to it."""
        t = time.time() if t is None else t
        with self._lock:
            if self._container is None:
                return
            if self._t0 is None:
                self._t0 = t
                self._stream.width, self._stream.height = rgb.shape[1] // 2 * 2, rgb.shape[0] // 2 * 2
            elif self.max_seconds is not None and t - self._t0 >= self.max_seconds:
                self.full = True
                self._finish()
                return
            w, h = self._stream.width, self._stream.height
            if rgb.shape[:2] != (h, w):
                rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            self._pts = max(self._pts + 1, round((t - self._t0) / TIME_BASE))
            frame.pts, frame.time_base = self._pts, TIME_BASE
            self._container.mux(self._stream.encode(frame))
            self.frames += 1

    def close(self) -> Path | None:
        """Flush the encoder and write the MP4 index: the file is playable after this. Idempotent. Returns the
        path, or None when no frame was recorded (no file is written then)."""
        with self._lock:
            self._finish()
        return self.path if self.frames else None

    def _finish(self) -> None:
        """Flush and close; the container is closed (its file descriptor freed, the file no longer shielded from
        clean-up) even if the flush fails."""
        container, self._container = self._container, None
        _open.discard(self)
        if container is not None:
            try:
                if self.frames:
                    container.mux(self._stream.encode(None))
            finally:
                container.close()


def recording_paths() -> set[Path]:
    """The files being recorded right now (a clean-up must not delete them)."""
    return {rec.path for rec in list(_open)}


@atexit.register
def close_all() -> None:
    """Finalise every recording still open (server shutdown)."""
    for rec in list(_open):
        rec.close()
