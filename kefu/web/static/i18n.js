// Interface strings in English and Chinese. Keys are shared by every page; a page may add its
// own with `extend()`. Placeholders `{name}` are filled as plain text (the result is always set
// with textContent, never as HTML).

const STRINGS = {
  en: {
    "chat.title": "Customer service",
    "chat.subtitle": "We usually reply in a few minutes",
    "chat.placeholder": "Type a message…",
    "chat.input_label": "Message",
    "chat.send": "Send",
    "chat.close_panel": "Close chat",
    "chat.load_earlier": "Load earlier messages",
    "chat.loading": "Loading…",
    "chat.messages_label": "Conversation",
    "chat.empty": "Ask us anything: our assistant answers at once, and a person takes over when needed.",
    "chat.you": "You",
    "chat.bot": "Assistant",
    "chat.bot_status": "{name} is here to help",
    "chat.agent": "Agent",
    "chat.system": "System",
    "chat.sending": "Sending…",
    "chat.sent": "Sent",
    "chat.read": "Read",
    "chat.failed": "Not sent",
    "chat.retry": "Retry",
    "chat.queued": "You are number {position} in the queue",
    "chat.queued_next": "You are next in the queue",
    "chat.handoff": "Connecting you to a person…",
    "chat.assigned": "{name} joined the conversation",
    "chat.closed": "This conversation has ended",
    "chat.new_conversation": "Start a new conversation",
    "chat.typing": "{name} is typing…",
    "chat.offline": "You are offline. Messages will be sent when the connection is back.",
    "chat.reconnecting": "Reconnecting…",
    "chat.connecting": "Connecting…",
    "chat.error": "Something went wrong: {message}",
    "chat.outbox_full": "Too many messages are waiting to be sent. Please wait a moment.",
    "chat.too_long": "The message is too long ({count} / {max} characters).",
    "chat.start_failed": "The chat could not be started. Retrying…",
    "chat.end": "End conversation",
    "chat.end_confirm": "Press the end button again to end this conversation.",
    "chat.unread": "{count} unread",
    "widget.open": "Open chat",
    "widget.close": "Close chat",
    "common.close": "Close",
  },
  zh: {
    "chat.title": "在线客服",
    "chat.subtitle": "通常几分钟内回复",
    "chat.placeholder": "输入消息…",
    "chat.input_label": "消息",
    "chat.send": "发送",
    "chat.close_panel": "关闭聊天",
    "chat.load_earlier": "加载更早的消息",
    "chat.loading": "加载中…",
    "chat.messages_label": "会话",
    "chat.empty": "有什么可以帮您？智能助手会立即回答，需要时人工客服会接手。",
    "chat.you": "我",
    "chat.bot": "智能助手",
    "chat.bot_status": "{name}为您服务",
    "chat.agent": "客服",
    "chat.system": "系统",
    "chat.sending": "发送中…",
    "chat.sent": "已发送",
    "chat.read": "已读",
    "chat.failed": "发送失败",
    "chat.retry": "重试",
    "chat.queued": "您前面还有 {ahead} 位",
    "chat.queued_next": "马上为您接入，您是下一位",
    "chat.handoff": "正在为您转接人工客服…",
    "chat.assigned": "{name} 已加入会话",
    "chat.closed": "会话已结束",
    "chat.new_conversation": "开始新的会话",
    "chat.typing": "{name} 正在输入…",
    "chat.offline": "网络已断开，恢复后消息会自动发送。",
    "chat.reconnecting": "正在重新连接…",
    "chat.connecting": "正在连接…",
    "chat.error": "出错了：{message}",
    "chat.outbox_full": "待发送的消息太多，请稍候。",
    "chat.too_long": "消息太长（{count} / {max} 字）。",
    "chat.start_failed": "无法开始会话，正在重试…",
    "chat.end": "结束会话",
    "chat.end_confirm": "再按一次结束按钮即可结束会话。",
    "chat.unread": "{count} 条未读",
    "widget.open": "打开客服聊天",
    "widget.close": "关闭客服聊天",
    "common.close": "关闭",
  },
};

export const LANGS = Object.keys(STRINGS);

/** "zh" or "en" from an explicit choice, else the browser's languages (default English). */
export function pickLang(explicit) {
  const candidates = [explicit, ...(navigator.languages || []), navigator.language];
  for (const c of candidates) {
    if (typeof c !== "string" || !c) continue;
    const base = c.toLowerCase().split(/[-_]/)[0];
    if (STRINGS[base]) return base;
  }
  return "en";
}

/** Add or override strings for a language (a page's own keys). */
export function extend(lang, strings) {
  STRINGS[lang] = Object.assign(STRINGS[lang] || {}, strings);
}

/** The string for `key` in `lang` (English, then the key itself, when missing). */
export function t(key, lang = "en", vars = null) {
  const table = STRINGS[lang] || STRINGS.en;
  let s = table[key] ?? STRINGS.en[key] ?? key;
  if (vars) s = s.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? String(vars[k]) : m));
  return s;
}

/** Register a page's own strings under `prefix.` (`tables`: {zh: {...}, en: {...}}). */
export function registerStrings(prefix, tables) {
  for (const [code, table] of Object.entries(tables)) {
    extend(code, Object.fromEntries(Object.entries(table).map(([k, v]) => [`${prefix}.${k}`, v])));
  }
}

/** A staff page's language: `?lang=`, then the choice saved under `storageKey`, then the
 *  browser's. */
export function pageLang(storageKey) {
  return pickLang(new URLSearchParams(location.search).get("lang") || localStorage.getItem(storageKey));
}

/** Fill the page's static text in `lang`: `data-i18n` (text), `data-i18n-placeholder`,
 *  `data-i18n-label` (aria-label), through `tr(key)`. */
export function applyStrings(tr, lang, root = document) {
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = tr(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = tr(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-label]")) el.setAttribute("aria-label", tr(el.dataset.i18nLabel));
}
