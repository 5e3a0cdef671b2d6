"""The batching frame scheduler on the real tiny engine: batches are exact, sessions don't disturb each other,
failures stay in their session, longest-waiting goes first, nothing queues; and admission control in the app.

Exactness on CPU: oneDNN's convolutions and GEMMs sum in an order that depends on the batch size (measured here:
an item's output is the same whatever the other items are, but it depends on the batch size and on the item's
position (odd and even positions differ), and a batch of 3 and a batch of 1 differ by at most 1 grey level on ~1%
of pixels, as tests/test_engine.py also allows). So "the session animated alone" is the engine called with only
this session's data, at the size of the batch it shared and read at its position there: bit-identical means no
other session's portrait, controls, reference or crop leaks into its output."""
import contextlib
import gc
import json
import threading
import time
import weakref

import httpx
import numpy as np
import pytest
import skimage.data

from conftest import run, tiny
from model.engine import Engine, load_networks
from stream.scheduler import (JOIN_WAIT, PREPARE_AHEAD, PREPARE_SLACK_MS, Lane, OneShot, Scheduler, Work,
                              choose_batch, prepare_delay)
from stream.serve_bench import simulate
from test_reliability import valid_offer_sdp  # a real offer: /offer checks the SDP before admission

flip = lambda im: np.ascontiguousarray(im[:, ::-1])


@pytest.fixture(scope="module")
def engine():
    return Engine(load_networks("recipe", "tiny"), device="cpu", threads=2)


@pytest.fixture(scope="module")
def images(golden) -> dict[str, np.ndarray]:
    return {"src": golden["input.source_rgb_u8"], "ref": golden["input.driving0_rgb_u8"],
            "drv": golden["input.driving_rgb_u8"]}


class Feed:
    """A session fed ready crops (a scheduler Client): records every output; can fail on purpose."""

    def __init__(self, name: str, fail: str | None = None, finish_delay: float = 0.0):
        self.name, self.fail, self.finish_delay = name, fail, finish_delay
        self.outputs: list[tuple[np.ndarray, np.ndarray]] = []
        self.setups: list = []  # engine-thread work for the next frame (a portrait swap)

    def prepare(self, crop: np.ndarray, arrived: float) -> Work:
        todo, self.setups = self.setups, []

        def setup():
            if self.fail == "setup":
                raise RuntimeError("engine setup failed on purpose")
            for fn in todo:
                fn()
        return Work(crop, self.name, setup, arrived)

    def finish(self, work: Work, face) -> None:
        time.sleep(self.finish_delay)
        if self.fail == "finish":
            raise RuntimeError("paste-back failed on purpose")
        self.outputs.append((work.crop, np.array(face)))


def start(sched: Scheduler, engine: Engine, name: str, source, reference=None, fail=None, **controls):
    """A session on the engine thread (portrait, reference, controls), then its lane."""
    def setup():
        engine.set_source(source, name)
        if reference is not None:
            engine.set_reference(reference, name)
        engine.set_controls(name, **controls)
    sched.call(setup)
    feed = Feed(name, fail)
    return feed, sched.add(feed)


def stop(sched: Scheduler, engine: Engine, *lanes) -> None:
    for lane in lanes:
        sched.remove(lane)
        sched.call(lambda lane=lane: engine.close(lane.client.name))


@contextlib.contextmanager
def recorded(sched: Scheduler):
    """Every engine call the scheduler makes: (sessions, crops, outputs)."""
    calls = []

    def animate(works, call=sched.animate):
        faces = call(works)
        calls.append(([w.session for w in works], [w.crop for w in works], np.array(faces)))
        return faces
    sched.animate = animate
    try:
        yield calls
    finally:
        del sched.animate


@contextlib.contextmanager
def engine_busy(sched: Scheduler, seconds: float = 0.5):
    """Keep the engine thread busy, so everything submitted meanwhile is ready for the same batch."""
    t = threading.Thread(target=sched.call, args=(lambda: time.sleep(seconds),))
    t.start()
    time.sleep(0.05)
    yield
    t.join()


def wait_for(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.02)
    assert condition()


def alone(sched, engine, name: str, crop: np.ndarray, size: int, index: int) -> np.ndarray:
    """The session animated with nothing but its own data, in a batch of `size`, read at `index`."""
    return sched.call(lambda: engine.animate(np.stack([crop] * size), [name] * size)[index])


