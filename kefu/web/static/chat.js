// The visitor's chat page (/chat), full page or inside the widget's iframe (?embed=1).
//
// Start: the session kept in localStorage is reused (a refused token starts a new one), else
// POST /v1/chat/create. History comes from REST first (what the page shows at once), then the
// WebSocket client resumes from the newest seq shown; everything live goes through KefuClient,
// which emits each message once and in order. Every text from the network is rendered as text.

import { KefuClient, h } from "./kefu-client.js";
import { pickLang, t as tr } from "./i18n.js";

const PAGE = 50;                 // messages per REST page
const INITIAL_PAGES = 10;        // REST pages read forward at start, at most
const MAX_RENDERED = 600;        // message rows kept in the DOM (oldest dropped; "load earlier")
const TYPING_EVERY_MS = 2_000;   // our `typing` frames, at most one per period
const TYPING_SHOWN_MS = 5_000;   // how long the other side's typing stays shown
const SESSION_KEY = "kefu:session";
const CLIENT_KEY_PREFIX = "kefu:client:";
const META_MAX = 1_000;          // characters per metadata value (the server's limit is 1024)

const params = new URLSearchParams(location.search);
const lang = pickLang(params.get("lang"));
const embed = params.get("embed") === "1";
const t = (key, vars) => tr(key, lang, vars);
const $ = (id) => document.getElementById(id);

const ui = {
  root: $("chat"), title: $("chat-title"), status: $("chat-status"), banner: $("chat-banner"),
  body: $("chat-body"), list: $("chat-list"), earlier: $("chat-earlier"), empty: $("chat-empty"),
  typing: $("chat-typing"), typingText: $("chat-typing-text"), closed: $("chat-closed"),
  closedText: $("chat-closed-text"), newConv: $("chat-new"), form: $("chat-composer"),
  input: $("chat-input"), send: $("chat-send"), close: $("chat-close"), end: $("chat-end"),
};

/** Everything about the current conversation; replaced whole by a new session. */
let S = null;
let config = { max_text_chars: 16000, bot_name: null };
let panelOpen = true;    // embedded: whether the widget shows the panel
let unread = 0;

// -- small helpers ----------------------------------------------------------------------------

function clip(value, n = META_MAX) {
  return typeof value === "string" ? value.slice(0, n) : "";
}

function validColor(value) {
  return typeof value === "string" && /^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$/.test(value) ? value : null;
}

/** Black or white text, whichever reads better on `hex`. */
function contrastOn(hex) {
  let v = hex.slice(1);
  if (v.length === 3) v = v.split("").map((c) => c + c).join("");
  const [r, g, b] = [0, 2, 4].map((i) => parseInt(v.slice(i, i + 2), 16) / 255)
    .map((c) => (c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4));
  const lum = 0.2126 * r + 0.7152 * g + 0.0722 * b;
  return lum > 0.45 ? "#111111" : "#ffffff";
}

function timeOf(ts) {
  try {
    return new Date(ts).toLocaleTimeString(lang === "zh" ? "zh-CN" : "en", { hour: "2-digit", minute: "2-digit" });
  } catch {
    return "";
  }
}

function loadSession() {
  try {
    const s = JSON.parse(localStorage.getItem(SESSION_KEY) || "null");
    if (s && typeof s.session_id === "string" && typeof s.token === "string") return s;
  } catch { /* corrupt: start again */ }
  return null;
}

function saveSession(s) {
  try { localStorage.setItem(SESSION_KEY, JSON.stringify(s)); } catch { /* memory only */ }
}

