"""The live frame path of one session: webcam frame -> face crop -> engine -> paste-back -> output.

A webcam delivers frames faster than a CPU (or a busy GPU) animates them, and a live view wants the newest frame,
not a backlog. Every session runs on its engine's scheduler (stream/scheduler.py): a single-slot mailbox where a
newer frame replaces a waiting one (counted as dropped), face preparation and paste-back on a shared thread pool,
and one engine thread that animates the newest crop of every live session in one batched call.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import av
import cv2
import numpy as np
import torch

from model.editing import Edits
from model.engine import Engine
from stream.encode import StreamFrames, StreamPaste, to_rgb
from stream.face import LiveFaceDriver, SourceFace
from stream.paste import PasteBack, TorchPasteBack
from stream.recorder import Recorder
from stream.scheduler import Scheduler, Work

log = logging.getLogger("liveportrait.pipeline")


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
    region: str = "all"  # animation region: all, expression, pose, lips or eyes (model/editing.py)
    edits: Edits = field(default_factory=Edits)  # expression and pose sliders, applied on top of the motion

    def engine_controls(self, weight: float) -> dict:
        """Everything Engine.set_controls takes, for a frame whose driving motion counts `weight` (0..1)."""
        return dict(relative=self.relative, stitching=self.stitching, multiplier=self.multiplier * weight,
                    eye_target=self.eye_target, lip_target=self.lip_target, region=self.region, **self.edits.values())


def smoothing_cutoff(strength: float) -> float:
    """One-Euro min cutoff (Hz) for a 0..1 strength: 5 Hz (barely smoothed) .. 0.05 Hz; 0.5 gives face.py's 0.5."""
    return 0.5 * 10 ** (1 - 2 * float(strength))


