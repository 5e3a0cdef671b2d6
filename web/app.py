"""The web app: one Gradio page with the live view, its controls, recording and video-file rendering.

Two live transports: WebRTC (our POST /offer on the same server, aiortc on this side, a small JS client in the
page) for the lowest latency, and Gradio's own webcam streaming over HTTP as the fallback that works through share
links without a TURN server. One engine serves every browser tab; a tab is a `Page`, keyed by Gradio's session
hash, which the page also hands to its WebRTC client so the signalling route finds the same tab. A tab can share
its output as a view-only link: GET /view/<token> is a page of its own (web/static/view.html) whose receive-only
offer goes to POST /view/<token>/offer; the worker finds the tab by the token.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import json
import re
import secrets
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urljoin

import fastapi
import gradio as gr
import numpy as np
import skimage.data
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute

from model.editing import SLIDERS, Edits
from model.engine import COMPILE_MODES, Engine, load_networks, recorded_compile_mode
from stream import encode
from stream.face import NoFaceError, prepare_source
from stream.render import MAX_BYTES, MAX_SIDE, InputError
from stream.scheduler import Scheduler
from web import controls as panel
from web import tls
from web.guard import Refused, check_offer, gradio_user, login_required
from web.limits import Limits, argument, positive
from web.limits import add_arguments as add_limit_arguments
from web.webrtc import parse_ice_servers, turn_server
from web.worker import MAX_VIEWERS, NotLive, ServerFull, TabClosed, UnknownView, ViewersFull, Worker

log = logging.getLogger("liveportrait.app")
STATIC = Path(__file__).parent / "static"
LIVE_HTML = """<div class="lp-live"><div class="lp-notice" hidden></div><div class="lp-stage">
<video autoplay playsinline muted></video><video class="lp-self" autoplay playsinline muted hidden></video>
<div class="lp-noface" hidden>no face in view</div></div>
<div class="lp-bar"><button class="lp-start">▶ Start camera</button><button class="lp-stop">■ Stop</button>
<button class="lp-self-toggle" aria-pressed="true">Hide self-view</button>
<button class="lp-pip">Picture-in-picture</button>
<span class="lp-state">Transport: WebRTC (idle)</span><span class="lp-frames"></span></div></div>"""
LIVE_CSS = """video { width: 100%; height: min(62vh, 560px); object-fit: contain; background: #111; border-radius: 8px; }
.lp-stage { position: relative; }
.lp-self { position: absolute; right: .6em; bottom: .6em; width: 22%; height: auto; transform: scaleX(-1);
           border: 2px solid #fff; border-radius: 6px; }
.lp-noface { position: absolute; top: .8em; left: 50%; transform: translateX(-50%); padding: .3em .9em;
             border-radius: 6px; background: rgba(0, 0, 0, .75); color: #fff; font-weight: 600; }
.lp-stage [hidden] { display: none; }
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
VIEW_HTML = (STATIC / "view.html").read_text()
VIEW_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Robots-Tag": "noindex"}
INVALID_LINK = "this view link is not valid: it was revoked, or its page closed"
NO_FACE_S = 1.0  # the page says "no face in view" once the tracker has found none for this long


class Page:
    """What the front knows of a browser tab: the secret its page was given at load (a WebRTC offer must carry
    it) and, under --auth, who logged in. Everything live is the worker's (web/worker.py)."""

    def __init__(self, user: str | None = None):
        self.secret, self.user = secrets.token_urlsafe(24), user


class LiveApp:
    """The Gradio front: the pages, the signalling route, every event handler. Live work is the worker's."""

    def __init__(self, engine: Engine, ice_servers: list[dict] | None = None, untrained: bool = False,
                 workdir: str | Path | None = None, max_sessions: int | None = None, limits: Limits | None = None,
                 max_renders: int = 1, step_s: float | None = None, codec: str = "h264", stream_max: int = 720,
                 max_viewers: int = MAX_VIEWERS):
        self.untrained, self.max_renders = untrained, max_renders
        self.ice_servers = ice_servers or []
        self.limits = limits or Limits()
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="liveportrait-"))
        self.worker = Worker(engine, prepare_source(skimage.data.astronaut()),  # NASA, public domain
                             max_sessions or DEFAULT_MAX_SESSIONS.get(engine.device.type, 1), self.ice_servers,
                             self.limits, self.dir, step_s, codec, stream_max, max_viewers)
        self.pages: dict[str, Page] = {}
        self.closed: dict[str, float] = {}  # session hashes of closed tabs -> when (they expire: see reap)

    def gone(self, request: gr.Request) -> bool:
        """The tab was closed: a request that raced its unload must not bring it back."""
        return request.session_hash in self.closed

    # ---- page lifecycle ----

    def open_page(self, request: gr.Request) -> str:
        """Page load: register the tab; its id and secret go to the WebRTC client."""
        if self.gone(request):
            return ""
        page = self.pages.setdefault(request.session_hash, Page(request.username))
        self.worker.stats(request.session_hash)  # its idle clock starts
        return json.dumps({"session": request.session_hash, "secret": page.secret})

    def close_page(self, request: gr.Request) -> None:
        """Tab closed: end its live connection and forget it."""
        self.closed[request.session_hash] = time.monotonic()
        while len(self.closed) > MAX_GONE:
            del self.closed[next(iter(self.closed))]
        self.pages.pop(request.session_hash, None)
        self.worker.close_tab(request.session_hash)

    def reap(self) -> list[str]:
        """Free the tabs gone quiet for longer than the idle timeout, and expire old closed-tab markers. Returns
        the tabs freed; a reaped tab that comes back later starts afresh."""
        freed = self.worker.reap()
        for session in freed:
            self.pages.pop(session, None)
        now = time.monotonic()
        for session, when in list(self.closed.items()):
            if now - when > self.limits.idle_timeout:
                self.closed.pop(session, None)
        return freed

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.limits.idle_timeout / 4))
            try:
                await asyncio.to_thread(self.reap)
            except Exception:  # reaping must outlive any one failure
                log.exception("reaping failed")

    def close(self) -> None:
        """Server shutdown: end every live connection (recordings are finalised)."""
        self.worker.close()

    # ---- portrait and controls ----

    def set_portrait(self, path: str | None, request: gr.Request) -> tuple:
        """Upload handler: validate and detect the face; the error is shown in the page, the old portrait stays."""
        if not path or self.gone(request):
            return gr.skip(), ""
        try:
            image = self.worker.set_portrait(request.session_hash, path)
        except (InputError, NoFaceError) as e:
            return gr.skip(), f"⚠️ **Portrait not used.** {e}"
        return image, f"✓ Portrait ready ({image.shape[1]}×{image.shape[0]})."

    def use_sample(self, request: gr.Request) -> tuple:
        if self.gone(request):
            return gr.skip(), ""
        image = self.worker.use_sample(request.session_hash)
        return image, "✓ Sample portrait (astronaut Eileen Collins, NASA, public domain)."

    def set_controls(self, relative: bool, stitching: bool, paste: bool, multiplier: float, eye_on: bool,
                     eye: float, lip_on: bool, lip: float, smoothing: float, overlay: bool,
                     request: gr.Request) -> np.ndarray | None:
        """Any control changed: the live connection picks the new values up at its next frame."""
        if self.gone(request):
            return gr.skip()
        self.worker.set_controls(request.session_hash, relative=relative, stitching=stitching, paste=paste,
                                 multiplier=float(multiplier), eye_target=float(eye) if eye_on else None,
                                 lip_target=float(lip) if lip_on else None, smoothing=float(smoothing),
                                 overlay=overlay)
        return self.edited(request)

    def set_edits(self, request: gr.Request, region: str, *sliders: float) -> np.ndarray | None:
        """Animation region or an expression/pose slider changed (values in model.editing.SLIDERS order)."""
        if self.gone(request):
            return gr.skip()
        self.worker.set_controls(request.session_hash, region=region,
                                 edits=Edits(**{k: float(v) for k, v in zip(SLIDERS, sliders, strict=True)}))
        return self.edited(request)

    def reset_edits(self, request: gr.Request) -> list:
        """Every expression/pose slider back to its default: the sliders' values, then the edited portrait."""
        if not self.gone(request):
            self.worker.reset_edits(request.session_hash)
        return [*Edits().values().values(), self.edited(request)]

    def select_tab(self, event: gr.SelectData, request: gr.Request) -> np.ndarray | None:
        """The Portrait editing tab renders while it is the one shown."""
        if not self.gone(request):
            self.worker.set_editing(request.session_hash, event.value == "Portrait editing")
        return self.edited(request)

    def edited(self, request: gr.Request) -> np.ndarray | None:
        """The page's portrait with its sliders applied, pasted back (one engine call); skipped while the
        Portrait editing tab is not shown."""
        image = self.worker.edited(request.session_hash) if not self.gone(request) else None
        return gr.skip() if image is None else image

    def reset_reference(self, request: gr.Request) -> str:
        if not self.gone(request) and self.worker.reset_reference(request.session_hash):
            return "Reference reset: the next frame is the neutral pose."
        return "Start the camera first."

    # ---- live: HTTP streaming fallback, WebRTC signalling, metrics ----

    def http_frame(self, frame: np.ndarray | None, request: gr.Request) -> np.ndarray | None:
        """One webcam frame from Gradio's streaming: hand it over, answer with the newest output."""
        if frame is None or self.gone(request):
            return None
        try:
            return self.worker.http_frame(request.session_hash, frame)
        except TabClosed:
            return None

    async def offer(self, request: fastapi.Request) -> JSONResponse:
        """POST /offer {sdp, type, session, secret}: answer a page's WebRTC offer. The login, the origin, the
        content type, the size and the offer are checked first, then that the secret is the one this tab's page
        was given (and, under --auth, that the same user is logged in); the tab's live connection is replaced
        only once aiortc has fully accepted the offer, so a bad one leaves the tab streaming."""
        try:
            body = await check_offer(request)
        except Refused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        page = self.pages.get(body["session"])
        if page is None or not secrets.compare_digest(page.secret, body["secret"]):
            return JSONResponse({"error": "unknown page; reload it"}, status_code=403)
        if login_required(request) and await gradio_user(request) != page.user:
            return JSONResponse({"error": "this page belongs to another login"}, status_code=403)
        try:
            return JSONResponse(await self.worker.offer(body["session"], body))
        except ServerFull as e:  # the offer was fine, the server is not: nothing was created
            return JSONResponse({"error": str(e)}, status_code=503)
        except TabClosed as e:
            return JSONResponse({"error": str(e)}, status_code=403)
        except Exception as e:  # aiortc refused the offer: nothing was created, the tab's connection is untouched
            log.info("offer refused: %s: %s", type(e).__name__, e)
            return JSONResponse({"error": f"bad offer: {e}"}, status_code=400)

    # ---- view-only links: the output for OBS, a call or a second screen ----

    def share_output(self, page_url: str, request: gr.Request) -> str:
        """Share output: a new view-only link for this tab (`page_url`: the page's address, from the browser, so
        the link names the host the way the user reaches it); the previous link stops working."""
        if self.gone(request):
            return gr.skip()
        return urljoin(page_url or "", f"view/{self.worker.share(request.session_hash)}")

    async def view_page(self, request: fastapi.Request) -> fastapi.Response:
        """GET /view/<token>[?bg=RRGGBB&fit=contain|cover]: the viewer page (web/static/view.html), not Gradio's; 404
        for a wrong or revoked token, 400 for a bad option. No login: the unguessable token is the permission to
        watch, and it grants nothing else."""
        if not self.worker.viewing(request.path_params["token"]):
            return PlainTextResponse(INVALID_LINK, status_code=404, headers=VIEW_HEADERS)
        bg, fit = request.query_params.get("bg", "000000"), request.query_params.get("fit", "contain")
        if not re.fullmatch(r"[0-9a-fA-F]{6}", bg):
            return PlainTextResponse(f"bg={bg[:20]!r}: expected six hex digits RRGGBB, e.g. ?bg=00ff00",
                                     status_code=400, headers=VIEW_HEADERS)
        if fit not in ("contain", "cover"):
            return PlainTextResponse(f"fit={fit[:20]!r}: expected contain or cover", status_code=400,
                                     headers=VIEW_HEADERS)
        config = json.dumps(dict(ice=self.ice_servers, bg=f"#{bg}", fit=fit)).replace("<", "\\u003c")
        return HTMLResponse(VIEW_HTML.replace("__CONFIG__", config), headers=VIEW_HEADERS)

    async def view_offer(self, request: fastapi.Request) -> JSONResponse:
        """POST /view/<token>/offer {sdp, type}: answer a viewer's receive-only offer. 404 for a wrong or revoked
        token, 409 while the performer is not live (the page tries again), 429 beyond --max-viewers. A view offer
        reaches no page route: it can change nothing of the session."""
        token = request.path_params["token"]
        if not self.worker.viewing(token):
            return JSONResponse({"error": INVALID_LINK}, 404)
        try:
            body = await check_offer(request, view=True)
        except Refused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        try:
            return JSONResponse(await self.worker.view_offer(token, body))
        except UnknownView:
            return JSONResponse({"error": INVALID_LINK}, 404)
        except NotLive as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        except ViewersFull as e:
            return JSONResponse({"error": str(e)}, status_code=429)
        except Exception as e:  # aiortc refused the offer: nothing was created
            log.info("view offer refused: %s: %s", type(e).__name__, e)
            return JSONResponse({"error": f"bad offer: {e}"}, status_code=400)

    def stats(self, request: gr.Request) -> str:
        """The metrics line the page polls."""
        if self.gone(request):
            return gr.skip()
        m = self.worker.stats(request.session_hash)
        if not m["live"]:
            if m["refused"]:
                return f"**Live:** {m['refused']}."
            return "**Live:** not connected — start the camera (WebRTC) or the HTTP streaming webcam."
        size = "×".join(map(str, m["size"])) if m["size"] else "–"
        recording = (" · ● recording" if m["recording"] else
                     f" · ■ recording stopped at the {self.limits.record_max_s:g} s limit: press Stop recording to "
                     "get it" if m["recording_full"] else
                     f" · ⚠️ {m['record_error']}" if m["record_error"] else "")
        codec = f" ({m['codec']})" if m["codec"] else ""
        face = " · ⚠️ no face in view" if m["no_face_s"] >= NO_FACE_S else ""
        viewers = f" · 🔗 {m['viewers']} viewer{'s' if m['viewers'] != 1 else ''}" if m["viewers"] else ""
        return (f"**Live via {m['transport']}{codec}** · in {m['fps_in']} fps · out {m['fps_out']} fps · "
                f"dropped {m['dropped']} · latency p50 {m['latency_p50_ms']:.0f} ms / p95 {m['latency_p95_ms']:.0f} ms"
                f" · {size}{recording}{face}{viewers}")

    async def healthz(self, request: fastapi.Request) -> JSONResponse:
        """GET /healthz: readiness and load for a load balancer; 503 while full. Under --auth, a request without
        the login learns only `ready` and `full`."""
        h = self.worker.health()
        full = h["live_sessions"] >= h["capacity"]
        body = dict(ready=True, full=full)
        if not login_required(request) or await gradio_user(request) is not None:
            body.update(h)
        return JSONResponse(body, status_code=503 if full else 200)

    # ---- recording and rendering ----

    def start_recording(self, request: gr.Request) -> str:
        if self.gone(request):
            return ""
        return self.worker.start_recording(request.session_hash)

    def stop_recording(self, request: gr.Request) -> tuple:
        """Every take not yet downloaded (a second Record keeps the first; so do Stop and the limit)."""
        takes = self.worker.stop_recording(request.session_hash) if not self.gone(request) else []
        if not takes:
            return gr.skip(), "Nothing recorded yet."
        return [str(p) for p in takes], f"Saved {', '.join(p.name for p in takes)}."

    def render_video(self, driving: str | None, request: gr.Request,
                     progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:
        """Video-file tab: the page's portrait driven by an uploaded video, at its frame rate, with its audio."""
        if not driving:
            return None, "Upload a driving video first."
        if self.gone(request):
            return None, ""
        if (size := Path(driving).stat().st_size) > self.limits.render_max_mb * 2**20:
            return None, (f"⚠️ The video is {size / 2**20:.1f} MB; this server renders at most "
                          f"{self.limits.render_max_mb:g} MB.")
        try:
            out, info = self.worker.render(request.session_hash, driving)
        except InputError as e:
            return None, f"⚠️ {e}"
        if out is None:
            return None, info
        return str(out), f"{info['frames']} frames at {info['fps']:g} fps{', with audio' if info['audio'] else ''}."

    def speed_note(self) -> str:
        """What to expect, measured at start-up, said before anyone starts the camera."""
        step = self.worker.step_s
        if step < 0.25:
            return f"Measured at start-up: {step * 1000:.0f} ms per frame for one live session."
        every = f"{step:.0f} s" if step >= 2 else f"{step:.1f} s"
        return (f"⏱ **This server animates about one frame every {every}** (measured at start-up on its "
                f"{self.worker.device.upper()}): the live view will update that slowly, not like a "
                "video. A CUDA GPU makes it live; meanwhile the **Video file** tab renders a whole clip without "
                "waiting on the webcam.")

    # ---- the page and the server ----

    def blocks(self) -> gr.Blocks:
        age = self.limits.work_max_age_h * 3600  # Gradio's copies of the files it serves expire like ours
        with gr.Blocks(title="LivePortrait Live", delete_cache=(min(3600, age), age)) as demo:
            gr.Markdown("# LivePortrait Live\nYour webcam drives the portrait: head pose and expressions, live.")
            if self.untrained:
                gr.HTML('<div class="lp-banner">⚠️ Untrained weights (<code>--weights recipe</code>): the networks '
                        'are deterministic random numbers, so the output is not a real animation.</div>')
            gr.Markdown(f"{self.speed_note()}\n\n<small>Engine: {self.worker.about}</small>", elem_id="lp-speed")
            with gr.Row():
                with gr.Column(scale=2):
                    portrait = gr.Image(self.worker.sample.image, label="Portrait", interactive=False, height=280)
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
                                           ice_servers=self.ice_servers, codec=self.worker.codec)
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
                    with gr.Row(equal_height=True):
                        share = gr.Button("🔗 Share output", size="sm", scale=0, elem_id="lp-share")
                        link = gr.Textbox(label="View-only link (OBS Browser Source, 720×720: see docs/obs.md); a "
                                                "new one revokes it", interactive=False, buttons=["copy"],
                                          elem_id="lp-link", scale=4)
                    recording = gr.File(label="Recordings (MP4)", file_count="multiple", interactive=False)

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
            go.click(self.render_video, driving, [rendered, render_status], concurrency_limit=self.max_renders,
                     concurrency_id="render")  # a bounded queue: the page shows its position
            share.click(self.share_output, link, link, js="() => [document.baseURI]")  # js: the page's address
            record.click(self.start_recording, None, record_status)
            stop.click(self.stop_recording, None, [recording, record_status])
            gr.Timer(1.0).tick(self.stats, None, metrics, show_progress="hidden")
        return demo

    def launch(self, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
               auth: tuple[str, str] | None = None, block: bool = True,
               ssl: tuple[str | Path, str | Path] | None = None) -> gr.Blocks:
        """Serve the page, POST /offer and the view-only links on one server (a share link tunnels all); HTTPS
        with `ssl` = (certfile, keyfile)."""
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            reaper = asyncio.create_task(self._reap_forever())
            yield
            reaper.cancel()
            await asyncio.to_thread(self.close)

        demo = self.blocks()
        demo.queue(default_concurrency_limit=None)
        certfile, keyfile = map(str, ssl) if ssl else (None, None)
        max_upload = max(MAX_BYTES, int(self.limits.render_max_mb * 2**20))  # portraits: read_image says 20 MB
        demo.launch(server_name=host, server_port=port, share=share, auth=auth, max_file_size=max_upload,
                    prevent_thread_lock=not block, css=PAGE_CSS, footer_links=[],
                    ssl_certfile=certfile, ssl_keyfile=keyfile, ssl_verify=False,  # Gradio's check of its own URL
                    app_kwargs={"routes": [APIRoute("/offer", self.offer, methods=["POST"]),
                                           APIRoute("/healthz", self.healthz, methods=["GET"]),
                                           APIRoute("/view/{token}", self.view_page, methods=["GET"]),
                                           APIRoute("/view/{token}/offer", self.view_offer, methods=["POST"])],
                                "lifespan": lifespan})
        return demo


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not (user and sep and password):
        raise argparse.ArgumentTypeError("expected user:pass")
    return user, password


