"""The worker interface (web/worker.py) is the same in and out of process: every call's arguments, results and
exceptions are plain, picklable data, so that a worker in another process (a Ray actor) is called exactly like the
in-process one. Here the in-process worker is called through a handle that pickles everything both ways and
refuses anything that is not plain data, while a tab uses every feature through the front's handlers."""
import asyncio
import contextvars
import dataclasses
import os
import pickle
import subprocess
import sys

import av
import gradio as gr
import numpy as np
import PIL.Image
import pytest
import skimage.data

from conftest import ROOT, run, tiny
from model.editing import SLIDERS
from model.weights import WeightsError
from stream.face import FaceModelError, NoFaceError
from stream.render import InputError
from web import app as front
from web.worker import (Local, NotLive, ServerFull, TabClosed, UnknownTab, UnknownView, ViewersFull,
                        WorkerLost)

PLAIN = (str, bytes, int, float, bool, type(None), np.ndarray)


def plain(x) -> bool:
    """Text, bytes, numbers, arrays, and dicts, lists and tuples of them (an Edits is a dataclass of floats)."""
    if isinstance(x, (list, tuple)):
        return all(plain(v) for v in x)
    if isinstance(x, dict):
        return all(isinstance(k, str) and plain(v) for k, v in x.items())
    if type(x).__module__ == "model.editing":
        return plain(vars(x))
    return isinstance(x, PLAIN)


@pytest.mark.parametrize("error", [
    ServerFull.of(3), ServerFull.of(1), ViewersFull.of(2), UnknownView("a-token"), NotLive("the performer is not live"),
    TabClosed("this tab was closed; reload the page"), UnknownTab("a-tab"), WorkerLost("the server lost worker-1"),
    InputError("The file is not an image."),
    NoFaceError("No face found in the portrait."), FaceModelError("The face model is damaged."),
    WeightsError("No weights in /x.\nDownload them with ..."),
], ids=lambda e: type(e).__name__)
def test_exceptions_survive_a_pickle_round_trip(error):
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error)


class Pickling(Local):
    """The in-process worker, called as if it were in another process: arguments, results and exceptions go
    through pickle, and each must be plain data. `seen` records the methods called."""

    seen: set[str] = set()

    async def call(self, method, *args, **kw):
        assert plain(args), (method, args)
        self.seen.add(method)
        try:
            result = await super().call(method, *pickle.loads(pickle.dumps(args)), **kw)
        except Exception as e:
            raise pickle.loads(pickle.dumps(e)) from None
        assert plain(result), (method, result)
        return pickle.loads(pickle.dumps(result))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(front, "Local", Pickling)
        a = front.LiveApp(tiny(step_s=0.1), untrained=True, workdir=tmp_path_factory.mktemp("front"))
    yield a
    a.close()


def test_every_tab_feature_through_plain_data(app, tmp_path):
    from test_render import driving_video
    r = gr.Request(session_hash="tab")
    key = run(app.open_page(r))
    portrait = tmp_path / "portrait.png"
    PIL.Image.fromarray(skimage.data.astronaut()).save(portrait)
    image, status = run(app.set_portrait(str(portrait), r))  # checked by a worker that does not hold the tab yet
    assert "Portrait ready (512×512)" in status and image.shape == (512, 512, 3)
    (tmp_path / "wall.png").write_bytes(b"not an image at all")
    assert "not an image" in run(app.set_portrait(str(tmp_path / "wall.png"), r))[1]  # InputError, pickled
    out = [run(app.http_frame(skimage.data.astronaut(), r)) for _ in range(3)]  # live: the tab is restored
    assert run(app.set_portrait(str(portrait), r))[0].shape == (512, 512, 3)  # now its worker's
    run(app.set_controls(True, True, False, 1.0, True, 0.3, False, 0.1, 0.5, False, r))
    run(app.set_edits(r, "all", *[0.5] + [0.0] * (len(SLIDERS) - 1)))
    out = [run(app.http_frame(skimage.data.astronaut(), r)) for _ in range(3)]
    assert out[-1].shape == (256, 256, 3)
    assert "Live via HTTP streaming" in run(app.stats(r))
    assert "Recording" in run(app.start_recording(r))
    run(app.http_frame(skimage.data.astronaut(), r))
    (path, motion), status = run(app.stop_recording(key, r))  # the take, and its motion as a template
    assert not path.startswith(str(app.dir)) and "Saved" in status and motion.endswith(".pkl")  # Gradio's copies
    with av.open(path) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 1
    assert run(app.reset_reference(r)).startswith("Reference reset")
    link = run(app.share_output("http://example.test/", key, r))
    assert link.startswith("http://example.test/view/") and link.rsplit("/", 1)[1] in app.shared

    class Select:
        value = "Portrait editing"
    edited = run(app.select_tab(Select(), r))
    assert edited.shape == (512, 512, 3)
    driving_video(tmp_path / "driving.mp4", frames=4)
    rendered, _, template, status = run(app.render_video(str(tmp_path / "driving.mp4"), None, True, False, r))
    assert not rendered.startswith(str(app.dir)) and "4 frames" in status and template.endswith(".pkl")
    with av.open(rendered) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    run(app.close_page(r))
    assert {"about", "restore", "stats", "check_portrait", "set_portrait", "set_controls", "http_frame", "start_recording", "stop_recording",
            "reset_reference", "share", "set_editing", "edited", "render", "close_tab"} <= Pickling.seen


