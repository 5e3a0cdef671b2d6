"""WebRTC transport: the browser's webcam track in, the animated track out, one aiortc peer connection per live
view. Signalling is a single POST /offer: no trickle ICE; the browser sends the candidates it found within 2 s, and
aiortc gathers the server's (STUN and TURN within aioice's 5 s bound) before it answers.

The incoming track is read as fast as the browser sends and every frame goes to the session pipeline, which keeps
only the newest; the outgoing track emits each new output once, stamped with wall-clock time, so the browser
shows frames at the rate the engine makes them.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from fractions import Fraction
from typing import Callable

import av
from aiortc import (MediaStreamTrack, RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription,
                    VideoStreamTrack)
from aiortc.mediastreams import MediaStreamError

from stream import encode
from stream.pipeline import SessionPipeline

log = logging.getLogger("liveportrait.webrtc")
CLOCK = Fraction(1, 90000)  # the RTP video clock
TURN_TTL_S = 24 * 3600  # minted TURN credentials expire after this (coturn checks it at every allocation refresh)
CONNECT_TIMEOUT = 30  # s from the answer to a connected peer (the page falls back after 10 s); ICE takes far less
ICE_SCHEMES = ("stun:", "stuns:", "turn:", "turns:")


def parse_ice_servers(text: str | None) -> list[dict]:
    """`--ice-servers` / LP_ICE_SERVERS: a JSON list (of URLs or {"urls", "username", "credential"}) or
    comma-separated URLs, each stun:, stuns:, turn: or turns:. Empty: no STUN/TURN at all (LAN and loopback only).
    Raises ValueError saying what is wrong, so a bad value stops the server at start, not every offer later."""
    text = (text or "").strip()
    if not text:
        return []
    try:
        items = json.loads(text) if text.startswith("[") else [u.strip() for u in text.split(",") if u.strip()]
    except ValueError:
        raise ValueError(f"bad ICE servers {text[:60]!r}: not a JSON list") from None
    servers = [{"urls": i} if isinstance(i, str) else dict(i) if isinstance(i, dict) else {"bad": i} for i in items]
    for s in servers:
        if not s.get("urls") or set(s) - {"urls", "username", "credential"}:
            raise ValueError(f"bad ICE server {s!r}: expected a URL or {{'urls', 'username', 'credential'}}")
        for url in [s["urls"]] if isinstance(s["urls"], str) else s["urls"]:
            if not (isinstance(url, str) and url.startswith(ICE_SCHEMES) and len(url) > url.index(":") + 1):
                raise ValueError(f"bad ICE server URL {url!r}: expected stun:HOST[:PORT] or turn:HOST[:PORT] "
                                 "(also stuns:, turns:)")
    return servers


def turn_server(url: str | None, user: str | None, password: str | None, secret: str | None = None) -> list[dict]:
    """`--turn-url` with `--turn-secret` (coturn's static-auth-secret: each peer and page gets its own credentials,
    see `mint`), or with `--turn-user/--turn-password` (one long-term user), as an ICE server entry ([] without a
    URL). Browsers refuse a TURN server without credentials, so one of the two is required."""
    if not url:
        if secret:
            raise ValueError("--turn-secret needs --turn-url")
        return []
    if not url.startswith(("turn:", "turns:")):
        raise ValueError(f"--turn-url {url!r}: expected turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT]")
    if secret:
        if user:
            raise ValueError("--turn-secret or --turn-user/--turn-password, not both")
        return [{"urls": url, "secret": secret}]
    if not (user and password):
        raise ValueError("--turn-url needs --turn-secret (or $LP_TURN_SECRET), or --turn-user and --turn-password "
                         "(or $LP_TURN_PASSWORD)")
    return [{"urls": url, "username": user, "credential": password}]


def turn_credentials(url: str, secret: str, ttl_s: float = TURN_TTL_S) -> dict:
    """An ICE entry for the TURN server `url` with credentials in coturn's shared-secret scheme (`use-auth-secret`
    and `static-auth-secret`, the "TURN REST API"): the user name is the Unix time they expire at, the password
    base64(HMAC-SHA1(secret, user name)). The secret itself never leaves the server."""
    user = f"{int(time.time() + ttl_s)}:liveportrait"
    password = base64.b64encode(hmac.new(secret.encode(), user.encode(), hashlib.sha1).digest()).decode()
    return {"urls": url, "username": user, "credential": password}


def mint(ice_servers: list[dict]) -> list[dict]:
    """The ICE servers to give a page or a peer now: a TURN entry with a `secret` (--turn-secret) becomes one with
    fresh credentials that expire; the others are given as they are."""
    return [turn_credentials(s["urls"], s["secret"]) if "secret" in s else s for s in ice_servers]


class AnimatedTrack(VideoStreamTrack):
    """A session's output as a video track: each new output frame once, timestamped by wall clock, as the yuv420p
    frame at the streamed size the pipeline made on its pool (the event loop converts nothing). It sends nothing
    until `bind` gives it the pipeline (the answer is made before the pipeline exists)."""

    def __init__(self):
        super().__init__()
        self.pipeline: SessionPipeline | None = None
        self._fresh = asyncio.Event()
        self._unlisten: Callable[[], None] = lambda: None
        self._seq = 0
        self._t0 = time.monotonic()

    def bind(self, pipeline: SessionPipeline) -> None:
        loop = asyncio.get_running_loop()
        self.pipeline = pipeline
        self._unlisten = pipeline.listen(lambda: loop.is_closed() or loop.call_soon_threadsafe(self._fresh.set))
        self._fresh.set()

    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            seq, video = self.pipeline.latest_video() if self.pipeline else (0, None)
            if seq > self._seq and video is not None:
                break
            self._fresh.clear()
            await self._fresh.wait()
        self._seq = seq
        frame = av.VideoFrame.from_ndarray(video.to_ndarray(), format="yuv420p")  # a frame of its own: its pts
        frame.pts, frame.time_base = int((time.monotonic() - self._t0) / CLOCK), CLOCK
        return frame

    def stop(self) -> None:
        super().stop()
        self._unlisten()
        self._fresh.set()


class Peer:
    """One browser's peer connection. `accept` applies the offer completely (remote description, answer, local
    description) on a fresh peer, so nothing else is touched before aiortc has accepted it; `start` then feeds a
    pipeline; `close` ends it (idempotent). `on_end` is called once if the connection ends by itself: it failed,
    the browser closed it or its webcam track, or it never connected."""

    WEBCAM = True  # the offer must send a webcam

    def __init__(self, pc: RTCPeerConnection, webcam: MediaStreamTrack | None, output: AnimatedTrack):
        self.pc, self.webcam, self.output = pc, webcam, output
        self.codec = encode.negotiated_codec(pc.localDescription.sdp)  # what the page's metrics line names
        self.closed = False
        self._tasks: set[asyncio.Task] = set()  # held here: the event loop keeps only weak references to tasks
        self._on_end: Callable[[], None] | None = None

    @classmethod
    async def accept(cls, offer: dict, ice_servers: list[dict], codec: str = "h264") -> Peer:
        """A peer that has answered `offer`, sending in `codec` where the offer has it (stream/encode.py); raises
        (ValueError or aiortc's error) if aiortc refuses it."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**s) for s in ice_servers]))
        webcam: list[MediaStreamTrack] = []
        pc.on("track", lambda track: track.kind == "video" and webcam.append(track))
        output = AnimatedTrack()
        try:
            # aiortc picks the codec inside setRemoteDescription: the offer's video takes this transceiver
            encode.prefer_codec(pc.addTransceiver("video", direction="sendrecv"), codec)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type=offer["type"]))
            if cls.WEBCAM and not webcam:
                raise ValueError("the offer has no video track")
            pc.addTrack(output)
            await pc.setLocalDescription(await pc.createAnswer())
        except BaseException:
            output.stop()
            await pc.close()
            raise
        return cls(pc, webcam[0] if webcam else None, output)

    @property
    def answer(self) -> dict:
        return {"sdp": self.pc.localDescription.sdp, "type": self.pc.localDescription.type}

    def start(self, pipeline: SessionPipeline, on_end: Callable[[], None]) -> None:
        """Webcam frames -> `pipeline`, its outputs -> the browser; `on_end()` once the connection ends by itself."""
        self._on_end = on_end
        self.output.bind(pipeline)
        self.pc.on("connectionstatechange", self._state)
        for coro in (self._pump(pipeline), self._watchdog(pipeline.name)):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _ended(self) -> None:
        if not self.closed and self._on_end:
            on_end, self._on_end = self._on_end, None
            on_end()

    async def _state(self) -> None:
        log.info("peer %s: %s", id(self), self.pc.connectionState)
        if self.pc.connectionState in ("failed", "closed"):
            self._ended()

    async def _pump(self, pipeline: SessionPipeline) -> None:
        """Browser frames -> the pipeline's pending slot, until the browser's track ends."""
        try:
            while True:
                pipeline.submit(await self.webcam.recv())  # converted to RGB on the pool, and only if not dropped
        except MediaStreamError:
            self._ended()

    async def _watchdog(self, name: str) -> None:
        """An offer whose sender vanished never connects: nothing may wait forever."""
        await asyncio.sleep(CONNECT_TIMEOUT)
        if self.pc.connectionState != "connected":
            log.info("peer %s: not connected after %d s", name, CONNECT_TIMEOUT)
            self._ended()

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.output.stop()
        for task in self._tasks - {asyncio.current_task()}:
            task.cancel()
        await self.pc.close()


class Viewer(Peer):
    """A receive-only peer: a session's output for someone who only watches (the /view/<token> page, OBS). It
    sends no webcam and has no say over the session; its own AnimatedTrack, so aiortc encodes for it alone and
    a slow viewer holds back nobody else."""

    WEBCAM = False

    async def _pump(self, pipeline: SessionPipeline) -> None:
        """Nothing comes in from a viewer."""
