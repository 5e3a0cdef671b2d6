"""Cluster mode (`--workers N`, `--ray ADDRESS`): the workers are Ray actors, each in a process of its own with one
GPU where the cluster has GPUs. The front calls them through `Remote` exactly as it calls the in-process `Local`
(web/worker.py): the same `Worker` class, the same coroutines, plain data both ways. Ray Core actors, not Ray
Serve: a tab's later calls must reach the worker that holds its live session.

Each actor is a named async actor: its coroutines run on the actor's event loop, where aiortc's peers live, and its
engine on the scheduler's own thread. `health`, `load` and `counts` run in a concurrency group of their own, so a
busy worker still answers them. Ray restarts a worker whose process dies (`max_restarts=-1`); every call has a
timeout, so a call to a dead or restarting worker fails with `WorkerLost` instead of hanging.

Only this module imports Ray, and only cluster mode imports this module.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError, RayTaskError

from web.limits import default_work_dir
from web.worker import CALL_TIMEOUT_S, LOAD_TIMEOUT_S, Worker, WorkerConfig, WorkerLost

log = logging.getLogger("liveportrait.cluster")
ROOT = Path(__file__).resolve().parents[1]
QUICK = {"health", "load", "counts"}  # answered in their own concurrency group
NAMESPACE = "liveportrait"
DRAIN_POLL_S = 1.0  # `launch.py --drain` asks the drained worker this often whether it has exited yet


class Remote:
    """A worker in a Ray actor, called like `Local`: `await call(method, *args)`. A worker's own exceptions
    arrive as they were raised; a dead, restarting or silent worker raises WorkerLost."""

    def __init__(self, actor: Any, name: str):
        self.actor, self.name = actor, name
        self.closed = False

    async def call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        fn = getattr(self.actor, method)
        if method in QUICK:
            fn = fn.options(concurrency_group="quick")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fn.remote(*args).future()), timeout)
        except RayTaskError as e:
            raise e.cause from None
        except (ActorDiedError, ActorUnavailableError, asyncio.TimeoutError) as e:
            raise WorkerLost(f"the server lost its worker {self.name} ({type(e).__name__})") from None

    def close(self) -> None:
        """Server shutdown: the worker ends every live connection (recordings are finalised), then exits. Once: the
        server's shutdown closes again a worker that a drain closed."""
        if self.closed:
            return
        self.closed = True
        try:
            ray.get(self.actor.close.remote(), timeout=CALL_TIMEOUT_S)
        except RayError as e:
            log.warning("closing worker %s: %s", self.name, e)
        ray.kill(self.actor, no_restart=True)


class RayWorker(Worker):
    """The worker as a Ray actor: its health also names the Ray node it runs on (plain data, for /healthz)."""

    def health(self) -> dict:
        return dict(super().health(), node=ray.get_runtime_context().get_node_id())


def join(address: str, **options: Any) -> None:
    """`ray.init` on the cluster at `address` ("local": a private runtime; "auto": the one this machine belongs to;
    HOST:PORT: its head). ConnectionError, at once, when nothing answers there: ray.init would retry for minutes."""
    host, _, port = address.rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as e:
            raise ConnectionError(f"--ray {address}: no Ray cluster answers there ({e}); is `ray start --head` "
                                  "running on that machine?") from None
    try:
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, **options)
    except ConnectionError as e:
        token = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            " (a cluster with token authentication, which Ray's own runtimes have by default, takes a connection to "
            "its address only with RAY_AUTH_MODE=token set and its token: docs/scale.md)")
        raise ConnectionError(f"--ray {address}: {e}{token}") from None


