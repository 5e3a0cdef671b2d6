"""Connection set-up time in a real browser: from the click to the first animated frame on the page, for WebRTC,
for HTTP streaming, and for WebRTC that cannot connect (the page's fallback to HTTP streaming). The app runs in
this process with the tiny config; Chromium with a fake webcam; everything inside a loopback-only network
namespace. Prints a markdown table and JSON (docs/benchmarks.md, "Connection set-up").

    python tests/bench_connect.py --runs 5 [--json connect.json]
"""
import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import NETNS_UNAVAILABLE, tiny  # noqa: E402  (importing it moves this process into the namespace)
from test_e2e_browser import CHROMIUM, FLAGS, free_port, sync_playwright, wait_until, webcam_frames, write_y4m  # noqa: E402

HTTP_START = """async () => {  // the HTTP streaming tab's two clicks, as fast as a script can: ms to the first frame
    const q = (s) => document.querySelector(s);
    const until = async (f) => { for (let i = 0; i < 6000 && !f(); i++) await new Promise(r => setTimeout(r, 5)); return f(); };
    const t0 = performance.now();
    q('#lp-http-cam [title="grant webcam access"] > button').click();
    (await until(() => q('#lp-http-cam button:has([title="start recording"])'))).click();
    const t1 = performance.now();
    await until(() => q('#lp-http-view img'));
    return [t1 - t0, performance.now() - t1];
}"""
FALLBACK_START = """async () => {  // WebRTC that cannot connect: ms from the click to the first HTTP streaming frame
    const t0 = performance.now();
    document.querySelector('.lp-start').click();
    for (let i = 0; i < 12000 && !document.querySelector('#lp-http-view img'); i++) await new Promise(r => setTimeout(r, 5));
    return performance.now() - t0;
}"""


def measure(runs: int) -> dict[str, list[float]]:
    import aioice.ice
    from web.app import LiveApp

    host = ["127.0.0.1"]  # aioice's host addresses; [] = offers answered, ICE never connects
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(host)
    work = Path(tempfile.mkdtemp(prefix="bench-connect-"))
    write_y4m(work / "cam.y4m", webcam_frames())
    app = LiveApp(tiny(), untrained=True, workdir=work)
    port = free_port()
    demo = app.launch(port=port, block=False)
    times = {"WebRTC": [], "HTTP streaming": [], "HTTP streaming: opening the webcam": [],
             "WebRTC fails -> fallback": []}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=FLAGS + [f"--use-file-for-fake-video-capture={work / 'cam.y4m'}"])
            for i in range(runs):
                for kind in ("WebRTC", "HTTP streaming", "WebRTC fails -> fallback"):
                    page = browser.new_page()
                    page.goto(f"http://127.0.0.1:{port}/")
                    page.wait_for_function("() => document.querySelector('.lp-start') && window.lpLive")
                    wait_until(lambda: app.pages, 30)
                    time.sleep(1)  # let the page settle: the click is what is timed
                    if kind == "WebRTC":
                        page.click(".lp-start")
                        page.wait_for_function("() => window.lpLive.frames >= 1", timeout=60_000, polling=50)
                        times[kind].append(page.evaluate("window.lpLive.firstFrameMs"))
                    elif kind == "HTTP streaming":
                        page.get_by_role("tab", name="Live (HTTP streaming)").click()
                        page.wait_for_selector('#lp-http-cam [title="grant webcam access"] > button')
                        camera, first = page.evaluate(HTTP_START)
                        times["HTTP streaming: opening the webcam"].append(camera)
                        times[kind].append(first)
                    else:
                        host.clear()
                        times[kind].append(page.evaluate(FALLBACK_START))
                        host.append("127.0.0.1")
                    page.close()
                    wait_until(lambda: not app.pages and not app.workers[0].worker.counts()["peers"] and not app.workers[0].worker.engine.sessions, 60)
                print(f"run {i + 1}/{runs}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()),
                      file=sys.stderr)
            browser.close()
    finally:
        demo.close()
        app.close()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if NETNS_UNAVAILABLE:
        print(f"needs a loopback-only network namespace: {NETNS_UNAVAILABLE}", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    times = measure(args.runs)
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "config": "tiny", "weights": "recipe", "runs": args.runs, "load_avg_1min": [load, os.getloadavg()[0]],
              "ms": {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": [round(x) for x in v]}
                     for k, v in times.items()}}
    print("| click -> first animated frame | median ms | min | max | runs |\n|---|---|---|---|---|")
    for k, v in report["ms"].items():
        print(f"| {k} | {v['median']:.0f} | {v['min']:.0f} | {v['max']:.0f} | {args.runs} |")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
