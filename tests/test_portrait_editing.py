"""Portrait editing without a webcam (the official retargeting image), the page's editing handlers, and the render
CLI's region and slider flags."""
import av
import gradio as gr
import numpy as np
import PIL.Image
import pytest
import skimage.data

from model.editing import SLIDERS, Edits
from stream.editor import PortraitEditor
from stream.face import MOUTH
from stream.paste import PasteBack
from stream.pipeline import Settings
from conftest import run, tiny
from web.app import LiveApp


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return LiveApp(tiny(), untrained=True, workdir=tmp_path_factory.mktemp("edit"))


def test_smile_changes_the_mouth_not_the_background(app):
    source = app.workers[0].worker.sample
    editor = PortraitEditor(app.workers[0].worker.engine)
    still = editor(source, Settings())
    smile = editor(source, Settings(edits=Edits(smile=1.0)))
    assert smile.shape == still.shape == source.image.shape and smile.dtype == np.uint8
    assert np.array_equal(still, editor(source, Settings()))  # deterministic: the same sliders, the same image
    diff = np.abs(smile.astype(int) - still).sum(-1)
    # the mouth, from the portrait's landmarks (crop pixels -> image pixels)
    m = source.crop.m_c2o
    x, y = (m[:2, :2] @ source.crop.lmk[MOUTH].mean(0) + m[:2, 2]).astype(int)
    assert diff[y - 20:y + 20, x - 30:x + 30].mean() > 1
    # the background: everything outside the pasted face is the portrait's own pixels
    x0, y0, x1, y1 = PasteBack(source.image, m, len(smile)).box
    outside = np.ones(diff.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert outside.mean() > 0.3 and not diff[outside].any()
    assert np.array_equal(smile[outside], source.image[outside])
    editor.close()
    assert editor.name not in app.workers[0].worker.engine.sessions and editor(source, Settings()) is None


def test_editing_tab_handlers(app):
    r = gr.Request(session_hash="editing")
    run(app.open_page(r))
    values = [Edits().values()[k] for k in SLIDERS]
    values[list(SLIDERS).index("gaze_x")] = -15.0
    assert isinstance(run(app.set_edits(r, "lips", *values)), type(gr.skip()))  # the tab is not shown: no engine call
    assert "editing" not in app.workers[0].worker.tabs and app.pages["editing"].controls["region"] == "lips"
    shown = run(app.select_tab(gr.SelectData(None, {"value": "Portrait editing", "index": 4, "selected": True}), r))
    page = app.workers[0].worker.tabs["editing"]  # the editor needs the engine: the tab is placed, with its controls
    assert page.settings.region == "lips" and page.settings.edits.gaze_x == -15.0
    assert page.settings.engine_controls(0.5)["gaze_x"] == -15.0
    assert shown.shape == app.workers[0].worker.sample.image.shape and page.editor.name in app.workers[0].worker.engine.sessions
    *reset, plain = run(app.reset_edits(r))
    assert reset == [SLIDERS[k][2] for k in SLIDERS] and page.settings.edits == Edits()
    assert page.settings.region == "lips"  # a motion control, not an edit
    assert not np.array_equal(plain, shown)
    assert np.array_equal(run(app.set_controls(True, True, True, 1.0, False, 0.3, False, 0.1, 0.5, False, r)), plain)
    run(app.select_tab(gr.SelectData(None, {"value": "Video file", "index": 2, "selected": True}), r))
    assert isinstance(run(app.set_edits(r, "all", *values)), type(gr.skip()))
    name = page.editor.name
    run(app.close_page(r))
    assert name not in app.workers[0].worker.engine.sessions


def test_render_takes_region_and_sliders(tmp_path, capsys):
    from test_render import driving_video, run_render
    PIL.Image.fromarray(skimage.data.astronaut()).save(tmp_path / "portrait.png")
    driving_video(tmp_path / "driving.mp4", frames=3)
    common = ["--source", tmp_path / "portrait.png", "--driving", tmp_path / "driving.mp4", "-o"]
    assert run_render(*common, tmp_path / "plain.mp4") == 0
    assert run_render(*common, tmp_path / "edited.mp4", "--region", "eyes", "--smile", "0.8", "--yaw", "-10") == 0
    frames = [[f.to_ndarray(format="rgb24") for f in av.open(str(tmp_path / p)).decode(video=0)]
              for p in ("plain.mp4", "edited.mp4")]
    assert len(frames[0]) == len(frames[1]) == 3
    assert all(np.abs(a.astype(int) - b).mean() > 1 for a, b in zip(*frames))
    for bad, message in ((["--smile", "5"], "--smile: 5 is outside -0.3 .. 1.3"),
                         (["--region", "mouth"], "--region: invalid choice: 'mouth'")):
        with pytest.raises(SystemExit) as exit:
            run_render(*common, tmp_path / "x.mp4", *bad)
        assert exit.value.code == 2 and message in capsys.readouterr().err
