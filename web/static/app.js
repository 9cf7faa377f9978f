// flowact live: one WebRTC session with the edge (WHIP/WHEP-style signaling, see the README).
// No build step, no dependencies. window.flowact exposes the session's numbers (the tests read them).
"use strict";

const $ = (id) => document.getElementById(id);
const ui = { video: $("video"), status: $("status") };
let session = null; // {pc, url, channel, local, audioCtx, timer, t0, ttff}
let imageId = null;
// an edge started with --token-file: open the page as /#token=TOKEN (the fragment never leaves the browser)
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const auth = token ? { Authorization: `Bearer ${token}` } : {};
window.flowact = { state: "idle", ttffMs: null, fps: null, width: null, height: null, edge: {}, error: null };

function say(text, isError = false) {
  ui.status.textContent = text;
  ui.status.className = isError ? "error" : "";
  if (isError) window.flowact.error = text;
}

function show(id, value) { $(id).textContent = value == null ? "-" : value; }

$("file").onchange = async () => {
  const file = $("file").files[0];
  if (!file) return;
  const resp = await fetch("/v1/images", { method: "POST", headers: { ...auth, "Content-Type": file.type || "application/octet-stream" }, body: file });
  if (resp.status !== 201) { say(`upload refused (${resp.status}): ${await resp.text()}`, true); return; }
  imageId = (await resp.json()).id;
  $("ref").src = `/v1/images/${imageId}`;
  $("ref-uploaded").disabled = false;
  $("ref-uploaded").checked = true;
  say("image uploaded");
};

async function speechTrack(source) {
  if (source === "mic") {
    const stream = await navigator.mediaDevices.getUserMedia(
      { audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
    return { track: stream.getAudioTracks()[0], audioCtx: null };
  }
  const audioCtx = new AudioContext();
  const data = await (await fetch("/samples/speech.wav")).arrayBuffer();
  const player = audioCtx.createBufferSource();
  player.buffer = await audioCtx.decodeAudioData(data);
  player.loop = true;
  const out = audioCtx.createMediaStreamDestination();
  player.connect(out); // not to the speakers: the avatar speaks it back
  player.start();
  return { track: out.stream.getAudioTracks()[0], audioCtx };
}

function gathered(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    pc.addEventListener("icegatheringstatechange", () => { if (pc.iceGatheringState === "complete") resolve(); });
    setTimeout(resolve, 3000); // no STUN here: host candidates come at once
  });
}

async function start() {
  $("start").disabled = true;
  window.flowact.error = null;
  const source = document.querySelector("input[name=source]:checked").value;
  try {
    const { track, audioCtx } = await speechTrack(source);
    const pc = new RTCPeerConnection();
    session = { pc, audioCtx, local: track, url: null, channel: null, timer: null, t0: 0, ttff: null };
    pc.addTransceiver(track, { direction: "sendrecv" });
    pc.addTransceiver("video", { direction: "recvonly" });
    const channel = pc.createDataChannel("control");
    session.channel = channel;
    channel.onmessage = (e) => onEdgeMessage(JSON.parse(e.data));
    const remote = new MediaStream();
    pc.ontrack = (e) => { remote.addTrack(e.track); ui.video.srcObject = remote; };
    pc.onconnectionstatechange = () => {
      setState(pc.connectionState);
      if (pc.connectionState === "failed") stop("connection failed");
    };
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc);
    const ref = document.querySelector("input[name=ref]:checked").value;
    const query = ref === "uploaded" && imageId ? `?image=${encodeURIComponent(imageId)}` : "";
    session.t0 = performance.now();
    const resp = await fetch(`/v1/sessions${query}`, { method: "POST", headers: { ...auth, "Content-Type": "application/sdp" }, body: pc.localDescription.sdp });
    if (resp.status !== 201) throw new Error(`the edge refused the session (${resp.status}): ${await resp.text()}`);
    session.url = resp.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: await resp.text() });
    watchFirstFrame(session);
    session.timer = setInterval(updateStats, 1000);
    $("stop").disabled = false;
    for (const id of ["behaviour", "prompt", "send-prompt"]) $(id).disabled = false;
    say(`session ${session.url}`);
  } catch (e) {
    say(String(e.message || e), true);
    await stop();
  }
}

