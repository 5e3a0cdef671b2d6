"""Load and soak test of a running server with real WebRTC clients, over loopback only.

    python -m web.loadtest serve --weights recipe --config tiny --port 7860    # the app, ICE on 127.0.0.1
    python launch.py loadtest --url http://127.0.0.1:7860/ --clients 8 --minutes 5

Each client does what the page does in a browser: it registers a tab through Gradio (the page's load event via the
queue, with its own session hash, plus the heartbeat stream whose end is the tab's unload), posts its WebRTC offer
to /offer with that session id, sends a moving-face 640x480 VP8 webcam stream and receives the animated track.
Reported per client: connect time (page load to the first animated frame), frames and fps received, the worst
10-second window, failures; for the server (found by its listening port): RSS, threads and open file descriptors
from /proc before, during and after. Only 127.0.0.0/8 is ever contacted; every loop ends by count or deadline.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import multiprocessing
import os
import secrets
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from urllib.parse import urlsplit

import av
import httpx
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError
from aiortc.rtcrtpsender import RTCRtpSender

from stream.serve_bench import H, W, moving_face  # the same moving-face clip the serving benchmark feeds

log = logging.getLogger("liveportrait.loadtest")
CLOCK = Fraction(1, 90000)
WINDOW = 10  # s: "receives frames throughout" = at least one frame in every window after the first frame
STEP = 10  # s between server samples
SETTLE = 60  # s at most to wait for the server to return to its idle counts after the clients left


def loopback_ice() -> None:
    """aiortc gathers host candidates on every interface but loopback; here it is loopback and nothing else."""
    import aioice.ice
    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: ["127.0.0.1"]


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Webcam(VideoStreamTrack):
    """The moving face at `fps`, paced by the clock like a camera."""

    def __init__(self, frames: list[np.ndarray], fps: float):
        super().__init__()
        self.frames, self.fps, self.n, self.t0 = frames, fps, 0, time.monotonic()

    async def recv(self) -> av.VideoFrame:
        self.n += 1
        await asyncio.sleep(max(0.0, self.t0 + self.n / self.fps - time.monotonic()))
        frame = av.VideoFrame.from_ndarray(self.frames[self.n % len(self.frames)], format="rgb24")
        frame.pts, frame.time_base = int(self.n / self.fps / CLOCK), CLOCK
        return frame


def loopback_only_sdp(sdp: str) -> str:
    """The server's answer without candidates outside loopback: the client never sends anywhere else."""
    keep = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:") and not is_loopback(line.split()[4]):
            continue
        keep.append(line)
    return "\r\n".join(keep) + "\r\n"


class Tab:
    """A page session as a browser holds it: registered by the page's load event, kept by the heartbeat stream."""

    def __init__(self, http: httpx.AsyncClient):
        self.http, self.session = http, secrets.token_hex(6)
        self._heartbeat: asyncio.Task | None = None

    async def call(self, api_name: str, data: list | None = None, timeout: float = 60) -> list:
        """Run one of the page's events through Gradio's queue, as the page's JS does; its output data."""
        config = (await self.http.get("config")).raise_for_status().json()
        fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
        join = await self.http.post("gradio_api/queue/join", json={
            "data": data or [], "fn_index": fn, "session_hash": self.session, "trigger_id": None,
            "event_data": None})
        event = join.raise_for_status().json()["event_id"]

        async def result() -> list:
            async with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": self.session}) as r:
                async for line in r.aiter_lines():
                    msg = json.loads(line[5:]) if line.startswith("data:") else {}
                    if msg.get("event_id") == event and msg.get("msg") == "process_completed":
                        if not msg.get("success"):
                            raise RuntimeError(f"{api_name} failed: {msg.get('output')}")
                        return msg["output"]["data"]
            raise RuntimeError(f"{api_name}: the queue stream ended early")
        return await asyncio.wait_for(result(), timeout)

    async def open(self) -> dict:
        """Load the page: {session, secret}, what the page's WebRTC client sends with its offer."""
        async def heartbeat() -> None:
            async with self.http.stream("GET", f"gradio_api/heartbeat/{self.session}", timeout=None) as r:
                async for _ in r.aiter_lines():
                    pass
        self._heartbeat = asyncio.ensure_future(heartbeat())
        return json.loads((await self.call("open_page"))[0])

    async def close(self) -> None:
        """The tab goes away: its heartbeat connection ends, the server runs the page's unload event."""
        if self._heartbeat:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)


