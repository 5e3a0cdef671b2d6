"""End to end in a real browser: headless Chromium with a fake webcam (a .y4m of the astronaut) opens the page,
starts WebRTC over loopback and receives the engine's animated frames; then the tab goes away mid-recording.

Needs Debian's Chromium (/usr/bin/chromium); skipped without it unless LP_REQUIRE_BROWSER=1."""
import json
import os
import shutil
import socket
import threading
import time

import av
import cv2
import gradio as gr
import numpy as np
import pytest
import skimage.data

from conftest import ROOT, run, tiny

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    if os.environ.get("LP_REQUIRE_BROWSER") == "1":
        pytest.fail("LP_REQUIRE_BROWSER=1 but Chromium is not installed (apt-get install chromium)", pytrace=False)
    pytest.skip("Chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

W, H, N = 640, 480, 20
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection"]
GRAB = """([w, h]) => {  // the frame the <video> shows now, scaled to w×h RGB
    const video = document.querySelector('#lp-live video');
    const canvas = Object.assign(document.createElement('canvas'), {width: w, height: h});
    const ctx = canvas.getContext('2d');
    ctx.drawImage(video, 0, 0, w, h);
    return Array.from(ctx.getImageData(0, 0, w, h).data);
}"""


def webcam_frames() -> list[np.ndarray]:
    """The astronaut on a 640×480 canvas, nodding and swaying a little (one loop of the fake camera)."""
    face = cv2.resize(skimage.data.astronaut(), (H, H))
    out = []
    for i in range(N):
        m = cv2.getRotationMatrix2D((H / 2, H / 2), 4 * np.sin(2 * np.pi * i / N), 1.0)
        m[0, 2] += (W - H) / 2 + 6 * np.sin(2 * np.pi * i / N)
        out.append(cv2.warpAffine(face, m, (W, H), borderMode=cv2.BORDER_REPLICATE))
    return out


def write_y4m(path, frames: list[np.ndarray]) -> None:
    """YUV4MPEG2: a text header, then per frame "FRAME\\n" and the Y, U, V planes (4:2:0)."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{W} H{H} F30:1 Ip A1:1 C420jpeg\n".encode())
        for rgb in frames:
            f.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, loopback_only):
    import aioice.ice
    from web.app import LiveApp

    with pytest.MonkeyPatch.context() as mp:
        # ICE over loopback only: aioice normally skips 127.0.0.1 (and no STUN server is configured)
        mp.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
        app = LiveApp(tiny(), untrained=True, workdir=tmp_path_factory.mktemp("live"))
        port = free_port()
        demo = app.launch(port=port, block=False)
        yield app, f"http://127.0.0.1:{port}/"
        demo.close()
        app.close()


@pytest.fixture(scope="module")
def cam():
    return webcam_frames()


@pytest.fixture(scope="module")
def browser(tmp_path_factory, cam):
    y4m = tmp_path_factory.mktemp("webcam") / "cam.y4m"
    write_y4m(y4m, cam)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS + [f"--use-file-for-fake-video-capture={y4m}"])
        yield browser
        browser.close()


class Held:
    """A tab as its worker holds it, looked up at each use: the worker holds a tab only once it first needs the
    engine (going live, the Portrait editing tab, a render), not at its page load."""

    def __init__(self, worker, session: str):
        self.worker, self.session = worker, session

    @property
    def placed(self) -> bool:
        return self.session in self.worker.tabs

    def __getattr__(self, name: str):
        return getattr(self.worker.tabs[self.session], name)


def new_page(browser, app, url, init_script: str | None = None) -> tuple:
    """A new tab on the page, once its load event registered it with the front: (page, its session id)."""
    before = set(app.pages)
    page = browser.new_page(viewport={"width": 1360, "height": 1020})
    if init_script:
        page.add_init_script(init_script)
    page.goto(url)
    page.wait_for_function("() => document.querySelector('.lp-start') && window.lpLive")
    wait_until(lambda: set(app.pages) - before, 30)
    (session,) = set(app.pages) - before
    return page, session


def open_tab(browser, app, url, init_script: str | None = None):
    """A new tab on the in-process server, placed on no worker by its page load: (page, session id, its tab on the
    worker)."""
    page, session = new_page(browser, app, url, init_script)
    tab = Held(app.workers[0].worker, session)
    assert not tab.placed
    return page, session, tab


def wait_until(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.2)
    assert condition()


POOLS = ("AnyIO worker thread", "asyncio_", "ThreadPoolExecutor")  # bounded pools that stay once started


def new_threads(before: set[str]) -> list[str]:
    """Python threads that are neither pool workers (bounded, they stay once started) nor there `before`."""
    return sorted(t.name for t in threading.enumerate() if not t.name.startswith(POOLS) and t.name not in before)


def thread_names() -> set[str]:
    return {t.name for t in threading.enumerate()}


def wait_closed(app, threads: set[str] | None = None) -> None:
    """Closing a tab fires the page's unload event, which ends its connection and frees everything: no page, tab,
    peer, engine session or scheduler lane is left, nor a thread that was not there before the tab (`threads`)."""
    left = lambda: {k: v for k, v in dict(pages=list(app.pages), **app.workers[0].worker.counts(),
                                          threads=new_threads(threads) if threads is not None else []).items() if v}
    wait_until(lambda: not left())
    assert not left(), left()


def test_webrtc_in_chromium(server, browser, cam):
    app, url = server
    threads = thread_names()
    page, session, tab = open_tab(browser, app, url)
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 50", timeout=120_000, polling=250)

    live = page.evaluate("window.lpLive")
    pipeline = tab.pipeline
    m = pipeline.stats()
    assert live["state"] == "connected" and m["transport"] == "WebRTC"
    assert live["codec"] == "video/H264" and tab.conn.peer.codec == "H264"  # the fast codec, from the browser's stats
    assert m["frames_out"] >= 50 and m["frames_in"] >= m["frames_out"]  # the server made what the browser got
    out = pipeline.latest()[1]
    assert (live["width"], live["height"]) == (out.shape[1], out.shape[0]) == (512, 512) != (W, H)

    # the pixels are the engine's output: close to the server's latest frame, far from any webcam frame
    shown = np.array(page.evaluate(GRAB, [64, 64]), np.float32).reshape(64, 64, 4)[..., :3]
    to_output = np.abs(shown - small(out)).mean()
    to_input = min(np.abs(shown - small(c)).mean() for c in cam)
    assert to_output < 20 and to_output < to_input / 2
    face = slice(8, 32), slice(20, 44)  # the generated face differs from the portrait at rest
    assert np.abs(shown[face] - small(tab.source.image)[face]).mean() > 10

    page.wait_for_function("() => document.querySelector('#lp-metrics').textContent.includes('Live via WebRTC (H264)')")
    (ROOT / "docs").mkdir(exist_ok=True)
    page.screenshot(path=str(ROOT / "docs" / "screenshot.png"))

    # record, then Stop in the page: the peer, the pipeline and the engine session end; the MP4 is complete
    assert "Recording" in run(app.start_recording(gr.Request(session_hash=session)))
    recorder, frames = pipeline.recorder, pipeline.metrics.frames_out
    page.wait_for_function(f"() => window.lpLive.frames >= {live['frames'] + 10}", timeout=60_000)
    assert pipeline.metrics.frames_out > frames
    page.click(".lp-stop")
    wait_until(lambda: not app.workers[0].worker.counts()["peers"] and not app.workers[0].worker.engine.sessions and tab.takes
               and not new_threads(threads))
    assert pipeline.closed and tab.pipeline is None
    key = json.dumps({"session": session, "secret": app.pages[session].secret})
    (path, motion), status = run(app.stop_recording(key, gr.Request(session_hash=session)))  # the finalised take
    with av.open(path) as c:
        assert sum(1 for _ in c.decode(video=0)) == recorder.frames >= 5
    assert motion.endswith(".pkl")  # and its motion, as a template

    # start again, then the tab goes away without pressing Stop: everything is freed all the same
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 5", timeout=60_000)
    assert tab.pipeline is not pipeline and tab.pipeline.transport == "WebRTC"
    page.close()
    wait_closed(app, threads)


def test_http_streaming_in_chromium(server, browser):
    """The fallback transport: Gradio's own webcam streaming, no WebRTC at all."""
    app, url = server
    page, session, tab = open_tab(browser, app, url)
    page.get_by_role("tab", name="Live (HTTP streaming)").click()
    page.get_by_role("button", name="Click to Access Webcam").click()
    page.get_by_role("button", name="capture photo").click()  # starts streaming
    wait_until(lambda: tab.placed and tab.pipeline and tab.pipeline.metrics.frames_out >= 10, 90)
    pipeline = tab.pipeline
    assert pipeline.transport == "HTTP streaming" and pipeline.metrics.frames_out >= 10
    page.wait_for_function("() => document.querySelector('#lp-metrics').textContent.includes('HTTP streaming')")
    shown = page.locator("#lp-http-view img")  # the animated output, replaced with every answer
    first = shown.get_attribute("src")
    page.wait_for_function("(src) => { const img = document.querySelector('#lp-http-view img');"
                           " return img.src !== src && img.complete && img.naturalWidth > 0; }", arg=first)
    assert shown.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [512, 512]

    # Stop the webcam, the tab still open: the slot is free again within 10 s (Gradio tells the server nothing)
    page.locator('#lp-http-cam button:has([title="stop recording"])').click()
    stopped = time.monotonic()
    wait_until(lambda: app.workers[0].worker.health()["live_sessions"] == 0, 30)
    assert time.monotonic() - stopped < 10 and pipeline.closed and session in app.pages
    page.close()
    wait_closed(app)


def test_webrtc_with_vp8_forced(server, browser):
    """--codec vp8: the server offers VP8 alone, whatever the page prefers, and frames arrive."""
    app, url = server
    app.workers[0].worker.codec = "vp8"
    try:
        page, session, tab = open_tab(browser, app, url)
        page.click(".lp-start")
        page.wait_for_function("() => window.lpLive.frames >= 5 && window.lpLive.codec", timeout=120_000, polling=250)
        assert page.evaluate("window.lpLive.codec") == "video/VP8" and tab.conn.peer.codec == "VP8"
        page.wait_for_function("() => document.querySelector('#lp-metrics').textContent.includes('(VP8)')")
        page.close()
        wait_closed(app)
    finally:
        app.workers[0].worker.codec = "h264"


CAMERAS = """{  // every camera stream the page opens, so the test can check that each one is ended
    window.lpCams = [];
    const open = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
    navigator.mediaDevices.getUserMedia = async (c) => { const s = await open(c); window.lpCams.push(s); return s; };
}"""
TRACKS = "() => window.lpCams.map((s) => s.getTracks().map((t) => t.readyState))"


def test_start_twice_quickly_leaves_one_peer_and_stop_ends_the_camera(server, browser):
    """Start clicked again while the camera is still opening: the first start gives up and closes its camera;
    one peer reaches the server; Stop ends the camera track (its light goes off)."""
    app, url = server
    page, session, tab = open_tab(browser, app, url, CAMERAS)
    for _ in range(40):  # a click before the page's load event reached it says "still loading": click again
        page.evaluate("() => { const start = document.querySelector('.lp-start'); start.click(); start.click(); }")
        time.sleep(0.5)
        if "still loading" not in page.evaluate("window.lpLive.state"):
            break
    page.wait_for_function("() => window.lpLive.frames >= 5", timeout=120_000, polling=250)
    time.sleep(2)  # an orphaned first start would have offered by now
    assert app.workers[0].worker.counts()["peers"] == 1
    assert page.evaluate(TRACKS) == [["ended"], ["live"]]  # two cameras were opened; the first one is closed
    page.click(".lp-stop")
    page.wait_for_function(f"() => ({TRACKS})().flat().every((s) => s === 'ended')", timeout=10_000)
    wait_until(lambda: not app.workers[0].worker.counts()["peers"], 30)
    page.close()
    wait_closed(app)


def small(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
