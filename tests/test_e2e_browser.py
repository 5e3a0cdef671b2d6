"""End to end in a real browser: headless Chromium with a fake webcam (a .y4m of the astronaut) opens the page,
starts WebRTC over loopback and receives the engine's animated frames; then the tab goes away mid-recording.

Needs Debian's Chromium (/usr/bin/chromium); skipped without it unless LP_REQUIRE_BROWSER=1."""
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

from conftest import ROOT

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
    from model.engine import Engine, load_networks
    from web.app import LiveApp

    with pytest.MonkeyPatch.context() as mp:
        # ICE over loopback only: aioice normally skips 127.0.0.1 (and no STUN server is configured)
        mp.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])
        app = LiveApp(Engine(load_networks("recipe", "tiny")), untrained=True,
                      workdir=tmp_path_factory.mktemp("live"))
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


def open_tab(browser, app, url):
    """A new tab on the page, once its load event registered it with the server: (page, session id, Page)."""
    page = browser.new_page(viewport={"width": 1360, "height": 1020})
    page.goto(url)
    page.wait_for_function("() => document.querySelector('.lp-start') && window.lpLive")
    wait_until(lambda: app.pages, 30)
    (session, tab), = app.pages.items()
    return page, session, tab


def wait_until(condition, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not condition() and time.monotonic() < end:
        time.sleep(0.2)
    assert condition()


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pipeline-")]


def wait_closed(app) -> None:
    """Closing a tab fires the page's unload event, which ends its connection and frees everything."""
    left = lambda: {k: v for k, v in dict(pages=list(app.pages), peers=len(app.rtc.peers),
                                          sessions=list(app.engine.sessions), threads=pipeline_threads()).items() if v}
    wait_until(lambda: not left())
    assert not left(), left()


def test_webrtc_in_chromium(server, browser, cam):
    app, url = server
    page, session, tab = open_tab(browser, app, url)
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 50", timeout=120_000, polling=250)

    live = page.evaluate("window.lpLive")
    pipeline = tab.pipeline
    m = pipeline.stats()
    assert live["state"] == "connected" and m["transport"] == "WebRTC"
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

    page.wait_for_function("() => document.querySelector('#lp-metrics').textContent.includes('Live via WebRTC')")
    (ROOT / "docs").mkdir(exist_ok=True)
    page.screenshot(path=str(ROOT / "docs" / "screenshot.png"))

    # record, then Stop in the page: the peer, the pipeline and the engine session end; the MP4 is complete
    assert "Recording" in app.start_recording(gr.Request(session_hash=session))
    recorder, frames = pipeline.recorder, pipeline.metrics.frames_out
    page.wait_for_function(f"() => window.lpLive.frames >= {live['frames'] + 10}", timeout=60_000)
    assert pipeline.metrics.frames_out > frames
    page.click(".lp-stop")
    wait_until(lambda: not app.rtc.peers and not app.engine.sessions and not pipeline_threads() and tab.recording)
    assert pipeline.closed and tab.pipeline is None
    path, status = app.stop_recording(gr.Request(session_hash=session))  # the download of the finalised file
    with av.open(path) as c:
        assert sum(1 for _ in c.decode(video=0)) == recorder.frames >= 5

    # start again, then the tab goes away without pressing Stop: everything is freed all the same
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 5", timeout=60_000)
    assert tab.pipeline is not pipeline and tab.pipeline.transport == "WebRTC"
    page.close()
    wait_closed(app)


def test_http_streaming_in_chromium(server, browser):
    """The fallback transport: Gradio's own webcam streaming, no WebRTC at all."""
    app, url = server
    page, session, tab = open_tab(browser, app, url)
    page.get_by_role("tab", name="Live (HTTP streaming)").click()
    page.get_by_role("button", name="Click to Access Webcam").click()
    page.get_by_role("button", name="capture photo").click()  # starts streaming
    wait_until(lambda: tab.pipeline and tab.pipeline.metrics.frames_out >= 10, 90)
    pipeline = tab.pipeline
    assert pipeline.transport == "HTTP streaming" and pipeline.metrics.frames_out >= 10
    page.wait_for_function("() => document.querySelector('#lp-metrics').textContent.includes('HTTP streaming')")
    shown = page.locator("#lp-http-view img")  # the animated output, replaced with every answer
    first = shown.get_attribute("src")
    page.wait_for_function("(src) => document.querySelector('#lp-http-view img').src !== src", arg=first)
    assert shown.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [512, 512]
    page.close()
    wait_closed(app)
    assert pipeline.closed


def small(img: np.ndarray) -> np.ndarray:
    return cv2.resize(img, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32)
