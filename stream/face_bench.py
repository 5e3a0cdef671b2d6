"""Face tracking speed: ms per 640x480 webcam frame for the live face step (LiveFaceDriver.process: track, crop box,
crop, ratios) on the moving-face clip, JSON + table. Results: docs/benchmarks.md, "Face tracking".

    python -m stream.face_bench                          # this tree's tracker
    python -m stream.face_bench --old-rev 29927db        # against another revision's tracker, same venv, one run
    python -m stream.face_bench --old-rev c6e8785 --old-python /tmp/oldface/bin/python   # its own venv

With --old-rev, that revision's tree is extracted (git archive) into a temporary directory and its tracker runs in a
subprocess there (--old-python, default this interpreter), alternating with this tree's tracker, so that both see
the same machine, load and frames; each side runs in a fresh process. This module is copied into the old tree, so
both are timed by the same code; it needs only what every revision's stream.face has (LiveFaceDriver). Key-frame
trackers are cheap on most frames and dear on a few: compare the means. On a loaded machine the wall times follow
the load more than the trackers; the CPU ms per frame (the process's, all threads) stay close to a quiet run's.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# the old tree's side: this module, copied there, times its tracker on the frames saved by this side
CHILD = ("import sys, json, numpy, stream.face_bench as b; "
         "print(json.dumps(b.bench_tracking(list(numpy.load(sys.argv[1])))))")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def bench_tracking(frames: list[np.ndarray], loops: int = 4) -> dict:
    """Time LiveFaceDriver.process over `loops` passes of `frames` at 30 fps frame times, after one untimed pass
    (graph start-up, first detection); per-frame wall ms (mean, median, p95), the process's CPU ms per frame (all its
    threads: steadier than wall time on a loaded machine), faces found and the stack that ran."""
    from stream.face import LiveFaceDriver
    driver = LiveFaceDriver()
    ms, found, cpu = [], 0, 0.0
    try:
        for k in range(loops + 1):
            if k == 1:
                cpu = time.process_time()
            for i, frame in enumerate(frames):
                t0 = time.perf_counter()
                f = driver.process(frame, (k * len(frames) + i) / 30)
                if k:
                    ms.append((time.perf_counter() - t0) * 1000)
                    found += f.crop is not None
        cpu = time.process_time() - cpu
    finally:
        driver.close()
    litert = _version("ai-edge-litert") if "ai_edge_litert" in sys.modules else None  # only if the tracker ran it
    return {**_stats(ms), "cpu_ms": cpu * 1000 / len(ms), "found": found, "ms": ms, "mediapipe": _version("mediapipe"),
            "ai-edge-litert": litert, "numpy": np.__version__, "python": platform.python_version()}


def _stats(ms: list[float]) -> dict:
    return {"frames": len(ms), "mean_ms": float(np.mean(ms)), "median_ms": float(np.median(ms)),
            "p95_ms": float(np.percentile(ms, 95))}


def cpu_model() -> str:
    """The CPU's name from /proc/cpuinfo, so a result names its machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _run(python: str, tree: Path, frames: Path) -> dict:
    """bench_tracking of the tree's tracker in a fresh process (both sides alike, so that the OS schedules them
    alike on a loaded machine)."""
    out = subprocess.run([python, "-c", CHILD, str(frames)], cwd=tree, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"the tracker failed in {tree}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _merge(runs: list[dict]) -> dict:
    keep = ("mediapipe", "ai-edge-litert", "numpy", "python")
    return {**{k: runs[0].get(k) for k in keep}, **_stats([m for r in runs for m in r["ms"]]),
            "cpu_ms": float(np.mean([r["cpu_ms"] for r in runs])), "found": sum(r["found"] for r in runs)}


def _extract(archive: bytes, tmp: str) -> Path:
    """A revision's tree (its `git archive`) in `tmp`, with this module in it."""
    subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
    shutil.copy(Path(__file__), Path(tmp) / "stream" / "face_bench.py")
    return Path(tmp)


def main(argv: list[str] | None = None) -> int:
    from launch import Parser
    from stream.serve_bench import moving_face
    p = Parser(prog="python -m stream.face_bench", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-rev", help="git revision whose tracker to compare against, alternating in one run")
    p.add_argument("--old-python", help="interpreter of a venv with that revision's stack (default: this one)")
    p.add_argument("--rounds", type=int, default=3, help="alternating old/new rounds (default 3)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.old_python and not args.old_rev:
        p.error("--old-python needs --old-rev")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.old_rev:
        archive = subprocess.run(["git", "archive", args.old_rev], cwd=ROOT, capture_output=True)
        if archive.returncode:
            p.error(f"--old-rev {args.old_rev}: {archive.stderr.decode().strip().splitlines()[0]}")
    frames = moving_face()
    result: dict = {"cpu": cpu_model(), "load_start": os.getloadavg()[0],
                    "clip": "stream.serve_bench.moving_face(), 640x480, 30 frames, 4 timed passes a round"}
    if args.old_rev:
        with tempfile.TemporaryDirectory() as tmp:
            tree = _extract(archive.stdout, tmp)
            np.save(tree / "frames.npy", np.stack(frames))
            old, new = [], []
            for _ in range(args.rounds):
                old.append(_run(args.old_python or sys.executable, tree, tree / "frames.npy"))
                new.append(_run(sys.executable, ROOT, tree / "frames.npy"))
        result["old"] = {"rev": args.old_rev, **_merge(old)}
        result["new"] = _merge(new)
        result["ratio_mean"] = result["new"]["mean_ms"] / result["old"]["mean_ms"]
        result["ratio_median"] = result["new"]["median_ms"] / result["old"]["median_ms"]
        result["ratio_cpu"] = result["new"]["cpu_ms"] / result["old"]["cpu_ms"]
    else:
        result["new"] = _merge([bench_tracking(frames)])
    result["load_end"] = os.getloadavg()[0]
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(f"\nface track + crop per 640x480 frame, {result['cpu']}, 1-min load average "
          f"{result['load_start']:.1f} -> {result['load_end']:.1f}")
    print(f"{'tracker':52s} {'mean ms':>7s} {'median':>7s} {'p95':>7s} {'CPU ms':>7s} {'found':>9s}")
    for side in ("old", "new"):
        if side in result:
            r = result[side]
            stack = f"mediapipe {r['mediapipe']}" + (f", litert {r['ai-edge-litert']}" if r["ai-edge-litert"] else "")
            name = f"{side}{' ' + r['rev'] if 'rev' in r else ''}: {stack}, numpy {r['numpy']}"
            print(f"{name:52s} {r['mean_ms']:7.2f} {r['median_ms']:7.2f} {r['p95_ms']:7.2f} {r['cpu_ms']:7.2f} "
                  f"{r['found']:4d}/{r['frames']}")
    if "ratio_mean" in result:
        print(f"new / old: mean {result['ratio_mean']:.2f}, median {result['ratio_median']:.2f}, "
              f"CPU {result['ratio_cpu']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