class Animator:
    """One portrait driven by one face stream (a webcam or a video file). Owns engine session `name` and a face
    tracker. A frame goes `prepare` (track, crop: one frame at a time, in order) -> the engine (on the scheduler's
    engine thread) -> `finish` (paste-back); calling the animator does all three for one frame. A frame without
    a face reuses the last driving crop, eased towards rest."""

    def __init__(self, engine: Engine, source: SourceFace, settings: Settings | None = None, name: str | None = None):
        self.engine, self.settings = engine, settings or Settings()
        self.name = name or f"session-{uuid.uuid4().hex[:12]}"
        self.driver = LiveFaceDriver()
        self.source, self._new_source = source, source
        self._paste: tuple[SourceFace, int, Callable] | None = None  # (source, face size, its paste-back)
        self._stream: tuple | None = None  # (source, face size, stream_max, its StreamPaste)
        self._crop: np.ndarray | None = None  # last driving crop seen
        self.faceless_since: float | None = None  # when the frames lost the face (monotonic); None: it is seen
        self._reset = False
        self._lock = threading.Lock()

    def set_source(self, source: SourceFace) -> None:
        """Swap the portrait; takes effect at the next frame."""
        with self._lock:
            self._new_source = source

    def reset_reference(self) -> None:
        """Make the next frame the neutral pose relative motion is measured against."""
        self._reset = True

    def prepare(self, rgb: np.ndarray, t: float | None = None) -> Work:
        """One driving frame (RGB uint8, time `t` in seconds) -> the work for the engine (crop None: no face seen
        yet, the portrait stays at rest)."""
        s = self.settings
        if self.driver.box_filter:
            self.driver.box_filter.min_cutoff = smoothing_cutoff(s.smoothing)
        f = self.driver.process(rgb, t)
        if f.crop is not None:
            self._crop, self.faceless_since = f.crop.image_256, None
        elif self.faceless_since is None:
            self.faceless_since = time.monotonic()
        with self._lock:
            if self._crop is None:
                return Work(None, self.name, arrived=t or 0.0, data=self._new_source or self.source)
            new, self._new_source = self._new_source, None
        reset, self._reset = self._reset, False
        self.source = new or self.source

        def setup() -> None:  # on the engine thread, right before the batch
            if new is not None:
                self.engine.set_source(new.crop.image_256, self.name, ratios=[*new.eye, *new.lip])
            if reset:
                self.engine.set_reference(None, self.name)
            self.engine.set_controls(self.name, **s.engine_controls(f.weight))
        return Work(self._crop, self.name, setup, t or 0.0, self.source)

    def finish(self, work: Work, face: np.ndarray | torch.Tensor | None) -> np.ndarray | torch.Tensor:
        """The engine's output for `work` -> the image to show: a host array, or on CUDA (face a device tensor) an
        HxWx3 uint8 tensor on the device, so that what follows can stay there."""
        source = work.data
        if face is None:
            return source.image if self.settings.paste else source.crop.image
        if not self.settings.paste:
            return face
        if self._paste is None or self._paste[0] is not source or self._paste[1] != len(face):
            self._paste = source, len(face), self._paster(source, face)
        return self._paste[2](face)

    def stream(self, work: Work, face: np.ndarray, stream_max: int) -> av.VideoFrame:
        """The engine's host output pasted straight into the streamed yuv420p frame (stream/encode.py): the
        full-size image is never made."""
        source = work.data
        key = source, len(face), stream_max
        if self._stream is None or self._stream[:3] != key:
            self._stream = *key, StreamPaste(source.image, source.crop.m_c2o, len(face), stream_max)
        return self._stream[3](face)

    @staticmethod
    def _paster(source: SourceFace, face: np.ndarray | torch.Tensor) -> Callable:
        """cv2 paste-back on the host; on a device, paste there (the image stays on the device)."""
        if not isinstance(face, torch.Tensor):
            return PasteBack(source.image, source.crop.m_c2o, len(face))
        paste = TorchPasteBack(source.image, source.crop.m_c2o, face.device)
        return lambda f: paste(f.permute(2, 0, 1).float() / 255)

    def __call__(self, rgb: np.ndarray, t: float | None = None) -> np.ndarray:
        """One driving frame -> the animated image (uint8 RGB), synchronously (video files: no frame dropped)."""
        work = self.prepare(rgb, t)
        if work.crop is None:
            return host(self.finish(work, None))
        return host(self.finish(work, Scheduler.of(self.engine).run(work)))  # joins the live batches: starves none

    def close(self) -> None:
        """Free the engine session and the tracker."""
        Scheduler.of(self.engine).call(lambda: self.engine.close(self.name))
        self.driver.close()


class Metrics:
    """Rates and latency over the last ~2 s / 100 frames; bounded, like everything per frame here."""

    def __init__(self):
        self.frames_in = self.frames_out = self.dropped = self.failed = 0
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
                    frames_in=self.frames_in, frames_out=self.frames_out, dropped=self.dropped, failed=self.failed,
                    latency_p50_ms=round(float(np.percentile(lat, 50)), 1),
                    latency_p95_ms=round(float(np.percentile(lat, 95)), 1))


class RecordingRunning(RuntimeError):
    """Record was pressed while a recording runs; the message is meant for the user."""


