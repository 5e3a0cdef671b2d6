"""Connection set-up time in a real browser: from the click to the first animated frame on the page, for WebRTC,
for HTTP streaming, and for WebRTC that cannot connect (the page's fallback to HTTP streaming). Tiny config;
Chromium with a fake webcam; everything inside a loopback-only network namespace. `--workers 0,2` serves the same
page twice, on two ports, in one run: with the worker in this process (0) and in cluster mode with 2 CPU workers
in a private Ray runtime (web/cluster.py), and alternates between them run by run. The fallback is measured with
the in-process worker only (it is a timer in the page plus an HTTP-streaming start). Prints a markdown table and
JSON (docs/benchmarks.md, "Connection set-up").

    python tests/bench_connect.py --runs 5 [--workers 0,2] [--json connect.json]
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
from conftest import NETNS_UNAVAILABLE, ROOT, run, tiny  # noqa: E402  (importing it moves this process into the namespace)
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


def serve(workers: int, work: Path) -> tuple:
    """The app with its worker in this process (0) or `workers` Ray actors, on a port of its own: (app, port, demo)."""
    from web.app import LiveApp
    cluster = None
    if workers:
        import ray
        from web.cluster import Cluster
        if not ray.is_initialized():  # the actors gather ICE on loopback only, like this process
            ray.init(address="local", include_dashboard=False, namespace="liveportrait",
                     runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)},
                                  "worker_process_setup_hook": "web.loadtest.loopback_ice"})
        cluster = Cluster(tiny(), workers)
    app = LiveApp(tiny(), untrained=True, workdir=work / f"workers-{workers}", workers=cluster and cluster.workers)
    port = free_port()
    return app, port, app.launch(port=port, block=False)


def idle(app) -> bool:
    """Every worker of `app` back to nothing allocated, and no page open."""
    async def all_():
        return await asyncio.gather(*(w.call("counts") for w in app.workers))
    return not app.pages and not any(c["peers"] or c["engine_sessions"] for c in run(all_()))


def measure(runs: int, modes: list[int]) -> dict[str, dict[str, list[float]]]:
    import aioice.ice

    host = ["127.0.0.1"]  # aioice's host addresses in this process; [] = offers answered, ICE never connects
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: list(host)
    work = Path(tempfile.mkdtemp(prefix="bench-connect-"))
    write_y4m(work / "cam.y4m", webcam_frames())
    servers = {mode: serve(mode, work) for mode in modes}
    kinds = {mode: ["WebRTC", "HTTP streaming"] + ([] if mode else ["WebRTC fails -> fallback"]) for mode in modes}
    times = {mode: {k: [] for k in ["WebRTC", "HTTP streaming", "HTTP streaming: opening the webcam",
                                    "WebRTC fails -> fallback"] if k in kinds[mode] or k.startswith("HTTP")}
             for mode in modes}
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM,
                                        args=FLAGS + [f"--use-file-for-fake-video-capture={work / 'cam.y4m'}"])
            for i in range(runs):
                for mode in modes if i % 2 == 0 else modes[::-1]:  # alternating: load changes hit both alike
                    app, port, _ = servers[mode]
                    for kind in kinds[mode]:
                        page = browser.new_page()
                        page.goto(f"http://127.0.0.1:{port}/")
                        page.wait_for_function("() => document.querySelector('.lp-start') && window.lpLive")
                        wait_until(lambda: app.pages, 30)
                        time.sleep(1)  # let the page settle: the click is what is timed
                        if kind == "WebRTC":
                            page.click(".lp-start")
                            page.wait_for_function("() => window.lpLive.frames >= 1", timeout=60_000, polling=50)
                            times[mode][kind].append(page.evaluate("window.lpLive.firstFrameMs"))
                        elif kind == "HTTP streaming":
                            page.get_by_role("tab", name="Live (HTTP streaming)").click()
                            page.wait_for_selector('#lp-http-cam [title="grant webcam access"] > button')
                            camera, first = page.evaluate(HTTP_START)
                            times[mode]["HTTP streaming: opening the webcam"].append(camera)
                            times[mode][kind].append(first)
                        else:
                            host.clear()
                            times[mode][kind].append(page.evaluate(FALLBACK_START))
                            host.append("127.0.0.1")
                        page.close()
                        wait_until(lambda: idle(app), 60)
                    print(f"run {i + 1}/{runs}, {mode} workers: " +
                          ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times[mode].items()), file=sys.stderr)
            browser.close()
    finally:
        for app, _, demo in servers.values():
            demo.close()
            app.close()
        if any(modes):
            import ray
            ray.shutdown()
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workers", default="0", help="comma-separated: 0 = the worker in this process, N = cluster "
                                                       "mode with N CPU workers (default: 0)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    modes = [int(n) for n in args.workers.split(",")]
    if NETNS_UNAVAILABLE:
        print(f"needs a loopback-only network namespace: {NETNS_UNAVAILABLE}", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    times = measure(args.runs, modes)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    report = {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "config": "tiny", "weights": "recipe",
              "runs": args.runs, "load_avg_1min": [load, os.getloadavg()[0]],
              "ms": {("single process" if mode == 0 else f"cluster, {mode} workers"):
                     {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "all": [round(x) for x in v]}
                      for k, v in t.items()} for mode, t in times.items()}}
    print(f"{cpu}, {os.cpu_count()} cores, load average {load:.1f} -> {os.getloadavg()[0]:.1f}\n")
    print("| click -> first animated frame | mode | median ms | min | max | runs |\n|---|---|---|---|---|---|")
    for k in next(iter(times.values())):
        for mode, t in report["ms"].items():
            if k in t:
                print(f"| {k} | {mode} | {t[k]['median']:.0f} | {t[k]['min']:.0f} | {t[k]['max']:.0f} | {args.runs} |")
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
