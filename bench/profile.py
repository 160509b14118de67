"""Where a worker's time goes: sums a py-spy profile (`--format raw`, as `python -m bench
--profile` writes it) into the parts of the pipeline, as shares of the samples that were busy.

    python -m bench.profile bench/results/fused-fused.txt
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

#: (part, what a frame's text starts with): a sample goes to the first part of this list that
#: has a frame in its stack (so a stage called from the bridge counts as the stage).
PARTS: tuple[tuple[str, str], ...] = (
    ("validate (JSON, payload model, reading)", "Validate.__call__"),
    ("validate (JSON, payload model, reading)", "ValidateBess.__call__"),
    ("dedupe", "Dedupe.__call__"),
    ("persist (upsert of the batch)", "Persist.__call__"),
    ("window_aggregate (per batch)", "WindowAggregate.__call__"),
    ("window_aggregate (per batch)", "WindowAggregateBess.__call__"),
    ("window sweeps (closing intervals)", "Pipeline._sweep"),
    ("outbox publisher (to MESSWERTE, BESS_INTERVALS)", "OutboxPublisher"),
    ("PUBACKs", "Session.ack "),
    ("MQTT receive (packets read, queued)", "Session.data_received "),
    ("MQTT receive (packets read, queued)", "Session.take "),
    ("bridge and runner: envelopes, hand-over, metrics", "MqttBridge"),
    ("NATS client", "Client._read_loop"),
    ("start-up (imports)", "<module>"),
)
STARTUP = "start-up (imports)"
#: Stacks that are a thread or the loop waiting, not working.
IDLE = ("_worker (concurrent/futures/thread.py", "Runner.run (asyncio/runners.py:118)")


def breakdown(path: Path) -> list[tuple[str, float]]:
    parts: Counter[str] = Counter()
    busy = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(IDLE):
            continue
        busy += int(count)
        part = next(
            (name for name, prefix in PARTS for frame in frames if frame.startswith(prefix)),
            "other (event loop, metrics, runner)",
        )
        parts[part] += int(count)
    return [(name, n / busy) for name, n in parts.most_common()] if busy else []


def main() -> None:
    parts = breakdown(Path(sys.argv[1]))
    startup = dict(parts).get(STARTUP, 0.0)
    print("share of the busy samples after start-up:")
    for name, share in parts:
        if name != STARTUP:
            print(f"{share / (1 - startup) * 100:5.1f} %  {name}")


if __name__ == "__main__":
    main()