class HttpError extends Error {
  constructor(status, code, message) {
    super(message || code || `HTTP ${status}`);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", token = null, body = undefined } = {}) {
  const headers = { Accept: "application/json" };
  if (token) headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await res.json(); } catch { /* not JSON */ }
  if (!res.ok) {
    const err = data && data.error ? data.error : {};
    throw new HttpError(res.status, err.code, err.message);
  }
  return data;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// -- page set-up ------------------------------------------------------------------------------

function setupChrome() {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  const title = clip(params.get("title") || "", 80).trim() || t("chat.title");
  ui.title.textContent = title;
  document.title = title;
  const color = validColor(params.get("color"));
  if (color) {
    document.documentElement.style.setProperty("--kefu-accent", color);
    const ink = contrastOn(color);
    document.documentElement.style.setProperty("--kefu-accent-contrast", ink);
    // The white icons go dark on a light accent.
    if (ink !== "#ffffff") document.body.classList.add("light-accent");
  }
  if (embed) document.body.classList.add("embed");
  ui.status.textContent = t("chat.subtitle");
  ui.list.setAttribute("aria-label", t("chat.messages_label"));
  ui.input.placeholder = t("chat.placeholder");
  ui.input.setAttribute("aria-label", t("chat.input_label"));
  $("chat-input-label").textContent = t("chat.input_label");
  $("chat-send-label").textContent = t("chat.send");
  ui.send.title = t("chat.send");
  ui.earlier.textContent = t("chat.load_earlier");
  ui.newConv.textContent = t("chat.new_conversation");
  ui.empty.textContent = t("chat.empty");
  ui.end.setAttribute("aria-label", t("chat.end"));
  ui.end.title = t("chat.end");
  ui.close.setAttribute("aria-label", t("chat.close_panel"));
  ui.close.title = t("chat.close_panel");
  ui.close.hidden = !embed;

  ui.form.addEventListener("submit", (e) => { e.preventDefault(); submit(); });
  ui.input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      submit();
    }
  });
  ui.input.addEventListener("input", () => { autosize(); onTyping(); });
  ui.earlier.addEventListener("click", loadEarlier);
  ui.newConv.addEventListener("click", () => restart({ fresh: true }));
  // Ending is two presses within a few seconds: one stray tap must not end the conversation.
  let endArmed = 0;
  ui.end.addEventListener("click", () => {
    if (!S || !S.client) return;
    if (Date.now() - endArmed < 4_000) {
      endArmed = 0;
      S.client.command({ type: "close", conv: S.conv });
      ui.banner.hidden = true;
      return;
    }
    endArmed = Date.now();
    showBanner(t("chat.end_confirm"), "warn", 4_000);
  });
  ui.close.addEventListener("click", () => window.parent.postMessage({ type: "kefu:close" }, "*"));
  document.addEventListener("visibilitychange", onVisibility);
  window.addEventListener("focus", onVisibility);
  if (embed) {
    window.addEventListener("message", (e) => {
      if (e.source !== window.parent || !e.data || typeof e.data !== "object") return;
      if (e.data.type === "kefu:visibility") {
        panelOpen = !!e.data.open;
        onVisibility();
        if (panelOpen) ui.input.focus({ preventScroll: true });
      }
    });
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape") window.parent.postMessage({ type: "kefu:close" }, "*");
    });
  }
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = Math.min(ui.input.scrollHeight, 140) + "px";
}

// -- session ----------------------------------------------------------------------------------

function identity() {
  const id = {};
  const userId = clip(params.get("user_id") || "", 64);
  const userHash = clip(params.get("user_hash") || "", 128);
  const name = clip(params.get("name") || "", 64);
  if (userId) id.user_id = userId;
  if (userHash) id.user_hash = userHash;
  if (name) id.name = name;
  return id;
}

async function createSession() {
  const metadata = {
    page: clip(params.get("page") || (embed ? document.referrer : location.href) || location.href),
    title: clip(params.get("page_title") || document.title),
    referrer: clip(document.referrer || ""),
    user_agent: clip(navigator.userAgent),
    language: clip(navigator.language || lang, 32),
  };
  for (const k of Object.keys(metadata)) if (!metadata[k]) delete metadata[k];
  const res = await api("/v1/chat/create", { method: "POST", body: { ...identity(), metadata } });
  const s = {
    session_id: res.session_id, token: res.token, visitor_id: res.visitor_id,
    ws_url: res.ws_url, user_id: identity().user_id || null, status: res.status,
  };
  const old = loadSession();
  if (old && old.session_id !== s.session_id) {
    try { localStorage.removeItem(CLIENT_KEY_PREFIX + old.session_id); } catch { /* ignore */ }
  }
  saveSession(s);
  return s;
}

