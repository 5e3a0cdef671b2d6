"""Cluster mode across Ray nodes, on one machine: a head node and one more (`ray.cluster_utils.Cluster`, one CPU and
a custom resource each, Ray's health checks tuned so a lost node is noticed in seconds), joined by the front as
`--ray ADDRESS` does. Sessions are placed on both nodes' workers; when a node is removed, its tab streams again on
the other node's worker and a new session goes there too. HTTP streaming only (no WebRTC), so it stays cheap. A Ray
runtime of its own, ended with the module (tests/test_cluster.py has another)."""
import time

import gradio as gr
import pytest
import skimage.data

from conftest import run, tiny
from test_cluster import healths
from test_reliability import wait_until
from web.worker import LOAD_TIMEOUT_S, WorkerLost

ray = pytest.importorskip("ray")
WEBCAM = skimage.data.astronaut()[:480]  # 480×512: a frame the front darkens to say why is not an animated one
# Ray's settings for noticing a lost node (docs/scale.md, "More boxes"): a health check every second, the node dead
# after two missed ones.
HEALTH_CHECKS = dict(health_check_initial_delay_ms=0, health_check_period_ms=1000, health_check_timeout_ms=1000,
                     health_check_failure_threshold=2)


@pytest.fixture(scope="module")
def nodes():
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, resources={"head": 1},
                                                                include_dashboard=False, _system_config=HEALTH_CHECKS))
    other = cluster.add_node(num_cpus=1, resources={"other": 1})
    yield cluster, other
    ray.shutdown()
    cluster.shutdown()


def animated(app, session: str, frames: int = 60) -> bool:
    """Whether the tab's HTTP streaming answers with an animated frame (512×512: the sample portrait's size; a
    refused frame comes back darkened at the webcam's size) within `frames` frames."""
    r = gr.Request(session_hash=session)
    for _ in range(frames):
        out = run(app.http_frame(WEBCAM, r))
        if out is not None and out.shape == (512, 512, 3):
            return True
    return False


def test_sessions_on_both_nodes_and_a_removed_nodes_go_to_the_other(nodes, tmp_path):
    from web.app import LiveApp
    from web.cluster import Cluster
    cluster, other = nodes
    front = Cluster(tiny(max_sessions=3, step_s=0.1), 2, address=cluster.address)  # as --ray ADDRESS --workers 2
    app = LiveApp(tiny(), untrained=True, workdir=tmp_path, workers=front.workers)
    lost = None
    where = {n["NodeID"]: "head" if "head" in n["Resources"] else "other" for n in ray.nodes() if n["Alive"]}
    try:
        for session in ("a", "b"):
            run(app.open_page(gr.Request(session_hash=session)))
            assert animated(app, session)
        before = {where[h["node"]]: h["live_sessions"] for h in healths(app)}
        lost = next(w for w, h in zip(app.workers, healths(app)) if where[h["node"]] == "other")
        kept = next(w for w in app.workers if w is not lost)

        start = time.monotonic()
        cluster.remove_node(other, allow_graceful=False)  # SIGKILL, as a box that goes away: no goodbye to Ray
        moved = all(animated(app, s) for s in ("a", "b"))  # the lost node's tab: the reason, then frames again
        back = time.monotonic() - start
        dead = wait_until(lambda: [where[n["NodeID"]] for n in ray.nodes() if not n["Alive"]] == ["other"], 30)
        noticed = time.monotonic() - start  # by then Ray's health checks had declared the node dead
        run(app.open_page(gr.Request(session_hash="c")))
        new = animated(app, "c")
        after = dict(run(kept.call("health")), tabs=run(kept.call("counts"))["tabs"])  # all three tabs held there
        with pytest.raises(WorkerLost):  # nothing can restart it: the remaining node's CPU is taken
            run(lost.call("health", timeout=LOAD_TIMEOUT_S))
        for session in ("a", "b", "c"):
            run(app.close_page(gr.Request(session_hash=session)))
    finally:
        if lost is not None:
            ray.kill(lost.actor, no_restart=True)  # its close would wait for a restart that cannot come
        app.close()
        front.shutdown()
    assert before == {"head": 1, "other": 1}, before
    assert moved and new and after["tabs"] == 3 and where[after["node"]] == "head", (back, new, after)
    assert dead, "Ray did not declare the removed node dead within 30 s"
    print(f"after the node's processes were killed: both tabs streamed again in {back:.1f} s; Ray had declared the "
          f"node dead {noticed:.1f} s after, at the latest")

