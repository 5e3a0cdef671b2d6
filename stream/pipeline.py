"""The live frame path of one session: webcam frame -> face crop -> engine -> paste-back -> output.

A webcam delivers frames faster than a CPU (or a busy GPU) animates them, and a live view wants the newest frame,
not a backlog. So each session has a single pending slot: a frame that arrives while the worker is busy replaces
the pending one (counted as dropped), and one worker thread per session does the work, off the event loop. All
sessions share one engine, which is not thread-safe, so every engine call holds ENGINE_LOCK.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from model.engine import Engine
from stream.face import LiveFaceDriver, SourceFace
from stream.paste import PasteBack
from stream.recorder import Recorder

log = logging.getLogger("liveportrait.pipeline")
ENGINE_LOCK = threading.Lock()


@dataclass
class Settings:
    """Live controls of a page; the worker reads them on every frame, so changes apply to the next frame."""
    relative: bool = True
    stitching: bool = True
    paste: bool = True
    multiplier: float = 1.0
    eye_target: float | None = None  # eye open ratio to retarget to (None: off)
    lip_target: float | None = None
    smoothing: float = 0.5  # 0 = light, 1 = heavy One-Euro smoothing of the driving crop box
    overlay: bool = False  # draw the metrics on the video


def smoothing_cutoff(strength: float) -> float:
    """One-Euro min cutoff (Hz) for a 0..1 strength: 5 Hz (barely smoothed) .. 0.05 Hz; 0.5 gives face.py's 0.5."""
    return 0.5 * 10 ** (1 - 2 * float(strength))


class Animator:
    """One portrait driven by one face stream (a webcam or a video file). Owns engine session `name` and a face
    tracker; call it from one thread. A frame without a face reuses the last driving crop, eased towards rest."""

    def __init__(self, engine: Engine, source: SourceFace, settings: Settings | None = None, name: str | None = None):
        self.engine, self.settings = engine, settings or Settings()
        self.name = name or f"session-{uuid.uuid4().hex[:12]}"
        self.driver = LiveFaceDriver()
        self.source, self._new_source = source, source
        self._paste: tuple[int, PasteBack] | None = None  # (face size, paste-back for the current source)
        self._crop: np.ndarray | None = None  # last driving crop seen
        self._reset = False

    def set_source(self, source: SourceFace) -> None:
        """Swap the portrait; takes effect at the next frame (on the animating thread)."""
        with ENGINE_LOCK:
            self._new_source = source

    def reset_reference(self) -> None:
        """Make the next frame the neutral pose relative motion is measured against."""
        self._reset = True

    def __call__(self, rgb: np.ndarray, t: float | None = None) -> np.ndarray:
        """One driving frame (RGB uint8, time `t` in seconds) -> the animated image (uint8 RGB)."""
        s = self.settings
        if self.driver.box_filter:
            self.driver.box_filter.min_cutoff = smoothing_cutoff(s.smoothing)
        f = self.driver.process(rgb, t)
        if f.crop is not None:
            self._crop = f.crop.image_256
        with ENGINE_LOCK:
            if self._new_source is not None:
                self.source, self._new_source, self._paste = self._new_source, None, None
                src = self.source
                self.engine.set_source(src.crop.image_256, self.name, ratios=[*src.eye, *src.lip])
            if self._crop is None:  # no face seen yet: the portrait at rest
                return self.source.image if s.paste else self.source.crop.image
            if self._reset:
                self._reset = False
                self.engine.set_reference(None, self.name)
            self.engine.set_controls(self.name, relative=s.relative, stitching=s.stitching,
                                     multiplier=s.multiplier * f.weight, eye_target=s.eye_target,
                                     lip_target=s.lip_target)
            face = self.engine.animate(self._crop[None], [self.name])[0]
        if not s.paste:
            return face
        if self._paste is None or self._paste[0] != len(face):
            self._paste = len(face), PasteBack(self.source.image, self.source.crop.m_c2o, len(face))
        return self._paste[1](face)

    def close(self) -> None:
        """Free the engine session and the tracker."""
        with ENGINE_LOCK:
            self.engine.close(self.name)
        self.driver.close()


