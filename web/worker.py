"""The worker: one engine and everything live on it. The Gradio front (web/app.py) talks only to this class, through
a handle: `Local` runs it in this process on a loop thread of its own, web/cluster.py as a Ray actor in another.

A worker builds its own engine from a `WorkerConfig` (plain values), and owns per browser tab a `Tab`: its
portrait, its controls, its live connection, its finished recordings and its portrait editor. A tab's live
connection has exactly one owner, the `Tab`, with one way to replace it (`Tab.replace`) and one way to end it
(`Tab.end`), and both run on the worker's event loop, where aiortc's peers live too. Every way a connection ends
comes through there: a new connection, Stop, the peer failing or the webcam track ending, an HTTP-streaming webcam
going quiet, the tab closing or being reaped, and server shutdown.

A tab may also share its output: `share` gives it a view token (a new one revokes the old), and `view_offer` admits
up to `max_viewers` receive-only peers that watch whatever connection the tab has live. The token -> tab lookup is
the worker's; a front with several workers routes a view offer to the worker that holds the token. The tab owns its
viewers: they end with the connection they watch, with the token and with the tab.

The interface is the coroutines below, run on the worker's loop; their slow parts (face detection, waiting for a
frame, a render) run in threads, and the engine on its scheduler's thread. Everything that crosses it is plain,
picklable data: text, numbers, dicts, numpy images, and files as bytes (portraits, driving videos, recordings,
renders); so are its exceptions, whose message is their only argument (a pickle round trip keeps it). `counts`,
`health` and `load` only read, so they answer from any thread.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np
import skimage.data

from model.engine import Engine, load_networks, recorded_compile_mode
from stream import encode
from stream.editor import PortraitEditor
from stream import offline
from stream.face import SourceFace, prepare_source, use_face_model
from stream.pipeline import RecordingRunning, SessionPipeline, Settings
from stream.render import read_image, render
from stream.scheduler import Scheduler
from web.limits import Limits, WorkDir, default_work_dir, release_memory
from web.webrtc import Peer, Viewer, mint

log = logging.getLogger("liveportrait.worker")
WEBRTC, HTTP = "WebRTC", "HTTP streaming"
HTTP_QUIET_S = 5.0  # an HTTP-streaming connection without a webcam frame this long has stopped: its slot frees
CALL_TIMEOUT_S = 120.0  # no call to a worker waits longer (closing a connection waits for its frames in flight)
LOAD_TIMEOUT_S = 5.0  # health and load answer at once, even from a busy worker
MAX_VIEWERS = 4  # receive-only viewers per tab unless --max-viewers says otherwise
RECORD_LIVE = "Start the camera first, then record."  # what Record says to a tab that is not live
CLOSED = "this tab was closed; reload the page"  # TabClosed's message
# Live sessions admitted per device unless --max-sessions says otherwise (docs/benchmarks.md, "Serving"). CPU:
# measured with `launch.py bench serve`; CUDA: not measured yet, one full batch of the scheduler (--max-batch 8).
DEFAULT_MAX_SESSIONS = {"cpu": 4, "cuda": 8}


@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker needs to build its engine and serve, as plain values (it crosses to a Ray actor).
    `max_sessions` None: DEFAULT_MAX_SESSIONS for the device. `step_s`: the engine's time per frame, measured at
    start when None (after the warm-up on CPU, with one engine call otherwise)."""
    weights: str | None = None
    config: str = "full"
    device: str | None = None
    download: bool = True
    compile: str | None = None  # torch.compile mode (model.engine.COMPILE_MODES); None: the device's default
    face_model: str | None = None
    warmup: bool = False
    max_batch: int = 8
    max_sessions: int | None = None
    codec: str = "h264"
    stream_max: int = 720
    max_viewers: int = MAX_VIEWERS
    ice_servers: list[dict] = field(default_factory=list)
    limits: Limits = field(default_factory=Limits)
    workdir: str | None = None
    step_s: float | None = None


