"""The live pipeline on the real tiny engine: latest frame wins, sessions clean up, metrics, recording."""
import subprocess
import sys
import threading
import time

import av
import numpy as np
import pytest
import skimage.data

from conftest import ROOT
from model.engine import Engine, load_networks
from stream.face import prepare_source
from stream.pipeline import SessionPipeline, Settings
from stream.scheduler import Scheduler

ASTRONAUT = skimage.data.astronaut()


@pytest.fixture(scope="module")
def engine():
    return Engine(load_networks("recipe", "tiny"))


@pytest.fixture(scope="module")
def source():
    return prepare_source(ASTRONAUT)


class SlowEngine:
    """The real engine, with every animate call delayed: frames arrive much faster than they are processed."""

    def __init__(self, engine: Engine, delay: float):
        self.engine, self.delay = engine, delay

    def animate(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.engine.animate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def frames(n: int):
    """Webcam-like frames: the astronaut with a small sideways shake."""
    for i in range(n):
        yield np.roll(ASTRONAUT, 3 * (i % 4), axis=1)


def drain(pipe: SessionPipeline, outputs: int, timeout: float = 60) -> None:
    """Wait until the pipeline produced `outputs` frames in total."""
    end = time.monotonic() + timeout
    while pipe.metrics.frames_out < outputs and time.monotonic() < end:
        pipe.wait(pipe.seq, 0.5)
    assert pipe.metrics.frames_out >= outputs


def test_latest_frame_wins_and_never_queues(engine, source):
    pipe = SessionPipeline(SlowEngine(engine, 0.4), source)
    try:
        pending_max = 0
        for rgb in frames(40):
            pipe.submit(rgb)
            pending_max = max(pending_max, 0 if pipe.lane.inbox is None else 1)
            assert isinstance(pipe.lane.inbox, (tuple, type(None)))  # one slot, never a list of frames
            time.sleep(0.01)
        assert pending_max == 1
        # the frame still pending is processed; the rest were replaced while the engine was busy
        end = time.monotonic() + 30
        while (m := pipe.stats())["frames_out"] + m["dropped"] < m["frames_in"] and time.monotonic() < end:
            pipe.wait(pipe.seq, 0.5)
        assert m["frames_in"] == 40
        assert m["dropped"] >= 30 and m["failed"] == 0
        assert m["frames_in"] == m["frames_out"] + m["dropped"]  # every frame was either animated or replaced
        assert pipe.lane.inbox is None and pipe.lane.ready is None
        assert pipe.latest()[1].shape == (512, 512, 3)
    finally:
        pipe.close()


def test_sessions_share_the_engine_and_clean_up(engine, source):
    SessionPipeline(engine, source).close()  # the engine's scheduler threads start with its first session
    before = set(threading.enumerate())
    pipes = [SessionPipeline(engine, source, transport=f"test{i}") for i in range(3)]
    # no pipeline thread per session: the one new thread each is its face tracker's (mediapipe 1.x runs each task's
    # C calls on a dispatcher thread of its own), and it ends with the session (checked below)
    assert len(set(threading.enumerate()) - before) == len(pipes)
    for rgb in frames(6):
        for p in pipes:
            p.submit(rgb)
        time.sleep(0.05)
    for p in pipes:
        drain(p, 1)
    assert {p.name for p in pipes} <= set(engine.sessions)
    for p in pipes:
        p.close()
        p.close()  # idempotent
    assert not {p.name for p in pipes} & set(engine.sessions)
    new = set(threading.enumerate()) - before  # the shared pool, which does not grow with the sessions
    assert all(t.name.startswith("scheduler-pool") for t in new) and len(new) <= Scheduler.of(engine)._pool._max_workers
    assert all(p.closed for p in pipes) and not Scheduler.of(engine).lanes


def test_metrics_are_consistent(engine, source):
    pipe = SessionPipeline(engine, source, transport="test")
    try:
        sent = 0
        for rgb in frames(1800):  # 30 fps until 3 outputs (at most a minute: this CPU may be busy)
            pipe.submit(rgb)
            sent += 1
            time.sleep(1 / 30)
            if pipe.metrics.frames_out >= 3 and sent >= 30:
                break
        m = pipe.stats()
        assert m["transport"] == "test" and m["size"] == [512, 512] and not m["recording"]
        assert m["frames_in"] == sent and 3 <= m["frames_out"] <= sent
        assert m["fps_in"] > 0 and m["fps_out"] > 0
        assert 0 < m["latency_p50_ms"] <= m["latency_p95_ms"]
    finally:
        pipe.close()


def test_controls_apply_live(engine, source):
    settings = Settings()
    pipe = SessionPipeline(engine, source, settings)
    try:
        pipe.submit(np.full_like(ASTRONAUT, 128))  # no face yet: the portrait at rest
        drain(pipe, 1)
        assert np.array_equal(pipe.latest()[1], source.image)
        pipe.submit(ASTRONAUT)
        drain(pipe, 2)
        pasted = pipe.latest()[1]
        assert pasted.shape == source.image.shape and not np.array_equal(pasted, source.image)
        settings.paste = False  # the raw generator output of the tiny config
        pipe.submit(ASTRONAUT)
        drain(pipe, 3)
        assert pipe.latest()[1].shape == (256, 256, 3)
        plain = pipe.latest()[1]
        settings.overlay = True  # the metrics line is drawn over the top of the frame, nowhere else
        pipe.submit(ASTRONAUT)
        drain(pipe, 4)
        shown = pipe.latest()[1]
        changed = np.abs(shown.astype(int) - plain).max(axis=2) > 60  # the text, and frame-to-frame motion
        assert shown.shape == (256, 256, 3) and changed[:24].mean() > 5 * changed[24:].mean(), \
            (changed[:24].mean(), changed[24:].mean())
        resets = []
        real = engine.set_reference
        engine.set_reference = lambda crop, name: (crop is None and resets.append(name), real(crop, name))[1]
        try:
            pipe.reset_reference()
            pipe.submit(ASTRONAUT)
            drain(pipe, 5)
        finally:
            del engine.set_reference
        assert resets == [pipe.name]  # the reference was dropped: the next frame becomes the neutral pose
    finally:
        pipe.close()


def test_the_overlay_reads_the_metrics_while_frames_arrive(engine, source):
    """With the overlay on, the output stage reads the metrics while the webcam's thread appends to them: a frame
    that arrives mid-read waits for the lock instead of breaking the read (and with it the frame)."""
    from collections import deque
    pipe = SessionPipeline(engine, source, Settings(paste=False, overlay=True))

    class Racing(deque):
        race = True

        def __iter__(self):
            items = super().__iter__()
            if self.race:
                self.race = False
                yield next(items)
                webcam = threading.Thread(target=pipe.submit, args=(ASTRONAUT,))
                webcam.start()
                webcam.join(0.5)  # a frame arrives mid-read (with the lock held, it waits for it)
            yield from items
    try:
        pipe.submit(ASTRONAUT)
        drain(pipe, 1)
        pipe.metrics.arrivals = Racing(pipe.metrics.arrivals, maxlen=100)
        pipe.submit(ASTRONAUT)
        drain(pipe, 2)
        assert not pipe.metrics.arrivals.race and pipe.lane.failed == 0
    finally:
        pipe.close()


def count_frames(path) -> tuple[int, str, tuple[int, int]]:
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for _ in c.decode(s))
        return n, s.codec_context.name, (s.width, s.height)


