// kefu agent workbench: my conversations and the waiting queue, the conversation view, the
// visitor's profile, quick replies, notifications. The WebSocket side (resume, dedup, outbox)
// is kefu-client.js; this file keeps the page's view of each conversation, keyed by seq, so a
// message reaching it twice (live, replayed, paged) is shown once.
// Every value from the server is rendered as text (h() builds text nodes), never as HTML.

import { KefuClient, h } from './kefu-client.js';
import { applyStrings, pageLang, registerStrings, t } from './i18n.js';

const TOKEN_KEY = 'kefu.agent.token';
const LANG_KEY = 'kefu.lang';
const PAGE = 50;                 // messages per history page
const LIST_REFRESH_MS = 3000;    // the queue is not pushed to agents: poll it
const STATS_REFRESH_MS = 5000;   // the open session's CPU time and memory
const TYPING_SEND_MS = 2000;     // at most one `typing` frame per this
const TYPING_SHOW_MS = 4000;     // how long the visitor's typing indicator stays
const SOUND_GAP_MS = 1500;       // at most one notification sound per this
const MAX_CLOSED_SHOWN = 20;     // closed conversations kept in the list (oldest dropped)
const MAX_MSGS_PER_CONV = 2000;  // messages kept per conversation in the page (oldest dropped)
const BASE_TITLE = 'kefu';

const STRINGS = {
  zh: {
    login_heading: '客服工作台', conversations: '会话', agent_token: '客服令牌', login: '登录', language: '语言',
    my_status: '我的状态', online: '在线', away: '离开', offline: '离线', enable_notify: '开启通知',
    notify_on: '通知已开', notify_denied: '通知被阻止', logout: '退出', my_convs: '我的会话',
    queue: '排队中', no_convs: '暂无会话', queue_empty: '没有排队的访客', pick_conv: '从左侧选择一个会话',
    back: '返回列表', profile: '访客资料', transfer: '转接', close_conv: '结束', transfer_to: '转接给',
    transfer_go: '确认转接', cancel: '取消', older: '加载更早的消息', message: '消息',
    composer_hint: '输入回复，Enter 发送，Shift+Enter 换行', send: '发送', back_to_conv: '返回会话',
    session_stats: '会话资源', cpu_time: 'CPU 时间', memory: '内存', quick_replies: '快捷回复',
    qr_search: '搜索快捷回复', accept: '接入', position: '第 {n} 位', waiting: '等待 {t}',
    visitor: '访客', visitor_n: '访客 {id}', typing: '{name} 正在输入…', closed_by: '会话已结束（{by}）',
    closed_tag: '已结束', by_visitor: '访客', by_agent: '客服', by_expired: '超时', by_admin: '管理员',
    transferred: '已转接给 {to}', agents: '客服', groups: '分组', connected: '已连接',
    connecting: '连接中…', disconnected: '已断开，正在重连…', new_conv: '新会话：{name}',
    new_msg: '{name} 发来新消息', bot: '机器人', system: '系统', read: '已读', sent: '已送达',
    sending: '发送中', failed: '发送失败：{msg}', no_qr: '没有快捷回复', unread: '{n} 条未读',
    f_name: '名称', f_user_id: '用户 ID', f_visitor_id: '访客 ID', f_page: '页面', f_url: '页面',
    f_title: '页面标题', f_referrer: '来源', f_user_agent: '浏览器', f_ua: '浏览器', f_language: '语言',
    f_lang: '语言', auth_failed: '令牌被拒绝，请重新登录', bad_token: '令牌无效', you: '我',
    no_profile: '没有更多资料', accepted_gone: '这个会话已被别人接入', no_target: '没有可转接的对象', now_online: '已切换为在线',
  },
  en: {
    login_heading: 'Agent workbench', conversations: 'Conversations', agent_token: 'Agent token', login: 'Log in', language: 'Language',
    my_status: 'My status', online: 'Online', away: 'Away', offline: 'Offline',
    enable_notify: 'Notify me', notify_on: 'Notifying',
    notify_denied: 'Notices blocked', logout: 'Log out', my_convs: 'My conversations',
    queue: 'Waiting', no_convs: 'No conversations', queue_empty: 'Nobody is waiting',
    pick_conv: 'Pick a conversation on the left', back: 'Back to the list', profile: 'Visitor',
    transfer: 'Transfer', close_conv: 'Close', transfer_to: 'Transfer to', transfer_go: 'Transfer',
    cancel: 'Cancel', older: 'Load earlier messages', message: 'Message',
    composer_hint: 'Type a reply: Enter sends, Shift+Enter starts a new line', send: 'Send',
    back_to_conv: 'Back to the conversation', session_stats: 'Session resources', cpu_time: 'CPU time',
    memory: 'Memory', quick_replies: 'Quick replies', qr_search: 'Search quick replies',
    accept: 'Accept', position: '#{n} in line', waiting: 'waiting {t}', visitor: 'Visitor',
    visitor_n: 'Visitor {id}', typing: '{name} is typing…', closed_by: 'Conversation closed ({by})',
    closed_tag: 'closed', by_visitor: 'visitor', by_agent: 'agent', by_expired: 'expired',
    by_admin: 'admin', transferred: 'Transferred to {to}', agents: 'Agents', groups: 'Groups',
    connected: 'Connected', connecting: 'Connecting…', disconnected: 'Disconnected, reconnecting…',
    new_conv: 'New conversation: {name}', new_msg: 'New message from {name}', bot: 'Bot',
    system: 'System', read: 'Read', sent: 'Delivered', sending: 'Sending', failed: 'Not sent: {msg}',
    no_qr: 'No quick replies', unread: '{n} unread', f_name: 'Name', f_user_id: 'User ID',
    f_visitor_id: 'Visitor ID', f_page: 'Page', f_url: 'Page', f_title: 'Page title',
    f_referrer: 'Referrer', f_user_agent: 'Browser', f_ua: 'Browser', f_language: 'Language',
    f_lang: 'Language', auth_failed: 'The token was refused: log in again', bad_token: 'Invalid token',
    you: 'me', no_profile: 'Nothing more is known', accepted_gone: 'Someone else took this conversation',
    no_target: 'Nobody to transfer to', now_online: 'You are online now',
  },
};