def test_a_tab_is_placed_when_it_first_needs_the_engine(tmp_path):
    """Page load places the tab on no worker, nor do the metrics line, the controls, a portrait upload (checked by a
    worker that does not hold the tab), the reference reset, Record, Stop recording or Share output: the front
    answers them from the tab's Page. Going live places it, on one of two workers, and that worker gets the portrait
    and the controls set before; the Portrait editing tab places a tab too."""
    config = tiny(step_s=0.1)
    workers = [Pickling(dataclasses.replace(config, workdir=str(tmp_path / f"w{i}"))) for i in range(2)]
    app = front.LiveApp(config, untrained=True, workdir=tmp_path / "front", workers=workers)
    unplaced = lambda: not app.placed and not any(w.worker.counts()["tabs"] for w in workers)
    try:
        r = gr.Request(session_hash="lazy")
        key = run(app.open_page(r))
        assert unplaced()
        assert "not connected — start the camera" in run(app.stats(r))
        PIL.Image.fromarray(skimage.data.astronaut()[:, ::-1]).save(tmp_path / "mirrored.png")
        image, status = run(app.set_portrait(str(tmp_path / "mirrored.png"), r))
        assert "Portrait ready" in status
        PIL.Image.new("RGB", (400, 300), (70, 130, 180)).save(tmp_path / "wall.png")
        assert "No face found" in run(app.set_portrait(str(tmp_path / "wall.png"), r))[1]  # the last good one stays
        run(app.set_controls(True, True, False, 1.0, True, 0.3, False, 0.1, 0.5, False, r))
        run(app.set_edits(r, "eyes", *[0.5] + [0.0] * (len(SLIDERS) - 1)))
        assert run(app.reset_reference(r)) == "Start the camera first."
        assert run(app.start_recording(r)) == "Start the camera first, then record."
        assert run(app.stop_recording(key, r))[1] == "Nothing recorded yet."
        assert run(app.share_output("http://example.test/", key, r)) == front.SHARE_LIVE

        class Select:
            value = "Live (HTTP streaming)"
        run(app.select_tab(Select(), r))
        assert unplaced(), (app.placed, [w.worker.counts() for w in workers])

        assert run(app.http_frame(skimage.data.astronaut(), r)).shape == (256, 256, 3)  # paste-back off
        held = app.placed["lazy"].worker
        (t,) = held.tabs.values()
        assert np.array_equal(t.source.image, image) and t.pipeline is not None
        assert t.settings.eye_target == 0.3 and t.settings.region == "eyes" and t.settings.edits.smile == 0.5
        assert "Live via HTTP streaming" in run(app.stats(r))

        editing = gr.Request(session_hash="editing")
        run(app.open_page(editing))
        Select.value = "Portrait editing"
        assert run(app.select_tab(Select(), editing)).shape == (512, 512, 3)
        assert app.placed["editing"].worker.tabs["editing"].editor is not None
        for x in (r, editing):
            run(app.close_page(x))
        assert unplaced()
    finally:
        app.close()


def test_launch_imports_no_ray():
    """The single-process default needs no Ray installed: neither the entry point nor the app imports it."""
    code = "import sys, launch, web.app, web.worker; sys.exit('ray' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr


