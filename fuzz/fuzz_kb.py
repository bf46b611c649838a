"""atheris harness for the knowledge-base loader (kefu.bot.kb.load_knowledge_base).

    python fuzz/fuzz_kb.py -atheris_runs=50000

Each input becomes one knowledge-base file, chosen by its first byte: the raw bytes, or a valid
file (a small one using every feature of the format, or the shipped ``shop.yaml``) with
line-level mutations (lines dropped, repeated, swapped, re-indented, YAML syntax and edge
values spliced in). The file is written to a temporary directory and loaded as the node loads
it; :func:`fuzz.invariants.check_kb` must hold: the knowledge base, or a ``KbError`` naming the
file and a line. Anything else escaping is a crash (``crash-<sha1>`` in the working directory;
replay with ``python fuzz/fuzz_kb.py FILE``).
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

with atheris.instrument_imports(include=["kefu", "fuzz"]):
    from fuzz.invariants import SEED_KB, check_kb, fdp_pick, mutate_kb
    from kefu.bot.kb import sample_kb_path

with open(sample_kb_path(), encoding="utf-8") as _f:
    SHOP_KB = _f.read()

_DIR = tempfile.TemporaryDirectory(prefix="kefu-fuzz-kb-")
PATH = os.path.join(_DIR.name, "kb.yaml")


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 7)
    if mode < 3:
        raw = fdp.ConsumeBytes(atheris.ALL_REMAINING)
    else:
        pick = fdp_pick(fdp)
        # shop.yaml takes ten times longer to load than the small seed: one input in eight.
        seed = SHOP_KB if mode == 7 else SEED_KB
        raw = mutate_kb(seed, pick, 1 + pick(6)).encode("utf-8", "surrogatepass")
    with open(PATH, "wb") as f:
        f.write(raw)
    check_kb(PATH)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