@pytest.mark.parametrize("end", ["stop", "disconnect"])
def test_recording_is_playable(engine, source, tmp_path, end):
    pipe = SessionPipeline(engine, source)
    path = tmp_path / "rec.mp4"
    try:
        pipe.submit(ASTRONAUT)
        drain(pipe, 1)
        pipe.start_recording(path)
        for i, rgb in enumerate(frames(1500)):  # 25 fps until 6 outputs (at most a minute: this CPU may be busy)
            pipe.submit(rgb)
            time.sleep(0.04)
            if i >= 25 and pipe.metrics.frames_out >= 6:
                break
        drain(pipe, 6)
        recorder = pipe.recorder
        if end == "stop":
            assert pipe.stop_recording() == path
            assert pipe.stats()["recording"] is False
    finally:
        closed = pipe.close()  # "disconnect": the connection ends while recording
    assert closed == (path if end == "disconnect" else None)
    n, codec, size = count_frames(path)
    assert n == recorder.frames >= 5
    assert codec in ("h264", "mpeg4") and size == (512, 512)


def test_recordings_are_finalised_at_exit(tmp_path):
    """A server that exits without stopping a recording (Ctrl-C) still leaves a playable file."""
    script = (f"import numpy as np; from stream.recorder import Recorder; r = Recorder({str(tmp_path / 'exit.mp4')!r})\n"
              "for i in range(7): r.write(np.full((64, 96, 3), 30 * i, np.uint8))\n")
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60)
    n, codec, size = count_frames(tmp_path / "exit.mp4")
    assert n == 7 and size == (96, 64)