/** The stored session when it belongs to the same user, else a new one (retried until made). */
async function obtainSession(fresh) {
  const stored = fresh ? null : loadSession();
  const userId = identity().user_id || null;
  if (stored && (stored.user_id || null) === userId) return stored;
  for (let attempt = 0; ; attempt++) {
    try {
      return await createSession();
    } catch (err) {
      if (err instanceof HttpError && err.status >= 400 && err.status < 500 && err.status !== 429) {
        showBanner(t("chat.error", { message: err.message }), "error");
        throw err;
      }
      showBanner(t("chat.start_failed"), "warn");
      await sleep(Math.min(10_000, 1_000 * 2 ** attempt));
    }
  }
}

// -- start / restart --------------------------------------------------------------------------

async function start({ fresh = false, tailFrom = null } = {}) {
  const session = await obtainSession(fresh);
  const conv = session.session_id;
  S = {
    session, conv, client: null, firstSeq: null, lastSeq: 0, epoch: null,
    rows: new Map(),         // seq → <li>
    pendingRows: new Map(),  // client_msg_id → <li>
    streams: new Map(),      // stream_id → {row, textNode}
    otherRead: 0, lastReadSent: 0, lastTypingSent: 0, typingTimer: 0,
    agent: session.agent || null, status: session.status || null, queueRow: null,
    everOpen: false, closed: false,
  };
  ui.list.replaceChildren();
  setClosed(false);
  const storageKey = CLIENT_KEY_PREFIX + conv;
  // What the client remembers of this conversation (its last seq) chooses the first REST page.
  const probe = new KefuClient({ wsUrl: "ws://invalid", token: "", storageKey });
  const known = tailFrom ?? probe.lastSeq(conv) ?? 0;
  let page;
  try {
    page = await loadInitial(Math.max(0, known - PAGE));
  } catch (err) {
    if (err instanceof HttpError && [401, 403, 404].includes(err.status) && !fresh) {
      return start({ fresh: true });  // the stored session is gone or its token expired
    }
    throw err;
  }
  const client = new KefuClient({ wsUrl: session.ws_url || config.ws_url, token: session.token, storageKey });
  S.client = client;
  S.epoch = page.epoch;
  client.track(conv, page.epoch, S.lastSeq);
  for (const m of client.pending(conv)) {
    if (!findByClientId(m.client_msg_id)) addPendingRow(m.client_msg_id, m.text);
  }
  wireClient(client);
  client.connect();
  updateEmpty();
  scrollToEnd(true);
}

/** REST history from `after` forward (bounded), rendered; returns the last page. */
async function loadInitial(after) {
  const from = after;
  let page = null;
  for (let i = 0; i < INITIAL_PAGES; i++) {
    page = await api(`/v1/chat/${S.conv}/messages?after=${after}&limit=${PAGE}`, { token: S.session.token });
    for (const m of page.messages) renderMsg(m);
    if (!page.more || !page.messages.length) break;
    after = page.messages[page.messages.length - 1].seq;
  }
  if (S.firstSeq === null) S.firstSeq = from + 1;
  updateEarlier();
  return page;
}

async function restart(opts) {
  if (S && S.client) S.client.close();
  S = null;
  try {
    await start(opts);
  } catch (err) {
    showBanner(t("chat.error", { message: err.message }), "error");
  }
}

