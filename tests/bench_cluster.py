"""What cluster mode costs a frame: the HTTP-streaming round trip (one 640×480 webcam frame in, the animated frame
out, through the front's handler) with the worker in this process against the worker in a Ray actor, interleaved in
one run, and the bare call round trip (a tab's stats) both ways. Tiny config, CPU, one worker each. Then what the
frame could cross Ray as: raw RGB pixels (what the front's handler has: Gradio decodes the browser's JPEG data URL
into an array) against the browser's JPEG as it came, decoded on the actor; and that decode alone, as Gradio does it
in the front today. Prints a markdown table and JSON (docs/benchmarks.md, "Cluster mode").

    python tests/bench_cluster.py --frames 40 [--json cluster.json]
"""
import argparse
import asyncio
import base64
import io
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

import cv2  # noqa: E402
import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import ray  # noqa: E402
import skimage.data  # noqa: E402
from gradio.image_utils import decode_base64_to_image_array  # noqa: E402

from web.app import LiveApp  # noqa: E402
from web.cluster import Cluster  # noqa: E402


WEBCAM = cv2.resize(skimage.data.astronaut(), (640, 480))  # a 640×480 RGB webcam frame: 921,600 bytes raw


def browser_jpeg(frame: np.ndarray) -> bytes:
    """The frame as Gradio's streaming webcam sends it: canvas.toDataURL("image/jpeg"), the browser's default
    quality 0.92."""
    out = io.BytesIO()
    PIL.Image.fromarray(frame).save(out, "JPEG", quality=92)
    return out.getvalue()


class Probe:
    """A bare async actor: what a frame costs to reach one and come back, as pixels or as the JPEG."""

    async def pixels(self, frame: np.ndarray) -> tuple:
        return frame.shape

    async def jpeg(self, data: bytes) -> tuple:
        return np.asarray(PIL.Image.open(io.BytesIO(data)).convert("RGB")).shape


def transfer(frames: int) -> tuple[dict[str, list[float]], int]:
    """Per frame, interleaved: raw RGB to a Ray actor, the JPEG to it and decoded there, and Gradio's decode of the
    JPEG data URL in this process. Also returns the JPEG's size."""
    jpeg = browser_jpeg(WEBCAM)
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    probe = ray.remote(Probe).remote()
    steps = {"raw RGB to the actor": lambda: ray.get(probe.pixels.remote(WEBCAM)),
             "JPEG to the actor, decoded there": lambda: ray.get(probe.jpeg.remote(jpeg)),
             "JPEG data URL decoded in the front (Gradio)": lambda: decode_base64_to_image_array(url).shape}
    out: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(frames + 5):  # the first 5 warm up
        for name, step in (steps.items() if i % 2 else reversed(steps.items())):
            start = time.perf_counter()
            assert step() == WEBCAM.shape
            if i >= 5:
                out[name].append((time.perf_counter() - start) * 1000)
    ray.kill(probe)
    return out, len(jpeg)


async def measure(apps: dict[str, LiveApp], frames: int) -> dict[str, dict[str, list[float]]]:
    frame = WEBCAM
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
    load = os.getloadavg()[0]
    ray.init(address="local", include_dashboard=False, namespace="liveportrait",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    cluster = Cluster(tiny(step_s=0.1), 1)
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    apps = {"single process": LiveApp(tiny(step_s=0.1), untrained=True, workdir=work / "single"),
            "cluster (Ray actor)": LiveApp(tiny(), untrained=True, workdir=work / "cluster", workers=cluster.workers)}
    try:
        times = asyncio.run(measure(apps, args.frames))
        moved, jpeg_bytes = transfer(args.frames)
    finally:
        for app in apps.values():
            app.close()
        ray.shutdown()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())

    def summary(v: list[float]) -> dict:
        return dict(p50_ms=statistics.median(v), p90_ms=statistics.quantiles(v, n=10)[-1])
    report = dict(cpu=cpu, cores=os.cpu_count(), load=[load, os.getloadavg()[0]], frames=args.frames,
                  frame="640×480 RGB", jpeg_bytes=jpeg_bytes,
                  results={name: {k: summary(v) for k, v in t.items()} for name, t in times.items()},
                  transfer={k: summary(v) for k, v in moved.items()})
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)
    single, clustered = (report["results"][n] for n in apps)
    print(f"\n{cpu}, {os.cpu_count()} cores, load average {load:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"{args.frames} frames each, interleaved\n")
    print("| | single process p50 / p90 ms | cluster p50 / p90 ms | cluster / single (p50) |\n|---|---|---|---|")
    for k, label in (("http_frame", "HTTP-streaming frame round trip"), ("call", "a call (tab stats)")):
        s, c = single[k], clustered[k]
        print(f"| {label} | {s['p50_ms']:.1f} / {s['p90_ms']:.1f} | {c['p50_ms']:.1f} / {c['p90_ms']:.1f} | "
              f"{c['p50_ms'] / s['p50_ms']:.2f}x |")
    print(f"\n| a 640×480 webcam frame (raw {WEBCAM.nbytes:,} B, JPEG q92 {jpeg_bytes:,} B) | p50 / p90 ms |\n|---|---|")
    for k, v in report["transfer"].items():
        print(f"| {k} | {v['p50_ms']:.2f} / {v['p90_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