def test_batched_outputs_are_exact(engine, images):
    sched = Scheduler.of(engine)
    src, ref, drv = images["src"], images["ref"], images["drv"]
    sessions = {"a": start(sched, engine, "a", src, ref),
                "b": start(sched, engine, "b", ref, drv, multiplier=0.5, lip_target=0.4),
                "c": start(sched, engine, "c", flip(src), flip(ref), stitching=False, eye_target=0.2, relative=False)}
    crops = {"a": drv, "b": flip(drv), "c": ref}
    try:
        with recorded(sched) as calls:
            with engine_busy(sched):
                for name, (_, lane) in sessions.items():
                    lane.submit(crops[name])
            wait_for(lambda: all(f.outputs for f, _ in sessions.values()))
        assert len(calls) == 1 and sorted(calls[0][0]) == ["a", "b", "c"]  # one batch of all three
        outs = {name: f.outputs[0][1] for name, (f, _) in sessions.items()}
        for name, out in outs.items():
            assert np.array_equal(out, alone(sched, engine, name, crops[name], 3, calls[0][0].index(name))), name
            single = sched.call(lambda: engine.animate(crops[name][None], [name])[0])
            assert np.abs(out.astype(int) - single).max() <= 1  # batch 1: another summation order
        assert len({o.tobytes() for o in outs.values()}) == 3
    finally:
        stop(sched, engine, *[lane for _, lane in sessions.values()])


def test_join_leave_and_swap_leave_the_others_unchanged(engine, images):
    sched = Scheduler.of(engine)
    src, ref, drv = images["src"], images["ref"], images["drv"]
    live = {"a": start(sched, engine, "a", src, ref), "b": start(sched, engine, "b", ref, drv, multiplier=0.7),
            "c": start(sched, engine, "c", flip(src), ref), "e": start(sched, engine, "e", src, ref)}
    seq = [drv, ref, flip(drv), flip(ref)]
    try:
        with recorded(sched) as calls:
            for step in range(10):
                if step == 3:  # d joins
                    live["d"] = start(sched, engine, "d", drv, ref, eye_target=0.3)
                if step == 5:  # c leaves
                    stop(sched, engine, live.pop("c")[1])
                if step == 7:  # e swaps its portrait
                    live["e"][0].setups.append(lambda: engine.set_source(flip(ref), "e"))
                with engine_busy(sched, 0.2):
                    for feed, lane in live.values():
                        lane.submit(seq[step % 4])
                wait_for(lambda: all(len(f.outputs) > 0 and np.array_equal(f.outputs[-1][0], seq[step % 4])
                                     for f, _ in live.values()))
            e_outputs = live["e"][0].outputs
        sizes = {len(names) for names, _, _ in calls}
        assert {4, 5} <= sizes  # the batch really changed around a and b (a, b, c, e; + d; - c)
        checked = 0
        for names, crops, faces in calls:
            for i, name in enumerate(names):
                if name in ("a", "b"):
                    assert np.array_equal(faces[i], alone(sched, engine, name, crops[i], len(names), i)), (name, names)
                    checked += 1
        assert checked == 20
        # e's own output did change with its new portrait (same driving crop: steps 3 and 7 share seq[3])
        assert not np.array_equal(e_outputs[3][1], e_outputs[7][1])
        assert np.array_equal(e_outputs[3][0], e_outputs[7][0])
    finally:
        stop(sched, engine, *[lane for _, lane in live.values()])


def test_a_failing_session_costs_the_others_nothing(engine, images):
    sched = Scheduler.of(engine)
    src, ref, drv = images["src"], images["ref"], images["drv"]
    sessions = [start(sched, engine, "ok1", src, ref), start(sched, engine, "ok2", ref, drv),
                start(sched, engine, "bad-finish", src, ref, fail="finish"),
                start(sched, engine, "bad-setup", src, ref, fail="setup")]
    try:
        with recorded(sched) as calls:
            for step in range(3):
                with engine_busy(sched, 0.2):
                    for _, lane in sessions:
                        lane.submit(drv if step % 2 else ref)
                wait_for(lambda: all(len(f.outputs) == step + 1 for f, _ in sessions[:2]) and
                         sessions[2][1].failed == step + 1 == sessions[3][1].failed)
        for names, _, _ in calls:  # the failing setup left its batch; the failing finish did not matter to it
            assert sorted(names) == ["bad-finish", "ok1", "ok2"]
        assert [len(f.outputs) for f, _ in sessions] == [3, 3, 0, 0]
        assert all(lane.failed == 0 and lane.dropped == 0 for _, lane in sessions[:2])
    finally:
        stop(sched, engine, *[lane for _, lane in sessions])


