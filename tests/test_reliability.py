"""Reliability and security of the live server under load, with real WebRTC over loopback: aiortc clients that
do what the page does (web/loadtest.py), malformed offers, abrupt drops, vanished tabs, SIGTERM while recording,
/offer behind the login. CI runs the short version; LP_SOAK=1 runs the counts recorded in docs/reliability.md
(LP_LOAD_CLIENTS / LP_LOAD_SECONDS / LP_FUZZ_CASES / LP_DROP_CYCLES override each)."""
import asyncio
import json
import os
import random
import signal
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
from gradio_client import Client, handle_file

from conftest import ROOT, run, tiny
from stream.serve_bench import moving_face
from web import loadtest
from web.guard import MAX_OFFER_BYTES

SOAK = os.environ.get("LP_SOAK") == "1"
CLIENTS = int(os.environ.get("LP_LOAD_CLIENTS", 2))
SECONDS = float(os.environ.get("LP_LOAD_SECONDS", 30))
FUZZ = int(os.environ.get("LP_FUZZ_CASES", 240 if SOAK else 50))
DROPS = int(os.environ.get("LP_DROP_CYCLES", 100 if SOAK else 10))
POOLS = ("AnyIO worker thread", "asyncio_", "ThreadPoolExecutor")  # bounded pools that stay once started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float = 60) -> bool:
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.2)
    return bool(condition())


