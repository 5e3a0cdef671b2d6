import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