function watchFirstFrame(s) {
  const first = () => {
    if (s.ttff != null) return;
    s.ttff = performance.now() - s.t0;
    window.flowact.ttffMs = Math.round(s.ttff);
    show("s-ttff", `${Math.round(s.ttff)} ms`);
  };
  if (ui.video.requestVideoFrameCallback) ui.video.requestVideoFrameCallback(first);
  else ui.video.addEventListener("loadeddata", first, { once: true });
}

function setState(state) { window.flowact.state = state; show("s-state", state); }

function onEdgeMessage(msg) {
  if (msg.type === "error") { say(`edge: ${msg.message}`, true); return; }
  if (msg.type === "session") window.flowact.sessionId = msg.number;
  if (msg.type === "failover") say(`the avatar moved to another server (${msg.cause}; ${msg.gap_ms} ms gap)`);
  if (msg.type === "behaviour") show("s-mode", msg.mode);
  if (msg.type === "stats") {
    window.flowact.edge = msg;
    show("s-mouth", msg.mouth_latency_p50_ms == null ? null : `${msg.mouth_latency_p50_ms} ms`);
    show("s-delay", msg.audio_delay_ms == null ? null : `${msg.audio_delay_ms} ms`);
    show("s-late", `${msg.frames_late} of ${msg.frames_sent}`);
    show("s-mode", msg.mode);
  }
}

async function updateStats() {
  if (!session) return;
  const report = await session.pc.getStats();
  const f = window.flowact;
  report.forEach((s) => {
    if (s.type !== "inbound-rtp") return;
    if (s.kind === "video") {
      Object.assign(f, { fps: s.framesPerSecond ?? null, framesDecoded: s.framesDecoded, width: s.frameWidth,
                         height: s.frameHeight, videoPlayoutNtp: s.estimatedPlayoutTimestamp });
      if (s.jitterBufferEmittedCount) f.videoPlayoutMs = Math.round(1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount);
    } else if (s.kind === "audio") {
      Object.assign(f, { audioSamples: s.totalSamplesReceived, audioLevel: s.audioLevel,
                         audioPlayoutNtp: s.estimatedPlayoutTimestamp });
      if (s.jitterBufferEmittedCount) f.audioPlayoutMs = Math.round(1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount);
    }
  });
  show("s-fps", f.fps == null ? null : f.fps.toFixed(1));
  show("s-size", f.width ? `${f.width}x${f.height}` : null);
  show("s-playout", f.videoPlayoutMs == null ? null : `video ${f.videoPlayoutMs} ms, audio ${f.audioPlayoutMs ?? "-"} ms`);
  f.at = performance.now();
  return f;
}
window.flowactStats = updateStats; // fresh numbers now (the tests call it)

// the last frame shown, as numbers: its size and the spread of its pixel values (a blank frame has none)
window.flowactFrame = () => {
  const v = ui.video, c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  if (!c.width) return { width: 0, height: 0, std: 0 };
  const ctx = c.getContext("2d");
  ctx.drawImage(v, 0, 0);
  const px = ctx.getImageData(0, 0, c.width, c.height).data;
  let sum = 0, sq = 0, n = 0;
  for (let i = 0; i < px.length; i += 4) for (let j = 0; j < 3; j++) { sum += px[i + j]; sq += px[i + j] ** 2; n++; }
  const mean = sum / n;
  return { width: c.width, height: c.height, mean, std: Math.sqrt(sq / n - mean * mean) };
};

function control(message) {
  if (session && session.channel && session.channel.readyState === "open") session.channel.send(JSON.stringify(message));
}

$("behaviour").onchange = () => control({ behaviour: $("behaviour").value });
$("send-prompt").onclick = () => control({ prompt: $("prompt").value });

async function stop(reason) {
  const s = session;
  session = null;
  if (!s) return;
  clearInterval(s.timer);
  if (s.url) await fetch(s.url, { method: "DELETE" }).catch(() => {});
  s.pc.close();
  if (s.local) s.local.stop();
  if (s.audioCtx) s.audioCtx.close();
  ui.video.srcObject = null;
  setState("stopped");
  $("start").disabled = false;
  $("stop").disabled = true;
  for (const id of ["behaviour", "prompt", "send-prompt"]) $(id).disabled = true;
  if (typeof reason === "string") say(reason, true);
}

$("start").onclick = start;
$("stop").onclick = () => stop();
// closing the tab ends the session at once (the edge also notices the peer connection closing)
window.addEventListener("pagehide", () => { if (session && session.url) fetch(session.url, { method: "DELETE", keepalive: true }); });