@dataclass
class ClientResult:
    client: int
    connect_s: float | None = None  # page load -> first animated frame
    frames: int = 0
    fps: float = 0.0  # after the first frame
    worst_window_fps: float = 0.0  # the slowest WINDOW-second window after the first frame
    size: tuple[int, int] | None = None
    stalls: int = 0  # WINDOW-second waits without a frame (a slow server; not a failure by itself)
    failures: list[str] = field(default_factory=list)  # errors: signalling, ICE, the track ended, no frame at all


async def offer(http: httpx.AsyncClient, pc: RTCPeerConnection, page: dict) -> None:
    """The page's signalling: one POST /offer with every candidate in it and the page's {session, secret}, the
    answer back."""
    await pc.setLocalDescription(await pc.createOffer())
    r = await http.post("offer", json={"sdp": pc.localDescription.sdp, "type": "offer", **page})
    if r.status_code != 200:
        raise RuntimeError(f"/offer answered {r.status_code}: {r.text[:200]}")
    answer = r.json()
    await pc.setRemoteDescription(RTCSessionDescription(sdp=loopback_only_sdp(answer["sdp"]), type="answer"))


def new_peer(frames: list[np.ndarray], fps: float) -> tuple[RTCPeerConnection, asyncio.Future]:
    """A client peer sending the webcam in VP8 and receiving one video track (the future)."""
    pc = RTCPeerConnection()
    transceiver = pc.addTransceiver(Webcam(frames, fps), direction="sendrecv")
    transceiver.setCodecPreferences([c for c in RTCRtpSender.getCapabilities("video").codecs
                                     if c.mimeType == "video/VP8"])
    received = asyncio.get_running_loop().create_future()
    pc.on("track", lambda track: received.done() or received.set_result(track))
    return pc, received


