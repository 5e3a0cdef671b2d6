"""The view-only link, the self-view, "no face in view" and picture-in-picture in real Chromium. One browser context
drives a session and presses Share output; others open the link as OBS would (one <video>, receive-only WebRTC).
(Chromium, the fake webcam and the server come from test_e2e_browser; the counts from test_view.)"""
import time

import cv2
import numpy as np
import pytest

from test_e2e_browser import (CHROMIUM, FLAGS, browser, cam, open_tab, server, wait_closed, wait_until,  # noqa: F401
                              write_y4m, H, W)
from test_view import server_media

LINK = "#lp-link textarea, #lp-link input"
MAX_VIEWERS = 2


def share(page, old: str = "") -> str:
    """Press Share output; the new link, once the page shows it."""
    page.click("#lp-share")
    page.wait_for_function(f"""(old) => {{ const box = document.querySelector("{LINK}");
                                          return box && box.value.includes('/view/') && box.value !== old; }}""",
                           arg=old, timeout=30_000)
    return page.locator(LINK).first.input_value()


def viewer(browser, link: str):
    """The link in a browser context of its own (no cookie or storage shared with the performer's)."""
    context = browser.new_context(viewport={"width": 720, "height": 720})
    page = context.new_page()
    page.goto(link)
    page.wait_for_function("() => window.lpView")
    return context, page


def test_share_output_viewers_self_view_and_picture_in_picture(server, browser):
    app, url = server
    old, app.workers[0].worker.max_viewers = app.workers[0].worker.max_viewers, MAX_VIEWERS
    try:
        page, session, tab = open_tab(browser, app, url)
        page.click(".lp-start")
        page.wait_for_function("() => window.lpLive.frames >= 5", timeout=120_000, polling=250)
        link = share(page)
        assert link.startswith(url + "view/") and link.endswith(tab.token)

        watchers = [viewer(browser, link) for _ in range(MAX_VIEWERS)]
        for _, v in watchers:
            v.wait_for_function("() => window.lpView.frames >= 5", timeout=120_000, polling=250)
            size = v.evaluate("[window.lpView.width, window.lpView.height]")
            assert size == page.evaluate("[window.lpLive.width, window.lpLive.height]") == [512, 512]
            assert v.evaluate("document.querySelectorAll('video').length") == 1
            assert v.locator("video").evaluate("(e) => [e.autoplay, e.muted, e.controls]") == [True, True, False]
        extra, third = viewer(browser, link)
        third.wait_for_function("() => window.lpView.state === 'full'", timeout=60_000)
        assert third.locator("#state").text_content() == f"this output already has {MAX_VIEWERS} viewers"
        assert app.workers[0].worker.counts()["viewers"] == MAX_VIEWERS and app.workers[0].worker.counts()["peers"] == 1
        extra.close()

        # the self-view: the local camera (640x480), mirrored, hidden and shown again by its toggle
        me = page.locator(".lp-live .lp-self")
        assert me.is_visible()
        assert me.evaluate("(v) => [v.videoWidth, v.videoHeight, getComputedStyle(v).transform]") == \
            [W, H, "matrix(-1, 0, 0, 1, 0, 0)"]
        page.click(".lp-self-toggle")
        assert me.is_hidden() and page.locator(".lp-self-toggle").text_content() == "Show self-view"
        page.click(".lp-self-toggle")
        assert me.is_visible()

        # picture-in-picture of the animated video (a real click: the browser wants a user gesture)
        page.click(".lp-pip")
        page.wait_for_function("() => document.pictureInPictureElement === document.querySelector('#lp-live video')",
                               timeout=10_000)
        page.evaluate("document.exitPictureInPicture()")

        # the performer stops: every viewer says "ended" within 5 s, and nothing of theirs is left on the server
        page.click(".lp-stop")
        stopped = time.monotonic()
        for _, v in watchers:
            v.wait_for_function("() => window.lpView.state === 'ended'", timeout=5_000)
        assert time.monotonic() - stopped < 5
        assert "ended" in watchers[0][1].locator("#state").text_content()
        wait_until(lambda: not app.workers[0].worker.counts()["viewers"] and not app.workers[0].worker.counts()["peers"]
                   and server_media() == dict(tracks=0, encoders=0), 30)

        # the same page starts again: the viewers' pages connect again by themselves
        seen = [v.evaluate("window.lpView.frames") for _, v in watchers]
        page.click(".lp-start")
        for (_, v), n in zip(watchers, seen):
            v.wait_for_function(f"() => window.lpView.state === 'live' && window.lpView.frames > {n + 3}",
                                timeout=120_000, polling=250)

        # a new link revokes the old one: its viewers end and learn that the link is not valid any more
        assert share(page, link) != link
        for _, v in watchers:
            v.wait_for_function("() => window.lpView.state === 'invalid'", timeout=30_000)
        assert "not valid" in watchers[0][1].locator("#state").text_content()
        for context, _ in watchers:
            context.close()
        page.close()
        wait_closed(app)
        assert server_media() == dict(tracks=0, encoders=0)
    finally:
        app.workers[0].worker.max_viewers = old


def test_a_performer_on_http_streaming_has_a_webrtc_viewer(server, browser):
    app, url = server
    page, session, tab = open_tab(browser, app, url)
    page.get_by_role("tab", name="Live (HTTP streaming)").click()
    page.get_by_role("button", name="Click to Access Webcam").click()
    page.get_by_role("button", name="capture photo").click()  # starts streaming
    wait_until(lambda: tab.placed and tab.pipeline and tab.pipeline.metrics.frames_out >= 3, 90)
    context, v = viewer(browser, share(page))
    v.wait_for_function("() => window.lpView.frames >= 5", timeout=120_000, polling=250)
    assert v.evaluate("[window.lpView.width, window.lpView.height]") == [512, 512]
    assert tab.pipeline.transport == "HTTP streaming" and app.workers[0].worker.counts()["viewers"] == 1
    context.close()
    page.close()
    wait_closed(app)


@pytest.fixture(scope="module")
def faceless_browser(tmp_path_factory, browser):
    """A second Chromium (from the same Playwright) whose fake webcam shows grey noise: no face at all."""
    y4m = tmp_path_factory.mktemp("faceless") / "noise.y4m"
    rng = np.random.default_rng(0)
    write_y4m(y4m, [cv2.GaussianBlur(rng.integers(60, 200, (H, W, 3), dtype=np.uint8), (9, 9), 0)
                    for _ in range(10)])
    faceless = browser.browser_type.launch(executable_path=CHROMIUM,
                                           args=FLAGS + [f"--use-file-for-fake-video-capture={y4m}"])
    yield faceless
    faceless.close()


def test_no_face_in_view(server, faceless_browser):
    app, url = server
    page, session, tab = open_tab(faceless_browser, app, url)
    assert page.locator(".lp-noface").is_hidden()
    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 2", timeout=120_000, polling=250)
    page.wait_for_selector(".lp-noface", state="visible", timeout=30_000)
    assert page.locator(".lp-noface").text_content() == "no face in view"
    assert "no face in view" in page.locator("#lp-metrics").text_content()
    assert tab.pipeline.stats()["no_face_s"] >= 1.0
    page.click(".lp-stop")
    page.wait_for_selector(".lp-noface", state="hidden", timeout=10_000)
    page.close()
    wait_closed(app)
