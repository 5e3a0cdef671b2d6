"""View-only links with real WebRTC over loopback, without a browser: aiortc clients as the performer (web/loadtest.py)
and as viewers. Share output makes a token; viewers receive the performer's frames, at most --max-viewers of them;
a wrong or revoked token gets 404, a view token at /offer 403; viewers end with the performer's connection, with
the link and with the tab, and leave no peer, track or encoder behind; a view offer controls nothing."""
import asyncio
import gc
import json

import gradio as gr
import httpx
import pytest
import skimage.data
from aiortc import RTCPeerConnection, RTCRtpSender, RTCSessionDescription

from conftest import run, tiny
from stream.serve_bench import moving_face
from test_reliability import free_port, valid_offer_sdp, wait_until
from web import loadtest
from web.app import SHARE_LIVE
from web.webrtc import AnimatedTrack

MAX_VIEWERS = 2
ASTRONAUT = skimage.data.astronaut()


@pytest.fixture(scope="module")
def served(tmp_path_factory, loopback_only):
    from web.app import LiveApp

    loadtest.loopback_ice()
    app = LiveApp(tiny(max_viewers=MAX_VIEWERS), untrained=True, workdir=tmp_path_factory.mktemp("work"))
    port = free_port()
    demo = app.launch(port=port, block=False)
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()
    app.close()


def server_media() -> dict:
    """The server's live output tracks and the encoders of its senders (the clients' are not AnimatedTracks)."""
    objects = gc.get_objects()
    tracks = [o for o in objects if isinstance(o, AnimatedTrack) and o.readyState == "live"]
    encoders = [o for o in objects if isinstance(o, RTCRtpSender) and isinstance(o.track, AnimatedTrack)
                and o._RTCRtpSender__encoder is not None]
    return dict(tracks=len(tracks), encoders=len(encoders))


def settled(app) -> dict:
    """What is left once nobody watches (empty dict: all clear)."""
    left = dict(viewers=app.workers[0].worker.counts()["viewers"], **server_media())
    return {k: v for k, v in left.items() if v}


async def watch(http: httpx.AsyncClient, token: str) -> tuple[RTCPeerConnection, asyncio.Future, httpx.Response]:
    """A viewer as the /view page is: a receive-only offer to /view/<token>/offer; (peer, its track, response)."""
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    received = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: received.done() or received.set_result(track))
    await pc.setLocalDescription(await pc.createOffer())
    r = await http.post(f"view/{token}/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"})
    if r.status_code == 200:
        answer = loadtest.loopback_only_sdp(r.json()["sdp"])
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
    else:
        await pc.close()
    return pc, received, r


async def frames(track, n: int, timeout: float = 60) -> list:
    return [await asyncio.wait_for(track.recv(), timeout) for _ in range(n)]


async def until(condition, timeout: float = 30) -> bool:
    for _ in range(int(timeout * 10)):
        if condition():
            return True
        await asyncio.sleep(0.1)
    return bool(condition())


