"""WebRTC transport: the browser's webcam track in, the animated track out, one aiortc peer connection per live
view. Signalling is a single POST /offer: no trickle ICE; the browser sends the candidates it found within 2 s, and
aiortc gathers the server's (STUN and TURN within aioice's 5 s bound) before it answers.

The incoming track is read as fast as the browser sends and every frame goes to the session pipeline, which keeps
only the newest; the outgoing track emits each new output once, stamped with wall-clock time, so the browser
shows frames at the rate the engine makes them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from fractions import Fraction
from typing import Awaitable, Callable

import av
from aiortc import (MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription,
                    VideoStreamTrack)
from aiortc.mediastreams import MediaStreamError

from stream.pipeline import SessionPipeline

log = logging.getLogger("liveportrait.webrtc")
CLOCK = Fraction(1, 90000)  # the RTP video clock
CONNECT_TIMEOUT = 30  # s from the answer to a connected peer (the page falls back after 10 s); ICE takes far less


def parse_ice_servers(text: str | None) -> list[dict]:
    """`--ice-servers` / LP_ICE_SERVERS: a JSON list (of URLs or {"urls", "username", "credential"}) or
    comma-separated URLs. Empty: no STUN/TURN at all (LAN and loopback only)."""
    text = (text or "").strip()
    if not text:
        return []
    items = json.loads(text) if text.startswith("[") else [u.strip() for u in text.split(",") if u.strip()]
    servers = [{"urls": i} if isinstance(i, str) else dict(i) for i in items]
    for s in servers:
        if not s.get("urls") or set(s) - {"urls", "username", "credential"}:
            raise ValueError(f"bad ICE server {s!r}: expected a URL or {{'urls', 'username', 'credential'}}")
    return servers


def turn_server(url: str | None, user: str | None, password: str | None) -> list[dict]:
    """`--turn-url/--turn-user/--turn-password` as an ICE server entry ([] without a URL). Browsers refuse a TURN
    server without credentials, so both are required."""
    if not url:
        return []
    if not url.startswith(("turn:", "turns:")):
        raise ValueError(f"--turn-url {url!r}: expected turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]")
    if not (user and password):
        raise ValueError("--turn-url needs --turn-user and --turn-password (or $LP_TURN_PASSWORD)")
    return [{"urls": url, "username": user, "credential": password}]


class AnimatedTrack(VideoStreamTrack):
    """The session's output as a video track: each new output frame once, timestamped by wall clock."""

    def __init__(self, pipeline: SessionPipeline, on_end: Callable[[], None]):
        super().__init__()
        loop = asyncio.get_running_loop()
        self.pipeline, self._on_end = pipeline, on_end
        self._fresh = asyncio.Event()
        self._seq = 0
        self._t0 = time.monotonic()
        pipeline.on_output = lambda: loop.is_closed() or loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        """A new output, or the pipeline closed (replaced by a newer connection, the tab gone, reaped): then the
        peer ends too, even if it never connected and so never asks for a frame."""
        self._fresh.set()
        if self.pipeline.closed and self.readyState == "live":
            self._on_end()

    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live" or self.pipeline.closed:
                self._on_end()
                raise MediaStreamError
            seq, image = self.pipeline.latest()
            if seq > self._seq:
                break
            self._fresh.clear()
            await self._fresh.wait()
        self._seq = seq
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame.pts, frame.time_base = int((time.monotonic() - self._t0) / CLOCK), CLOCK
        return frame

    def stop(self) -> None:
        super().stop()
        self._fresh.set()


class WebRTC:
    """Every peer connection of the server, so each is cleaned up on disconnect and all at shutdown."""

    def __init__(self, ice_servers: list[dict]):
        self.ice_servers = ice_servers
        self.peers: dict[RTCPeerConnection, Callable] = {}

    async def answer(self, offer: dict, connect: Callable[[], Awaitable[SessionPipeline | None]],
                     on_close: Callable[[SessionPipeline], None]) -> dict | None:
        """Answer a browser's offer: its video feeds a pipeline, whose output is sent back. The offer is applied to
        a fresh peer first; only once aiortc has accepted it does `connect()` make the pipeline (replacing the
        tab's connection), so a broken offer (raised here) leaves the tab as it was. None when `connect()` gives
        no pipeline (the tab was closed). When the connection ends (closed, failed, track ended) the peer is
        closed and `on_close(pipeline)` runs (in a worker thread: it waits for the pipeline's frames in flight)."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**s) for s in self.ice_servers]))
        webcam: list[MediaStreamTrack] = []
        pc.on("track", lambda track: track.kind == "video" and webcam.append(track))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
            if not webcam:
                raise ValueError("the offer has no video track")
            pipeline = await connect()
        except BaseException:
            await pc.close()
            raise
        if pipeline is None:
            await pc.close()
            return None
        tasks: set[asyncio.Task] = set()  # held here: the event loop keeps only weak references to tasks

        def spawn(coro) -> None:
            task = asyncio.ensure_future(coro)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async def close() -> None:
            if self.peers.pop(pc, None) is None:
                return
            output.stop()
            for task in tasks - {asyncio.current_task()}:
                task.cancel()
            await pc.close()
            await asyncio.to_thread(on_close, pipeline)
            log.info("peer %s closed", pipeline.name)

        output = AnimatedTrack(pipeline, lambda: spawn(close()))
        self.peers[pc] = close

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("peer %s: %s", pipeline.name, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await close()

        async def watchdog() -> None:  # an offer whose sender vanished never connects: nothing may wait forever
            await asyncio.sleep(CONNECT_TIMEOUT)
            if pc.connectionState != "connected":
                log.info("peer %s: not connected after %d s", pipeline.name, CONNECT_TIMEOUT)
                await close()

        try:
            spawn(self._pump(webcam[0], pipeline, close))
            spawn(watchdog())
            pc.addTrack(output)
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            await close()
            raise

        return {"sdp": pc.localDescription.sdp, "type": pc.localDescription.type}

    @staticmethod
    async def _pump(track: MediaStreamTrack, pipeline: SessionPipeline, close: Callable) -> None:
        """Browser frames -> the pipeline's pending slot, until the browser's track ends."""
        try:
            while True:
                frame = await track.recv()
                pipeline.submit(frame)  # converted to RGB on the pool, and only if not dropped
        except MediaStreamError:
            await close()

    async def close_all(self) -> None:
        """Close every peer (server shutdown)."""
        await asyncio.gather(*[close() for close in list(self.peers.values())])
