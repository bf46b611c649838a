"""atheris harness for the WebSocket frame decoder (kefu.protocol.FrameDecoder).

    python fuzz/fuzz_frames.py -atheris_runs=200000

Each input is turned into one frame three ways, chosen by its first byte: raw bytes (as a
binary or text frame, JSON or MessagePack), a mutated valid frame (a seed of every client
type, its fields dropped, retyped or set to edge values, then encoded), or the same with
byte-level damage after encoding. :func:`fuzz.invariants.check_frame` must hold for every one;
anything else escaping is a crash, which libFuzzer reports with the input that caused it
(``crash-<sha1>`` in the working directory; replay with ``python fuzz/fuzz_frames.py FILE``).
Any libFuzzer flag works (``-max_total_time=60``, ``-jobs=2``, a corpus directory).
"""

from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["kefu", "fuzz"]):
    import msgspec

    from fuzz.invariants import (
        SEED_FRAMES,
        check_frame,
        fdp_pick,
        mutate_bytes,
        mutate_frame,
    )


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 5)
    msgpack = bool(mode & 1)
    if mode < 2:
        raw = fdp.ConsumeBytes(atheris.ALL_REMAINING)
        if not msgpack and fdp.ConsumeBool():
            check_frame(raw.decode("utf-8", "surrogateescape"), msgpack=False)  # a text frame
        else:
            check_frame(raw, msgpack=msgpack)
        return
    pick = fdp_pick(fdp)
    seed = SEED_FRAMES[pick(len(SEED_FRAMES))]
    frame = mutate_frame(seed, pick, pick(5))
    encoded = msgspec.msgpack.encode(frame) if msgpack else msgspec.json.encode(frame)
    if mode >= 4:
        encoded = mutate_bytes(encoded, pick, 1 + pick(4))
    check_frame(encoded, msgpack=msgpack)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
