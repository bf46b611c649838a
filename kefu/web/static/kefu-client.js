// kefu's browser client: one WebSocket speaking PROTOCOL.md, shared by the visitor page and the
// agent workbench.
//
// What it guarantees to the page:
// - every message of a conversation is emitted once ('msg'), in seq order: duplicates (a replay
//   after a resume, a history page overlapping live frames) are dropped by (conv, seq), and a gap
//   (a frame lost while the socket was down) is filled with a `sync` before later ones go out;
// - nothing typed is lost: `send()` keeps the message in an outbox (persisted under storageKey)
//   until the server's `ack`, and re-sends it after every reconnect with the SAME client_msg_id,
//   which the server deduplicates, so a message is stored exactly once;
// - the socket comes back by itself (backoff 0.5 s → 10 s with jitter, at once on 'online'),
//   resuming every known conversation from its last seq, except after a 1008 close (the token
//   was refused): then 'auth_failed' is emitted and the page decides.
// Every buffer is bounded: the outbox (maxOutbox; send() throws when full), the messages kept per
// conversation (maxMessages, oldest dropped), the conversations tracked (maxConvs, least recently
// used dropped), the out-of-order frames held while a gap is filled (dropped beyond the bound: the
// sync brings them again).

import { t as translate } from "./i18n.js";

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 10_000;
const PING_EVERY_MS = 20_000;     // application ping; no frame for 2 periods = dead socket
const SYNC_LIMIT = 500;           // PROTOCOL.md's maximum `sync` limit
const HELD_MAX = 500;             // out-of-order frames kept per conversation while syncing
const MAX_CONVS = 200;            // conversations tracked (resume points, message lists)
const MAX_MESSAGES = 500;         // messages kept in memory per conversation
const MAX_RESUME = 100;           // PROTOCOL.md: resume points in one hello
const SYNC_TIMEOUT_MS = 15_000;
const RETRYABLE = new Set(["rate_limited", "busy", "store_busy", "unavailable", "internal"]);

/** A fresh client_msg_id: ≤ 64 printable ASCII characters. */
function newClientMsgId() {
  if (globalThis.crypto && typeof crypto.randomUUID === "function") return "c-" + crypto.randomUUID();
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return "c-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function loadJSON(key) {
  if (!key) return null;
  try {
    const raw = localStorage.getItem(key);
    return raw ? JSON.parse(raw) : null;
  } catch {
    return null;  // storage disabled or corrupt: start empty rather than fail
  }
}

function saveJSON(key, value) {
  if (!key) return;
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    // Quota exceeded or storage disabled: the state lives in memory only.
  }
}

export class KefuClient extends EventTarget {
  /**
   * @param {{wsUrl: string, token: string, storageKey?: string|null, maxOutbox?: number,
   *          maxMessages?: number, maxConvs?: number}} options
   */
  constructor({ wsUrl, token, storageKey = null, maxOutbox = 200, maxMessages = MAX_MESSAGES,
                maxConvs = MAX_CONVS }) {
    super();
    this.wsUrl = wsUrl;
    this.token = token;
    this.storageKey = storageKey;
    this.maxOutbox = maxOutbox;
    this.maxMessages = maxMessages;
    this.maxConvs = maxConvs;
    /** conv → {epoch, last_seq, messages: msg[], held: Map<seq, msg>, syncing: bool} */
    this.convs = new Map();
    /** [{conv, client_msg_id, text, ts}] in send order */
    this.outbox = [];
    this.welcome = null;
    this._ws = null;
    this._state = "offline";
    this._closedByUser = true;
    this._attempt = 0;
    this._retryTimer = null;
    this._pingTimer = null;
    this._lastFrameAt = 0;
    this._syncWaiters = new Map();  // conv → [{resolve, reject, timer}] answered FIFO
    this._restore();
    this._onOnline = () => { if (!this._closedByUser) this._reconnectNow(); };
    this._onOffline = () => this._drop("offline");
  }

  // -- state -----------------------------------------------------------------------------------

