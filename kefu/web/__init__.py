"""The node's network fronts: WebSocket (:mod:`kefu.web.ws`, picows) and HTTP (aiohttp)."""