def test_fairness_longest_waiting_first(engine, images):
    """4 sessions at 30 fps each, 2 per batch: every session gets at least 20% of the outputs over 10 s."""
    sched = Scheduler.of(engine)
    crops = [images["src"], images["ref"], images["drv"], flip(images["drv"])]
    try:
        row = simulate(engine, 4, seconds=10, crops=crops, warmup=1.0, max_batch=2)
    finally:
        sched.max_batch = 8
    assert set(row["batch_sizes"]) <= {"1", "2"} and row["batch_sizes"].get("2", 0) > 0
    assert row["aggregate_fps"] > 0
    for fps in row["session_fps"]:
        assert fps >= 0.2 * row["aggregate_fps"], row["session_fps"]


def test_queues_stay_bounded_and_drops_are_counted(engine, images):
    """Frames at ~100 fps into an engine and a finish stage that can't keep up: each slot holds one frame, the
    pool's queue never holds more than a task per stage, every frame is either output or counted as dropped."""
    sched = Scheduler.of(engine)
    feeds = [start(sched, engine, f"s{i}", images["src"], images["ref"]) for i in range(2)]
    for f, _ in feeds:
        f.finish_delay = 0.3
    submitted, queued = 0, 0
    try:
        for i in range(60):
            for _, lane in feeds:
                lane.submit(images["drv"] if i % 2 else images["ref"])
                submitted += 1
            queued = max(queued, sched._pool._work_queue.qsize())
            time.sleep(0.01)
        wait_for(lambda: all(not lane.busy and lane.inbox is None for _, lane in feeds))
        assert queued <= 2 * len(feeds)
        for f, lane in feeds:
            assert lane.dropped >= 40 and lane.failed == 0
            assert len(f.outputs) + lane.dropped == submitted // len(feeds)
    finally:
        stop(sched, engine, *[lane for _, lane in feeds])


# ---- admission in the app: HTTP streaming and WebRTC signalling, /healthz ----

