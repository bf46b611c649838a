"""The one base of every refusal a client can see.

A :class:`KefuError` carries PROTOCOL.md's snake_case ``code`` and a human message: the node
turns any of them into ``error {code, message}`` on the WebSocket and
``{"error": {"code", "message"}}`` with a 4xx/5xx status over REST, so each module names its
refusals once and no layer needs a table of exception types.
"""

from __future__ import annotations

__all__ = ["KefuError"]


class KefuError(Exception):
    """An operation was refused; nothing changed. ``code`` is the protocol's error code."""

    code: str = "internal"

    def __str__(self) -> str:
        # Subclasses that are also KeyError would otherwise print the repr of their argument.
        if len(self.args) == 1:
            return str(self.args[0])
        return super().__str__()