  _restore() {
    const saved = loadJSON(this.storageKey);
    if (!saved || typeof saved !== "object") return;
    for (const c of Array.isArray(saved.convs) ? saved.convs : []) {
      if (c && typeof c.conv === "string" && Number.isInteger(c.epoch) && Number.isInteger(c.last_seq)) {
        this._conv(c.conv, c.epoch, c.last_seq);
      }
    }
    for (const m of Array.isArray(saved.outbox) ? saved.outbox : []) {
      if (m && typeof m.conv === "string" && typeof m.client_msg_id === "string" &&
          typeof m.text === "string" && this.outbox.length < this.maxOutbox) {
        this.outbox.push({ conv: m.conv, client_msg_id: m.client_msg_id, text: m.text, ts: m.ts || Date.now() });
      }
    }
  }

  _persist() {
    const convs = [];
    for (const [conv, c] of this.convs) {
      if (c.epoch !== null) convs.push({ conv, epoch: c.epoch, last_seq: c.last_seq });
    }
    saveJSON(this.storageKey, { convs, outbox: this.outbox });
  }

  /** The record of `conv`, created (and the least recently used one evicted) when new. */
  _conv(conv, epoch = null, lastSeq = null) {
    let c = this.convs.get(conv);
    if (c) {
      this.convs.delete(conv);  // re-insert: the Map's order is the recency order
      this.convs.set(conv, c);
      return c;
    }
    c = { epoch, last_seq: lastSeq, messages: [], held: new Map(), syncing: false };
    this.convs.set(conv, c);
    while (this.convs.size > this.maxConvs) {
      const oldest = this.convs.keys().next().value;
      this.convs.delete(oldest);
    }
    return c;
  }

  /**
   * Set the point a conversation's live messages continue from: `last_seq` is the newest seq the
   * page already shows (0: none). Later messages are emitted from last_seq + 1 on.
   */
  track(conv, epoch, lastSeq) {
    const c = this._conv(conv);
    c.epoch = epoch;
    c.last_seq = lastSeq;
    c.held.clear();
    c.messages = c.messages.filter((m) => m.seq <= lastSeq && m.epoch === epoch);
    this._persist();
  }

  /** Stop following `conv` (forget its resume point and messages). */
  forget(conv) {
    this.convs.delete(conv);
    this._persist();
  }

  /** The newest seq delivered for `conv`, or null when it is not tracked yet. */
  lastSeq(conv) {
    const c = this.convs.get(conv);
    return c ? c.last_seq : null;
  }

  /** The messages of `conv` kept in memory (the newest maxMessages), oldest first. */
  messages(conv) {
    const c = this.convs.get(conv);
    return c ? c.messages.slice() : [];
  }

  /** Messages of `conv` waiting for their ack. */
  pending(conv = null) {
    return this.outbox.filter((m) => conv === null || m.conv === conv).map((m) => ({ ...m }));
  }

  get connState() {
    return this._state;
  }