def port(text: str) -> int:
    if not (text.isdigit() and 0 < int(text) < 65536):
        raise ValueError(f"{text!r} is not a port number (1 .. 65535)")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to serve on (0.0.0.0: the whole network)")
    parser.add_argument("--port", type=argument(port), default=7860)
    parser.add_argument("--share", action="store_true", help="a public Gradio share link (use HTTP streaming "
                                                             "there unless --ice-servers has a TURN server)")
    parser.add_argument("--auth", type=_auth, default=None, metavar="USER:PASS", help="password-protect the page")
    parser.add_argument("--ice-servers", type=argument(parse_ice_servers), default=os.environ.get("LP_ICE_SERVERS"),
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
    parser.add_argument("--max-sessions", type=positive(int), default=None,
                        help="live sessions admitted at once; more get 'the server is full' (default per device: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_SESSIONS.items()) + ")")
    parser.add_argument("--max-batch", type=positive(int), default=8, help="most sessions animated in one engine call")
    parser.add_argument("--max-viewers", type=positive(int), default=MAX_VIEWERS,
                        help="viewers per live session on its view-only link (Share output); more are told "
                             "'this output already has N viewers'")
    parser.add_argument("--max-renders", type=positive(int), default=1,
                        help="video-file renders run at once; more wait in a queue whose position the page shows")
    parser.add_argument("--codec", choices=encode.CODECS, default="h264",
                        help="WebRTC video codec: h264 (x264 tuned for live video; VP8 for a browser without "
                             "H.264) or vp8 (default: h264; docs/benchmarks.md has the trade-off)")
    parser.add_argument("--compile", choices=list(COMPILE_MODES), default=None,
                        help="torch.compile mode of the engine (default: on CUDA the mode the compile cache holds, "
                             "else default: max-autotune autotunes every conv, far longer cold; off on a CPU)")
    parser.add_argument("--stream-max", type=positive(int), default=720,
                        help="longer side in pixels of the video sent to the browser (recordings keep the "
                             "portrait's full size; default: 720)")
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
    engine = Engine(load_networks(args.weights, args.config, download=not args.no_download), device=args.device,
                    compile=args.compile)
    Scheduler.of(engine).max_batch = args.max_batch
    if engine.compile_mode != "off":
        log.info("torch.compile %s mode; the compile cache holds %s", engine.compile_mode,
                 recorded_compile_mode() or "nothing yet (a cold start: minutes)")
    took = engine.warmup()  # batch 1 and the largest now, not in a user's first frame (minutes cold on CUDA)
    engine.warm_rest()  # the other batch sizes on a background thread: meanwhile batches pad up to a ready one
    step = took.get(1) if engine.device.type == "cpu" else None  # CUDA's first call compiles: the worker measures
    app = LiveApp(engine, ice_servers, untrained=str(args.weights) == "recipe", max_sessions=args.max_sessions,
                  limits=Limits.from_args(args), max_renders=args.max_renders, step_s=step, codec=args.codec,
                  stream_max=args.stream_max, max_viewers=args.max_viewers)
    if on_start:
        on_start(app)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `docker stop` / systemd: shut down like Ctrl-C
    try:
        app.launch(args.host, args.port, args.share, args.auth, ssl=ssl)
    finally:
        app.close()
    return 0
