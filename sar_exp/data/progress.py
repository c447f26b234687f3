"""Stage-by-stage progress for long preprocessing (printed to stderr, with timings,
and written to the run's train.log)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

log = logging.getLogger("sar_exp.progress")


def _say(text: str) -> None:
    print(f"[sar_exp] {text}", file=sys.stderr, flush=True)
    log.info(text)


@contextmanager
def stage(what: str):
    """Prints `what ...` now and `done in Ns` when the block ends."""
    _say(f"{what} ...")
    start = time.perf_counter()
    yield
    _say(f"{what}: done in {time.perf_counter() - start:.1f}s")
