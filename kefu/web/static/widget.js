/* kefu's loader for host sites: one tag adds a chat launcher and panel.
 *
 *   <script src="https://KEFU/widget.js" data-color="#0a7" data-title="Help" data-lang="en"
 *           data-user-id="u1" data-user-hash="..." data-name="..." async></script>
 *
 * The kefu origin is the origin of this script's own src. The launcher lives in a shadow root
 * (with every inherited property reset), so the host page's CSS cannot reach it; the chat
 * itself is kefu's /chat page in an iframe, created on the first open. Messages from the frame
 * are accepted from the kefu origin only. The only global is window.KefuWidget
 * ({open(), close(), toggle()}).
 */
(function () {
  "use strict";
  if (window.KefuWidget) return;

  var script = document.currentScript;
  if (!script) {
    var all = document.getElementsByTagName("script");
    for (var i = all.length - 1; i >= 0; i--) {
      if (/\/widget\.js(\?|#|$)/.test(all[i].src)) { script = all[i]; break; }
    }
  }
  if (!script || !script.src) return;

  var ORIGIN = new URL(script.src, location.href).origin;
  var ds = script.dataset || {};
  var HEX = /^#(?:[0-9a-fA-F]{3}|[0-9a-fA-F]{6})$/;
  var color = HEX.test(ds.color || "") ? ds.color : "#0a7c66";

  function pickLang(explicit) {
    var list = [explicit].concat(navigator.languages || [], [navigator.language]);
    for (var k = 0; k < list.length; k++) {
      var base = typeof list[k] === "string" ? list[k].toLowerCase().split(/[-_]/)[0] : "";
      if (base === "zh" || base === "en") return base;
    }
    return "en";
  }
  var lang = pickLang(ds.lang);
  var TEXT = {
    en: { open: "Open chat", close: "Close chat", frame: "Customer service chat", unread: " unread" },
    zh: { open: "打开客服聊天", close: "关闭客服聊天", frame: "在线客服", unread: " 条未读" },
  }[lang];

  function contrastOn(hex) {
    var v = hex.slice(1);
    if (v.length === 3) v = v.replace(/./g, "$&$&");
    var lum = [0, 2, 4].map(function (i) {
      var c = parseInt(v.slice(i, i + 2), 16) / 255;
      return c <= 0.03928 ? c / 12.92 : Math.pow((c + 0.055) / 1.055, 2.4);
    });
    return 0.2126 * lum[0] + 0.7152 * lum[1] + 0.0722 * lum[2] > 0.45 ? "#111111" : "#ffffff";
  }
  var ink = contrastOn(color);

  function chatUrl() {
    var q = new URLSearchParams();
    q.set("embed", "1");
    q.set("lang", lang);
    q.set("color", color);
    if (ds.title) q.set("title", ds.title.slice(0, 80));
    if (ds.userId) q.set("user_id", ds.userId.slice(0, 64));
    if (ds.userHash) q.set("user_hash", ds.userHash.slice(0, 128));
    if (ds.name) q.set("name", ds.name.slice(0, 64));
    q.set("page", location.href.slice(0, 500));
    if (document.title) q.set("page_title", document.title.slice(0, 200));
    return ORIGIN + "/chat?" + q.toString();
  }

  var CSS =
    ":host{all:initial !important;display:block !important;position:fixed !important;" +
    "z-index:2147483000 !important;right:0 !important;bottom:0 !important;width:0 !important;" +
    "height:0 !important;visibility:visible !important;opacity:1 !important;transform:none !important}" +
    "*{box-sizing:border-box}" +
    ".launcher{all:unset;box-sizing:border-box;position:fixed;right:20px;bottom:20px;width:56px;" +
    "height:56px;border-radius:50%;background:" + color + ";color:" + ink + ";display:flex;" +
    "align-items:center;justify-content:center;cursor:pointer;" +
    "box-shadow:0 6px 20px rgba(0,0,0,.22);transition:transform .15s ease}" +
    ".launcher:hover{transform:scale(1.06)}" +
    ".launcher:focus-visible{outline:3px solid #2764e7;outline-offset:3px}" +
    ".launcher svg{width:28px;height:28px;display:block}" +
    ".badge{position:absolute;top:-4px;right:-4px;min-width:22px;height:22px;padding:0 6px;" +
    "border-radius:11px;background:#d92d20;color:#fff;font:700 12px/22px system-ui,sans-serif;" +
    "text-align:center;box-shadow:0 0 0 2px #fff}" +
    ".badge[hidden]{display:none}" +
    ".panel{position:fixed;right:20px;bottom:88px;width:380px;height:640px;" +
    "max-height:calc(100vh - 108px);max-width:calc(100vw - 40px);border-radius:16px;" +
    "overflow:hidden;background:#fff;box-shadow:0 12px 40px rgba(16,24,40,.28);display:none}" +
    ".panel.open{display:block}" +
    ".panel iframe{border:0;width:100%;height:100%;display:block;background:#fff}" +
    "@media (max-width:480px){.panel{inset:0;width:100vw;height:100vh;height:100dvh;" +
    "max-width:none;max-height:none;border-radius:0}.open-full .launcher{display:none}}" +
    "@media (prefers-reduced-motion:reduce){.launcher{transition:none}}";

  var SVG = "http://www.w3.org/2000/svg";
  function icon(paths) {
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("fill", "none");
    svg.setAttribute("stroke", "currentColor");
    svg.setAttribute("stroke-width", "2");
    svg.setAttribute("stroke-linecap", "round");
    svg.setAttribute("stroke-linejoin", "round");
    svg.setAttribute("aria-hidden", "true");
    svg.setAttribute("focusable", "false");
    paths.forEach(function (d) {
      var p = document.createElementNS(SVG, "path");
      p.setAttribute("d", d);
      svg.appendChild(p);
    });
    return svg;
  }
  var chatIcon = icon(["M21 12a8 8 0 0 1-11.6 7.1L4 20.5l1.4-4.9A8 8 0 1 1 21 12z"]);
  var closeIcon = icon(["M6 6l12 12M18 6 6 18"]);

  var host = document.createElement("kefu-widget");
  var root = host.attachShadow({ mode: "open" });
  try {
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    root.adoptedStyleSheets = [sheet];
  } catch (e) {
    var style = document.createElement("style");
    style.textContent = CSS;
    root.appendChild(style);
  }

  var wrap = document.createElement("div");
  var panel = document.createElement("div");
  panel.className = "panel";
  panel.id = "kefu-panel";
  var launcher = document.createElement("button");
  launcher.type = "button";
  launcher.className = "launcher";
  launcher.setAttribute("aria-label", TEXT.open);
  launcher.setAttribute("aria-expanded", "false");
  launcher.setAttribute("aria-controls", "kefu-panel");
  launcher.title = TEXT.open;
  launcher.appendChild(chatIcon);
  var badge = document.createElement("span");
  badge.className = "badge";
  badge.hidden = true;
  badge.setAttribute("aria-hidden", "true");
  launcher.appendChild(badge);
  wrap.appendChild(panel);
  wrap.appendChild(launcher);
  root.appendChild(wrap);

  var frame = null;
  var isOpen = false;
  var unread = 0;

  function post(msg) {
    if (frame && frame.contentWindow) frame.contentWindow.postMessage(msg, ORIGIN);
  }

  function setUnread(n) {
    unread = Math.max(0, Math.min(999, n | 0));
    badge.textContent = unread > 99 ? "99+" : String(unread);
    badge.hidden = unread === 0 || isOpen;
    var label = isOpen ? TEXT.close : TEXT.open;
    launcher.setAttribute("aria-label", unread && !isOpen ? label + " (" + unread + TEXT.unread + ")" : label);
  }

  function open() {
    if (!frame) {
      frame = document.createElement("iframe");
      frame.src = chatUrl();
      frame.title = TEXT.frame;
      frame.setAttribute("allow", "clipboard-write");
      panel.appendChild(frame);
    }
    isOpen = true;
    panel.classList.add("open");
    wrap.classList.add("open-full");
    launcher.replaceChild(closeIcon, launcher.firstChild);
    launcher.setAttribute("aria-expanded", "true");
    launcher.title = TEXT.close;
    setUnread(0);
    post({ type: "kefu:visibility", open: true });
    try { frame.focus(); } catch (e) { /* not focusable yet */ }
  }

  function close() {
    if (!isOpen) return;
    isOpen = false;
    panel.classList.remove("open");
    wrap.classList.remove("open-full");
    launcher.replaceChild(chatIcon, launcher.firstChild);
    launcher.setAttribute("aria-expanded", "false");
    launcher.title = TEXT.open;
    setUnread(unread);
    post({ type: "kefu:visibility", open: false });
    launcher.focus();
  }

  function toggle() {
    if (isOpen) close(); else open();
  }

  launcher.addEventListener("click", toggle);
  window.addEventListener("message", function (e) {
    if (e.origin !== ORIGIN || !frame || e.source !== frame.contentWindow) return;
    var d = e.data;
    if (!d || typeof d !== "object") return;
    if (d.type === "kefu:close") close();
    else if (d.type === "kefu:unread" && typeof d.count === "number") setUnread(isOpen ? 0 : d.count);
  });

  function mount() {
    (document.body || document.documentElement).appendChild(host);
  }
  if (document.body) mount();
  else document.addEventListener("DOMContentLoaded", mount);

  window.KefuWidget = Object.freeze({ open: open, close: close, toggle: toggle });
})();