@pytest.fixture(scope="module")
def server(tmp_path_factory, loopback_only):
    import socket

    import gradio as gr
    from web.app import LiveApp
    app = LiveApp(tiny(max_sessions=1), untrained=True, workdir=tmp_path_factory.mktemp("live"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.launch(port=port, block=False)
    yield app, f"http://127.0.0.1:{port}/", gr.Request
    demo.close()
    app.close()


def test_server_full_over_http_and_webrtc_then_admitted(server):
    app, url, Request = server
    astronaut = skimage.data.astronaut()
    first, second = Request(session_hash="first"), Request(session_hash="second")
    page = json.loads(run(app.open_page(second)))
    run(app.http_frame(astronaut, first))
    wait_for(lambda: app.workers[0].worker.tabs[first.session_hash].pipeline.metrics.frames_out >= 1)
    health = httpx.get(url + "healthz")
    assert health.status_code == 503  # full: not ready for another session
    body = health.json()
    assert body["live_sessions"] == 1 and body["capacity"] == 1 and body["ready"] and body["full"]
    (worker,) = body["workers"]
    assert worker["alive"] and len(worker["session_fps"]) == 1 and worker["engine_step_p50_ms"] > 0

    refused = run(app.http_frame(astronaut, second))  # HTTP streaming: the message instead of the animation
    assert app.workers[0].worker.tabs[second.session_hash].pipeline is None and refused.shape == astronaut.shape
    assert refused.mean() < astronaut.mean() / 2  # the dimmed webcam frame with the text on it
    assert "the server is full (1 live session); try again shortly" in run(app.stats(second))
    offer = httpx.post(url + "offer", json={**page, "sdp": valid_offer_sdp(),
                                            "type": "offer"})
    assert offer.status_code == 503
    assert offer.json()["error"] == "the server is full (1 live session); try again shortly"
    for _ in range(3):  # the live session keeps going meanwhile
        run(app.http_frame(astronaut, first))
    assert app.workers[0].worker.tabs[first.session_hash].pipeline.metrics.frames_out >= 2

    run(app.close_page(first))  # the slot frees up: the next frame of the waiting tab is admitted
    assert httpx.get(url + "healthz").json()["live_sessions"] == 0
    run(app.http_frame(astronaut, second))
    assert app.workers[0].worker.tabs[second.session_hash].pipeline is not None and "Live via HTTP streaming" in run(app.stats(second))
    assert httpx.get(url + "healthz").status_code == 503
    run(app.close_page(second))
    health = httpx.get(url + "healthz")
    assert health.status_code == 200 and health.json()["live_sessions"] == 0


def test_schedulers_free_their_threads_and_engines(engine):
    """20 engines in a row, each with its scheduler: closing one, or dropping its engine, ends its 6 threads and
    frees the engine (a scheduler once held its engine for ever, and with it its threads)."""
    gc.collect()
    before = threading.active_count()
    freed = []
    for i in range(20):
        e = Engine(engine.nets, device="cpu", threads=2)
        sched = Scheduler.of(e)
        assert sched.call(lambda: sched.engine) is e
        freed.append(weakref.ref(e))
        if i % 2:
            sched.close()
        del e, sched
    gc.collect()  # an Engine is in a reference cycle (its bound step function): the cycle collector frees it
    end = time.monotonic() + 30  # the threads end on their own once told to
    while threading.active_count() > before and time.monotonic() < end:
        time.sleep(0.05)
    assert threading.active_count() == before
    assert all(ref() is None for ref in freed)


def test_renders_and_edits_never_hold_up_a_live_session(engine, images):
    """A live session fed continuously while two renders (Animator.__call__, as stream/render.py calls it) and
    the portrait editor run in loops: each of the live session's frames waits for at most the engine call in
    flight, because render and editor frames join the live batches instead of running before them."""
    from stream.editor import PortraitEditor
    from stream.face import prepare_source
    from stream.pipeline import Animator, Settings
    from stream.serve_bench import moving_face
    sched = Scheduler.of(engine)
    source, clip = prepare_source(skimage.data.astronaut()), moving_face(10)
    made = [0, 0, 0]  # frames per render, then the editor's
    done = threading.Event()
    end = time.monotonic() + 120

    def render(k: int) -> None:
        animator = Animator(engine, source)
        try:
            for i in range(400):
                if done.is_set() or time.monotonic() > end:
                    break
                assert animator(clip[i % len(clip)], i / 30).shape == source.image.shape
                made[k] += 1
        finally:
            animator.close()

    def edit() -> None:
        editor = PortraitEditor(engine)
        try:
            for i in range(400):
                if done.is_set() or time.monotonic() > end:
                    break
                assert editor(source, Settings()).shape == source.image.shape
                made[2] += 1
        finally:
            editor.close()
    feed, lane = start(sched, engine, "live", images["src"], images["ref"])
    others = [threading.Thread(target=render, args=(k,)) for k in (0, 1)] + [threading.Thread(target=edit)]
    for t in others:
        t.start()
    try:
        for i in range(30 * 120):  # 30 fps, until enough of everything ran side by side
            if (len(feed.outputs) >= 8 and min(made) >= 3) or time.monotonic() > end:
                break
            lane.submit(images["drv"] if i % 2 else images["ref"])
            time.sleep(1 / 30)
        stats = sched.stats()
    finally:
        done.set()
        for t in others:
            t.join(60)
        stop(sched, engine, lane)
    assert len(feed.outputs) >= 8 and min(made) >= 3, (len(feed.outputs), made)
    assert len(stats["waited_max"]) == 1 and stats["waited_max"][0] <= 1, stats  # the one live session
    assert max(stats["batch_sizes"]) >= 2 and stats["oneshots"] >= 9, stats  # render frames joined its batches


def test_a_one_shot_error_goes_to_its_caller(engine, images):
    """A render's bad frame raises in the render, not in the engine loop, which keeps serving."""
    sched = Scheduler.of(engine)
    sched.call(lambda: engine.set_source(images["src"], "one"))

    def broken() -> None:
        raise RuntimeError("setup failed on purpose")
    try:
        with pytest.raises(RuntimeError, match="on purpose"):
            sched.run(Work(images["drv"], "one", broken))
        with pytest.raises(ValueError, match="a driving crop must be"):
            sched.run(Work(images["drv"][:128], "one"))
        face = sched.run(Work(images["drv"], "one"))
        assert np.array_equal(face, sched.call(lambda: engine.animate(images["drv"][None], ["one"])[0]))
    finally:
        sched.call(lambda: engine.close("one"))


class OverlappingEngine:
    """A fake accelerator engine (a device that is not the CPU, so the scheduler overlaps preparation with the
    engine step, as on CUDA, without CUDA's events and streams): each step takes 0.2 s, unless `hold` is set: then
    it lasts until `hold` is set by the test's client (at most 5 s)."""

    def __init__(self):
        self.device = type("Device", (), {"type": "accelerator"})()
        self.hold: threading.Event | None = None
        self.steps: list[tuple[float, float]] = []  # (start, end) of each engine call

    def animate(self, crops, sessions, as_tensor=False):
        start = time.monotonic()
        if self.hold is None:
            time.sleep(0.2)
        else:
            self.hold.wait(5)
        self.steps.append((start, time.monotonic()))
        return np.zeros((len(crops), 4, 4, 3), np.uint8)


def test_a_frame_arriving_mid_step_is_prepared_during_the_step():
    """On an overlapping engine (CUDA), a frame submitted 30 ms into a 200 ms engine step starts its 50 ms
    preparation during that step (just in time for its end), not once the engine is free: the clock that waits
    for the preparation's start is woken by the submit. The engine step here lasts until that preparation starts
    (5 s at most), so the order is the evidence, not a duration."""
    engine = OverlappingEngine()
    sched = Scheduler(engine)
    prepared: dict[str, float] = {}
    finished: dict[str, threading.Event] = {}

    class Client:
        def prepare(self, name: str, arrived: float) -> Work:
            prepared[name] = time.monotonic()
            if engine.hold is not None and name == "late":
                engine.hold.set()
            time.sleep(0.05)
            return Work(np.zeros((256, 256, 3), np.uint8), "s", None, arrived, name)

        def finish(self, work: Work, face) -> None:
            finished[work.data].set()

    def frame(name: str) -> threading.Event:
        finished[name] = threading.Event()
        lane.submit(name)
        return finished[name]
    try:
        lane = sched.add(Client())
        for i in range(5):  # the scheduler learns the step (0.2 s) and the preparation (0.05 s) times
            assert frame(f"warm-up {i}").wait(10)
        engine.hold = threading.Event()
        first = frame("first")
        for _ in range(500):  # until the engine runs "first"
            if len(engine.steps) == 5 and sched.lanes[0].in_engine:
                break
            time.sleep(0.01)
        time.sleep(0.03)
        late = frame("late")
        assert first.wait(10) and late.wait(10)
        start, end = engine.steps[5]
        assert prepared["late"] < end, f"prepared {1000 * (prepared['late'] - start):.0f} ms into the step, " \
                                       f"after it ended at {1000 * (end - start):.0f} ms"
    finally:
        sched.close()


def test_batch_choice_and_prepare_ahead_time():
    """The batch: lanes and one-shots alike, longest-waiting (earliest `served`) first, at most max_batch. The next
    frame's preparation starts PREPARE_AHEAD preparation times (plus the slack) before the step should end: never
    before the engine takes the frame, never during the step without overlap (a CPU engine)."""
    lanes = [Lane(None, None), Lane(None, None)]
    lanes[0].served, lanes[1].served = 3.0, 2.0
    items = [lanes[0], OneShot(None, Work(None), 1.0), lanes[1], OneShot(None, Work(None), 4.0)]
    assert [i.served for i in choose_batch(items, 3)] == [1.0, 2.0, 3.0]
    assert [type(i) for i in choose_batch(items, 8)] == [OneShot, Lane, Lane, OneShot]
    assert prepare_delay(100.0, 20.0, True) == pytest.approx((100 - PREPARE_AHEAD * 20 - PREPARE_SLACK_MS) / 1000)
    assert prepare_delay(100.0, 80.0, True) == 0.0  # preparing takes longer than the step: at once
    assert prepare_delay(100.0, 20.0, False) == float("inf")
    assert JOIN_WAIT > 1  # a preparation that runs as long as it did last time still joins the batch
