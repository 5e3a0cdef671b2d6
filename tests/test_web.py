"""The page's handlers and the live server: bad uploads get a clear message in the page and the server keeps
serving; the HTTP streaming fallback animates; the signalling route refuses strangers and cleans up bad offers."""
import json
import socket
from pathlib import Path

import av
import gradio as gr
import httpx
import numpy as np
import PIL.Image
import pytest
import skimage.data
from gradio_client import Client, handle_file

from conftest import run, tiny
from web.app import LOST, LiveApp
from web.webrtc import parse_ice_servers
from web.worker import WorkerLost

ASTRONAUT = skimage.data.astronaut()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return LiveApp(tiny(), untrained=True, workdir=tmp_path_factory.mktemp("recordings"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("uploads")
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # a PNG signature, then junk
    png = d / "truncated.png"
    PIL.Image.fromarray(ASTRONAUT).save(png)
    (d / "truncated.png").write_bytes(png.read_bytes()[:5000])
    (d / "notes.png").write_text("these are meeting notes, not a photo\n" * 20)
    PIL.Image.new("L", (9000, 40)).save(d / "huge.png")  # small file, too many pixels
    with open(d / "heavy.jpg", "wb") as f:
        f.truncate(21 * 2**20)  # over 20 MB
    PIL.Image.new("RGB", (400, 300), (70, 130, 180)).save(d / "wall.png")  # no face
    PIL.Image.fromarray(ASTRONAUT).save(d / "astronaut.jpg")
    return d


def request(session: str) -> gr.Request:
    return gr.Request(session_hash=session)


@pytest.mark.parametrize("name, message", [
    ("corrupt.png", "corrupt or truncated"),
    ("truncated.png", "corrupt or truncated"),
    ("notes.png", "not an image"),
    ("huge.png", "9000×40 pixels; portraits are limited to 8000"),
    ("heavy.jpg", "21 MB; portraits are limited to 20 MB"),
    ("wall.png", "No face found in the portrait"),
])
def test_bad_portraits_explain_and_keep_the_old_one(app, files, name, message):
    run(app.open_page(request("bad")))
    preview, status = run(app.set_portrait(str(files / name), request("bad")))
    assert message in status and "Portrait not used" in status
    assert app.pages["bad"].portrait is None


def test_good_portrait_and_sample(app, files):
    r = request("good")
    run(app.open_page(r))
    preview, status = run(app.set_portrait(str(files / "astronaut.jpg"), r))
    assert "Portrait ready (512×512)" in status and preview.shape == (512, 512, 3)
    assert app.pages["good"].portrait == (files / "astronaut.jpg").read_bytes() and "good" not in app.placed
    run(app.http_frame(ASTRONAUT, r))  # live: its worker gets the portrait
    assert app.workers[0].worker.tabs["good"].source is not app.workers[0].worker.sample
    preview, status = run(app.use_sample(r))
    assert app.workers[0].worker.tabs["good"].source is app.workers[0].worker.sample and "Sample portrait" in status
    run(app.close_page(r))


def test_http_streaming_fallback_animates_and_cleans_up(app):
    r = request("http")
    key = run(app.open_page(r))
    run(app.set_controls(True, True, False, 1.0, True, 0.3, False, 0.1, 0.5, False, r))  # paste-back off: 256² face
    assert "not connected" in run(app.stats(r))
    outputs = [run(app.http_frame(np.roll(ASTRONAUT, i, axis=1), r)) for i in range(4)]
    assert outputs[-1].shape == (256, 256, 3)
    page = app.workers[0].worker.tabs["http"]
    assert page.settings.eye_target == 0.3 and page.settings.lip_target is None
    assert "Live via HTTP streaming" in run(app.stats(r))
    assert page.pipeline.metrics.frames_out >= 3
    name = page.pipeline.name
    assert name in app.workers[0].worker.engine.sessions
    assert "Recording" in run(app.start_recording(r))
    for _ in range(3):
        run(app.http_frame(ASTRONAUT, r))
    (path, motion), status = run(app.stop_recording(key, r))  # the take, and its motion as a template
    assert "Saved" in status and Path(motion).name == Path(path).with_suffix(".pkl").name
    with av.open(path) as c:
        frames = sum(1 for _ in c.decode(video=0))
    from model.template import load
    assert frames >= 3 and len(load(motion)) == frames
    assert "Recording" in run(app.start_recording(r))
    run(app.http_frame(ASTRONAUT, r))
    run(app.close_page(r))  # tab closed while recording: the file is finalised, the engine session freed
    assert name not in app.workers[0].worker.engine.sessions and "http" not in app.pages
    (take,) = page.takes  # kept for a download that will not come: the tab is gone, the work dir's limits apply
    assert take.stat().st_size > 0


class Unreachable:
    """A worker handle whose every call fails the way web/cluster.py's `Remote` does for a dead actor."""
    name = "worker-9"

    async def call(self, method: str, *args, timeout: float = 0) -> None:
        raise WorkerLost(f"the server lost its worker {self.name} (ActorDiedError)")


def test_the_tabs_of_a_worker_that_stops_answering_are_told_why(app):
    """The front's watch: the tab placed on a worker that does not answer is told why (once), in its metrics line,
    with its lost recording; a tab elsewhere is not; the tab's next call goes to the worker that answers, and once
    it is live there the reason goes."""
    lost, hit, other = Unreachable(), request("on-lost"), request("elsewhere")
    for r in (hit, other):
        run(app.open_page(r))
    app.workers.append(lost)
    try:
        app.placed["on-lost"] = lost
        assert run(app.watch()) == ["on-lost"] and run(app.watch()) == []
        for _ in range(2):  # from the watch, then from the failed call (which forgets the placement)
            line = run(app.stats(hit))
            assert f"the server lost its worker worker-9 (ActorDiedError): {LOST}." in line, line
        assert "lost its worker" not in run(app.stats(other))
        for _ in range(20):
            if getattr(run(app.http_frame(ASTRONAUT, hit)), "shape", None) == (512, 512, 3):
                break
        assert "Live via HTTP streaming" in run(app.stats(hit)) and app.pages["on-lost"].lost is None
        assert app.placed["on-lost"] is app.workers[0]
    finally:
        app.workers.remove(lost)
        for r in (hit, other):
            run(app.close_page(r))


class Progress:
    """A page's progress bar (gr.Progress's call): what a handler reported, in order."""

    def __init__(self):
        self.steps: list[tuple[float, str | None]] = []

    def __call__(self, fraction: float, desc: str | None = None) -> None:
        self.steps.append((fraction, desc))


def test_video_file_tab(app, files, tmp_path):
    from test_render import driving_video
    driving_video(tmp_path / "driving.mp4", frames=6)
    driving_video(tmp_path / "source.mp4", frames=4)
    r = request("render")
    progress = Progress()  # the render runs on the worker (its loop's thread): its progress still reaches the page
    path, image, template, status = run(app.render_video(str(tmp_path / "driving.mp4"), None, True, False, r,
                                                         progress))
    assert "6 frames at 15 fps, with audio; motion template saved" in status and image is None
    fractions = [f for f, _ in progress.steps]
    assert fractions == sorted(fractions) and progress.steps[-1] == (1.0, "render: 6 frames"), progress.steps
    with av.open(path) as c:
        assert len(c.streams.audio) == 1 and sum(1 for _ in c.decode(video=0)) == 6
    assert template.endswith(".pkl")
    # the saved template drives a source video; a driving image gives one image
    path, image, _, status = run(app.render_video(template, str(tmp_path / "source.mp4"), False, True, r))
    assert "4 frames at 15 fps, with audio" in status and image is None
    path, image, _, status = run(app.render_video(str(files / "astronaut.jpg"), None, False, False, r))
    assert path is None and image.endswith(".png") and status == "One image, 512×512."
    for name, message in (("notes.png", "driving video 'notes.png'"), ("wall.png", "No face found in the driving")):
        path, image, _, status = run(app.render_video(str(files / name), None, False, False, r))
        assert path is None and image is None and message in status


def test_ice_servers_parsing():
    assert parse_ice_servers(None) == [] and parse_ice_servers("") == []
    assert parse_ice_servers("stun:a:3478, turn:b:3478") == [{"urls": "stun:a:3478"}, {"urls": "turn:b:3478"}]
    assert parse_ice_servers('[{"urls": "turn:b", "username": "u", "credential": "p"}]')[0]["username"] == "u"
    with pytest.raises(ValueError):
        parse_ice_servers('[{"url": "stun:a"}]')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(app, loopback_only):
    port = free_port()
    demo = app.launch(port=port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_live_server_survives_bad_uploads(app, server, files):
    alice, bob = Client(server, verbose=False), Client(server, verbose=False)
    for name, message in [("corrupt.png", "corrupt"), ("notes.png", "not an image"), ("wall.png", "No face")]:
        _, status = alice.predict(handle_file(str(files / name)), api_name="/set_portrait")
        assert message in status
    _, status = alice.predict(handle_file(str(files / "heavy.jpg")), api_name="/set_portrait")
    assert "21 MB; portraits are limited to 20 MB" in status  # uploads may be larger: driving videos
    _, status = bob.predict(handle_file(str(files / "astronaut.jpg")), api_name="/set_portrait")
    assert "Portrait ready" in status
    assert "not connected" in bob.predict(api_name="/stats")
    page = httpx.get(server)
    assert page.status_code == 200 and "LivePortrait Live" in page.text


def test_offer_route(app, server):
    offer = httpx.post(server + "offer", json={"session": "nobody", "secret": "x", "sdp": "v=0", "type": "offer"})
    assert offer.status_code == 400  # checked before the session is looked up
    assert httpx.post(server + "offer", content=b"{not json").status_code == 415  # not application/json
    assert httpx.post(server + "offer", content=b"{not json", headers={"content-type": "application/json"}
                      ).status_code == 400
    page = json.loads(run(app.open_page(request("tab"))))
    bad = httpx.post(server + "offer", json={**page, "sdp": "not sdp", "type": "offer"})
    assert bad.status_code == 400 and "bad offer" in bad.json()["error"]
    assert "tab" not in app.placed and not app.workers[0].worker.counts()["peers"]  # refused before any worker
