// WebRTC client of the live view: webcam -> RTCPeerConnection -> POST offer -> play the animated track; and the
// page's choice of transport: on a page that is not a secure context the camera is blocked, so both live tabs say
// how to fix it; when WebRTC fails, the page switches to the HTTP streaming tab and starts it. When the server's worker
// that held this tab's session was lost (cluster mode: it died or restarted), the server says why in the metrics line
// the page polls; the page shows it and connects again with the camera it has (the network is fine: no fallback).
// Runs as the gr.HTML component's js_on_load: `element` is the component, `props.value` the page's {session, secret,
// ice} as JSON (set by the page's load event; an offer must carry session and secret; ice: --ice-servers and
// --turn-url, with TURN credentials minted for this page). One start at a time: a newer click supersedes an older one still waiting for the camera or the server,
// and whatever the older one opened is closed.
// window.lpLive counts the decoded output frames and their size (shown on the page, read by the browser tests).
// Also here: the self-view (the local camera, mirrored, no server work), the "no face in view" overlay (from the
// metrics line the page polls), and picture-in-picture of the animated video.
const $ = (sel) => element.querySelector(sel);
const live = (window.lpLive = {
  frames: 0, width: 0, height: 0, state: "idle", route: "", transport: "WebRTC", fallback: "", firstFrameMs: 0,
  codec: "", // what the browser decodes, from its stats ("video/H264", "video/VP8")
  lost: "", reconnects: 0, // why the server lost this tab's worker, and how often the page connected again since Start
});
const GATHER_MS = 2000; // the longest wait for our ICE candidates: an unreachable STUN server must not stall the offer
const FIRST_FRAME_MS = 10000; // no frame this long after the answer, and no connection: use HTTP streaming
const ANSWER_MS = 15000; // the server gathers its own candidates (at most 5 s) before it answers
const LOST = "the server lost its worker"; // web/app.py's metrics line, then why, while this tab's worker is lost
const STALL_MS = 2000; // no frame this long while the server says the worker was lost: connect again
const RETRY_MS = [500, 1000, 2000]; // the waits between tries while the server has no room yet (503), then the last
const RETRIES = 30; // then the page gives up and says why
const HTTP_CAM = "#lp-http-cam"; // Gradio's streaming webcam in the HTTP tab; its buttons carry these titles
const GRANT = `${HTTP_CAM} [title="grant webcam access"] > button`;
const RECORD = (what) => `${HTTP_CAM} button:has([title="${what} recording"])`;
let pc = null;
let cam = null; // the camera stream of the current start (its tracks are stopped by stop())
let run = 0; // increases with every start and stop: an older start that resumes after an await gives up
let pending = 0; // the requestVideoFrameCallback handle of the frame counter
let watchdog = 0; // the first-frame timer
let clicked = 0; // performance.now() of the start click
let lastFrame = 0; // performance.now() of the current connection's latest frame (0: none yet)

function say(state) {
  live.state = state;
  $(".lp-state").textContent = `Transport: WebRTC (${state})${live.route ? ` · route: ${live.route}` : ""}`;
}

function count(video) {
  const tick = () => {
    if (!live.frames++) {
      live.firstFrameMs = Math.round(performance.now() - clicked);
      if (pc) showRoute(pc); // the codec shows in the stats once a frame is decoded
    }
    if (!lastFrame && live.lost) notice(`Reconnected after this: ${live.lost}`);
    lastFrame = performance.now();
    [live.width, live.height] = [video.videoWidth, video.videoHeight];
    $(".lp-frames").textContent =
      `${live.frames} frames, ${live.width}×${live.height}, the first ${(live.firstFrameMs / 1000).toFixed(1)} s after start`;
    pending = video.requestVideoFrameCallback(tick);
  };
  pending = video.requestVideoFrameCallback(tick);
}

function notice(text) {
  Object.assign($(".lp-notice"), { textContent: text, hidden: !text });
}

