"""The frame scheduler: every live session on one engine, in batched calls, with the CPU stages pipelined around it.

One `Scheduler` per engine (`Scheduler.of(engine)`). It owns the only thread that touches the engine, so nothing
else needs a lock around engine calls, and a small thread pool for the CPU work around the network. It holds its
engine weakly: the engine's owner decides how long both live, and an engine that is dropped stops its scheduler's
threads (`close()` stops them at once):

    submit(frame) -> [inbox: 1 slot, newest wins] -> prepare (pool) -> [ready: 1 slot] -> engine loop (one thread,
    one Engine.animate call for up to max_batch sessions) -> [finish: 1 slot, newest wins] -> finish (pool)

- A session's prepare and finish calls run one at a time and in frame order (its face tracker and its recording
  need that); different sessions run in parallel on the pool.
- While the engine runs batch k, the pool prepares batch k+1, just in time (`prepare_delay`): a session's next
  frame is prepared when the engine's current step is expected to end (median of the last STEP_WINDOW steps) less
  PREPARE_AHEAD times the session's own preparation time, so the crop is as fresh as the newest frame at that
  moment (preparing right away would add a whole engine step to the latency of every frame). If the step ends
  earlier, preparation starts then. On a CPU engine (`overlap` False) preparation waits for the step to end: the
  engine's threads already use every core, and tracking faces beside it slowed the step by more than the tracking
  it hid (docs/benchmarks.md, "The scheduler's constants").
- The engine never waits to fill a batch: it takes whatever is ready, up to max_batch, longest-waiting first
  (`choose_batch`; a lane by when the engine last took its frame, a one-shot by when it was handed in). The one
  wait: preparations already running when the engine is free join its batch if they end within JOIN_WAIT times
  their sessions' recent preparation time; without it, sessions prepared a few ms apart fall into alternating
  batches of 1.
- Frames that belong to no live session (a file render, the portrait editor: `run(work)`, synchronous) join the
  batch selection as one-shot items (`OneShot`), longest-waiting first with the lanes' frames, and are no session
  for admission. So a live session's frame waits for at most the engine call in flight however many renders run
  (`stats()["waited_max"]`); `call(fn)` is for short housekeeping, since every waiting call runs before the next
  batch. A `Lane` and a `OneShot` answer the same calls (`take`, `fail`, `deliver`, `release`), each in its own
  way, so a batch treats them alike.
- Every slot holds one item. A newer frame replaces one still waiting (counted in `Lane.dropped`); nothing queues.
- A failure in one session's prepare, engine setup or finish is logged and counted (`Lane.failed`); the other
  sessions of the batch keep their outputs. A one-shot's setup or engine error is raised to its `run` caller.

The API needs only torch, numpy and OpenCV (no face stack), so a GPU check can feed ready crops:

    class Client:                              # one per session
        def prepare(self, item, arrived: float) -> Work | None: ...   # pool thread; item = what submit got
        def finish(self, work: Work, face) -> None: ...               # pool thread; face = this item's output
    sched = Scheduler.of(engine)               # created on first use; .max_batch may be changed any time
    lane = sched.add(client)                   # a new session (admission is web/worker.py's)
    lane.submit(item)                          # any thread, never blocks; True if it replaced a waiting item
    sched.remove(lane)                         # waits for the lane's frames in flight
    face = sched.run(work)                     # one frame of no session (render, editor), in the next batch
    sched.call(fn)                             # fn() on the engine thread between batches (set_source, close...)
    sched.stats()                              # engine step p50/p95 ms, batch sizes, sessions, waited_max

`Work(crop, session, setup, arrived, data, motion)`: crop = the (256,256,3) uint8 driving crop for engine session
`session`, or None when the frame needs no engine (finish then gets face=None); `setup()` runs on the engine thread
right before the batch (source swap, reference reset, controls); `motion`, if a dict, gets the driving motion the
engine found in the crop (what a motion template keeps: model/template.py). `face` is the (S,S,3) uint8 output: a
numpy array on CPU, a tensor on the engine's device on CUDA (so paste-back can stay there).
`stream.serve_bench.simulate` drives sessions fed with ready crops this way.

On CUDA nothing here waits for the GPU: the engine call returns once its work is queued. A CUDA event recorded
after it times the step on the device (read when the GPU has passed it, not waited for), and a finish runs on
its pool thread's own stream, which waits for that event on the GPU, not on the host: so a session's paste-back
and encoding overlap the next batch instead of queueing behind it on the default stream.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, TypeVar

import numpy as np
import torch

log = logging.getLogger("liveportrait.scheduler")
T = TypeVar("T")

STEP_WINDOW = 5         # the expected engine step: the median of this many recent steps
PREPARE_AHEAD = 1.5     # a lane's next frame starts this many of its preparation times before the step should end,
PREPARE_SLACK_MS = 2.0  # plus this margin
JOIN_WAIT = 1.5         # preparations in flight join a free engine's batch within this many of their preparation times


def prepare_delay(step_ms: float, prepare_ms: float, overlap: bool) -> float:
    """Seconds from the engine taking a lane's frame to preparing its next one, so that it is ready as the step
    is expected to end; inf without overlap (a CPU engine): not before the engine is free."""
    if not overlap:
        return float("inf")
    return max(0.0, step_ms - PREPARE_AHEAD * prepare_ms - PREPARE_SLACK_MS) / 1000


def choose_batch(waiting: list[Lane | OneShot], max_batch: int) -> list[Lane | OneShot]:
    """The next batch: whatever is ready, longest-waiting first (the earliest `served`), up to max_batch."""
    return sorted(waiting, key=lambda item: item.served)[:max_batch]


@dataclass
class Work:
    """One prepared frame of one session (see the module docstring)."""
    crop: np.ndarray | None
    session: str = "default"
    setup: Callable[[], None] | None = None
    arrived: float = 0.0
    data: Any = None
    motion: dict | None = None  # given as a dict: the engine's driving motion for this crop is added to it


class Client(Protocol):
    def prepare(self, item: Any, arrived: float) -> Work | None: ...

    def finish(self, work: Work, face: Any) -> None: ...


class Lane:
    """A session's place in the scheduler: its three slots and counters. State is guarded by the scheduler's lock."""

    def __init__(self, scheduler: Scheduler, client: Client):
        self.scheduler, self.client = scheduler, client
        self.inbox: tuple[Any, float] | None = None
        self.ready: Work | None = None
        self.waiting: tuple[Work, Any, Any] | None = None  # an output waiting for the previous one's finish
        self.preparing = self.in_engine = self.finishing = self.closed = False
        self.served = 0.0  # when the engine last took this lane's work (the longest-waiting goes first)
        self.prepare_at = 0.0  # don't start preparing before this (monotonic): just in time for the next batch
        self.prepare_ms = 0.0  # recent preparation time (moving average)
        self.dropped = self.failed = 0
        self.ready_mark = 0  # engine calls ended when its ready work became ready
        self.waited_max = 0  # the most engine calls that ended while one of its frames was ready and waiting

    def submit(self, item: Any, arrived: float | None = None) -> bool:
        """Hand over a frame; never blocks. True if it replaced one still waiting (that one is dropped)."""
        return self.scheduler._submit(self, item, time.monotonic() if arrived is None else arrived)

    @property
    def busy(self) -> bool:
        return self.preparing or self.in_engine or self.finishing

    # ---- as a batch item (under the scheduler's lock, but `fail`) ----

    def take(self, now: float, step_ms: float) -> Work:
        """Into the batch: its ready frame; its next frame is to be prepared in time for the step's end."""
        work, self.ready, self.in_engine, self.served = self.ready, None, True, now
        self.prepare_at = now + prepare_delay(step_ms, self.prepare_ms, self.scheduler.overlap)
        return work

    def fail(self, error: Exception) -> None:
        """Its frame failed in setup or in the engine (logged there): counted, the session goes on."""
        with self.scheduler._cond:
            self.failed += 1

    def deliver(self, work: Work, face: Any, done: Any) -> None:
        self.scheduler._to_finish(self, work, face, done)

    def release(self) -> None:
        """The batch ended: the engine calls that ended while its frame waited, and prepare the next now if due."""
        self.waited_max = max(self.waited_max, self.scheduler._ended - self.ready_mark)
        self.in_engine, self.prepare_at = False, 0.0
        self.scheduler._kick(self)


