"""Cluster mode in real Chromium: `--workers 2` (two CPU workers, Ray actors in processes of their own, tiny config)
behind one front. Two tabs go live over WebRTC, one on each worker, and a third over HTTP streaming; then one
worker's process is killed: the other tab streams on, the hit tab says why and connects again by itself.
(Chromium and the fake webcam come from test_e2e_browser, the Ray runtime from test_cluster.)"""
import os
import signal
import threading
import time

import gradio as gr
import httpx
import pytest
import skimage.data

from conftest import run
from test_cluster import front, runtime  # noqa: F401
from test_e2e_browser import browser, cam, wait_until  # noqa: F401
from test_e2e_browser import new_page as open_tab

FRAMES = "() => window.lpLive.frames"
ASTRONAUT = skimage.data.astronaut()


@pytest.fixture(scope="module")
def served(runtime, tmp_path_factory):  # noqa: F811
    yield from front(tmp_path_factory, 2)


def healthz(url: str) -> list[dict]:
    """Each worker's health, as GET /healthz lists it."""
    return httpx.get(f"{url}healthz", timeout=30).json()["workers"]


def go_live(page) -> None:
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 5", timeout=120_000, polling=250)


@pytest.fixture(scope="module")
def two_live(served, browser):  # noqa: F811
    """Two tabs live over WebRTC, the second started once the first streams (so each lands on another worker)."""
    app, url = served
    tabs = [open_tab(browser, app, url) for _ in range(2)]
    for page, _ in tabs:
        go_live(page)
    yield tabs
    for page, _ in tabs:
        page.close()


def test_two_webrtc_tabs_one_on_each_worker_and_a_third_over_http_streaming(served, browser, two_live):  # noqa: F811
    app, url = served
    assert sorted(app.placed[session].name for _, session in two_live) == ["worker-0", "worker-1"]
    assert [h["live_sessions"] for h in healthz(url)] == [1, 1]
    counts = [page.evaluate(FRAMES) for page, _ in two_live]
    for (page, _), n in zip(two_live, counts):  # both receive frames
        page.wait_for_function(f"() => window.lpLive.frames >= {n + 10}", timeout=60_000, polling=250)
        assert page.evaluate("window.lpLive.state") == "connected"

    page, session = open_tab(browser, app, url)
    page.get_by_role("tab", name="Live (HTTP streaming)").click()
    page.get_by_role("button", name="Click to Access Webcam").click()
    page.get_by_role("button", name="capture photo").click()  # starts streaming
    page.wait_for_function("() => document.querySelector('#lp-metrics').textContent.includes('HTTP streaming')",
                           timeout=90_000)
    shown = page.locator("#lp-http-view img")  # the animated output, replaced with every answer
    first = shown.get_attribute("src")
    page.wait_for_function("(src) => { const img = document.querySelector('#lp-http-view img');"
                           " return img.src !== src && img.complete && img.naturalWidth > 0; }", arg=first,
                           timeout=60_000)
    assert shown.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [512, 512]
    assert sum(h["live_sessions"] for h in healthz(url)) == 3
    page.close()
    wait_until(lambda: sum(h["live_sessions"] for h in healthz(url)) == 2, 60)


def test_a_killed_worker_tab_reconnects_by_itself_and_the_other_streams_on(served, two_live):
    """SIGKILL of the process of one tab's worker, while that tab records: the other tab receives frames without a
    stall over 6 s; the hit tab shows why (its recording is lost with the worker) and, with no click, receives
    frames over WebRTC again within 20 s. The other worker is full meanwhile (an HTTP-streaming session from here
    takes its second slot), so the hit tab's offers are answered 503 until Ray has restarted its worker, where it
    goes live again."""
    app, url = served
    (steady, steady_session), (hit, session) = two_live
    worker = app.placed[session]
    filler = gr.Request(session_hash="filler")
    app.placed["filler"] = app.placed[steady_session]  # the steady tab's worker
    run(app.open_page(filler))
    done = threading.Event()

    def fill() -> None:  # a webcam frame a second keeps the session (and its slot) live
        for _ in range(120):
            if done.wait(1.0):
                return
            run(app.http_frame(ASTRONAUT, filler))
    filling = threading.Thread(target=fill)
    run(app.http_frame(ASTRONAUT, filler))
    filling.start()
    other = app.placed[steady_session]
    assert {h["worker"]: h["live_sessions"] for h in healthz(url)} == {other.name: 2, worker.name: 1}
    assert "Recording" in run(app.start_recording(gr.Request(session_hash=session)))
    (pid,) = [h["pid"] for h in healthz(url) if h["worker"] == worker.name]
    os.kill(pid, signal.SIGKILL)

    start = last = time.monotonic()
    seen, gaps, told, again, back = steady.evaluate(FRAMES), [], None, None, None
    while time.monotonic() - start < 60 and back is None:
        time.sleep(0.25)
        if (n := steady.evaluate(FRAMES)) > seen:
            seen, now = n, time.monotonic()
            gaps.append(now - last)
            last = now
        notice = hit.locator("#lp-live .lp-notice").text_content()
        if told is None and "the server lost its worker" in notice:
            told = (time.monotonic() - start, notice, hit.evaluate("window.lpLive.state"))
        if again is None and notice.startswith("Reconnected after this"):
            again = hit.evaluate(FRAMES)  # the new connection's first frame is in
        elif again is not None and hit.evaluate(FRAMES) >= again + 5:
            back = time.monotonic() - start
    gaps.append(time.monotonic() - last)
    done.set()
    filling.join()
    live = hit.evaluate("window.lpLive")
    assert told is not None and "a recording in progress there is lost" in told[1], told
    assert back is not None and back < 20, (back, told, live)
    assert max(gaps) < 6, gaps
    assert live["transport"] == "WebRTC" and not live["fallback"] and live["reconnects"] >= 1, live
    assert live["lost"] in told[1] and live["state"] == "connected"
    assert app.placed[session] is worker  # the restarted one: the other had no room
    (restarted,) = [h for h in healthz(url) if h["worker"] == worker.name]
    assert restarted["pid"] != pid and restarted["live_sessions"] == 1
    run(app.close_page(filler))
    wait_until(lambda: sum(h["live_sessions"] for h in healthz(url) if h["alive"]) == 2, 60)