function wireClient(client) {
  const on = (type, fn) => client.addEventListener(type, (e) => { if (S && S.client === client) fn(e.detail); });
  on("connstate", ({ state }) => showConnState(state));
  on("welcome", (w) => {
    S.everOpen = true;
    const cs = (w.convs || []).find((c) => c.conv === S.conv);
    if (cs) {
      S.topSeq = cs.top_seq;
      setStatus(cs.status);
    }
  });
  on("msg", (m) => { if (m.conv === S.conv) onLiveMsg(m); });
  on("delta", (d) => { if (d.conv === S.conv) onDelta(d); });
  on("ack", (a) => { if (a.conv === S.conv) onAck(a); });
  on("pending", (p) => { if (p.failed && p.failed.conv === S.conv) markFailed(p.failed, p.error); });
  on("queued", (q) => { if (q.conv === S.conv) onQueued(q.position); });
  on("handoff", (f) => { if (f.conv === S.conv && S.status === "bot") { setStatus("queued"); addNotice(t("chat.handoff")); } });
  on("assigned", (a) => { if (a.conv === S.conv) onAssigned(a.agent); });
  on("closed", (c) => { if (c.conv === S.conv) onClosed(); });
  on("typing", (f) => { if (f.conv === S.conv && f.from && f.from.role !== "visitor") showTyping(f.from.name); });
  on("read", (f) => { if (f.conv === S.conv && f.from && f.from.role !== "visitor") onRead(f.seq); });
  on("resumed", (r) => {
    if (r.conv === S.conv && r.recovered === false) {
      restart({ tailFrom: Number.isInteger(S.topSeq) ? S.topSeq : null });
    }
  });
  on("auth_failed", () => restart({ fresh: true }));
  on("error", (f) => {
    if (f.code === "conversation_closed") onClosed();
    else if (f.ref && S.pendingRows.has(f.ref)) return;  // shown on the row
    else if (f.code && f.code !== "rate_limited") showBanner(t("chat.error", { message: f.message || f.code }), "error", 6_000);
  });
}

// -- rendering --------------------------------------------------------------------------------

function roleOf(m) {
  return m.from && typeof m.from.role === "string" ? m.from.role : "system";
}

/** The bot's name: the configured one, said in the page's language when it is the default. */
function botName(name) {
  const n = name || config.bot_name;
  return !n || (n === "Assistant" && lang !== "en") ? t("chat.bot") : n;
}

function nameOf(m) {
  const role = roleOf(m);
  if (role === "visitor") return t("chat.you");
  const name = m.from && typeof m.from.name === "string" && m.from.name ? m.from.name : null;
  if (role === "bot") return botName(name);
  if (role === "agent") return name || t("chat.agent");
  return name || t("chat.system");
}

function msgRow(m) {
  const role = roleOf(m);
  if (role === "system") {
    return h("li", { class: "row notice", dataset: { seq: String(m.seq) } },
      h("span", { class: "notice-text kefu-text", text: m.text }));
  }
  const own = role === "visitor";
  const meta = h("div", { class: "meta" }, h("time", { dateTime: new Date(m.ts).toISOString(), text: timeOf(m.ts) }));
  if (own) meta.append(tickEl(m.seq <= S.otherRead ? "read" : "sent"));
  return h("li", { class: `row msg ${own ? "own" : "other"} role-${role}`, dataset: { seq: String(m.seq), from: `${role}:${m.from && m.from.id}` } },
    own ? null : h("div", { class: "sender", text: nameOf(m) }),
    h("div", { class: "bubble kefu-text", text: m.text }),
    meta);
}

function tickEl(state) {
  const label = { sending: t("chat.sending"), sent: t("chat.sent"), read: t("chat.read"), failed: t("chat.failed") }[state];
  const mark = { sending: "○", sent: "✓", read: "✓✓", failed: "!" }[state];
  return h("span", { class: `tick ${state}`, title: label, "aria-label": label }, mark);
}

function setTick(row, state) {
  const old = row.querySelector(".tick");
  const el = tickEl(state);
  if (old) old.replaceWith(el); else row.querySelector(".meta").append(el);
  row.dataset.state = state;
}

function findByClientId(id) {
  for (const row of S.rows.values()) if (row.dataset.cmid === id) return row;
  return null;
}