def test_a_draining_worker_admits_no_new_session_and_keeps_its_live_ones(tmp_path):
    """drain(): the worker lets go of its tabs without a live session and refuses a new one with the message,
    whatever room it has; a live session streams on until it ends."""
    worker = Local(tiny(step_s=0.1, workdir=str(tmp_path)))
    try:
        for tab in ("live", "idle", "late"):
            run(worker.call("restore", tab, None, {}, False))
        run(worker.call("http_frame", "live", skimage.data.astronaut()))
        assert run(worker.call("drain", 60.0)) == ["idle", "late"]
        run(worker.call("restore", "late", None, {}, False))  # a tab placed there meanwhile
        with pytest.raises(ServerFull, match="being drained"):
            run(worker.call("http_frame", "late", skimage.data.astronaut()))
        assert run(worker.call("http_frame", "live", skimage.data.astronaut())).shape == (512, 512, 3)
        health = run(worker.call("health"))
        assert health["draining"] and health["live_sessions"] == 1 < health["capacity"]
    finally:
        worker.close()


class Held(Local):
    """The in-process worker, whose health answers to the front's watch `Held.watch(app, gate)` reach that watch
    only once `gate` is set (a watch that was answered, then was slow to act on the answers)."""

    gate: contextvars.ContextVar = contextvars.ContextVar("gate", default=None)

    async def call(self, method, *args, **kw):
        result = await super().call(method, *args, **kw)
        if method == "health" and (gate := self.gate.get()):
            await gate.wait()
        return result

    @classmethod
    async def watch(cls, app, gate: asyncio.Event) -> list[str]:
        cls.gate.set(gate)  # this task's context, and so its health calls', not the other tasks'
        return await app.watch()


def test_a_worker_drained_from_outside_is_drained_by_the_front(tmp_path):
    """`launch.py --drain` tells the worker, not the front: the front's watch sees it in the worker's health and
    drains it. No tab is placed there any more, its live session goes on for the time the drain was given, then the
    worker leaves the front and that tab's page is told why (from which it connects again, to the other worker,
    which is given the tab's view link). The other worker's tabs are told nothing: a drain is not a loss. A watch whose health call was answered
    "draining" just before the drain ended starts no second drain."""
    config = tiny(step_s=0.1, max_sessions=3)
    workers = [Held(dataclasses.replace(config, workdir=str(tmp_path / f"w{i}"))) for i in range(2)]
    app = front.LiveApp(config, untrained=True, workdir=tmp_path / "front", workers=workers)
    face = skimage.data.astronaut()
    drained, other = workers
    pages = {s: gr.Request(session_hash=s) for s in ("hit", "steady", "late")}

    async def scenario() -> dict:
        for session, worker in (("hit", drained), ("steady", other)):
            await app.open_page(pages[session])
            app.placed[session] = worker
            await app.http_frame(face, pages[session])
        token = await app.share("hit")  # its view link (Share output)
        await drained.call("drain", 1.0)  # what launch.py --drain does
        told = await app.watch()
        (drain,) = app.drains
        await app.open_page(pages["late"])
        await app.http_frame(face, pages["late"])  # placed while the drain runs
        placed = app.placed["late"]
        gate = asyncio.Event()
        late = asyncio.create_task(Held.watch(app, gate))  # answered while draining, held until the drain ends
        ended = await asyncio.wait_for(drain, 60)
        gate.set()
        await late
        again = list(app.drains)
        line = await app.stats(pages["hit"])
        lost = {s: app.pages[s].lost for s in pages}
        back = await app.http_frame(face, pages["hit"])  # live again, on the other worker
        views = dict(app.shared), token in other.worker.views
        return dict(told=told, placed=placed, ended=ended, again=again, line=line, lost=lost, back=back,
                    views=views, token=token, on=app.placed["hit"], workers=list(app.workers))
    try:
        got = asyncio.run(scenario())
    finally:
        app.close()
        drained.close()
    assert got["told"] == [] and got["placed"] is other
    assert got["ended"] is False and got["again"] == [] and got["workers"] == [other] and got["on"] is other
    assert got["lost"]["hit"].startswith("the server lost its worker local (drained") and front.LOST in got["line"]
    assert got["lost"]["steady"] is None and got["lost"]["late"] is None
    assert got["back"].shape == (512, 512, 3)
    assert got["views"] == ({got["token"]: "hit"}, True)  # the link moved with its tab
