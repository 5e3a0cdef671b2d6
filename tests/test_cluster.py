"""Cluster mode on one machine: the workers are Ray actors in processes of their own (web/cluster.py), called by
the front exactly like the in-process worker. Tabs are placed on the freer worker, so two live sessions land on
both; each worker admits atomically, so at one session per worker a third is told the server is full and two
offers for the last slot never both get it; each worker is given a GPU of its own. One private Ray runtime for the
module (4 fake GPUs, so the bookkeeping shows without any), real aiortc over loopback in every process."""
import asyncio
import os

import av
import gradio as gr
import httpx
import numpy as np
import pytest
import skimage.data

from conftest import ROOT, run, tiny
from model.editing import SLIDERS
from stream.serve_bench import moving_face
from test_reliability import free_port, wait_until
from web import loadtest
from web.worker import WorkerLost

ray = pytest.importorskip("ray")
ASTRONAUT = skimage.data.astronaut()


@pytest.fixture(scope="module")
def runtime(loopback_only):
    """A private Ray runtime; its worker processes see this tree's code and gather ICE on loopback only."""
    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, namespace="liveportrait",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)},
                          "worker_process_setup_hook": "web.loadtest.loopback_ice"})
    yield
    ray.shutdown()


def test_each_worker_gets_a_gpu_of_its_own(runtime):
    """4 (fake) GPUs, 4 workers: 4 distinct CUDA_VISIBLE_DEVICES. The actors are started with the options
    `Cluster` starts its workers with (web.cluster.placement); what runs in them only reports what Ray gave its
    process, so no engine is built. (First: the other tests' workers hold 2 GPUs.)"""
    from web.cluster import placement

    class Probe:
        def devices(self) -> tuple[str | None, int]:
            return os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()
    n, options = placement(4)
    assert options["num_gpus"] == 1
    probes = [ray.remote(Probe).options(**options).remote() for _ in range(n)]
    try:
        seen = ray.get([p.devices.remote() for p in probes], timeout=120)
    finally:
        for p in probes:
            ray.kill(p)
    assert sorted(d for d, _ in seen) == ["0", "1", "2", "3"] and len({pid for _, pid in seen}) == 4, seen
    with pytest.raises(ValueError, match="--workers 5: the cluster has 4 GPUs"):
        placement(5)


def front(tmp_path_factory, max_sessions: int):
    """Two CPU workers of `max_sessions` live sessions each, behind one front on a loopback port: (app, its URL)."""
    from web.app import LiveApp
    from web.cluster import Cluster

    loadtest.loopback_ice()
    cluster = Cluster(tiny(max_sessions=max_sessions, step_s=0.1), 2)
    app = LiveApp(tiny(), untrained=True, workdir=tmp_path_factory.mktemp("front"), workers=cluster.workers)
    port = free_port()
    demo = app.launch(port=port, block=False)
    yield app, f"http://127.0.0.1:{port}/"
    demo.close()
    app.close()


@pytest.fixture(scope="module")
def served(runtime, tmp_path_factory):
    yield from front(tmp_path_factory, 1)


def healths(app) -> list[dict]:
    async def all_():
        return await asyncio.gather(*(w.call("health") for w in app.workers))
    return run(all_())


def counts(app) -> list[dict]:
    async def all_():
        return await asyncio.gather(*(w.call("counts") for w in app.workers))
    return run(all_())


async def live_tab(http: httpx.AsyncClient) -> tuple:
    """A tab that goes live over WebRTC and receives a frame: (its Tab, its peer)."""
    tab = loadtest.Tab(http)
    pc, received = loadtest.new_peer(moving_face(4), 10)
    await loadtest.offer(http, pc, await tab.open())
    await asyncio.wait_for((await asyncio.wait_for(received, 60)).recv(), 60)
    return tab, pc


def test_sessions_on_both_workers_and_a_third_is_told_full(served):
    app, url = served

    async def scenario() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            first, second = await live_tab(http), await live_tab(http)
            health = healths(app)
            third = loadtest.Tab(http)
            page = await third.open()
            pc, _ = loadtest.new_peer(moving_face(4), 10)
            await pc.setLocalDescription(await pc.createOffer())
            full = await http.post("offer", json={"sdp": pc.localDescription.sdp, "type": "offer", **page})
            await pc.close()
            for tab, peer in (first, second):
                await peer.close()
                await tab.close()
            await third.close()
            return dict(health=health, full=(full.status_code, full.json()))
    got = asyncio.run(scenario())
    assert [h["live_sessions"] for h in got["health"]] == [1, 1]
    assert len({h["pid"] for h in got["health"]}) == 2 and os.getpid() not in {h["pid"] for h in got["health"]}
    assert got["full"] == (503, {"error": "the server is full (1 live session); try again shortly"})
    assert wait_until(lambda: all(h["live_sessions"] == 0 for h in healths(app)), 60)