/** Put message `m` in the list once, in seq order (REST pages and live frames may overlap). */
function renderMsg(m) {
  if (!S || S.rows.has(m.seq)) return null;
  const row = msgRow(m);
  if (m.client_msg_id) row.dataset.cmid = m.client_msg_id;
  const pending = m.client_msg_id ? S.pendingRows.get(m.client_msg_id) : null;
  const stream = m.meta && typeof m.meta.stream_id === "string" ? S.streams.get(m.meta.stream_id) : null;
  if (pending) {
    S.pendingRows.delete(m.client_msg_id);
    pending.remove();
  }
  if (stream) {
    S.streams.delete(m.meta.stream_id);
    stream.row.remove();
  }
  S.rows.set(m.seq, row);
  // Find the first rendered row with a greater seq: insert before it (usually none: append).
  let before = null;
  if (m.seq < S.lastSeq) {
    for (const el of ui.list.children) {
      const s = Number(el.dataset.seq);
      if (el.dataset.seq && s > m.seq) { before = el; break; }
    }
  }
  if (before) ui.list.insertBefore(row, before);
  else appendRow(row);
  S.lastSeq = Math.max(S.lastSeq, m.seq);
  if (S.firstSeq === null || m.seq < S.firstSeq) S.firstSeq = m.seq;
  trimRows();
  updateEmpty();
  return row;
}

/** Append before the pending rows and the live stream (they stay at the bottom). */
function appendRow(row) {
  const anchor = ui.list.querySelector(":scope > .row.pending, :scope > .row.streaming");
  if (anchor) ui.list.insertBefore(row, anchor); else ui.list.append(row);
}

function trimRows() {
  while (S.rows.size > MAX_RENDERED) {
    const seq = Math.min(...S.rows.keys());
    S.rows.get(seq).remove();
    S.rows.delete(seq);
    S.firstSeq = Math.min(...S.rows.keys());
  }
  updateEarlier();
}

function updateEarlier() {
  ui.earlier.hidden = !(S && S.firstSeq !== null && S.firstSeq > 1);
}

function updateEmpty() {
  const empty = !S || ui.list.children.length === 0;
  ui.empty.hidden = !empty;
  ui.end.hidden = empty || !S || S.closed;  // nothing to end yet
}

function addNotice(text, cls = "") {
  const row = h("li", { class: `row notice ${cls}` }, h("span", { class: "notice-text kefu-text", text }));
  ui.list.append(row);
  updateEmpty();
  scrollToEnd();
  return row;
}

function addPendingRow(clientMsgId, text) {
  const row = h("li", { class: "row msg own pending", dataset: { cmid: clientMsgId } },
    h("div", { class: "bubble kefu-text", text }),
    h("div", { class: "meta" }));
  setTick(row, "sending");
  S.pendingRows.set(clientMsgId, row);
  ui.list.append(row);
  updateEmpty();
  scrollToEnd(true);
}

function nearBottom() {
  const el = ui.body;
  return el.scrollHeight - el.scrollTop - el.clientHeight < 120;
}

function scrollToEnd(force = false) {
  if (force || nearBottom()) ui.body.scrollTop = ui.body.scrollHeight;
}

// -- live events ------------------------------------------------------------------------------

function onLiveMsg(m) {
  const stick = nearBottom();
  const row = renderMsg(m);
  if (!row) return;
  const role = roleOf(m);
  if (role !== "visitor") {
    hideTyping();
    if (!isVisible()) setUnread(unread + 1);
  }
  if (role === "agent" && m.from && !S.agent) S.agent = { id: m.from.id, name: m.from.name };
  markRead();
  scrollToEnd(stick || role === "visitor");
}

function onDelta(d) {
  let s = S.streams.get(d.stream_id);
  if (!s) {
    if (S.streams.size > 8) return;  // bounded: a final msg replaces what is missing anyway
    const text = document.createTextNode("");
    const row = h("li", { class: "row msg other role-bot streaming", "aria-busy": "true" },
      h("div", { class: "sender", text: botName(null) }),
      h("div", { class: "bubble kefu-text" }, text, h("span", { class: "caret", "aria-hidden": "true" })));
    s = { row, text };
    S.streams.set(d.stream_id, s);
    ui.list.append(row);
    hideTyping();
  }
  if (s.text.data.length < 64_000) s.text.appendData(String(d.text || ""));
  scrollToEnd();
}

