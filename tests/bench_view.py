"""Viewer latency: how much later a view-only link shows a frame than the performer's own view. The app runs in this
process with the tiny config; two kinds of aiortc client over loopback, inside a loopback-only network namespace:
the performer (web/loadtest.py: sends the moving face, receives its animated track) and N viewers of its Share
output link (receive-only, as the /view page is). Every decoded frame is logged with its arrival time; a viewer's
frame is matched to the performer's frame with the nearest picture (32x32 grey), and the difference of their
arrival times is the viewer's extra delay. Also what one more viewer costs the server: aiortc's VP8 encoder (each
viewer has its own) on the session's 512x512 output, ms per frame. Prints markdown tables and JSON
(docs/benchmarks.md, "View-only link").

    python tests/bench_view.py --viewers 1,4 --seconds 40 [--json view.json]
"""
import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import skimage.data
from aiortc.codecs.vpx import Vp8Encoder

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import NETNS_UNAVAILABLE, tiny  # noqa: E402  (importing it moves this process into the namespace)
from test_reliability import free_port  # noqa: E402
from test_view import watch  # noqa: E402

import httpx  # noqa: E402

from stream.serve_bench import moving_face  # noqa: E402
from web import loadtest  # noqa: E402

WARMUP_S = 5.0  # the first seconds (connecting, the encoders' first key frames) are not measured
WINDOW_S = 3.0  # a viewer's frame is matched only to the performer's frames this close in time


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


async def collect(track, until: float) -> list[tuple[float, np.ndarray]]:
    """(arrival time, 32x32 grey picture) of every frame the track decodes until `until` (monotonic)."""
    log = []
    for _ in range(100_000):  # bounded; ends at `until`
        left = until - time.monotonic()
        if left <= 0:
            break
        try:
            frame = await asyncio.wait_for(track.recv(), left)
        except asyncio.TimeoutError:
            break
        log.append((time.monotonic(), cv2.resize(frame.to_ndarray(format="gray"), (32, 32),
                                                  interpolation=cv2.INTER_AREA).astype(np.float32)))
    return log


def delays(own: list, seen: list) -> tuple[list[float], int]:
    """Each viewer frame's arrival minus that of the performer's frame with the nearest picture (ms), for the
    unambiguous matches (the best clearly nearer than the runner-up); and how many viewer frames there were."""
    out = []
    for t, img in seen:
        near = [(float(np.abs(img - p).mean()), tp) for tp, p in own if abs(tp - t) < WINDOW_S]
        if len(near) < 2:
            continue
        (best, tp), (second, _) = sorted(near)[:2]
        if best < 0.5 * second:
            out.append((t - tp) * 1000)
    return out, len(seen)


def encode_ms(frames: int = 90) -> dict:
    """ms per frame of one aiortc VP8 encoder on a moving 512x512 picture (the session's output size): what each
    viewer adds to the server's work per output frame."""
    face = cv2.resize(skimage.data.astronaut(), (512, 512))
    encoder, took = Vp8Encoder(), []
    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(np.roll(face, 4 * (i % 16), axis=1), format="rgb24")
        frame.pts, frame.time_base = i * 3000, loadtest.CLOCK
        start = time.perf_counter()
        encoder.encode(frame)
        took.append((time.perf_counter() - start) * 1000)
    took = took[10:]  # the first frames (a key frame, the encoder's set-up) are not typical
    return dict(median=round(statistics.median(took), 2), p95=round(float(np.percentile(took, 95)), 2))


async def run(url: str, viewers: int, seconds: float, fps: float) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        tab = loadtest.Tab(http)
        page = await tab.open()
        token = (await tab.call("share_output", [url, json.dumps(page)]))[0].rsplit("/", 1)[1]
        performer, received = loadtest.new_peer(moving_face(), fps)
        watchers = []
        try:
            await loadtest.offer(http, performer, page)
            tracks = [await asyncio.wait_for(received, 30)]
            for _ in range(viewers):
                pc, track, r = await watch(http, token)
                watchers.append(pc)
                if r.status_code != 200:
                    raise RuntimeError(f"viewer refused: {r.status_code} {r.text}")
                tracks.append(await asyncio.wait_for(track, 30))
            await asyncio.sleep(WARMUP_S)
            logs = await asyncio.gather(*(collect(t, time.monotonic() + seconds) for t in tracks))
        finally:
            for pc in [performer, *watchers]:
                await pc.close()
            await tab.close()
    own, per_viewer = logs[0], [delays(logs[0], log) for log in logs[1:]]
    ms = [d for d, _ in per_viewer for d in d]
    return dict(viewers=viewers, performer_frames=len(own), viewer_frames=[n for _, n in per_viewer],
                matched=[len(d) for d, _ in per_viewer],
                extra_delay_ms=dict(median=round(statistics.median(ms), 1), p95=round(float(np.percentile(ms, 95)), 1),
                                    min=round(min(ms), 1), max=round(max(ms), 1)) if ms else None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--viewers", default="1,4", help="comma-separated viewer counts, one run each")
    parser.add_argument("--seconds", type=float, default=40.0, help="measured seconds per run (after the warm-up)")
    parser.add_argument("--fps", type=float, default=15.0, help="the performer's webcam frame rate")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if NETNS_UNAVAILABLE:
        print(f"needs a loopback-only network namespace: {NETNS_UNAVAILABLE}", file=sys.stderr)
        return 2
    from web.app import LiveApp

    loadtest.loopback_ice()
    counts = [int(n) for n in args.viewers.split(",")]
    app = LiveApp(tiny(max_viewers=max(counts)), untrained=True)
    port = free_port()
    demo = app.launch(port=port, block=False)
    load, runs = os.getloadavg()[0], []
    try:
        for n in counts:
            runs.append(asyncio.run(run(f"http://127.0.0.1:{port}/", n, args.seconds, args.fps)))
            print(f"{n} viewer(s): {runs[-1]}", file=sys.stderr)
    finally:
        demo.close()
        app.close()
    report = dict(when=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=cpu_model(), config="tiny", weights="recipe",
                  webcam=f"640x480 VP8 at {args.fps:g} fps", seconds=args.seconds,
                  load_avg_1min=[load, os.getloadavg()[0]], runs=runs, vp8_encode_512_ms_per_frame=encode_ms())
    print("| viewers | performer frames | viewer frames matched | extra delay median ms | p95 | min | max |\n"
          "|---|---|---|---|---|---|---|")
    for r in runs:
        d = r["extra_delay_ms"] or dict(median="-", p95="-", min="-", max="-")
        print(f"| {r['viewers']} | {r['performer_frames']} | {sum(r['matched'])} of {sum(r['viewer_frames'])} | "
              f"{d['median']} | {d['p95']} | {d['min']} | {d['max']} |")
    enc = report["vp8_encode_512_ms_per_frame"]
    print(f"\none more viewer: VP8 encode of a 512x512 frame, median {enc['median']} ms, p95 {enc['p95']} ms")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
