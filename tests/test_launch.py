"""`python launch.py` without weights: the clear message, a non-zero exit, no traceback."""
import os
import subprocess
import sys

from conftest import ROOT


def test_launch_without_weights_explains_and_exits(tmp_path):
    env = {**os.environ, "LP_WEIGHTS": str(tmp_path / "nowhere"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "launch.py"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    for needed in ("appearance_feature_extractor.pth", str(tmp_path / "nowhere"), "KwaiVGI/LivePortrait",
                   "--weights", "LP_WEIGHTS"):
        assert needed in proc.stderr, needed