function onAck(a) {
  const row = S.pendingRows.get(a.client_msg_id);
  if (!row) return;
  if (S.rows.has(a.seq)) {
    S.pendingRows.delete(a.client_msg_id);  // the message itself is shown already
    row.remove();
    return;
  }
  row.dataset.ackSeq = String(a.seq);
  setTick(row, "sent");
}

function markFailed(entry, error) {
  const row = S.pendingRows.get(entry.client_msg_id);
  if (!row) return;
  S.pendingRows.delete(entry.client_msg_id);
  row.classList.remove("pending");
  row.classList.add("failed");
  setTick(row, "failed");
  const reason = error && (error.message || error.code);
  const retry = h("button", { type: "button", class: "kefu-btn link retry", text: t("chat.retry"),
    on: { click: () => { row.remove(); sendText(entry.text); } } });
  row.querySelector(".meta").append(h("span", { class: "fail-reason", text: reason || "" }), retry);
}

function setStatus(status) {
  S.status = status;
  S.session.status = status;
  saveSession(S.session);
  ui.end.hidden = status === "closed" || ui.list.children.length === 0;
  if (status === "closed") onClosed(false);
  else if (status === "assigned" && S.agent) ui.status.textContent = S.agent.name;
  else if (status === "bot") ui.status.textContent = t("chat.bot_status", { name: botName(null) });
}

function onQueued(position) {
  S.status = "queued";
  const text = position <= 1 && lang === "zh" ? t("chat.queued_next")
    : t("chat.queued", { position, ahead: Math.max(0, position - 1) });
  ui.status.textContent = text;
  if (S.queueRow && S.queueRow.isConnected) {
    S.queueRow.querySelector(".notice-text").textContent = text;
  } else {
    S.queueRow = addNotice(text, "queue");
  }
}

function onAssigned(agent) {
  if (!agent) return;
  const known = S.agent && S.agent.id === agent.id;
  S.agent = { id: agent.id, name: agent.name };
  S.session.agent = S.agent;
  if (S.queueRow) { S.queueRow.remove(); S.queueRow = null; }
  setStatus("assigned");
  ui.status.textContent = agent.name;
  // A reconnect or a reload tells the same assignment again: say it only when it changes.
  if (!known) addNotice(t("chat.assigned", { name: agent.name }), "joined");
}

function onClosed(announce = true) {
  if (S.closed) return;
  S.closed = true;
  S.status = "closed";
  hideTyping();
  if (S.queueRow) { S.queueRow.remove(); S.queueRow = null; }
  if (announce) addNotice(t("chat.closed"), "closed");
  setClosed(true);
}

function setClosed(closed) {
  ui.closed.hidden = !closed;
  ui.form.hidden = closed;
  ui.end.hidden = closed || !S;
  ui.closedText.textContent = t("chat.closed");
  if (closed) {
    ui.status.textContent = t("chat.closed");
    if (document.activeElement === ui.input) ui.newConv.focus();
  }
}

function showTyping(name) {
  ui.typingText.textContent = t("chat.typing", { name: name || t("chat.agent") });
  ui.typing.hidden = false;
  clearTimeout(S.typingTimer);
  S.typingTimer = setTimeout(hideTyping, TYPING_SHOWN_MS);
  scrollToEnd();
}

function hideTyping() {
  ui.typing.hidden = true;
  if (S) clearTimeout(S.typingTimer);
}

function onRead(seq) {
  if (!(seq > S.otherRead)) return;
  S.otherRead = seq;
  for (const [s, row] of S.rows) {
    if (s <= seq && row.classList.contains("own") && row.dataset.state !== "read") setTick(row, "read");
  }
}

// -- visibility, read marks, unread count -----------------------------------------------------

function isVisible() {
  return document.visibilityState === "visible" && (!embed || panelOpen);
}

function onVisibility() {
  if (isVisible()) {
    setUnread(0);
    markRead();
  }
}

function markRead() {
  if (!S || !S.client || !isVisible()) return;
  const seq = S.lastSeq;
  if (seq > S.lastReadSent && S.client.read(S.conv, seq)) S.lastReadSent = seq;
}