function stop(state = "stopped") {
  run++;
  if (cam) {
    cam.getTracks().forEach((t) => t.stop());
    cam = null;
    $(".lp-self").srcObject = null;
    showSelf();
  }
  hangUp(state);
}

function hangUp(state) {
  // the connection only: the camera stays for the next one
  clearTimeout(watchdog);
  if (pc) {
    pc.close();
    pc = null;
    $("video").cancelVideoFrameCallback(pending);
    $("video").srcObject = null;
  }
  live.route = "";
  say(state);
}

// ---- the HTTP streaming tab (Gradio's components, driven through their own buttons) ----

const tab = (name) => [...document.querySelectorAll("[role=tab]")].find((t) => t.textContent.includes(name));

async function waitFor(find, ms = 10000) {
  for (const end = Date.now() + ms; Date.now() < end; await new Promise((r) => setTimeout(r, 100))) {
    const found = find();
    if (found) return found;
  }
  throw new Error("the HTTP streaming webcam did not appear");
}

function httpNote(html) {
  // the placeholder exists once the HTTP tab has been shown
  const note = document.querySelector("#lp-http-note .lp-note");
  if (note) note.innerHTML = html ? `<div class="lp-notice">${html}</div>` : "";
}

async function startHttp() {
  tab("HTTP streaming").click();
  const button = await waitFor(() => document.querySelector(GRANT) || document.querySelector(RECORD("start")));
  if (button.matches(GRANT)) button.click();
  (await waitFor(() => document.querySelector(RECORD("start")))).click();
}

function stopHttp() {
  document.querySelector(RECORD("stop"))?.click();
}

async function fallBack(reason) {
  stop(`switched to HTTP streaming: ${reason}`);
  Object.assign(live, { transport: "HTTP streaming", fallback: reason });
  const why = `WebRTC did not work (${reason}), so the page switched to HTTP streaming (higher latency). ` +
    `A TURN server fixes WebRTC across strict NATs and firewalls: see docs/deploy.md.`;
  await startHttp();
  httpNote(`${why} <button class="lp-retry">Try WebRTC again</button>`);
}

// ---- WebRTC ----

function gathered(pc) {
  // the offer carries every candidate found within GATHER_MS (host candidates come at once)
  return new Promise((done) => {
    if (pc.iceGatheringState === "complete") return done();
    const timer = setTimeout(done, GATHER_MS);
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && (clearTimeout(timer), done()));
  });
}

function preferCodec(transceiver, codec) {
  // the server's --codec first where this browser has it (H.264: constrained baseline first), VP8 as the fall-back;
  // a browser without setCodecPreferences offers its defaults and the server's order decides
  if (!transceiver.setCodecPreferences || !RTCRtpReceiver.getCapabilities) return;
  const rank = (c) => {
    const name = c.mimeType.toLowerCase();
    if (name === "video/h264" && codec === "h264") return /profile-level-id=42e01f/.test(c.sdpFmtpLine || "") ? 0 : 1;
    if (name === "video/vp8") return 2;
    return ["video/rtx", "video/red", "video/ulpfec"].includes(name) ? 3 : -1;
  };
  const codecs = RTCRtpReceiver.getCapabilities("video").codecs.filter((c) => rank(c) >= 0);
  transceiver.setCodecPreferences(codecs.sort((a, b) => rank(a) - rank(b)));
}

async function showRoute(own) {
  // which path ICE chose: host/srflx/prflx = direct, relay = through the TURN server; and the codec received
  const stats = await own.getStats();
  const inbound = [...stats.values()].find((s) => s.type === "inbound-rtp" && s.kind === "video" && s.codecId);
  if (inbound && own === pc) live.codec = stats.get(inbound.codecId)?.mimeType || "";
  const transport = [...stats.values()].find((s) => s.type === "transport" && s.selectedCandidatePairId);
  const pair = transport && stats.get(transport.selectedCandidatePairId);
  const local = pair && stats.get(pair.localCandidateId);
  if (local && own === pc) {
    live.route = local.candidateType === "relay" ? "relay (TURN)" : `direct (${local.candidateType})`;
    say(live.state);
  }
}

