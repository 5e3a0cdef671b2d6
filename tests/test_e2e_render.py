"""In a real browser: the Video file tab renders a source video driven by a motion template, shows the render's
progress while it runs, then the result; a driving image gives one image.

Uses test_e2e_browser's server and helpers (skipped the same way without Chromium)."""
import PIL.Image
import skimage.data

from test_e2e_browser import browser, cam, open_tab, server, wait_closed  # noqa: F401 (fixtures)
from test_render import driving_video

PROGRESS = """() => Array.from(document.querySelectorAll('.progress-text, .progress-level-inner, .eta-bar, .meta-text'))
    .map(e => e.textContent.trim()).filter(t => t).join(' | ')"""


def test_video_file_tab_source_video_template_and_image(server, browser, tmp_path):
    from model.engine import Engine, load_networks
    from stream.render import render
    from stream.face import prepare_source
    app, url = server
    driving_video(tmp_path / "driving.mp4", frames=6)
    driving_video(tmp_path / "source.mp4", frames=8)
    PIL.Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(tmp_path / "face.png")
    render(Engine(load_networks("recipe", "tiny"), device="cpu"), prepare_source(skimage.data.astronaut()),
           tmp_path / "driving.mp4", tmp_path / "out.mp4", save_template=tmp_path / "motion.pkl")

    page, session, tab = open_tab(browser, app, url)
    for _ in range(60):  # a click before the page has hydrated is lost: again until the tab shows (bounded)
        page.get_by_role("tab", name="Video file").click()
        if page.locator("#lp-driving input[type=file]").count():
            break
        page.wait_for_timeout(500)
    page.set_input_files("#lp-driving input[type=file]", str(tmp_path / "motion.pkl"))
    page.set_input_files("#lp-source-video input[type=file]", str(tmp_path / "source.mp4"))
    page.wait_for_function("() => document.querySelector('#lp-source-video video')", timeout=60_000, polling=250)
    page.click("#lp-render")
    seen = set()
    for _ in range(600):  # the progress the page shows while the render runs (bounded: 600 polls of 0.1 s)
        if text := page.evaluate(PROGRESS):
            seen.add(text)
        if "frames at" in page.locator("#lp-render-status").inner_text():
            break
        page.wait_for_timeout(100)
    status = page.locator("#lp-render-status").inner_text()
    assert "6 frames at 15 fps, with audio" in status  # the shorter: the template's 6 of the source's 8
    assert any("frame" in t or "%" in t for t in seen), seen  # the worker's render progress, polled by the front
    page.wait_for_function("() => { const v = document.querySelector('#lp-rendered video');"
                           " return v && v.src; }", timeout=60_000, polling=250)

    page.locator("#lp-driving button[aria-label='Clear']").click()  # a new driving file: an image
    page.set_input_files("#lp-driving input[type=file]", str(tmp_path / "face.png"))
    page.locator("#lp-source-video button[aria-label='Clear']").first.click()  # and the portrait as the source
    page.click("#lp-render")
    page.wait_for_function("() => document.querySelector('#lp-render-status').innerText.includes('One image')",
                           timeout=120_000, polling=250)
    page.wait_for_function("() => { const img = document.querySelector('#lp-rendered-image img');"
                           " return img && img.naturalWidth === 512; }", timeout=60_000, polling=250)
    page.close()
    wait_closed(app)
