"""Fuzzing of kefu's input decoding: the WebSocket frame decoder and the knowledge-base loader.

:mod:`fuzz.invariants` states what must hold for any input; the atheris harnesses
(``fuzz_frames.py``, ``fuzz_kb.py``) and the hypothesis tests (``tests/test_fuzz.py``) both check
it. See ``fuzz/README.md`` for the commands.
"""