def test_http_streaming_in_cluster_mode(served):
    app, _ = served
    r = gr.Request(session_hash="http")
    run(app.open_page(r))
    out = [run(app.http_frame(ASTRONAUT, r)) for _ in range(3)]
    assert out[-1].shape == (512, 512, 3) and "Live via HTTP streaming" in run(app.stats(r))
    run(app.close_page(r))
    assert wait_until(lambda: all(h["live_sessions"] == 0 for h in healths(app)), 60)


def test_two_concurrent_offers_for_the_last_slot(served):
    """One worker is taken; two tabs placed on the other offer at once: one gets in, the other is told."""
    app, url = served

    async def scenario() -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            taken = await live_tab(http)
            tabs = [loadtest.Tab(http) for _ in range(2)]
            pages = [await t.open() for t in tabs]
            for t in tabs:  # both on the free worker
                app.placed[t.session] = next(w for w in app.workers if w is not app.placed[taken[0].session])
            peers = [loadtest.new_peer(moving_face(4), 10)[0] for _ in tabs]
            for pc in peers:
                await pc.setLocalDescription(await pc.createOffer())
            rs = await asyncio.gather(*[http.post("offer", json={"sdp": pc.localDescription.sdp, "type": "offer",
                                                                 **p}) for pc, p in zip(peers, pages)])
            for pc in [*peers, taken[1]]:
                await pc.close()
            for t in [*tabs, taken[0]]:
                await t.close()
            return sorted(r.status_code for r in rs)
    assert asyncio.run(scenario()) == [200, 503]
    assert wait_until(lambda: all(h["live_sessions"] == 0 for h in healths(app)), 60)


def test_editor_in_cluster_mode(served):
    """The Portrait editing tab: its engine session is the worker's, its image comes back as an array."""
    app, _ = served
    r = gr.Request(session_hash="editor")
    run(app.open_page(r))

    class Select:
        value = "Portrait editing"
    edited = run(app.select_tab(Select(), r))
    moved = run(app.set_edits(r, "all", *[0.8] + [0.0] * (len(SLIDERS) - 1)))
    assert edited.shape == moved.shape == (512, 512, 3) and not np.array_equal(edited, moved)
    assert run(app.placed["editor"].call("counts"))["engine_sessions"] >= 1
    run(app.close_page(r))
    assert wait_until(lambda: all(w["engine_sessions"] == 0 for w in counts(app)), 60)


def test_recording_download_in_cluster_mode(served):
    """A take recorded on the worker reaches the page as the front's own copy of its bytes."""
    app, _ = served
    r = gr.Request(session_hash="recording")
    key = run(app.open_page(r))
    run(app.http_frame(ASTRONAUT, r))
    assert "Recording" in run(app.start_recording(r))
    for _ in range(3):
        run(app.http_frame(ASTRONAUT, r))
    paths, status = run(app.stop_recording(key, r))
    assert "Saved" in status and paths[0].endswith(".mp4"), paths
    assert not any(p.startswith(str(app.dir)) for p in paths)
    with av.open(paths[0]) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 1
    run(app.close_page(r))
    assert wait_until(lambda: all(h["live_sessions"] == 0 for h in healths(app)), 60)


def test_video_file_render_in_cluster_mode(served, tmp_path):
    """A driving video goes to the worker as bytes; the render comes back as bytes, written by the front, and its
    progress reaches the page's progress bar as data."""
    from test_render import driving_video
    from test_web import Progress
    app, _ = served
    r = gr.Request(session_hash="render")
    run(app.open_page(r))
    driving_video(tmp_path / "driving.mp4", frames=4)
    progress = Progress()
    rendered, image, template, status = run(app.render_video(str(tmp_path / "driving.mp4"), None, True, False, r,
                                                             progress))
    assert image is None and "4 frames" in status and "motion template saved" in status, status
    fractions = [f for f, _ in progress.steps]
    assert fractions == sorted(fractions) and progress.steps[-1] == (1.0, "render: 4 frames"), progress.steps
    assert not rendered.startswith(str(app.dir)) and template.endswith(".pkl")
    with av.open(rendered) as c:
        assert sum(1 for _ in c.decode(video=0)) == 4
    run(app.close_page(r))


