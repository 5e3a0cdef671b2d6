"""The device check runs here, on the CPU with the tiny config: every step passes or says why it does not apply, so
the check cannot rot while no GPU is at hand. And the GPU machine's stack: model/, the check and `launch.py bench`
load no web or face stack."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT
from model import gpu_check

WEB_AND_FACE = ("gradio", "mediapipe", "aiortc", "av")
LOADED = f"sorted(m for m in sys.modules if m.split('.')[0] in {WEB_AND_FACE!r})"
CUDA_ONLY = {"padded_vs_exact", "fp16_psnr", "cuda_graph_vs_eager"}


def test_device_check_on_cpu(tmp_path):
    # no time budget here: the budget is for short GPU sessions, and this 2-core machine is often busy
    argv = ["--out", str(tmp_path), "--device", "cpu", "--budget-s", "3600"]
    proc = subprocess.run([sys.executable, "-m", "model.gpu_check", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600)
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    failed = {name: s for name, s in steps.items() if s["status"] == "fail"}
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(steps) == list(gpu_check.STEPS)
    assert {name for name, s in steps.items() if s["status"] == "skip"} == CUDA_ONLY
    assert all("CUDA only" in steps[name]["reason"] for name in CUDA_ONLY)

    conformance = steps["conformance_fp32"]
    assert conformance["arrays_checked"] >= 40 and conformance["failed"] == []
    assert conformance["arrays"]["E2E.image_u8"]["max_abs"] <= 1
    assert steps["paste_back"]["max_abs"] <= 3
    assert steps["batched_vs_single"]["max_abs"] <= 1 and steps["batched_vs_single"]["distinct_outputs"] == 4
    for name in ("speed_eager", "speed_default"):
        assert [r["batch"] for r in steps[name]["rows"]] == [1, 4, 8]
        assert all(r["fps"] > 0 and r["ms_p95"] >= r["ms_p50"] > 0 for r in steps[name]["rows"])
    assert {"M", "W", "G", "F_per_portrait"} <= set(steps["speed_eager"]["modules_ms"])
    assert [r["sessions"] for r in steps["serving"]["rows"]] == [1, 4, 8, 16]
    for r in steps["serving"]["rows"]:  # the scheduler formed batches of at most --max-batch sessions
        assert r["batch_sizes"] and max(map(int, r["batch_sizes"])) <= min(8, r["sessions"]), r
        assert len(r["session_fps"]) == r["sessions"] and r["latency_p95_ms"] >= r["latency_p50_ms"] >= 0, r
    for name in ("startup", "warm_start"):
        assert steps[name]["first_frame_ms"] > 0 and list(steps[name]["warmup_s_per_batch"]) == ["1"]
    assert steps["environment"]["torch"] and steps["environment"]["python"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert all(f"## {name}: {s['status']}" in markdown for name, s in steps.items())


def test_each_step_is_on_disk_before_the_next_and_a_failure_does_not_stop_the_run(tmp_path, monkeypatch, capsys):
    seen = {}

    def broken(c):
        seen.update(json.loads((tmp_path / "gpu_check.json").read_text())["steps"])
        raise RuntimeError("kernel missing")

    monkeypatch.setitem(gpu_check.STEPS, "paste_back", broken)
    steps = "environment,paste_back,fp16_psnr"
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--steps", steps]) == 1
    assert seen["environment"]["status"] == "pass"  # written and flushed before the next step began
    report = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert report["paste_back"]["status"] == "fail" and "RuntimeError: kernel missing" in report["paste_back"]["error"]
    assert report["fp16_psnr"]["status"] == "skip"
    assert "FAILED: paste_back" in capsys.readouterr().err


def test_time_budget_skips_with_the_reason(tmp_path):
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--budget-s", "0"]) == 0
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert list(steps) == list(gpu_check.STEPS)
    assert all(s["status"] == "skip" and "time budget" in s["reason"] for s in steps.values())


def test_model_loads_no_web_or_face_stack():
    code = f"import sys, model.gpu_check, model.engine, model.bench; print({LOADED})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_launch_bench_runs_without_web_or_face_stack(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["bench", "--device", "cpu", "--config", "tiny", "--weights", "recipe", "--variants", "cached",
            "--frames", "1", "--warmup", "1", "--json", str(out)]
    code = f"import sys, launch; rc = launch.main({argv!r}); print(rc, {LOADED})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "0 []"
    assert [r["variant"] for r in json.loads(out.read_text())["rows"]] == ["baseline", "cached"]


@pytest.mark.parametrize("argv", [["--steps", "nonsense"], ["--config", "huge"]])
def test_bad_arguments_are_refused(tmp_path, argv):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path), *argv])
    assert e.value.code != 0