registerStrings('agent', STRINGS);

// -- language ----------------------------------------------------------------------------------

// The page language: ?lang=, then the saved choice, then the browser's.
let lang = pageLang(LANG_KEY);

function tr(key, vars = {}) {
  return t('agent.' + key, lang, vars);
}

function applyLang() {
  applyStrings(tr, lang);
  $('lang-select').value = lang;
  $('login-lang').value = lang;
}

function setLang(value) {
  lang = value;
  localStorage.setItem(LANG_KEY, lang);
  applyLang();
  if (me) {
    renderConvList();
    renderQueue();
    renderConnState();
    renderNotifyButton();
    if (openId) openConversation(openId, { keepView: true });
  }
}

// -- small helpers -----------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

function fmtTime(ts) {
  const d = new Date(ts);
  const now = new Date();
  const hm = d.toLocaleTimeString(lang === 'zh' ? 'zh-CN' : 'en', { hour: '2-digit', minute: '2-digit' });
  if (d.toDateString() === now.toDateString()) return hm;
  return `${d.getMonth() + 1}-${d.getDate()} ${hm}`;
}

function fmtWait(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m`;
  return `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m`;
}

function fmtBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / 1024 / 1024).toFixed(2)} MB`;
}

function fmtCpu(s) {
  if (s < 1) return `${(s * 1000).toFixed(2)} ms`;
  return `${s.toFixed(3)} s`;
}

function visitorName(v) {
  if (!v) return tr('visitor');
  return v.name || v.user_id || tr('visitor_n', { id: String(v.id || '').slice(-6) });
}

function isHttpUrl(s) {
  return typeof s === 'string' && /^https?:\/\/[^\s]+$/i.test(s);
}