def test_view_link_in_cluster_mode(served):
    """Share output on a tab live on one worker: the front routes the view token to that worker, whose viewer
    receives the performer's frames."""
    from test_view import watch
    app, url = served

    async def scenario() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            tab, peer = await live_tab(http)
            token = await app.share(tab.session)
            page = await http.get(f"view/{token}")
            viewer, track, r = await watch(http, token)
            frame = await asyncio.wait_for((await asyncio.wait_for(track, 60)).recv(), 60)
            health = await app.placed[tab.session].call("health")
            await viewer.close()
            await peer.close()
            await tab.close()  # its unload revokes the link
            for _ in range(300):
                if (wrong := await http.get(f"view/{token}")).status_code != 200:
                    break
                await asyncio.sleep(0.1)
            return dict(page=page.status_code, offer=r.status_code, size=(frame.width, frame.height),
                        viewers=health["viewers"], wrong=wrong.status_code)
    got = asyncio.run(scenario())
    assert got == dict(page=200, offer=200, size=(512, 512), viewers=1, wrong=404), got
    assert wait_until(lambda: all(h["live_sessions"] == h["viewers"] == 0 for h in healths(app)), 60)


def test_a_killed_worker_loses_only_its_tabs_session_and_they_come_back(served, tmp_path):
    """SIGKILL of one worker's process: the tab on the other worker streams on without a stall over 6 s; the hit
    tab's frames say why, and within 20 s it streams again (on the restarted worker or the other one), with the
    portrait and controls the front kept."""
    import signal
    import time

    import cv2
    import PIL.Image
    app, _ = served
    steady, hit = gr.Request(session_hash="steady"), gr.Request(session_hash="hit")
    app.placed["steady"], app.placed["hit"] = app.workers  # one on each worker
    for r in (steady, hit):
        run(app.open_page(r))
    portrait = tmp_path / "portrait.png"
    PIL.Image.fromarray(cv2.resize(ASTRONAUT, (384, 384))).save(portrait)
    assert "Portrait ready (384×384)" in run(app.set_portrait(str(portrait), hit))[1]
    run(app.set_controls(True, True, True, 1.0, False, 0.3, False, 0.1, 0.0, False, hit))
    for r in (steady, hit):
        run(app.http_frame(ASTRONAUT, r))
    pid = run(app.placed["hit"].call("health"))["pid"]
    os.kill(pid, signal.SIGKILL)

    start = last_steady = time.monotonic()
    gaps, told, back = [], [], None
    while time.monotonic() - start < 60 and back is None:
        out = run(app.http_frame(ASTRONAUT, steady))
        now = time.monotonic()
        if out is not None and out.shape == (512, 512, 3) and out.mean() > ASTRONAUT.mean() / 2:
            gaps.append(now - last_steady)
            last_steady = now
        out = run(app.http_frame(ASTRONAUT, hit))
        if out.shape == ASTRONAUT.shape and out.mean() < ASTRONAUT.mean() / 2:
            told.append(time.monotonic() - start)  # the darkened webcam frame with the reason on it
        elif out.shape == (384, 384, 3):
            back = time.monotonic() - start
    assert back is not None and back < 20, (back, told)
    assert max(gaps) < 6, gaps
    for r in (steady, hit):
        run(app.close_page(r))
    assert wait_until(lambda: all(h["live_sessions"] == 0 for h in healths(app)), 60)


def test_the_front_tells_the_tabs_of_a_restarted_worker_why(served):
    """A worker's process killed and restarted by Ray before the hit tab calls again: the front's watch noticed (the
    worker answered from another process), so the tab's metrics line says why and that its recording is lost,
    not just "not connected"; the tab on the other worker is not told; once live again, the reason goes. The hit
    tab's view link (an OBS scene's, say) stays valid throughout: its viewer is told the performer is not live
    until the tab is live again on the restarted worker, then it is answered."""
    import signal

    from test_view import watch
    from web.app import LOST
    app, url = served

    async def view(token: str) -> tuple[int, int]:
        """A viewer's view page and offer: their status codes."""
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            page = await http.get(f"view/{token}")
            pc, _, r = await watch(http, token)
            await pc.close()
            return page.status_code, r.status_code
    steady, hit = gr.Request(session_hash="steady-2"), gr.Request(session_hash="hit-2")
    app.placed["steady-2"], app.placed["hit-2"] = app.workers  # one on each worker
    for r in (steady, hit):
        run(app.open_page(r))
        run(app.http_frame(ASTRONAUT, r))
    worker = app.placed["hit-2"]
    token = run(app.share("hit-2"))
    pid = run(worker.call("health"))["pid"]
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        try:
            return run(worker.call("health", timeout=5))["pid"] != pid
        except WorkerLost:
            return False
    assert wait_until(restarted, 60)
    assert wait_until(lambda: app.pages["hit-2"].lost is not None, 10)  # the watch polls every second
    line = run(app.stats(hit))
    assert f"the server lost its worker {worker.name}" in line and LOST in line, line
    assert "lost its worker" not in run(app.stats(steady))
    assert asyncio.run(view(token)) == (200, 409)  # the worker restarted empty: not live yet, the link valid
    assert wait_until(lambda: getattr(run(app.http_frame(ASTRONAUT, hit)), "shape", None) == (512, 512, 3), 60)
    assert "Live via HTTP streaming" in run(app.stats(hit)) and app.pages["hit-2"].lost is None
    assert asyncio.run(view(token)) == (200, 200)
    for r in (steady, hit):
        run(app.close_page(r))
    assert wait_until(lambda: all(h["live_sessions"] == 0 for h in healths(app)), 60)


