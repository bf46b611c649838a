"""``python -m loadtest SCENARIO``: the scenarios of kefu's load harness and their command line.

    python -m loadtest idle  --visitors 19000 --duration 10 --spawn
    python -m loadtest chat  --visitors 8000 --rate 10000 --duration 20 --spawn
    python -m loadtest chat  --visitors 8000 --rate 0 --duration 20 --spawn   # closed loop: max
    python -m loadtest ramp  --visitors 8000 --rate 5000 --step 1.25 --p99-ms 5 --spawn
    python -m loadtest bot   --visitors 1000 --rate 500 --duration 20 --spawn
    python -m loadtest storm --visitors 10000 --rate 2000 --duration 15 --spawn
    python -m loadtest relay --visitors 8000 --rate 10000 --duration 20 --spawn

Scenarios
---------
- ``idle``: ``--visitors`` connections (conversations created over REST, no agents), held for
  ``--duration`` seconds, then ``--probe`` of them picked at random are pinged (``ping`` ->
  ``pong``); reports the connection ramp (connections/s), how many were held, and the server's
  RSS per connection (RSS after connecting minus RSS before, over the connections).
- ``chat``: ``--visitors`` conversations, each taken by one of ``--agents`` agents (default:
  enough for 100 conversations each, the protocol's ``max_chats`` limit). Visitors send at
  ``--rate`` messages/s in total, open loop (on a schedule, whatever the answers: no
  coordinated omission); ``--rate 0`` is closed loop instead (each visitor keeps ``--window``
  messages in flight: the node's maximum). Agents answer every ``--reply-every``-th message
  they receive (0: never), which measures agent -> visitor.
- ``ramp``: ``chat`` with the rate raised by ``--step`` every ``--duration`` seconds until the
  step's visitor -> agent p99 passes ``--p99-ms``, less than 90 % of the offered rate is
  delivered, or something is lost: the node's capacity is the last step within the bound.
- ``bot``: visitors ask questions of a generated knowledge base (``--spawn`` writes it); bot
  answer latency, question -> the bot's ``msg``.
- ``storm``: ``chat`` traffic at ``--rate``; a third into ``--duration`` every client drops its
  connection at once and resumes (``hello.resume`` from the last ``seq`` it saw, unacknowledged
  sends repeated with their ``client_msg_id``): the time until every conversation is resumed,
  and nothing lost or doubled.
- ``relay``: the ``chat`` workload against kefu, then against a bare picows relay
  (:mod:`loadtest.relay`) with the same settings: kefu's throughput and latency as a fraction
  of what the machine does without kefu. ``--relay-only`` skips kefu.

A cluster: ``--spawn --nodes N`` starts a redis-server and N ``kefu serve --cluster`` nodes;
conversations are created round-robin on the nodes (their owners); ``--placement owner``
connects every client to the owner of its conversations (nothing crosses nodes), ``cross`` to
another node (every message crosses). The report has each node's CPU and RSS and Redis's
memory and CPU. See :class:`Setup` and loadtest/README.md.

The server: ``--spawn`` (the default without ``--url``) starts ``python -m kefu serve`` from
this checkout with a fresh data directory; ``--url http://HOST:PORT`` drives a running node
(its agents' tokens with ``--agent-token``, its pid with ``--server-pid`` for CPU and RSS).

Every run writes ``DIR/SCENARIO-TIME.{json,txt,png}`` (``--report DIR``, default
``loadtest-results``) and prints the text summary; its first line is ``OK`` or ``LOSS``, and a
run that lost or doubled anything, or could not connect or resume a client, exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Final

import aiohttp
import uvloop

from loadtest import report as reporting
from loadtest.hist import LatencyHistogram
from loadtest.runner import Fleet, bot_lost, merge_reports, procs_needed, source_addresses
from loadtest.server import (
    MAX_CHATS,
    ProcessSampler,
    SpawnedRedis,
    SpawnedServer,
    agents_needed,
    histogram_delta,
    kb_questions,
    redis_info,
    scrape_histograms,
)
from loadtest.stalls import StallProbe

SCENARIOS = ("idle", "chat", "ramp", "bot", "storm", "relay")
DEFAULTS: dict[str, dict[str, Any]] = {
    "idle": {"visitors": 19_000, "duration": 10.0},
    "chat": {"visitors": 1_000, "rate": 5_000.0, "duration": 10.0},
    "ramp": {"visitors": 2_000, "rate": 2_000.0, "duration": 5.0},
    "bot": {"visitors": 500, "rate": 200.0, "duration": 10.0},
    "storm": {"visitors": 2_000, "rate": 1_000.0, "duration": 9.0},
    "relay": {"visitors": 1_000, "rate": 5_000.0, "duration": 10.0},
}
SETUP_TIMEOUT_S = 300.0
DRAIN_TIMEOUT_S = 30.0
MAX_RAMP_STEPS = 30
#: Hellos in flight over all workers with ``--placement cross`` (see _connect_concurrency).
CROSS_HELLOS_IN_FLIGHT = 32
#: REST creates in flight per node over all workers in a cluster (see _creates_in_flight).
CLUSTER_CREATES_IN_FLIGHT = 24


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument("--visitors", type=int, help="visitor connections (one conversation each)")
    p.add_argument("--agents", type=int, help="agent connections (default: visitors / 100)")
    p.add_argument("--rate", type=float, help="visitor messages/s in total (0: closed loop)")
    p.add_argument("--duration", type=float, help="seconds of traffic (ramp: per step)")
    p.add_argument("--size", type=int, default=64, help="message text bytes (default 64)")
    p.add_argument("--procs", type=int, default=2, help="client processes (more if needed)")
    p.add_argument("--url", help="HTTP URL of a running kefu (default: --spawn)")
    p.add_argument("--spawn", action="store_true", help="start kefu with a fresh data dir")
    p.add_argument("--server-pid", type=int, help="with --url: sample this pid's CPU and RSS")
    p.add_argument("--agent-token", action="append", default=[], help="with --url, repeated")
    p.add_argument("--report", default="loadtest-results", metavar="DIR")
    p.add_argument("--reply-every", type=int, default=10, help="agent answers every Nth (0: none)")
    p.add_argument("--window", type=int, default=1, help="messages in flight per visitor")
    p.add_argument("--probe", type=int, default=1_000, help="idle: connections pinged at the end")
    p.add_argument("--step", type=float, default=1.25, help="ramp: rate factor per step")
    p.add_argument("--p99-ms", type=float, default=5.0, help="ramp: the latency bound")
    p.add_argument("--relay-only", action="store_true", help="relay: skip the kefu run")
    p.add_argument(
        "--pin",
        action="store_true",
        help="with --spawn and one node: the server on the first CPU, the load generator on "
        "the others (no core shared between them)",
    )
    p.add_argument(
        "--busy-poll-us",
        type=int,
        default=0,
        metavar="US",
        help="with --spawn: the node's ws.busy_poll_us (and the relay's): poll without "
        "sleeping for US microseconds after a write; for a server with a core of its own",
    )
    p.add_argument(
        "--server-profile",
        metavar="FILE",
        help="with --spawn: `kefu serve --profile FILE` (node k of a cluster: FILE.k); "
        "read it with `python -m pstats FILE`",
    )
    p.add_argument(
        "--nodes", type=int, default=1, help="with --spawn: a cluster of N nodes on one Redis"
    )
    p.add_argument(
        "--placement",
        choices=("owner", "cross"),
        default="owner",
        help="--nodes: clients on their conversation's owner (owner) or on other nodes (cross)",
    )
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.scenario].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rate is None:
        args.rate = 0.0
    if args.duration is None:
        args.duration = 10.0
    if not 0 <= args.busy_poll_us <= 100_000:
        p.error("--busy-poll-us must be in 0..100000")
    if args.visitors < 1 or args.duration <= 0 or args.rate < 0 or args.window < 1:
        p.error("--visitors >= 1, --duration > 0, --rate >= 0, --window >= 1")
    if args.url and args.spawn:
        p.error("--url and --spawn exclude each other")
    if args.url and args.scenario in ("chat", "ramp", "storm", "relay") and not args.agent_token:
        p.error("--url needs the agents' tokens (--agent-token, repeated)")
    if args.nodes < 1 or args.nodes > 250:
        p.error("--nodes is 1 to 250")
    if args.nodes > 1 and (args.url or args.scenario == "relay"):
        p.error("--nodes > 1 spawns a cluster: not with --url nor the relay scenario")
    if args.scenario == "ramp" and args.step <= 1:
        p.error("--step must be above 1")
    if args.pin and (args.url or args.nodes > 1 or len(_CPUS) < 2):
        p.error("--pin needs --spawn, one node and at least 2 CPUs")
    return args


#: The CPUs this process may use before ``--pin`` narrows them (a relay run sets up twice).
_CPUS: Final = frozenset(os.sched_getaffinity(0))


def pin_cpus() -> tuple[set[int], set[int]]:
    """``--pin``: (the server's CPUs, the load generator's); this process, and so the workers
    it starts, keeps to the second set from here on."""
    cpus = set(_CPUS)
    server = {min(cpus)}
    clients = cpus - server
    os.sched_setaffinity(0, clients)
    return server, clients


class Setup:
    """A server or cluster (spawned or given), the workers, their connections: what every
    scenario needs.

    With ``--nodes N`` (``--spawn``) a redis-server and N nodes are started. Conversation ``i``
    is created on node ``i % N`` (its owner). Agents are in N groups, group ``k`` sized for the
    conversations of owner ``k`` (each agent's ``max_chats`` is its exact share, so a group
    that has taken its conversations is full); group ``k`` connects to node ``k`` (placement
    ``owner``) or ``k - 1`` (``cross``), owner ``k``'s visitors to node ``k`` or ``k + 1``. The
    setup goes owner by owner: group ``k`` online, owner ``k``'s conversations created, all of
    them assigned (the routing is in Redis, global: only group ``k`` has room), next owner.
    """

    def __init__(self, args: argparse.Namespace, *, relay: bool = False) -> None:
        self.args = args
        self.relay = relay
        self.servers: list[SpawnedServer] = []
        self.redis: SpawnedRedis | None = None
        self.samplers: list[ProcessSampler] = []
        self.redis_sampler: ProcessSampler | None = None
        self.fleet: Fleet | None = None
        self.t0_ns = time.monotonic_ns()
        self.info: dict[str, Any] = {}
        self.redis_memory: dict[str, int] = {}
        self.redis_clients: int | None = None
        self.server_cpus: set[int] | None = None
        self._probe: StallProbe | None = None
        self._probe_end_ns = 0
        self._stalls: dict[str, Any] = {}
        try:
            self._start(args, relay)
        except BaseException:
            self.close()
            raise

    def _start(self, args: argparse.Namespace, relay: bool) -> None:
        scenario = args.scenario
        server_cpus: set[int] | None = None
        if args.pin:
            server_cpus, client_cpus = pin_cpus()
            self.server_cpus = server_cpus
            self.info["pinned"] = {"server": sorted(server_cpus), "clients": sorted(client_cpus)}
        if args.busy_poll_us:
            self.info["busy_poll_us"] = args.busy_poll_us
        self.bot = scenario == "bot"
        n = args.visitors
        nodes = self.nodes = args.nodes
        self.cross = args.placement == "cross" and nodes > 1
        self.per_owner = [len(range(k, n, nodes)) for k in range(nodes)]
        if scenario in ("idle", "bot"):
            sizes = [0] * nodes
        elif args.agents is not None:
            sizes = [len(range(k, args.agents, nodes)) for k in range(nodes)]
        else:
            sizes = [agents_needed(c) if c else 0 for c in self.per_owner]
        if args.url and not relay:
            sizes = [len(args.agent_token)]
        groups = [k for k, size in enumerate(sizes) for _ in range(size)]
        chats: list[int] = []
        for k, size in enumerate(sizes):
            c = self.per_owner[k] if k < len(self.per_owner) else 0
            chats += [min(MAX_CHATS, max(1, c // size + (j < c % size))) for j in range(size)]
        m = self.agents = len(groups)
        self.visitors = n
        tokens = [f"loadtest-agent-{i}-{os.urandom(6).hex()}" for i in range(m)]
        self.group_node = [self._agent_node(k) for k in range(max(1, len(sizes)))]
        self.via_count = [0] * nodes  # connections planned on each node
        for k, c in enumerate(self.per_owner):
            self.via_count[self._visitor_node(k)] += c
        for g in groups:
            self.via_count[self.group_node[g]] += 1
        pids = [args.server_pid] if args.server_pid else []
        urls: list[tuple[str, str]] = []
        if relay:
            server = SpawnedServer(
                connections=n + m,
                agent_tokens=[],
                conversations=n,
                relay=True,
                cpus=server_cpus,
                busy_poll_us=args.busy_poll_us,
            )
            self.servers.append(server)
            tokens = [f"a:{j}" for j in range(m)]
        elif args.url:
            http_url = args.url.rstrip("/")
            tokens = list(args.agent_token)
            urls.append((http_url, uvloop.run(_public_ws_url(http_url))))
        else:
            if nodes > 1:
                self.redis = SpawnedRedis()
                self.redis_sampler = ProcessSampler(self.redis.pid, self.t0_ns)
                self.redis_memory["empty"] = self.redis.used_memory()
            for k in range(nodes):
                profile = args.server_profile
                if profile and nodes > 1:
                    profile = f"{profile}.{k}"
                self.servers.append(
                    SpawnedServer(
                        connections=max(self.via_count),
                        agent_tokens=tokens,
                        conversations=n,
                        bot=self.bot,
                        cluster_url=self.redis.url if self.redis else None,
                        agent_chats=chats,
                        profile=profile,
                        cpus=server_cpus,
                        busy_poll_us=args.busy_poll_us,
                    )
                )
            if self.redis is not None:
                self.redis_memory["nodes_started"] = self.redis.used_memory()
        if self.servers:
            urls = [(s.http_url, s.ws_url) for s in self.servers]
            pids = [s.pid for s in self.servers]
        self.http_url, self.ws_url = urls[0]
        self.node_http_urls = [u[0] for u in urls]
        if "pinned" in self.info and self.servers:
            # As the kernel holds it, for the report: every thread of the server on its CPU.
            self.info["pinned"]["server_observed"] = sorted(
                os.sched_getaffinity(self.servers[0].pid)
            )
        self.samplers = [ProcessSampler(pid, self.t0_ns) for pid in pids]
        procs = procs_needed(n + m, args.procs)
        sources = source_addresses(self.ws_url, procs)
        specs: list[dict[str, Any]] = []
        for w in range(procs):
            spec: dict[str, Any] = {
                "wid": w,
                "nodes": [list(u) for u in urls],
                "source": sources[w],
                "size": args.size,
                "reply_every": args.reply_every,
                "bot": self.bot,
                "questions": [q for q, _a in kb_questions()],
                "agent_tokens": tokens[w::procs],
                "agent_groups": groups[w::procs],
                "group_node": self.group_node,
                "connect_concurrency": self._connect_concurrency(procs),
                "creates_in_flight": self._creates_in_flight(procs),
            }
            if relay:
                spec["visitor_tokens"] = [f"v:{i:x}:{i % m}" for i in range(w, n, procs)]
            specs.append(spec)
        #: shares[w][k]: worker w's conversations owned by node k.
        self.shares = [[len(range(w, c, procs)) for c in self.per_owner] for w in range(procs)]
        self.share = [sum(row) for row in self.shares]
        self.info.update(
            {
                "server": "relay" if relay else ("spawned" if self.servers else args.url),
                "nodes": nodes,
                "placement": args.placement if nodes > 1 else "single node",
                "visitors": n,
                "agents": m,
                "client_procs": procs,
                "source_addresses": [s for s in sources if s] or None,
            }
        )
        if nodes > 1:
            self.info["connections_per_node"] = self.via_count
        label = ("relay" if relay else scenario) + f" {n:,}"
        if nodes > 1:
            label += f" x{nodes} {args.placement}"
        self.fleet = Fleet(specs, label, self.samplers)

    def _connect_concurrency(self, procs: int) -> int | None:
        """Hellos in flight per worker. A hello on a node that does not own the conversation
        asks the owner over Redis, and a node's Redis pool (64 connections) refuses the call
        past its size, which the node takes for Redis being down (it closes its followers
        with 1012): with ``cross``, at most :data:`CROSS_HELLOS_IN_FLIGHT` in all."""
        if not self.cross:
            return None
        return max(1, CROSS_HELLOS_IN_FLIGHT // procs)

    def _creates_in_flight(self, procs: int) -> int | None:
        """REST creates in flight per worker and node: in a cluster each create is a routing
        call to Redis, and past the node's Redis pool (64 connections) it fails with 503
        (and the node takes the refusal for Redis being down): at most
        :data:`CLUSTER_CREATES_IN_FLIGHT` per node in all."""
        if self.nodes <= 1:
            return None
        return max(1, CLUSTER_CREATES_IN_FLIGHT // procs)

    def _visitor_node(self, owner: int) -> int:
        """The node a visitor of a conversation owned by ``owner`` connects to."""
        return (owner + 1) % self.nodes if self.cross else owner

    def _agent_node(self, group: int) -> int:
        """The node of the agents of ``group`` (they take the conversations of owner
        ``group``): that owner, or (cross) the node before it, so that with three nodes or
        more the visitor, the owner and the agent are three different nodes."""
        return (group - 1) % self.nodes if self.cross else group

    def connect(self) -> None:
        """Agents online, conversations created and taken, visitors connected."""
        fleet = self.fleet
        assert fleet is not None
        self.info["agents_connected"] = 0
        self.info["connect_failed"] = 0
        if self.relay:
            self._agents_online(None)
        elif self.agents:
            for k in range(self.nodes):  # owner by owner: group k online, then its conversations
                self._agents_online(k)
                self._create([k], assigned=sum(self.per_owner[: k + 1]))
        else:
            self._create(list(range(self.nodes)), assigned=0)
        if self.redis is not None:
            self.redis_memory["before_connect"] = self.redis.used_memory()
        self.rss_before = [s.rss_now() for s in self.samplers]
        got = fleet.ask_all(("visitors",), "visitors", SETUP_TIMEOUT_S)
        ok = sum(g[0] for g in got)
        failed = sum(g[1] for g in got)
        secs = (max(g[3] for g in got) - min(g[2] for g in got)) / 1e9
        self.rss_after = [s.rss_now() for s in self.samplers]
        if self.redis is not None:
            self.redis_memory["after_connect"] = self.redis.used_memory()
        self.info["connected"] = ok + self.info["agents_connected"]
        self.info["connect_failed"] += failed
        self.info["connect_s"] = round(secs, 3)
        self.info["connections_per_s"] = round(ok / max(secs, 1e-9), 1)
        if self.relay and self.agents:
            self._wait_assigned(self.visitors)

    def _agents_online(self, group: int | None) -> None:
        assert self.fleet is not None
        got = self.fleet.ask_all(("agents", group), "agents", SETUP_TIMEOUT_S)
        self.info["agents_connected"] += sum(g[0] for g in got)
        self.info["connect_failed"] += sum(g[1] for g in got)

    def _create(self, owners: list[int], assigned: int) -> None:
        """Creates the conversations of ``owners`` (all at once); then, with agents, waits
        until ``assigned`` conversations in all have been taken."""
        assert self.fleet is not None
        cmds: list[tuple[Any, ...]] = [
            ("create", [(row[k], k, self._visitor_node(k)) for k in owners if row[k]])
            for row in self.shares
        ]
        got = self.fleet.ask(cmds, "created", SETUP_TIMEOUT_S)
        made = sum(g[0] for g in got)
        secs = max(g[2] for g in got)
        self.info["conversations_created"] = self.info.get("conversations_created", 0) + made
        self.info["create_s"] = round(self.info.get("create_s", 0.0) + secs, 3)
        self.info["create_per_s"] = round(
            self.info["conversations_created"] / max(self.info["create_s"], 1e-9), 1
        )
        if sum(g[1] for g in got):
            self.info["create_failed"] = self.info.get("create_failed", 0) + sum(g[1] for g in got)
        if assigned:
            self._wait_assigned(assigned)

    def _wait_assigned(self, target: int) -> None:
        """Until the agents have been told of ``target`` conversations (a create that found
        no agent online in Redis yet is queued, then assigned when the agent's state lands)."""
        fleet = self.fleet
        assert fleet is not None
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if fleet.counts()["assigned"] >= target:
                self.info.pop("not_assigned", None)
                return
            fleet.pump(0.05)
        self.info["not_assigned"] = target - fleet.counts()["assigned"]

    def traffic_start(self, rate: float, duration: float) -> int:
        """Tells the workers to send; returns the common start time (monotonic ns)."""
        fleet = self.fleet
        assert fleet is not None
        t_go = time.monotonic_ns() + 300_000_000
        n = max(1, sum(self.share))
        self._finish_probe()
        self._probe = StallProbe(self.server_cpus)
        self._probe.start(t_go, duration)
        self._probe_end_ns = t_go + int(duration * 1e9)
        fleet.send([("run", rate * k / n, duration, t_go, self.args.window) for k in self.share])
        return t_go

    def stalls(self) -> dict[str, Any]:
        """The machine's stalls over the last traffic window (:mod:`loadtest.stalls`: how late
        a probe sleeping 1 ms at a time on the server's core woke up)."""
        self._finish_probe()
        return self._stalls

    def _finish_probe(self) -> None:
        """Read the probe of the last traffic window; kill it if that window is not over (a
        run that stopped early has no figures for it)."""
        probe, self._probe = self._probe, None
        if probe is None:
            return
        if time.monotonic_ns() < self._probe_end_ns:
            probe.stop()
            self._stalls = {"error": "the run stopped before the traffic window ended"}
        else:
            self._stalls = probe.result()

    def traffic(self, rate: float, duration: float) -> int:
        t_go = self.traffic_start(rate, duration)
        assert self.fleet is not None
        self.fleet.collect("ran", duration + SETUP_TIMEOUT_S)
        return t_go

    def drain(self) -> float:
        """Waits until nothing is in flight; returns the seconds it took."""
        fleet = self.fleet
        assert fleet is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < DRAIN_TIMEOUT_S:
            c = fleet.counts()
            if self.bot:
                done = c["recv_bot"] >= c["acked_visitor"]
            else:
                done = (
                    c["recv_visitor"] >= c["acked_visitor"] and c["recv_agent"] >= c["acked_agent"]
                )
            if c["pending"] == 0 and done:
                break
            fleet.pump(0.1)
        return time.monotonic() - t0

    def collect(self, reset: bool = False) -> tuple[dict[str, Any], dict[str, LatencyHistogram]]:
        assert self.fleet is not None
        got = self.fleet.ask_all(("report", reset), "report", 60)
        reports = [g[0] for g in got]
        created: dict[str, int] = {}
        for r in reports:
            for status, k in r.get("created", {}).items():
                created[status] = created.get(status, 0) + k
        if created:
            self.info["create_status"] = created
        if self.agents and not self.relay:
            self.info["misplaced"] = misplaced(reports)
        return merge_reports(reports)

    def server_summary(self, since_ns: int) -> dict[str, Any]:
        """CPU and RSS of the server (one node) or of all nodes together."""
        since = (since_ns - self.t0_ns) / 1e9
        rows = [s.summary(since) for s in self.samplers]
        rows = [r for r in rows if r.get("samples")]
        if not rows:
            return {}
        if len(self.samplers) == 1:
            return {**rows[0], "pid": self.samplers[0].pid}
        return {
            "nodes": len(rows),
            "cpu_mean_pct": round(sum(r["cpu_mean_pct"] for r in rows), 1),
            "cpu_max_node_pct": max(r["cpu_max_pct"] for r in rows),
            "rss_max_bytes": sum(r["rss_max_bytes"] for r in rows),
            "rss_last_bytes": sum(r["rss_last_bytes"] for r in rows),
        }

    def cluster_summary(self, since_ns: int) -> dict[str, Any]:
        """Per node CPU/RSS and Redis (CPU, RSS, used memory); empty for one node."""
        if self.nodes <= 1:
            return {}
        since = (since_ns - self.t0_ns) / 1e9
        per_node = []
        for i, s in enumerate(self.samplers):
            row = {"node": i, "pid": s.pid, "connections": self.via_count[i], **s.summary(since)}
            per_node.append(row)
        out: dict[str, Any] = {"nodes_cpu_rss": per_node}
        redis: dict[str, Any] = {}
        if self.redis_sampler is not None:
            redis.update(self.redis_sampler.summary(since))
            redis["pid"] = self.redis_sampler.pid
        if self.redis_clients is not None:
            redis["connected_clients"] = self.redis_clients
        redis["used_memory_bytes"] = dict(self.redis_memory)
        before = self.redis_memory.get("before_connect")
        after = self.redis_memory.get("after_connect")
        if before is not None and after is not None:
            redis["used_memory_connect_delta_bytes"] = after - before
        out["redis"] = redis
        return out

    def scrape(self) -> list[dict[str, dict[str, Any]]]:
        """Each node's message and batch-write histograms now (nothing for a relay)."""
        if self.relay:
            return []
        return [scrape_histograms(url) for url in self.node_http_urls]

    def internal_delta(self, before: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """What the nodes' histograms counted since ``before``: one row per node and histogram."""
        if not before:
            return {}
        after = self.scrape()
        rows = [histogram_delta(b, a) for b, a in zip(before, after, strict=False)]
        return rows[0] if len(rows) == 1 else {f"node {i}": r for i, r in enumerate(rows)}

    def node_samples(self) -> dict[str, Any]:
        """The CPU/RSS samples for the report's picture: one series per node (and Redis)."""
        if len(self.samplers) == 1:
            return {"server_samples": self.samplers[0].samples}
        series = {f"node {i}": s.samples for i, s in enumerate(self.samplers)}
        if self.redis_sampler is not None:
            series["redis"] = self.redis_sampler.samples
        return {"node_samples": series} if series else {}

    def close(self) -> None:
        if self.redis is not None:  # what Redis holds at the end, the clients still connected
            self.redis_memory["end"] = self.redis.used_memory()
            with contextlib.suppress(OSError, ValueError):
                info = redis_info(self.redis.port, "clients")
                self.redis_clients = int(info.get("connected_clients", 0))
        if self.fleet is not None:
            self.fleet.close()
            self.fleet = None
        self._finish_probe()
        for s in self.samplers:
            s.stop()
        if self.redis_sampler is not None:
            self.redis_sampler.stop()
        for server in self.servers:
            server.terminate()
        codes = [server.stop() for server in self.servers]
        logs = {str(i): sv.log_tail for i, sv in enumerate(self.servers) if sv.log_tail.strip()}
        if logs:
            self.info["server_log_tail"] = logs
        self.servers = []
        if codes:
            self.info["server_exit_code"] = codes[0] if len(codes) == 1 else codes
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def misplaced(reports: list[dict[str, Any]]) -> int:
    """Conversations taken by an agent of another group than their owner's: the placement
    did not hold (with ``cross``, some messages would not cross nodes). Conversations nobody
    took are counted as ``not_assigned`` instead."""
    owner: dict[str, int] = {}
    group: dict[str, int] = {}
    for r in reports:
        owner.update(r.get("placement", {}).get("owner", {}))
        group.update(r.get("placement", {}).get("group", {}))
    return sum(1 for c, k in owner.items() if group.get(c, k) != k)


async def _public_ws_url(http_url: str) -> str:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(f"{http_url}/v1/config") as resp,
    ):
        return str((await resp.json())["ws_url"])


def _accounting(m: dict[str, Any], bot: bool = False) -> dict[str, int]:
    lost = bot_lost(m) if bot else m["lost_visitor_to_agent"] + m["lost_agent_to_visitor"]
    acc = {
        "sent_by_visitors": m.get("sent_visitor", 0),
        "acked_to_visitors": m.get("acked_visitor", 0),
        "received_by_agents": m.get("recv_visitor", 0),
        "sent_by_agents": m.get("sent_agent", 0),
        "acked_to_agents": m.get("acked_agent", 0),
        "received_by_visitors": m.get("recv_agent", 0),
        "lost": lost,
        "duplicated": m["dups"] + m["received_not_acked"],
        "delivered_twice": m["dups"],
        "received_more_than_acked": m["received_not_acked"],
        "unacked": m["unacked"],
        "refused": m["refused"],
        "resent_after_resume": m["resent"],
        "dup_acks": m["acked_dup"],
    }
    if bot:
        acc["bot_answers"] = m.get("recv_bot", 0)
    return acc


def cpu_per_message(server: dict[str, Any], delivered_per_s: float) -> float | None:
    """The server's CPU per delivered message in microseconds (its mean CPU over the traffic
    window over the delivered rate): what the node spends on one message, whatever the rate,
    and less sensitive than throughput to how fast the machine runs that hour. None without
    CPU samples (a ``--url`` run without ``--server-pid``) or without deliveries."""
    pct = server.get("cpu_mean_pct")
    if not pct or delivered_per_s <= 0:
        return None
    return round(pct * 1e4 / delivered_per_s, 1)


def _rate_in(series: list[int], seconds: float) -> float:
    whole = max(1, int(seconds))
    return round(sum(series[:whole]) / whole, 1)


def _chat_result(
    setup: Setup, m: dict[str, Any], h: dict[str, LatencyHistogram], t_go: int, rate: float
) -> dict[str, Any]:
    args = setup.args
    delivered = round(m["window_delivered"] / args.duration, 1)
    res: dict[str, Any] = dict(setup.info)
    res["rate_offered"] = rate if rate > 0 else "closed loop"
    res["duration_s"] = args.duration
    res["size_bytes"] = args.size
    res["delivered_per_s"] = delivered
    res["sent_per_s"] = _rate_in(m["series"]["sent/s"], args.duration)
    res["generator"] = {
        "skipped_busy": m["skipped"],
        "behind_max_ms": m["behind_max_ms"],
        "gc_pauses": m["gc_pauses"],
        "gc_pause_max_ms": m["gc_pause_max_ms"],
        "gc_pause_total_ms": round(m["gc_pause_total_ms"], 2),
    }
    res["server_cpu_rss"] = setup.server_summary(t_go)
    res["server_cpu_us_per_msg"] = cpu_per_message(res["server_cpu_rss"], delivered)
    res["machine_stalls"] = setup.stalls()
    res["errors"] = m["errors"]
    if m["retried_1013"]:
        res["connect_retried_1013"] = m["retried_1013"]
    if m["closes"]:
        res["closes_seen"] = m["closes"]
    if m["dropped"]:
        res["dropped"] = m["dropped"]
    res["accounting"] = _accounting(m, setup.bot)
    res["latency"] = {k: v.summary() for k, v in h.items() if v.total}
    res["series"] = m["series"]
    res.update(setup.cluster_summary(t_go))
    res["traffic_start_s"] = (t_go - setup.t0_ns) / 1e9
    res.update(setup.node_samples())
    return res


#: A fixed-rate run that delivers less than this share of the offered rate says so first.
SHORT_OF_RATE: Final = 0.95


def run_chat(
    args: argparse.Namespace, relay: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    setup = Setup(args, relay=relay)
    try:
        setup.connect()
        before = setup.scrape()
        t_go = setup.traffic(args.rate, args.duration)
        setup.info["drain_s"] = round(setup.drain(), 3)
        internal = setup.internal_delta(before)
        m, h = setup.collect()
    finally:
        setup.close()
    res = _chat_result(setup, m, h, t_go, args.rate)
    if internal:
        res["server_internal"] = internal
    v2a = h["v2a"].summary() if not setup.bot else h["bot"].summary()
    what = "bot answers" if setup.bot else "visitor->agent"
    where = f" on {setup.nodes} nodes ({args.placement})" if setup.nodes > 1 else ""
    res["headline"] = (
        f"{'relay' if relay else 'kefu'} {args.scenario}{where} {setup.visitors:,} visitors"
        f" + {setup.agents} agents, {res['delivered_per_s']:,.0f} {what}/s delivered,"
        f" p50 {v2a['p50_ms']} ms p99 {v2a['p99_ms']} ms"
    )
    if args.rate > 0 and res["delivered_per_s"] < SHORT_OF_RATE * args.rate:
        # A fixed rate the node (or the clients) did not keep up with: the delivered rate is
        # then the capacity at that load, and the latency a queue's, not the offered rate's.
        res["headline"] += (
            f", short of the {args.rate:,.0f}/s offered"
            f" ({res['generator']['skipped_busy']:,} sends skipped, their window full)"
        )
    res["scenario"] = "relay" if relay else args.scenario
    return res, h


def run_idle(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    setup = Setup(args)
    try:
        setup.connect()
        assert setup.fleet is not None
        t_hold = time.monotonic_ns()
        setup.fleet.pump(args.duration)
        held = setup.fleet.counts()["connected"]
        rss_held = [s.rss_now() for s in setup.samplers]
        per = [math.ceil(args.probe * k / max(1, sum(setup.share))) for k in setup.share]
        got = setup.fleet.ask([("probe", k) for k in per], "probed", 120)
        m, h = setup.collect()
    finally:
        setup.close()
    asked = sum(g[0] for g in got)
    answered = sum(g[1] for g in got)
    res: dict[str, Any] = dict(setup.info)
    res["held_after_s"] = {"seconds": args.duration, "connections": held}
    res["probe"] = {"asked": asked, "answered": answered}
    res["probe_unanswered"] = asked - answered
    conns = max(1, setup.info["connected"])
    before, after = sum(setup.rss_before), sum(setup.rss_after)
    delta = after - before
    res["server_rss"] = {
        "before_connect_bytes": before,
        "after_connect_bytes": after,
        "after_hold_bytes": sum(rss_held),
        "per_connection_bytes": round(delta / conns),
        "per_connection_kib": round(delta / conns / 1024, 2),
    }
    res["server_cpu_rss"] = setup.server_summary(t_hold)
    res.update(setup.cluster_summary(t_hold))
    for row in res.get("nodes_cpu_rss", []):
        i = row["node"]
        d = setup.rss_after[i] - setup.rss_before[i]
        row["rss_before_connect_bytes"] = setup.rss_before[i]
        row["rss_after_connect_bytes"] = setup.rss_after[i]
        up = m["up_per_node"][i] if i < len(m["up_per_node"]) else 0
        row["connections_up"] = up
        row["rss_per_connection_kib"] = round(d / max(1, up) / 1024, 2)
    redis_delta = res.get("redis", {}).get("used_memory_connect_delta_bytes")
    if redis_delta is not None:
        res["redis"]["used_memory_per_connection_bytes"] = round(redis_delta / conns, 1)
    res["errors"] = m["errors"]
    res["closes_seen"] = m["closes"]
    if m["retried_1013"]:
        res["connect_retried_1013"] = m["retried_1013"]
    res["dropped"] = m["dropped"]
    res["latency"] = {k: v.summary() for k, v in h.items() if v.total}
    res.update(setup.node_samples())
    where = f" on {setup.nodes} nodes" if setup.nodes > 1 else ""
    res["headline"] = (
        f"idle {setup.info['connected']:,} connections held{where}"
        f" ({setup.info['connections_per_s']:,.0f} connects/s),"
        f" server RSS {res['server_rss']['per_connection_kib']} KiB/connection,"
        f" probe {answered}/{asked}"
    )
    res["scenario"] = "idle"
    return res, h


def run_storm(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    setup = Setup(args)
    try:
        setup.connect()
        assert setup.fleet is not None
        t_go = setup.traffic_start(args.rate, args.duration)
        wait_s = (t_go - time.monotonic_ns()) / 1e9 + args.duration / 3
        setup.fleet.pump(max(0.0, wait_s))
        storms = [g[0] for g in setup.fleet.ask_all(("storm",), "stormed", 180)]
        setup.fleet.collect("ran", args.duration + SETUP_TIMEOUT_S)
        setup.info["drain_s"] = round(setup.drain(), 3)
        m, h = setup.collect()
    finally:
        setup.close()
    res = _chat_result(setup, m, h, t_go, args.rate)
    t0 = min(s["t0_ns"] for s in storms)
    last = max(s["last_resumed_ns"] for s in storms)
    res["storm"] = {
        "clients": setup.visitors + setup.agents,
        "reconnected": sum(s["reconnected"] for s in storms),
        "failed": sum(s["failed"] for s in storms),
        "all_resumed_s": round((last - t0) / 1e9, 3) if last else None,
    }
    res["not_recovered"] = sum(s["not_recovered"] for s in storms)
    res["resume_timed_out"] = sum(s["resume_timed_out"] for s in storms)
    res["connect_failed"] = setup.info.get("connect_failed", 0) + res["storm"]["failed"]
    acc = res["accounting"]
    res["headline"] = (
        f"storm {res['storm']['clients']:,} clients dropped at once: all resumed in"
        f" {res['storm']['all_resumed_s']} s, {acc['lost']} lost, {acc['duplicated']} duplicated"
    )
    res["scenario"] = "storm"
    return res, h


def run_ramp(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    setup = Setup(args)
    steps: list[dict[str, Any]] = []
    total_h: dict[str, LatencyHistogram] = {}
    try:
        setup.connect()
        rate = args.rate
        first_go = 0
        lost_before = 0
        for _ in range(MAX_RAMP_STEPS):
            t_go = setup.traffic(rate, args.duration)
            first_go = first_go or t_go
            setup.drain()
            m, h = setup.collect(reset=True)
            for k, v in h.items():
                total_h.setdefault(k, LatencyHistogram()).merge(v)
            s = h["v2a"].summary()
            delivered = m["window_delivered"] / args.duration
            lost = m["lost_visitor_to_agent"] + m["lost_agent_to_visitor"] - lost_before
            lost_before += lost
            steps.append(
                {
                    "offered_per_s": rate,
                    "delivered_per_s": round(delivered, 1),
                    "p50_ms": s["p50_ms"],
                    "p99_ms": s["p99_ms"],
                    "p99_9_ms": s["p99_9_ms"],
                    "lost": lost,
                    "server": setup.server_summary(t_go),
                    "machine_stalls": setup.stalls(),
                }
            )
            p99 = s["p99_ms"] if s["p99_ms"] is not None else math.inf
            if p99 > args.p99_ms or delivered < 0.9 * rate or lost:
                break
            rate = round(rate * args.step)
    finally:
        setup.close()
    ok = [
        s
        for s in steps
        if s["p99_ms"] is not None
        and s["p99_ms"] <= args.p99_ms
        and not s["lost"]
        and s["delivered_per_s"] >= 0.9 * s["offered_per_s"]
    ]
    res: dict[str, Any] = dict(setup.info)
    res["p99_bound_ms"] = args.p99_ms
    res["capacity_per_s"] = ok[-1]["delivered_per_s"] if ok else 0
    res["steps"] = steps
    res["accounting"] = _accounting(m)
    res["errors"] = m["errors"]
    res["latency"] = {k: v.summary() for k, v in total_h.items() if v.total}
    res["series"] = m["series"]
    res.update(setup.node_samples())
    res["traffic_start_s"] = (first_go - setup.t0_ns) / 1e9
    res["headline"] = (
        f"ramp {setup.visitors:,} visitors: capacity {res['capacity_per_s']:,.0f} msgs/s"
        f" with visitor->agent p99 <= {args.p99_ms} ms"
    )
    res["scenario"] = "ramp"
    return res, total_h


def run_relay(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    kefu: dict[str, Any] | None = None
    hists: dict[str, LatencyHistogram] = {}
    if not args.relay_only:
        kefu, kh = run_chat(args)
        hists["kefu v2a"] = kh["v2a"]
        print(file=sys.stderr)
    bare, h = run_chat(args, relay=True)
    hists["relay v2a"] = h["v2a"]
    res: dict[str, Any] = {"scenario": "relay", "relay": _brief(bare)}
    if kefu is not None:
        res["kefu"] = _brief(kefu)
        ratio = kefu["delivered_per_s"] / max(1e-9, bare["delivered_per_s"])
        res["throughput_ratio_kefu_to_relay"] = round(ratio, 3)
        kp99 = kefu["latency"].get("v2a", {}).get("p99_ms")
        rp99 = bare["latency"].get("v2a", {}).get("p99_ms")
        if kp99 and rp99:
            res["p99_ratio_kefu_to_relay"] = round(kp99 / rp99, 2)
        kcpu = kefu.get("server_cpu_us_per_msg")
        rcpu = bare.get("server_cpu_us_per_msg")
        if kcpu and rcpu:
            res["cpu_per_msg_ratio_kefu_to_relay"] = round(kcpu / rcpu, 2)
        acc = {
            k: kefu["accounting"][k] + bare["accounting"][k]
            for k in ("lost", "duplicated", "unacked")
        }
        res["accounting"] = acc
        res["headline"] = (
            f"kefu {kefu['delivered_per_s']:,.0f}/s p99 {kp99} ms vs bare relay"
            f" {bare['delivered_per_s']:,.0f}/s p99 {rp99} ms: ratio {ratio:.2f};"
            f" server CPU per message {kcpu} us vs {rcpu} us"
        )
    else:
        res["accounting"] = bare["accounting"]
        res["headline"] = bare["headline"]
    res["latency"] = {k.replace(" ", "_"): v.summary() for k, v in hists.items()}
    res["series"] = {f"relay {k}": v for k, v in bare["series"].items()}
    if kefu is not None:
        res["series"].update({f"kefu {k}": v for k, v in kefu["series"].items()})
    return res, hists


def _brief(res: dict[str, Any]) -> dict[str, Any]:
    keys = ("visitors", "agents", "rate_offered", "delivered_per_s", "sent_per_s")
    out = {k: res[k] for k in keys if k in res}
    for path in ("v2a", "a2v", "ack"):
        s = res["latency"].get(path, {})
        for q in ("p50_ms", "p99_ms", "p99_9_ms"):
            out[f"{path}_{q}"] = s.get(q)
    acc = res["accounting"]
    out.update({k: acc[k] for k in ("lost", "duplicated", "unacked")})
    server = res.get("server_cpu_rss", {})
    out["server_cpu_mean_pct"] = server.get("cpu_mean_pct")
    out["server_cpu_us_per_msg"] = res.get("server_cpu_us_per_msg")
    stalls = res.get("machine_stalls", {})
    out["machine_late_over_5ms"] = stalls.get("late_over_5ms")
    out["machine_late_max_ms"] = stalls.get("late_max_ms")
    return out


RUNNERS = {
    "idle": run_idle,
    "chat": run_chat,
    "ramp": run_ramp,
    "bot": run_chat,
    "storm": run_storm,
    "relay": run_relay,
}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    result, hists = RUNNERS[args.scenario](args)
    full = {"environment": reporting.environment(), "result": result}
    paths = reporting.write(full, hists, Path(args.report))
    sys.stdout.write(reporting.text_summary(full))
    print("report: " + ", ".join(str(p) for p in paths))
    ok, _line = reporting.verdict(result)
    return 0 if ok else 1