def test_viewers_watch_bounded_revocable_and_leave_nothing(served):
    app, url = served
    worker = app.workers[0].worker
    gc.collect()
    assert not settled(app), settled(app)

    sdp = valid_offer_sdp()  # a webcam's offer

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            tab = loadtest.Tab(http)
            page = await tab.open()
            # a tab that has not been live is held by no worker: nothing to share yet
            assert (await tab.call("share_output", [url, json.dumps(page)]))[0] == SHARE_LIVE and not worker.views

            performer, received = loadtest.new_peer(moving_face(), 10)
            await loadtest.offer(http, performer, page)
            own = await frames(await asyncio.wait_for(received, 30), 2)
            link = (await tab.call("share_output", [url, json.dumps(page)]))[0]
            assert link.startswith(url + "view/")
            token = link.rsplit("/", 1)[1]
            assert len(token) >= 32 and worker.tabs[tab.session].token == token
            assert (await http.get(f"view/{token}")).status_code == 200
            # a wrong token is 404 everywhere
            assert (await http.get("view/wrong-token")).status_code == 404
            assert (await watch(http, "wrong-token"))[2].status_code == 404
            # a view token is no page secret: /offer refuses it with 403, as the page's secret or as a session
            for fields in ({"session": tab.session, "secret": token}, {"session": token, "secret": token}):
                assert (await http.post("offer", json={"sdp": sdp, "type": "offer", **fields})).status_code == 403
            assert worker.counts()["live"] == 1
            t = worker.tabs[tab.session]
            pipeline = t.pipeline

            viewers = [await watch(http, token) for _ in range(MAX_VIEWERS)]
            assert [r.status_code for _, _, r in viewers] == [200] * MAX_VIEWERS
            for _, track, _ in viewers:
                got = await frames(await asyncio.wait_for(track, 30), 3)
                assert {(f.width, f.height) for f in got} == {(own[0].width, own[0].height)} == {(512, 512)}
            refused = await watch(http, token)
            assert refused[2].status_code == 429
            assert refused[2].json()["error"] == f"this output already has {MAX_VIEWERS} viewers"
            assert worker.counts()["viewers"] == MAX_VIEWERS and worker.counts()["peers"] == 1
            assert (await app.workers[0].call("stats", tab.session))["viewers"] == MAX_VIEWERS
            assert (await http.get("healthz")).json()["viewers"] == MAX_VIEWERS
            assert server_media() == dict(tracks=1 + MAX_VIEWERS, encoders=1 + MAX_VIEWERS)

            # a view offer controls nothing: one that sends a webcam is refused, the performer's frames go on
            frames_in = pipeline.metrics.frames_in
            webcam = await http.post(f"view/{token}/offer", json={"sdp": sdp, "type": "offer"})
            assert webcam.status_code == 400 and worker.counts()["viewers"] == MAX_VIEWERS
            assert await until(lambda: pipeline.metrics.frames_in > frames_in)

            # the performer stops: the viewers' connections end, nothing of theirs is left; the link waits (409)
            await performer.close()
            assert await until(lambda: all(pc.connectionState == "closed" for pc, _, _ in viewers), 10)
            assert await until(lambda: t.conn is None and not settled(app))
            for pc, _, _ in viewers:
                await pc.close()
            assert (await watch(http, token))[2].status_code == 409

            # the same page goes live again: the same link works again
            performer, received = loadtest.new_peer(moving_face(), 10)
            await loadtest.offer(http, performer, page)
            await frames(await asyncio.wait_for(received, 30), 1)
            again, track, r = await watch(http, token)
            assert r.status_code == 200 and len(await frames(await asyncio.wait_for(track, 30), 2)) == 2

            # a new link revokes the old one: its viewer ends, it is 404; the new one works
            link2 = (await tab.call("share_output", [url, json.dumps(page)]))[0]
            assert link2 != link
            assert await until(lambda: again.connectionState == "closed", 10)
            assert (await http.get(f"view/{token}")).status_code == 404
            assert (await watch(http, token))[2].status_code == 404
            newer, track, r = await watch(http, link2.rsplit("/", 1)[1])
            assert r.status_code == 200 and len(await frames(await asyncio.wait_for(track, 30), 1)) == 1

            # the tab closes: its viewer ends, the link is gone, nothing is left
            await tab.close()
            assert await until(lambda: newer.connectionState == "closed" and not worker.tabs, 30)
            for pc in (again, newer, performer):
                await pc.close()
            assert (await http.get(link2)).status_code == 404
    asyncio.run(scenario())
    assert wait_until(lambda: not settled(app) and not app.workers[0].worker.counts()["views"]), settled(app)
    assert wait_until(lambda: not any(app.workers[0].worker.counts().values())), app.workers[0].worker.counts()


