"""Store: acknowledged messages per second through the group-commit writer, and the GIL.

    python -m bench.bench_store [--json] [--quick]

Throughput: N appenders (one conversation each) on uvloop, each appending its next message as
soon as the previous one is acked, for a fixed time; the table gives acked messages/s, the
average batch, and the p50/p99 time from enqueue to ack. ``fsync, serial syncs`` holds new
batches back while a WAL sync runs, the alternative to the writer's default of writing them
meanwhile.

GIL: a thread performs 300 synced writes while the main thread spins; the table gives how
long the main thread stood still per sync. A call that keeps the GIL through its fdatasync
freezes the main thread for about as long as the sync itself.

The disk decides the fsync rows: a laptop SSD without power-loss protection takes
milliseconds per sync, a virtual disk with a write-back cache a fraction of one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from bench._harness import Row, percentiles
from kefu.store import Durability, Store, StoredMessage


def _message(conv: int, seq: int) -> StoredMessage:
    return StoredMessage(
        conv=conv,
        seq=seq,
        epoch=1,
        id=f"m{seq}",
        client_msg_id=f"c{seq}",
        from_role="visitor",
        from_id=f"v{conv}",
        from_name="Visitor",
        text="你好，请问运费多少？我想买两件。",
        ts=1_715_000_000_000,
    )


def _throughput(durability: Durability, appenders: int, seconds: float, overlap: bool) -> Row:
    try:
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    path = tempfile.mkdtemp(prefix="kefu-bench-store-")
    store = Store.open(path, durability=durability)
    store.writer._overlap_sync = overlap
    latencies: list[float] = []
    acked = 0

    async def appender(conv: int, stop: float) -> None:
        nonlocal acked
        seq = 0
        clock = time.perf_counter
        while clock() < stop:
            seq += 1
            t0 = clock()
            await store.append_message(_message(conv, seq))
            latencies.append(clock() - t0)
            acked += 1

    async def main() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(appender(c, start + seconds) for c in range(1, appenders + 1)))
        return time.perf_counter() - start

    loop = new_loop()
    try:
        elapsed = loop.run_until_complete(main())
    finally:
        loop.close()
    w = store.writer
    extra: dict[str, float | str] = {
        "avg_batch": w.messages_written / max(w.batches_written, 1),
        "batches": float(w.batches_written),
        "syncs": float(w.syncs),
    }
    p50, p99 = percentiles(latencies)
    extra["ack_p50_us"] = p50
    extra["ack_p99_us"] = p99
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    name = {
        ("process", True): "process",
        ("fsync", True): "fsync, overlapped syncs",
        ("fsync", False): "fsync, serial syncs",
    }[(durability, overlap)]
    case = f"store appends, {appenders:,} concurrent appenders"
    return Row(case, name, acked / elapsed, "msgs/s", extra=extra)


def _open_loop(overlap: bool, per_ms: int, sync_delay: float, seconds: float) -> Row:
    """Clients that do not wait for acks: ``per_ms`` messages every millisecond, a disk whose
    sync takes ``sync_delay`` more (simulated with a sleep, which releases the GIL as the sync
    does)."""
    try:
        import uvloop

        new_loop: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    path = tempfile.mkdtemp(prefix="kefu-bench-store-")
    store = Store.open(path, durability="fsync")
    store.writer._overlap_sync = overlap
    real_sync = store.writer._sync_wal

    def slow_sync(sync: bool) -> None:
        time.sleep(sync_delay)
        real_sync(sync)

    store.writer._sync_wal = slow_sync
    latencies: list[float] = []

    async def main() -> None:
        futs = []
        clock = time.perf_counter
        stop = clock() + seconds
        seq = 0
        while clock() < stop:
            seq += 1
            for conv in range(1, per_ms + 1):
                t0 = clock()
                fut = store.append_message(_message(conv, seq))
                fut.add_done_callback(lambda _f, t0=t0: latencies.append(clock() - t0))
                futs.append(fut)
            await asyncio.sleep(0.001)
        await asyncio.gather(*futs)

    loop = new_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    w = store.writer
    p50, p99 = percentiles(latencies)
    extra: dict[str, float | str] = {
        "ack_p50_us": p50,
        "batches": float(w.batches_written),
        "syncs": float(w.syncs),
    }
    store.close()
    shutil.rmtree(path, ignore_errors=True)
    name = "fsync, overlapped syncs" if overlap else "fsync, serial syncs"
    case = f"store ack p99, {per_ms} msgs/ms offered, sync +{sync_delay * 1e3:.0f} ms (simulated)"
    return Row(case, name, p99, "µs", higher_is_better=False, extra=extra)


def _gil_stall(kind: str, syncs: int) -> Row:
    from rocksdict import Options, Rdict, WriteBatch, WriteOptions

    path = tempfile.mkdtemp(prefix="kefu-bench-gil-")
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    db = Rdict(path, opts)
    synced, unsynced = WriteOptions(), WriteOptions()
    synced.sync = True
    spent = [0.0]

    def worker() -> None:
        for i in range(syncs):
            key, value = b"k%d" % i, b"x" * 200
            batch = WriteBatch(raw_mode=True)
            batch.put(key, value)
            if kind == "write(sync=True)":
                t0 = time.perf_counter()
                db.write(batch, synced)
            elif kind == "put(sync=True)":
                t0 = time.perf_counter()
                db.put(key, value, synced)
            else:
                db.write(batch, unsynced)
                t0 = time.perf_counter()
                db.flush_wal(True)
            spent[0] += time.perf_counter() - t0
            time.sleep(0.001)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    frozen = 0.0
    thread = threading.Thread(target=worker)
    clock = time.perf_counter
    try:
        thread.start()
        last = clock()
        while thread.is_alive():
            now = clock()
            if now - last > 1e-4:
                frozen += now - last
            last = now
    finally:
        thread.join()
        sys.setswitchinterval(old_interval)
        db.close()
        shutil.rmtree(path, ignore_errors=True)
    return Row(
        "main thread stalled per WAL sync in another thread",
        kind,
        frozen / syncs * 1e6,
        "µs",
        higher_is_better=False,
        extra={"sync_call_us": spent[0] / syncs * 1e6},
    )


def run(quick: bool) -> list[Row]:
    seconds = 0.5 if quick else 2.0
    rows = [
        _throughput("process", 1_000, seconds, True),
        _throughput("fsync", 1_000, seconds, True),
        _throughput("fsync", 1_000, seconds, False),
        _throughput("process", 10, seconds, True),
        _throughput("fsync", 10, seconds, True),
    ]
    for overlap in (True, False):
        rows.append(_open_loop(overlap, 20, 0.010, seconds))
    for kind in ("write(sync=True)", "put(sync=True)", "write + flush_wal(True)"):
        rows.append(_gil_stall(kind, 100 if quick else 300))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_store", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.add_argument("--quick", action="store_true", help="shorter runs (smoke run)")
    args = parser.parse_args(argv)
    rows = run(quick=args.quick)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        return 0
    case = None
    for r in rows:
        if r.case != case:
            case = r.case
            print(f"\n{case}  [{r.unit}, {'higher' if r.higher_is_better else 'lower'} is better]")
        extra = "  ".join(
            f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.extra.items()
        )
        print(f"  {r.impl:<24} {r.value:>12,.0f}  {extra}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