class OneShot:
    """A frame outside the live sessions (a file render's, the editor's) waiting for a batch: one `Work`, handed in
    at `served`, its face (or error) in `future`. Not a session: nothing of it outlives its batch."""

    def __init__(self, scheduler: Scheduler, work: Work, served: float):
        self.scheduler, self.work, self.served, self.future = scheduler, work, served, Future()

    def take(self, now: float, step_ms: float) -> Work:
        self.scheduler._oneshots.remove(self)
        return self.work

    def fail(self, error: Exception) -> None:
        self.future.set_exception(error)  # raised to its `run` caller

    def deliver(self, work: Work, face: Any, done: Any) -> None:
        self.scheduler.oneshots += 1
        self.future.set_result(face)

    def release(self) -> None:
        pass


_schedulers: "weakref.WeakKeyDictionary[Any, Scheduler]" = weakref.WeakKeyDictionary()
_schedulers_lock = threading.Lock()


class Scheduler:
    """Batches every session of one engine; see the module docstring."""

    def __init__(self, engine, max_batch: int = 8, workers: int = 4):
        self._engine = weakref.ref(engine)  # weak: the engine's life decides the scheduler's, never the reverse
        self.max_batch = max_batch
        self.lanes: list[Lane] = []
        self.steps: deque[float] = deque(maxlen=200)  # ms per engine call, recent
        self._timing: deque[tuple[Any, Any]] = deque()  # CUDA (start, end) events of steps the GPU has not passed
        self._local = threading.local()  # a pool thread's own CUDA stream
        self.batch_sizes: Counter[int] = Counter()
        self._ended = 0  # engine calls (batches and `call`s) ended, for Lane.waited_max
        self._cond = threading.Condition()
        self._calls: deque[tuple[Callable, Future]] = deque()  # one per waiting caller
        self._oneshots: list[OneShot] = []  # frames of `run` callers, waiting for a batch
        self.oneshots = 0  # one-shot frames animated
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="scheduler-pool")
        started = threading.Barrier(workers + 1)  # start every worker now: the thread count is a constant of the
        for _ in range(workers):                  # server, not of its load history (and no burst waits for one)
            self._pool.submit(started.wait)
        started.wait()
        device = getattr(getattr(engine, "device", None), "type", "cpu")
        self._as_tensor = device == "cuda"
        self.overlap = device != "cpu"  # prepare the next batch during the engine step (module docstring)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="scheduler-engine", daemon=True)
        self._clock_thread = threading.Thread(target=self._clock, name="scheduler-clock", daemon=True)
        self._thread.start()
        self._clock_thread.start()
        self._stop = weakref.finalize(engine, self._signal_stop)  # a dropped engine ends its threads

    @property
    def engine(self):
        """The engine this scheduler drives (RuntimeError once it is gone: the scheduler has stopped then)."""
        engine = self._engine()
        if engine is None:
            raise RuntimeError("the scheduler's engine is gone")
        return engine

    @classmethod
    def of(cls, engine) -> Scheduler:
        """The engine's scheduler, created on first use."""
        with _schedulers_lock:
            if (s := _schedulers.get(engine)) is None or s._closed:
                s = _schedulers[engine] = cls(engine)
            return s

    # ---- sessions ----

    def add(self, client: Client) -> Lane:
        """A new session (admission is its owner's: web/worker.py)."""
        with self._cond:
            lane = Lane(self, client)
            self.lanes.append(lane)
            return lane

    def remove(self, lane: Lane, timeout: float = 60.0) -> None:
        """End a session: frames waiting are dropped, the ones in flight finish first (up to `timeout` s). Call it
        from outside the lane's own prepare/finish."""
        with self._cond:
            if lane.closed:
                return
            lane.closed = True
            lane.inbox = lane.ready = lane.waiting = None
            self.lanes.remove(lane)
            if not self._cond.wait_for(lambda: not lane.busy, timeout):
                log.warning("a closed session still had work in flight after %.0f s", timeout)

    def run(self, work: Work) -> Any:
        """Animate one frame that belongs to no live session (a file render, the portrait editor) and return its
        face as `finish` would get it (host array on CPU, device tensor on CUDA); raises its setup's or the
        engine's error. It joins the next batch as one more item, longest-waiting first like a lane's frame, so a
        live session waits for at most one engine call however many run at once; it is no session for admission."""
        if threading.current_thread() is self._thread:
            if work.setup:
                work.setup()
            return self.animate([work])[0]
        item = OneShot(self, work, time.monotonic())
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._oneshots.append(item)
            self._cond.notify_all()
        return item.future.result()

    def call(self, fn: Callable[[], T]) -> T:
        """Run fn() on the engine thread, between two batches, and return its result (or raise its error). For
        short housekeeping (a portrait swap, closing a session): every waiting call runs before the next batch, so
        frames go through `run` instead."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def stats(self) -> dict:
        """Engine step p50/p95 (ms per call), the batch-size histogram, the live sessions, and per live session
        `waited_max`: the most engine calls that ended while one of its frames was ready and waiting for the
        engine (1: it never waited for more than the call in flight); `oneshots`: frames animated for `run`."""
        with self._cond:
            self._collect_steps()
            steps = np.array(self.steps) if self.steps else np.zeros(1)
            return dict(sessions=len(self.lanes), engine_step_p50_ms=round(float(np.percentile(steps, 50)), 1),
                        engine_step_p95_ms=round(float(np.percentile(steps, 95)), 1),
                        batch_sizes=dict(sorted(self.batch_sizes.items())), oneshots=self.oneshots,
                        waited_max=[lane.waited_max for lane in self.lanes])

    def close(self) -> None:
        """Stop the engine thread, the clock and the pool, and wait for them (sessions still open are dropped)."""
        self._stop()  # runs _signal_stop once, and releases the finalizer's hold on this scheduler
        for t in (self._thread, self._clock_thread):
            if t is not threading.current_thread():
                t.join()
        self._pool.shutdown(wait=True)

    def _signal_stop(self) -> None:
        """Tell every thread to end, without waiting: the engine may be freed on one of them (then it runs here)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._pool.shutdown(wait=False)

    # ---- the stages (lane state changes under self._cond) ----

    def _submit(self, lane: Lane, item: Any, arrived: float) -> bool:
        with self._cond:
            if lane.closed:
                return False
            replaced = lane.inbox is not None
            lane.dropped += replaced
            lane.inbox = (item, arrived)
            self._kick(lane)
            if lane.inbox is not None:  # deferred until prepare_at: the clock may be asleep without a timeout
                self._cond.notify_all()
            return replaced

    def _kick(self, lane: Lane) -> None:
        """Start preparing the lane's newest frame if nothing of it is being prepared or waits for the engine."""
        if lane.inbox is not None and not (lane.preparing or lane.ready or lane.closed or self._closed) and \
                time.monotonic() >= lane.prepare_at:
            (item, arrived), lane.inbox = lane.inbox, None
            lane.preparing = True
            self._pool.submit(self._prepare, lane, item, arrived)

    def _prepare(self, lane: Lane, item: Any, arrived: float) -> None:
        t = time.perf_counter()
        try:
            work = lane.client.prepare(item, arrived)
        except Exception:  # one bad frame must not end the session
            log.exception("prepare failed")
            work = None
        with self._cond:
            ms = (time.perf_counter() - t) * 1000
            lane.prepare_ms = ms if not lane.prepare_ms else 0.8 * lane.prepare_ms + 0.2 * ms
            lane.preparing = False
            if work is None:
                lane.failed += 1
            elif not lane.closed:
                if work.crop is None:
                    self._to_finish(lane, work, None)
                else:
                    lane.ready, lane.ready_mark = work, self._ended
            self._kick(lane)
            self._cond.notify_all()

    def _to_finish(self, lane: Lane, work: Work, face: Any, done: Any = None) -> None:
        """`done`: the CUDA event after the batch that made `face` (None on CPU)."""
        if lane.closed or self._closed:
            return
        if lane.finishing:  # the previous output is still being finished: wait in the one slot
            lane.dropped += lane.waiting is not None
            lane.waiting = (work, face, done)
        else:
            lane.finishing = True
            self._pool.submit(self._finish, lane, work, face, done)

    def _finish(self, lane: Lane, work: Work, face: Any, done: Any = None) -> None:
        try:
            with self._own_stream(face, done):
                lane.client.finish(work, face)
        except Exception:
            log.exception("finish failed")
            with self._cond:
                lane.failed += 1
        with self._cond:
            if lane.waiting is not None and not (lane.closed or self._closed):
                (work, face, done), lane.waiting = lane.waiting, None
                self._pool.submit(self._finish, lane, work, face, done)
            else:
                lane.finishing = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def _own_stream(self, face: Any, done: Any) -> Iterator[None]:
        """Pool thread: the GPU work of a finish goes on this thread's own stream, ordered after the batch by its
        event on the GPU; `face` is marked in use there so the allocator does not hand its memory out early."""
        if done is None or not isinstance(face, torch.Tensor):
            yield
            return
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(face.device)
        stream.wait_event(done)
        face.record_stream(stream)
        with torch.cuda.stream(stream):
            yield

    def _event(self) -> Any:
        """A timing CUDA event recorded now on the engine thread's stream (None on CPU)."""
        if not self._as_tensor:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _collect_steps(self) -> None:
        """Step times of the batches the GPU has finished, from their events (never waits: query only)."""
        while self._timing and self._timing[0][1].query():
            start, end = self._timing.popleft()
            self.steps.append(start.elapsed_time(end))

    # ---- the engine thread, and the clock that starts preparations just in time ----

    def _clock(self) -> None:
        with self._cond:
            while not self._closed:
                now, due = time.monotonic(), []
                for lane in self.lanes:
                    if lane.inbox is not None and lane.prepare_at > now:
                        if lane.prepare_at != float("inf"):  # inf: when the engine frees (no overlap, CPU)
                            due.append(lane.prepare_at)
                    else:
                        self._kick(lane)
                self._cond.wait(min(due) - now if due else None)

    def _loop(self) -> None:
        while self._round():
            pass

    def _waiting(self) -> list[Lane | OneShot]:
        """The items ready for the engine: lanes with a prepared frame, and one-shots."""
        return [lane for lane in self.lanes if lane.ready] + self._oneshots

    def _has_work(self) -> bool:
        return self._closed or bool(self._calls) or bool(self._waiting())

    def _joined(self) -> bool:
        """No preparation is in flight any more, or the ready items fill a batch."""
        return self._closed or not any(lane.preparing for lane in self.lanes) or \
            len(self._waiting()) >= self.max_batch

    def _join_wait(self) -> float:
        """Seconds the free engine waits for the preparations in flight to join its batch (0: none to wait for)."""
        preparing = [lane.prepare_ms for lane in self.lanes if lane.preparing]
        return JOIN_WAIT * max(preparing) / 1000 if preparing and not self._calls else 0.0

    def _round(self) -> bool:
        """Wait for work, run the calls waiting, then one batch; False once closed. A method of its own so that
        nothing of a round (a call's result, a batch's works) outlives it and keeps an engine alive."""
        with self._cond:
            self._cond.wait_for(self._has_work)
            if wait := self._join_wait():
                self._cond.wait_for(self._joined, wait)
            if self._closed:
                for future in [f for _, f in self._calls] + [o.future for o in self._oneshots]:
                    future.set_exception(RuntimeError("the scheduler is closed"))
                self._calls.clear()
                self._oneshots.clear()
                return False
            calls = list(self._calls)
            self._calls.clear()
            now = time.monotonic()
            self._collect_steps()
            step = float(np.median(list(self.steps)[-STEP_WINDOW:])) if self.steps else 0.0
            batch = [(item, item.take(now, step)) for item in choose_batch(self._waiting(), self.max_batch)]
            self._cond.notify_all()  # the clock
        for fn, future in calls:
            try:
                future.set_result(fn())
            except BaseException as e:
                future.set_exception(e)
            with self._cond:
                self._ended += 1
        if batch:
            self._run(batch)
        return True

    def _run(self, batch: list[tuple[Lane | OneShot, Work]]) -> None:
        """Set up each item (a failure drops that item only), one engine call, outputs to the finish stage (a
        one-shot's to its caller)."""
        ok = []
        for who, work in batch:
            try:
                if work.crop.shape != (256, 256, 3) or work.crop.dtype != np.uint8:
                    raise ValueError(f"a driving crop must be (256,256,3) uint8, got {work.crop.shape} {work.crop.dtype}")
                if work.setup:
                    work.setup()
                ok.append((who, work))
            except Exception as e:
                log.exception("engine setup failed")
                who.fail(e)
        faces = done = None
        if ok:
            t, start = time.perf_counter(), self._event()
            try:
                faces = self.animate([w for _, w in ok])
            except Exception as e:
                log.exception("engine call failed (batch of %d)", len(ok))
                for who, _ in ok:
                    who.fail(e)
            ms, done = (time.perf_counter() - t) * 1000, self._event()
        with self._cond:
            if ok:
                if done is None:
                    self.steps.append(ms)
                else:  # the call only queued the step: its time is the events', once the GPU is past them
                    self._timing.append((start, done))
                self.batch_sizes[len(ok)] += 1
            for (who, work), face in zip(ok, faces if faces is not None else []):
                who.deliver(work, face, done)
            for who, _ in batch:  # `_ended` does not count this batch yet: the calls before it, for waited_max
                who.release()
            self._ended += 1
            self._cond.notify_all()

    def animate(self, works: list[Work]):
        """One engine call for these works (engine thread only): host arrays on CPU, device tensors on CUDA."""
        crops = np.stack([w.crop for w in works])
        sessions = [w.session for w in works]
        if all(w.motion is None for w in works):
            return self.engine.animate(crops, sessions, as_tensor=self._as_tensor)
        faces, motion = self.engine.animate(crops, sessions, as_tensor=self._as_tensor, motion=True)
        for i, w in enumerate(works):
            if w.motion is not None:
                w.motion.update({k: v[i:i + 1] for k, v in motion.items()})
        return faces
