"""The shared server's integrity: one owner per tab's live connection, counted. A valid offer makes exactly one
peer and one pipeline; an offer aiortc refuses gets a 4xx and makes nothing; admission is atomic; an offer needs
its page's secret; a stopped HTTP-streaming webcam frees its slot; no recording take is lost; faults in clean-up,
in a recorder or in a file that vanishes leave the server running and leak nothing; bad flags exit 2 in one line.
Real aiortc peers over loopback, the real tiny engine."""
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import gradio as gr
import httpx
import pytest
import skimage.data

from conftest import ROOT, run, tiny
from stream.serve_bench import moving_face
from test_reliability import valid_offer_sdp, wait_until
from web import loadtest
from web.worker import Local

ASTRONAUT = skimage.data.astronaut()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def created():
    """Counts of the peers and pipelines the server creates (the real classes, counted)."""
    from web import webrtc, worker
    counts = {"peers": 0, "pipelines": 0, "delay": 0.0}  # delay: a slower pipeline set-up, so that requests overlap

    class Peer(webrtc.RTCPeerConnection):
        def __init__(self, *a, **k):
            counts["peers"] += 1
            super().__init__(*a, **k)

    class Pipeline(worker.SessionPipeline):
        def __init__(self, *a, **k):
            counts["pipelines"] += 1
            time.sleep(counts["delay"])
            super().__init__(*a, **k)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(webrtc, "RTCPeerConnection", Peer)
        mp.setattr(worker, "SessionPipeline", Pipeline)
        yield counts


@pytest.fixture(scope="module")
def served(created, tmp_path_factory, loopback_only):
    """One live session at most, so that admission shows."""
    from web.app import LiveApp
    loadtest.loopback_ice()
    app = LiveApp(tiny(max_sessions=1), untrained=True, workdir=tmp_path_factory.mktemp("integrity"))
    port = free_port()
    demo = app.launch(port=port, block=False)
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()
    app.close()


def idle(app) -> bool:
    return not any(app.workers[0].worker.counts()[k] for k in ("live", "peers", "engine_sessions", "lanes"))


async def stream(url: str, frames: int = 3) -> tuple[dict, dict]:
    """A real aiortc client: load the page, offer, receive `frames` frames, leave. (its page, counts while live)"""
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        tab = loadtest.Tab(http)
        pc, received = loadtest.new_peer(moving_face(4), 10)
        try:
            page = await tab.open()
            await loadtest.offer(http, pc, page)
            track = await asyncio.wait_for(received, 60)
            for _ in range(frames):
                await asyncio.wait_for(track.recv(), 60)
            return page, (await http.get("healthz")).json()
        finally:
            await pc.close()
            await tab.close()


def test_a_valid_offer_makes_one_peer_and_one_pipeline(served, created):
    app, url = served
    before = dict(created)
    page, health = asyncio.run(stream(url))
    assert created["peers"] - before["peers"] == 1 and created["pipelines"] - before["pipelines"] == 1
    assert health["live_sessions"] == 1
    assert wait_until(lambda: idle(app)), app.workers[0].worker.counts()


def offer_with_audio_codec_nobody_has() -> str:
    """A VP8 video section (valid) plus an audio section whose only codec is FOO/8000: the guard lets it through,
    aiortc does not."""
    out, section = [], None
    for line in valid_offer_sdp(("video", "audio")).splitlines():
        if line.startswith("m="):
            section = line.split()[0][2:]
            if section == "audio":
                line = "m=audio 9 UDP/TLS/RTP/SAVPF 120"
        elif section == "audio" and line.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")):
            continue
        elif section == "audio" and line.startswith("a=mid:"):
            out += [line, "a=rtpmap:120 FOO/8000"]
            continue
        out.append(line)
    return "\r\n".join(out) + "\r\n"