async function start() {
  clicked = performance.now();
  stop();
  stopHttp();
  httpNote("");
  notice("");
  Object.assign(live, { frames: 0, transport: "WebRTC", fallback: "", firstFrameMs: 0, lost: "", reconnects: 0 });
  if (!props.value) throw new Error("the page is still loading, try again");
  const mine = run;
  say("opening the camera");
  const stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } } });
  if (mine !== run) {
    // Start or Stop was clicked again meanwhile: this camera is not wanted
    stream.getTracks().forEach((t) => t.stop());
    return;
  }
  cam = stream;
  $(".lp-self").srcObject = stream;
  showSelf();
  await connect(stream);
}

function lostWorker() {
  // why the server lost this tab's worker, while its metrics line (web/app.py LiveApp.stats) says so; else ""
  const text = document.querySelector("#lp-metrics")?.textContent || "";
  return text.includes(LOST) ? text.slice(text.indexOf(LOST)).trim() : "";
}

async function reconnect(why) {
  // the tab's worker was lost: a new connection with the camera this page has, tried again while the server answers
  // 503 (no worker has room yet: the lost one is restarting); a newer start, Stop or reconnect ends the tries
  const mine = ++run;
  Object.assign(live, { lost: why, reconnects: live.reconnects + 1 });
  notice(why);
  for (let tries = 1; ; tries++) {
    hangUp(`reconnecting: ${why}`);
    try {
      return await connect(cam);
    } catch (err) {
      if (mine !== run) return;
      if (err.status !== 503 || tries >= RETRIES) throw err;
      say(`reconnecting (try ${tries + 1}): ${err.message}`);
      await new Promise((r) => setTimeout(r, RETRY_MS[Math.min(tries, RETRY_MS.length) - 1]));
      if (mine !== run) return;
    }
  }
}

async function connect(stream) {
  // a new RTCPeerConnection for `stream`, its offer answered; the connection replaces the tab's live one
  const { ice, ...page } = JSON.parse(props.value); // ice: the ICE servers, TURN credentials minted for this page
  pc = new RTCPeerConnection({ iceServers: ice || [] });
  lastFrame = 0;
  const own = pc;
  stream.getTracks().forEach((t) => own.addTrack(t, stream));
  own.getTransceivers().forEach((t) => t.sender.track?.kind === "video" && preferCodec(t, props.codec));
  own.ontrack = (e) => {
    const video = $("video");
    video.srcObject = new MediaStream([e.track]);
    count(video);
  };
  own.onconnectionstatechange = () => {
    if (own !== pc) return;
    say(own.connectionState);
    if (own.connectionState === "connected") showRoute(own);
    if (own.connectionState === "failed") {
      const why = lostWorker(); // the server's worker died, not the network: connect again, no fallback
      (why ? reconnect(why) : fallBack("the connection failed: no network path to the server")).catch(fail);
    }
  };
  await own.setLocalDescription(await own.createOffer());
  await gathered(own);
  if (own !== pc) return;
  say("connecting");
  const res = await fetch(new URL("offer", document.baseURI), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: own.localDescription.sdp, type: own.localDescription.type, ...page }),
    signal: AbortSignal.timeout(ANSWER_MS),
  });
  // the server answered but refused (unknown tab, bad offer, full, ...): its reason, and no fallback
  if (!res.ok) {
    const error = ((await res.json().catch(() => null)) || {}).error || `signalling failed: ${res.status}`;
    throw Object.assign(new Error(error), { status: res.status });
  }
  const answer = await res.json();
  if (own !== pc) return;
  await own.setRemoteDescription(answer);
  watchdog = setTimeout(() => {
    // (connected without a frame yet means a slow engine, which HTTP streaming would not cure)
    if (own !== pc || lastFrame) return;
    const why = lostWorker();
    if (why) reconnect(why).catch(fail);
    else if (own.connectionState !== "connected")
      fallBack(`no video within ${FIRST_FRAME_MS / 1000} s: no network path found, connection ${own.connectionState}`).catch(fail);
  }, FIRST_FRAME_MS);
}

