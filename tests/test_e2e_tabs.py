"""Several tabs on one server in real Chromium: two live WebRTC sessions at once share the engine's batches and
both receive frames; at --max-sessions 1 a second tab is told the server is full, and gets in once the first
stops. (Chromium, the fake webcam and the server come from test_e2e_browser.)"""
from test_e2e_browser import browser, cam, server, wait_closed, wait_until  # noqa: F401 (fixtures)
from test_e2e_browser import open_tab as browser_tab

from stream.scheduler import Scheduler


def open_tab(browser, app, url):
    """A new tab (placed on no worker by its load): (page, its tab on the worker)."""
    page, _, tab = browser_tab(browser, app, url)
    return page, tab


def test_two_tabs_live_at_once(server, browser):
    app, url = server
    sched = Scheduler.of(app.workers[0].worker.engine)
    before = dict(sched.batch_sizes)
    tabs = [open_tab(browser, app, url) for _ in range(2)]
    for page, _ in tabs:
        page.click(".lp-start")
    for page, tab in tabs:
        page.wait_for_function("() => window.lpLive.frames >= 20", timeout=180_000, polling=250)
        assert tab.pipeline.transport == "WebRTC" and tab.pipeline.metrics.frames_out >= 20
    assert len(sched.lanes) == 2
    shared = sched.batch_sizes.get(2, 0) - before.get(2, 0)
    assert shared > 0, sched.batch_sizes  # the two sessions were animated in the same engine calls
    for page, _ in tabs:
        page.close()
    wait_closed(app)


def test_second_tab_is_told_the_server_is_full(server, browser):
    app, url = server
    old, app.workers[0].worker.max_sessions = app.workers[0].worker.max_sessions, 1
    try:
        (first, tab1), (second, tab2) = open_tab(browser, app, url), open_tab(browser, app, url)
        first.click(".lp-start")
        first.wait_for_function("() => window.lpLive.frames >= 5", timeout=120_000, polling=250)
        second.click(".lp-start")
        second.wait_for_function("() => window.lpLive.state.includes('server is full')", timeout=60_000)
        assert second.locator(".lp-state").text_content() == \
            "Transport: WebRTC (failed: the server is full (1 live session); try again shortly)"
        assert tab2.pipeline is None
        frames = tab1.pipeline.metrics.frames_out  # the live session keeps going
        first.wait_for_function("() => window.lpLive.frames >= 15", timeout=120_000, polling=250)
        assert tab1.pipeline.metrics.frames_out > frames

        first.click(".lp-stop")  # the slot frees up once the connection is closed: the next one is admitted
        wait_until(lambda: tab1.pipeline is None and not Scheduler.of(app.workers[0].worker.engine).lanes
                   and not app.workers[0].worker.live())
        second.click(".lp-start")
        second.wait_for_function("() => window.lpLive.frames >= 5", timeout=120_000, polling=250)
        assert tab2.pipeline.transport == "WebRTC"
        first.close()
        second.close()
        wait_closed(app)
    finally:
        app.workers[0].worker.max_sessions = old