def test_an_offer_aiortc_refuses_gets_a_4xx_and_makes_nothing(served, created):
    app, url = served
    page = json.loads(run(app.open_page(gr.Request(session_hash="foo"))))
    before = dict(created)
    r = httpx.post(url + "offer", json={"sdp": offer_with_audio_codec_nobody_has(), "type": "offer", **page},
                   timeout=60)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert created["pipelines"] == before["pipelines"] and idle(app), app.workers[0].worker.counts()
    run(app.close_page(gr.Request(session_hash="foo")))


def test_two_concurrent_offers_for_the_last_slot(served, created):
    app, url = served

    async def both() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            tabs = [loadtest.Tab(http) for _ in range(2)]
            pages = [await t.open() for t in tabs]
            peers = [loadtest.new_peer(moving_face(4), 10)[0] for _ in tabs]
            for pc in peers:
                await pc.setLocalDescription(await pc.createOffer())
            try:
                rs = await asyncio.gather(*[http.post("offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                                     **p}) for pc, p in zip(peers, pages)])
                return sorted(r.status_code for r in rs)
            finally:
                for pc in peers:
                    await pc.close()
                for t in tabs:
                    await t.close()
    before = dict(created)
    assert asyncio.run(both()) == [200, 503]
    assert created["pipelines"] - before["pipelines"] == 1
    assert wait_until(lambda: idle(app)), app.workers[0].worker.counts()


def test_an_offer_needs_its_pages_secret(served):
    """Another tab's session hash is not enough: a second page load naming it gets no secret, and an offer with a
    wrong secret (each one the parser accepts, so that the secret check itself refuses it) gets 403; the tab is
    untouched."""
    app, url = served
    victim = json.loads(run(app.open_page(gr.Request(session_hash="victim"))))
    assert run(app.open_page(gr.Request(session_hash="victim"))) == ""  # the open_page route gives it only once
    run(app.http_frame(ASTRONAUT, gr.Request(session_hash="victim")))
    pipeline = app.workers[0].worker.tabs["victim"].pipeline
    sdp = valid_offer_sdp()
    secret = victim["secret"]
    for wrong in ("guess", secret[::-1], secret[:-1], secret + "A", secret[:-1] + "é", "x" * 128):
        r = httpx.post(url + "offer", json={"sdp": sdp, "type": "offer", "session": "victim", "secret": wrong})
        assert r.status_code == 403 and r.json()["error"] == "unknown page; reload it", (wrong, r.text)
    assert app.workers[0].worker.tabs["victim"].pipeline is pipeline and not pipeline.closed
    run(app.close_page(gr.Request(session_hash="victim")))
    assert idle(app)


def test_a_stranger_with_only_the_session_hash_gets_nothing(served):
    """Gradio lets a client choose its session hash (web/loadtest.py does, through its queue): a stranger who knows
    only a tab's hash gets neither its secret from open_page, nor its connection by an offer, nor a view link, nor
    its recordings; the tab's own page still gets its take."""
    app, url = served
    r = gr.Request(session_hash="victim-tab")
    key = run(app.open_page(r))
    run(app.http_frame(ASTRONAUT, r))
    assert "Recording" in run(app.start_recording(r))
    for _ in range(3):
        run(app.http_frame(ASTRONAUT, r))
    sdp = valid_offer_sdp()

    async def stranger() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            tab = loadtest.Tab(http)
            tab.session = "victim-tab"
            got = dict(page=(await tab.call("open_page"))[0])
            secret = json.loads(got["page"])["secret"] if got["page"] else "guess"
            got["offer"] = (await http.post("offer", json={"sdp": sdp, "type": "offer",
                                                           "session": "victim-tab", "secret": secret})).status_code
            got["share"] = (await tab.call("share_output", [url, got["page"]]))[0]
            got["stop"] = await tab.call("stop_recording", [got["page"]])
            return got
    got = asyncio.run(stranger())
    assert got["page"] == "" and got["offer"] == 403, got
    assert "view/" not in json.dumps(got["share"]) and not app.workers[0].worker.views, got
    assert "Nothing recorded yet." in json.dumps(got["stop"]), got
    takes, status = run(app.stop_recording(key, r))  # the take, and its motion as a template
    assert len(takes) == 2 and takes[1].endswith(".pkl") and decoded(takes[0]) >= 1, status
    run(app.close_page(r))
    assert wait_until(lambda: idle(app)), app.workers[0].worker.counts()


def test_under_auth_every_tab_handler_acts_only_for_its_login(tmp_path, loopback_only):
    """With --auth, another login that names a tab's session hash, even with its page's secret, acts on nothing:
    no recording starts, no link is shared, no take is handed over, its controls stay, the tab stays open."""
    from web.app import LiveApp
    app = LiveApp(tiny(step_s=0.1), untrained=True, workdir=tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    demo = app.launch(port=port, auth=[("ada", "lovelace"), ("bob", "builder")], block=False)
    try:
        async def scenario() -> dict:
            async with httpx.AsyncClient(base_url=url, timeout=60) as ada, \
                    httpx.AsyncClient(base_url=url, timeout=60) as bob:
                for http, user, password in ((ada, "ada", "lovelace"), (bob, "bob", "builder")):
                    assert (await http.post("login", data={"username": user, "password": password})).status_code == 200
                mine = loadtest.Tab(ada)
                page = await mine.open()
                await app.http_frame(ASTRONAUT, gr.Request(session_hash=mine.session, username="ada"))
                theirs = loadtest.Tab(bob)
                theirs.session = mine.session
                key = json.dumps(page)
                got = dict(record=(await theirs.call("start_recording"))[0],
                           share=(await theirs.call("share_output", [url, key]))[0],
                           stop=await theirs.call("stop_recording", [key]),
                           stats=(await theirs.call("stats"))[0],
                           reset=(await theirs.call("reset_reference"))[0])
                got["own"] = (await mine.call("start_recording"))[0]
                await mine.close()
                return got
        got = asyncio.run(scenario())
        assert "Recording" not in json.dumps(got["record"]) and "view/" not in json.dumps(got["share"]), got
        assert "Nothing recorded yet." in json.dumps(got["stop"]) and "Live via" not in json.dumps(got["stats"]), got
        assert "Reference reset" not in json.dumps(got["reset"]) and not app.workers[0].worker.views, got
        assert "Recording" in got["own"]  # the tab's own login still can
    finally:
        demo.close()
        app.close()


def test_a_stopped_http_webcam_frees_its_slot(served):
    """Gradio tells the server nothing when its webcam stops: the connection ends once frames stop coming, with
    the tab still open (its metrics poll keeps it), and /healthz is ready again."""
    app, url = served
    r = gr.Request(session_hash="http")
    for _ in range(3):
        run(app.http_frame(ASTRONAUT, r))
    assert httpx.get(url + "healthz").status_code == 503  # the one slot is taken
    start = time.monotonic()
    assert wait_until(lambda: run(app.stats(r)) and httpx.get(url + "healthz").json()["live_sessions"] == 0, 30)
    assert time.monotonic() - start < 10 + 2  # the bound, with the poll's slack
    assert httpx.get(url + "healthz").status_code == 200 and "http" in app.workers[0].worker.tabs  # the tab stays
    run(app.close_page(r))


def test_overlapping_http_frames_make_one_connection(served, created):
    """Gradio streams frames without waiting for answers: the ones that arrive while the connection is being made
    share it."""
    import threading
    app, url = served
    r = gr.Request(session_hash="burst")
    before, created["delay"] = created["pipelines"], 0.5
    threads = [threading.Thread(target=lambda: run(app.http_frame(ASTRONAUT, r))) for _ in range(6)]
    try:
        for t in threads:
            t.start()
            time.sleep(0.05)  # while the first connection is being made
        for t in threads:
            t.join(120)
    finally:
        created["delay"] = 0.0
    assert created["pipelines"] - before == 1 and app.workers[0].worker.counts()["live"] == 1
    run(app.close_page(r))
    assert idle(app)


# ---- recordings: no take is lost ----

@pytest.fixture
def app(tmp_path):
    from web.app import LiveApp
    from web.limits import Limits
    a = LiveApp(tiny(limits=Limits(record_max_s=0.6), step_s=0.1), untrained=True, workdir=tmp_path)
    yield a
    a.close()


def frames_until(app, r, text: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while text not in run(app.stats(r)) and time.monotonic() < end:
        run(app.http_frame(ASTRONAUT, r))
    assert text in run(app.stats(r))


def decoded(path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def stop_webcam(app, monkeypatch) -> None:
    """What stopping the HTTP-streaming webcam does: no more frames, so the connection ends (sooner here)."""
    from web import worker
    monkeypatch.setattr(worker, "HTTP_QUIET_S", 0.5)
    assert wait_until(lambda: app.workers[0].worker.counts()["live"] == 0, 30)
    monkeypatch.undo()


def test_record_twice_says_so_and_no_take_is_lost(app, monkeypatch):
    r = gr.Request(session_hash="rec")
    key = run(app.open_page(r))
    run(app.http_frame(ASTRONAUT, r))
    assert "Recording" in run(app.start_recording(r))
    run(app.http_frame(ASTRONAUT, r))
    assert "already running" in run(app.start_recording(r))  # the first take goes on
    frames_until(app, r, "stopped at the 0.6 s limit")
    assert "Recording" in run(app.start_recording(r))  # after the limit: a new take; the full one is kept
    for _ in range(3):
        run(app.http_frame(ASTRONAUT, r))
    stop_webcam(app, monkeypatch)  # the webcam stops, then starts again: a new connection and a third take
    run(app.http_frame(ASTRONAUT, r))
    assert "Recording" in run(app.start_recording(r))
    for _ in range(3):
        run(app.http_frame(ASTRONAUT, r))
    takes, status = run(app.stop_recording(key, r))
    videos = [t for t in takes if t.endswith(".mp4")]  # each followed by its motion template
    assert len(videos) == 3 and len(set(takes)) == 6 and all(decoded(t) >= 1 for t in videos), takes
    assert run(app.stop_recording(key, r))[1] == "Nothing recorded yet."  # handed out once


def test_a_failing_recorder_stops_only_the_recording(app, monkeypatch):
    from stream.recorder import Recorder
    r = gr.Request(session_hash="disk")
    run(app.http_frame(ASTRONAUT, r))
    run(app.start_recording(r))

    def full_disk(self, rgb, t=None, motion=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Recorder, "write", full_disk)
    pipeline = app.workers[0].worker.tabs["disk"].pipeline
    made = pipeline.metrics.frames_out
    for _ in range(4):
        run(app.http_frame(ASTRONAUT, r))
    assert pipeline.metrics.frames_out >= made + 3  # the live view goes on
    assert "the recording stopped: [Errno 28] No space left on device" in run(app.stats(r))


def test_a_failing_recording_close_still_frees_everything(app, monkeypatch, caplog):
    """The tab closes while its recording cannot be finalised (a full disk): the connection's engine session, its
    scheduler lane and the portrait editor's engine session are freed all the same, and the error is logged."""
    from stream.recorder import Recorder
    r = gr.Request(session_hash="close")
    run(app.open_page(r))
    run(app.http_frame(ASTRONAUT, r))
    run(app.start_recording(r))
    run(app.http_frame(ASTRONAUT, r))
    run(app.workers[0].call("set_editing", "close", True))
    assert run(app.workers[0].call("edited", "close")) is not None  # the Portrait editing tab: an engine session too
    t = app.workers[0].worker.tabs["close"]
    assert {t.pipeline.name, t.editor.name} <= set(app.workers[0].worker.engine.sessions)

    def broken(self):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(Recorder, "close", broken)
    run(app.close_page(r))  # returns once the tab is closed
    assert not app.workers[0].worker.engine.sessions and not app.workers[0].worker.counts()["lanes"], app.workers[0].worker.counts()
    assert any("Input/output error" in str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info)


def test_a_failing_close_does_not_refuse_the_new_connection(served, monkeypatch):
    """The webcam switches from HTTP streaming to WebRTC while the old connection's recording cannot be finalised:
    the new connection is answered and live, the old one's engine session is freed, and the page says what was
    lost."""
    from stream.recorder import Recorder
    app, url = served
    r = gr.Request(session_hash="switch")
    page = json.loads(run(app.open_page(r)))
    run(app.http_frame(ASTRONAUT, r))
    run(app.start_recording(r))
    run(app.http_frame(ASTRONAUT, r))
    old = app.workers[0].worker.tabs["switch"].pipeline.name

    def broken(self):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Recorder, "close", broken)
    answer = httpx.post(url + "offer", json={"sdp": valid_offer_sdp(), "type": "offer", **page}, timeout=60)
    assert answer.status_code == 200, answer.text
    t = app.workers[0].worker.tabs["switch"]
    assert t.conn.peer is not None and old not in app.workers[0].worker.engine.sessions
    assert "its recording is lost: [Errno 28] No space left on device" in run(app.stats(r))
    monkeypatch.undo()
    run(app.close_page(r))
    assert wait_until(lambda: idle(app)), app.workers[0].worker.counts()


def test_a_failing_flush_still_closes_the_recording_file(tmp_path):
    """The encoder's flush fails (a full disk): the container is closed all the same (no file descriptor is left
    open) and the file is no longer shielded from clean-up."""
    from stream import recorder
    path = tmp_path / "take.mp4"
    fds = len(os.listdir("/proc/self/fd"))
    rec = recorder.Recorder(path)
    rec.write(ASTRONAUT[:64, :64])
    real = rec._container

    class FullDisk:
        def mux(self, packets):
            raise OSError(28, "No space left on device")

        def close(self):
            real.close()
    rec._container = FullDisk()
    with pytest.raises(OSError, match="No space left"):
        rec.close()
    assert path not in recorder.recording_paths() and not rec.active
    assert len(os.listdir("/proc/self/fd")) == fds


# ---- bounds a shared link needs ----

def test_portrait_editors_are_bounded(tmp_path):
    """Each open Portrait editing tab holds an engine session: at most --max-sessions of them; past that, a clear
    message, and a closed tab's editor frees its place."""
    from web.app import LiveApp
    app = LiveApp(tiny(max_sessions=1, step_s=0.1), untrained=True, workdir=tmp_path)
    try:
        engine = app.workers[0].worker.engine
        w = lambda *args: run(app.workers[0].call(*args))
        before = len(engine.sessions)
        for tab in ("a", "b"):
            w("restore", tab, None, {}, True)  # the Portrait editing tab shown
        assert w("edited", "a") is not None
        with pytest.raises(RuntimeError, match="the server is editing 1 portrait already"):  # EditorsFull
            w("edited", "b")
        assert len(engine.sessions) == before + 1
        w("close_tab", "a")
        assert w("edited", "b") is not None and len(engine.sessions) == before + 1
        w("close_tab", "b")
    finally:
        app.close()


def test_a_take_waiting_for_its_page_survives_the_clean_up(app):
    """A finished take is not deleted by the quota or the age limit before its page has it; once handed over,
    the clean-up may."""
    r = gr.Request(session_hash="keep")
    key = run(app.open_page(r))
    run(app.http_frame(ASTRONAUT, r))
    run(app.start_recording(r))
    for _ in range(2):
        run(app.http_frame(ASTRONAUT, r))
    t = app.workers[0].worker.tabs["keep"]
    asyncio.run_coroutine_threadsafe(t.end(), app.workers[0].loop).result(30)  # Stop: its take waits in the tab
    (take,) = t.takes
    app.limits.work_quota_mb, app.limits.work_max_age_h = 1e-9, 1e-9  # every file is over both limits
    time.sleep(0.01)
    app.workers[0].worker.work.clean()
    assert take.exists()
    takes, status = run(app.stop_recording(key, r))
    assert [Path(p).name for p in takes] == [take.name, take.with_suffix(".pkl").name] and not take.exists()  # handed over: the page's copy


def test_a_replaced_connection_holds_its_slot_until_closed(tmp_path):
    """While a tab's ended connection is still closing (frames in flight, a recording being finalised), it still
    counts: another tab is told the server is full, and is admitted once the close is done."""
    from web.app import LiveApp
    app = LiveApp(tiny(max_sessions=1, step_s=0.1), untrained=True, workdir=tmp_path)
    try:
        a, b = gr.Request(session_hash="a"), gr.Request(session_hash="b")
        run(app.http_frame(ASTRONAUT, a))
        t = app.workers[0].worker.tabs["a"]
        pipeline, release = t.pipeline, threading.Event()
        real = pipeline.close
        pipeline.close = lambda: (release.wait(30), real())[1]
        ending = asyncio.run_coroutine_threadsafe(t.end(), app.workers[0].loop)
        assert wait_until(lambda: t.conn is None, 30)
        run(app.http_frame(ASTRONAUT, b))
        assert app.workers[0].worker.tabs["b"].pipeline is None and "the server is full" in run(app.stats(b))
        release.set()
        ending.result(30)
        run(app.http_frame(ASTRONAUT, b))
        assert app.workers[0].worker.tabs["b"].pipeline is not None
    finally:
        release.set()
        app.close()


class Slow(Local):
    """The in-process worker behind a slow link: a call of `held` waits in the front until `release` is set, as a
    call to a worker in another process may arrive late."""

    def __init__(self, config):
        super().__init__(config)
        self.held, self.entered, self.release = None, threading.Event(), threading.Event()

    async def call(self, method, *args, **kw):
        if method == self.held:
            self.entered.set()
            await asyncio.to_thread(self.release.wait, 30)
        return await super().call(method, *args, **kw)


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    """A front with two slow-link workers."""
    import dataclasses
    from web.app import LiveApp
    config = tiny(step_s=0.1)
    d = tmp_path_factory.mktemp("slow")
    workers = [Slow(dataclasses.replace(config, workdir=str(d / f"w{i}"))) for i in range(2)]
    app = LiveApp(config, untrained=True, workdir=d / "front", workers=workers)
    yield app
    app.close()


@pytest.mark.parametrize("held", ["load", "restore", "http_frame"])
def test_a_call_racing_the_unload_does_not_bring_the_tab_back(slow_pair, held, tmp_path):
    """A webcam frame that passed the front's closed-tab check, then the page closed while the front asked the
    workers where to place the tab (load), while the tab was being restored on its worker (restore), or before
    the frame reached the worker (http_frame): no worker holds the tab afterwards, nothing is made for it."""
    import concurrent.futures
    import PIL.Image
    app, session = slow_pair, f"racing-{held}"
    r = gr.Request(session_hash=session)
    run(app.open_page(r))
    PIL.Image.fromarray(ASTRONAUT).save(tmp_path / "portrait.png")
    run(app.set_portrait(str(tmp_path / "portrait.png"), r))  # its restore detects the face: it takes a while
    for w in app.workers:
        w.held, w.entered, w.release = held, threading.Event(), threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        frame = pool.submit(run, app.http_frame(ASTRONAUT, r))
        assert any(w.entered.wait(30) for w in app.workers)
        run(app.close_page(r))
        for w in app.workers:
            w.release.set()
        assert frame.result(60) is None  # TabClosed: the page is gone
    for w in app.workers:
        w.held = None
    assert session not in app.placed and session not in app.pages
    assert [w.worker.counts() for w in app.workers] == [dict.fromkeys(app.workers[0].worker.counts(), 0)] * 2


def test_pages_get_turn_credentials_minted_for_them(tmp_path):
    """With --turn-secret, each page load and each view page gets TURN credentials of its own that expire; the
    secret is in none of them, nor in the page's configuration."""
    import fastapi
    from web.app import LiveApp
    app = LiveApp(tiny(ice_servers=[{"urls": "turn:127.0.0.1:3478", "secret": "s3cret"}], step_s=0.1), untrained=True,
                  workdir=tmp_path)
    try:
        (ice,) = json.loads(run(app.open_page(gr.Request(session_hash="turn-tab"))))["ice"]
        assert set(ice) == {"urls", "username", "credential"} and int(ice["username"].split(":")[0]) > time.time()
        run(app.http_frame(ASTRONAUT, gr.Request(session_hash="turn-tab")))  # live: it has a worker to share from
        token = run(app.share("turn-tab"))
        view = asyncio.run(app.view_page(fastapi.Request({"type": "http", "path_params": {"token": token},
                                                          "query_string": b"", "headers": []}))).body.decode()
        assert '"username": "' in view and "s3cret" not in view
        assert "s3cret" not in json.dumps(app.blocks().config)
    finally:
        app.close()


# ---- clean-up survives faults ----

def test_reaping_outlives_a_failing_reap(app, monkeypatch):
    calls = []

    async def reap():
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("reap failed on purpose")
        return []
    monkeypatch.setattr(app, "reap", reap)
    app.limits.idle_timeout = 0.2  # the reaper wakes every 0.05 s

    async def run() -> None:
        task = asyncio.create_task(app._reap_forever())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(calls) >= 3:
                break
        task.cancel()
    asyncio.run(run())
    assert len(calls) >= 3


def test_a_failing_step_of_reap_leaves_the_others(app, monkeypatch):
    run(app.http_frame(ASTRONAUT, gr.Request(session_hash="gone-quiet")))  # live, then gone without an unload
    app.limits.idle_timeout = 0.2
    monkeypatch.setattr(app.workers[0].worker.work, "clean", lambda: (_ for _ in ()).throw(RuntimeError("clean failed")))
    time.sleep(0.4)
    assert run(app.reap()) == ["gone-quiet"] and "gone-quiet" not in app.workers[0].worker.tabs


def test_work_dir_usage_tolerates_a_file_deleted_meanwhile(app, monkeypatch):
    from pathlib import Path
    f = app.workers[0].worker.work.path / "render-vanishing.mp4"
    f.write_bytes(b"x" * 10)
    real = Path.stat

    def stat(self, *a, **k):
        if self == f and getattr(stat, "listed", False):
            raise FileNotFoundError(2, "gone", str(self))
        return real(self, *a, **k)
    real_files = app.workers[0].worker.work._files

    def files():
        out = real_files()
        stat.listed = True  # listed: then a failed render deletes it before usage() stats it
        return out
    monkeypatch.setattr(Path, "stat", stat)
    monkeypatch.setattr(app.workers[0].worker.work, "_files", files)
    assert app.workers[0].worker.work.usage() == 0 and app.workers[0].worker.work.reserve("recording") is not None


# ---- flags ----

def launch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env or {**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "argument --max-batch: 0 must be above 0"),
    (["--max-sessions", "0"], "argument --max-sessions: 0 must be above 0"),
    (["--idle-timeout", "0"], "argument --idle-timeout: 0 must be above 0"),
    (["--max-renders", "-1"], "argument --max-renders: -1 must be above 0"),
    (["--max-viewers", "0"], "argument --max-viewers: 0 must be above 0"),
    (["--max-viewers", "two"], "argument --max-viewers: 'two' is not an integer"),
    (["--port", "99999"], "argument --port: '99999' is not a port number"),
    (["--ice-servers", "stun.l.google.com:19302"], "bad ICE server URL 'stun.l.google.com:19302'"),
    (["--ice-servers", "https://x"], "bad ICE server URL 'https://x'"),
    (["--codec", "av1"], "argument --codec: invalid choice: 'av1'"),
    (["--stream-max", "0"], "argument --stream-max: 0 must be above 0"),
    (["--workers", "0"], "argument --workers: 0 must be above 0"),
    (["--drain-timeout", "-1"], "argument --drain-timeout: -1 must be 0 or more seconds"),
    (["--drain-timeout", "soon"], "argument --drain-timeout: 'soon' is not a number of seconds"),
    (["--drain", "worker-1", "--drain-timeout", "60"], "--drain WORKER needs --ray ADDRESS"),
    (["--ray", "auto", "--drain", "worker-1"], "and --drain-timeout SECONDS (how long its live sessions may go on)"),
    (["--ray", "127.0.0.1:1"], "--ray 127.0.0.1:1: no Ray cluster answers there"),
    (["--ray", "127.0.0.1:1", "--drain", "worker-1", "--drain-timeout", "9"], "--ray 127.0.0.1:1: no Ray cluster"),
])
def test_bad_flags_exit_2_with_one_line(args, message):
    proc = launch(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_options_before_or_after_the_sub_command_mean_the_same(monkeypatch):
    import launch as entry
    from stream import render
    seen = []
    monkeypatch.setattr(render, "run", lambda args: seen.append((args.device, args.weights, args.no_download)))
    tail = ["--source", "a.png", "--driving", "b.mp4", "-o", "c.mp4"]
    entry.main(["--device", "cpu", "--weights", "recipe", "--no-download", "render", *tail])
    entry.main(["render", "--device", "cpu", "--weights", "recipe", "--no-download", *tail])
    entry.main(["render", *tail])
    assert seen == [("cpu", "recipe", True), ("cpu", "recipe", True), (None, None, False)]


# ---- what a CPU user is told ----

def test_the_page_states_the_expected_time_per_frame(tmp_path):
    from web.app import LiveApp
    slow = LiveApp(tiny(step_s=8.4), untrained=True, workdir=tmp_path)
    try:
        note = slow.speed_note()
        assert "about one frame every 8 s" in note and "CUDA GPU" in note and "Video file" in note
        shown = [str(c.get("props", {}).get("value", "")) for c in slow.blocks().config["components"]]
        assert any(note in v for v in shown)  # on the page, before anyone starts
    finally:
        slow.close()
    fast = LiveApp(tiny(step_s=0.02), untrained=True, workdir=tmp_path)
    assert fast.speed_note() == "Measured at start-up: 20 ms per frame for one live session."
    fast.close()
    measured = LiveApp(tiny(), untrained=True, workdir=tmp_path)  # one engine call at start-up
    assert measured.info["step_s"] > 0
    measured.close()


def test_renders_wait_in_a_bounded_queue(tmp_path, loopback_only):
    """--max-renders at once; the others wait in Gradio's queue, which tells each its position. Four users render
    at once on a server with --max-renders 2 (each render held until the test lets it go): two run, two wait in
    the queue with a rank, and each gets its answer once the ones before it are done."""
    from gradio_client import Client, handle_file
    from gradio_client.utils import Status
    import threading
    from web.app import LiveApp
    app = LiveApp(tiny(step_s=0.1), untrained=True, workdir=tmp_path, max_renders=2)
    running, most, release, lock = [0], [0], threading.Event(), threading.Lock()

    async def render(tab: str, driving: tuple, *options):  # the worker's render, held until released
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        await asyncio.to_thread(release.wait, 60)
        with lock:
            running[0] -= 1
        return None, f"rendered for {tab}"
    app.workers[0].worker.render = render
    port = free_port()
    demo = app.launch(port=port, block=False)
    video = tmp_path / "driving.mp4"
    video.write_bytes(b"\0" * 1000)  # never decoded: the render is the test's
    try:
        jobs = [Client(f"http://127.0.0.1:{port}/", verbose=False).submit(handle_file(str(video)), None, False,
                                                                           False, api_name="/render_video")
                for _ in range(4)]
        queued = lambda: [j.status() for j in jobs if j.status().code == Status.IN_QUEUE]
        assert wait_until(lambda: running[0] == 2 and len(queued()) == 2, 60), (running, [j.status() for j in jobs])
        assert sorted(s.rank for s in queued()) == [0, 1], queued()
        release.set()
        results = [j.result(timeout=60) for j in jobs]
        assert all(r[3].startswith("rendered for ") for r in results) and len({r[3] for r in results}) == 4
        assert most[0] == 2
    finally:
        release.set()
        demo.close()
        app.close()