class Metrics:
    """Rates and latency over the last ~2 s / 100 frames; bounded, like everything per frame here."""

    def __init__(self):
        self.frames_in = self.frames_out = self.dropped = 0
        self.arrivals: deque[float] = deque(maxlen=100)
        self.outputs: deque[float] = deque(maxlen=100)
        self.latencies: deque[float] = deque(maxlen=100)

    @staticmethod
    def _fps(times: deque[float], now: float) -> float:
        recent = [t for t in times if now - t < 2.0]
        return (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 and recent[-1] > recent[0] else 0.0

    def snapshot(self) -> dict:
        now = time.monotonic()
        lat = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return dict(fps_in=round(self._fps(self.arrivals, now), 1), fps_out=round(self._fps(self.outputs, now), 1),
                    frames_in=self.frames_in, frames_out=self.frames_out, dropped=self.dropped,
                    latency_p50_ms=round(float(np.percentile(lat, 50)), 1),
                    latency_p95_ms=round(float(np.percentile(lat, 95)), 1))


class SessionPipeline:
    """One live connection: frames in (`submit`, any thread), animated frames out (`latest`/`wait`, or the
    `on_output` callback, called on the worker thread). Created on connect; `close` frees everything."""

    def __init__(self, engine: Engine, source: SourceFace, settings: Settings | None = None, transport: str = ""):
        self.animator = Animator(engine, source, settings)
        self.settings, self.transport = self.animator.settings, transport
        self.on_output: Callable[[], None] | None = None
        self.metrics = Metrics()
        self.recorder: Recorder | None = None
        self.seq = 0  # number of the latest output
        self._output: np.ndarray | None = None
        self._pending: tuple[np.ndarray, float] | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name=f"pipeline-{self.name}", daemon=True)
        self._worker.start()

    @property
    def name(self) -> str:
        return self.animator.name

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, rgb: np.ndarray) -> None:
        """Hand over a webcam frame (RGB uint8); never blocks: it replaces a frame still waiting."""
        now = time.monotonic()
        with self._cond:
            m = self.metrics
            m.frames_in += 1
            m.arrivals.append(now)
            m.dropped += self._pending is not None
            self._pending = (rgb, now)
            self._cond.notify_all()

    def latest(self) -> tuple[int, np.ndarray | None]:
        """(sequence number, image) of the newest output."""
        with self._cond:
            return self.seq, self._output

    def wait(self, after: int, timeout: float) -> tuple[int, np.ndarray | None]:
        """The newest output once its sequence number exceeds `after` (or the current one after `timeout` s)."""
        with self._cond:
            self._cond.wait_for(lambda: self.seq > after or self._closed, timeout)
            return self.seq, self._output

    def set_source(self, source: SourceFace) -> None:
        self.animator.set_source(source)

    def reset_reference(self) -> None:
        self.animator.reset_reference()

    def start_recording(self, path: str | Path, max_seconds: float | None = None) -> None:
        """Record every output frame from now on into an MP4 at `path`, for at most `max_seconds` (a running
        recording is finalised)."""
        old, self.recorder = self.recorder, Recorder(path, max_seconds)
        if old:
            old.close()

    def stop_recording(self) -> Path | None:
        """Finalise the recording; its path (None if nothing was recorded or none was running)."""
        rec, self.recorder = self.recorder, None
        return rec.close() if rec else None

    def stats(self) -> dict:
        """Metrics for the page: rates, drops, latency (arrival -> output), transport, recording state."""
        with self._cond:
            rec = self.recorder
            return dict(self.metrics.snapshot(), transport=self.transport, recording=bool(rec and rec.active),
                        recording_full=bool(rec and rec.full),
                        size=None if self._output is None else list(self._output.shape[1::-1]))

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._closed)
                if self._closed:
                    return
                (rgb, arrived), self._pending = self._pending, None
            try:
                out = self.animator(rgb, arrived)
            except Exception:  # one bad frame must not end the session
                log.exception("frame failed in %s", self.name)
                continue
            if rec := self.recorder:  # before the overlay: recordings stay clean
                rec.write(out)
            now = time.monotonic()
            with self._cond:
                m = self.metrics
                m.frames_out += 1
                m.outputs.append(now)
                m.latencies.append(now - arrived)
                if self.settings.overlay:
                    out = draw_metrics(out, m.snapshot())
                self._output, self.seq = out, self.seq + 1
                self._cond.notify_all()
            if self.on_output:
                self.on_output()

    def close(self) -> Path | None:
        """Stop the worker, finalise a recording (returns its path) and free the engine session. Idempotent."""
        with self._cond:
            if self._closed:
                return None
            self._closed = True
            self._cond.notify_all()
        self._worker.join()
        path = self.stop_recording()
        self.animator.close()
        if self.on_output:  # wake whoever waits for output, so they see the end
            self.on_output()
        return path


def draw_metrics(rgb: np.ndarray, m: dict) -> np.ndarray:
    """The metrics as a text line on a copy of the frame."""
    text = f"in {m['fps_in']:.0f} fps  out {m['fps_out']:.1f} fps  p50 {m['latency_p50_ms']:.0f} ms  drop {m['dropped']}"
    out = rgb.copy()
    scale = max(0.35, out.shape[1] / 1400)
    for color, width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(out, text, (8, int(24 * scale / 0.5)), cv2.FONT_HERSHEY_SIMPLEX, scale, color, width, cv2.LINE_AA)
    return out