def test_view_page_options_are_checked(served):
    app, url = served
    run(app.http_frame(ASTRONAUT, gr.Request(session_hash="options-tab")))  # live: it has a worker to share from
    token = run(app.share("options-tab"))
    try:
        page = httpx.get(f"{url}view/{token}?bg=00ff00&fit=cover")
        assert page.status_code == 200 and '"bg": "#00ff00"' in page.text and '"fit": "cover"' in page.text
        assert "gradio_api" not in page.text and "<script src" not in page.text
        assert page.headers["referrer-policy"] == "no-referrer"
        for bad in ("bg=00ff0", "bg=00ff001", "bg=gg0000", "bg=%2300ff00", "bg=00ff00%0a", "bg=<b>x</b>", "fit=fill",
                    "fit=<script>"):
            r = httpx.get(f"{url}view/{token}?{bad}")
            assert r.status_code == 400 and r.headers["content-type"].startswith("text/plain"), bad
    finally:
        run(app.close_page(gr.Request(session_hash="options-tab")))
    assert httpx.get(f"{url}view/{token}").status_code == 404


def test_under_auth_the_link_is_the_permission_to_watch(tmp_path, loopback_only):
    """With --auth the page and /offer need the login; the view link does not (OBS cannot log in): a viewer with
    no login but the link watches the logged-in performer's output, and a wrong token is still 404."""
    from web.app import LiveApp

    loadtest.loopback_ice()
    app = LiveApp(tiny(), untrained=True, workdir=tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    demo = app.launch(port=port, auth=[("ada", "lovelace")], block=False)
    sdp = valid_offer_sdp()

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as ada, \
                httpx.AsyncClient(base_url=url, timeout=30) as anonymous:
            assert (await ada.post("login", data={"username": "ada", "password": "lovelace"})).status_code == 200
            tab = loadtest.Tab(ada)
            page = await tab.open()
            assert (await anonymous.post("offer", json={"sdp": sdp, "type": "offer", **page})
                    ).status_code == 401
            performer, received = loadtest.new_peer(moving_face(), 10)
            await loadtest.offer(ada, performer, page)
            await frames(await asyncio.wait_for(received, 30), 1)
            link = (await tab.call("share_output", [url, json.dumps(page)]))[0]
            token = link.rsplit("/", 1)[1]
            assert (await anonymous.get(f"view/{token}")).status_code == 200
            assert (await anonymous.get(f"view/{token[:-1]}")).status_code == 404
            viewer, track, r = await watch(anonymous, token)
            assert r.status_code == 200, r.text
            got = await frames(await asyncio.wait_for(track, 30), 2)
            assert len(got) == 2 and app.workers[0].worker.counts()["viewers"] == 1
            for pc in (viewer, performer):
                await pc.close()
            await tab.close()
    try:
        asyncio.run(scenario())
        assert wait_until(lambda: not app.workers[0].worker.tabs, 30)
    finally:
        demo.close()
        app.close()


def test_each_track_gets_the_newest_frame_and_a_slow_one_holds_back_nobody(served):
    """Two output tracks on one session (the performer's and a viewer's): the one read at every output gets each
    frame; the one not read meanwhile then gets only the newest, once (no backlog); stopping frees its listener."""
    from stream.pipeline import SessionPipeline

    app, _ = served
    sample = app.workers[0].worker.sample

    async def scenario() -> None:
        pipe = SessionPipeline(app.workers[0].worker.engine, sample, transport="WebRTC", stream_max=720, images=False)
        fast, slow = AnimatedTrack(), AnimatedTrack()
        fast.bind(pipe)
        slow.bind(pipe)
        try:
            for i in range(4):
                pipe.submit(sample.image)
                await asyncio.wait_for(fast.recv(), 60)
                assert fast._seq == pipe.seq == i + 1
            await asyncio.wait_for(slow.recv(), 5)
            assert slow._seq == pipe.seq == 4  # the newest output, not the first of a queue
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(slow.recv(), 0.5)  # nothing older is left to send
        finally:
            fast.stop()
            slow.stop()
            assert pipe._listeners == []
            await asyncio.to_thread(pipe.close)
    asyncio.run(scenario())