def own_threads() -> list[str]:
    """This process's Python threads that are not pool workers (those are bounded and stay once started)."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith(POOLS))


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def back_to(threads: list[str], files: int) -> bool:
    """No thread that was not there before, and no more open file descriptors."""
    return set(own_threads()) <= set(threads) and fds() <= files


@pytest.fixture(scope="module")
def served(tmp_path_factory, loopback_only):
    """The app on a loopback port, ICE on 127.0.0.1 only, with the short limits the tests need."""
    from web.app import LiveApp
    from web.limits import Limits

    loadtest.loopback_ice()
    app = LiveApp(tiny(limits=Limits(render_max_mb=1)), untrained=True, workdir=tmp_path_factory.mktemp("work"))
    port = free_port()
    demo = app.launch(port=port, block=False)
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()
    app.close()


def idle(app) -> dict:
    """What must be back to nothing once every client left (empty dict: all clear)."""
    left = dict(pages=list(app.pages), **app.workers[0].worker.counts(), sessions=list(app.workers[0].worker.engine.sessions))
    return {k: v for k, v in left.items() if v}


class LiveTab:
    """A tab streaming over WebRTC in a background thread (its own event loop), counting the frames it gets."""

    def __init__(self, url: str):
        self.url, self.frames, self.session, self.page, self.error = url, 0, None, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._run(),), name="test-live-tab")
        self._thread.start()
        assert wait_until(lambda: self.frames >= 2 or self.error, 120), "the live tab got no frames"
        assert self.error is None, self.error

    async def _run(self) -> None:
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as http:
            tab = loadtest.Tab(http)
            pc, received = loadtest.new_peer(moving_face(), 10)
            try:
                self.page = await tab.open()
                self.session = tab.session
                await loadtest.offer(http, pc, self.page)
                track = await asyncio.wait_for(received, 30)
                for _ in range(100_000):  # bounded; ends at stop
                    if self._stop.is_set():
                        break
                    try:
                        await asyncio.wait_for(track.recv(), 1.0)
                        self.frames += 1
                    except asyncio.TimeoutError:
                        continue
            except Exception as e:
                self.error = f"{type(e).__name__}: {e}"
            finally:
                await pc.close()
                await tab.close()

    def still_streaming(self, timeout: float = 60) -> bool:
        seen = self.frames
        return wait_until(lambda: self.frames > seen, timeout) and self.error is None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)


def test_load(served):
    """N real clients for T seconds: every one connects, receives animated frames throughout and leaves nothing."""
    app, url = served
    asyncio.run(loadtest.load(url, 1, 5, pid=os.getpid()))  # warm-up: the pools start their threads
    assert wait_until(lambda: not idle(app))
    threads, files = own_threads(), fds()
    report = asyncio.run(loadtest.load(url, CLIENTS, SECONDS, pid=os.getpid()))
    print(loadtest.table(report))
    for r in report["results"]:
        assert r["failures"] == [] and r["frames"] >= 2 and r["size"] == (512, 512), r
    assert wait_until(lambda: not idle(app)), idle(app)
    assert wait_until(lambda: back_to(threads, files)), (own_threads(), threads, fds(), files)


def valid_offer_sdp(kinds=("video",), direction="sendrecv") -> str:
    async def make() -> str:
        from aiortc import RTCPeerConnection, VideoStreamTrack
        from aiortc.mediastreams import AudioStreamTrack
        pc = RTCPeerConnection()
        for kind in kinds:
            pc.addTransceiver(VideoStreamTrack() if kind == "video" else AudioStreamTrack(), direction=direction)
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        return sdp
    return asyncio.run(make())


def malformed_offers(n: int, page: dict, seed: int = 0) -> list[tuple[str, bytes, dict]]:
    """`n` requests /offer must refuse with a 4xx: (what, body, headers), half with the live tab's id and secret
    (the others with a wrong id), so that each reaches the check it is meant for."""
    live, secret = page["session"], page["secret"]
    rng = random.Random(seed)
    good = valid_offer_sdp()
    lines = good.strip().splitlines()
    pwd = next(i for i, line in enumerate(lines) if line.startswith("a=ice-pwd"))
    broken_sdp = {
        "no video (audio only)": valid_offer_sdp(("audio",)),
        "video the browser does not send (recvonly)": valid_offer_sdp(direction="recvonly"),
        "no ICE credentials": "\r\n".join(x for x in lines if not x.startswith("a=ice-")) + "\r\n",
        "no DTLS fingerprint": "\r\n".join(x for x in lines if not x.startswith("a=fingerprint")) + "\r\n",
        "no RTCP mux": "\r\n".join(x for x in lines if x != "a=rtcp-mux") + "\r\n",
        "no codec we decode": good.replace("VP8/90000", "XYZ/90000").replace("H264/90000", "XYZ/90000"),
        "too many media sections": good + "".join(good[good.index("m=video"):] for _ in range(9)),
        "no m-line": "\r\n".join(x for x in lines if not x.startswith("m=")) + "\r\n",
        "not SDP": "hello, this is not a session description",
        "empty SDP": "",
    }
    for k in rng.sample(range(1, pwd), min(6, pwd - 1)):  # cut before the ICE password: never valid
        broken_sdp[f"truncated at line {k}"] = "\r\n".join(lines[:k]) + "\r\n"
    for k in range(4):
        junk = lines[:]
        junk.insert(rng.randrange(1, pwd), "".join(chr(rng.randrange(32, 0x2fff)) for _ in range(40)))
        broken_sdp[f"junk line {k}"] = "\r\n".join(junk[:pwd]) + "\r\n"
    shapes = {
        "random bytes": lambda s: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 2000))),
        "bad JSON": lambda s: b'{"sdp": "v=0", "type": "offer", "session": ',
        "not UTF-8": lambda s: b'{"sdp": "\xff\xfe", "type": "offer", "session": "' + s.encode() + b'", "secret": "' + secret.encode() + b'"}',
        "nested JSON": lambda s: b"[" * 20_000 + b"]" * 20_000,
        "JSON list": lambda s: json.dumps([good, "offer", s]).encode(),
        "JSON string": lambda s: json.dumps(good).encode(),
        "sdp is a number": lambda s: json.dumps({"sdp": 5, "type": "offer", "session": s, "secret": secret}).encode(),
        "sdp is a list": lambda s: json.dumps({"sdp": lines, "type": "offer", "session": s, "secret": secret}).encode(),
        "session is a number": lambda s: json.dumps({"sdp": good, "type": "offer", "session": 7, "secret": secret}).encode(),
        "secret missing": lambda s: json.dumps({"sdp": good, "type": "offer", "session": s}).encode(),
        "session missing": lambda s: json.dumps({"sdp": good, "type": "offer", "secret": secret}).encode(),
        "session too long": lambda s: json.dumps({"sdp": good, "type": "offer", "session": "x" * 500, "secret": secret}).encode(),
        "type answer": lambda s: json.dumps({"sdp": good, "type": "answer", "session": s, "secret": secret}).encode(),
        "type missing": lambda s: json.dumps({"sdp": good, "session": s, "secret": secret}).encode(),
        "huge body": lambda s: json.dumps({"sdp": good + "a=x:" + "y" * MAX_OFFER_BYTES, "type": "offer",
                                           "session": s, "secret": secret}).encode(),
    }
    for what, sdp in broken_sdp.items():
        shapes[f"SDP: {what}"] = lambda s, sdp=sdp: json.dumps({"sdp": sdp, "type": "offer", "session": s, "secret": secret}).encode()
    json_type = {"content-type": "application/json"}
    headers = {"cross-origin": {**json_type, "origin": "http://evil.example"},
               "text/plain": {"content-type": "text/plain"}, "no content type": {},
               "form": {"content-type": "application/x-www-form-urlencoded"}}
    cases = []
    for i in range(n):
        session = live if i % 2 == 0 else rng.choice(["nobody", "", live[::-1]])
        if i % 10 == 9:  # a valid offer, refused for its headers
            name = rng.choice(list(headers))
            cases.append((f"valid offer, {name}", json.dumps({"sdp": good, "type": "offer", "session": session,
                                                               "secret": secret}).encode(), headers[name]))
        else:
            name = list(shapes)[(i // 2) % len(shapes)]
            cases.append((name, shapes[name](session), json_type))
    wrong_secrets = {  # each with the live tab's id and a valid SDP: only the secret is wrong
        "non-ASCII": secret[:-1] + "é", "all non-ASCII": "ü" * len(secret), "emoji": "🔑" * 8,
        "lone surrogate": secret[:-1] + "\ud800", "NUL": secret[:-1] + "\x00", "a prefix": secret[:-1],
        "one character more": secret + "A", "random text": "".join(chr(rng.randrange(32, 0x2fff)) for _ in range(32)),
        "too long": "x" * 5000, "a number": 42, "null": None, "a list": [secret], "an object": {"secret": secret},
        "true": True,
    }
    for what, wrong in wrong_secrets.items():
        cases.append((f"secret: {what}", json.dumps({"sdp": good, "type": "offer", "session": live,
                                                     "secret": wrong}).encode(), json_type))
    return cases


def test_malformed_offers_get_4xx_and_the_live_tab_streams_on(served):
    app, url = served
    live = LiveTab(url)
    try:
        pipeline = app.workers[0].worker.tabs[live.session].pipeline
        statuses: dict[str, set[int]] = {}
        for what, body, headers in malformed_offers(FUZZ, live.page):
            r = httpx.post(url + "offer", content=body, headers=headers, timeout=60)
            statuses.setdefault(what, set()).add(r.status_code)
            assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        print(json.dumps({k: sorted(v) for k, v in statuses.items()}, indent=1))
        assert app.workers[0].worker.tabs[live.session].pipeline is pipeline and not pipeline.closed  # untouched
        assert app.workers[0].worker.counts()["peers"] == 1 and list(app.workers[0].worker.engine.sessions) == [pipeline.name]  # nothing leaked
        assert live.still_streaming()
    finally:
        live.close()
    assert wait_until(lambda: not idle(app)), idle(app)


def test_uploads_while_live(served, tmp_path):
    """Corrupt, fake and oversized uploads from another tab while one streams: refused, and it streams on."""
    app, url = served
    live = LiveTab(url)
    try:
        (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
        (tmp_path / "notes.png").write_text("not a photo\n" * 50)
        with open(tmp_path / "huge.mp4", "wb") as f:
            f.truncate(25 * 2**20)  # over this server's upload limit: max(20 MB for portraits, --render-max-mb 1)
        other = Client(url, verbose=False)
        for name, message in [("corrupt.png", "corrupt"), ("notes.png", "not an image")]:
            assert message in other.predict(handle_file(str(tmp_path / name)), api_name="/set_portrait")[1]
        with pytest.raises(Exception, match="maximum file size"):
            other.predict(handle_file(str(tmp_path / "huge.mp4")), api_name="/set_portrait")
        assert live.still_streaming()
    finally:
        live.close()
    assert wait_until(lambda: not idle(app)), idle(app)


async def drop(url: str, mode: str, cycle: int) -> None:
    """One tab that goes away abruptly: its heartbeat and its peer die without a goodbye."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        tab = loadtest.Tab(http)
        pc, received = loadtest.new_peer(moving_face(4), 10)
        try:
            page = await tab.open()
            if mode == "mid-handshake":  # the offer is out, the answer never applied
                await pc.setLocalDescription(await pc.createOffer())
                await http.post("offer", json={"sdp": pc.localDescription.sdp, "type": "offer", **page})
                return
            await loadtest.offer(http, pc, page)
            track = await asyncio.wait_for(received, 30)
            await asyncio.wait_for(track.recv(), 60)
            if mode == "mid-recording":
                assert "Recording" in (await tab.call("start_recording"))[0]
                for _ in range(2):
                    await asyncio.wait_for(track.recv(), 60)
        finally:
            await tab.close()  # the heartbeat connection is cut first, as when a browser dies
            await pc.close()


