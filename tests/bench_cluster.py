"""What cluster mode costs a frame: the HTTP-streaming round trip (one webcam frame in, the animated frame out,
through the front's handler) with the worker in this process against the worker in a Ray actor, interleaved in
one run, and the bare call round trip (a tab's stats) both ways. Tiny config, CPU, one worker each. Prints a
markdown table and JSON (docs/benchmarks.md, "Cluster mode").

    python tests/bench_cluster.py --frames 40 [--json cluster.json]
"""
import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ROOT, tiny  # noqa: E402

import gradio as gr  # noqa: E402
import ray  # noqa: E402
import skimage.data  # noqa: E402

from web.app import LiveApp  # noqa: E402
from web.cluster import Cluster  # noqa: E402


async def measure(apps: dict[str, LiveApp], frames: int) -> dict[str, dict[str, list[float]]]:
    frame = skimage.data.astronaut()[:480, :, :]  # 480×512 RGB, 737 KB raw
    out: dict[str, dict[str, list[float]]] = {name: {"http_frame": [], "call": []} for name in apps}
    requests = {name: gr.Request(session_hash=f"bench-{name}") for name in apps}
    for name, app in apps.items():  # connect and warm up
        for _ in range(5):
            await app.http_frame(frame, requests[name])
    for i in range(frames):
        for name, app in (apps.items() if i % 2 else reversed(apps.items())):  # interleaved, order alternating
            r = requests[name]
            start = time.perf_counter()
            await app.http_frame(frame, r)
            out[name]["http_frame"].append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            await app.workers[0].call("stats", r.session_hash)
            out[name]["call"].append((time.perf_counter() - start) * 1000)
    for name, app in apps.items():
        await app.close_page(requests[name])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    ray.init(address="local", include_dashboard=False, namespace="liveportrait",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    cluster = Cluster(tiny(step_s=0.1), 1)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    apps = {"single process": LiveApp(tiny(step_s=0.1), untrained=True, workdir=work / "single"),
            "cluster (Ray actor)": LiveApp(tiny(), untrained=True, workdir=work / "cluster", workers=cluster.workers)}
    try:
        times = asyncio.run(measure(apps, args.frames))
    finally:
        for app in apps.values():
            app.close()
        ray.shutdown()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    report = dict(cpu=cpu, cores=os.cpu_count(), load=os.getloadavg()[0], frames=args.frames, frame="480×512 RGB",
                  results={name: {k: dict(p50_ms=statistics.median(v), p90_ms=statistics.quantiles(v, n=10)[-1])
                                  for k, v in t.items()} for name, t in times.items()})
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    single, clustered = (report["results"][n] for n in apps)
    print(f"\n{cpu}, {os.cpu_count()} cores, load {report['load']:.1f}, {args.frames} frames each, interleaved\n")
    print("| | single process p50 / p90 ms | cluster p50 / p90 ms | cluster / single (p50) |\n|---|---|---|---|")
    for k, label in (("http_frame", "HTTP-streaming frame round trip"), ("call", "a call (tab stats)")):
        s, c = single[k], clustered[k]
        print(f"| {label} | {s['p50_ms']:.1f} / {s['p90_ms']:.1f} | {c['p50_ms']:.1f} / {c['p90_ms']:.1f} | "
              f"{c['p50_ms'] / s['p50_ms']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
