"""The device check runs here, on the CPU with the tiny config: every step passes or says why it does not apply, so
the check cannot rot while no GPU is at hand. And the GPU machine's stack: model/, the check and `launch.py bench`
load no web or face stack."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from model import gpu_check

WEB_AND_FACE = ("gradio", "mediapipe", "aiortc", "av")
LOADED = f"sorted(m for m in sys.modules if m.split('.')[0] in {WEB_AND_FACE!r})"
CUDA_ONLY = {"padded_vs_exact", "fp16_psnr", "cuda_graph_vs_eager"}


@pytest.fixture(autouse=True)
def own_compile_cache(monkeypatch, tmp_path):
    """The check points the process's compile cache at its own folder: in-process runs must not leave that behind."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))


def report(out) -> dict:
    return json.loads((out / "gpu_check.json").read_text())["steps"]


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
    assert steps["environment"]["torch"] and steps["environment"]["python"] and steps["environment"]["problems"] == []
    assert steps["environment"]["compile_smoke"] == "not run: --compile off"
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


def test_unknown_steps_are_one_line_and_exit_2(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path), "--steps", "nonsense"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown steps ['nonsense']" in err[0]


@pytest.mark.parametrize("argv", [["--config", "huge"], ["--compile", "fastest"], ["--part", "half"]])
def test_bad_arguments_are_refused(tmp_path, argv):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--out", str(tmp_path), *argv])
    assert e.value.code == 2


def test_each_step_is_on_disk_when_it_starts_and_after_each_batch_size(tmp_path, monkeypatch):
    snapshots = []
    write = gpu_check.Check.write

    def spy(c):
        write(c)
        snapshots.append({name: dict(s) for name, s in report(tmp_path).items()})
    monkeypatch.setattr(gpu_check.Check, "write", spy)
    assert gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--steps", "environment,startup"]) == 0
    seen = [(list(s), s[list(s)[-1]]["status"], "warmup_s_per_batch" in s[list(s)[-1]]) for s in snapshots]
    assert seen[:3] == [(["environment"], "running", False), (["environment"], "pass", False),
                        (["environment", "startup"], "running", False)]
    assert (["environment", "startup"], "running", True) in seen  # after batch 1 warmed up, before the first frame
    assert seen[-1] == (["environment", "startup"], "pass", True)


def test_a_killed_run_names_the_steps_done_and_the_one_running(tmp_path):
    argv = ["--out", str(tmp_path), "--device", "cpu", "--steps", "environment,conformance_fp32,startup"]
    proc = subprocess.Popen([sys.executable, "-m", "model.gpu_check", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline and proc.poll() is None:  # the full-size conformance takes seconds
            if (tmp_path / "gpu_check.json").exists() and \
                    report(tmp_path).get("conformance_fp32", {}).get("status") == "running":
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    steps = report(tmp_path)
    assert list(steps) == ["environment", "conformance_fp32"]
    assert steps["environment"]["status"] == "pass"
    assert steps["conformance_fp32"]["status"] == "running" and steps["conformance_fp32"]["started"]
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| environment | pass |" in markdown
    assert "| conformance_fp32 | running |" in markdown and "the run was cut off here" in markdown


def test_cache_dir_is_kept_and_a_second_run_finds_it(tmp_path):
    cache = tmp_path / "cache"
    argv = ["--device", "cpu", "--compile", "default", "--steps", "environment", "--cache-dir", str(cache)]
    smoke = []
    for run in ("first", "second"):
        out = tmp_path / run
        proc = subprocess.run([sys.executable, "-m", "model.gpu_check", "--out", str(out), *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-3000:]
        smoke.append(report(out)["environment"])
        assert any(cache.rglob("*")), "the cache dir was deleted"
    assert smoke[0]["compile_cache_files"] == 0 and smoke[0]["compile_smoke"]["fx_graph_cache_miss"] >= 1
    assert smoke[1]["compile_cache_files"] > 0 and smoke[1]["compile_smoke"]["fx_graph_cache_hit"] >= 1
    assert smoke[1]["compile_cache"] == str(cache.resolve())


def test_a_missing_toolchain_piece_is_one_clear_line(tmp_path, monkeypatch):
    assert gpu_check._check_gcc(str(tmp_path / "no-gcc"))[1] == \
        f"gcc: {tmp_path / 'no-gcc'} not found; Triton and Inductor compile C with it (install gcc, or set $CC)"
    assert "Python.h: not in" in gpu_check._check_python_h(tmp_path)[1]
    (tmp_path / "a-file").write_text("")
    assert "is not writable" in gpu_check._check_cache(tmp_path / "a-file" / "cache")[1]
    assert gpu_check._check_gcc()[1] is None and gpu_check._check_python_h()[1] is None  # this machine has both

    monkeypatch.setenv("CC", str(tmp_path / "no-gcc"))
    monkeypatch.setattr(gpu_check.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "no-include")})
    argv = ["--out", str(tmp_path / "out"), "--device", "cpu", "--compile", "default", "--steps", "environment",
            "--cache-dir", str(tmp_path / "a-file" / "cache")]
    assert gpu_check.main(argv) == 1
    env = report(tmp_path / "out")["environment"]
    assert env["status"] == "fail" and [line.split(":")[0] for line in env["problems"]] == \
        ["gcc", "Python.h", "compile cache"]
    assert all("\n" not in line for line in env["problems"])
    assert env["compile_smoke"] == "not run: the toolchain is incomplete"
    markdown = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(f"- problem: {line}" in markdown for line in env["problems"])


def test_bench_quick_is_three_variants_at_batch_1_and_8_with_30_frames(tmp_path):
    import argparse
    from model import bench
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--quick"])
    bench.apply_quick(args, cuda=True)
    assert (args.frames, args.warmup, args.batch_sizes) == (30, 3, "1,8")
    plan, skipped = bench._plan(args, cuda=True)
    assert list(plan) == ["cached", "+fp16", "optimised"] and skipped == []
    assert plan["optimised"] == dict(precision="fp16", channels_last=True, compile="default", cuda_graphs=True)

    args = parser.parse_args(["--quick", "--frames", "2", "--warmup", "1", "--json", str(tmp_path / "q.json")])
    args.device, args.config, args.weights, args.no_download = "cpu", "tiny", "recipe", True
    assert bench.run(args) == 0
    rows = json.loads((tmp_path / "q.json").read_text())["rows"]
    variants = [r["variant"] for r in rows]  # on a CPU, the precisions it runs natively (bf16 on some) in between
    assert variants[:2] == ["baseline", "cached"] and variants[-1] == "optimised"
    assert all(v in ("+fp16", "+bf16") for v in variants[2:-1]) and {r["batch"] for r in rows} == {1}
