// kefu admin page: agents, knowledge base, live figures. REST only (PROTOCOL.md, /v1/admin/*).
// Every value from the server is rendered as text (textContent / text nodes), never as HTML.

import { applyStrings, pageLang, registerStrings, t } from './i18n.js';

const TOKEN_KEY = 'kefu.admin.token';
const LANG_KEY = 'kefu.lang';
const STATS_INTERVAL_MS = 2000;
const AGENTS_EVERY_TICKS = 5; // the agents' status and load: every fifth figures refresh (10 s)

const STRINGS = {
  zh: {
    admin_title: 'kefu 管理', language: '语言', logout: '退出登录', login_heading: '管理员登录',
    admin_token: '管理员令牌', login: '登录', live_heading: '实时数据',
    fig_conn_visitor: '访客连接', fig_conn_agent: '客服连接', fig_conv_open: '进行中会话',
    fig_conv_bot: '机器人会话', fig_conv_queued: '排队会话', fig_conv_assigned: '人工会话',
    fig_queue: '队列长度', fig_rate: '消息/秒', fig_cache: '缓存命中率', fig_uptime: '运行时间',
    agents_heading: '客服', refresh: '刷新', create_agent: '新建客服', name: '名称', weight: '权重',
    max_chats: '最大会话数', groups_hint: '分组（逗号分隔）', groups: '分组', create: '创建',
    token_once: '新客服的令牌（只显示这一次）：', copy: '复制', copied: '已复制', dismiss: '关闭',
    status: '状态', active_chats: '当前会话', disabled: '停用', actions: '操作', save: '保存',
    delete: '删除', kb_heading: '知识库', reload: '重新加载', kb_version: '版本', kb_entries: '条目',
    search_label: '检索知识库', search: '搜索', no_hits: '没有结果', score: '相似度',
    reloaded: '已加载版本 {version}，共 {entries} 条', confirm_delete: '删除客服 {id}？',
    saved: '已保存', bad_token: '令牌无效', network: '网络错误：{message}', updated: '更新于 {time}',
    online: '在线', away: '离开', offline: '离线', kb_broken: '知识库有错误：{error}',
    agent_name_of: '客服 {id}',
    nodes_heading: '集群节点', node: '节点', node_state: '状态', node_messages: '消息总数',
    node_up: '正常', node_down: '无应答：{error}', node_here: '（本节点）',
  },
  en: {
    admin_title: 'kefu admin', language: 'Language', logout: 'Log out', login_heading: 'Admin login',
    admin_token: 'Admin token', login: 'Log in', live_heading: 'Live figures',
    fig_conn_visitor: 'Visitor connections', fig_conn_agent: 'Agent connections',
    fig_conv_open: 'Open conversations', fig_conv_bot: 'With the bot', fig_conv_queued: 'Queued',
    fig_conv_assigned: 'With an agent', fig_queue: 'Queue length', fig_rate: 'Messages/s',
    fig_cache: 'Cache hit rate', fig_uptime: 'Uptime', agents_heading: 'Agents', refresh: 'Refresh',
    create_agent: 'New agent', name: 'Name', weight: 'Weight', max_chats: 'Max chats',
    groups_hint: 'Groups (comma separated)', groups: 'Groups', create: 'Create',
    token_once: 'The new agent\u2019s token (shown this once):', copy: 'Copy', copied: 'Copied',
    dismiss: 'Dismiss', status: 'Status', active_chats: 'Active chats', disabled: 'Disabled',
    actions: 'Actions', save: 'Save', delete: 'Delete', kb_heading: 'Knowledge base',
    reload: 'Reload', kb_version: 'Version', kb_entries: 'entries', search_label: 'Search the knowledge base',
    search: 'Search', no_hits: 'No hits', score: 'Score',
    reloaded: 'Loaded version {version}, {entries} entries', confirm_delete: 'Delete agent {id}?',
    saved: 'Saved', bad_token: 'Invalid token', network: 'Network error: {message}',
    updated: 'Updated {time}', online: 'online', away: 'away', offline: 'offline',
    kb_broken: 'The knowledge base has an error: {error}', agent_name_of: 'Agent {id}',
    nodes_heading: 'Cluster nodes', node: 'Node', node_state: 'State', node_messages: 'Messages',
    node_up: 'up', node_down: 'no answer: {error}', node_here: ' (this node)',
  },
};

