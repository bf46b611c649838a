"""A bare picows relay speaking just enough of PROTOCOL.md for the load generator: the yardstick.

    python -m loadtest.relay [--host 127.0.0.1] [--port 0] [--busy-poll-us 0]

It does what a chat server must do per message and nothing else: decode the ``send`` frame
(msgspec), give it the conversation's next ``seq``, ``ack`` the sender, and push one encoded
``msg`` to both sides of the conversation. No store, no routing, no limits beyond picows's, no
auth: a visitor's token ``v:<conv>:<agent>`` names its conversation and agent, an agent's token
is ``a:<agent>``. ``python -m loadtest relay`` runs the ``chat`` workload against it, so
``kefu / relay`` is the price of everything kefu adds (persistence before the ack, checks,
routing, accounting) on the same machine in the same run.

``--busy-poll-us N`` polls without sleeping for N microseconds after each message, as kefu's
``ws.busy_poll_us`` does (``python -m loadtest relay --busy-poll-us N`` gives both the same).

Bounds: one entry per live connection and per conversation seen (both gone with the process;
the load generator's conversation count is bounded). It prints ``relay: ws listening on
ws://HOST:PORT/ws`` then ``relay: ready``, and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

import msgspec
import uvloop
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    ws_create_server,
)


class _In(msgspec.Struct, kw_only=True):
    type: str
    token: str = ""
    conv: str = ""
    client_msg_id: str = ""
    text: str = ""
    status: str = ""


class _Sender(msgspec.Struct):
    role: str
    id: str
    name: str


class _Msg(msgspec.Struct, kw_only=True, tag="msg", tag_field="type"):
    conv: str
    seq: int
    epoch: int
    id: str
    client_msg_id: str
    from_: _Sender = msgspec.field(name="from")
    text: str
    ts: int


_decode = msgspec.json.Decoder(_In).decode
_encode = msgspec.json.Encoder().encode


class Relay:
    def __init__(self, busy_poll_us: int = 0) -> None:
        self.visitors: dict[str, WSTransport] = {}
        self.agents: dict[str, WSTransport] = {}
        self.agent_of: dict[str, str] = {}
        self.seqs: dict[str, int] = {}
        self.busy_poll_s = busy_poll_us / 1e6
        self._busy_until = 0.0
        self._polling = False

    def kick(self) -> None:
        """A message went out: poll without sleeping for ``busy_poll_s`` (module doc)."""
        self._busy_until = time.monotonic() + self.busy_poll_s
        if not self._polling:
            self._polling = True
            asyncio.get_running_loop().call_soon(self._poll)

    def _poll(self) -> None:
        if time.monotonic() >= self._busy_until:
            self._polling = False
            return
        asyncio.get_running_loop().call_soon(self._poll)

    def listener(self, _request: WSUpgradeRequest) -> WSListener:
        return _Conn(self)


class _Conn(WSListener):
    def __init__(self, relay: Relay) -> None:
        super().__init__()
        self.relay = relay
        self.role = ""
        self.id = ""
        self.sender: _Sender | None = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        f = _decode(frame.get_payload_as_bytes())
        r = self.relay
        if f.type == "send" and self.sender is not None:
            seq = r.seqs.get(f.conv, 0) + 1
            r.seqs[f.conv] = seq
            ts = time.time_ns() // 1_000_000
            transport.send(
                WSMsgType.TEXT,
                _encode(
                    {
                        "type": "ack",
                        "conv": f.conv,
                        "client_msg_id": f.client_msg_id,
                        "seq": seq,
                        "ts": ts,
                        "dup": False,
                    }
                ),
            )
            out = _encode(
                _Msg(
                    conv=f.conv,
                    seq=seq,
                    epoch=1,
                    id=f"{f.conv}-{seq}",
                    client_msg_id=f.client_msg_id,
                    from_=self.sender,
                    text=f.text,
                    ts=ts,
                )
            )
            v = r.visitors.get(f.conv)
            a = r.agents.get(r.agent_of.get(f.conv, ""))
            if v is not None:
                v.send(WSMsgType.TEXT, out)
            if a is not None:
                a.send(WSMsgType.TEXT, out)
            if r.busy_poll_s:
                r.kick()
        elif f.type == "hello":
            self._hello(transport, f.token)
        elif f.type == "status":
            transport.send(WSMsgType.TEXT, _encode({"type": "status", "status": f.status}))
        elif f.type == "ping":
            transport.send(WSMsgType.TEXT, b'{"type":"pong"}')

    def _hello(self, transport: WSTransport, token: str) -> None:
        r = self.relay
        parts = token.split(":")
        if parts[0] == "v" and len(parts) == 3:
            conv, agent = parts[1], parts[2]
            self.role, self.id = "visitor", f"v{conv}"
            r.visitors[conv] = transport
            r.agent_of[conv] = agent
            convs = [
                {"conv": conv, "epoch": 1, "top_seq": r.seqs.get(conv, 0), "status": "assigned"}
            ]
            a = r.agents.get(agent)
            if a is not None:
                a.send(
                    WSMsgType.TEXT,
                    _encode(
                        {"type": "assigned", "conv": conv, "agent": {"id": agent, "name": agent}}
                    ),
                )
        elif parts[0] == "a" and len(parts) == 2:
            self.role, self.id = "agent", parts[1]
            r.agents[self.id] = transport
            convs = []
        else:
            transport.send_close(WSCloseCode.POLICY_VIOLATION)
            transport.disconnect()
            return
        self.sender = _Sender(role=self.role, id=self.id, name=self.id)
        welcome = {
            "type": "welcome",
            "role": self.role,
            "id": self.id,
            "convs": convs,
            "ping_interval_ms": 0,
            "max_msg_bytes": 65536,
        }
        transport.send(WSMsgType.TEXT, _encode(welcome))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        table = self.relay.visitors if self.role == "visitor" else self.relay.agents
        key = self.id[1:] if self.role == "visitor" else self.id
        if table.get(key) is transport:
            del table[key]


async def serve(host: str, port: int, busy_poll_us: int = 0) -> None:
    relay = Relay(busy_poll_us)
    server = await ws_create_server(relay.listener, host, port, websocket_handshake_timeout=10)
    bound = server.sockets[0].getsockname()[1]
    print(f"relay: ws listening on ws://{host}:{bound}/ws", flush=True)
    print("relay: ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.relay", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--busy-poll-us", type=int, default=0, help="poll without sleeping after a message"
    )
    args = p.parse_args(argv)
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    uvloop.run(serve(args.host, args.port, args.busy_poll_us))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