def test_abrupt_drops_leave_nothing_behind(served):
    app, url = served
    threads, files = own_threads(), fds()
    modes = ("mid-handshake", "mid-stream", "mid-recording")
    for cycle in range(DROPS):
        asyncio.run(drop(url, modes[cycle % 3], cycle))
    assert wait_until(lambda: not idle(app), 120), idle(app)
    assert wait_until(lambda: back_to(threads, files)), (own_threads(), threads, fds(), files)
    recordings = sorted(app.dir.glob("recording-*.mp4"))
    assert len(recordings) >= DROPS // 3 - 1  # each mid-recording drop finalised its file (at most one had no frame)
    for path in recordings:
        with av.open(str(path)) as c:
            assert sum(1 for _ in c.decode(video=0)) >= 1
    assert httpx.get(url + f"gradio_api/file={recordings[0]}").status_code == 403  # never served by its path


def test_offer_needs_the_login_the_page_secret_and_the_same_user(tmp_path, loopback_only):
    """With --auth, /offer is behind Gradio's login like the page: 401 without it, nothing created. An offer is
    bound to the secret its page got at load and to the user who loaded it: another tab's session hash alone, or
    another user's offer, gets a 403 and the tab streams on. /healthz tells a stranger only ready/full."""
    from web.app import LiveApp

    loadtest.loopback_ice()
    app = LiveApp(tiny(), untrained=True, workdir=tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    demo = app.launch(port=port, auth=[("ada", "lovelace"), ("bob", "builder")], block=False)
    try:
        sdp = valid_offer_sdp()
        r = httpx.post(url + "offer", json={"sdp": sdp, "type": "offer", "session": "tab", "secret": "s"})
        assert r.status_code == 401 and app.workers[0].worker.counts()["live"] == 0
        assert httpx.post(url + "offer", json={"sdp": sdp, "type": "offer", "session": "tab", "secret": "s"},
                          cookies={"access-token-unsecure-x": "guess"}).status_code == 401
        stranger = httpx.get(url + "healthz")
        assert stranger.status_code == 200 and stranger.json() == {"ready": True, "full": False}

        async def logged_in() -> dict:
            async with httpx.AsyncClient(base_url=url, timeout=30) as ada, \
                    httpx.AsyncClient(base_url=url, timeout=30) as bob:
                for http, user, password in ((ada, "ada", "lovelace"), (bob, "bob", "builder")):
                    assert (await http.post("login", data={"username": user, "password": password})).status_code == 200
                report = await loadtest.run_client(0, ada, 6, moving_face(4), 10)
                assert report.failures == [] and report.frames >= 1, report
                health = (await ada.get("healthz")).json()
                tab = loadtest.Tab(ada)
                page = await tab.open()
                offer = {"sdp": sdp, "type": "offer", **page}
                codes = dict(
                    https=(await ada.post("offer", json=offer, headers={"origin": f"https://127.0.0.1:{port}"})),
                    evil=(await ada.post("offer", json=offer, headers={"origin": "https://evil.example"})),
                    no_secret=(await ada.post("offer", json={**offer, "secret": "guessed"})),
                    other_user=(await bob.post("offer", json=offer)))
                await tab.close()
                return dict({k: r.status_code for k, r in codes.items()}, health=health)
        got = asyncio.run(logged_in())
        assert got["https"] == 200 and got["evil"] == 403  # an HTTPS page on this host passes, another site does not
        assert got["no_secret"] == 403 and got["other_user"] == 403
        assert {"live_sessions", "capacity", "workers"} <= set(got["health"])  # logged in
        assert {"device", "engine_step_p50_ms", "alive"} <= set(got["health"]["workers"][0])
    finally:
        demo.close()
        app.close()


def test_sigterm_during_a_recording_leaves_a_playable_file(tmp_path, loopback_only):
    loadtest.loopback_ice()  # this side's ICE (run alone, no fixture has set it)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "web.loadtest", "serve", "--weights", "recipe", "--config",
                               "tiny", "--port", str(port), "--work-dir", str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert wait_until(lambda: _up(port), 180)

        async def record() -> None:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                tab = loadtest.Tab(http)
                pc, received = loadtest.new_peer(moving_face(4), 10)
                await loadtest.offer(http, pc, await tab.open())
                track = await asyncio.wait_for(received, 60)
                await asyncio.wait_for(track.recv(), 60)
                assert "Recording" in (await tab.call("start_recording"))[0]
                for _ in range(3):
                    await asyncio.wait_for(track.recv(), 60)
                server.send_signal(signal.SIGTERM)  # mid-recording, the tab still streaming
                server.wait(60)
                await pc.close()
                await tab.close()
        asyncio.run(record())
        assert server.returncode == 0
    finally:
        server.kill()
    files = list(tmp_path.glob("recording-*.mp4"))
    assert len(files) == 1
    with av.open(str(files[0])) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 3


def test_sigterm_with_a_drain_timeout_waits_for_the_live_session(tmp_path, loopback_only):
    """SIGTERM with --drain-timeout: the server admits no new session (and /healthz says not ready), serves the live
    one on, and exits once it has ended."""
    loadtest.loopback_ice()  # this side's ICE (run alone, no fixture has set it)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "web.loadtest", "serve", "--weights", "recipe", "--config",
                               "tiny", "--port", str(port), "--work-dir", str(tmp_path), "--drain-timeout", "300"],
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert wait_until(lambda: _up(port), 180)

        async def drain() -> dict:
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                tab, late = loadtest.Tab(http), loadtest.Tab(http)
                pc, received = loadtest.new_peer(moving_face(4), 10)
                await loadtest.offer(http, pc, await tab.open())
                track = await asyncio.wait_for(received, 60)
                await asyncio.wait_for(track.recv(), 60)
                page = await late.open()
                server.send_signal(signal.SIGTERM)
                for _ in range(300):  # until the drain has begun
                    if (health := await http.get("healthz")).status_code == 503:
                        break
                    await asyncio.sleep(0.1)
                other, _ = loadtest.new_peer(moving_face(4), 10)
                await other.setLocalDescription(await other.createOffer())
                refused = await http.post("offer", json={"sdp": other.localDescription.sdp, "type": "offer", **page})
                await other.close()
                frames = [await asyncio.wait_for(track.recv(), 60) for _ in range(3)]  # the live one streams on
                running = server.poll() is None
                await pc.close()
                await tab.close()  # its session ends: the server exits
                await asyncio.to_thread(server.wait, 120)
                return dict(health=health.json(), refused=(refused.status_code, refused.json()),
                            frames=len(frames), running=running)
        got = asyncio.run(drain())
        assert got["health"]["ready"] is False and got["running"] and got["frames"] == 3, got
        assert got["refused"] == (503, {"error": "this server is being drained for a restart; try again shortly"})
        assert server.returncode == 0
    finally:
        server.kill()


