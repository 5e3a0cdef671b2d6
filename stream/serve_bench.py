"""Serving benchmark: many live sessions on one engine, the scheduler against the old lock-per-session path.

    python launch.py bench serve --config tiny --device cpu            # ~2 min on 2 CPU cores
    python launch.py bench serve --sessions 1,2,4,8 --json serve.json  # on a GPU (full config)
    python launch.py bench serve --config tiny --device cpu --repeat 3  # a shared machine: modes interleaved

In one process, N simulated sessions each feed a 640x480 moving-face stream at 30 fps through the real path (face
tracking and crop, engine, paste-back, and the VP8 encode aiortc would do, on a thread per session as aiortc does),
first with `LockReference` (the pre-scheduler path, kept only as this benchmark's reference), then with the
scheduler (`SessionPipeline`); with `--repeat N` the two alternate N times per session count and each row pools its
N runs, so a burst of other load on a shared machine falls on both modes alike. Each row: aggregate and per-session output fps, latency from a frame's arrival to
its output (p50/p95), the engine's batch-size histogram and the mean ms of each stage.

`simulate()` needs no face stack (torch, numpy, OpenCV only): sessions fed ready 256x256 crops straight into the
scheduler, for checking the engine and the scheduler on a bare GPU machine.
"""
from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from collections import Counter, defaultdict
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from stream.scheduler import Scheduler, Work

