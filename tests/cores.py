"""Which cores a test process and the engines it starts compute on.

``scripts/test.sh`` runs two pytest-xdist workers on a 2-core host. Each worker
narrows itself, and so every process it starts (vLLM's engine core and workers,
servers, benchmark scripts), to its own share of the cores, and points vLLM's
OpenMP binding there: two engines then never queue on one core (vLLM's default
binding computes on the same core in every engine and keeps the other for its
scheduler's polling loop). Tests whose ranks need every core widen it back for
their engines (``all_cores``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

# Read at first import, before a worker narrows itself.
SESSION_CORES = sorted(os.sched_getaffinity(0))
_BIND = "VLLM_CPU_OMP_THREADS_BIND"


def narrow_to_worker_share() -> None:
    """Under pytest-xdist, keep this process on its worker's share of the cores."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker is None or workers < 2 or workers > len(SESSION_CORES):
        return
    share = SESSION_CORES[int(worker.removeprefix("gw"))::workers]
    os.sched_setaffinity(0, share)
    os.environ.setdefault(_BIND, ",".join(map(str, share)))


@contextmanager
def all_cores(bind: str | None = None) -> Iterator[None]:
    """Processes started inside may use every core of the session, vLLM's ranks
    bound by ``bind`` (``VLLM_CPU_OMP_THREADS_BIND``; unset: the script's own)."""
    own_cores, own_bind = os.sched_getaffinity(0), os.environ.pop(_BIND, None)
    os.sched_setaffinity(0, SESSION_CORES)
    if bind is not None:
        os.environ[_BIND] = bind
    try:
        yield
    finally:
        os.sched_setaffinity(0, own_cores)
        os.environ.pop(_BIND, None)
        if own_bind is not None:
            os.environ[_BIND] = own_bind
