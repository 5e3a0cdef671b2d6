import asyncio
import concurrent.futures
import ctypes
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def run(coro):
    """A front handler (a coroutine), run to its end on a loop of its own (in a thread: Playwright's sync API
    keeps a loop running in the test's)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def tiny(**kw):
    """The tests' worker config: the tiny untrained networks, the rest as given."""
    from web.worker import WorkerConfig
    return WorkerConfig(weights="recipe", config="tiny", **kw)


def _loopback_only() -> str | None:
    """Move this test process (and every thread and child it starts later: servers, Chromium, coturn) into a new
    network namespace whose only interface is loopback, so no test traffic can leave the machine. Returns why it
    could not, or None. Runs at import, before any thread exists: unshare() applies to the calling thread."""
    if os.environ.get("LP_NETNS") == "0":
        return "LP_NETNS=0"
    try:
        if ctypes.CDLL(None, use_errno=True).unshare(0x40000000):  # CLONE_NEWNET
            return f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}"
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        return f"no loopback-only network namespace: {e}"
    return None


NETNS_UNAVAILABLE = _loopback_only()


@pytest.fixture(scope="session")
def loopback_only():
    """For tests that open sockets (browser, WebRTC, load, faults): they run only inside the loopback-only
    namespace; without one they skip with the reason (CI, with LP_REQUIRE_NETNS=1, fails instead)."""
    if NETNS_UNAVAILABLE:
        if os.environ.get("LP_REQUIRE_NETNS") == "1":
            pytest.fail(f"LP_REQUIRE_NETNS=1 but {NETNS_UNAVAILABLE}", pytrace=False)
        pytest.skip(f"needs a loopback-only network namespace ({NETNS_UNAVAILABLE})")


@pytest.fixture(scope="session")
def golden() -> dict[str, np.ndarray]:
    """The golden file named by LP_GOLDEN (default: the in-repo copy of the kit's golden_1.npz)."""
    path = Path(os.environ.get("LP_GOLDEN", DATA / "golden_1.npz"))
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def full_nets(golden):
    from model.networks import LivePortraitNetworks
    return LivePortraitNetworks("full").fill_recipe(int(golden["meta.seed"]))


@pytest.fixture(scope="session")
def tiny_nets():
    from model.networks import LivePortraitNetworks
    return LivePortraitNetworks("tiny").fill_recipe(1)


def pytest_terminal_summary(terminalreporter):
    """Per-array max |ours - golden| of the conformance run, for the record."""
    measured = getattr(sys.modules.get("test_conformance"), "MEASURED", None)
    if measured:
        terminalreporter.write_sep("-", f"conformance max|d| vs {os.environ.get('LP_GOLDEN', 'golden_1.npz')}")
        for name, err in sorted(measured.items()):
            terminalreporter.write_line(f"{name:40s} {err:.3g}")