registerStrings('admin', STRINGS);

// The page language: ?lang=, then the saved choice, then the browser's.
let lang = pageLang(LANG_KEY);

/** Translate `key`, filling `{name}` slots from `vars` (values are inserted as text later). */
function tr(key, vars = {}) {
  return t('admin.' + key, lang, vars);
}

function applyLang() {
  applyStrings(tr, lang);
  document.title = tr('admin_title');
  $('lang-select').value = lang;
}

// -- DOM helpers -------------------------------------------------------------------------------

const $ = (id) => document.getElementById(id);

/** Build an element; string children become text nodes, so data is never parsed as HTML. */
function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props ?? {})) {
    if (v == null || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k in el && typeof v !== 'string') el[k] = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c == null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function setText(id, value) {
  const el = $(id);
  if (el.textContent !== value) el.textContent = value;
}

// -- REST --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

let token = sessionStorage.getItem(TOKEN_KEY) || '';

/** One admin call; the error shape of PROTOCOL.md becomes an ApiError with its message. */
async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${token}` } };
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, 'network', tr('network', { message: e.message }));
  }
  if (res.status === 204) return null;
  let data = null;
  try {
    data = await res.json();
  } catch {
    data = null;
  }
  if (!res.ok) {
    const err = data && data.error;
    throw new ApiError(res.status, err?.code ?? 'http_' + res.status, err?.message ?? `HTTP ${res.status}`);
  }
  return data;
}

function showError(id, err) {
  setText(id, err ? (err.message || String(err)) : '');
}

// -- login -------------------------------------------------------------------------------------

async function login(candidate) {
  token = candidate;
  try {
    await api('GET', '/v1/admin/agents');
  } catch (e) {
    token = '';
    sessionStorage.removeItem(TOKEN_KEY);
    throw e.status === 403 || e.status === 401 ? new Error(tr('bad_token') + ': ' + e.message) : e;
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  enterDashboard();
}

function enterDashboard() {
  $('login-view').hidden = true;
  $('dash').hidden = false;
  $('logout').hidden = false;
  loadAgents();
  pollStats();
}

function logout() {
  token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(statsTimer);
  statsTimer = null;
  lastSample = null;
  $('dash').hidden = true;
  $('logout').hidden = true;
  $('login-view').hidden = false;
  $('agents-body').replaceChildren();
  $('hits').replaceChildren();
  $('created-box').hidden = true;
  $('admin-token').value = '';
  $('admin-token').focus();
}

// -- agents ------------------------------------------------------------------------------------

const configAgents = new Set(); // ids the server refused to change (409: declared in the config)

function parseGroups(text) {
  return text.split(/[,，\s]+/).map((g) => g.trim()).filter(Boolean);
}

async function loadAgents() {
  try {
    const data = await api('GET', '/v1/admin/agents');
    renderAgents(data.agents);
    showError('agents-error', null);
  } catch (e) {
    showError('agents-error', e);
  }
}

/**
 * Show `agents`, sorted by id. A row being edited (unsaved changes, the focus, an error on
 * show) is kept as it is, with only its live cells (status, active chats) brought up to date,
 * so a periodic refresh never takes what the admin is typing or reading.
 */
function renderAgents(agents) {
  const body = $('agents-body');
  const kept = new Map();
  for (const tr of body.children) {
    const busy = tr.dataset.dirty || tr.contains(document.activeElement) || tr.querySelector('.row-error')?.textContent;
    if (busy) kept.set(tr.dataset.agent, tr);
  }
  const rows = agents
    .slice()
    .sort((a, b) => a.id.localeCompare(b.id))
    .map((a) => {
      const old = kept.get(a.id);
      if (!old) return agentRow(a);
      old.querySelector('.cell-status').replaceChildren(statusPill(a.status));
      old.querySelector('.cell-active').textContent = String(a.active_chats);
      return old;
    });
  body.replaceChildren(...rows);
}

function statusPill(status) {
  return h('span', { class: `pill ${status}` }, tr(status));
}

function agentRow(a) {
  const idAttr = (suffix) => `agent-${suffix}-${a.id}`;
  const weight = h('input', { type: 'number', min: '1', value: String(a.weight), id: idAttr('weight'), class: 'weight' });
  const maxChats = h('input', { type: 'number', min: '0', value: String(a.max_chats), id: idAttr('max'), class: 'max-chats' });
  const groups = h('input', { value: a.groups.join(', '), id: idAttr('groups'), class: 'groups', spellcheck: 'false' });
  const disabled = h('input', { type: 'checkbox', id: idAttr('disabled'), class: 'disabled-box' });
  disabled.checked = a.disabled;
  for (const [input, label] of [[weight, 'weight'], [maxChats, 'max_chats'], [groups, 'groups'], [disabled, 'disabled']]) {
    input.setAttribute('aria-label', `${tr(label)} — ${a.id}`);
  }
  const rowError = h('span', { class: 'row-error', role: 'alert' });
  const save = h('button', { type: 'button', class: 'btn save' }, tr('save'));
  const del = h('button', { type: 'button', class: 'btn danger delete' }, tr('delete'));
  save.setAttribute('aria-label', `${tr('save')} ${a.id}`);
  del.setAttribute('aria-label', `${tr('delete')} ${a.id}`);

  const row = h(
    'tr',
    { dataset: { agent: a.id }, class: configAgents.has(a.id) ? 'is-config' : '' },
    h('td', { class: 'cell-id' }, a.id),
    h('td', { class: 'cell-name' }, a.name),
    h('td', { class: 'cell-status' }, statusPill(a.status)),
    h('td', { class: 'cell-active' }, String(a.active_chats)),
    h('td', {}, weight),
    h('td', {}, maxChats),
    h('td', {}, groups),
    h('td', {}, disabled),
    h('td', { class: 'actions' }, save, ' ', del, rowError),
  );

  const submit = async () => {
    save.disabled = true;
    rowError.textContent = '';
    try {
      await api('PATCH', `/v1/admin/agents/${encodeURIComponent(a.id)}`, {
        weight: Number(weight.value),
        max_chats: Number(maxChats.value),
        groups: parseGroups(groups.value),
        disabled: disabled.checked,
      });
      delete row.dataset.dirty;
      save.blur();
      await loadAgents();
    } catch (e) {
      if (e.status === 409) configAgents.add(a.id);
      rowError.textContent = e.message;
      save.disabled = false;
    }
  };
  row.addEventListener('input', () => { row.dataset.dirty = '1'; });
  row.addEventListener('change', () => { row.dataset.dirty = '1'; });
  save.addEventListener('click', submit);
  for (const input of [weight, maxChats, groups]) {
    input.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter') { ev.preventDefault(); submit(); }
    });
  }
  del.addEventListener('click', async () => {
    if (!confirm(tr('confirm_delete', { id: a.id }))) return;
    del.disabled = true;
    rowError.textContent = '';
    try {
      await api('DELETE', `/v1/admin/agents/${encodeURIComponent(a.id)}`);
      await loadAgents();
    } catch (e) {
      if (e.status === 409) configAgents.add(a.id);
      rowError.textContent = e.message;
      del.disabled = false;
    }
  });
  return row;
}

async function createAgent(ev) {
  ev.preventDefault();
  const form = ev.currentTarget;
  const button = form.querySelector('button[type=submit]');
  button.disabled = true;
  showError('agents-error', null);
  try {
    const created = await api('POST', '/v1/admin/agents', {
      id: $('new-id').value.trim(),
      name: $('new-name').value.trim(),
      weight: Number($('new-weight').value),
      max_chats: Number($('new-max').value),
      groups: parseGroups($('new-groups').value),
    });
    $('created-token').textContent = created.token;
    $('created-box').hidden = false;
    form.reset();
    await loadAgents();
  } catch (e) {
    showError('agents-error', e);
  } finally {
    button.disabled = false;
  }
}

// -- knowledge base ----------------------------------------------------------------------------

async function reloadKb() {
  const button = $('kb-reload');
  button.disabled = true;
  setText('kb-status', '');
  showError('kb-error', null);
  try {
    const r = await api('POST', '/v1/admin/kb/reload');
    setText('kb-version', String(r.version));
    setText('kb-entries', String(r.entries));
    setText('kb-status', tr('reloaded', r));
  } catch (e) {
    showError('kb-error', e);
  } finally {
    button.disabled = false;
  }
}

async function searchKb(ev) {
  ev.preventDefault();
  const q = $('kb-q').value.trim();
  if (!q) return;
  showError('search-error', null);
  try {
    const r = await api('GET', `/v1/admin/kb/search?q=${encodeURIComponent(q)}&k=5`);
    setText('kb-version', String(r.version));
    renderHits(r.hits);
  } catch (e) {
    $('hits').replaceChildren();
    showError('search-error', e);
  }
}

function renderHits(hits) {
  if (!hits.length) {
    $('hits').replaceChildren(h('li', { class: 'hits-empty' }, tr('no_hits')));
    return;
  }
  $('hits').replaceChildren(
    ...hits.map((hit) => {
      const score = Math.max(0, Math.min(1, Number(hit.score) || 0));
      const fill = h('div', { class: 'score-fill' });
      fill.style.width = `${(score * 100).toFixed(1)}%`;
      const bar = h('div', { class: 'score-bar', role: 'meter' }, fill);
      bar.setAttribute('aria-valuemin', '0');
      bar.setAttribute('aria-valuemax', '1');
      bar.setAttribute('aria-valuenow', score.toFixed(3));
      bar.setAttribute('aria-label', tr('score'));
      return h(
        'li',
        { class: 'hit', dataset: { id: hit.id } },
        h('div', { class: 'hit-head' }, bar, h('span', { class: 'score-num' }, score.toFixed(3)), h('span', { class: 'hit-id' }, hit.id)),
        h('div', { class: 'hit-q' }, hit.question),
        h('div', { class: 'hit-a' }, hit.answer),
      );
    }),
  );
}

// -- live figures ------------------------------------------------------------------------------

let statsTimer = null;
let lastSample = null; // {total, at}: the previous messages_total, for messages/s

function formatUptime(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400);
  const hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = s % 60;
  const pad = (n) => String(n).padStart(2, '0');
  return (d ? `${d}d ` : '') + `${pad(hh)}:${pad(mm)}:${pad(ss)}`;
}

function renderStats(s, now) {
  setText('fig-conn-visitor', String(s.connections?.visitor ?? '—'));
  setText('fig-conn-agent', String(s.connections?.agent ?? '—'));
  setText('fig-conv-open', String(s.conversations?.open ?? '—'));
  setText('fig-conv-bot', String(s.conversations?.bot ?? '—'));
  setText('fig-conv-queued', String(s.conversations?.queued ?? '—'));
  setText('fig-conv-assigned', String(s.conversations?.assigned ?? '—'));
  setText('fig-queue', String(s.queue_length ?? '—'));
  if (typeof s.messages_total === 'number') {
    if (lastSample && now > lastSample.at && s.messages_total >= lastSample.total) {
      const rate = (s.messages_total - lastSample.total) / ((now - lastSample.at) / 1000);
      setText('fig-rate', rate.toFixed(rate < 10 ? 1 : 0));
    }
    lastSample = { total: s.messages_total, at: now };
  }
  const hitRate = s.cache?.hit_rate;
  setText('fig-cache', typeof hitRate === 'number' ? `${(hitRate * 100).toFixed(1)}%` : '—');
  if (typeof s.uptime_s === 'number') setText('fig-uptime', formatUptime(s.uptime_s));
  if (s.kb) {
    setText('kb-version', String(s.kb.version ?? '—'));
    setText('kb-entries', String(s.kb.entries));
    if (s.kb.error && !$('kb-error').textContent) setText('kb-error', tr('kb_broken', { error: s.kb.error }));
  }
  renderNodes(s.cluster);
  setText('live-updated', tr('updated', { time: new Date(now).toLocaleTimeString() }));
}

/** A cluster's answer lists its nodes: one row each (hidden on a single node). */
function renderNodes(cluster) {
  const box = $('nodes-box');
  box.hidden = !cluster;
  if (!cluster) return;
  const cell = (v) => h('td', {}, v == null ? '—' : String(v));
  $('nodes-body').replaceChildren(
    ...cluster.nodes.map((n) =>
      h(
        'tr',
        { dataset: { node: n.id } },
        h('td', {}, n.id + (n.id === cluster.node ? tr('node_here') : '')),
        h('td', { class: n.up ? 'ok' : 'error' }, n.up ? tr('node_up') : tr('node_down', { error: n.error ?? '' })),
        cell(n.connections?.visitor),
        cell(n.connections?.agent),
        cell(n.conversations?.open),
        cell(n.messages_total),
        cell(typeof n.uptime_s === 'number' ? formatUptime(n.uptime_s) : null),
      ),
    ),
  );
}

let statsBusy = false; // one request at a time: a visibility change during one does not fork the loop
let statsTicks = 0;

async function pollStats() {
  clearTimeout(statsTimer);
  statsTimer = null;
  if (!token || statsBusy) return;
  statsBusy = true;
  try {
    const s = await api('GET', '/v1/admin/stats');
    renderStats(s, performance.now() + performance.timeOrigin);
    showError('live-error', null);
  } catch (e) {
    showError('live-error', e);
    if (e.status === 403) {
      statsBusy = false;
      logout();
      return;
    }
  } finally {
    statsBusy = false;
  }
  statsTicks += 1;
  if (statsTicks % AGENTS_EVERY_TICKS === 0) loadAgents(); // rows being edited stay (renderAgents)
  if (token && !statsTimer) statsTimer = setTimeout(pollStats, STATS_INTERVAL_MS);
}

// -- wiring ------------------------------------------------------------------------------------

function init() {
  applyLang();
  $('lang-select').addEventListener('change', (ev) => {
    lang = ev.target.value;
    localStorage.setItem(LANG_KEY, lang);
    applyLang();
    if (token) loadAgents();
  });
  $('login-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    setText('login-error', '');
    try {
      await login($('admin-token').value.trim());
    } catch (e) {
      setText('login-error', e.message);
    }
  });
  $('logout').addEventListener('click', logout);
  $('create-form').addEventListener('submit', createAgent);
  $('agents-refresh').addEventListener('click', loadAgents);
  $('copy-token').addEventListener('click', async () => {
    try {
      await navigator.clipboard.writeText($('created-token').textContent);
      $('copy-token').textContent = tr('copied');
    } catch {
      getSelection().selectAllChildren($('created-token'));
    }
  });
  $('dismiss-token').addEventListener('click', () => {
    $('created-box').hidden = true;
    $('created-token').textContent = '';
    $('copy-token').textContent = tr('copy');
  });
  $('kb-reload').addEventListener('click', reloadKb);
  $('search-form').addEventListener('submit', searchKb);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && token) pollStats();
  });
  if (token) enterDashboard();
  else $('admin-token').focus();
}

init();