setInterval(() => {
  // frames stopped and the server says the worker was lost (it tells the page before the connection itself fails)
  const why = pc && lastFrame && performance.now() - lastFrame > STALL_MS && lostWorker();
  if (why) reconnect(why).catch(fail);
}, 500);

function fail(err) {
  stop(`failed: ${err.name === "TimeoutError" ? `no answer from the server within ${ANSWER_MS / 1000} s` : err.message}`);
}

// ---- a page that is not a secure context: no camera at all, so say how to get one ----

function insecureNotice() {
  const { hostname, port, protocol } = location;
  const p = port || (protocol === "https:" ? "443" : "80");
  const code = (text) => `<code>${text}</code>`;
  return `<b>The camera is blocked on this page.</b> Browsers give the webcam only to pages served over HTTPS or ` +
    `from localhost, and this page is ${code(location.origin)}. Any one of these fixes it:<ol>` +
    `<li>HTTPS: restart the server with ${code("--https-self-signed")} added (or ${code("--ssl-certfile CERT.pem --ssl-keyfile KEY.pem")} ` +
    `for your own certificate), then open ${code(`https://${hostname}:${p}`)}.</li>` +
    `<li>An SSH tunnel from this computer: ${code(`ssh -N -L ${p}:localhost:${p} ${hostname}`)}, then open ` +
    `${code(`http://localhost:${p}`)}.</li>` +
    `<li>A share link: restart the server with ${code("--share")} and open the https link it prints.</li></ol>`;
}

function blockCamera() {
  // both tabs: the notice instead of a camera error, and no start control that cannot work
  const notice = insecureNotice();
  Object.assign($(".lp-notice"), { innerHTML: notice, hidden: false });
  $(".lp-start").disabled = true;
  say("camera blocked: not a secure context");
  const guard = () => {
    const note = document.querySelector("#lp-http-note .lp-note");
    if (note && !note.firstChild) httpNote(notice);
    document.querySelectorAll(`${HTTP_CAM} button`).forEach((b) => (b.disabled = true));
  };
  new MutationObserver(guard).observe(document.body, { childList: true, subtree: true });
  guard();
}

// ---- self-view, "no face in view", picture-in-picture ----

let selfView = true; // shown while the camera runs, unless hidden with its toggle

function showSelf() {
  $(".lp-self").hidden = !(selfView && cam);
  $(".lp-self-toggle").textContent = selfView ? "Hide self-view" : "Show self-view";
  $(".lp-self-toggle").setAttribute("aria-pressed", String(selfView));
}

function noFace() {
  // the server's tracker found no face for a second: web/app.py LiveApp.stats says so in the metrics line
  const metrics = document.querySelector("#lp-metrics");
  $(".lp-noface").hidden = !(pc && metrics && metrics.textContent.includes("no face in view"));
}

new MutationObserver(noFace).observe(document.body, { childList: true, subtree: true, characterData: true });
element.addEventListener("click", (e) => {
  if (e.target.closest(".lp-self-toggle")) (selfView = !selfView), showSelf();
  if (e.target.closest(".lp-pip"))
    $("video").requestPictureInPicture().catch((err) => say(`picture-in-picture refused: ${err.message}`));
});

if (window.isSecureContext && navigator.mediaDevices) {
  element.addEventListener("click", (e) => {
    if (e.target.closest(".lp-start")) start().catch(fail);
    if (e.target.closest(".lp-stop")) stop();
  });
  document.addEventListener("click", (e) => {
    if (e.target.closest(".lp-retry")) {
      tab("WebRTC").click();
      start().catch(fail);
    }
  });
} else {
  blockCamera();
}