  _setState(state) {
    if (this._state === state) return;
    this._state = state;
    this._emit("connstate", { state });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // -- connection ------------------------------------------------------------------------------

  connect() {
    this._closedByUser = false;
    window.addEventListener("online", this._onOnline);
    window.addEventListener("offline", this._onOffline);
    this._open();
  }

  close() {
    this._closedByUser = true;
    window.removeEventListener("online", this._onOnline);
    window.removeEventListener("offline", this._onOffline);
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    this._stopPing();
    if (this._ws) {
      const ws = this._ws;
      this._ws = null;
      ws.close(1000, "bye");
    }
    this._failSyncs(new Error("closed"));
    this._setState("offline");
  }

  _open() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    if (this._ws) return;
    if (navigator.onLine === false) {
      // Known to be offline: a connection attempt would only fail (and log an error); the
      // 'online' event reconnects at once, and a slow retry covers a stale onLine.
      this._setState("offline");
      this._scheduleReconnect();
      return;
    }
    this._setState("connecting");
    let ws;
    try {
      ws = new WebSocket(this.wsUrl);
    } catch (err) {
      this._emit("error", { code: "connect_failed", message: String(err && err.message || err) });
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    ws.onopen = () => {
      if (this._ws !== ws) return;
      const resume = [];
      for (const [conv, c] of this.convs) {
        if (c.epoch !== null && c.last_seq !== null) resume.push({ conv, epoch: c.epoch, last_seq: c.last_seq });
      }
      const hello = { type: "hello", token: this.token };
      if (resume.length) hello.resume = resume.slice(-MAX_RESUME);
      ws.send(JSON.stringify(hello));
    };
    ws.onmessage = (ev) => {
      if (this._ws !== ws) return;
      this._lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (frame && typeof frame === "object" && typeof frame.type === "string") this._onFrame(frame);
    };
    ws.onclose = (ev) => this._handleClose(ws, ev.code, ev.reason);
    ws.onerror = () => {};  // onclose follows and carries the decision
  }

  /** The socket `ws` is gone (closed by the server, the network or us): decide what next. */
  _handleClose(ws, code, reason) {
    if (this._ws !== ws) return;
    this._ws = null;
    this._stopPing();
    this._failSyncs(new Error("connection lost"));
    for (const c of this.convs.values()) c.syncing = false;
    if (code === 1008) {
      this._closedByUser = true;
      this._setState("offline");
      this._emit("auth_failed", { code, reason });
      return;
    }
    this._setState("offline");
    if (!this._closedByUser) this._scheduleReconnect();
  }

  /** Drop the current socket at once, without waiting for a closing handshake that a dead
   * network never completes. */
  _drop(reason) {
    const ws = this._ws;
    if (!ws) return;
    try { ws.close(4000, reason); } catch { /* already closing */ }
    this._handleClose(ws, 4000, reason);
  }

  _scheduleReconnect() {
    if (this._closedByUser || this._retryTimer) return;
    const base = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this._attempt, 10));
    const delay = Math.min(BACKOFF_MAX_MS, base / 2 + Math.random() * base / 2 + Math.random() * 250);
    this._attempt += 1;
    this._retryTimer = setTimeout(() => { this._retryTimer = null; this._open(); }, delay);
  }

  _reconnectNow() {
    this._attempt = 0;
    if (this._ws && this._state === "open") return;
    this._drop("reconnect");
    this._open();
  }

  _startPing() {
    this._stopPing();
    this._lastFrameAt = Date.now();
    this._pingTimer = setInterval(() => {
      if (!this._ws) return;
      if (Date.now() - this._lastFrameAt > 2 * PING_EVERY_MS + 5_000) {
        this._drop("timeout");  // silent for too long: treat as dead and reconnect
        return;
      }
      this._raw({ type: "ping" });
    }, PING_EVERY_MS);
  }

  _stopPing() {
    clearInterval(this._pingTimer);
    this._pingTimer = null;
  }

  _raw(frame) {
    if (!this._ws || this._state !== "open") return false;
    try {
      this._ws.send(JSON.stringify(frame));
      return true;
    } catch {
      return false;
    }
  }

  // -- frames from the server ------------------------------------------------------------------

  _onFrame(f) {
    switch (f.type) {
      case "welcome":
        this.welcome = f;
        this._attempt = 0;
        this._setState("open");
        this._startPing();
        this._emit("welcome", f);
        this._flushOutbox();
        return;
      case "msg":
        this._onMsg(f);
        return;
      case "history":
        this._onHistory(f);
        return;
      case "ack":
        this._onAck(f);
        return;
      case "resumed":
        this._emit("resumed", f);
        return;
      case "assigned":
        if (Number.isInteger(f.epoch)) {
          const c = this._conv(f.conv);
          if (c.epoch === null) {
            // A conversation new to this client: with no message attached it is empty so far,
            // and its stream starts at seq 1 (else the first attached message starts it).
            c.epoch = f.epoch;
            if (c.last_seq === null && !(f.messages || []).length) c.last_seq = 0;
            this._persist();
          }
        }
        this._emit("assigned", f);
        for (const m of f.messages || []) this._onMsg(m);
        return;
      case "error":
        this._onError(f);
        return;
      case "pong":
        return;
      default:
        this._emit(f.type, f);
    }
  }

  _onMsg(m) {
    if (typeof m.conv !== "string" || !Number.isInteger(m.seq)) return;
    const c = this._conv(m.conv);
    if (c.last_seq === null || c.epoch === null || (Number.isInteger(m.epoch) && m.epoch !== c.epoch)) {
      if (c.last_seq !== null && c.epoch !== null && m.epoch !== c.epoch) {
        // Another epoch: the history this page holds is not continuous with it.
        this._emit("resumed", { type: "resumed", conv: m.conv, recovered: false });
      }
      // Not tracked yet: this message starts the conversation's live stream.
      c.epoch = Number.isInteger(m.epoch) ? m.epoch : c.epoch;
      c.last_seq = m.seq - 1;
      c.held.clear();
      c.messages = [];
    }
    if (m.seq <= c.last_seq) return;  // seen already
    if (m.seq > c.last_seq + 1) {
      if (c.held.size < HELD_MAX) c.held.set(m.seq, m);
      this._fillGap(m.conv, c);
      return;
    }
    this._deliver(m.conv, c, m);
    while (c.held.size) {
      const next = c.held.get(c.last_seq + 1);
      if (!next) break;
      c.held.delete(next.seq);
      this._deliver(m.conv, c, next);
    }
    for (const seq of c.held.keys()) if (seq <= c.last_seq) c.held.delete(seq);
    if (c.held.size) this._fillGap(m.conv, c);
  }

  _deliver(conv, c, m) {
    c.last_seq = m.seq;
    c.messages.push(m);
    if (c.messages.length > this.maxMessages) c.messages.splice(0, c.messages.length - this.maxMessages);
    this._persist();
    this._emit("msg", m);
  }

  _fillGap(conv, c) {
    if (c.syncing || this._state !== "open") return;
    c.syncing = true;
    this.sync(conv, c.last_seq, SYNC_LIMIT).catch(() => {}).finally(() => {
      c.syncing = false;
      if (c.held.size && this._state === "open") {
        // The sync did not reach the held frames (more than one page missing): next page.
        const lowest = Math.min(...c.held.keys());
        if (lowest > c.last_seq + 1) this._fillGap(conv, c);
      }
    });
  }

  _onHistory(f) {
    const waiters = this._syncWaiters.get(f.conv);
    const waiter = waiters && waiters.shift();
    if (waiters && !waiters.length) this._syncWaiters.delete(f.conv);
    const c = this.convs.get(f.conv);
    if (c && c.last_seq !== null && c.epoch === f.epoch) {
      for (const m of f.messages || []) if (m.seq > c.last_seq) this._onMsg(m);
    }
    this._emit("history", f);
    if (waiter) {
      clearTimeout(waiter.timer);
      waiter.resolve(f);
    }
  }

  _onAck(f) {
    const i = this.outbox.findIndex((m) => m.client_msg_id === f.client_msg_id && m.conv === f.conv);
    if (i >= 0) {
      this.outbox.splice(i, 1);
      this._persist();
      this._emit("pending", { outbox: this.pending() });
    }
    this._emit("ack", f);
  }

  _onError(f) {
    if (f.ref) {
      const i = this.outbox.findIndex((m) => m.client_msg_id === f.ref);
      if (i >= 0) {
        if (RETRYABLE.has(f.code)) {
          // Kept: re-sent after the next reconnect (or the next send) with the same id.
          setTimeout(() => this._flushOutbox(), 2_000);
        } else {
          const [dropped] = this.outbox.splice(i, 1);
          this._persist();
          this._emit("pending", { outbox: this.pending(), failed: dropped, error: f });
        }
      }
      if (f.ref === "sync") {
        // A refused sync answers no history: fail the oldest waiter of any conversation.
        for (const [conv, waiters] of this._syncWaiters) {
          const w = waiters.shift();
          if (!waiters.length) this._syncWaiters.delete(conv);
          if (w) { clearTimeout(w.timer); w.reject(new Error(f.message || f.code)); break; }
        }
      }
    }
    this._emit("error", f);
  }

  _failSyncs(err) {
    for (const waiters of this._syncWaiters.values()) {
      for (const w of waiters) { clearTimeout(w.timer); w.reject(err); }
    }
    this._syncWaiters.clear();
  }

  _flushOutbox() {
    if (this._state !== "open") return;
    for (const m of this.outbox) {
      this._raw({ type: "send", conv: m.conv, client_msg_id: m.client_msg_id, text: m.text });
    }
  }

  // -- commands --------------------------------------------------------------------------------

  /**
   * Send `text` into `conv`; returns its client_msg_id. Throws an Error with code
   * "outbox_full" when maxOutbox messages already wait for their ack.
   */
  send(conv, text) {
    if (this.outbox.length >= this.maxOutbox) {
      const err = new Error("too many messages waiting to be sent");
      err.code = "outbox_full";
      throw err;
    }
    const entry = { conv, client_msg_id: newClientMsgId(), text, ts: Date.now() };
    this.outbox.push(entry);
    this._persist();
    this._emit("pending", { outbox: this.pending() });
    this._raw({ type: "send", conv, client_msg_id: entry.client_msg_id, text });
    return entry.client_msg_id;
  }

  typing(conv) {
    return this._raw({ type: "typing", conv });
  }

  read(conv, seq) {
    return this._raw({ type: "read", conv, seq });
  }

  /** `history` frame for `conv` after `after` (≤ limit messages); rejects when not connected. */
  sync(conv, after = 0, limit = 50) {
    return new Promise((resolve, reject) => {
      if (!this._raw({ type: "sync", conv, after, limit: Math.max(1, Math.min(SYNC_LIMIT, limit)) })) {
        reject(new Error("not connected"));
        return;
      }
      const waiter = { resolve, reject, timer: 0 };
      waiter.timer = setTimeout(() => {
        const list = this._syncWaiters.get(conv);
        const i = list ? list.indexOf(waiter) : -1;
        if (i >= 0) list.splice(i, 1);
        reject(new Error("sync timed out"));
      }, SYNC_TIMEOUT_MS);
      if (!this._syncWaiters.has(conv)) this._syncWaiters.set(conv, []);
      this._syncWaiters.get(conv).push(waiter);
    });
  }

  /** A raw frame (status / accept / transfer / close); false when not connected. */
  command(frame) {
    return this._raw(frame);
  }
}

/**
 * DOM builder. Strings and numbers become text nodes, never HTML. `props`: `class`, `text`,
 * `dataset` (object), `style` (object), `on` (object of listeners), `attrs` (object), or any
 * other key set as a property (`type`, `disabled`, `value`, `href`...) or, for aria-* / role /
 * for, as an attribute.
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = String(value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "style") Object.assign(el.style, value);
    else if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
    else if (key === "attrs") for (const [a, v] of Object.entries(value)) el.setAttribute(a, String(v));
    else if (key === "innerHTML" || key === "outerHTML") throw new Error("h(): no HTML");
    else if (key.startsWith("aria-") || key.startsWith("data-") || key === "role" || key === "for") {
      el.setAttribute(key, String(value));
    } else if (key === "href" || key === "src") {
      const url = String(value);
      if (/^(https?:|\/|\.\/|#|data:image\/)/i.test(url)) el.setAttribute(key, url);
    } else el[key] = value;
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else if (child instanceof Node) el.appendChild(child);
    else el.appendChild(document.createTextNode(String(child)));
  }
}

/** i18n lookup: `t("send", "zh")`; `vars` fills `{name}` placeholders (as text). */
export function t(key, lang, vars) {
  return translate(key, lang, vars);
}
