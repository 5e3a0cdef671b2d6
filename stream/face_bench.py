"""Face tracking speed: ms per 640x480 webcam frame for the live face step (LiveFaceDriver.process: track, crop box,
crop, ratios) on the moving-face clip, JSON + table. Results: docs/benchmarks.md, "Face tracking".

    python -m stream.face_bench                       # this tree's tracker
    python -m stream.face_bench --old-python /tmp/oldface/bin/python --old-rev c6e8785   # old vs new, one run

With --old-python, the tracker of git revision --old-rev runs in that interpreter (a venv with its pinned stack),
alternating with this tree's tracker, so that both see the same machine and load. This module is copied into the
old tree, so both are timed by the same code. The module needs only what every revision's stream.face has.
"""
import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def bench_tracking(frames: list[np.ndarray], loops: int = 4) -> dict:
    """Time LiveFaceDriver.process over `loops` passes of `frames` at 30 fps frame times, after one untimed pass
    (graph start-up, first detection); per-frame ms as median, p90 and mean, plus the stack that ran."""
    import mediapipe

    from stream.face import LiveFaceDriver
    driver = LiveFaceDriver()
    ms, found = [], 0
    try:
        for k in range(loops + 1):
            for i, frame in enumerate(frames):
                t0 = time.perf_counter()
                f = driver.process(frame, (k * len(frames) + i) / 30)
                if k:
                    ms.append((time.perf_counter() - t0) * 1000)
                    found += f.crop is not None
    finally:
        driver.close()
    return {"frames": len(ms), "found": found, "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(np.mean(ms)), "ms": ms,
            "mediapipe": mediapipe.__version__, "numpy": np.__version__, "python": platform.python_version()}


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo, so a result names its machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _old_run(python: str, tree: Path) -> dict:
    out = subprocess.run([python, "-m", "stream.face_bench", "--child"], cwd=tree, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict]) -> dict:
    ms = [m for r in runs for m in r["ms"]]
    return {**{k: runs[0][k] for k in ("mediapipe", "numpy", "python")}, "frames": len(ms),
            "found": sum(r["found"] for r in runs), "median_ms": float(np.median(ms)),
            "p90_ms": float(np.percentile(ms, 90)), "mean_ms": float(np.mean(ms))}


def main(argv: list[str] | None = None) -> int:
    from stream.serve_bench import moving_face
    p = argparse.ArgumentParser(prog="python -m stream.face_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-python", help="interpreter of a venv with the old stack, for an old-vs-new run")
    p.add_argument("--old-rev", default="c6e8785", help="git revision of the old tracker (default: the last "
                                                          "mediapipe 0.10.21 one)")
    p.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds (default 3)")
    p.add_argument("--json", help="also write the result here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    frames = moving_face()
    if args.child:
        print(json.dumps(bench_tracking(frames)))
        return 0
    result: dict = {"cpu": cpu_model(), "clip": "stream.serve_bench.moving_face(), 640x480, 30 frames"}
    if args.old_python:
        with tempfile.TemporaryDirectory() as tmp:
            tree = Path(tmp)
            archive = subprocess.run(["git", "archive", args.old_rev], cwd=ROOT, capture_output=True, check=True)
            subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
            shutil.copy(Path(__file__), tree / "stream" / "face_bench.py")
            old, new = [], []
            for _ in range(args.rounds):
                old.append(_old_run(args.old_python, tree))
                new.append(bench_tracking(frames))
        result["old"] = {"rev": args.old_rev, **_merge(old)}
        result["new"] = _merge(new)
        result["ratio"] = result["new"]["median_ms"] / result["old"]["median_ms"]
    else:
        result["new"] = _merge([bench_tracking(frames)])
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"\nface track + crop per 640x480 frame, {result['cpu']}")
    print(f"{'tracker':34s} {'median ms':>9s} {'p90 ms':>7s} {'found':>9s}")
    for side in ("old", "new"):
        if side in result:
            r = result[side]
            name = f"{side}: mediapipe {r['mediapipe']}, numpy {r['numpy']}"
            print(f"{name:34s} {r['median_ms']:9.2f} {r['p90_ms']:7.2f} {r['found']:4d}/{r['frames']}")
    if "ratio" in result:
        print(f"new / old median: {result['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
