"""Fuzzing the readers of untrusted files (issue 8): strategies, targets and the harness.

Used by ``tests/test_fuzz.py`` (a few hundred inputs per target) and ``scripts/fuzz_readers.py``
(thousands, with a table). ``harness`` runs and classifies inputs; ``mutations`` holds the
format-agnostic hostile-input strategies; each ``target_*`` module is one reader.
"""