def _up(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


# ---- bounded state, without a server ----

@pytest.fixture
def app(tmp_path):
    from web.app import LiveApp
    from web.limits import Limits
    return LiveApp(tiny(limits=Limits(idle_timeout=0.5, record_max_s=0.6, render_max_s=0.2, render_max_mb=0.01)),
                   untrained=True, workdir=tmp_path)


def test_vanished_tabs_are_reaped_and_markers_expire(app):
    import skimage.data
    frame = skimage.data.astronaut()
    quiet, streaming = gr.Request(session_hash="quiet"), gr.Request(session_hash="streaming")
    for r in (quiet, streaming):
        run(app.http_frame(frame, r))  # both go live over HTTP streaming; then `quiet` vanishes without an unload
    name = app.workers[0].worker.tabs["quiet"].pipeline.name
    run(app.close_page(gr.Request(session_hash="closed")))
    for _ in range(5):  # `streaming` keeps sending frames (the pipeline's arrivals keep it alive)
        time.sleep(0.2)
        app.workers[0].worker.tabs["streaming"].pipeline.submit(frame)
    assert run(app.reap()) == ["quiet"]
    assert list(app.workers[0].worker.tabs) == ["streaming"] and name not in app.workers[0].worker.engine.sessions and "closed" not in app.closed
    run(app.http_frame(frame, quiet))  # the reaped tab comes back: it starts afresh
    assert app.workers[0].worker.tabs["quiet"].pipeline.name != name
    app.close()


def test_a_page_no_worker_holds_is_reaped_by_the_front(app):
    """A page that never went live is held by no worker: the front reaps it once it has not been called for the idle
    timeout; one whose metrics line is polled stays."""
    idle, polled = gr.Request(session_hash="idle"), gr.Request(session_hash="polled")
    for r in (idle, polled):
        run(app.open_page(r))
    for _ in range(5):  # `polled`'s page asks for its metrics line, as an open page does every second
        time.sleep(0.2)
        assert "not connected" in run(app.stats(polled))
    assert run(app.reap()) == ["idle"]
    assert list(app.pages) == ["polled"] and not app.placed and not app.workers[0].worker.tabs
    app.close()


def test_a_worker_slow_to_answer_the_reap_does_not_age_a_polled_page(tmp_path):
    """The front measures a page's quiet time from when its reap starts: a worker slow to answer the reap (a call to
    another process may arrive late) must not make the front drop a page polled just before."""
    import dataclasses

    from test_integrity import Slow
    from web.app import LiveApp
    from web.limits import Limits
    config = tiny(limits=Limits(idle_timeout=0.5))
    slow = Slow(dataclasses.replace(config, workdir=str(tmp_path / "worker")))
    app = LiveApp(config, untrained=True, workdir=tmp_path / "front", workers=[slow])
    polled = gr.Request(session_hash="polled")
    run(app.open_page(polled))
    slow.held = "reap"
    threading.Timer(1.0, slow.release.set).start()  # the worker answers the reap twice the idle timeout late
    try:
        assert "not connected" in run(app.stats(polled))
        assert run(app.reap()) == [] and list(app.pages) == ["polled"]
    finally:
        app.close()


def test_recording_stops_at_its_limit_and_the_page_says_so(app):
    import skimage.data
    r = gr.Request(session_hash="rec")
    key = run(app.open_page(r))
    frame = skimage.data.astronaut()
    run(app.http_frame(frame, r))
    assert "at most 0.6 s" in run(app.start_recording(r))
    end = time.monotonic() + 60
    while "stopped at the 0.6 s limit" not in run(app.stats(r)) and time.monotonic() < end:
        run(app.http_frame(frame, r))
    assert "stopped at the 0.6 s limit" in run(app.stats(r))
    (path, _), status = run(app.stop_recording(key, r))  # the take and its motion template
    with av.open(path) as c:
        n = sum(1 for _ in c.decode(video=0))
        assert n >= 1 and float(c.duration / av.time_base) <= 0.6 + 0.1
    app.close()


def test_render_limits(app, tmp_path):
    from test_render import driving_video
    driving_video(tmp_path / "short.mp4", frames=4)
    r = gr.Request(session_hash="render")
    video = str(tmp_path / "short.mp4")
    assert "this server renders at most 0.01 MB" in run(app.render_video(video, None, False, False, r))[3]
    app.limits.render_max_mb = 10
    out, _, _, status = run(app.render_video(video, None, False, False, r))
    assert out is None and "longer than 0.2 s" in status
    assert not list(app.dir.glob("render-*"))  # nothing half-written left behind


def test_work_directory_quota_age_and_names(app):
    work = app.workers[0].worker.work
    old, big, new = (work.path / f"recording-{n}.mp4" for n in ("old", "big", "new"))
    for f, size in ((old, 10), (big, 3 * 2**20), (new, 10)):
        f.write_bytes(b"x" * size)
    os.utime(old, (time.time() - 48 * 3600,) * 2)
    os.utime(big, (time.time() - 3600,) * 2)
    app.limits.work_quota_mb = 1
    path = work.reserve("recording")
    assert not old.exists() and not big.exists() and new.exists()  # past the age limit; the oldest over quota
    assert path.parent == work.path and len(path.stem.rsplit("-", 1)[1]) == 32  # 128 random bits in the name
    assert work.reserve("recording") != path


def test_the_work_directory_outlives_a_run_and_its_limits_cover_earlier_runs(tmp_path, monkeypatch):
    """By default recordings and renders go to one directory under the user's cache, the same for every run, so the
    quota and the age limit also cover the files every earlier run left there (cleaned at start, then every 30 s)."""
    from web.app import LiveApp
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = LiveApp(tiny(step_s=0.1), untrained=True)
    old, recent = first.dir / "recording-old.mp4", first.dir / "render-recent.mp4"
    for f in (old, recent):
        f.write_bytes(b"x" * 10)
    os.utime(old, (time.time() - 48 * 3600,) * 2)
    first.close()
    second = LiveApp(tiny(step_s=0.1), untrained=True)
    try:
        assert second.dir == first.dir == tmp_path / "liveportrait-live" / "work"
        assert not old.exists() and recent.exists()  # the first run's file past --work-max-age-h went at start
    finally:
        second.close()


def test_nothing_not_yet_downloaded_is_removed(app):
    """A finished take the page has not been given yet stays, past the age limit and over the quota alike; once
    handed out (the page downloads Gradio's copy) or once its tab has gone, the limits apply to it."""
    import skimage.data
    r = gr.Request(session_hash="takes")
    key = run(app.open_page(r))
    run(app.http_frame(skimage.data.astronaut(), r))  # live: its worker holds it
    earlier, take = app.dir / "recording-earlier.mp4", app.dir / "recording-take.mp4"
    for f, size in ((earlier, 2 * 2**20), (take, 1000)):
        f.write_bytes(b"x" * size)
        os.utime(f, (time.time() - 48 * 3600,) * 2)
    app.workers[0].worker.tabs[r.session_hash].takes.append(take)  # stopped at --record-max-s, say: not handed out yet
    app.limits.work_quota_mb = 1
    assert app.workers[0].worker.work.reserve("recording") is not None
    assert not earlier.exists() and take.exists()
    (copy,), status = run(app.stop_recording(key, r))
    app.workers[0].worker.work.clean()
    assert not take.exists() and Path(copy).read_bytes() == b"x" * 1000  # the page's copy is Gradio's
    app.limits.work_quota_mb = 0.0001  # a take fills the quota: it stays, and the next recording waits
    app.workers[0].worker.tabs[r.session_hash].takes.append(take)
    take.write_bytes(b"x" * 1000)
    assert app.workers[0].worker.work.reserve("recording") is None and take.exists()
    run(app.close_page(r))  # its tab has gone: nobody can be given it any more
    assert app.workers[0].worker.work.reserve("recording") is not None and not take.exists()


def test_a_work_directory_anywhere_hands_its_files_to_the_page(tmp_path, monkeypatch, loopback_only):
    """--work-dir may be outside the temp and working directories, the only places Gradio copies a file from: the
    page still gets its recording (Gradio's copy), and the work directory itself is still not served."""
    import tempfile
    import skimage.data
    from web.app import LiveApp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # what Gradio takes for the system temp dir
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    (tmp_path / "tmp").mkdir()
    app = LiveApp(tiny(step_s=0.1), untrained=True, workdir=tmp_path / "work")
    port = free_port()
    demo = app.launch(port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    take = app.dir / "recording-take.mp4"
    take.write_bytes(b"an mp4")

    async def stop_recording() -> list:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            tab = loadtest.Tab(http)
            try:
                page = await tab.open()
                await app.http_frame(skimage.data.astronaut(), gr.Request(session_hash=page["session"]))  # live
                app.workers[0].worker.tabs[page["session"]].takes.append(take)
                return await tab.call("stop_recording", [json.dumps(page)])
            finally:
                await tab.close()
    try:
        (files, status) = asyncio.run(stop_recording())
        assert status == "Saved recording-take.mp4."
        assert httpx.get(files[0]["url"]).content == b"an mp4"
        assert httpx.get(url + f"gradio_api/file={take}").status_code == 403
    finally:
        demo.close()
        app.close()
