"""The web app: one Gradio page with the live view, its controls, recording and video-file rendering.

Two live transports: WebRTC (our POST /offer on the same server, aiortc on this side, a small JS client in the
page) for the lowest latency, and Gradio's own webcam streaming over HTTP as the fallback that works through share
links without a TURN server. One engine serves every browser tab; a tab is a `Page`, keyed by Gradio's session
hash, which the page also hands to its WebRTC client so the signalling route finds the same tab.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import fastapi
import gradio as gr
import numpy as np
import skimage.data
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from model.editing import SLIDERS, Edits
from model.engine import Engine, load_networks
from stream.editor import PortraitEditor
from stream.face import NoFaceError, SourceFace, prepare_source
from stream.pipeline import SessionPipeline, Settings, draw_text
from stream.scheduler import Scheduler, ServerFull
from stream.render import MAX_BYTES, MAX_SIDE, InputError, read_image, render
from web import controls as panel
from web import tls
from web.guard import Refused, check_offer
from web.limits import Limits, WorkDir, idle_since, release_memory
from web.limits import add_arguments as add_limit_arguments
from web.webrtc import WebRTC, parse_ice_servers, turn_server

log = logging.getLogger("liveportrait.app")
STATIC = Path(__file__).parent / "static"
LIVE_HTML = """<div class="lp-live"><div class="lp-notice" hidden></div><video autoplay playsinline muted></video>
<div class="lp-bar"><button class="lp-start">▶ Start camera</button><button class="lp-stop">■ Stop</button>
<span class="lp-state">Transport: WebRTC (idle)</span><span class="lp-frames"></span></div></div>"""
LIVE_CSS = """video { width: 100%; height: min(62vh, 560px); object-fit: contain; background: #111; border-radius: 8px; }
.lp-bar { display: flex; gap: .6em; align-items: center; margin-top: .4em; flex-wrap: wrap; }
button { padding: .35em 1em; border-radius: 6px; border: 1px solid #888; cursor: pointer; }
.lp-frames { opacity: .7; font-size: .9em; }"""
# Live sessions admitted per device unless --max-sessions says otherwise (docs/benchmarks.md, "Serving"). CPU:
# measured with `launch.py bench serve`; CUDA: not measured yet, one full batch of the scheduler (--max-batch 8).
DEFAULT_MAX_SESSIONS = {"cpu": 4, "cuda": 8}
PAGE_CSS = """.lp-banner { background: #b71c1c; color: #fff; padding: .6em 1em; border-radius: 8px; font-weight: 600; }
.lp-notice { background: #fff3cd; color: #3b2f00; border: 1px solid #e0b400; padding: .6em 1em; border-radius: 8px;
             margin-bottom: .5em; }
.lp-notice code { background: #fff; color: #000; padding: 0 .25em; border-radius: 3px; user-select: all; }
.lp-notice button { font-size: .9em; padding: .2em .9em; margin-top: .3em; }
#lp-http-cam button:disabled { opacity: .35; cursor: not-allowed; }"""
MAX_GONE = 10_000  # closed-tab markers kept at most (each also expires after the idle timeout)


class Page:
    """What one browser tab owns: its portrait, its live controls, its live connection and its last recording."""

    def __init__(self, source: SourceFace):
        self.source, self.settings = source, Settings()
        self.pipeline: SessionPipeline | None = None
        self.refused: str | None = None  # why the last connection was not admitted (the server was full)
        self.recording: Path | None = None
        self.editor: PortraitEditor | None = None  # the Portrait editing tab's engine session, once opened
        self.editing = False  # that tab is the one shown: control changes re-render the edited portrait
        self.closed = False  # the tab is gone: a late request must not open a new connection
        self.seen = time.monotonic()  # the tab's last request (its idle time decides when it is reaped)
        self._lock = threading.Lock()

    def connect(self, engine: Engine, transport: str, max_sessions: int | None = None) -> SessionPipeline | None:
        """A new live connection (replacing the previous one, whatever its transport, whose slot it reuses); None
        once closed; ServerFull when `max_sessions` other connections are live."""
        if self.pipeline:
            self.disconnect(self.pipeline)
        try:
            pipeline = SessionPipeline(engine, self.source, self.settings, transport, max_sessions)
        except ServerFull as e:
            self.refused = str(e)
            raise
        self.refused = None
        with self._lock:
            if self.closed:
                pipeline.close()
                return None
            old, self.pipeline = self.pipeline, pipeline
        if old:
            self.disconnect(old)
        return pipeline

    def disconnect(self, pipeline: SessionPipeline | None = None) -> None:
        """End a live connection (default: the current one); a recording it had running is kept for download."""
        with self._lock:
            pipeline = pipeline or self.pipeline
            if self.pipeline is pipeline:
                self.pipeline = None
        if pipeline and (path := pipeline.close()):
            self.recording = path


class LiveApp:
    """The server side of the page: the shared engine, the pages, WebRTC, and every event handler."""

    def __init__(self, engine: Engine, ice_servers: list[dict] | None = None, untrained: bool = False,
                 workdir: str | Path | None = None, max_sessions: int | None = None, limits: Limits | None = None):
        self.engine, self.untrained = engine, untrained
        self.max_sessions = max_sessions or DEFAULT_MAX_SESSIONS.get(engine.device.type, 1)
        self.rtc = WebRTC(ice_servers or [])
        self.sample = prepare_source(skimage.data.astronaut())  # NASA, public domain
        self.pages: dict[str, Page] = {}
        self.gone: dict[str, float] = {}  # session hashes of closed tabs -> when (they expire: see reap)
        self.limits = limits or Limits()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="liveportrait-"))
        self.work = WorkDir(self.dir, self.limits)

    def page(self, request: gr.Request) -> Page:
        if request.session_hash in self.gone:  # a request that raced the tab's unload: a detached, closed page
            page = Page(self.sample)
            page.closed = True
            return page
        page = self.pages.setdefault(request.session_hash, Page(self.sample))
        page.seen = time.monotonic()
        return page

    # ---- page lifecycle ----

    def open_page(self, request: gr.Request) -> str:
        """Page load: register the tab; its id goes to the WebRTC client."""
        self.page(request)
        return request.session_hash

    def close_page(self, request: gr.Request) -> None:
        """Tab closed: end its live connection and forget it."""
        self.gone[request.session_hash] = time.monotonic()
        while len(self.gone) > MAX_GONE:
            del self.gone[next(iter(self.gone))]
        self._free(request.session_hash)

    def _free(self, session: str) -> None:
        if page := self.pages.pop(session, None):
            with page._lock:
                page.closed = True
            page.disconnect()
            if page.editor:  # none is created once the page is closed
                page.editor.close()

    def reap(self) -> list[str]:
        """Free the tabs idle for longer than the idle timeout (closed without an unload event: a crashed
        browser, a laptop lid, a lost network), expire old closed-tab markers, clean the work directory.
        Returns the sessions freed. A reaped tab that comes back later starts afresh."""
        now, timeout = time.monotonic(), self.limits.idle_timeout
        idle = [s for s, p in list(self.pages.items()) if now - idle_since(p.seen, p.pipeline) > timeout]
        for session in idle:
            log.info("tab %s idle for over %g s: freed", session, timeout)
            self._free(session)
        for session, when in list(self.gone.items()):
            if now - when > timeout:
                self.gone.pop(session, None)
        self.work.clean()
        release_memory()
        return idle

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.limits.idle_timeout / 4))
            await asyncio.to_thread(self.reap)

    def close(self) -> None:
        """Server shutdown: end every live connection (recordings are finalised)."""
        for page in list(self.pages.values()):
            page.disconnect()

    # ---- portrait and controls ----

    def set_portrait(self, path: str | None, request: gr.Request) -> tuple:
        """Upload handler: validate and detect the face; the error is shown in the page, the old portrait stays."""
        if not path:
            return gr.skip(), ""
        try:
            source = prepare_source(read_image(path))
        except (InputError, NoFaceError) as e:
            return gr.skip(), f"⚠️ **Portrait not used.** {e}"
        self._use(self.page(request), source)
        return source.image, f"✓ Portrait ready ({source.image.shape[1]}×{source.image.shape[0]})."

    def use_sample(self, request: gr.Request) -> tuple:
        self._use(self.page(request), self.sample)
        return self.sample.image, "✓ Sample portrait (astronaut Eileen Collins, NASA, public domain)."

    @staticmethod
    def _use(page: Page, source: SourceFace) -> None:
        page.source = source
        if pipeline := page.pipeline:
            pipeline.set_source(source)

    def set_controls(self, relative: bool, stitching: bool, paste: bool, multiplier: float, eye_on: bool,
                     eye: float, lip_on: bool, lip: float, smoothing: float, overlay: bool,
                     request: gr.Request) -> np.ndarray | None:
        """Any control changed: the live connection picks the new values up at its next frame."""
        s = self.page(request).settings
        s.relative, s.stitching, s.paste, s.multiplier = relative, stitching, paste, float(multiplier)
        s.eye_target = float(eye) if eye_on else None
        s.lip_target = float(lip) if lip_on else None
        s.smoothing, s.overlay = float(smoothing), overlay
        return self.edited(request)

    def set_edits(self, request: gr.Request, region: str, *sliders: float) -> np.ndarray | None:
        """Animation region or an expression/pose slider changed (values in model.editing.SLIDERS order)."""
        s = self.page(request).settings
        s.region, s.edits = region, Edits(**{k: float(v) for k, v in zip(SLIDERS, sliders, strict=True)})
        return self.edited(request)

    def reset_edits(self, request: gr.Request) -> list:
        """Every expression/pose slider back to its default: the sliders' values, then the edited portrait."""
        self.page(request).settings.edits = Edits()
        return [*Edits().values().values(), self.edited(request)]

    def select_tab(self, event: gr.SelectData, request: gr.Request) -> np.ndarray | None:
        """The Portrait editing tab renders while it is the one shown."""
        self.page(request).editing = event.value == "Portrait editing"
        return self.edited(request)

    def edited(self, request: gr.Request) -> np.ndarray | None:
        """The page's portrait with its sliders applied, pasted back (one engine call); skipped while the
        Portrait editing tab is not shown."""
        page = self.page(request)
        with page._lock:
            if not page.editing or page.closed:
                return gr.skip()
            editor = page.editor = page.editor or PortraitEditor(self.engine)
        return editor(page.source, page.settings)

    def reset_reference(self, request: gr.Request) -> str:
        if pipeline := self.page(request).pipeline:
            pipeline.reset_reference()
            return "Reference reset: the next frame is the neutral pose."
        return "Start the camera first."

    # ---- live: HTTP streaming fallback, WebRTC signalling, metrics ----

    def http_frame(self, frame: np.ndarray | None, request: gr.Request) -> np.ndarray | None:
        """One webcam frame from Gradio's streaming: hand it over, answer with the newest output."""
        if frame is None:
            return None
        page = self.page(request)
        pipeline = page.pipeline
        if pipeline is None or pipeline.transport != "HTTP streaming":
            try:
                pipeline = page.connect(self.engine, "HTTP streaming", self.max_sessions)
            except ServerFull as e:  # each next frame tries again: admitted once a slot frees up
                return draw_text(frame // 3, str(e))
            if pipeline is None:
                return None
        seq = pipeline.seq
        pipeline.submit(frame)
        return pipeline.wait(seq, timeout=2.0)[1]

    async def offer(self, request: fastapi.Request) -> JSONResponse:
        """POST /offer {sdp, type, session}: answer a page's WebRTC offer. The login, the origin, the content type,
        the size and the offer itself are checked first; the tab's live connection is replaced only once aiortc
        has accepted the offer, so a bad one (even carrying the tab's id) leaves the tab streaming."""
        try:
            body = await check_offer(request)
        except Refused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        page = self.pages.get(body["session"])
        if page is None:
            return JSONResponse({"error": "unknown session; reload the page"}, status_code=403)
        page.seen = time.monotonic()
        try:
            answer = await self.rtc.answer(
                body, lambda: asyncio.to_thread(page.connect, self.engine, "WebRTC", self.max_sessions),
                page.disconnect)
        except ServerFull as e:  # the offer was fine, the server is not: nothing was created
            return JSONResponse({"error": str(e)}, status_code=503)
        try:
            answer = await self.rtc.answer(body, lambda: asyncio.to_thread(page.connect, self.engine, "WebRTC"),
                                           page.disconnect)
        except Exception as e:  # aiortc refused the offer: nothing was created, the tab's connection is untouched
            return JSONResponse({"error": f"bad offer: {e}"}, status_code=400)
        if answer is None:
            return JSONResponse({"error": "this tab was closed; reload the page"}, status_code=403)
        return JSONResponse(answer)

    def stats(self, request: gr.Request) -> str:
        """The metrics line the page polls (a tick after the tab closed must not bring the page back)."""
        page = self.pages.get(request.session_hash)
        if page:
            page.seen = time.monotonic()
        if not (pipeline := page and page.pipeline):
            if page and page.refused:
                return f"**Live:** {page.refused}."
            return "**Live:** not connected — start the camera (WebRTC) or the HTTP streaming webcam."
        m = pipeline.stats()
        size = "×".join(map(str, m["size"])) if m["size"] else "–"
        recording = (" · ● recording" if m["recording"] else
                     f" · ■ recording stopped at the {self.limits.record_max_s:g} s limit: press Stop recording to "
                     "get it" if m["recording_full"] else "")
        return (f"**Live via {m['transport']}** · in {m['fps_in']} fps · out {m['fps_out']} fps · "
                f"dropped {m['dropped']} · latency p50 {m['latency_p50_ms']:.0f} ms / p95 {m['latency_p95_ms']:.0f} ms"
                f" · {size}{recording}")

    def healthz(self) -> JSONResponse:
        """GET /healthz: load and capacity for a load balancer or readiness probe; 503 while full."""
        sched = Scheduler.of(self.engine).stats()
        pipes = [p for page in list(self.pages.values()) if (p := page.pipeline)]
        body = dict(live_sessions=sched["sessions"], capacity=self.max_sessions,
                    engine_step_p50_ms=sched["engine_step_p50_ms"], batch_sizes=sched["batch_sizes"],
                    session_fps=[p.stats()["fps_out"] for p in pipes], device=str(self.engine.device))
        return JSONResponse(body, status_code=503 if sched["sessions"] >= self.max_sessions else 200)

    # ---- recording and rendering ----

    def start_recording(self, request: gr.Request) -> str:
        page = self.page(request)
        if page.pipeline is None:
            return "Start the camera first, then record."
        if (path := self.work.reserve("recording")) is None:
            return "⚠️ The server's storage for recordings is full; try again later."
        page.pipeline.start_recording(path, self.limits.record_max_s)
        return f"● Recording… (at most {self.limits.record_max_s:g} s)"

    def stop_recording(self, request: gr.Request) -> tuple:
        page = self.page(request)
        if page.pipeline and (path := page.pipeline.stop_recording()):
            page.recording = path
        if page.recording is None:
            return None, "Nothing recorded yet."
        path, page.recording = page.recording, None
        return str(path), f"Saved {path.name}."

    def render_video(self, driving: str | None, request: gr.Request,
                     progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
        """Video-file tab: the page's portrait driven by an uploaded video, at its frame rate, with its audio."""
        if not driving:
            return None, "Upload a driving video first."
        page = self.page(request)
        if (size := Path(driving).stat().st_size) > self.limits.render_max_mb * 2**20:
            return None, (f"⚠️ The video is {size / 2**20:.1f} MB; this server renders at most "
                          f"{self.limits.render_max_mb:g} MB.")
        if (out := self.work.reserve("render")) is None:
            return None, "⚠️ The server's storage for renders is full; try again later."
        try:
            with self.work.writing(out):
                info = render(self.engine, page.source, driving, out, page.settings, self.limits.render_max_s)
        except InputError as e:
            return None, f"⚠️ {e}"
        return str(out), f"{info['frames']} frames at {info['fps']:g} fps{', with audio' if info['audio'] else ''}."

    # ---- the page and the server ----

    def blocks(self) -> gr.Blocks:
        age = self.limits.work_max_age_h * 3600  # Gradio's copies of the files it serves expire like ours
        with gr.Blocks(title="LivePortrait Live", delete_cache=(min(3600, age), age)) as demo:
            gr.Markdown("# LivePortrait Live\nYour webcam drives the portrait: head pose and expressions, live.")
            if self.untrained:
                gr.HTML('<div class="lp-banner">⚠️ Untrained weights (<code>--weights recipe</code>): the networks '
                        'are deterministic random numbers, so the output is not a real animation.</div>')
            gr.Markdown(f"<small>Engine: {self.engine.device}, {self.engine.precision}. "
                        f"{' · '.join(self.engine.notes)}</small>")
            with gr.Row():
                with gr.Column(scale=2):
                    portrait = gr.Image(self.sample.image, label="Portrait", interactive=False, height=280)
                    upload = gr.File(label=f"Upload a portrait (PNG/JPEG/WebP, ≤ {MAX_BYTES // 2**20} MB, "
                                           f"≤ {MAX_SIDE} px)", file_types=["image"], height=110)
                    sample = gr.Button("Use the sample portrait", size="sm")
                    status = gr.Markdown()
                    gr.Markdown("**Controls** apply live, from the next frame, and to the Portrait editing tab.")
                    c = panel.panel()
                with gr.Column(scale=3):
                    with gr.Tabs() as tabs:
                        with gr.Tab("Live (WebRTC)"):
                            live = gr.HTML("", html_template=LIVE_HTML, css_template=LIVE_CSS, elem_id="lp-live",
                                           js_on_load=(STATIC / "live.js").read_text(),
                                           ice_servers=self.rtc.ice_servers)
                        with gr.Tab("Live (HTTP streaming)"):
                            gr.Markdown("Fallback transport: frames go through Gradio's HTTP streaming, so it works "
                                        "through share links without a TURN server (higher latency).")
                            gr.HTML('<div class="lp-note"></div>', elem_id="lp-http-note")  # live.js: fell back, or no camera
                            with gr.Row():
                                cam = gr.Image(sources=["webcam"], streaming=True, label="Webcam", elem_id="lp-http-cam")
                                view = gr.Image(label="Animated", format="jpeg", interactive=False, elem_id="lp-http-view")
                        with gr.Tab("Video file"):
                            driving = gr.Video(label="Driving video (its frame rate and audio are kept)",
                                               sources=["upload"])
                            go = gr.Button("Render", variant="primary")
                            rendered = gr.Video(label="Result", interactive=False)
                            render_status = gr.Markdown()
                        with gr.Tab("Portrait editing"):
                            gr.Markdown("No webcam needed: the expression, pose and retargeting controls applied to "
                                        "the portrait itself (the official app's retargeting image).")
                            edited = gr.Image(label="Edited portrait (PNG)", format="png", interactive=False,
                                              buttons=["download", "fullscreen"], elem_id="lp-edited")
                    metrics = gr.Markdown(elem_id="lp-metrics")
                    with gr.Row():
                        record = gr.Button("● Record", size="sm")
                        stop = gr.Button("■ Stop recording", size="sm")
                    record_status = gr.Markdown()
                    recording = gr.File(label="Recording (MP4)", interactive=False)

            demo.load(self.open_page, None, live)
            demo.unload(self.close_page)
            upload.upload(self.set_portrait, upload, [portrait, status]).then(self.edited, None, edited)
            sample.click(self.use_sample, None, [portrait, status]).then(self.edited, None, edited)
            gr.on([x.change for x in c.controls], self.set_controls, c.controls, edited, show_progress="hidden")
            edits = [c.region, *c.sliders]  # .input: a reset (which sets their values) is not an edit of each
            gr.on([x.input for x in edits], self.set_edits, edits, edited, trigger_mode="always_last",
                  show_progress="hidden")
            c.reset_edits.click(self.reset_edits, None, [*c.sliders, edited], show_progress="hidden")
            tabs.select(self.select_tab, None, edited, show_progress="hidden")
            c.reset_reference.click(self.reset_reference, None, status)
            cam.stream(self.http_frame, cam, view, stream_every=0.1, concurrency_limit=None,
                       show_progress="hidden")
            go.click(self.render_video, driving, [rendered, render_status])
            record.click(self.start_recording, None, record_status)
            stop.click(self.stop_recording, None, [recording, record_status])
            gr.Timer(1.0).tick(self.stats, None, metrics, show_progress="hidden")
        return demo

    def launch(self, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
               auth: tuple[str, str] | None = None, block: bool = True,
               ssl: tuple[str | Path, str | Path] | None = None) -> gr.Blocks:
        """Serve the page plus POST /offer on one server (a share link tunnels both); HTTPS with `ssl` =
        (certfile, keyfile)."""
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            reaper = asyncio.create_task(self._reap_forever())
            yield
            reaper.cancel()
            await self.rtc.close_all()
            await asyncio.to_thread(self.close)

        demo = self.blocks()
        demo.queue(default_concurrency_limit=None)
        certfile, keyfile = map(str, ssl) if ssl else (None, None)
        max_upload = max(MAX_BYTES, int(self.limits.render_max_mb * 2**20))  # portraits: read_image says 20 MB
        demo.launch(server_name=host, server_port=port, share=share, auth=auth, max_file_size=max_upload,
                    prevent_thread_lock=not block, css=PAGE_CSS, footer_links=[],
                    ssl_certfile=certfile, ssl_keyfile=keyfile, ssl_verify=False,  # Gradio's check of its own URL
                    app_kwargs={"routes": [APIRoute("/offer", self.offer, methods=["POST"]),
                                           APIRoute("/healthz", self.healthz, methods=["GET"])],
                                "lifespan": lifespan})
        return demo


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not (user and sep and password):
        raise argparse.ArgumentTypeError("expected user:pass")
    return user, password


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="a public Gradio share link (use HTTP streaming "
                                                             "there unless --ice-servers has a TURN server)")
    parser.add_argument("--auth", type=_auth, default=None, metavar="USER:PASS", help="password-protect the page")
    parser.add_argument("--ice-servers", type=parse_ice_servers, default=os.environ.get("LP_ICE_SERVERS"),
                        help="STUN/TURN for WebRTC: a JSON list (URLs or {urls, username, credential}) or "
                             "comma-separated URLs (default: $LP_ICE_SERVERS, else none); see docs/deploy.md")
    parser.add_argument("--turn-url", help="a TURN server for WebRTC across strict NATs, e.g. "
                                           "turn:turn.example.com:3478 (added to --ice-servers)")
    parser.add_argument("--turn-user", help="the TURN server's user name")
    parser.add_argument("--turn-password", default=os.environ.get("LP_TURN_PASSWORD"),
                        help="the TURN server's password (default: $LP_TURN_PASSWORD)")
    parser.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM; browsers give the camera "
                                               "only to HTTPS pages or localhost)")
    parser.add_argument("--ssl-keyfile", help="the private key of --ssl-certfile (PEM)")
    parser.add_argument("--https-self-signed", action="store_true",
                        help="serve HTTPS with a self-signed certificate for this machine's names and addresses, "
                             "kept in ~/.cache/liveportrait-live/tls")
    parser.add_argument("--max-sessions", type=int, default=None,
                        help="live sessions admitted at once; more get 'the server is full' (default per device: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_SESSIONS.items()) + ")")
    parser.add_argument("--max-batch", type=int, default=8, help="most sessions animated in one engine call")
    add_limit_arguments(parser)