class SessionPipeline:
    """One live connection: frames in (`submit`, any thread), animated frames out (`latest`/`wait`, or the
    callbacks given to `listen`, called on a scheduler thread: the performer's track and its viewers' each have
    one). With `stream_max`, while anyone listens, each output is also the yuv420p frame a video encoder takes
    (`latest_video`), its longer side at most `stream_max`; recordings keep the full size. `images`: keep each
    output's full-size RGB image too (HTTP streaming answers with it); without, it is made only when a recording or
    the overlay needs it. Admission is its owner's job (web/worker.py); `close` frees everything."""

    def __init__(self, engine: Engine, source: SourceFace, settings: Settings | None = None, transport: str = "",
                 stream_max: int | None = None, images: bool = True):
        self.scheduler = Scheduler.of(engine)
        self.animator = Animator(engine, source, settings)
        self.lane = self.scheduler.add(self)
        self.settings, self.transport = self.animator.settings, transport
        self._listeners: list[Callable[[], None]] = []
        self.metrics = Metrics()
        self.recorder: Recorder | None = None
        self.record_error: str | None = None  # why the last recording stopped early (the page says so)
        self.seq = 0  # number of the latest output
        self.started = time.monotonic()
        self.stream_max, self.images = stream_max, images
        self._frames = StreamFrames(stream_max) if stream_max else None
        self._output: np.ndarray | None = None  # the newest output (None while only its video frame was made)
        self._video: av.VideoFrame | None = None
        self._closed = False
        self._cond = threading.Condition()

    @property
    def name(self) -> str:
        return self.animator.name

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, frame: np.ndarray | Any) -> None:
        """Hand over a webcam frame: RGB uint8, or a decoded video frame with `to_ndarray` (PyAV), converted only if
        it is not dropped, on the pool: WebRTC's event loop stays free for ICE consent checks. Never blocks: it
        replaces a frame still waiting."""
        now = time.monotonic()
        with self._cond:
            self.metrics.frames_in += 1
            self.metrics.arrivals.append(now)
        self.lane.submit(frame, now)

    def listen(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Call `fn()` after every new output and once at close (on a scheduler thread; it must not block).
        Returns the call that stops it."""
        with self._cond:
            self._listeners.append(fn)
        return lambda: self._unlisten(fn)

    def _unlisten(self, fn: Callable[[], None]) -> None:
        with self._cond:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def _notify(self) -> None:
        with self._cond:
            listeners = list(self._listeners)
        for fn in listeners:
            fn()

    def latest(self) -> tuple[int, np.ndarray | None]:
        """(sequence number, RGB image) of the newest output: the streamed frame's pixels when only that was made."""
        with self._cond:
            return self.seq, self._image()

    def latest_video(self) -> tuple[int, av.VideoFrame | None]:
        """(sequence number, yuv420p frame at the streamed size) of the newest output (with `stream_max`)."""
        with self._cond:
            return self.seq, self._video

    def wait(self, after: int, timeout: float) -> tuple[int, np.ndarray | None]:
        """The newest output once its sequence number exceeds `after` (or the current one after `timeout` s)."""
        with self._cond:
            self._cond.wait_for(lambda: self.seq > after or self._closed, timeout)
            return self.seq, self._image()

    def _image(self) -> np.ndarray | None:
        if self._output is None and self._video is not None:
            self._output = self._video.to_ndarray(format="rgb24")
        return self._output

    def set_source(self, source: SourceFace) -> None:
        self.animator.set_source(source)

    def reset_reference(self) -> None:
        self.animator.reset_reference()

    def start_recording(self, path: str | Path, max_seconds: float | None = None) -> Path | None:
        """Record every output frame from now on into an MP4 at `path`, for at most `max_seconds`. Raises
        RecordingRunning while one runs; a take that stopped at its limit is finalised first and its path returned,
        so that no take is lost."""
        with self._cond:
            if self.recorder and self.recorder.active:
                raise RecordingRunning("a recording is already running: press Stop recording first")
            old, self.recorder, self.record_error = self.recorder, Recorder(path, max_seconds), None
        return old.close() if old else None

    def stop_recording(self) -> Path | None:
        """Finalise the recording; its path (None if nothing was recorded or none was running)."""
        with self._cond:
            rec, self.recorder = self.recorder, None
        return rec.close() if rec else None

    def stats(self) -> dict:
        """Metrics for the page: rates, drops, latency (arrival -> output), transport, recording state, and
        `no_face_s`: how long the frames have had no face in them (0 while one is seen)."""
        since = self.animator.faceless_since
        with self._cond:
            self.metrics.dropped, self.metrics.failed = self.lane.dropped, self.lane.failed
            rec = self.recorder
            return dict(self.metrics.snapshot(), transport=self.transport, recording=bool(rec and rec.active),
                        no_face_s=round(time.monotonic() - since, 1) if since is not None else 0.0,
                        recording_full=bool(rec and rec.full), record_error=self.record_error,
                        size=[self._video.width, self._video.height] if self._video is not None else
                        None if self._output is None else list(self._output.shape[1::-1]))

    # ---- the scheduler's stages (stream/scheduler.py Client) ----

    def prepare(self, frame: np.ndarray | Any, arrived: float) -> Work:
        rgb = frame if isinstance(frame, np.ndarray) else to_rgb(frame)
        return self.animator.prepare(rgb, arrived)

    def finish(self, work: Work, face: np.ndarray | torch.Tensor | None) -> None:
        rec, s = self.recorder, self.settings
        with self._cond:
            stream = self._frames is not None and bool(self._listeners)  # a track sends it: a yuv420p frame
        full = None  # the clean full-size host image, made only when it is kept, recorded or overlaid
        only_stream = stream and not (rec or s.overlay or self.images)
        if only_stream and isinstance(face, np.ndarray) and s.paste:
            shown, video = None, self.animator.stream(work, face, self.stream_max)  # pasted into the stream frame
        else:
            image = self.animator.finish(work, face)
            if only_stream:  # on CUDA, resized and converted on the device
                shown, video = (image if isinstance(image, np.ndarray) else None), self._frames(image)
            else:
                full = host(image)
                shown = full
                if s.overlay:  # on a copy: recordings stay clean
                    with self._cond:  # submit appends to the metrics meanwhile
                        m = self.metrics.snapshot()
                    shown = draw_metrics(full, m)
                video = self._frames(shown) if stream else None
        now = time.monotonic()
        with self._cond:
            m = self.metrics
            m.frames_out += 1
            m.outputs.append(now)
            m.latencies.append(now - work.arrived)
            m.dropped, m.failed = self.lane.dropped, self.lane.failed
            self._output, self._video, self.seq = shown, video, self.seq + 1
            self._cond.notify_all()
        self._notify()
        if rec is not None:  # after the frame is out: a failing recording must not freeze the live view
            try:
                rec.write(full)
            except Exception as e:
                log.exception("recording failed")
                self._abort_recording(rec, e)

    def _abort_recording(self, rec: Recorder, error: Exception) -> None:
        """Stop only the recording (a full disk, say); the live view goes on and the page says why."""
        with self._cond:
            if self.recorder is rec:
                self.recorder = None
            self.record_error = f"the recording stopped: {error}"
        try:
            rec.close()
        except Exception:
            log.exception("finalising the failed recording failed too")

    def close(self) -> Path | None:
        """Leave the scheduler (frames in flight finish first), finalise a recording (returns its path) and free
        the engine session and the tracker, even if one of those steps fails. Idempotent."""
        with self._cond:
            if self._closed:
                return None
            self._closed = True
            self._cond.notify_all()
        try:
            self.scheduler.remove(self.lane)
            return self.stop_recording()
        finally:
            self.animator.close()
            self._notify()  # wake whoever waits for output, so they see the end


def host(image: np.ndarray | torch.Tensor) -> np.ndarray:
    return image.cpu().numpy() if isinstance(image, torch.Tensor) else image


def draw_metrics(rgb: np.ndarray, m: dict) -> np.ndarray:
    """The metrics as a text line on a copy of the frame."""
    return draw_text(rgb, f"in {m['fps_in']:.0f} fps  out {m['fps_out']:.1f} fps  p50 {m['latency_p50_ms']:.0f} ms  "
                          f"drop {m['dropped']}")


def draw_text(rgb: np.ndarray, text: str) -> np.ndarray:
    """A line of white-on-black text at the top of a copy of the frame."""
    out = rgb.copy()
    scale = max(0.35, out.shape[1] / 1400)
    for color, width in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        cv2.putText(out, text, (8, int(24 * scale / 0.5)), cv2.FONT_HERSHEY_SIMPLEX, scale, color, width, cv2.LINE_AA)
    return out
