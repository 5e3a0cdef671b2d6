"""The web app: one Gradio page with the live view, its controls, recording and video-file rendering.

Two live transports: WebRTC (our POST /offer on the same server, aiortc on this side, a small JS client in the
page) for the lowest latency, and Gradio's own webcam streaming over HTTP as the fallback that works through share
links without a TURN server. A tab is a `Page`, keyed by Gradio's session hash, which the page also hands to its
WebRTC client so the signalling route finds the same tab. A tab can share its output as a view-only link:
GET /view/<token> is a page of its own (web/static/view.html) whose receive-only offer goes to
POST /view/<token>/offer.

Everything live is a worker's (web/worker.py): one in this process by default, or several Ray actors in cluster
mode (--workers, --ray: web/cluster.py), called the same way with plain data. A tab is placed on the worker with
the most room when it first needs the engine (going live, the Portrait editing tab, a render) and stays there;
until then the front answers for it from its Page, which keeps what its worker will be given. A view token is
routed to its tab's worker, and outlives the tab's moves: the next worker to hold the tab is given it. Files the
worker hands back (recordings, renders) are written to this front's work directory, from where Gradio serves them.
The front watches its workers: the pages of a lost or restarted worker's tabs are told why in their metrics
line, from which a WebRTC page connects again by itself (web/static/live.js); a worker told to drain
(`launch.py --drain`) is drained.
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import math
import os
import json
import re
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar
from urllib.parse import urljoin

import fastapi
import gradio as gr
import numpy as np
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from gradio.utils import get_upload_folder

from model.editing import SLIDERS, Edits
from model.engine import COMPILE_MODES
from stream import encode
from stream.face import NoFaceError
from stream.pipeline import draw_text
from stream.render import MAX_BYTES, MAX_SIDE, InputError
from web import controls as panel
from web import tls
from web.guard import Refused, check_offer, gradio_user, login_required, same_secret
from web.limits import Limits, argument, claim, default_work_dir, positive
from web.limits import add_arguments as add_limit_arguments
from web.webrtc import mint, parse_ice_servers, turn_server
from web.worker import (CALL_TIMEOUT_S, CLOSED, DEFAULT_MAX_SESSIONS, LOAD_TIMEOUT_S, MAX_VIEWERS, RECORD_LIVE,
                        EditorsFull, Local, NotLive, ServerFull, TabClosed, UnknownTab, UnknownView, ViewersFull,
                        WorkerConfig, WorkerLost)

log = logging.getLogger("liveportrait.app")
T = TypeVar("T")
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
DRAIN_POLL_S = 1.0  # a drain checks this often whether its workers' live sessions have ended
NO_FACE_S = 1.0  # the page says "no face in view" once the tracker has found none for this long
PROGRESS_POLL_S = 0.5  # a render's progress bar asks the tab's worker this often
WATCH_S = 1.0  # the front asks every worker this often whether it still answers, and in the same process
LOST = "the live session on it ended and a recording in progress there is lost; reconnecting"  # metrics line
NOT_LIVE = dict(live=False, refused=None, error=None)  # the stats of a tab no worker holds
SHARE_LIVE = "Start the camera first, then share its output."  # Share output, for a tab that has not been live


class Page:
    """What the front knows of a browser tab: the secret its page was given at load (a WebRTC offer must carry
    it), under --auth who logged in, what a worker needs to hold the tab (its portrait's bytes, None for the
    sample; its controls; whether its Portrait editing tab is shown), and when it was last called (a page no
    worker holds is the front's to reap). Everything live is a worker's."""

    def __init__(self, user: str | None = None):
        self.secret, self.user = secrets.token_urlsafe(24), user
        self.portrait: bytes | None = None
        self.controls: dict[str, Any] = {}
        self.editing = False
        self.lost: str | None = None  # why its worker was lost (see LiveApp.watch), until it is live again
        self.seen = time.monotonic()


class LiveApp:
    """The Gradio front: the pages, the signalling route, every event handler. Live work is the workers':
    `workers` (web/cluster.py's, in cluster mode), else one built in this process from `config`."""

    def __init__(self, config: WorkerConfig, untrained: bool = False, workdir: str | Path | None = None,
                 max_renders: int = 1, workers: list | None = None):
        self.untrained, self.max_renders = untrained, max_renders
        self.ice_servers, self.limits = config.ice_servers, config.limits
        self.dir = Path(workdir or config.workdir or default_work_dir())  # the in-process worker's work directory
        self.workers = workers or [Local(dataclasses.replace(config, workdir=str(self.dir)))]
        self.placed: dict[str, Any] = {}  # session hash -> the worker that holds the tab
        self.draining: set = set()  # workers being drained: no tab is placed on them (see drain)
        self.drains: set[asyncio.Task] = set()  # the drains the watch started (launch.py --drain), while they run
        self.shared: dict[str, str] = {}  # view token -> the session hash whose output it shows
        self.pids: dict[Any, int] = {}  # worker -> the process its health last answered from (see watch)
        self.info = _wait(self.workers[0].call("about"))  # what the page shows: device, engine, codec, sample
        self.pages: dict[str, Page] = {}
        self.closed: dict[str, float] = {}  # session hashes of closed tabs -> when (they expire: see reap)
        self.auth = False  # under --auth every handler acts only for the login that opened its tab (launch sets it)

    async def _freest(self) -> Any:
        """The answering worker with the most free capacity (a draining one takes no tab)."""
        workers = [w for w in self.workers if w not in self.draining]
        if not workers:
            raise ServerFull("this server is being drained for a restart; try again shortly")
        if len(workers) == 1:
            return workers[0]
        loads = await asyncio.gather(*(w.call("load", timeout=LOAD_TIMEOUT_S) for w in workers),
                                     return_exceptions=True)
        up = [(load, w) for load, w in zip(loads, workers) if not isinstance(load, BaseException)]
        if not up:
            raise WorkerLost("no worker of this server answers; try again shortly")
        return max(up, key=lambda lw: lw[0])[1]

    async def _on(self, session: str) -> Any:
        """The tab's worker: the one that holds it, else the freest one, which holds it from now on. A tab whose
        page has closed is placed nowhere (TabClosed)."""
        if (worker := self.placed.get(session)) is None:
            worker = await self._freest()
            self._open(session)  # (its page may have closed while the workers were asked)
            worker = self.placed.setdefault(session, worker)
        return worker

    def _open(self, session: str) -> None:
        """TabClosed once the tab's page has closed: the front, which keeps the closed-tab markers, never places
        or restores such a tab (a request that raced the unload must not bring it back)."""
        if session in self.closed:
            raise TabClosed(CLOSED)

    def _page(self, session: str) -> Page:
        """The tab's Page, seen now; a blank one, not kept, for a call before its page load (only its load makes
        one)."""
        page = self.pages.get(session) or Page()
        page.seen = time.monotonic()
        return page

    async def _ask(self, session: str, method: str, *args: Any, unplaced: Any = None) -> Any:
        """`method` of the tab's worker if a worker holds the tab, else `unplaced`, with no worker call: a tab is
        placed only when it first needs the engine (`_call`: going live, the editor, a render); until then it has
        nothing live, and its Page keeps what its worker will be given."""
        if session in self.placed:
            return await self._call(session, method, *args)
        self._page(session)
        return unplaced

    async def _call(self, session: str, method: str, *args: Any, **kw: Any) -> Any:
        """`method` of the tab's worker, for the tab, placing the tab first if no worker holds it. A worker that
        does not hold the tab (it was just placed there, or the worker restarted) gets it restored from its Page
        first; a lost worker's tabs are placed again at their next need."""
        page = self._page(session)
        worker = await self._on(session)
        try:
            try:
                return await worker.call(method, session, *args, **kw)
            except UnknownTab:
                self._open(session)
                token = next((t for t, s in self.shared.items() if s == session), None)
                await worker.call("restore", session, page.portrait, page.controls, page.editing, token)
                if session in self.closed:  # its page closed while it was restored: the worker lets it go again
                    await worker.call("close_tab", session)
                    raise TabClosed(CLOSED)
                return await worker.call(method, session, *args, **kw)
        except WorkerLost as e:
            if self.placed.get(session) is worker:
                self._unplace(session)
                page.lost = str(e)
            raise
        except ServerFull:  # not live there: its next try is placed again, on the freest worker then
            if len(self.workers) > 1 and self.placed.get(session) is worker:
                self._unplace(session)
                with contextlib.suppress(Exception):
                    await worker.call("close_tab", session)  # moved: placed again at its next need
                if worker in self.draining:  # that try goes to another worker at once
                    return await self._call(session, method, *args, **kw)
            raise

    def _forget(self, session: str) -> None:
        """The tab is gone: its worker and its view token are no longer the front's to route to."""
        self.placed.pop(session, None)
        for token in [t for t, s in self.shared.items() if s == session]:
            del self.shared[token]

    def _unplace(self, session: str) -> None:
        """The tab has no worker now (moved off a full or draining one, or its worker was lost): it is placed again
        at its next need. Its view link stays the front's: the worker that holds the tab next is given it."""
        self.placed.pop(session, None)

    def gone(self, request: gr.Request) -> bool:
        """The tab is not the caller's to act on: it was closed (a request that raced its unload must not bring it
        back) or, under --auth, the caller is not the login whose page load opened it."""
        if request.session_hash in self.closed:
            return True
        if not self.auth:
            return False
        page = self.pages.get(request.session_hash)
        return page is None or page.user != request.username

    def holds_secret(self, request: gr.Request, key: str | None) -> bool:
        """Whether `key` (the page's {session, secret}, as its load gave it) is this tab's. Gradio lets any client
        name any session hash, so the handlers that hand something out (a view link, recordings) ask for it."""
        page = self.pages.get(request.session_hash)
        try:
            secret = json.loads(key or "{}").get("secret")
        except (ValueError, AttributeError, RecursionError):
            return False
        return page is not None and not self.gone(request) and same_secret(page.secret, secret)

    # ---- page lifecycle ----

    async def open_page(self, request: gr.Request) -> str:
        """Page load: register the tab (no worker holds it until it first needs the engine); its id, its secret
        and its ICE servers (TURN credentials minted for it) go to the WebRTC client. Only the load that creates the
        tab gets them: another call naming the same session hash (Gradio lets a client choose it) gets nothing."""
        if request.session_hash in self.closed:
            return ""
        page = Page(request.username)
        if self.pages.setdefault(request.session_hash, page) is not page:
            log.warning("a second page load for an open tab: refused")
            return ""
        return json.dumps({"session": request.session_hash, "secret": page.secret, "ice": mint(self.ice_servers)})

    async def close_page(self, request: gr.Request) -> None:
        """Tab closed: end its live connection and forget it."""
        if self.gone(request):
            return
        self.closed[request.session_hash] = time.monotonic()
        while len(self.closed) > MAX_GONE:
            del self.closed[next(iter(self.closed))]
        self.pages.pop(request.session_hash, None)
        if worker := self.placed.get(request.session_hash):
            with contextlib.suppress(WorkerLost):  # a lost worker has lost the tab already
                await worker.call("close_tab", request.session_hash)
        self._forget(request.session_hash)

    async def reap(self) -> list[str]:
        """Free the tabs gone quiet for longer than the idle timeout: each worker frees the ones it holds (and
        cleans its work directory), the front drops the pages no worker holds. Old closed-tab markers expire.
        Returns the tabs freed; one that comes back later starts afresh."""
        now = time.monotonic()  # before the workers answer: a slow answer must not age the pages polled meanwhile
        reaped = await asyncio.gather(*(w.call("reap") for w in self.workers), return_exceptions=True)
        freed = []
        for worker, tabs in zip(self.workers, reaped):
            if isinstance(tabs, BaseException):
                log.warning("reaping on %s failed: %s", worker.name, tabs)
                continue
            for session in tabs:
                if self.placed.get(session) in (worker, None):  # not a tab placed elsewhere since
                    self.pages.pop(session, None)
                    self._forget(session)
                    freed.append(session)
        for session, page in list(self.pages.items()):
            if session not in self.placed and now - page.seen > self.limits.idle_timeout:
                del self.pages[session]
                self._forget(session)
                freed.append(session)
        for session, when in list(self.closed.items()):
            if now - when > self.limits.idle_timeout:
                self.closed.pop(session, None)
        return freed

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(min(30.0, self.limits.idle_timeout / 4))
            try:
                await self.reap()
            except Exception:  # reaping must outlive any one failure
                log.exception("reaping failed")

    async def watch(self) -> list[str]:
        """Ask every worker for its health (within LOAD_TIMEOUT_S): one that does not answer, or answers from
        another process than before (Ray restarted it, empty), has lost its tabs' live sessions, so each such tab's
        page is told why (`Page.lost`, in its metrics line, from which a WebRTC page reconnects by itself). The
        tabs' placement is `_call`'s: a tab moves, or is restored on the restarted worker, when it next needs the
        engine. A worker that says it is draining, which this front did not ask for (`launch.py --drain` told it),
        is drained by this front, in a task of its own, for the time it was given. Returns the tabs told."""
        async def health(worker) -> dict | str:
            try:
                return await worker.call("health", timeout=LOAD_TIMEOUT_S)
            except WorkerLost as e:
                return str(e)
        workers = list(self.workers)
        told = []
        for worker, h in zip(workers, await asyncio.gather(*map(health, workers))):
            if isinstance(h, str):
                why = h
                self.pids.pop(worker, None)  # told now: its next process is not news
            elif self.pids.setdefault(worker, h["pid"]) != h["pid"]:
                why = f"the server lost its worker {worker.name} (its process {self.pids[worker]} ended; restarted)"
                self.pids[worker] = h["pid"]
            else:
                if h["draining"] and worker not in self.draining and worker in self.workers:  # (not drained since)
                    log.info("worker %s was told to drain: draining it for at most %g s", worker.name,
                             h["drain_timeout_s"])
                    self.draining.add(worker)
                    self.drains.add(drain := asyncio.create_task(self.drain([worker], h["drain_timeout_s"])))
                    drain.add_done_callback(self.drains.discard)
                continue
            for session in [s for s, w in self.placed.items() if w is worker]:
                if (page := self.pages.get(session)) and page.lost is None:
                    page.lost = why
                    told.append(session)
        return told

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                await self.watch()
            except Exception:  # the watch must outlive any one failure
                log.exception("watching the workers failed")

    def close(self) -> None:
        """Server shutdown: end every live connection (recordings are finalised)."""
        for worker in self.workers:
            worker.close()

    async def drain(self, workers: list, timeout: float) -> bool:
        """Drain `workers` (on SIGTERM: every one; on `launch.py --drain`: the one named, see watch): no tab is
        placed on them any more and they admit no new live session, so a new one goes to another worker (or, with
        none left, is told the server is being drained); once their live sessions have ended, or after `timeout`
        s, they are closed (a recording still running is finalised) and leave the front. The pages of the sessions
        still live then are told why, as for a lost worker, so they connect again elsewhere. True if every session
        ended in time."""
        self.draining.update(workers)

        async def let_go(worker) -> list[str]:
            """The worker's tabs without a live session, which it lets go: each is placed elsewhere at its next
            call."""
            with contextlib.suppress(Exception):  # a dead worker holds no tab
                return await worker.call("drain", timeout)
            return []

        async def live(worker) -> int:
            with contextlib.suppress(Exception):  # a dead worker has no session left
                return (await worker.call("health", timeout=LOAD_TIMEOUT_S))["live_sessions"]
            return 0
        for worker, tabs in zip(workers, await asyncio.gather(*map(let_go, workers))):
            for session in tabs:
                if self.placed.get(session) is worker:
                    self._unplace(session)
        deadline = time.monotonic() + timeout
        while (left := sum(await asyncio.gather(*map(live, workers)))) and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if left:
            log.warning("drain: %d live session(s) still open after %g s; ending them", left, timeout)
        for worker in workers:
            self.workers.remove(worker)
            self.pids.pop(worker, None)
            idle = set(await let_go(worker)) if left else set()
            why = f"the server lost its worker {worker.name} (drained: sessions still live after {timeout:g} s end)"
            for session in [s for s, w in self.placed.items() if w is worker]:
                self._unplace(session)
                if session not in idle and (page := self.pages.get(session)):
                    page.lost = why
            await asyncio.to_thread(worker.close)
            self.draining.discard(worker)
        return not left

    # ---- portrait and controls ----

    async def set_portrait(self, path: str | None, request: gr.Request) -> tuple:
        """Upload handler: validate and detect the face; the error is shown in the page, the old portrait stays."""
        if not path or self.gone(request):
            return gr.skip(), ""
        session = request.session_hash
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
            if session not in self.placed:  # checked where faces are found, without placing the tab
                image = await (await self._freest()).call("check_portrait", data)
            if session in self.placed:  # (placed meanwhile, too: its worker must have the new portrait)
                image = await self._call(session, "set_portrait", data)
        except (InputError, NoFaceError) as e:
            return gr.skip(), f"⚠️ **Portrait not used.** {e}"
        self._page(session).portrait = data
        return image, f"✓ Portrait ready ({image.shape[1]}×{image.shape[0]})."

    async def use_sample(self, request: gr.Request) -> tuple:
        if self.gone(request):
            return gr.skip(), ""
        self._page(request.session_hash).portrait = None
        image = await self._ask(request.session_hash, "use_sample", unplaced=self.info["sample"])
        return image, "✓ Sample portrait (astronaut Eileen Collins, NASA, public domain)."

    async def set_controls(self, relative: bool, stitching: bool, paste: bool, multiplier: float, eye_on: bool,
                           eye: float, lip_on: bool, lip: float, smoothing: float, overlay: bool,
                           request: gr.Request) -> np.ndarray | None:
        """Any control changed: the live connection picks the new values up at its next frame."""
        if self.gone(request):
            return gr.skip()
        await self._controls(request.session_hash, dict(
            relative=relative, stitching=stitching, paste=paste, multiplier=float(multiplier),
            eye_target=float(eye) if eye_on else None, lip_target=float(lip) if lip_on else None,
            smoothing=float(smoothing), overlay=overlay))
        return await self.edited(request)

    async def _controls(self, session: str, values: dict[str, Any]) -> None:
        """Controls changed: kept here (the worker that holds the tab later, or again after a restart, gets them)
        and sent to the tab's worker, if it has one."""
        self._page(session).controls.update(values)
        await self._ask(session, "set_controls", values)

    async def set_edits(self, request: gr.Request, region: str, *sliders: float) -> np.ndarray | None:
        """Animation region or an expression/pose slider changed (values in model.editing.SLIDERS order)."""
        if self.gone(request):
            return gr.skip()
        await self._controls(request.session_hash, dict(
            region=region, edits=Edits(**{k: float(v) for k, v in zip(SLIDERS, sliders, strict=True)})))
        return await self.edited(request)

    async def reset_edits(self, request: gr.Request) -> list:
        """Every expression/pose slider back to its default: the sliders' values, then the edited portrait."""
        if not self.gone(request):
            await self._controls(request.session_hash, dict(edits=Edits()))
        return [*Edits().values().values(), await self.edited(request)]

    async def select_tab(self, event: gr.SelectData, request: gr.Request) -> np.ndarray | None:
        """The Portrait editing tab renders while it is the one shown (shown, its editor needs the engine:
        `edited` places the tab)."""
        if not self.gone(request):
            self._page(request.session_hash).editing = event.value == "Portrait editing"
            await self._ask(request.session_hash, "set_editing", event.value == "Portrait editing")
        return await self.edited(request)

    async def edited(self, request: gr.Request) -> np.ndarray | None:
        """The page's portrait with its sliders applied, pasted back (one engine call); skipped while the
        Portrait editing tab is not shown."""
        if self.gone(request) or not self._page(request.session_hash).editing:
            return gr.skip()
        try:
            image = await self._call(request.session_hash, "edited")
        except EditorsFull as e:
            gr.Warning(f"Portrait editing: {e}.")
            return gr.skip()
        return gr.skip() if image is None else image

    async def reset_reference(self, request: gr.Request) -> str:
        if not self.gone(request) and await self._ask(request.session_hash, "reset_reference", unplaced=False):
            return "Reference reset: the next frame is the neutral pose."
        return "Start the camera first."

    # ---- live: HTTP streaming fallback, WebRTC signalling, metrics ----

    async def http_frame(self, frame: np.ndarray | None, request: gr.Request) -> np.ndarray | None:
        """One webcam frame from Gradio's streaming: hand it over, answer with the newest output."""
        if frame is None or self.gone(request):
            return None
        try:
            return await self._call(request.session_hash, "http_frame", frame)
        except TabClosed:
            return None
        except (ServerFull, WorkerLost) as e:  # the frame, darkened, says so; the next one tries again
            return draw_text(frame // 3, str(e))

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
        if page is None or not same_secret(page.secret, body["secret"]):
            return JSONResponse({"error": "unknown page; reload it"}, status_code=403)
        if login_required(request) and await gradio_user(request) != page.user:
            return JSONResponse({"error": "this page belongs to another login"}, status_code=403)
        try:
            return JSONResponse(await self._call(body["session"], "offer", body))
        except (ServerFull, WorkerLost) as e:  # the offer was fine, the server is not: nothing was created
            return JSONResponse({"error": str(e)}, status_code=503)
        except TabClosed as e:
            return JSONResponse({"error": str(e)}, status_code=403)
        except Exception as e:  # aiortc refused the offer: nothing was created, the tab's connection is untouched
            log.info("offer refused: %s: %s", type(e).__name__, e)
            return JSONResponse({"error": f"bad offer: {e}"}, status_code=400)

    # ---- view-only links: the output for OBS, a call or a second screen ----

    async def share_output(self, page_url: str, key: str | None, request: gr.Request) -> str:
        """Share output: a new view-only link for this tab (`page_url`: the page's address, from the browser, so
        the link names the host the way the user reaches it; `key`: the page's secret); the previous link stops
        working."""
        if not self.holds_secret(request, key):
            return gr.skip()
        token = await self.share(request.session_hash)
        return urljoin(page_url or "", f"view/{token}") if token else SHARE_LIVE

    async def share(self, session: str) -> str | None:
        """A new view token for the tab's output (the old one is revoked), routed to the tab's worker; None for a
        tab no worker holds (it has not been live: nothing to watch, nowhere to route)."""
        if (token := await self._ask(session, "share")) is not None:
            for old in [t for t, s in self.shared.items() if s == session]:
                del self.shared[old]
            self.shared[token] = session
        return token


    async def view_page(self, request: fastapi.Request) -> fastapi.Response:
        """GET /view/<token>[?bg=RRGGBB&fit=contain|cover]: the viewer page (web/static/view.html), not Gradio's; 404
        for a wrong or revoked token, 400 for a bad option. No login: the unguessable token is the permission to
        watch, and it grants nothing else."""
        if request.path_params["token"] not in self.shared:
            return PlainTextResponse(INVALID_LINK, status_code=404, headers=VIEW_HEADERS)
        bg, fit = request.query_params.get("bg", "000000"), request.query_params.get("fit", "contain")
        if not re.fullmatch(r"[0-9a-fA-F]{6}", bg):
            return PlainTextResponse(f"bg={bg[:20]!r}: expected six hex digits RRGGBB, e.g. ?bg=00ff00",
                                     status_code=400, headers=VIEW_HEADERS)
        if fit not in ("contain", "cover"):
            return PlainTextResponse(f"fit={fit[:20]!r}: expected contain or cover", status_code=400,
                                     headers=VIEW_HEADERS)
        config = json.dumps(dict(ice=mint(self.ice_servers), bg=f"#{bg}", fit=fit)).replace("<", "\\u003c")
        return HTMLResponse(VIEW_HTML.replace("__CONFIG__", config), headers=VIEW_HEADERS)

    async def view_offer(self, request: fastapi.Request) -> JSONResponse:
        """POST /view/<token>/offer {sdp, type}: answer a viewer's receive-only offer. 404 for a wrong or revoked
        token, 409 while the performer is not live (the page tries again), 429 beyond --max-viewers. A view offer
        reaches no page route: it can change nothing of the session. The front keeps the tokens: a link outlives its
        tab's move to another worker (409 until the tab is live there)."""
        token = request.path_params["token"]
        if token not in self.shared:
            return JSONResponse({"error": INVALID_LINK}, 404)
        try:
            body = await check_offer(request, view=True)
        except Refused as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)
        try:
            if (worker := self.placed.get(self.shared.get(token))) is None:  # moved or lost: not live until placed
                raise NotLive("the performer is not live")
            return JSONResponse(await worker.call("view_offer", token, body))
        except (UnknownView, WorkerLost):  # revoked meanwhile, or a worker that does not hold it (yet): not live
            if token not in self.shared:
                return JSONResponse({"error": INVALID_LINK}, 404)
            return JSONResponse({"error": "the performer is not live"}, status_code=409)
        except NotLive as e:
            return JSONResponse({"error": str(e)}, status_code=409)
        except ViewersFull as e:
            return JSONResponse({"error": str(e)}, status_code=429)
        except Exception as e:  # aiortc refused the offer: nothing was created
            log.info("view offer refused: %s: %s", type(e).__name__, e)
            return JSONResponse({"error": f"bad offer: {e}"}, status_code=400)

    async def stats(self, request: gr.Request) -> str:
        """The metrics line the page polls."""
        if self.gone(request):
            return gr.skip()
        page = self._page(request.session_hash)
        try:
            m = await self._ask(request.session_hash, "stats", unplaced=NOT_LIVE)
        except WorkerLost as e:
            return f"**Live:** ⚠️ {page.lost}: {LOST}." if page.lost else f"**Live:** ⚠️ {e}."
        if m["live"]:
            page.lost = None
        elif page.lost:
            return f"**Live:** ⚠️ {page.lost}: {LOST}."
        error = f" · ⚠️ {m['error']}" if m["error"] else ""
        if not m["live"]:
            if m["refused"]:
                return f"**Live:** {m['refused']}.{error}"
            return f"**Live:** not connected — start the camera (WebRTC) or the HTTP streaming webcam.{error}"
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
                f" · {size}{recording}{face}{viewers}{error}")

    async def healthz(self, request: fastapi.Request) -> JSONResponse:
        """GET /healthz: readiness and load for a load balancer, over every worker; 503 while full or while no
        worker answers. Under --auth, a request without the login learns only `ready` and `full`."""
        async def health(worker) -> dict:
            try:
                return dict(await worker.call("health", timeout=LOAD_TIMEOUT_S), worker=worker.name, alive=True)
            except Exception as e:  # dead, restarting or silent: it takes no session meanwhile
                return dict(worker=worker.name, alive=False, error=str(e))
        workers = await asyncio.gather(*(health(w) for w in self.workers))
        up = [h for h in workers if h["alive"]]
        admitting = [h for h in up if not h["draining"]]  # a draining worker takes no new session
        live, capacity = sum(h["live_sessions"] for h in up), sum(h["capacity"] for h in admitting)
        body = dict(ready=bool(admitting), full=sum(h["live_sessions"] for h in admitting) >= capacity)
        if not login_required(request) or await gradio_user(request) is not None:
            body.update(live_sessions=live, capacity=capacity, viewers=sum(h["viewers"] for h in up),
                        workers=workers)
        return JSONResponse(body, status_code=200 if body["ready"] and not body["full"] else 503)

    # ---- recording and rendering ----

    async def start_recording(self, request: gr.Request) -> str:
        if self.gone(request):
            return ""
        return await self._ask(request.session_hash, "start_recording", unplaced=RECORD_LIVE)

    async def stop_recording(self, key: str | None, request: gr.Request) -> tuple:
        """Every take not yet downloaded (a second Record keeps the first; so do Stop and the limit), copied into
        Gradio's cache for the page; `key`: the page's secret."""
        held = self.holds_secret(request, key)
        takes = await self._ask(request.session_hash, "stop_recording", unplaced=[]) if held else []
        if not takes:
            return gr.skip(), "Nothing recorded yet."
        paths = [await asyncio.to_thread(handed, name, data) for name, data in takes]  # each take, then its motion
        return paths, f"Saved {', '.join(Path(p).name for p in paths)}."

    async def render_video(self, driving: str | None, source_video: str | None, save_template: bool, eye: bool,
                           request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple:
        """Video-file tab: the page's portrait (or a source video) driven by an uploaded video (its frame rate and
        audio kept), image (one image) or motion template. Returns (video, image, template, status). The render runs
        on the tab's worker; its progress reaches the page as data, polled while the render runs."""
        none = (None, None, None)
        if not driving:
            return *none, "Upload a driving video, image or motion template (.pkl) first."
        if self.gone(request):
            return *none, ""
        for name, path in (("driving file", driving), ("source video", source_video)):
            if path and (size := Path(path).stat().st_size) > self.limits.render_max_mb * 2**20:
                return *none, (f"⚠️ The {name} is {size / 2**20:.1f} MB; this server renders at most "
                               f"{self.limits.render_max_mb:g} MB.")
        try:
            files = [await asyncio.to_thread(lambda p=p: (Path(p).name, Path(p).read_bytes())) if p else None
                     for p in (driving, source_video)]
            rendering = asyncio.ensure_future(self._call(request.session_hash, "render", *files, save_template, eye,
                                                         timeout=self.render_timeout()))
            try:
                while not rendering.done():  # then once more: the last step's progress
                    await asyncio.wait([rendering], timeout=PROGRESS_POLL_S)
                    with contextlib.suppress(Exception):  # no progress shown is no reason to fail a render
                        if step := await self._call(request.session_hash, "render_progress"):
                            progress(step[0], desc=step[1])
                out, info = await rendering
            finally:
                rendering.cancel()
        except (InputError, NoFaceError) as e:
            return *none, f"⚠️ {e}"
        if out is None:
            return *none, info
        path = await asyncio.to_thread(handed, *out)
        template = info["template"] and await asyncio.to_thread(handed, *info["template"])
        if info["fps"] is None:
            return None, path, template, f"One image, {info['size'][0]}×{info['size'][1]}."
        return (path, None, template, f"{info['frames']} frames at {info['fps']:g} fps"
                f"{', with audio' if info['audio'] else ''}{'; motion template saved' if template else ''}.")

    def render_timeout(self) -> float:
        """How long a render may take: the longest video at up to 60 fps, at twice the measured time per frame."""
        return CALL_TIMEOUT_S + self.limits.render_max_s * 60 * self.info["step_s"] * 2

    def speed_note(self) -> str:
        """What to expect, measured at start-up, said before anyone starts the camera."""
        step = self.info["step_s"]
        if step < 0.25:
            return f"Measured at start-up: {step * 1000:.0f} ms per frame for one live session."
        every = f"{step:.0f} s" if step >= 2 else f"{step:.1f} s"
        return (f"⏱ **This server animates about one frame every {every}** (measured at start-up on its "
                f"{self.info['device'].upper()}): the live view will update that slowly, not like a "
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
            gr.Markdown(f"{self.speed_note()}\n\n<small>Engine: {self.info['about']}</small>", elem_id="lp-speed")
            with gr.Row():
                with gr.Column(scale=2):
                    portrait = gr.Image(self.info["sample"], label="Portrait", interactive=False, height=280)
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
                                           codec=self.info["codec"])
                        with gr.Tab("Live (HTTP streaming)"):
                            gr.Markdown("Fallback transport: frames go through Gradio's HTTP streaming, so it works "
                                        "through share links without a TURN server (higher latency).")
                            gr.HTML('<div class="lp-note"></div>', elem_id="lp-http-note")  # live.js: fell back, or no camera
                            with gr.Row():
                                cam = gr.Image(sources=["webcam"], streaming=True, label="Webcam", elem_id="lp-http-cam")
                                view = gr.Image(label="Animated", format="jpeg", interactive=False, elem_id="lp-http-view")
                        with gr.Tab("Video file"):
                            with gr.Row():
                                driving = gr.File(label="Driving: a video (its frame rate and audio are kept), an "
                                                        "image (one image out) or a motion template (.pkl)",
                                                  file_types=["video", "image", ".pkl"], elem_id="lp-driving")
                                source_video = gr.Video(label="Source video (optional): animated instead of the "
                                                              "portrait, its own head motion kept",
                                                        sources=["upload"], elem_id="lp-source-video")
                            with gr.Row():
                                save_template = gr.Checkbox(label="Also save the driving video's motion as a "
                                                                  "template (.pkl)", elem_id="lp-save-template")
                                eye = gr.Checkbox(label="Source video: keep its first frame's eye opening",
                                                  elem_id="lp-source-eyes")
                            go = gr.Button("Render", variant="primary", elem_id="lp-render")
                            rendered = gr.Video(label="Result", interactive=False, elem_id="lp-rendered")
                            rendered_image = gr.Image(label="Result (image)", format="png", interactive=False,
                                                      elem_id="lp-rendered-image")
                            template = gr.File(label="Motion template", interactive=False, elem_id="lp-template")
                            render_status = gr.Markdown(elem_id="lp-render-status")
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
                        link = gr.Textbox(label="View-only link (OBS Browser Source: see docs/obs.md); a new one "
                                                "revokes it", interactive=False, buttons=["copy"],
                                          elem_id="lp-link", scale=4)
                    recording = gr.File(label="Recordings (MP4, and each take's motion as a template .pkl)",
                                        file_count="multiple", interactive=False)

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
            go.click(self.render_video, [driving, source_video, save_template, eye],
                     [rendered, rendered_image, template, render_status], concurrency_limit=self.max_renders,
                     concurrency_id="render")  # a bounded queue: the page shows its position
            share.click(self.share_output, [link, live], link,  # js: the page's address, and its secret
                        js="(link, page) => [document.baseURI, page]")
            record.click(self.start_recording, None, record_status)
            stop.click(self.stop_recording, live, [recording, record_status])
            gr.Timer(1.0).tick(self.stats, None, metrics, show_progress="hidden")
        return demo

    def launch(self, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
               auth: tuple[str, str] | None = None, block: bool = True,
               ssl: tuple[str | Path, str | Path] | None = None) -> gr.Blocks:
        """Serve the page, POST /offer and the view-only links on one server (a share link tunnels all); HTTPS
        with `ssl` = (certfile, keyfile)."""
        @contextlib.asynccontextmanager
        async def lifespan(_app):
            tasks = [asyncio.create_task(self._reap_forever()), asyncio.create_task(self._watch_forever())]
            yield
            for task in tasks:
                task.cancel()
            await asyncio.to_thread(self.close)

        self.auth = auth is not None
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


def handed(name: str, data: bytes) -> str:
    """The page's copy of a recording or render the worker handed over (its bytes): a file of its own in Gradio's
    cache, which Gradio serves and expires (delete_cache). The workers' work directories are never served."""
    folder = Path(get_upload_folder()) / secrets.token_hex(16)
    folder.mkdir(parents=True)
    path = folder / Path(name).name
    path.write_bytes(data)
    return str(path)


def _wait(coro: Awaitable[T]) -> T:
    """`coro`'s result, from sync code, on a loop of its own in a thread (the caller may run a loop already: a
    notebook's, a test browser's)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


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
    parser.add_argument("--turn-secret", default=os.environ.get("LP_TURN_SECRET"),
                        help="coturn's static-auth-secret (use-auth-secret): every page and peer gets TURN "
                             "credentials of its own that expire, instead of --turn-user/--turn-password "
                             "(default: $LP_TURN_SECRET); see docs/deploy.md")
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
    parser.add_argument("--work-dir", type=Path, default=default_work_dir(),
                        help="recordings and renders, kept across runs within --work-quota-mb and --work-max-age-h; "
                             "one server per directory (default: %(default)s)")
    parser.add_argument("--workers", type=positive(int), default=None,
                        help="cluster mode: N workers, each a Ray actor in a process of its own with one GPU where "
                             "there are GPUs (a private local Ray runtime unless --ray; docs/scale.md)")
    parser.add_argument("--ray", metavar="ADDRESS", default=None,
                        help="cluster mode on an existing Ray cluster (ADDRESS of its head, or 'auto'): a worker "
                             "per GPU it offers, or --workers of them")
    parser.add_argument("--drain-timeout", type=argument(seconds), default=None, metavar="SECONDS",
                        help="on SIGTERM, first drain: admit no new live session and wait this long at most for "
                             "the live ones to end (default: 0, shut down at once; keep it below the supervisor's "
                             "grace period, e.g. docker stop -t); with --drain, how long the worker's live "
                             "sessions may go on")
    parser.add_argument("--drain", metavar="WORKER", default=None,
                        help="with --ray, instead of serving: drain one worker of the front running on that "
                             "cluster (its name as /healthz gives it, e.g. worker-1): it takes no new session, its "
                             "live ones go on for --drain-timeout s at most, then it exits; waits until it has "
                             "(docs/scale.md)")
    add_limit_arguments(parser)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number of seconds") from None
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{text} must be 0 or more seconds")
    return value


def run(args: argparse.Namespace, on_start: Callable[[LiveApp], None] | None = None) -> int:
    """Load the engine (official weights, or the error saying how to get them), then serve until Ctrl-C.
    `on_start` sees the app before it serves (the load-test server logs its counts)."""
    if args.drain and not (args.ray and args.drain_timeout is not None):
        print("launch.py: error: --drain WORKER needs --ray ADDRESS (the running front's Ray cluster; 'auto' on one "
              "of its machines) and --drain-timeout SECONDS (how long its live sessions may go on)", file=sys.stderr)
        return 2
    if args.workers or args.ray:
        try:
            from web import cluster  # the one import of Ray, in cluster mode only
        except ImportError as e:
            print(f"launch.py: error: --workers/--ray need Ray ({e}): pip install -e '.[cluster]'", file=sys.stderr)
            return 2
        if args.drain:
            return cluster.drain(args.ray, args.drain, args.drain_timeout)
    try:
        ice_servers = (args.ice_servers or []) + turn_server(args.turn_url, args.turn_user, args.turn_password,
                                                             args.turn_secret)
        if args.https_self_signed and (args.ssl_certfile or args.ssl_keyfile):
            raise ValueError("--https-self-signed or --ssl-certfile/--ssl-keyfile, not both")
        if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
            raise ValueError("--ssl-certfile and --ssl-keyfile go together")
        for flag, path in (("--ssl-certfile", args.ssl_certfile), ("--ssl-keyfile", args.ssl_keyfile)):
            if path and not Path(path).is_file():
                raise ValueError(f"{flag} {path}: no such file")
        lock = claim(args.work_dir)  # this server's until it exits: another may not clean up our files
    except ValueError as e:
        print(f"launch.py: error: {e}", file=sys.stderr)
        return 2
    ssl = (args.ssl_certfile, args.ssl_keyfile) if args.ssl_certfile else None
    if args.https_self_signed:
        certfile, keyfile, cert, created = tls.self_signed(args.host)
        ssl = certfile, keyfile
        print(tls.advice(certfile, cert, args.host, args.port, created))
    config = WorkerConfig(weights=args.weights, config=args.config, device=args.device, compile=args.compile,
                          download=not args.no_download, face_model=args.face_model, warmup=True,
                          max_batch=args.max_batch, max_sessions=args.max_sessions, codec=args.codec,
                          stream_max=args.stream_max, max_viewers=args.max_viewers, ice_servers=ice_servers,
                          limits=Limits.from_args(args), workdir=str(args.work_dir))
    ray_cluster = None
    if args.workers or args.ray:
        try:
            ray_cluster = cluster.Cluster(config, args.workers, args.ray)
        except (ValueError, ConnectionError) as e:
            print(f"launch.py: error: {e}", file=sys.stderr)
            return 2
    try:
        app = LiveApp(config, untrained=str(args.weights) == "recipe", max_renders=args.max_renders,
                      workers=ray_cluster.workers if ray_cluster else None)
        if on_start:
            on_start(app)

        def terminate(*_) -> None:  # `docker stop` / systemd: drain, then shut down like Ctrl-C
            signal.signal(signal.SIGTERM, signal.default_int_handler)  # a second SIGTERM: at once
            if args.drain_timeout:
                log.info("SIGTERM: draining for at most %g s", args.drain_timeout)
                _wait(app.drain([w for w in app.workers if w not in app.draining], args.drain_timeout))
            raise KeyboardInterrupt
        signal.signal(signal.SIGTERM, terminate)
        try:
            app.launch(args.host, args.port, args.share, args.auth, ssl=ssl)
        finally:
            app.close()  # recordings finalised
    finally:
        if ray_cluster:
            ray_cluster.shutdown()
        lock.close()  # recordings finalised, then the work directory is free for the next server
    return 0