def run(args: argparse.Namespace, on_start: Callable[[LiveApp], None] | None = None) -> int:
    """Load the engine (official weights, or the error saying how to get them), then serve until Ctrl-C.
    `on_start` sees the app before it serves (the load-test server logs its counts)."""
    try:
        ice_servers = (args.ice_servers or []) + turn_server(args.turn_url, args.turn_user, args.turn_password)
        if args.https_self_signed and (args.ssl_certfile or args.ssl_keyfile):
            raise ValueError("--https-self-signed or --ssl-certfile/--ssl-keyfile, not both")
        if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
    except ValueError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    ssl = (args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile else None
    if args.https_self_signed:
        certfile, keyfile, cert, created = tls.self_signed(args.host)
        ssl = certfile, keyfile
        print(tls.advice(certfile, cert, args.host, args.port, created))
    engine = Engine(load_networks(args.weights, args.config, download=not args.no_download), device=args.device)
    Scheduler.of(engine).max_batch = args.max_batch
    engine.warmup()  # compile and capture now, not in a user's first frame (minutes cold on CUDA, cached after)
    app = LiveApp(engine, ice_servers, untrained=str(args.weights) == "recipe", max_sessions=args.max_sessions,
                  limits=Limits.from_args(args))
    if on_start:
        on_start(app)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `docker stop` / systemd: shut down like Ctrl-C
    try:
        app.launch(args.host, args.port, args.share, args.auth, ssl=ssl)
    finally:
        app.close()
    return 0
