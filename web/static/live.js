// WebRTC client of the live view: webcam -> RTCPeerConnection -> POST offer -> play the animated track.
// Runs as the gr.HTML component's js_on_load: `element` is the component, `props.value` the page's session id
// (set by the page's load event), `props.ice_servers` the server's --ice-servers.
// window.lpLive counts the decoded output frames and their size (shown on the page, read by the browser test).
const $ = (sel) => element.querySelector(sel);
const live = (window.lpLive = { frames: 0, width: 0, height: 0, state: "idle" });
let pc = null;
let pending = 0; // the requestVideoFrameCallback handle of the frame counter

function say(state) {
  live.state = state;
  $(".lp-state").textContent = `Transport: WebRTC (${state})`;
}

function count(video) {
  const tick = () => {
    live.frames++;
    [live.width, live.height] = [video.videoWidth, video.videoHeight];
    $(".lp-frames").textContent = `${live.frames} frames, ${live.width}×${live.height}`;
    pending = video.requestVideoFrameCallback(tick);
  };
  pending = video.requestVideoFrameCallback(tick);
}

function stop() {
  if (!pc) return;
  pc.getSenders().forEach((s) => s.track && s.track.stop());
  pc.close();
  pc = null;
  $("video").cancelVideoFrameCallback(pending);
  $("video").srcObject = null;
  say("stopped");
}

async function start() {
  stop();
  live.frames = 0;
  if (!props.value) throw new Error("the page is still loading, try again");
  say("opening the camera");
  const cam = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } } });
  pc = new RTCPeerConnection({ iceServers: props.ice_servers || [] });
  cam.getTracks().forEach((t) => pc.addTrack(t, cam));
  pc.ontrack = (e) => {
    const video = $("video");
    video.srcObject = new MediaStream([e.track]);
    count(video);
  };
  const own = pc;
  pc.onconnectionstatechange = () => pc === own && say(own.connectionState);
  await pc.setLocalDescription(await pc.createOffer());
  await new Promise((done) => {  // no trickle ICE: send the offer with every candidate in it
    if (pc.iceGatheringState === "complete") return done();
    pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && done());
  });
  say("connecting");
  const res = await fetch(new URL("offer", document.baseURI), {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ sdp: pc.localDescription.sdp, type: pc.localDescription.type, session: props.value }),
  });
  if (res.status === 503) throw new Error((await res.json()).error); // the server is full: its words, as they are
  if (!res.ok) throw new Error(`signalling failed: ${res.status} ${await res.text()}`);
  await pc.setRemoteDescription(await res.json());
}

element.addEventListener("click", (e) => {
  if (e.target.closest(".lp-start")) start().catch((err) => { stop(); say(`failed: ${err.message}`); });
  if (e.target.closest(".lp-stop")) stop();
});
