"""Stage-by-stage progress for long preprocessing (printed to stderr, with timings)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


@contextmanager
def stage(what: str):
    """Prints `what ...` now and `done in Ns` when the block ends."""
    print(f"[sar_exp] {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(
        f"[sar_exp] {what}: done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True
    )
