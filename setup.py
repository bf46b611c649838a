"""Build script for kefu's native core.

Every build switch is an environment variable, read here and nowhere else:

- ``KEFU_NO_EXTENSIONS=1``  install the pure-Python twins only (no compiler needed);
- ``KEFU_DEBUG=1``          ``-O0 -g``, C asserts kept, debug counters compiled in;
- ``KEFU_OPT_CFLAGS``       optimisation flags (default ``-O2``); change the default only with a
                            benchmark that shows why;
- ``KEFU_ANNOTATE=1``       write Cython's HTML annotation next to each ``.pyx``.

The SIMD kernels of ``kefu._core.tfidf`` are one C file per instruction set, each compiled with
its own flags by :class:`BuildExt`; the dispatcher picks one at import by CPU detection, so the
shipped binary never needs ``-march=native``.
"""

from __future__ import annotations

import os
import platform
import shlex

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


NO_EXTENSIONS = _flag("KEFU_NO_EXTENSIONS")
DEBUG = _flag("KEFU_DEBUG")
ANNOTATE = _flag("KEFU_ANNOTATE")
OPT_CFLAGS = shlex.split(os.environ.get("KEFU_OPT_CFLAGS", "-O2"))
# For work on one module: ``KEFU_BUILD_ONLY=tfidf python setup.py build_ext --inplace``.
BUILD_ONLY = {m for m in os.environ.get("KEFU_BUILD_ONLY", "").replace(",", " ").split() if m}

# The one place where Cython directives are set.
CYTHON_DIRECTIVES = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "embedsignature": True,
    "freethreading_compatible": False,
}

MACHINE = platform.machine().lower()
IS_X86_64 = MACHINE in ("x86_64", "amd64")
IS_AARCH64 = MACHINE in ("aarch64", "arm64")

SIMD_DIR = "kefu/_core/simd"
# (source, extra flags): each kernel is compiled on its own with only its own ISA enabled.
SIMD_KERNELS: list[tuple[str, list[str]]] = [(f"{SIMD_DIR}/dot_scalar.c", [])]
if IS_X86_64:
    SIMD_KERNELS += [
        (f"{SIMD_DIR}/dot_sse2.c", ["-msse2"]),
        (f"{SIMD_DIR}/dot_avx2.c", ["-mavx2", "-mfma"]),
    ]
elif IS_AARCH64:
    SIMD_KERNELS += [(f"{SIMD_DIR}/dot_neon.c", [])]  # NEON is baseline on aarch64


def _cflags() -> list[str]:
    flags = ["-std=c11", "-fno-strict-aliasing", "-Wall", "-Wno-unused-function"]
    if DEBUG:
        flags += ["-O0", "-g", "-UNDEBUG", "-DKEFU_DEBUG=1"]
    else:
        flags += [*OPT_CFLAGS, "-DNDEBUG"]
    return flags


VARIANT = f"debug={int(DEBUG)} cflags={' '.join(OPT_CFLAGS)}"
VARIANT_STAMP = os.path.join("build", "kefu-build-variant")


class BuildExt(build_ext):
    """Compiles each SIMD kernel with its own flags and links the objects into ``tfidf``.

    A change of variant (debug or release, other optimisation flags) forces a full rebuild:
    build_ext compares only file times, so a release ``.so`` would otherwise survive a switch
    to a debug build, or the reverse.
    """

    def run(self) -> None:
        try:
            with open(VARIANT_STAMP, encoding="utf-8") as fh:
                previous = fh.read()
        except OSError:
            previous = None
        if previous != VARIANT:
            self.force = True
        super().run()
        os.makedirs(os.path.dirname(VARIANT_STAMP), exist_ok=True)
        with open(VARIANT_STAMP, "w", encoding="utf-8") as fh:
            fh.write(VARIANT)

    def build_extension(self, ext: Extension) -> None:
        if ext.name == "kefu._core.tfidf":
            objects: list[str] = []
            for src, isa_flags in SIMD_KERNELS:
                objects += self.compiler.compile(
                    [src],
                    output_dir=self.build_temp,
                    include_dirs=[SIMD_DIR],
                    extra_postargs=_cflags() + isa_flags,
                    debug=DEBUG,
                )
            ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


def _extensions() -> list[Extension]:
    from Cython.Build import cythonize

    common = dict(
        extra_compile_args=_cflags(),
        include_dirs=["kefu/_core", SIMD_DIR],
        depends=[
            "kefu/_core/kefu_debug.h",
            "kefu/_core/kefu_lru.h",
            "kefu/_core/kefu_lru.pxd",
            "kefu/_core/kefu_slots.h",
        ],
    )
    if DEBUG:
        common["undef_macros"] = ["NDEBUG"]
    exts = [
        Extension("kefu._core.ringbuf", ["kefu/_core/ringbuf.pyx"], **common),
        Extension("kefu._core.mq", ["kefu/_core/mq.pyx"], **common),
        Extension("kefu._core.router", ["kefu/_core/router.pyx"], **common),
        Extension("kefu._core.bloom", ["kefu/_core/bloom.pyx"], **common),
        Extension("kefu._core.meters", ["kefu/_core/meters.pyx"], **common),
        Extension("kefu._core.outbox", ["kefu/_core/outbox.pyx"], **common),
        Extension(
            "kefu._core.tfidf",
            ["kefu/_core/tfidf.pyx", f"{SIMD_DIR}/dispatch.c"],
            **common,
        ),
    ]
    if BUILD_ONLY:
        exts = [e for e in exts if e.name.rsplit(".", 1)[1] in BUILD_ONLY]
    return cythonize(
        exts,
        compiler_directives=CYTHON_DIRECTIVES,
        annotate=ANNOTATE,
        # Generated C differs between variants (bounds checks): keep each variant's apart.
        build_dir=os.path.join("build", "cython-debug" if DEBUG else "cython"),
        force=ANNOTATE,
        quiet=True,
    )


if NO_EXTENSIONS:
    setup()
else:
    setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExt})
