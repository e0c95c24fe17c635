// flashdreams web client: one WebSocket, JSON control messages out, JPEG frames in.
// Frame message: 36-byte little-endian header (see flashdreams/serve/protocol.py) + JPEG.
"use strict";

const HEADER_BYTES = 36;
const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const ctx = canvas.getContext("2d");

// Read by the browser test; also handy in the devtools console.
const stats = (window.flashdreams = {
  state: "connecting", framesReceived: 0, framesDrawn: 0, lastStep: -1, promptVersion: 0,
  dropped: 0, stepMs: null, fps: 0, hello: null, errors: [], lastControl: null, lastState: null,
});

let ws = null;
let fps = 16;
let running = false;
let paused = false;
let playQueue = []; // decoded frames waiting for their display time
let decodeChain = Promise.resolve(); // keeps decoded frames in arrival order
let nextDue = 0;
let drawTimes = [];
const keysDown = new Set();

function log(text) {
  const el = $("log");
  el.textContent = (text + "\n" + el.textContent).slice(0, 4000);
}

function setState(state) {
  stats.state = state;
  $("state").textContent = state;
  $("switch").disabled = $("pause").disabled = $("stop").disabled = !running;
  $("pause").textContent = paused ? "Resume" : "Pause";
}

function send(msg) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  ws = new WebSocket(`${proto}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onopen = () => setState("connected");
  ws.onclose = () => { running = false; setState("disconnected"); };
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onJson(JSON.parse(ev.data)) : onFrame(ev.data));
}

function onJson(msg) {
  switch (msg.type) {
    case "hello":
      stats.hello = msg;
      fps = msg.fps;
      liveControl = msg.control ?? null; // the keys and mouse the recipe's control takes
      canvas.width = msg.width;
      canvas.height = msg.height;
      $("recipe").textContent = `${msg.run_name} · ${msg.width}×${msg.height} @ ${msg.fps} fps`;
      if (!$("prompt").value) $("prompt").value = msg.prompt;
      break;
    case "started":
      running = true; paused = false; playQueue = []; nextDue = 0;
      setState("streaming");
      log(`started: seed ${msg.seed}, ${msg.total_blocks ?? "endless"} blocks`);
      break;
    case "step":
      stats.lastControl = msg.control;
      stats.lastState = msg.state ?? null; // camera recipes: the pose the keys led to
      if (msg.state && msg.state.position) {
        const p = msg.state.position.map((v) => v.toFixed(1)).join(", ");
        $("camera").textContent = `(${p}) yaw ${msg.state.yaw_deg.toFixed(0)}° pitch ${msg.state.pitch_deg.toFixed(0)}°`;
      }
      if (msg.recache_ms > 0) log(`step ${msg.step}: prompt v${msg.prompt_version} (recache ${msg.recache_ms.toFixed(1)} ms)`);
      break;
    case "prompt": log(`prompt queued: ${msg.text}`); break;
    case "paused": paused = true; setState("paused"); break;
    case "resumed": paused = false; setState("streaming"); break;
    case "stopped":
      running = false; paused = false;
      setState(`stopped (${msg.reason})`);
      log(`stopped: ${msg.reason}, ${msg.steps} steps, ${msg.frames} frames, ${msg.dropped} dropped`);
      break;
    case "error":
      stats.errors.push(msg);
      log(`error [${msg.code}]: ${msg.message}`);
      if (msg.code === "busy") setState("busy");
      break;
  }
}

function onFrame(buf) {
  const view = new DataView(buf);
  const step = view.getUint32(4, true);
  const batchIndex = view.getUint16(16, true);
  if (batchIndex !== 0) return; // the page shows the first video of a batch
  const stepMs = view.getFloat32(20, true);
  stats.dropped = view.getUint32(28, true);
  const version = view.getUint32(32, true);
  stats.framesReceived += 1;
  const blob = new Blob([new Uint8Array(buf, HEADER_BYTES)], { type: "image/jpeg" });
  decodeChain = decodeChain
    .then(() => createImageBitmap(blob))
    .then((bitmap) => playQueue.push({ bitmap, step, stepMs, version }))
    .catch((err) => log(`decode error: ${err}`));
}

function draw(now) {
  if (playQueue.length > 0 && now >= nextDue) {
    // Stay live: if more than a second of video is waiting, skip to the newest part.
    while (playQueue.length > Math.max(fps, 1)) playQueue.shift().bitmap.close();
    const f = playQueue.shift();
    ctx.drawImage(f.bitmap, 0, 0, canvas.width, canvas.height);
    f.bitmap.close();
    nextDue = Math.max(nextDue + 1000 / fps, now - 1000 / fps);
    stats.framesDrawn += 1;
    stats.lastStep = f.step;
    stats.promptVersion = f.version;
    stats.stepMs = f.stepMs;
    drawTimes.push(now);
  }
  while (drawTimes.length && drawTimes[0] < now - 1000) drawTimes.shift();
  stats.fps = drawTimes.length;
  $("fps").textContent = stats.fps.toFixed(1);
  $("latency").textContent = stats.stepMs === null ? "-" : stats.stepMs.toFixed(1);
  $("step").textContent = stats.lastStep < 0 ? "-" : stats.lastStep;
  $("frames").textContent = stats.framesDrawn;
  $("dropped").textContent = stats.dropped;
  $("version").textContent = stats.promptVersion;
  requestAnimationFrame(draw);
}

// ---------------------------------------------------------------- buttons
$("start").onclick = () => {
  const blocks = $("blocks").value;
  send({
    type: "start", prompt: $("prompt").value, seed: Number($("seed").value || 0),
    total_blocks: blocks ? Number(blocks) : null,
  });
  canvas.focus();
};
$("switch").onclick = () => send({ type: "prompt", text: $("prompt").value });
$("pause").onclick = () => send({ type: paused ? "resume" : "pause" });
$("stop").onclick = () => send({ type: "stop" });
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
    ev.preventDefault();
    (running ? $("switch") : $("start")).click();
  }
});

// ---------------------------------------------------------------- keyboard and mouse controls
// Camera recipes (LingBot-World): W/S forward/back, A/D yaw, Q/E strafe, I/K pitch.
// Matrix-Game: W/A/S/D (+ I/J/K/L or arrows to look, space, Z/C turn in Temple Run) and, once
// the canvas holds the pointer (click it; Esc releases), mouse movement as `mouse: [dx, dy]`
// per video frame; the recipe's control uses the keys and axes its variant has. Units: the page
// measures pointer-lock pixels per video frame and sends pixels x hello.control.mouse_per_px
// (Matrix-Game: camera units, 0.1 = one camera step = mouse_pixels_per_step px; the server
// clamps each frame's delta to hello.control.mouse_max); without mouse_per_px: pixels (pose).
const CONTROL_KEYS = new Set(["w", "a", "s", "d", "q", "e", "i", "j", "k", "l", "z", "c", " ",
  "shift", "arrowup", "arrowdown", "arrowleft", "arrowright"]);
let mouseAcc = [0, 0];
let mouseMoving = false;
// from hello: {keys: [...], mouse: bool, mouse_per_px?, mouse_max?}; null sends every key held
let liveControl = null;

function sendControl() {
  if (!running) return;
  let keys = [...keysDown].sort();
  if (liveControl) keys = keys.filter((k) => liveControl.keys.includes(k));
  const msg = { type: "control", keys };
  if (document.pointerLockElement === canvas && (!liveControl || liveControl.mouse)) {
    const frames = Math.max(fps, 1) * 0.1; // video frames in one 100 ms tick
    const perPx = liveControl?.mouse_per_px ?? 1; // protocol units per pointer pixel
    const max = liveControl?.mouse_max ?? Infinity; // the server clamps to it as well
    const axis = (px) => Math.max(-max, Math.min(max, (px / frames) * perPx));
    msg.mouse = [axis(mouseAcc[0]), axis(mouseAcc[1])];
  }
  send(msg);
}

function onKey(ev, down) {
  const key = ev.key.toLowerCase();
  if (!CONTROL_KEYS.has(key)) return;
  ev.preventDefault();
  const had = keysDown.has(key);
  if (down) keysDown.add(key); else keysDown.delete(key);
  if (had === down) return; // auto-repeat
  const keys = [...keysDown].sort();
  $("keys").textContent = keys.length ? keys.join("+") : "-";
  sendControl();
}
canvas.addEventListener("keydown", (ev) => onKey(ev, true));
canvas.addEventListener("keyup", (ev) => onKey(ev, false));
canvas.addEventListener("blur", () => { keysDown.clear(); if (running) send({ type: "control", keys: [] }); });
canvas.addEventListener("click", () => { if (canvas.requestPointerLock) canvas.requestPointerLock(); });
canvas.addEventListener("mousemove", (ev) => {
  if (document.pointerLockElement !== canvas) return;
  mouseAcc[0] += ev.movementX;
  mouseAcc[1] += ev.movementY;
});
setInterval(() => { // mouse movement leaves as one control message per 100 ms tick
  const moved = mouseAcc[0] !== 0 || mouseAcc[1] !== 0;
  if (moved || mouseMoving) sendControl(); // one more with [0, 0] when it stops
  mouseMoving = moved;
  mouseAcc = [0, 0];
}, 100);

setState("connecting");
connect();
requestAnimationFrame(draw);