def test_launch_drain_says_what_is_wrong(served):
    """`launch.py --drain` for a worker of no such name lists the workers; without RAY_AUTH_MODE=token, which an
    explicit address needs to send the token (the private runtime has token authentication, Ray's default), the
    error says so."""
    from test_integrity import launch
    address = ray.get_runtime_context().gcs_address
    drain = ["--ray", address, "--drain", "worker-9", "--drain-timeout", "1"]
    proc = launch(*drain)
    assert proc.returncode == 2 and "--drain worker-9: the Ray cluster at " in proc.stderr, proc.stderr
    assert "has no such worker (its workers: worker-0, worker-1)" in proc.stderr, proc.stderr
    assert os.environ["RAY_AUTH_MODE"] == "token"  # set by ray.init for its new runtime
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"} | {"RAY_gcs_server_port_wait_time_s": "1"}
    proc = launch(*drain, env=env)
    assert proc.returncode == 2 and f"--ray {address}: Failed to connect" in proc.stderr, proc.stderr
    assert "only with RAY_AUTH_MODE=token set and its token" in proc.stderr, proc.stderr


def test_launch_drain_drains_one_worker_of_a_running_front(served, caplog):
    """`launch.py --ray ADDRESS --drain worker-N` for the worker that holds a live session: the front's watch sees
    it and drains it. A tab placed there but not live moves, a new session goes to the other worker, the drained one
    keeps its session until it ends, then its process exits and it leaves the front; the command, which said how
    many sessions were left, then exits 0. No page is told of a lost worker: a drain is not a loss. (Last: the
    module's front has one worker after it.)"""
    import subprocess
    import sys
    app, url = served
    address = ray.get_runtime_context().gcs_address

    async def scenario() -> dict:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            live, peer = await live_tab(http)
            drained = app.placed[live.session]
            idle = loadtest.Tab(http)
            page = await idle.open()
            app.placed[idle.session] = drained  # placed there (its editor was opened, say), not live
            await drained.call("restore", idle.session, None, {}, False)
            pid = (await drained.call("health"))["pid"]
            command = await asyncio.create_subprocess_exec(
                sys.executable, "launch.py", "--ray", address, "--drain", drained.name, "--drain-timeout", "120",
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            for _ in range(600):  # until the front's watch has seen it (it asks every second)
                if drained in app.draining:
                    break
                await asyncio.sleep(0.1)
            pc, received = loadtest.new_peer(moving_face(4), 10)
            await loadtest.offer(http, pc, page)  # goes live on the other worker
            await asyncio.wait_for((await asyncio.wait_for(received, 60)).recv(), 60)
            during = dict(health=await drained.call("health"), running=command.returncode is None,
                          other=app.placed[idle.session] is not drained)
            await peer.close()
            await live.close()  # its session ends: the drain ends
            out, _ = await asyncio.wait_for(command.communicate(), 180)
            lost = [p.lost for p in app.pages.values()]
            await pc.close()
            await idle.close()
            return dict(during=during, rc=command.returncode, out=out.decode(), lost=lost, pid=pid, drained=drained)
    got = asyncio.run(scenario())
    assert got["during"]["health"]["live_sessions"] == 1 and got["during"]["running"] and got["during"]["other"]
    assert got["rc"] == 0 and "1 live session left" in got["out"], got["out"]
    assert got["out"].rstrip().endswith(f"{got['drained'].name}: drained and exited"), got["out"]
    assert got["drained"] not in app.workers and len(app.workers) == 1 and got["lost"] == [None]

    def exited() -> bool:
        try:
            os.kill(got["pid"], 0)
        except ProcessLookupError:
            return True
        return False
    assert wait_until(exited, 60)
    with pytest.raises(WorkerLost):
        run(got["drained"].call("health", timeout=10))
    got["drained"].close()  # closed again (the server's shutdown closes what the drain closed): nothing to say
    assert "closing worker" not in caplog.text, caplog.text
    assert wait_until(lambda: all(h["live_sessions"] == 0 for h in healths(app)), 60)