class UnknownView(LookupError):
    """A view token that is wrong, revoked, or whose tab has closed."""


class NotLive(RuntimeError):
    """A view offer while the tab that shares its output has no live connection (the viewer page retries)."""


class ViewersFull(RuntimeError):
    """A view offer beyond --max-viewers; the message is meant for the viewer."""

    @classmethod
    def of(cls, n: int) -> ViewersFull:
        return cls(f"this output already has {n} viewer{'s' if n != 1 else ''}")


class ServerFull(RuntimeError):
    """No room for another live session; the message is meant for the user."""

    @classmethod
    def of(cls, live: int) -> ServerFull:
        return cls(f"the server is full ({live} live session{'s' if live != 1 else ''}); try again shortly")


class EditorsFull(RuntimeError):
    """No room for another portrait editor (each holds an engine session); the message is meant for the user."""

    @classmethod
    def of(cls, n: int) -> EditorsFull:
        return cls(f"the server is editing {n} portrait{'s' if n != 1 else ''} already; try the Portrait editing "
                   "tab again shortly")


class TabClosed(RuntimeError):
    """A request for a tab that was closed meanwhile; the message is meant for the user."""


class UnknownTab(LookupError):
    """A call for a tab this worker does not hold: it was never placed here, or the worker restarted, or it closed
    the tab. The front, which keeps the tab's portrait and controls, restores it (`Worker.restore`) unless its page
    has closed."""


class WorkerLost(RuntimeError):
    """A worker died or stopped answering (cluster mode); the message is meant for the user."""


class Connection:
    """A tab's live connection: its pipeline and, over WebRTC, its peer. Closing it is idempotent: every caller
    waits for the same close. Only its Tab closes it, so the recording's path reaches the Tab once."""

    def __init__(self, pipeline: SessionPipeline, peer: Peer | None = None):
        self.pipeline, self.peer = pipeline, peer
        self.transport = pipeline.transport
        self._closing: asyncio.Task | None = None

    def close(self) -> Awaitable[Path | None]:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self._close())
        return asyncio.shield(self._closing)

    async def _close(self) -> Path | None:
        if self.peer:
            try:
                await self.peer.close()
            except Exception:  # the pipeline is freed all the same
                log.exception("closing a peer failed")
        return await asyncio.to_thread(self.pipeline.close)

    def last_frame(self) -> float:
        """When the webcam last sent a frame (the connection's start if none yet)."""
        arrivals = self.pipeline.metrics.arrivals
        return arrivals[-1] if arrivals else self.pipeline.started


