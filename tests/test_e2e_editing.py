"""In a real browser: the grouped editing controls are on the page, a slider moved while live reaches the engine
from the next frames on (and frames keep coming), and the Portrait editing tab shows the edited portrait.

Uses test_e2e_browser's server, fake webcam and helpers (skipped the same way without Chromium)."""
from test_e2e_browser import browser, cam, open_tab, server, wait_closed, wait_until  # noqa: F401 (fixtures)


def test_edit_while_live_and_portrait_editing_tab(server, browser):
    app, url = server
    page, session, tab = open_tab(browser, app, url)
    for label in ("Motion", "Expression", "Pose", "Retargeting", "Animation region", "Smile", "Wink", "Eyebrow",
                  "Gaze horizontal", "Gaze vertical", "Pouting", "Reset expression and pose"):
        assert page.get_by_text(label, exact=True).first.is_visible(), label

    page.click(".lp-start")
    page.wait_for_function("() => window.lpLive.frames >= 10", timeout=120_000, polling=250)
    pipeline = tab.pipeline
    page.locator("#lp-smile input[type=range]").fill("0.8")
    wait_until(lambda: tab.settings.edits.smile == 0.8, 30)
    wait_until(lambda: app.workers[0].worker.engine.sessions[pipeline.name].controls.smile == 0.8, 30)  # applied to a frame
    page.get_by_label("Eyes only").check()
    wait_until(lambda: tab.settings.region == "eyes", 30)
    seen, made = page.evaluate("window.lpLive.frames"), pipeline.metrics.frames_out
    page.wait_for_function(f"() => window.lpLive.frames >= {seen + 10}", timeout=60_000, polling=250)
    wait_until(lambda: pipeline.metrics.frames_out >= made + 10, 60)  # the browser's count may lead by one read
    assert tab.pipeline is pipeline
    assert app.workers[0].worker.engine.sessions[pipeline.name].controls.region == "eyes"

    page.click("#lp-reset-edits")
    page.wait_for_function("() => document.querySelector('#lp-smile input[type=range]').value === '0'",
                           timeout=30_000, polling=250)
    assert tab.settings.edits.smile == 0.0

    page.get_by_role("tab", name="Portrait editing").click()
    page.wait_for_function("() => { const img = document.querySelector('#lp-edited img');"
                           " return img && img.naturalWidth === 512; }", timeout=60_000, polling=250)
    assert tab.editor is not None and tab.editor.name in app.workers[0].worker.engine.sessions
    first = page.locator("#lp-edited img").get_attribute("src")
    page.locator("#lp-wink input[type=range]").fill("20")
    page.wait_for_function("(src) => document.querySelector('#lp-edited img').src !== src", arg=first,
                           timeout=60_000, polling=250)
    page.close()
    wait_closed(app)  # the live session, the editing session and the tab are all freed