log = logging.getLogger("liveportrait.serve_bench")
W, H, FPS = 640, 480, 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bench serve` options (launch.py adds --weights, --config, --device, --no-download)."""
    p.add_argument("--sessions", default="1,2,4,8", help="session counts to run, e.g. 1,2,4,8")
    p.add_argument("--seconds", type=float, default=None,
                   help="measured seconds per row, after 2 s of warm-up (default: 6 on CPU, 15 on CUDA)")
    p.add_argument("--repeat", type=_positive, default=1,
                   help="run lock and batched alternately this many times per session count, pooled per row")
    p.add_argument("--json", type=Path, default=None, help="also write {\"serve\": [rows]} to this file")


def _positive(text: str) -> int:
    if (n := int(text)) < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive count")
    return n


class Tally:
    """Outputs per session (time, latency) and ms per stage, from every thread of a run."""

    def __init__(self, sessions: int):
        self.outputs: list[list[tuple[float, float]]] = [[] for _ in range(sessions)]
        self.ms: defaultdict[str, list[float]] = defaultdict(list)
        self.lock = threading.Lock()

    def output(self, session: int, arrived: float) -> None:
        now = time.monotonic()
        with self.lock:
            self.outputs[session].append((now, now - arrived))

    def timed(self, stage: str, fn: Callable, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            with self.lock:
                self.ms[stage].append((time.perf_counter() - t) * 1000)

    def row(self, windows: list[tuple[float, float]]) -> dict:
        """fps and latency of the outputs made in the [start, end) windows."""
        with self.lock:
            inside = [[lat for t, lat in o if any(a <= t < b for a, b in windows)] for o in self.outputs]
            ms = {k: round(float(np.mean(v)), 2) for k, v in self.ms.items() if v}
        lat = np.array([x for o in inside for x in o]) * 1000 if any(inside) else np.zeros(1)
        fps = [round(len(o) / sum(b - a for a, b in windows), 2) for o in inside]
        return dict(aggregate_fps=round(sum(fps), 2), session_fps=fps,
                    latency_p50_ms=round(float(np.percentile(lat, 50)), 1),
                    latency_p95_ms=round(float(np.percentile(lat, 95)), 1), cpu_ms=ms)


def feed(submit: list[Callable[[np.ndarray], None]], frames: list[np.ndarray], seconds: float) -> None:
    """Every session gets a frame every 1/FPS s (its own phase of the clip) for `seconds`."""
    start, i = time.monotonic(), 0
    while time.monotonic() < start + seconds:
        for k, put in enumerate(submit):
            put(frames[(i + 7 * k) % len(frames)])
        i += 1
        time.sleep(max(0.0, start + i / FPS - time.monotonic()))


def summarise(mode: str, sessions: int, tally: Tally, windows: list[tuple[float, float]], batch_sizes: dict) -> dict:
    r = tally.row(windows)
    return {"mode": mode, "sessions": sessions, "aggregate_fps": r["aggregate_fps"], "session_fps": r["session_fps"],
            "latency_p50_ms": r["latency_p50_ms"], "latency_p95_ms": r["latency_p95_ms"],
            "batch_sizes": {str(k): v for k, v in sorted(batch_sizes.items())}, "cpu_ms": r["cpu_ms"]}


# ---- prepared crops only (no face stack): for GPU checks ----

class _CropSession:
    """A session fed ready 256x256 crops: prepare passes the crop on, finish brings the face to the host."""

    def __init__(self, index: int, name: str, tally: Tally):
        self.index, self.name, self.tally = index, name, tally

    def prepare(self, crop: np.ndarray, arrived: float) -> Work:
        return Work(crop, self.name, arrived=arrived)

    def finish(self, work: Work, face) -> None:
        if not isinstance(face, np.ndarray):
            face = face.cpu().numpy()
        self.tally.output(self.index, work.arrived)


def simulate(engine, sessions: int, seconds: float = 10.0, crops: list[np.ndarray] | None = None,
             warmup: float = 2.0, max_batch: int = 8) -> dict:
    """N sessions fed ready (256,256,3) uint8 crops at 30 fps through the engine's scheduler: per-session and
    aggregate output fps, latency p50/p95 (submit -> face on the host), the batch-size histogram, the engine step.
    `crops`: one per session (its portrait and its driving frames); default: deterministic noise."""
    rng = np.random.default_rng(0)
    crops = crops or [rng.integers(0, 256, (256, 256, 3), np.uint8) for _ in range(sessions)]
    sched = Scheduler.of(engine)
    sched.max_batch = max_batch
    tally = Tally(sessions)
    clients = [_CropSession(i, f"sim-{i}", tally) for i in range(sessions)]
    for c, crop in zip(clients, crops):
        sched.call(lambda c=c, crop=crop: engine.set_source(crop, c.name))
    lanes = [sched.add(c) for c in clients]
    before = Counter(sched.batch_sizes)
    start = time.monotonic() + warmup
    try:
        feed([lambda _, lane=lane, crop=crop: lane.submit(crop) for lane, crop in zip(lanes, crops)], [crops[0]],
             warmup + seconds)
    finally:
        end = time.monotonic()
        for lane in lanes:
            sched.remove(lane)
        for c in clients:
            sched.call(lambda c=c: engine.close(c.name))
    row = summarise("batched", sessions, tally, [(start, end)], sched.batch_sizes - before)
    return {**row, "engine_step_p50_ms": sched.stats()["engine_step_p50_ms"]}


# ---- the real path (face stack) ----

def moving_face(n: int = 30) -> list[np.ndarray]:
    """The astronaut on a 640x480 canvas, nodding and swaying (one loop of a webcam clip)."""
    import cv2
    import skimage.data
    face = cv2.resize(skimage.data.astronaut(), (H, H))
    out = []
    for i in range(n):
        m = cv2.getRotationMatrix2D((H / 2, H / 2), 6 * np.sin(2 * np.pi * i / n), 1.0)
        m[0, 2] += (W - H) / 2 + 10 * np.sin(2 * np.pi * i / n)
        out.append(cv2.warpAffine(face, m, (W, H), borderMode=cv2.BORDER_REPLICATE))
    return out


class Encoder:
    """What aiortc does with each output, on its own thread per session: the newest image -> VP8."""

    def __init__(self, tally: Tally):
        from aiortc.codecs.vpx import Vp8Encoder
        self.codec, self.tally = Vp8Encoder(), tally
        self.image: np.ndarray | None = None
        self.pts, self.closed = 0, False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def put(self, image: np.ndarray) -> None:
        with self.cond:
            self.image = image
            self.cond.notify()

    def _run(self) -> None:
        import av
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.image is not None or self.closed)
                if self.closed:
                    return
                image, self.image = self.image, None
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts, frame.time_base, self.pts = self.pts, Fraction(1, 90000), self.pts + 3000
            self.tally.timed("encode", self.codec.encode, frame)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()


class LockReference:
    """The serving path before the scheduler, kept only as this benchmark's reference: a worker thread per session
    takes its newest frame, prepares it, animates it alone (batch 1) holding one engine lock shared by all
    sessions, and pastes it back; the next frame waits for all of that."""

    def __init__(self, engine, source, lock: threading.Lock, index: int, tally: Tally, encoder: Encoder):
        from stream.pipeline import Animator
        self.animator, self.engine, self.lock = Animator(engine, source), engine, lock
        self.index, self.tally, self.encoder = index, tally, encoder
        self.pending: tuple[np.ndarray, float] | None = None
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def submit(self, rgb: np.ndarray) -> None:
        with self.cond:
            self.pending = (rgb, time.monotonic())
            self.cond.notify()

    def _step(self, work: Work):
        with self.lock:
            work.setup()
            return self.tally.timed("engine", self.engine.animate, work.crop[None], [work.session])[0]

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.pending is not None or self.closed)
                if self.closed:
                    return
                (rgb, arrived), self.pending = self.pending, None
            work = self.tally.timed("prepare", self.animator.prepare, rgb, arrived)
            face = None if work.crop is None else self._step(work)
            out = self.tally.timed("paste", self.animator.image, work, face)
            self.tally.output(self.index, arrived)
            self.encoder.put(out)

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join()
        self.animator.close()


def _batched(engine, source, index: int, tally: Tally, encoder: Encoder):
    """A real SessionPipeline with its stages timed, its outputs sent to the encoder."""
    from stream.pipeline import SessionPipeline

    class Timed(SessionPipeline):
        def prepare(self, rgb, arrived):
            return tally.timed("prepare", super().prepare, rgb, arrived)

        def finish(self, work, face):
            tally.timed("paste", super().finish, work, face)
            tally.output(index, work.arrived)
            encoder.put(self.latest()[1])

    return Timed(engine, source)


class Row:
    """What the runs of one mode and session count collect: one Tally, the measured windows, the batch sizes."""

    def __init__(self, mode: str, sessions: int):
        self.mode, self.sessions = mode, sessions
        self.tally, self.windows, self.sizes = Tally(sessions), [], Counter()

    def summary(self) -> dict:
        batch_sizes = self.sizes if self.mode == "batched" else {1: len(self.tally.ms.get("engine", []))}
        row = summarise(self.mode, self.sessions, self.tally, self.windows, batch_sizes)
        frames_per_call = sum(k * v for k, v in batch_sizes.items()) / max(1, sum(batch_sizes.values()))
        row["cpu_ms"]["engine_per_frame"] = round(row["cpu_ms"].get("engine", 0.0) / max(frames_per_call, 1), 2)
        return row


def serve(engine, source, row: Row, seconds: float, frames: list[np.ndarray], warmup: float = 2.0) -> None:
    """One run of `row.sessions` live sessions in `row.mode` ("lock" or "batched") for warmup + seconds, new
    sessions each time, into `row`."""
    tally, sched, sizes, sessions = row.tally, Scheduler.of(engine), row.sizes, row.sessions
    encoders = [Encoder(tally) for _ in range(sessions)]

    def animate(works, call=sched.animate):  # the scheduler's engine call, timed
        sizes[len(works)] += 1
        return tally.timed("engine", call, works)
    if row.mode == "lock":
        lock = threading.Lock()
        live = [LockReference(engine, source, lock, i, tally, e) for i, e in enumerate(encoders)]
    else:
        sched.animate = animate
        live = [_batched(engine, source, i, tally, e) for i, e in enumerate(encoders)]
    start = time.monotonic() + warmup
    try:
        feed([s.submit for s in live], frames, warmup + seconds)
    finally:
        row.windows.append((start, time.monotonic()))
        for s in live + encoders:
            s.close()
        vars(sched).pop("animate", None)


def publish(header: str, table: str, report: dict, path: Path | None) -> None:
    """A benchmark's output: its header and markdown table, then its JSON (also written to `path`)."""
    print(header + "\n\n" + table)
    if path:
        path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


def markdown(rows: list[dict]) -> str:
    out = ["| mode | sessions | aggregate fps | per-session fps | latency p50 ms | p95 ms | batch sizes | "
           "ms: prepare / engine per call / engine per frame / paste / VP8 |", "|" + "---|" * 8]
    for r in rows:
        c = r["cpu_ms"]
        ms = " / ".join(f"{c.get(k, 0):.1f}" for k in ("prepare", "engine", "engine_per_frame", "paste", "encode"))
        out.append(f"| {r['mode']} | {r['sessions']} | {r['aggregate_fps']:.1f} | "
                   f"{', '.join(f'{f:.1f}' for f in r['session_fps'])} | {r['latency_p50_ms']:.0f} | "
                   f"{r['latency_p95_ms']:.0f} | {' '.join(f'{k}:{v}' for k, v in r['batch_sizes'].items())} | {ms} |")
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    """Every session count in both modes, in one process on one engine; the table, then the JSON."""
    import os
    import skimage.data
    import torch
    from model.engine import Engine, load_networks
    from stream.face import prepare_source

    weights = args.weights or os.environ.get("LP_WEIGHTS") or "recipe"
    engine = Engine(load_networks(weights, args.config, download=not args.no_download), device=args.device)
    cuda = engine.device.type == "cuda"
    seconds = args.seconds or (15.0 if cuda else 6.0)
    source, frames = prepare_source(skimage.data.astronaut()), moving_face()
    counts = [int(n) for n in args.sessions.split(",")]

    def warm_up():  # on CUDA: compile and capture every batch size to come, outside the measured rows
        engine.set_source(source.crop.image_256, "warm")
        for b in sorted(set(range(1, max(counts) + 1)) if cuda else {1, *counts}):
            for _ in range(3 if cuda else 1):
                engine.animate(np.stack([source.crop.image_256] * b), ["warm"] * b)
        engine.close("warm")
    Scheduler.of(engine).call(warm_up)
    rows, load = [], [os.getloadavg()[0]]
    for n in counts:
        pair = [Row("lock", n), Row("batched", n)]
        for _ in range(args.repeat):
            for row in pair:
                serve(engine, source, row, seconds, frames)
        for row in pair:
            rows.append(row.summary())
            log.info("%s", rows[-1])
        load.append(os.getloadavg()[0])
    runs = f"{args.repeat} runs of {seconds:g} s (modes alternating)" if args.repeat > 1 else f"{seconds:g} s"
    header = (f"device {torch.cuda.get_device_name(engine.device) if cuda else 'cpu'} · {engine.precision} · config "
              f"{args.config} · weights {'recipe (untrained)' if weights == 'recipe' else 'official'} · "
              f"{runs} per row after 2 s warm-up each · 1-min load average "
              f"{' / '.join(f'{x:.1f}' for x in load)} (start / after each session count)")
    publish(header, markdown(rows), {"serve": rows}, args.json)
    return 0
