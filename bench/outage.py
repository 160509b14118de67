"""Faults under load: what each system stores of what it was sent.

The load is paced (the open loop's rate); a third of the way in, either PostgreSQL is stopped
for `down_s` and started again (`outage`), or the system's processes are SIGKILLed and started
again at once (`restart`, as a supervisor would); then the run waits until no more rows
arrive. A system that acknowledges MQTT messages only once they are stored keeps them at the
broker meanwhile and stores them afterwards; one that acknowledges on arrival (Node-RED's
`mqtt in`) drops what it cannot write, and what it held when it was killed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from bench import load as loadgen
from bench.harness import Paced, Result, Stack, paced, wait_for_rows
from bench.load import Load

DOWN_S = 10.0
#: The systems whose loss under an outage is a finding; for the pipeline it is a failure.
OUTAGE_KINDS = ("nodered", "fused")


def outage(
    stack: Stack,
    kind: str,
    load: Load,
    rate_per_s: float,
    logdir: Path,
    stall_s: float,
    down_s: float = DOWN_S,
) -> Result:
    def fault(_: Paced) -> None:
        stack.postgres.stop()
        time.sleep(down_s)
        stack.postgres.start()

    return _faulted(stack, kind, "outage", fault, load, rate_per_s, logdir, stall_s)


def restart(
    stack: Stack, kind: str, load: Load, rate_per_s: float, logdir: Path, stall_s: float
) -> Result:
    def fault(run: Paced) -> None:
        run.system.restart()

    return _faulted(stack, kind, "restart", fault, load, rate_per_s, logdir, stall_s)


def _faulted(
    stack: Stack,
    kind: str,
    name: str,
    fault: Callable[[Paced], None],
    load: Load,
    rate_per_s: float,
    logdir: Path,
    stall_s: float,
) -> Result:
    """`kind` under the paced load with `fault` a third of the way in; what it stored."""
    result = Result(kind, name, load.total)
    with paced(stack, kind, load, rate_per_s, logdir) as run:
        run.pacer.start()
        # A schedule, not a synchronisation: the fault falls where the load runs.
        time.sleep(load.total / rate_per_s / 3)
        fault(run)
        run.pacer.join()
        result.stored, _ = asyncio.run(wait_for_rows(run.database_url, load.total, stall_s))
        result.notes += loadgen.finish(run.publishers)
        result.peak_rss_mib = run.system.peak_rss_mib()
    result.seconds = load.total / rate_per_s
    return result