@pytest.mark.parametrize("recording", [False, True])
def test_a_large_portrait_streams_at_stream_max_and_records_at_full_size(engine, tmp_path, recording):
    """The encoder gets the output at --stream-max on the longer side (pasted straight into the streamed frame
    when nothing needs the full size); a recording keeps the portrait's full size."""
    import cv2
    big = prepare_source(cv2.resize(ASTRONAUT, (1280, 1280)))
    pipe = SessionPipeline(engine, big, transport="WebRTC", stream_max=720, images=False)
    pipe.listen(lambda: None)  # a track that sends it
    if recording:
        pipe.start_recording(tmp_path / "take.mp4")
    for i, frame in enumerate(frames(3)):
        pipe.submit(frame)
        drain(pipe, i + 1)
    seq, video = pipe.latest_video()
    assert (video.width, video.height) == (720, 720) and video.format.name == "yuv420p"
    assert pipe.stats()["size"] == [720, 720]
    assert pipe.latest()[1].shape == ((1280, 1280, 3) if recording else (720, 720, 3))  # what was made
    path = pipe.close()
    if recording:
        with av.open(str(path)) as c:
            assert (c.streams.video[0].width, c.streams.video[0].height) == (1280, 1280)
    else:
        assert path is None


def test_no_face_seconds_and_every_listener_hears_each_output(engine, source):
    """stats()["no_face_s"] grows while frames have no face and is 0 once one is seen again; each listener (the
    performer's track and its viewers') is called for every output, and none after it stopped listening."""
    pipe = SessionPipeline(engine, source)
    heard = [0, 0]
    stop = [pipe.listen(lambda i=i: heard.__setitem__(i, heard[i] + 1)) for i in range(2)]
    try:
        assert pipe.stats()["no_face_s"] == 0.0  # no frame yet: nothing to say
        blank = np.full_like(ASTRONAUT, 90)
        pipe.submit(blank)
        drain(pipe, 1)
        time.sleep(1.2)
        pipe.submit(blank)
        drain(pipe, 2)
        assert pipe.stats()["no_face_s"] >= 1.0
        assert heard == [2, 2]
        stop[1]()
        pipe.submit(ASTRONAUT)
        drain(pipe, 3)
        assert pipe.stats()["no_face_s"] == 0.0
        assert heard == [3, 2]
    finally:
        pipe.close()
    assert heard == [4, 2]  # the close wakes the listeners still there


@pytest.mark.skipif(not __import__("torch").cuda.is_available(),
                    reason="needs CUDA: there the output is resized and colour-converted on the device")
def test_on_cuda_only_the_streamed_planes_reach_the_host(source):
    """A CUDA engine's output stays on the device through paste-back, resize and colour conversion: the pipeline
    makes no full-size host image, and sends a yuv420p frame at the streamed size whose picture is the portrait's
    (tests/test_encode.py checks the device conversion against the host one, numerically)."""
    from stream.encode import stream_size
    gpu = Engine(load_networks("recipe", "tiny"), device="cuda")
    pipe = SessionPipeline(gpu, source, transport="WebRTC", stream_max=256, images=False)
    pipe.listen(lambda: None)  # a track that sends it
    try:
        for i, frame in enumerate(frames(3)):
            pipe.submit(frame)
            drain(pipe, i + 1)
        assert pipe._output is None  # no full-size host image was made
        seq, video = pipe.latest_video()
    finally:
        pipe.close()
    w, h = stream_size(*source.image.shape[1::-1], 256)
    assert (video.width, video.height) == (w, h) and video.format.name == "yuv420p"
    import cv2
    small = cv2.resize(source.image, (w, h), interpolation=cv2.INTER_AREA)
    sent = cv2.cvtColor(video.to_ndarray(), cv2.COLOR_YUV2RGB_I420)
    assert np.abs(sent.astype(int) - small).mean() < 20  # the portrait, the face region animated