function setUnread(n) {
  if (n === unread) return;
  unread = n;
  if (embed) window.parent.postMessage({ type: "kefu:unread", count: n }, "*");
}

// -- connection banner ------------------------------------------------------------------------

let bannerTimer = 0;

function showBanner(text, kind = "warn", hideAfterMs = 0) {
  ui.banner.textContent = text;
  ui.banner.dataset.kind = kind;
  ui.banner.hidden = false;
  clearTimeout(bannerTimer);
  if (hideAfterMs) bannerTimer = setTimeout(() => { ui.banner.hidden = true; }, hideAfterMs);
}

function showConnState(state) {
  document.body.dataset.conn = state;
  if (state === "open") {
    if (ui.banner.dataset.kind === "conn") ui.banner.hidden = true;
    markRead();
    return;
  }
  if (!navigator.onLine) showBanner(t("chat.offline"), "conn");
  else if (S && S.everOpen) showBanner(t("chat.reconnecting"), "conn");
  else if (state === "offline") showBanner(t("chat.connecting"), "conn");
  ui.banner.dataset.kind = "conn";
}

window.addEventListener("offline", () => { if (S && S.client) showConnState(S.client.connState); });
window.addEventListener("online", () => { if (S && S.client) showConnState(S.client.connState); });

// -- composing --------------------------------------------------------------------------------

function onTyping() {
  if (!S || !S.client || S.closed || !ui.input.value) return;
  const now = Date.now();
  if (now - S.lastTypingSent >= TYPING_EVERY_MS && S.client.typing(S.conv)) S.lastTypingSent = now;
}

function submit() {
  const text = ui.input.value.replace(/^\s+|\s+$/g, "");
  if (!text || !S || !S.client || S.closed) return;
  const max = config.max_text_chars || 16000;
  if (text.length > max) {
    showBanner(t("chat.too_long", { count: text.length, max }), "error", 6_000);
    return;
  }
  if (sendText(text)) {
    ui.input.value = "";
    autosize();
  }
}

function sendText(text) {
  let id;
  try {
    id = S.client.send(S.conv, text);
  } catch (err) {
    showBanner(err.code === "outbox_full" ? t("chat.outbox_full") : t("chat.error", { message: err.message }), "error", 6_000);
    return false;
  }
  addPendingRow(id, text);
  return true;
}

// -- earlier messages -------------------------------------------------------------------------

async function loadEarlier() {
  if (!S || S.firstSeq === null || S.firstSeq <= 1) return;
  const first = S.firstSeq;
  const after = Math.max(0, first - 1 - PAGE);
  ui.earlier.disabled = true;
  ui.earlier.textContent = t("chat.loading");
  const height = ui.body.scrollHeight;
  const top = ui.body.scrollTop;
  try {
    const page = await api(`/v1/chat/${S.conv}/messages?after=${after}&limit=${first - 1 - after}`, { token: S.session.token });
    const firstRow = ui.list.querySelector(":scope > .row[data-seq]");
    for (const m of page.messages) {
      if (m.seq >= first || S.rows.has(m.seq)) continue;
      const row = msgRow(m);
      if (m.client_msg_id) row.dataset.cmid = m.client_msg_id;
      S.rows.set(m.seq, row);
      if (firstRow) ui.list.insertBefore(row, firstRow); else ui.list.prepend(row);
    }
    S.firstSeq = after + 1;
    ui.body.scrollTop = top + (ui.body.scrollHeight - height);  // keep the reader's place
  } catch (err) {
    showBanner(t("chat.error", { message: err.message }), "error", 6_000);
  } finally {
    ui.earlier.disabled = false;
    ui.earlier.textContent = t("chat.load_earlier");
    updateEarlier();
    updateEmpty();
  }
}

// -- boot -------------------------------------------------------------------------------------

async function boot() {
  setupChrome();
  try {
    config = await api("/v1/config");
  } catch {
    // The page still works with the ws_url of the create answer and default limits.
  }
  if (config && config.max_text_chars) ui.input.maxLength = config.max_text_chars;
  await restart({});
  if (!embed) ui.input.focus({ preventScroll: true });
}

boot();