def placement(n: int | None) -> tuple[int, dict]:
    """How many workers the connected cluster gets (`n` None: one per GPU) and the Ray options each worker's actor
    is started with: one GPU where the cluster has GPUs, else CPU only, and an equal share of the CPUs.
    ValueError for more workers than GPUs."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    n = n or gpus or 1
    if gpus and n > gpus:
        raise ValueError(f"--workers {n}: the cluster has {gpus} GPUs (one worker per GPU)")
    return n, dict(num_gpus=1 if gpus else 0, num_cpus=resources.get("CPU", 1) / n, namespace=NAMESPACE)


class Cluster:
    """`n` workers on Ray: a private local runtime (`address` None; joins none that runs already), or the cluster
    at `address` ("auto": the one this machine belongs to), where `n` None means one per GPU. Each worker gets one
    GPU where the cluster has GPUs, else CPU only, and an equal share of the CPUs."""

    def __init__(self, config: WorkerConfig, n: int | None, address: str | None = None):
        self.own = not ray.is_initialized()
        if self.own:
            env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}}
            join(address or "local", runtime_env=env, log_to_driver=True)
        n, options = placement(n)
        actor = ray.remote(max_restarts=-1, max_concurrency=1000, concurrency_groups={"quick": 4})(RayWorker)
        work = Path(config.workdir or default_work_dir())  # a directory per worker: each cleans only its own
        self.workers = [Remote(actor.options(name=f"worker-{i}", **options).remote(
            dataclasses.replace(config, workdir=str(work / f"worker-{i}"))), f"worker-{i}") for i in range(n)]
        address = ray.get_runtime_context().gcs_address
        token = "RAY_AUTH_MODE=token " if os.environ.get("RAY_AUTH_MODE") == "token" else ""
        log.info("cluster mode: %d workers on the Ray cluster at %s; to drain one: %spython launch.py --ray %s "
                 "--drain worker-N --drain-timeout SECONDS", n, address, token, address)

    def shutdown(self) -> None:
        """After the front closed the workers: the private runtime ends with the front (a joined cluster stays)."""
        if self.own:
            ray.shutdown()


def drain(address: str, name: str, timeout: float) -> int:
    """`launch.py --ray ADDRESS --drain NAME`: tell the worker NAME of the front running on that cluster to drain,
    then wait until it has exited, saying how many live sessions it has left. The front sees it in the worker's
    health within a second (LiveApp.watch) and does the rest: no tab is placed there any more, the live sessions go
    on for `timeout` s at most, then the front closes the worker. The exit status: 0 once it has exited, 1 if it
    still runs well after that (is its front running?), 2 for no such cluster or worker."""
    try:
        join(address, log_to_driver=False)
    except ConnectionError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    try:
        try:
            actor = ray.get_actor(name)
        except ValueError:
            print(f"launch.py: error: --drain {name}: the Ray cluster at {address} has no such worker (its workers: "
                  f"{', '.join(sorted(ray.util.list_named_actors())) or 'none'})", file=sys.stderr)
            return 2
        if asyncio.run(drained(Remote(actor, name), timeout)):
            print(f"{name}: drained and exited", flush=True)
            return 0
        print(f"launch.py: {name} still runs after its drain's {timeout:g} s: is its front running? (a front closes "
              "a worker it sees draining)", file=sys.stderr)
        return 1
    except WorkerLost as e:
        print(f"launch.py: error: --drain {name}: {e}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()


async def drained(worker: Remote, timeout: float) -> bool:
    """Tell `worker` to drain for `timeout` s; True once it has exited (its front closed it), False if it still
    runs after the drain's time and the front's close of it."""
    await worker.call("drain", timeout)
    print(f"{worker.name}: draining; its live sessions may go on for {timeout:g} s", flush=True)
    left, deadline = None, time.monotonic() + timeout + CALL_TIMEOUT_S + 10
    while time.monotonic() < deadline:
        try:
            live = (await worker.call("health", timeout=LOAD_TIMEOUT_S))["live_sessions"]
            if live != left:
                print(f"{worker.name}: {live} live session{'s' if live != 1 else ''} left", flush=True)
                left = live
        except WorkerLost:
            if gone(worker.name):
                return True
        await asyncio.sleep(DRAIN_POLL_S)
    return False


def gone(name: str) -> bool:
    """Whether the named worker has exited for good (a worker Ray is restarting is not gone)."""
    try:
        ray.get_actor(name)
    except ValueError:
        return True
    return False