// -- REST --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, tokenOverride, body) {
  let res;
  const headers = { Authorization: `Bearer ${tokenOverride ?? token}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'network', e.message);
  }
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = data && data.error;
    throw new ApiError(res.status, err?.code ?? `http_${res.status}`, err?.message ?? `HTTP ${res.status}`);
  }
  return data;
}

// -- state -------------------------------------------------------------------------------------

let token = sessionStorage.getItem(TOKEN_KEY) || '';
let me = null;           // GET /v1/agent/me
let client = null;       // KefuClient
let config = null;       // GET /v1/config
let myStatus = 'online';
let openId = null;       // the conversation shown in the centre
let queue = [];          // REST queue entries
const convs = new Map(); // conv → Conversation record (see newConv)
const presence = new Map(); // agent id → {id, status, active_chats}
const welcomeConvs = new Map(); // conv → {epoch, top_seq, status} of the last welcome
let listTimer = null;
let statsTimer = null;
let typingSentAt = 0;
let lastSoundAt = 0;
let lastAccept = null;  // the conversation of the last `accept` (its error names no conversation)
let listSeq = 0;         // orders REST list answers: an older answer never overwrites a newer

function newConv(id) {
  return {
    id,
    status: 'assigned',
    epoch: null,
    top_seq: 0,
    read_seq: 0,
    visitor: null,
    msgs: new Map(),        // seq → msg
    last: null,             // newest msg
    oldest: null,           // lowest seq loaded
    tailLoaded: false,
    loadingOlder: false,
    visitorRead: 0,         // the visitor's read mark
    closed: null,           // {by, reason}
    seenAt: Date.now(),     // last time the server said it is mine (REST list or `assigned`)
    created_ts: Date.now(),
    quietUntil: 0,          // seqs ≤ this arrived with `assigned`: no per-message notification
  };
}

function conv(id) {
  let c = convs.get(id);
  if (!c) {
    c = newConv(id);
    convs.set(id, c);
  }
  return c;
}

/** Forget a conversation that is no longer shown (closed and pruned, moved, gone). */
function dropConv(id) {
  convs.delete(id);
  drafts.delete(id);
  client?.forget(id);
}

function unread(c) {
  if (c.closed) return 0;
  return Math.max(0, c.top_seq - c.read_seq);
}

// -- login / logout ----------------------------------------------------------------------------

// The agent's own token is traded for a session token (POST /v1/agent/login): only that one
// is kept (sessionStorage), the Log out button revokes it, and a refused one (WS 1008, REST
// 401/403) brings back the login form.
async function login(candidate) {
  const session = await api('POST', '/v1/agent/login', candidate, {}).catch((e) => {
    if (e.status === 401 || e.status === 403) throw new Error(`${tr('bad_token')}: ${e.message}`);
    throw e;
  });
  const profile = await api('GET', '/v1/agent/me', session.token);
  token = session.token;
  sessionStorage.setItem(TOKEN_KEY, token);
  me = profile;
  config = await api('GET', '/v1/config');
  start();
}

function start() {
  $('login-view').hidden = true;
  $('wb').hidden = false;
  $('me-name').textContent = me.name || me.id;
  myStatus = me.status === 'away' ? 'away' : 'online';
  $('status-select').value = myStatus;
  renderQuickReplies();
  renderNotifyButton();
  client = new KefuClient({ wsUrl: config.ws_url, token, storageKey: `kefu.agent.${me.id}` });
  wireClient(client);
  client.connect();
  renderConnState();
  refreshLists();
  listTimer = setInterval(refreshLists, LIST_REFRESH_MS);
  updateTitle();
}

/** The Log out button: the page is logged out, then the session token revoked on the server
 *  (after the WebSocket is closed here, so its 1008 is not taken for a refusal). */
function signOut() {
  const ending = token;
  logout();
  if (ending) api('POST', '/v1/agent/logout', ending).catch(() => {});
}

function logout(message = '') {
  if (client) client.close();
  client = null;
  clearInterval(listTimer);
  clearInterval(statsTimer);
  listTimer = statsTimer = null;
  token = '';
  me = null;
  openId = null;
  sessionStorage.removeItem(TOKEN_KEY);
  convs.clear();
  drafts.clear();
  queue = [];
  presence.clear();
  $('conv-list').replaceChildren();
  $('queue-list').replaceChildren();
  $('msg-list').replaceChildren();
  $('conv-open').hidden = true;
  $('conv-none').hidden = false;
  $('wb').hidden = true;
  $('wb').classList.remove('has-conv');
  $('login-view').hidden = false;
  $('login-error').textContent = message;
  $('agent-token').value = '';
  $('agent-token').focus();
  document.title = BASE_TITLE;
}

// -- the WebSocket -----------------------------------------------------------------------------

function wireClient(cl) {
  const on = (type, fn) => cl.addEventListener(type, (ev) => { if (cl === client) fn(ev.detail); });
  on('welcome', onWelcome);
  on('msg', onMsg);
  on('assigned', onAssigned);
  on('closed', onClosed);
  on('transferred', onTransferred);
  on('typing', onTyping);
  on('read', onRead);
  on('presence', onPresence);
  on('status', (f) => { myStatus = f.status; $('status-select').value = f.status === 'away' ? 'away' : 'online'; });
  on('resumed', onResumed);
  on('pending', onPending);
  on('ack', onAck);
  on('error', onError);
  on('connstate', renderConnState);
  on('auth_failed', () => logout(tr('auth_failed')));
}

function onWelcome(w) {
  welcomeConvs.clear();
  const mine = new Set();
  for (const s of w.convs || []) {
    welcomeConvs.set(s.conv, s);
    mine.add(s.conv);
    const c = conv(s.conv);
    c.epoch = s.epoch;
    c.seenAt = Date.now();
    c.top_seq = Math.max(c.top_seq, s.top_seq);
    if (client.lastSeq(s.conv) === null) {
      client.track(s.conv, s.epoch, s.top_seq);
      // A message stored after this welcome was made but before the connection was registered
      // reached no socket: one `sync` from top_seq brings it (the client emits what is new).
      client.sync(s.conv, s.top_seq, 50).catch(() => {});
    }
  }
  // Resume points of conversations that are no longer mine would be refused at every hello.
  for (const id of [...client.convs.keys()]) {
    if (!mine.has(id) && !(convs.get(id) && !convs.get(id).closed)) client.forget(id);
  }
  client.command({ type: 'status', status: myStatus });
  refreshLists();
  if (openId && convs.get(openId) && !convs.get(openId).tailLoaded) loadTail(convs.get(openId));
}

function onResumed(f) {
  if (f.recovered !== false) return;
  // More than the server replays were missed, or the epoch changed: reload from the top.
  const c = convs.get(f.conv);
  if (!c) return;
  const s = welcomeConvs.get(f.conv);
  c.msgs.clear();
  c.last = null;
  c.oldest = null;
  c.tailLoaded = false;
  if (s) {
    c.epoch = s.epoch;
    c.top_seq = s.top_seq;
    client.track(f.conv, s.epoch, s.top_seq);
  }
  if (openId === f.conv) {
    $('msg-list').replaceChildren();
    loadTail(c);
  }
}

function onMsg(m) {
  const c = conv(m.conv);
  if (!addMessage(c, m)) return;
  const mine = m.from && m.from.role === 'agent' && me && m.from.id === me.id;
  if (mine) c.read_seq = Math.max(c.read_seq, m.seq);
  if (openId === m.conv) {
    if (m.from && m.from.role === 'visitor') {
      clearTimeout(typingHide);
      $('typing').textContent = ''; // the message the visitor was typing has come
    }
    renderMessages(c, { stick: true });
    markRead(c);
  }
  if (m.from && m.from.role === 'visitor' && m.seq > c.quietUntil && unread(c) > 0 && !isWatching(m.conv)) {
    notify(tr('new_msg', { name: visitorName(c.visitor) }), m.text, m.conv);
  }
  if (!c.visitor) refreshLists();
  renderConvList();
  updateTitle();
}

/** Add one message to the page's copy; false when that seq is there already. */
function addMessage(c, m) {
  if (c.msgs.has(m.seq)) return false;
  c.msgs.set(m.seq, m);
  if (c.msgs.size > MAX_MSGS_PER_CONV) {
    // Full: the oldest goes (paging back stops at the bound, see renderMessages).
    const drop = Math.min(...c.msgs.keys());
    c.msgs.delete(drop);
    c.oldest = drop + 1;
    if (drop === m.seq) return false;
  } else if (c.oldest === null || m.seq < c.oldest) {
    c.oldest = m.seq;
  }
  if (!c.last || m.seq > c.last.seq) c.last = m;
  c.top_seq = Math.max(c.top_seq, m.seq);
  if (c.epoch === null && Number.isInteger(m.epoch)) c.epoch = m.epoch;
  return true;
}

function onAssigned(f) {
  const c = conv(f.conv);
  const isNew = c.closed !== null || c.status !== 'assigned' || !c.visitorSeen;
  c.status = 'assigned';
  c.closed = null;
  c.seenAt = Date.now();
  if (f.visitor) {
    c.visitor = f.visitor;
    c.visitorSeen = true;
  }
  if (Number.isInteger(f.epoch)) c.epoch = f.epoch;
  const recent = f.messages || [];
  for (const m of recent) c.quietUntil = Math.max(c.quietUntil, m.seq);
  // The messages follow as `msg` events (kefu-client.js); the ones the client had delivered
  // already are added here, so a conversation transferred back shows its whole tail.
  for (const m of recent) addMessage(c, m);
  if (recent.length && recent[0].seq <= 1) c.tailLoaded = true;
  if (isNew) {
    const lastVisitor = [...recent].reverse().find((m) => m.from && m.from.role === 'visitor');
    if (!isWatching(f.conv)) notify(tr('new_conv', { name: visitorName(c.visitor) }), lastVisitor ? lastVisitor.text : '', f.conv);
  }
  renderConvList();
  updateTitle();
  if (openId === f.conv) openConversation(f.conv, { keepView: true });
}

function onClosed(f) {
  const c = convs.get(f.conv);
  if (!c) return;
  c.closed = { by: f.by, reason: f.reason };
  c.status = 'closed';
  pruneClosed();
  renderConvList();
  updateTitle();
  if (openId === f.conv) renderConvState(c);
}

function pruneClosed() {
  const closed = [...convs.values()].filter((c) => c.closed && c.id !== openId);
  closed.sort((a, b) => (a.last?.ts ?? 0) - (b.last?.ts ?? 0));
  while (closed.length > MAX_CLOSED_SHOWN) {
    dropConv(closed.shift().id);
  }
}

function onTransferred(f) {
  if (convs.has(f.conv)) dropConv(f.conv);
  toast(tr('transferred', { to: f.to }));
  if (openId === f.conv) showNone();
  renderConvList();
  updateTitle();
  refreshLists();
}

let typingHide = null;

function onTyping(f) {
  if (f.conv !== openId || !f.from || f.from.role !== 'visitor') return;
  const c = convs.get(f.conv);
  $('typing').textContent = tr('typing', { name: visitorName(c?.visitor) });
  clearTimeout(typingHide);
  typingHide = setTimeout(() => { $('typing').textContent = ''; }, TYPING_SHOW_MS);
}

function onRead(f) {
  if (!f.from || f.from.role !== 'visitor') return;
  const c = convs.get(f.conv);
  if (!c || f.seq <= c.visitorRead) return;
  c.visitorRead = f.seq;
  if (openId === f.conv) renderReadMarks(c);
}

function onPresence(f) {
  if (!f.agent) return;
  presence.set(f.agent.id, f.agent);
  if (!$('transfer-form').hidden) fillTransferTargets();
}

function onPending(f) {
  if (f.failed && f.failed.conv === openId) {
    $('send-error').textContent = tr('failed', { msg: f.error?.message || f.error?.code || '' });
  }
  if (openId) {
    const c = convs.get(openId);
    if (c) renderMessages(c, { stick: true });
  }
}

function onAck(f) {
  const c = convs.get(f.conv);
  if (c && openId === f.conv) renderMessages(c, { stick: true });
}

function onError(f) {
  if (f.ref === 'hello') return; // a resume point of a conversation no longer ours: harmless
  if (f.ref === 'accept') {
    // Refused: taken by someone else, or given to us meanwhile by the queue (not an error).
    const conv = lastAccept;
    setTimeout(() => {
      const c = conv && convs.get(conv);
      if (!c || c.closed) toast(f.message || tr('accepted_gone'));
    }, 600);
    refreshLists();
    return;
  }
  if (f.ref === 'sync' || f.ref === 'read' || f.ref === 'typing') return;
  toast(f.message || f.code);
}

// -- REST lists --------------------------------------------------------------------------------

async function refreshLists() {
  if (!token || !me) return;
  const mySeq = ++listSeq;
  const askedAt = Date.now();
  let data;
  try {
    data = await api('GET', '/v1/agent/conversations');
  } catch (e) {
    if (e.status === 401 || e.status === 403) logout(tr('auth_failed'));
    return;
  }
  if (mySeq !== listSeq || !me) return;
  const listed = new Set();
  for (const r of data.conversations || []) {
    listed.add(r.session_id);
    const c = conv(r.session_id);
    c.seenAt = Date.now();
    c.status = r.status;
    if (r.status !== 'closed') c.closed = null;
    if (r.visitor) {
      c.visitor = r.visitor;
      c.visitorSeen = true;
    }
    if (c.epoch === null) c.epoch = r.epoch;
    c.top_seq = Math.max(c.top_seq, r.top_seq);
    c.read_seq = Math.max(c.read_seq, r.read_seq ?? 0);
    c.created_ts = r.created_ts ?? c.created_ts;
    if (r.last_message && (!c.last || r.last_message.seq > c.last.seq)) c.lastPreview = r.last_message;
  }
  // Conversations the server no longer lists as mine (closed or moved while this page missed
  // the frame): dropped, unless the news of them is newer than the question.
  for (const c of [...convs.values()]) {
    if (!listed.has(c.id) && !c.closed && c.seenAt < askedAt - 1000) {
      if (c.id === openId) {
        c.closed = { by: 'agent', reason: 'gone' };
        c.status = 'closed';
        renderConvState(c);
      } else {
        dropConv(c.id);
      }
    }
  }
  queue = data.queue || [];
  renderConvList();
  renderQueue();
  updateTitle();
  if (openId && convs.get(openId)) renderProfile(convs.get(openId));
}

// -- the left column ---------------------------------------------------------------------------

function sortedConvs() {
  return [...convs.values()].sort((a, b) => {
    if (!!a.closed !== !!b.closed) return a.closed ? 1 : -1;
    const ta = a.last?.ts ?? a.lastPreview?.ts ?? a.created_ts;
    const tb = b.last?.ts ?? b.lastPreview?.ts ?? b.created_ts;
    return tb - ta;
  });
}

function renderConvList() {
  const list = $('conv-list');
  const focused = document.activeElement?.closest?.('#conv-list [data-conv]')?.dataset.conv;
  const items = sortedConvs().map((c) => {
    const n = unread(c);
    const last = c.last || c.lastPreview;
    const preview = last ? `${last.from?.role === 'agent' ? tr('you') + ': ' : ''}${last.text}` : '';
    const name = visitorName(c.visitor);
    const button = h(
      'button',
      {
        type: 'button',
        class: 'conv-item' + (c.id === openId ? ' active' : '') + (c.closed ? ' closed' : ''),
        dataset: { conv: c.id },
        'aria-current': c.id === openId ? 'true' : null,
        'aria-label': `${name}${n ? ', ' + tr('unread', { n }) : ''}${c.closed ? ', ' + tr('closed_tag') : ''}`,
        on: { click: () => openConversation(c.id) },
      },
      h('span', { class: 'avatar', 'aria-hidden': 'true' }, name.slice(0, 1).toUpperCase()),
      h('span', { class: 'conv-main' },
        h('span', { class: 'conv-line' },
          h('span', { class: 'conv-name' }, name),
          h('span', { class: 'conv-time' }, last ? fmtTime(last.ts) : '')),
        h('span', { class: 'conv-line' },
          h('span', { class: 'conv-preview' }, c.closed ? `[${tr('closed_tag')}] ${preview}` : preview),
          n ? h('span', { class: 'badge unread-badge', 'aria-hidden': 'true' }, String(n > 99 ? '99+' : n)) : null)),
    );
    return h('li', { dataset: { conv: c.id } }, button);
  });
  list.replaceChildren(...items);
  $('conv-empty').hidden = items.length > 0;
  $('my-count').textContent = items.length ? String([...convs.values()].filter((c) => !c.closed).length) : '';
  if (focused) list.querySelector(`button[data-conv="${CSS.escape(focused)}"]`)?.focus();
}

function renderQueue() {
  const list = $('queue-list');
  const now = Date.now();
  const focused = document.activeElement?.closest?.('#queue-list [data-conv]')?.dataset.conv;
  const items = queue.map((q) => {
    const name = visitorName(q.visitor);
    return h(
      'li',
      { class: 'queue-item', dataset: { conv: q.session_id } },
      h('span', { class: 'avatar muted', 'aria-hidden': 'true' }, name.slice(0, 1).toUpperCase()),
      h('span', { class: 'conv-main' },
        h('span', { class: 'conv-name' }, name),
        h('span', { class: 'conv-preview' },
          `${tr('position', { n: q.position })} · ${tr('waiting', { t: fmtWait(now - q.created_ts) })}${q.group ? ' · ' + q.group : ''}`)),
      h('button', {
        type: 'button',
        class: 'btn small primary accept-btn',
        dataset: { conv: q.session_id },
        'aria-label': `${tr('accept')} ${name}`,
        on: { click: (ev) => accept(q.session_id, ev.currentTarget) },
      }, tr('accept')),
    );
  });
  list.replaceChildren(...items);
  $('queue-empty').hidden = items.length > 0;
  $('queue-count').textContent = items.length ? String(items.length) : '';
  if (focused) list.querySelector(`button[data-conv="${CSS.escape(focused)}"]`)?.focus();
}

function accept(id, button) {
  if (!client) return;
  button.disabled = true;
  if (myStatus !== 'online') {
    // The server gives conversations only to online agents: taking one means being at work.
    myStatus = 'online';
    $('status-select').value = 'online';
    client.command({ type: 'status', status: 'online' });
    toast(tr('now_online'));
  }
  lastAccept = id;
  client.command({ type: 'accept', conv: id });
  setTimeout(refreshLists, 300);
}

// -- the conversation view ---------------------------------------------------------------------

function showNone() {
  openId = null;
  clearInterval(statsTimer);
  statsTimer = null;
  $('conv-open').hidden = true;
  $('conv-none').hidden = false;
  $('msg-list').replaceChildren();
  $('profile').replaceChildren();
  $('wb').dataset.view = 'list';
  $('wb').classList.remove('has-conv');
}

function openConversation(id, { keepView = false } = {}) {
  const c = convs.get(id);
  if (!c) return;
  const switching = openId !== id;
  openId = id;
  $('conv-none').hidden = true;
  $('conv-open').hidden = false;
  $('wb').classList.add('has-conv');
  if (!keepView) $('wb').dataset.view = 'conv';
  $('conv-title').textContent = visitorName(c.visitor);
  if (switching) {
    $('msg-list').replaceChildren();
    $('typing').textContent = '';
    $('send-error').textContent = '';
    $('transfer-form').hidden = true;
    $('composer-input').value = draftOf(id);
    $('stat-cpu').textContent = '—';
    $('stat-mem').textContent = '—';
  }
  renderConvState(c);
  renderProfile(c);
  renderMessages(c, { stick: true, force: switching });
  if (!c.tailLoaded) loadTail(c);
  markRead(c);
  renderConvList();
  updateTitle();
  clearInterval(statsTimer);
  refreshStats();
  statsTimer = setInterval(refreshStats, STATS_REFRESH_MS);
  if (switching && !keepView) $('composer-input').focus();
}

function renderConvState(c) {
  const closed = !!c.closed;
  $('conv-sub').textContent = closed ? tr('closed_tag') : (c.visitor?.metadata?.page || c.visitor?.metadata?.url || '');
  $('conv-notice').textContent = closed ? tr('closed_by', { by: tr('by_' + c.closed.by) }) : '';
  $('composer-input').disabled = closed;
  $('send-btn').disabled = closed;
  $('transfer-btn').disabled = closed;
  $('close-btn').disabled = closed;
  if (closed) $('transfer-form').hidden = true;
}

const drafts = new Map(); // conv → unsent text, bounded by the conversations shown

function draftOf(id) {
  return drafts.get(id) || '';
}

/** Fetch `limit` messages after `after` (WebSocket `sync` when connected, else REST). */
async function fetchPage(id, after, limit) {
  if (client && client.connState === 'open') {
    try {
      const f = await client.sync(id, after, limit);
      return { messages: f.messages || [], more: !!f.more };
    } catch {
      // fall through to REST
    }
  }
  const r = await api('GET', `/v1/chat/${encodeURIComponent(id)}/messages?after=${after}&limit=${limit}`);
  return { messages: r.messages || [], more: !!r.more };
}

async function loadTail(c) {
  if (c.loadingTail) return;
  c.loadingTail = true;
  try {
    const top = Math.max(c.top_seq, client?.lastSeq(c.id) ?? 0);
    const after = Math.max(0, top - PAGE);
    const page = await fetchPage(c.id, after, PAGE);
    for (const m of page.messages) addMessage(c, m);
    c.tailLoaded = true;
    if (c.oldest === null) c.oldest = after + 1;
    if (openId === c.id) {
      renderMessages(c, { stick: true });
      markRead(c);
    }
    renderConvList();
  } catch {
    // The next open or reconnect tries again.
  } finally {
    c.loadingTail = false;
  }
}

async function loadOlder(c) {
  if (c.loadingOlder || !c.oldest || c.oldest <= 1 || c.msgs.size >= MAX_MSGS_PER_CONV) return;
  c.loadingOlder = true;
  const scroller = $('msg-scroll');
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  try {
    const after = Math.max(0, c.oldest - 1 - PAGE);
    const limit = c.oldest - 1 - after;
    const page = await fetchPage(c.id, after, limit);
    for (const m of page.messages) addMessage(c, m);
    c.oldest = Math.min(c.oldest, after + 1);
    if (openId === c.id) {
      renderMessages(c, {});
      scroller.scrollTop = scroller.scrollHeight - fromBottom; // keep the reader's place
    }
  } catch {
    // The button stays: try again.
  } finally {
    c.loadingOlder = false;
  }
}

function senderLabel(m) {
  const f = m.from || {};
  if (f.role === 'visitor') return null;
  if (f.role === 'bot') return `${f.name || tr('bot')} · ${tr('bot')}`;
  if (f.role === 'system') return null;
  if (me && f.id === me.id) return null;
  return f.name || f.id;
}

function messageElement(m) {
  const f = m.from || {};
  const own = f.role === 'agent' && me && f.id === me.id;
  const role = own ? 'own' : f.role === 'agent' ? 'agent' : f.role || 'visitor';
  const label = senderLabel(m);
  return h(
    'li',
    { class: `msg role-${role}`, dataset: { seq: String(m.seq), role: f.role || '' } },
    label ? h('span', { class: 'msg-from' }, label) : null,
    h('div', { class: 'bubble' }, m.text),
    h('span', { class: 'msg-meta' },
      h('time', { dateTime: new Date(m.ts).toISOString() }, fmtTime(m.ts)),
      own ? h('span', { class: 'readmark', 'aria-label': tr('sent') }, '✓') : null),
  );
}

function pendingElement(p) {
  return h(
    'li',
    { class: 'msg role-own pending', dataset: { pending: p.client_msg_id } },
    h('div', { class: 'bubble' }, p.text),
    h('span', { class: 'msg-meta' }, h('span', { class: 'readmark', 'aria-label': tr('sending') }, '…')),
  );
}

/**
 * Bring the list in line with the conversation's messages (sorted by seq) and the messages
 * still waiting for their ack. Elements are keyed by seq, so a re-render adds only what is new
 * (the aria-live region announces new messages, not the whole list).
 */
function renderMessages(c, { stick = false, force = false } = {}) {
  const list = $('msg-list');
  const scroller = $('msg-scroll');
  const atBottom = scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80;
  if (force) list.replaceChildren();
  const have = new Map();
  for (const el of list.children) {
    if (el.dataset.seq) have.set(Number(el.dataset.seq), el);
  }
  const seqs = [...c.msgs.keys()].sort((a, b) => a - b);
  let cursor = list.firstElementChild;
  for (const seq of seqs) {
    let el = have.get(seq);
    if (!el) el = messageElement(c.msgs.get(seq));
    if (el !== cursor) list.insertBefore(el, cursor);
    else cursor = cursor.nextElementSibling;
    have.delete(seq);
  }
  for (const el of have.values()) el.remove();
  // Pending (unacked) messages after the stored ones, unless their msg is shown already.
  const shownIds = new Set();
  for (const m of c.msgs.values()) if (m.client_msg_id) shownIds.add(m.client_msg_id);
  const pend = client ? client.pending(c.id).filter((p) => !shownIds.has(p.client_msg_id)) : [];
  const pendIds = new Set(pend.map((p) => p.client_msg_id));
  for (const el of [...list.querySelectorAll('li.pending')]) {
    if (!pendIds.has(el.dataset.pending)) el.remove();
    else pendIds.delete(el.dataset.pending);
  }
  for (const p of pend) if (pendIds.has(p.client_msg_id)) list.append(pendingElement(p));
  renderReadMarks(c);
  $('older-btn').hidden = !(c.oldest && c.oldest > 1) || c.msgs.size >= MAX_MSGS_PER_CONV;
  if (force || (stick && atBottom)) scroller.scrollTop = scroller.scrollHeight;
}

function renderReadMarks(c) {
  for (const el of $('msg-list').querySelectorAll('li.role-own[data-seq]')) {
    const mark = el.querySelector('.readmark');
    const read = Number(el.dataset.seq) <= c.visitorRead;
    if (mark && mark.classList.contains('read') !== read) {
      mark.classList.toggle('read', read);
      mark.textContent = read ? '✓✓' : '✓';
      mark.setAttribute('aria-label', read ? tr('read') : tr('sent'));
    }
  }
}

/** Is the agent looking at `id` right now (open, and the tab visible)? */
function isWatching(id) {
  return openId === id && document.visibilityState === 'visible';
}

function markRead(c) {
  if (!isWatching(c.id) || c.closed) return;
  const top = c.top_seq;
  if (top <= c.read_seq) return;
  if (client && client.read(c.id, top)) {
    c.read_seq = top;
    renderConvList();
    updateTitle();
  }
}

function sendCurrent() {
  const input = $('composer-input');
  const text = input.value.replace(/\s+$/, '');
  if (!openId || !client || !text.trim()) return;
  const c = convs.get(openId);
  if (!c || c.closed) return;
  const max = config?.max_text_chars;
  if (max && text.length > max) {
    $('send-error').textContent = tr('failed', { msg: `> ${max}` });
    return;
  }
  try {
    client.send(openId, text);
  } catch (e) {
    $('send-error').textContent = tr('failed', { msg: e.message });
    return;
  }
  $('send-error').textContent = '';
  input.value = '';
  drafts.delete(openId);
  renderMessages(c, { stick: true, force: false });
  $('msg-scroll').scrollTop = $('msg-scroll').scrollHeight;
}

// -- the right column --------------------------------------------------------------------------

const PROFILE_ORDER = ['page', 'url', 'title', 'referrer', 'user_agent', 'ua', 'language', 'lang'];

function renderProfile(c) {
  const v = c.visitor || {};
  const rows = [];
  const row = (key, value) => {
    const label = STRINGS[lang]['f_' + key] ? tr('f_' + key) : key;
    const dd = isHttpUrl(value)
      ? h('dd', {}, h('a', { href: value, target: '_blank', rel: 'noopener noreferrer' }, value))
      : h('dd', {}, value);
    rows.push(h('div', { dataset: { field: key } }, h('dt', {}, label), dd));
  };
  if (v.name) row('name', v.name);
  if (v.user_id) row('user_id', v.user_id);
  if (v.id) row('visitor_id', v.id);
  const meta = v.metadata || {};
  const keys = Object.keys(meta).sort((a, b) => {
    const ia = PROFILE_ORDER.indexOf(a), ib = PROFILE_ORDER.indexOf(b);
    return (ia < 0 ? 99 : ia) - (ib < 0 ? 99 : ib) || a.localeCompare(b);
  });
  for (const k of keys) row(k, String(meta[k]));
  if (!rows.length) rows.push(h('p', { class: 'empty' }, tr('no_profile')));
  $('profile').replaceChildren(...rows);
}

async function refreshStats() {
  const id = openId;
  if (!id || document.visibilityState !== 'visible') return;
  const c = convs.get(id);
  if (!c || c.closed) return;
  try {
    const s = await api('GET', `/v1/agent/sessions/${encodeURIComponent(id)}/stats`);
    if (openId !== id) return;
    $('stat-cpu').textContent = fmtCpu(s.cpu_seconds);
    $('stat-mem').textContent = fmtBytes(s.memory_bytes);
  } catch {
    if (openId === id) {
      $('stat-cpu').textContent = '—';
      $('stat-mem').textContent = '—';
    }
  }
}

function renderQuickReplies() {
  const q = $('qr-search').value.trim().toLowerCase();
  const all = (me && me.quick_replies) || [];
  const hits = all.filter((r) => !q || r.title.toLowerCase().includes(q) || r.text.toLowerCase().includes(q));
  const items = hits.map((r) => h('li', {},
    h('button', {
      type: 'button',
      class: 'qr-item',
      title: r.text,
      on: { click: () => insertText(r.text) },
    }, h('span', { class: 'qr-title' }, r.title), h('span', { class: 'qr-text' }, r.text))));
  if (!items.length) items.push(h('li', { class: 'empty' }, tr('no_qr')));
  $('qr-list').replaceChildren(...items);
}

function insertText(text) {
  const input = $('composer-input');
  if (input.disabled) return;
  const start = input.selectionStart ?? input.value.length;
  const end = input.selectionEnd ?? input.value.length;
  input.setRangeText(text, start, end, 'end');
  if (openId) drafts.set(openId, input.value);
  if (matchMedia('(max-width: 860px)').matches) $('wb').dataset.view = 'conv';
  input.focus();
}

// -- transfer ----------------------------------------------------------------------------------

function fillTransferTargets() {
  const select = $('transfer-target');
  const previous = select.value;
  const agents = [...presence.values()]
    .filter((a) => !me || a.id !== me.id)
    .sort((a, b) => (a.status === 'online' ? 0 : 1) - (b.status === 'online' ? 0 : 1) || a.id.localeCompare(b.id));
  const groups = (me && me.groups) || [];
  const children = [];
  if (agents.length) {
    children.push(h('optgroup', { label: tr('agents') },
      ...agents.map((a) => h('option', { value: `agent:${a.id}` }, `${a.id} · ${tr(a.status)} · ${a.active_chats}`))));
  }
  if (groups.length) {
    children.push(h('optgroup', { label: tr('groups') },
      ...groups.map((g) => h('option', { value: `group:${g}` }, g))));
  }
  select.replaceChildren(...children);
  if (previous && [...select.options].some((o) => o.value === previous)) select.value = previous;
  return agents.length + groups.length;
}

function transfer(ev) {
  ev.preventDefault();
  const value = $('transfer-target').value;
  if (!openId || !client || !value) return;
  const [kind, ...rest] = value.split(':');
  const target = rest.join(':');
  const frame = { type: 'transfer', conv: openId };
  if (kind === 'agent') frame.to_agent = target;
  else frame.to_group = target;
  client.command(frame);
  $('transfer-form').hidden = true;
}

// -- notifications -----------------------------------------------------------------------------

let sound = null;

function playSound() {
  const now = Date.now();
  if (now - lastSoundAt < SOUND_GAP_MS) return;
  lastSoundAt = now;
  try {
    if (!sound) sound = new Audio('/static/notify.wav');
    sound.currentTime = 0;
    const p = sound.play();
    if (p && p.catch) p.catch(() => {}); // autoplay refused before any user gesture: silent
  } catch {
    // no audio on this browser
  }
}

function notify(title, body, convId) {
  playSound();
  if (!('Notification' in window) || Notification.permission !== 'granted') return;
  try {
    const n = new Notification(title, { body: String(body || '').slice(0, 200), tag: `kefu-${convId}` });
    n.onclick = () => {
      window.focus();
      if (convs.has(convId)) openConversation(convId);
      n.close();
    };
  } catch {
    // Some platforms allow notifications only from a service worker: the badge and sound remain.
  }
}

function renderNotifyButton() {
  const button = $('notify-btn');
  if (!('Notification' in window)) {
    button.hidden = true;
    return;
  }
  const p = Notification.permission;
  button.textContent = p === 'granted' ? tr('notify_on') : p === 'denied' ? tr('notify_denied') : tr('enable_notify');
  button.disabled = p !== 'default';
}

function updateTitle() {
  let total = 0;
  for (const c of convs.values()) total += unread(c);
  total += queue.length;
  document.title = total > 0 ? `(${total}) ${BASE_TITLE}` : BASE_TITLE;
}

// -- connection state --------------------------------------------------------------------------

function renderConnState() {
  const el = $('conn-state');
  const state = client ? client.connState : 'offline';
  el.dataset.state = state;
  el.textContent = state === 'open' ? tr('connected') : state === 'connecting' ? tr('connecting') : tr('disconnected');
}

let toastTimer = null;

/** A short notice over the page (errors of commands, transfers), gone after a few seconds. */
function toast(text) {
  const el = $('toast');
  el.textContent = text;
  el.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => {
    el.hidden = true;
    el.textContent = '';
  }, 5000);
}

// -- wiring ------------------------------------------------------------------------------------

function init() {
  applyLang();
  document.title = BASE_TITLE;
  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    $('login-error').textContent = '';
    const button = ev.currentTarget.querySelector('button[type=submit]');
    button.disabled = true;
    try {
      await login($('agent-token').value.trim());
    } catch (e) {
      $('login-error').textContent = e.message;
    } finally {
      button.disabled = false;
    }
  });
  $('login-lang').addEventListener('change', (ev) => setLang(ev.target.value));
  $('lang-select').addEventListener('change', (ev) => setLang(ev.target.value));
  $('logout').addEventListener('click', () => signOut());
  $('status-select').addEventListener('change', (ev) => {
    myStatus = ev.target.value;
    client?.command({ type: 'status', status: myStatus });
  });
  $('notify-btn').addEventListener('click', async () => {
    // Asked on a click: browsers ignore (or penalise) permission prompts without a gesture.
    try {
      await Notification.requestPermission();
    } catch {
      // old callback-only API or blocked: the button shows the outcome
    }
    renderNotifyButton();
  });
  $('composer').addEventListener('submit', (ev) => {
    ev.preventDefault();
    sendCurrent();
  });
  const input = $('composer-input');
  input.addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && !ev.shiftKey && !ev.isComposing && ev.keyCode !== 229) {
      ev.preventDefault();
      sendCurrent();
    }
  });
  input.addEventListener('input', () => {
    if (!openId) return;
    if (input.value) drafts.set(openId, input.value);
    else drafts.delete(openId);
    const now = Date.now();
    if (input.value && now - typingSentAt > TYPING_SEND_MS) {
      typingSentAt = now;
      client?.typing(openId);
    }
  });
  $('older-btn').addEventListener('click', () => {
    const c = openId && convs.get(openId);
    if (c) loadOlder(c);
  });
  $('msg-scroll').addEventListener('scroll', () => {
    const c = openId && convs.get(openId);
    if (c && $('msg-scroll').scrollTop < 40 && c.tailLoaded) loadOlder(c);
  }, { passive: true });
  $('back-btn').addEventListener('click', () => {
    $('wb').dataset.view = 'list';
    document.querySelector('#conv-list .conv-item.active')?.focus();
  });
  $('info-btn').addEventListener('click', () => {
    $('wb').dataset.view = 'info';
    $('info-close').focus();
  });
  $('info-close').addEventListener('click', () => {
    $('wb').dataset.view = 'conv';
    $('composer-input').focus();
  });
  $('transfer-btn').addEventListener('click', () => {
    const form = $('transfer-form');
    if (!form.hidden) {
      form.hidden = true;
      return;
    }
    if (!fillTransferTargets()) {
      toast(tr('no_target'));
      return;
    }
    form.hidden = false;
    $('transfer-target').focus();
  });
  $('transfer-cancel').addEventListener('click', () => { $('transfer-form').hidden = true; });
  $('transfer-form').addEventListener('submit', transfer);
  $('close-btn').addEventListener('click', () => {
    if (openId && client) client.command({ type: 'close', conv: openId });
  });
  $('qr-search').addEventListener('input', renderQuickReplies);
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && !$('transfer-form').hidden) {
      $('transfer-form').hidden = true;
      $('transfer-btn').focus();
    }
  });
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState !== 'visible') return;
    const c = openId && convs.get(openId);
    if (c) {
      markRead(c);
      refreshStats();
    }
  });
  if (token) {
    api('GET', '/v1/agent/me')
      .then(async (profile) => {
        me = profile;
        config = await api('GET', '/v1/config');
        start();
      })
      .catch((e) => {
        sessionStorage.removeItem(TOKEN_KEY);
        token = '';
        $('login-error').textContent = e.message;
      });
  } else {
    $('agent-token').focus();
  }
}

init();
