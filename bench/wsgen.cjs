// Closed-loop relay generator on Node's `ws` client, used only by
// `python -m bench --compare-generators` to check which generator costs least CPU per message.
// Same traffic as bench/loadgen.py's relay scenario: rooms of 4, pairs (0,1) and (2,3),
// OFFER/ANSWER with a 1000-byte SDP, one message in flight per pair.
// Prints JSON lines: {"event":"start"} when the measured window opens and
// {"event":"end", msgs, cpu_user, cpu_sys, seconds} when it closes.
"use strict";
// `ws` is installed by the bench command into bench/.node (see run.py).
const { WebSocket } = require(require("path").join(__dirname, ".node", "node_modules", "ws"));

const args = Object.fromEntries(
  process.argv.slice(2).map((a) => a.replace(/^--/, "").split("=")),
);
const port = Number(args.port);
const rooms = Number(args.rooms ?? 250);
const warmup = Number(args.warmup ?? 3);
const seconds = Number(args.seconds ?? 10);
const SDP = ("v=0 ".repeat(300)).slice(0, 1000);

function payload(kind, conn) {
  return {
    sdp: { type: kind, sdp: SDP }, type: "data", connectionId: conn, label: conn,
    reliable: true, serialization: "binary", metadata: null,
  };
}

let msgs = 0;
let running = true;
const opts = {
  perMessageDeflate: false,
  skipUTF8Validation: true,
  // A fixed masking key, as bench/loadgen.py uses (the server's work does not depend on it).
  generateMask: (mask) => { mask[0] = 0x12; mask[1] = 0x34; mask[2] = 0x56; mask[3] = 0x78; },
};

function open(id, room) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(
      `ws://127.0.0.1:${port}/peerjs?key=peerjs&id=${id}&token=room${room}&version=1.5.5`, opts);
    ws.once("error", reject);
    ws.once("message", (data) => {
      if (String(data).includes('"OPEN"')) resolve(ws); else reject(new Error(String(data)));
    });
  });
}

const heartbeat = JSON.stringify({ type: "HEARTBEAT" });
const all = [];
async function main() {
for (let r = 0; r < rooms; r++) {
  const ids = [0, 1, 2, 3].map((s) => `n0r${r}s${s}`);
  const socks = [];
  for (const id of ids) socks.push(await open(id, r));
  for (const [a, b] of [[0, 1], [2, 3]]) {
    const conn = `dc_${ids[a]}_${ids[b]}`;
    const offer = Buffer.from(JSON.stringify({ type: "OFFER", payload: payload("offer", conn), dst: ids[b] }));
    const answer = Buffer.from(JSON.stringify({ type: "ANSWER", payload: payload("answer", conn), dst: ids[a] }));
    const A = socks[a], B = socks[b];
    B.on("message", (d) => { msgs++; B.send(answer); });
    A.on("message", (d) => { msgs++; if (running) A.send(offer); });
    all.push([A, offer]);
  }
  for (const s of socks) setInterval(() => s.send(heartbeat), 5000);
}
for (const [A, offer] of all) A.send(offer);
}
main().then(() => setTimeout(() => {
  const c0 = process.cpuUsage();
  const m0 = msgs;
  const t0 = process.hrtime.bigint();
  console.log(JSON.stringify({ event: "start", pairs: all.length }));
  setTimeout(() => {
    const c1 = process.cpuUsage(c0);
    const dt = Number(process.hrtime.bigint() - t0) / 1e9;
    console.log(JSON.stringify({
      event: "end", msgs: msgs - m0, cpu_user: c1.user / 1e6, cpu_sys: c1.system / 1e6, seconds: dt,
    }));
    running = false;
    setTimeout(() => process.exit(0), 300);
  }, seconds * 1000);
}, warmup * 1000), (e) => { console.error(e); process.exit(1); });