async def run_client(i: int, http: httpx.AsyncClient, seconds: float, frames: list[np.ndarray],
                     fps: float, delay: float = 0.0) -> ClientResult:
    """One tab for `seconds` (after `delay`): load the page, go live over WebRTC, count the animated frames,
    close the tab."""
    await asyncio.sleep(delay)
    res, t0 = ClientResult(i), time.monotonic()
    deadline = t0 + seconds
    tab, pc = Tab(http), None
    counts = [0] * (int(seconds) // WINDOW + 2)  # frames per window, bounded by the run's length
    try:
        page = await tab.open()
        pc, received = new_peer(frames, fps)
        pc.on("connectionstatechange", lambda: pc.connectionState == "failed" and res.failures.append("ICE failed"))
        await offer(http, pc, page)
        track = await asyncio.wait_for(received, 30)
        first = None
        while (now := time.monotonic()) < deadline:
            try:
                frame = await asyncio.wait_for(track.recv(), min(WINDOW, deadline - now + 0.1))
            except asyncio.TimeoutError:
                res.stalls += time.monotonic() < deadline
                continue
            now = time.monotonic()
            if first is None:
                first, res.connect_s, res.size = now, round(now - t0, 2), (frame.width, frame.height)
            res.frames += 1
            counts[min(int((now - first) // WINDOW), len(counts) - 1)] += 1
        if first is None:
            res.failures.append("no animated frame at all")
        else:
            full = int((deadline - first) // WINDOW)  # whole windows only
            res.fps = round((res.frames - 1) / max(1e-3, deadline - first), 2)
            res.worst_window_fps = round(min(counts[:full]) / WINDOW, 2) if full else res.fps
    except MediaStreamError:
        res.failures.append(f"the animated track ended at t={time.monotonic() - t0:.0f} s")
    except Exception as e:
        res.failures.append(f"{type(e).__name__}: {e}")
    finally:
        if pc:
            await pc.close()
        await tab.close()
    return res


def server_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:`port` (from /proc/net/tcp and each process's fds)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(f"socket:[{cols[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                return int(pid)
        except OSError:
            continue
    return None


def proc_stats(pid: int) -> dict:
    """RSS (MB), threads and open fds of a process, from /proc."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return dict(t=round(time.monotonic(), 1), rss_mb=round(int(status["VmRSS"].split()[0]) / 1024, 1),
                threads=int(status["Threads"]), fds=len(os.listdir(f"/proc/{pid}/fd")))


def client_process(url: str, i: int, seconds: float, fps: float, delay: float,
                   auth: tuple[str, str] | None) -> dict:
    """One client in its own process, as each browser tab is: one event loop can starve its peers' ICE
    consent checks when it carries many encoders (then both ends drop the connection after 30 s)."""
    loopback_ice()

    async def main() -> ClientResult:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            if auth:
                (await http.post("login", data={"username": auth[0], "password": auth[1]})).raise_for_status()
            return await run_client(i, http, seconds, moving_face(), fps, delay)
    return asdict(asyncio.run(main()))


async def load(url: str, clients: int, seconds: float, fps: float = 15.0, pid: int | None = None,
               auth: tuple[str, str] | None = None) -> dict:
    """N clients (one process each) for `seconds` against the server at `url` (loopback only); results and
    server samples."""
    parts = urlsplit(url)
    if not is_loopback(parts.hostname or ""):
        raise ValueError(f"the load test only talks to loopback addresses, not {parts.hostname!r}")
    url = url.rstrip("/") + "/"
    pid = pid or server_pid(parts.port or 80)
    stats = (lambda: proc_stats(pid)) if pid else dict
    before, during = stats(), []

    async def sample() -> None:
        for _ in range(int(seconds // STEP) + 10):
            await asyncio.sleep(STEP)
            during.append(stats())
    sampler = asyncio.ensure_future(sample())
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(clients, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = await asyncio.gather(*[loop.run_in_executor(pool, client_process, url, i, seconds, fps,
                                                              0.5 * i, auth) for i in range(clients)])
    sampler.cancel()
    t_end, after = time.monotonic(), stats()
    while pid and time.monotonic() - t_end < SETTLE and (after["threads"] > before["threads"]
                                                         or after["fds"] > before["fds"]):
        await asyncio.sleep(2)
        after = stats()
    during = [s for s in during if s]
    warm = [s for s in during if s["t"] - during[0]["t"] >= min(60, seconds / 5)] if during else []
    return dict(url=url, clients=clients, seconds=seconds, webcam=f"{W}x{H} VP8 at {fps:g} fps",
                results=results, server_pid=pid, before=before, during=during, after=after,
                rss_growth_after_warmup_mb=round(warm[-1]["rss_mb"] - warm[0]["rss_mb"], 1) if len(warm) > 1 else None,
                failed_clients=sum(bool(r["failures"]) for r in results))


def table(report: dict) -> str:
    rows = [f"{report['clients']} clients x {report['seconds'] / 60:g} min, webcam {report['webcam']}",
            "| client | connect s | frames | fps | worst 10 s fps | stalls | size | failures |",
            "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        size = "x".join(map(str, r["size"])) if r["size"] else "-"
        rows.append(f"| {r['client']} | {r['connect_s']} | {r['frames']} | {r['fps']} | {r['worst_window_fps']} | "
                    f"{r['stalls']} | {size} | {'; '.join(r['failures']) or 'none'} |")
    if report["before"]:
        rows += ["", "| server | RSS MB | threads | fds |", "|---|---|---|---|"]
        for name, s in [("before", report["before"]), *[(f"t+{s['t'] - report['before']['t']:.0f} s", s)
                                                         for s in report["during"]], ("after", report["after"])]:
            rows.append(f"| {name} | {s['rss_mb']} | {s['threads']} | {s['fds']} |")
        rows.append(f"\nRSS growth after warm-up: {report['rss_growth_after_warmup_mb']} MB")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:7860/", help="the server (loopback only)")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--minutes", type=float, default=0.5)
    p.add_argument("--fps", type=float, default=15.0, help="webcam frame rate of each client")
    p.add_argument("--pid", type=int, default=None, help="server process for /proc (default: the one on the port)")
    p.add_argument("--login", type=str, default=None, metavar="USER:PASS", help="the server's --auth")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")


def run(args: argparse.Namespace) -> int:
    """CLI: run the load, print JSON and a table; exit status 1 when a client failed."""
    auth = tuple(args.login.split(":", 1)) if args.login else None
    report = asyncio.run(load(args.url, args.clients, args.minutes * 60, args.fps, args.pid, auth))
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text)
    print(text)
    print(table(report))
    return 1 if report["failed_clients"] else 0


def serve(argv: list[str]) -> int:
    """The app for a load test: ICE on 127.0.0.1 only, and a log line of its counts (tabs, peers, engine
    sessions, threads) every 10 s, so a soak can see them return to idle."""
    import launch
    from web import app

    loopback_ice()
    parser = argparse.ArgumentParser(prog="python -m web.loadtest serve")
    launch.common(parser)
    app.add_arguments(parser)

    def report(live: "app.LiveApp") -> None:
        def loop() -> None:
            while True:
                time.sleep(STEP)
                log.info("counts %s", json.dumps(dict(pages=len(live.pages), closed=len(live.closed),
                                                      **asyncio.run(live.workers[0].call("counts")), threads=threading.active_count())))
        threading.Thread(target=loop, name="loadtest-counts", daemon=True).start()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app.run(parser.parse_args(argv), on_start=report)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    sys.exit(serve(sys.argv[2:]))