class Tab:
    """What one browser tab has on this worker. `conn` changes only through `replace` and `end`, on the loop."""

    def __init__(self, source: SourceFace):
        self.source, self.settings = source, Settings()
        self.conn: Connection | None = None
        self.admitting = 0  # connections being made: they hold a slot meanwhile
        self.retiring = 0  # replaced connections being closed: they hold their slot until closed
        self.connecting: asyncio.Future | None = None  # the HTTP-streaming connection being made
        self.refused: str | None = None  # why the last connection was not admitted (the server was full)
        self.takes: list[Path] = []  # finished recordings not yet handed to the page
        self.editor: PortraitEditor | None = None  # the Portrait editing tab's engine session, once opened
        self.editing = False  # that tab is shown: control changes re-render the edited portrait
        self.seen = time.monotonic()  # the tab's last call or webcam frame decides when it is reaped
        self.closed = False  # forgotten by the worker: a connection made meanwhile must not stay
        self.token: str | None = None  # its view link's token, once shared
        self.viewers: set[Viewer] = set()  # watching `conn`'s output
        self.joining = 0  # view offers being accepted: they hold a viewer slot meanwhile
        self.error: str | None = None  # why the last connection did not end cleanly (the page's metrics line says)
        self.rendering: tuple[float, str] | None = None  # the last render's progress: (fraction done, what)

    @property
    def pipeline(self) -> SessionPipeline | None:
        """The live connection's pipeline, if any."""
        return self.conn.pipeline if self.conn else None

    async def replace(self, conn: Connection | None) -> None:
        """Make `conn` the live connection; the previous one is closed (its recording kept as a take). On a closed
        tab, `conn` is closed instead."""
        if conn is not None and self.closed:
            await conn.close()
            raise TabClosed(CLOSED)
        old, self.conn = self.conn, conn
        if old is not None:
            self.retiring += 1
            try:
                await self.end_viewers()  # they watched `old`; their pages connect again to the new one
                await self._retire(old)
            finally:
                self.retiring -= 1

    async def end(self, conn: Connection | None = None) -> None:
        """End `conn` (default: the live one); one already replaced is being closed by `replace`: nothing to do."""
        if conn is None or conn is self.conn:
            await self.replace(None)

    def watch(self, viewer: Viewer, on_end: Callable[[], None]) -> None:
        """`viewer` watches the live connection from now on, until it ends."""
        self.viewers.add(viewer)
        viewer.start(self.conn.pipeline, on_end)

    async def end_viewer(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        await viewer.close()

    async def end_viewers(self) -> None:
        viewers, self.viewers = self.viewers, set()
        await asyncio.gather(*(v.close() for v in viewers), return_exceptions=True)

    async def _retire(self, conn: Connection) -> None:
        """Close `conn` and keep its take. A close that fails (a recording that cannot be finalised on a full
        disk, say) is logged and told to the page; what called it goes on."""
        try:
            if path := await conn.close():
                self.keep(path)
        except Exception as e:
            log.exception("ending a connection failed")
            self.error = f"the last connection did not end cleanly, its recording is lost: {e}"

    def keep(self, path: Path) -> None:
        """A finished take waits for its page: the work directory's clean-up leaves it until it is handed over
        (Worker._takes)."""
        self.takes.append(path)

    def hand_over(self) -> list[Path]:
        """Every take not yet handed to the page, oldest first; from now on the clean-up may delete them."""
        takes, self.takes = self.takes, []
        return takes

    def last_seen(self) -> float:
        return max(self.seen, self.conn.last_frame() if self.conn else 0.0)


class Worker:
    """One engine and its live sessions (see the module docstring). `max_sessions` live connections at once; more
    get ServerFull. WebRTC sends in `codec` where the browser has it, at most `stream_max` pixels on the longer
    side. Built in any thread; every coroutine then runs on one event loop, the worker's."""

    def __init__(self, config: WorkerConfig):
        use_face_model(config.face_model)  # this process's face tracking (a Ray worker is a process of its own)
        self.engine = Engine(load_networks(config.weights, config.config, download=config.download),
                             device=config.device, compile=config.compile)
        Scheduler.of(self.engine).max_batch = config.max_batch
        self.sample = prepare_source(skimage.data.astronaut())  # NASA, public domain
        self.max_sessions = config.max_sessions or DEFAULT_MAX_SESSIONS.get(self.engine.device.type, 1)
        self.max_viewers, self.codec, self.stream_max = config.max_viewers, config.codec, config.stream_max
        self.device = self.engine.device.type  # what the page says it runs on
        self.ice_servers, self.limits = config.ice_servers, config.limits
        encode.install()  # aiortc's senders and receivers use the tuned encoders and decoders
        self.tabs: dict[str, Tab] = {}
        self.work = WorkDir(Path(config.workdir or default_work_dir()), self.limits, self._takes)
        self.views: dict[str, Tab] = {}  # view token -> the tab that shared its output
        self.draining: float | None = None  # being drained: how long its live sessions may go on (see drain)
        step = None
        if config.warmup:  # batch 1 and the largest now, not in a user's first frame (minutes cold on CUDA) ...
            if self.engine.compile_mode != "off":
                log.info("torch.compile %s mode; the compile cache holds %s", self.engine.compile_mode,
                         recorded_compile_mode() or "nothing yet (a cold start: minutes)")
            step = self.engine.warmup().get(1)
            self.engine.warm_rest()  # ... the other batch sizes on a background thread; batches pad up meanwhile
        self.step_s = config.step_s or (step if self.device == "cpu" and step else self._measure_step())
        self._watch: asyncio.Task | None = None

    def _measure_step(self) -> float:
        """Seconds per frame for one session: one engine call at batch 1, on the engine thread."""
        crop = self.sample.crop.image_256

        def step() -> float:
            self.engine.set_source(crop, "measure")
            try:
                start = time.perf_counter()
                self.engine.animate(crop[None], ["measure"])
                return time.perf_counter() - start
            finally:
                self.engine.close("measure")
        return Scheduler.of(self.engine).call(step)

    async def about(self) -> dict:
        """What the page shows before anyone goes live: the device, the engine, the codec, the time per frame and
        the sample portrait."""
        return dict(device=self.device, about=f"{self.engine.device}, {self.engine.precision}. "
                                              f"{' · '.join(self.engine.notes)}",
                    codec=self.codec, step_s=self.step_s, sample=self.sample.image)

    # ---- tabs ----

    def _spawn(self, coro) -> None:
        """Fire and forget on the loop (errors are logged)."""
        task = asyncio.ensure_future(coro)
        task.add_done_callback(lambda t: t.cancelled() or t.exception() is None or
                               log.error("worker task failed", exc_info=t.exception()))

    def tab(self, tab: str) -> Tab:
        """On the loop: the tab's state (UnknownTab if this worker does not hold it); its idle clock restarts."""
        if (t := self.tabs.get(tab)) is None:
            raise UnknownTab(tab)
        t.seen = time.monotonic()
        return t

    async def restore(self, tab: str, portrait: bytes | None, controls: dict[str, Any], editing: bool,
                      token: str | None = None) -> None:
        """Hold `tab` from now on, with what the front kept of it: its portrait (None: the sample), its controls,
        whether its Portrait editing tab is shown and its view token (a link shared on the worker that held it
        before). A tab this worker holds already keeps its state. The front never restores a tab its page closed
        (it keeps those markers), and closes one whose close raced this restore."""
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_http())
        if tab in self.tabs:
            return
        source = self.sample if portrait is None else await self._prepare(portrait)
        t = self.tabs.setdefault(tab, Tab(source))
        await self.set_controls(tab, controls)
        t.editing = editing
        if token:
            t.token = token
            self.views[token] = t

    def _takes(self) -> set[Path]:
        """Every open tab's finished recordings (and their motion templates) that its page has not been given yet
        (the clean-up keeps them)."""
        return {f for t in list(self.tabs.values()) for p in list(t.takes) for f in (p, p.with_suffix(".pkl"))}

    def live(self) -> int:
        """Live connections, counting the ones being made and the replaced ones still closing."""
        return sum(bool(t.conn or t.admitting) + t.retiring for t in list(self.tabs.values()))

    def _admit(self, t: Tab) -> None:
        """On the loop: room for `t`'s new connection (its own current one counts as its slot), or ServerFull
        (TabClosed for a closed tab)."""
        if t.closed:
            raise TabClosed(CLOSED)
        if not (t.conn or t.admitting) and self.draining is not None:
            raise ServerFull("this server is being drained for a restart; try again shortly")
        if not (t.conn or t.admitting) and self.live() >= self.max_sessions:
            full = ServerFull.of(self.live())
            t.refused = str(full)
            raise full
        t.refused = None

    def _pipeline(self, t: Tab, transport: str) -> SessionPipeline:
        return SessionPipeline(self.engine, t.source, t.settings, transport, self.stream_max,
                               images=transport == HTTP)  # HTTP streaming answers with the image

    # ---- live connections ----

    async def offer(self, tab: str, offer: dict) -> dict:
        """Answer a WebRTC offer: ServerFull when full, ValueError (or aiortc's error) when aiortc refuses the
        offer. The tab's connection is replaced only once the new one is complete."""
        t = self.tab(tab)
        self._admit(t)
        t.admitting += 1
        try:
            peer = await Peer.accept(offer, mint(self.ice_servers), self.codec)
            try:
                pipeline = await asyncio.to_thread(self._pipeline, t, WEBRTC)
            except BaseException:
                await peer.close()
                raise
            conn = Connection(pipeline, peer)
            peer.start(pipeline, lambda: self._spawn(t.end(conn)))
            await t.replace(conn)
        finally:
            t.admitting -= 1
        return peer.answer

    async def http_frame(self, tab: str, frame: np.ndarray) -> np.ndarray | None:
        """One webcam frame over HTTP streaming: connect if needed, hand it over, answer with the newest output
        (within 2 s). ServerFull while the worker is full; the next frame tries again."""
        async def make(t: Tab) -> Connection:
            self._admit(t)
            t.admitting += 1
            try:
                conn = Connection(await asyncio.to_thread(self._pipeline, t, HTTP))
                await t.replace(conn)
                return conn
            finally:
                t.admitting -= 1

        t = self.tab(tab)  # frames overlap: the ones that come while connecting share the connection
        if not (t.conn and t.conn.transport == HTTP):
            if t.connecting is None:
                t.connecting = asyncio.ensure_future(make(t))
                t.connecting.add_done_callback(lambda _: setattr(t, "connecting", None))
            await asyncio.shield(t.connecting)
        pipeline = t.conn.pipeline
        seq = pipeline.seq
        pipeline.submit(frame)
        return (await asyncio.to_thread(pipeline.wait, seq, 2.0))[1]

    async def _watch_http(self) -> None:
        """Ends HTTP-streaming connections whose webcam stopped: Gradio tells the server nothing when it does."""
        while True:
            await asyncio.sleep(1.0)
            try:
                now = time.monotonic()
                for t in list(self.tabs.values()):
                    conn = t.conn
                    if conn and conn.transport == HTTP and now - conn.last_frame() > HTTP_QUIET_S:
                        log.info("HTTP streaming: no webcam frame for %g s, connection ended", HTTP_QUIET_S)
                        await t.end(conn)
            except Exception:  # the watch must outlive any one failure
                log.exception("HTTP-streaming watch failed")

    # ---- view-only links ----

    async def share(self, tab: str) -> str:
        """A new view token for the tab's output; the previous one is revoked and its viewers end."""
        t = self.tab(tab)
        if t.closed:
            raise TabClosed(CLOSED)
        await self._revoke(t)
        t.token = secrets.token_urlsafe(24)
        self.views[t.token] = t
        return t.token

    async def _revoke(self, t: Tab) -> None:
        if t.token:
            self.views.pop(t.token, None)
            t.token = None
        await t.end_viewers()

    async def view_offer(self, token: str, offer: dict) -> dict:
        """Answer a viewer's receive-only offer: UnknownView, NotLive, ViewersFull, or ValueError (or aiortc's
        error) when aiortc refuses the offer. Nothing else of the tab is touched."""
        t = self.views.get(token)
        if t is None:
            raise UnknownView(token)
        if t.conn is None:
            raise NotLive("the performer is not live")
        if len(t.viewers) + t.joining >= self.max_viewers:
            raise ViewersFull.of(len(t.viewers) + t.joining)
        conn = t.conn
        t.joining += 1
        try:
            viewer = await Viewer.accept(offer, mint(self.ice_servers), self.codec)
        finally:
            t.joining -= 1
        if t.conn is not conn or self.views.get(token) is not t:  # it ended, or the link was revoked, meanwhile
            await viewer.close()
            raise NotLive("the performer is not live") if self.views.get(token) is t else UnknownView(token)
        t.watch(viewer, lambda: self._spawn(t.end_viewer(viewer)))
        return viewer.answer

    async def close_tab(self, tab: str) -> None:
        """The tab is gone (closed by its page, idle, or moved to another worker): end its connection, free its
        editor and forget it. A later call raises UnknownTab; whether the tab comes back is the front's to decide."""
        t = self.tabs.get(tab)
        if t is None or t.closed:
            return
        t.closed = True
        steps = [lambda: self._revoke(t), t.end]
        if t.editor:
            steps.append(lambda: asyncio.to_thread(t.editor.close))
        for step in steps:  # each runs whatever an earlier one raised
            try:
                await step()
            except Exception:
                log.exception("closing tab %s: a step failed", tab)
        self.tabs.pop(tab, None)  # only now: its connection held its slot while it closed; its takes, never
        # handed over, are the clean-up's from now on (by age and quota)

    async def reap(self) -> list[str]:
        """Free the tabs idle for longer than the idle timeout (closed without an unload event: a crashed
        browser, a laptop lid, a lost network) and clean the work directory. Returns the tabs freed. A step that
        fails is logged and the rest still runs."""
        now, timeout = time.monotonic(), self.limits.idle_timeout
        idle = [k for k, t in list(self.tabs.items()) if now - t.last_seen() > timeout]
        freed = []
        for tab in idle:
            try:
                log.info("tab %s idle for over %g s: freed", tab, timeout)
                await self.close_tab(tab)
                freed.append(tab)
            except Exception:
                log.exception("freeing tab %s failed", tab)
        for step in (self.work.clean, release_memory):
            try:
                await asyncio.to_thread(step)
            except Exception:
                log.exception("%s failed", step.__name__)
        return freed

    async def drain(self, timeout: float) -> list[str]:
        """Admit no new live session from now on: a front closes this worker once its live sessions have ended, or
        after `timeout` s (the front that asked, or the one whose watch sees it in `health`: `launch.py --drain`).
        Their tabs stay; the tabs without one are let go (as if moved: the front places them on another worker at
        their next call) and returned."""
        self.draining = timeout
        idle = [k for k, t in list(self.tabs.items()) if not (t.conn or t.admitting or t.retiring)]
        for tab in idle:
            await self.close_tab(tab)
        return idle

    async def close(self) -> None:
        """Server shutdown: end every live connection (recordings are finalised)."""
        if self._watch:
            self._watch.cancel()
        await asyncio.gather(*(t.end() for t in list(self.tabs.values())), return_exceptions=True)

    # ---- portrait and controls ----

    async def set_portrait(self, tab: str, data: bytes) -> np.ndarray:
        """A portrait upload (the file's bytes): decoded, its face detected (InputError / NoFaceError: the old
        portrait stays)."""
        source = await self._prepare(data)
        self._use(tab, source)
        return source.image

    async def check_portrait(self, data: bytes) -> np.ndarray:
        """A portrait upload for a tab no worker holds yet, checked as `set_portrait` does (InputError /
        NoFaceError) without holding the tab: the image the page shows. The front keeps the bytes."""
        return (await self._prepare(data)).image

    async def _prepare(self, data: bytes) -> SourceFace:
        return await asyncio.to_thread(lambda: prepare_source(read_image(data)))

    async def use_sample(self, tab: str) -> np.ndarray:
        self._use(tab, self.sample)
        return self.sample.image

    def _use(self, tab: str, source: SourceFace) -> None:
        t = self.tab(tab)
        t.source = source
        if t.pipeline:
            t.pipeline.set_source(source)

    async def set_controls(self, tab: str, values: dict[str, Any]) -> None:
        """Live controls (stream.pipeline.Settings fields): the connection picks them up at its next frame."""
        s = self.tab(tab).settings
        for k, v in values.items():
            if not hasattr(s, k):
                raise AttributeError(f"no control {k!r}")
            setattr(s, k, v)

    async def reset_reference(self, tab: str) -> bool:
        """The next frame becomes the neutral pose; False without a live connection."""
        if pipeline := self.tab(tab).pipeline:
            pipeline.reset_reference()
        return pipeline is not None

    async def set_editing(self, tab: str, shown: bool) -> None:
        self.tab(tab).editing = shown

    async def edited(self, tab: str) -> np.ndarray | None:
        """The Portrait editing tab's image with the current controls; None while that tab is not shown.
        EditorsFull when --max-sessions tabs have an editor open already."""
        t = self.tab(tab)
        if not t.editing or t.closed:
            return None
        if t.editor is None:  # as many editors as live sessions: each holds an engine session
            if (n := sum(1 for x in list(self.tabs.values()) if x.editor)) >= self.max_sessions:
                raise EditorsFull.of(n)
            t.editor = PortraitEditor(self.engine)
        return await asyncio.to_thread(t.editor, t.source, t.settings)

    # ---- recording, rendering, stats ----

    async def start_recording(self, tab: str) -> str:
        """The page's message: recording, or why not."""
        t = self.tab(tab)
        if t.conn is None:
            return RECORD_LIVE
        if (path := self.work.reserve("recording")) is None:
            return "⚠️ The server's storage for recordings is full; try again later."
        try:
            if done := t.conn.pipeline.start_recording(path, self.limits.record_max_s):
                t.keep(done)  # the take that stopped at its limit is kept
        except RecordingRunning as e:
            return f"● {str(e)[0].upper()}{str(e)[1:]}."
        return f"● Recording… (at most {self.limits.record_max_s:g} s)"

    async def stop_recording(self, tab: str) -> list[tuple[str, bytes]]:
        """Finalise the running recording; every take not yet handed to the page, oldest first, each MP4 followed
        by its motion template, as (file name, bytes). Handed over once: the worker's copies are deleted."""
        t = self.tab(tab)
        if t.conn and (path := await asyncio.to_thread(t.conn.pipeline.stop_recording)):
            t.keep(path)
        files = [f for p in t.hand_over() for f in (p, p.with_suffix(".pkl"))]
        return [(f.name, data) for f in files if (data := await asyncio.to_thread(_take, f)) is not None]

    async def render(self, tab: str, driving: tuple[str, bytes], source_video: tuple[str, bytes] | None = None,
                     save_template: bool = False, source_eye_retargeting: bool = False
                     ) -> tuple[tuple[str, bytes] | None, dict | str]:
        """The tab's portrait (or a source video) driven by a video, an image or a motion template, each given as
        (file name, bytes): ((file name, bytes), info; info["template"]: the driving video's motion as (name, bytes)
        when asked), or (None, why) when the disk quota is full. Raises InputError for a file that cannot be used,
        NoFaceError for a face not found. Its progress meanwhile: `render_progress`."""
        t = self.tab(tab)
        if (out := self.work.reserve("render")) is None:
            return None, "⚠️ The server's storage for renders is full; try again later."
        source, settings = t.source, t.settings
        t.rendering = None

        def progress(fraction: float, what: str) -> None:
            t.rendering = (fraction, what)

        def run() -> tuple[tuple[str, bytes], dict]:
            upload = Path(tempfile.mkdtemp(prefix="upload-", dir=self.work.path))
            try:
                def put(role: str, file: tuple[str, bytes]) -> Path:  # its own name: the messages name it
                    (upload / role).mkdir()
                    path = upload / role / (Path(file[0]).name or role)
                    path.write_bytes(file[1])
                    return path
                drv, src = put("driving", driving), source_video and put("source", source_video)
                kind = offline.kind(drv)
                result = out.with_suffix(".png") if src is None and kind == "image" else out  # one image
                template = result.with_suffix(".pkl") if save_template and kind == "video" else None
                with self.work.writing(result):
                    info = render(self.engine, src or source, drv, result, settings, self.limits.render_max_s,
                                  save_template=template, progress=progress,
                                  source_eye_retargeting=source_eye_retargeting)
                info.pop("output")  # a path on this worker: the front gets the bytes
                info["template"] = (template.name, _take(template)) if template else None
                return (result.name, _take(result)), info
            finally:
                shutil.rmtree(upload, ignore_errors=True)
        return await asyncio.to_thread(run)

    async def render_progress(self, tab: str) -> tuple[float, str] | None:
        """The tab's running (or last) render's progress, (fraction done, what), for the page's progress bar; None
        before its first step."""
        return self.tab(tab).rendering

    async def stats(self, tab: str) -> dict:
        """The tab's live state for the page's metrics line (it is polled every second: the tab is open)."""
        t = self.tab(tab)
        conn = t.conn
        if conn is None:
            return dict(live=False, refused=t.refused, error=t.error)
        return dict(conn.pipeline.stats(), live=True, codec=conn.peer.codec if conn.peer else None,
                    viewers=len(t.viewers), error=t.error)

    def counts(self) -> dict:
        """What is allocated now: tabs, live connections, WebRTC peers, viewers' peers, view tokens, engine
        sessions, scheduler lanes (all back to 0 when every tab has gone)."""
        conns = [t.conn for t in list(self.tabs.values()) if t.conn]
        return dict(tabs=len(self.tabs), live=self.live(), peers=sum(1 for c in conns if c.peer),
                    viewers=self.viewers(), views=len(self.views),
                    engine_sessions=len(self.engine.sessions), lanes=len(Scheduler.of(self.engine).lanes))

    def load(self) -> tuple[int, int]:
        """How much room is left, for placement: (free live slots, minus the tabs held); more is freer."""
        return self.max_sessions - self.live(), -len(self.tabs)

    def viewers(self) -> int:
        return sum(len(t.viewers) for t in list(self.tabs.values()))

    def health(self) -> dict:
        sched = Scheduler.of(self.engine).stats()
        conns = [c for t in list(self.tabs.values()) if (c := t.conn)]
        return dict(live_sessions=self.live(), capacity=self.max_sessions, draining=self.draining is not None,
                    drain_timeout_s=self.draining, device=str(self.engine.device),
                    devices=os.environ.get("CUDA_VISIBLE_DEVICES"), pid=os.getpid(),
                    viewers=self.viewers(), max_viewers_per_session=self.max_viewers,
                    engine_step_p50_ms=sched["engine_step_p50_ms"], batch_sizes=sched["batch_sizes"],
                    session_fps=[c.pipeline.stats()["fps_out"] for c in conns])


def _take(path: Path) -> bytes | None:
    """A finished file's bytes, None if the work directory's limits deleted it; the worker's copy is deleted (the
    front now has it)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return data


class Local:
    """A worker in this process: built here, its coroutines run on a loop thread of its own (where aiortc's peers
    live). The front calls it the way it calls a Ray actor (web/cluster.py): `await call(method, *args)`."""

    name = "local"

    def __init__(self, config: WorkerConfig):
        self.worker = Worker(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="worker-loop", daemon=True)
        self._thread.start()

    async def call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT_S) -> Any:
        """`worker.method(*args)` on the worker's loop, awaited from another loop."""
        async def run() -> Any:
            result = getattr(self.worker, method)(*args)
            return await result if inspect.isawaitable(result) else result
        return await asyncio.wait_for(asyncio.wrap_future(asyncio.run_coroutine_threadsafe(run(), self.loop)),
                                      timeout)

    def close(self) -> None:
        """Server shutdown: end every live connection (recordings are finalised), then stop the loop."""
        if not self._thread.is_alive():
            return
        try:
            asyncio.run_coroutine_threadsafe(self.worker.close(), self.loop).result(CALL_TIMEOUT_S)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
