// Test driver around one stock PeerJS Peer per page. Python calls window.T.* through
// page.evaluate. Every wait has a timeout and fails with the recent events, so nothing hangs.
"use strict";
(() => {
  const events = []; // {t: Date.now(), kind, ...detail}; Date.now() so pages can be compared
  const conns = new Map(); // remote id -> newest DataConnection with that peer
  const inbox = new Map(); // remote id -> data received from that peer
  const calls = []; // MediaConnections in both directions
  let peer = null;
  let localStream = null;
  // PeerJS's MsgPack serializer, an ES module of the npm bundle: a page opened from a file
  // cannot import modules, and has none (null).
  window.MsgPack = undefined;
  import("./serializer.msgpack.mjs").then((m) => (window.MsgPack = m.MsgPack),
    () => (window.MsgPack = null));

  const record = (kind, detail = {}) => {
    const entry = { t: Date.now(), kind, ...detail };
    events.push(entry);
    console.log(`[T] ${JSON.stringify(entry)}`);
    const log = document.getElementById("log");
    if (log) log.textContent = events.slice(-40).map((e) => JSON.stringify(e)).join("\n");
  };

  const waitFor = (what, ms, check) =>
    new Promise((resolve, reject) => {
      const deadline = Date.now() + ms;
      const tick = () => {
        let value;
        try {
          value = check();
        } catch (err) {
          reject(err);
          return;
        }
        if (value !== undefined && value !== null && value !== false) resolve(value);
        else if (Date.now() > deadline)
          reject(new Error(`timeout after ${ms} ms waiting for ${what}; ` +
            `recent events: ${JSON.stringify(events.slice(-12))}`));
        else setTimeout(tick, 10);
      };
      tick();
    });

  const errorDetail = (err) => ({ type: err.type ?? null, message: String(err.message ?? err) });

  const watchConn = (conn, direction) => {
    const info = { peer: conn.peer, connectionId: conn.connectionId, direction };
    conns.set(conn.peer, conn);
    if (!inbox.has(conn.peer)) inbox.set(conn.peer, []);
    record("conn", info);
    conn.on("open", () => record("conn-open", info));
    conn.on("data", (data) => {
      inbox.get(conn.peer).push(data);
      record("data", { ...info, data });
    });
    conn.on("close", () => record("conn-close", info));
    conn.on("error", (err) => record("conn-error", { ...info, ...errorDetail(err) }));
  };

  const media = async () => {
    localStream ??= await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
    return localStream;
  };

  const watchCall = (call, direction) => {
    const info = { peer: call.peer, connectionId: call.connectionId, direction };
    calls.push(call);
    record("call", info);
    call.on("stream", (stream) => {
      call.remoteStreamSeen = stream;
      record("stream", { ...info, tracks: stream.getTracks().map((t) => t.kind) });
    });
    call.on("close", () => record("call-close", info));
    call.on("error", (err) => record("call-error", { ...info, ...errorDetail(err) }));
  };

  // Resolves once the call's remote stream has live audio and video tracks and RTP for both
  // has actually arrived (bytes of audio, decoded frames of video).
  const mediaArrived = async (call, ms) => {
    const stream = await waitFor(`remote stream from ${call.peer}`, ms, () => call.remoteStreamSeen);
    const deadline = Date.now() + ms;
    for (;;) {
      const report = { tracks: stream.getTracks().map((t) => ({ kind: t.kind, state: t.readyState })),
        audioBytes: 0, videoFrames: 0 };
      (await call.peerConnection.getStats()).forEach((s) => {
        if (s.type !== "inbound-rtp") return;
        if (s.kind === "audio") report.audioBytes += s.bytesReceived ?? 0;
        if (s.kind === "video") report.videoFrames += s.framesDecoded ?? 0;
      });
      if ((report.audioBytes > 0 && report.videoFrames > 0) || Date.now() > deadline) return report;
      await new Promise((r) => setTimeout(r, 20));
    }
  };

  // App message types the tests use (peersig's --app-message-type).
  const APP_TYPES = new Set(["CHAT", "READY"]);

  // The value sets of PeerJS's own e2e serialization scenarios (written here afresh), and
  // what each serialization gives back for a value (from what PeerJS 1.5.5 does).
  const bytes = (n, seed) => Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 255);
  const same = (v) => v;
  const asBuffer = (v) => (v instanceof ArrayBuffer ? v
    : v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  const SETS = {
    numbers: { values: () => [0, 1, -1, 0.5, -3.25, 2 ** 31 - 1, -(2 ** 31), 123456789, 1.5e-300],
      as: { binary: same, json: same, MsgPack: same } },
    strings: { values: () => ["", "hi", "ünïcødé €", "😀 🎲 ♟", "line\nbreak", "x".repeat(1000)],
      as: { binary: same, json: same, MsgPack: same } },
    long_string: { values: () => ["peersig ".repeat(40000)],  // 320 KB: chunked
      as: { binary: same, MsgPack: same } },
    objects: { values: () => [{}, { a: 1, b: "two", c: [3, { d: null }], e: true }],
      as: { binary: same, json: same, MsgPack: same } },
    arrays: { values: () => [[], [1, "two", { three: 3 }, [4]], Array.from({ length: 50 }, (_, i) => i)],
      as: { binary: same, json: same, MsgPack: same } },
    dates: { values: () => [new Date(0), new Date(Date.UTC(2026, 11, 6, 12, 30))],
      as: { binary: (d) => d.toString(), json: (d) => d.toJSON(), MsgPack: same } },
    array_buffers: { values: () => [bytes(16, 1).buffer, bytes(5000, 3).buffer],
      as: { binary: same } },
    uint8_arrays: { values: () => [bytes(10, 5), bytes(3000, 9)],
      as: { binary: asBuffer, MsgPack: same } },
    int32_arrays: { values: () => [Int32Array.from([1, -2, 3, 2 ** 30])],
      as: { binary: asBuffer, MsgPack: (v) => new Uint8Array(asBuffer(v)) } },
    blobs: { values: () => [new Blob([JSON.stringify({ commit: "abc", n: 1 })])],
      as: { binary: () => new TextEncoder().encode(JSON.stringify({ commit: "abc", n: 1 })).buffer } },
  };

  const describe = (v) => {
    if (v instanceof ArrayBuffer) return `ArrayBuffer(${v.byteLength})`;
    if (ArrayBuffer.isView(v)) return `${v.constructor.name}(${v.length})`;
    if (v instanceof Date) return `Date(${v.toISOString()})`;
    const text = JSON.stringify(v);
    return text && text.length > 80 ? `${text.slice(0, 80)}...` : String(text);
  };

  const sameValue = (a, b) => {
    if (b instanceof ArrayBuffer) {
      return a instanceof ArrayBuffer && a.byteLength === b.byteLength &&
        new Uint8Array(a).every((x, i) => x === new Uint8Array(b)[i]);
    }
    if (ArrayBuffer.isView(b)) {
      return a?.constructor === b.constructor && a.length === b.length && a.every((x, i) => x === b[i]);
    }
    if (b instanceof Date) return a instanceof Date && a.getTime() === b.getTime();
    return JSON.stringify(a) === JSON.stringify(b) && typeof a === typeof b;
  };

  window.T = {
    start({ id, host, port, secure, path, key, token, config }) {
      config ??= { iceServers: [] };
      const serializers = window.MsgPack ? { MsgPack: window.MsgPack } : {};
      const options = { host, port, secure, path, key, token, config, serializers, debug: 1 };
      peer = id ? new Peer(id, options) : new Peer(options);
      // Observe (not alter) what the signaling server sends this peer.
      peer.socket.on("message", (m) => record("signal", {
        type: m.type, src: m.src ?? null,
        ...(m.type === "PEERS" ? { peers: m.payload.peers } : {}),
        ...(APP_TYPES.has(m.type) ? { payload: m.payload ?? null, dst: m.dst ?? null } : {}),
      }));
      peer.on("open", (pid) => {
        document.getElementById("title").textContent = `peer ${pid}`;
        record("open", { id: pid });
      });
      peer.on("error", (err) => record("error", errorDetail(err)));
      peer.on("disconnected", () => record("disconnected"));
      peer.on("close", () => record("close"));
      peer.on("connection", (conn) => watchConn(conn, "in"));
      peer.on("call", async (call) => {
        watchCall(call, "in");
        call.answer(await media());
      });
    },

    async waitOpen(ms) {
      const done = await waitFor("open or error", ms,
        () => events.find((e) => e.kind === "open" || e.kind === "error"));
      if (done.kind === "error") throw new Error(`peer failed to open: ${done.type}: ${done.message}`);
      return done.id;
    },

    // The page's own request for its RTCConfiguration (GET {path}{key}/ice), as an app
    // would make it before new Peer(id, {config}).
    async fetchIce(url) {
      const response = await fetch(url);
      const body = await response.json();
      if (!response.ok) throw new Error(`ice: ${response.status} ${JSON.stringify(body)}`);
      return body;
    },

    // The candidate types of the selected pair of every open peer connection.
    async selectedPairs() {
      const pairs = [];
      const pcs = [...conns.values(), ...calls].map((c) => c.peerConnection)
        .filter((pc) => pc && pc.connectionState !== "closed");
      for (const pc of pcs) {
        const stats = await pc.getStats();
        stats.forEach((s) => {
          if (s.type !== "transport" || !s.selectedCandidatePairId) return;
          const pair = stats.get(s.selectedCandidatePairId);
          pairs.push({ local: stats.get(pair.localCandidateId).candidateType,
            remote: stats.get(pair.remoteCandidateId).candidateType });
        });
      }
      return pairs;
    },

    waitError: (ms) => waitFor("a peer error", ms, () => events.find((e) => e.kind === "error")),

    waitSignal: (type, src, ms) => waitFor(`${type} from the server about ${src}`, ms,
      () => events.find((e) => e.kind === "signal" && e.type === type && e.src === src)),

    state: () => ({ id: peer.id, open: peer.open, disconnected: peer.disconnected,
      destroyed: peer.destroyed }),

    events: () => events,

    connect(remote, serialization) {
      watchConn(peer.connect(remote, { reliable: true, ...(serialization ? { serialization } : {}) }),
        "out");
    },

    // PeerJS's own e2e scenarios, data channel serialization: the values of `set` sent over
    // the newest connection with remote, as that serialization carries them.
    async sendSet(remote, set) {
      for (const value of SETS[set].values()) await conns.get(remote).send(value);
      return SETS[set].values().length;
    },

    // What arrived of `set` from remote, checked against what the serialization gives back:
    // a list of mismatches (empty when all arrived as they should).
    checkSet(remote, set, serialization) {
      const expected = SETS[set].values().map((v) => SETS[set].as[serialization](v));
      const got = inbox.get(remote) ?? [];
      const problems = [];
      if (got.length !== expected.length) problems.push(`got ${got.length} of ${expected.length}`);
      expected.forEach((want, i) => {
        if (i < got.length && !sameValue(got[i], want))
          problems.push(`#${i}: got ${describe(got[i])}, want ${describe(want)}`);
      });
      return problems;
    },

    // The stock client's way off the server that keeps its connections.
    disconnect() {
      record("disconnect-call");
      const t = Date.now();
      peer.disconnect();
      return t;
    },

    reconnectOnly() {
      record("reconnect-call");
      const t = Date.now();
      peer.reconnect();
      return t;
    },

    // Frames decoded and audio bytes received so far on the call with remote.
    async mediaCounters(remote) {
      const call = calls.find((c) => c.peer === remote && c.open !== false);
      const counters = { videoFrames: 0, audioBytes: 0, open: Boolean(call && call.open) };
      if (!call) return counters;
      (await call.peerConnection.getStats()).forEach((s) => {
        if (s.type !== "inbound-rtp") return;
        if (s.kind === "audio") counters.audioBytes += s.bytesReceived ?? 0;
        if (s.kind === "video") counters.videoFrames += s.framesDecoded ?? 0;
      });
      return counters;
    },

    // Date.now() at which the call with remote closed.
    waitCallClosed: (remote, ms) => waitFor(`the call with ${remote} to close`, ms,
      () => events.find((e) => e.kind === "call-close" && e.peer === remote)).then((e) => e.t),

    closeCall(remote) {
      calls.find((c) => c.peer === remote).close();
    },

    // PeerJS's own e2e "disconnected": connect() after disconnect() gives the error
    // "disconnected" (and the peer stays disconnected, not destroyed).
    connectWhileDisconnected(remote) {
      peer.connect(remote);
    },

    // A second Peer on this page asking for `id` (PeerJS's e2e "id-taken"): resolves with
    // the error type it got, or "open" if it got the id.
    tryId(id, options) {
      return new Promise((resolve) => {
        const other = new Peer(id, { ...options, config: { iceServers: [] }, debug: 0 });
        other.once("open", () => resolve("open"));
        other.once("error", (err) => { resolve(err.type); other.destroy(); });
      });
    },

    waitConnOpen: (remote, ms) =>
      waitFor(`data connection with ${remote} to open`, ms, () => conns.get(remote)?.open),

    // Time (Date.now()) at which the newest connection with remote closed.
    async waitConnClosed(remote, ms) {
      const id = conns.get(remote).connectionId;
      const closed = await waitFor(`data connection with ${remote} to close`, ms,
        () => events.find((e) => e.kind === "conn-close" && e.connectionId === id));
      return closed.t;
    },

    send(remote, data) {
      conns.get(remote).send(data);
    },

    waitData(remote, data, ms) {
      const want = JSON.stringify(data);
      return waitFor(`${want} from ${remote}`, ms,
        () => (inbox.get(remote) ?? []).some((d) => JSON.stringify(d) === want));
    },

    received: () => Object.fromEntries(inbox),

    clearInbox: () => inbox.clear(),

    // A frame of the app's own through the stock client's signaling socket, as an app sends
    // app messages (peersig's --app-message-type).
    sendFrame(frame) {
      peer.socket.send(frame);
    },

    closeConn(remote) {
      conns.get(remote).close();
    },

    connectionPeers: () => [...conns.keys()],

    async call(remote, ms) {
      const call = peer.call(remote, await media());
      watchCall(call, "out");
      return mediaArrived(call, ms);
    },

    async answeredCall(remote, ms) {
      const call = await waitFor(`a call from ${remote}`, ms,
        () => calls.find((c) => c.peer === remote));
      return mediaArrived(call, ms);
    },

    // Every ICE candidate address this page gathered or received, from getStats().
    async iceAddresses() {
      const result = { local: [], remote: [] };
      const pcs = [...conns.values(), ...calls].map((c) => c.peerConnection)
        .filter((pc) => pc && pc.connectionState !== "closed");
      for (const pc of pcs) {
        (await pc.getStats()).forEach((s) => {
          const address = s.address ?? s.ip;
          if (s.type === "local-candidate") result.local.push(address);
          if (s.type === "remote-candidate") result.remote.push(address);
        });
      }
      return result;
    },

    // The stock client's way back after a network change: leave the server, then
    // peer.reconnect() with the same id and token. Returns Date.now() at the call.
    reconnect() {
      peer.disconnect();
      record("reconnect");
      const t = Date.now();
      peer.reconnect();
      return t;
    },

    // Date.now() of the first "open" after `since`, or the error that came instead.
    async waitReopen(since, ms) {
      const done = await waitFor("open again", ms, () => events.find(
        (e) => e.t >= since && (e.kind === "open" || e.kind === "error")));
      if (done.kind === "error") throw new Error(`no reopen: ${done.type}: ${done.message}`);
      return done.t;
    },

    destroy() {
      record("destroy");
      const t = Date.now();
      peer.destroy();
      return t;
    },
  };
})();
