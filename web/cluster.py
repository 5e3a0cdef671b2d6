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
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayError, RayTaskError

from web.limits import default_work_dir
from web.worker import CALL_TIMEOUT_S, Worker, WorkerConfig, WorkerLost

log = logging.getLogger("liveportrait.cluster")
ROOT = Path(__file__).resolve().parents[1]
QUICK = {"health", "load", "counts"}  # answered in their own concurrency group
NAMESPACE = "liveportrait"


class Remote:
    """A worker in a Ray actor, called like `Local`: `await call(method, *args)`. A worker's own exceptions
    arrive as they were raised; a dead, restarting or silent worker raises WorkerLost."""

    def __init__(self, actor: Any, name: str):
        self.actor, self.name = actor, name

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
        """Server shutdown: the worker ends every live connection (recordings are finalised), then exits."""
        try:
            ray.get(self.actor.close.remote(), timeout=CALL_TIMEOUT_S)
        except RayError as e:
            log.warning("closing worker %s: %s", self.name, e)
        ray.kill(self.actor, no_restart=True)


class RayWorker(Worker):
    """The worker as a Ray actor: its health also names the Ray node it runs on (plain data, for /healthz)."""

    def health(self) -> dict:
        return dict(super().health(), node=ray.get_runtime_context().get_node_id())


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
            ray.init(address=address or "local", namespace=NAMESPACE, include_dashboard=False, runtime_env=env,
                     log_to_driver=True)
        n, options = placement(n)
        actor = ray.remote(max_restarts=-1, max_concurrency=1000, concurrency_groups={"quick": 4})(RayWorker)
        work = Path(config.workdir or default_work_dir())  # a directory per worker: each cleans only its own
        self.workers = [Remote(actor.options(name=f"worker-{i}", **options).remote(
            dataclasses.replace(config, workdir=str(work / f"worker-{i}"))), f"worker-{i}") for i in range(n)]

    def shutdown(self) -> None:
        """After the front closed the workers: the private runtime ends with the front (a joined cluster stays)."""
        if self.own:
            ray.shutdown()
