"""Hostile texts for the rendering tests: each one, were it ever parsed as HTML (or a URL, a
style, a template), would add an element to the page or run ``window.__xss.push(n)`` /
``alert(n)``. The pages must show every one of them as the exact text it is.

Kept free of leading and trailing white space (the knowledge base strips its answers) and of
control characters (they are not what this corpus is about); every entry is unique.
"""

from __future__ import annotations

from typing import Final

_LONG_FILLER: Final = "长文本" * 1000

PAYLOADS: Final[tuple[str, ...]] = (
    # script tags
    "<script>window.__xss.push(1)</script>",
    "<ScRiPt>window.__xss.push(2)</sCrIpT>",
    "<scr<script>ipt>window.__xss.push(3)</scr</script>ipt>",
    '"><script>window.__xss.push(4)</script>',
    "'--><script>window.__xss.push(5)</script><!--",
    "</textarea><script>window.__xss.push(6)</script>",
    "</title><script>window.__xss.push(7)</script>",
    # event handlers on images, svg, media and friends
    '<img src=x onerror="window.__xss.push(8)">',
    "<IMG SRC=x OnErRoR=window.__xss.push(9)>",
    '<img src="x" onerror="&#119;indow.__xss.push(10)">',
    '<svg onload="window.__xss.push(11)">',
    "<svg><script>window.__xss.push(12)</script></svg>",
    "<svg><animate onbegin=window.__xss.push(13) attributeName=x dur=1s>",
    '<video><source onerror="window.__xss.push(14)"></video>',
    "<body onload=window.__xss.push(15)>",
    "<input autofocus onfocus=window.__xss.push(16)>",
    "<details open ontoggle=window.__xss.push(17)>",
    "<marquee onstart=window.__xss.push(18)>滚动</marquee>",
    "<x contenteditable onblur=window.__xss.push(19)>lose focus",
    # javascript: and data: URLs
    '<a href="javascript:window.__xss.push(20)">click me</a>',
    '<a href="jav&#x09;ascript:window.__xss.push(21)">tab</a>',
    "javascript:window.__xss.push(22)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgyMyk8L3NjcmlwdD4=",
    '<object data="javascript:window.__xss.push(24)"></object>',
    '<embed src="javascript:window.__xss.push(25)">',
    "<form><button formaction=javascript:window.__xss.push(26)>x</button></form>",
    '<meta http-equiv="refresh" content="0;url=javascript:window.__xss.push(27)">',
    # frames
    '<iframe srcdoc="<script>parent.__xss.push(28)</script>"></iframe>',
    '<iframe src="javascript:parent.__xss.push(29)"></iframe>',
    # styles
    '<div style="background:url(javascript:window.__xss.push(30))">x</div>',
    '<div style="width: expression(window.__xss.push(31))">ie</div>',
    "<style>@import 'javascript:window.__xss.push(32)';</style>",
    '<link rel=stylesheet href="javascript:window.__xss.push(33)">',
    # templates and mutation XSS
    '<template><img src=x onerror="window.__xss.push(34)"></template>',
    '<noscript><p title="</noscript><img src=x onerror=window.__xss.push(35)>">',
    "<math><mtext><table><mglyph><style><img src=x onerror=window.__xss.push(36)>",
    '<svg></p><style><a id="</style><img src=1 onerror=window.__xss.push(37)>">',
    "{{constructor.constructor('window.__xss.push(38)')()}}",
    "${alert(39)}",
    # entity-encoded, escaped, full-width
    "&lt;img src=x onerror=window.__xss.push(40)&gt;",
    "&#60;script&#62;window.__xss.push(41)&#60;/script&#62;",
    "\\u003cimg src=x onerror=window.__xss.push(42)\\u003e",
    "＜script＞window.__xss.push(43)＜/script＞",
    # wrapped in Chinese text, over several lines
    "你好<script>window.__xss.push(44)</script>世界",
    "请看图片<img src=x onerror=alert(45)>谢谢",
    "第一行\n<script>window.__xss.push(46)</script>\n第三行 <b>粗体</b>",
    # very long
    "<img src=x onerror=window.__xss.push(47)>"
    + _LONG_FILLER
    + "<script>window.__xss.push(47)</script>",
)

#: The markup a rendered payload must never produce inside a message list.
FORBIDDEN_TAGS: Final[tuple[str, ...]] = (
    "script",
    "img",
    "svg",
    "iframe",
    "object",
    "embed",
    "video",
    "source",
    "body",
    "input",
    "details",
    "marquee",
    "x",
    "a",
    "form",
    "meta",
    "style",
    "link",
    "template",
    "noscript",
    "math",
    "mglyph",
    "b",
    "p",
    "table",
    "animate",
)

assert len(PAYLOADS) >= 30
assert len(set(PAYLOADS)) == len(PAYLOADS)
assert all(p == p.strip() for p in PAYLOADS)
