"""`python -m bench` end to end on a small load: every system runs, nothing is lost, and the
report carries throughput, ratios and latency percentiles. (Figures are not asserted: this
machine is shared; `make bench` is where they are measured.)"""

from __future__ import annotations

import importlib.util
import json

from bench.__main__ import main
from bench.systems import COUNTERS, KINDS, available


def test_bench_runs_every_system_on_the_same_load_and_reports_it(tmp_path, capsys) -> None:
    code = main(
        [
            "--messages", "1200", "--publishers", "4", "--rate", "400",
            "--latency-seconds", "1.5", "--stall-seconds", "15", "--outage-seconds", "1",
            "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().out
    data = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    closed = {r["kind"]: r for r in data["results"] if r["loop"] == "closed"}
    opened = {r["kind"]: r for r in data["results"] if r["loop"] == "open"}
    assert set(closed) == set(available(list(KINDS)))
    assert {"raw", "session", "bridge", "naive", "fused", "split"} <= set(closed)
    assert set(opened) == set(closed) - set(COUNTERS)
    for fault in ("outage", "restart"):
        faulted = {r["kind"]: r for r in data["results"] if r["loop"] == fault}
        assert set(faulted) == {"fused", "nodered"} & set(closed), fault
        assert faulted["fused"]["lost"] == 0, faulted["fused"]  # held at the broker meanwhile
    for result in data["results"]:
        if result["loop"] in ("outage", "restart") and result["kind"] == "nodered":
            continue  # it acknowledges on arrival: what it drops is the finding
        assert result["lost"] == 0, result
        assert result["stored"] == result["messages"] > 0
    for result in closed.values():
        assert result["rate_msg_s"] > 0
        assert all(rss > 0 for rss in result["peak_rss_mib"].values()), result
    assert set(closed["split"]["peak_rss_mib"]) == {
        "mqtt_bridge", "validate", "dedupe", "persist", "window_aggregate", "publish",
    }  # fmt: skip
    for result in opened.values():
        lat = result["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"], result
    table = next(tmp_path.glob("bench-*.md")).read_text()
    assert "× raw ceiling" in table
    assert "PostgreSQL stopped for 1 s" in table
    assert "SIGKILL and restart" in table
    assert data["raw_ceiling_msg_s"] == closed["raw"]["rate_msg_s"]


def test_fleet_bench_closes_every_interval_of_a_small_fleet_and_reports_it(
    tmp_path, capsys
) -> None:
    """`--fleet` on 60 units: every interval is stored and published with the right sums,
    and the report has the table, the plans and the sustained run."""
    code = main(
        ["--fleet", "30,60", "--fleet-readings", "3", "--sustain-seconds", "3",
         "--out", str(tmp_path)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().out
    data = json.loads(next(tmp_path.glob("fleet-*.json")).read_text())
    results = {r["units"]: r for r in data["results"]}
    assert set(results) == {30, 60}
    for r in results.values():
        assert r["sums_match"], r
        assert r["published"] == r["units"]
        assert 0 <= r["burst_p50_s"] <= r["burst_max_s"], r
        assert r["raw_rate"] > 0
        assert r["load_rate"] > 0
    largest = results[60]
    assert set(largest["plans"]) == {"due", "aggregate"}
    # At 180 rows a sequential scan is the planner's right choice; only the flagging is checked.
    assert "zaehler_rohdaten" in largest["plans"]["aggregate"]
    assert "messwerte_interval_dirty" in largest["plans"]["due"]
    assert set(largest["seq_scans"]) <= {"due", "aggregate"}
    assert largest["sustained"]["readings"] > 0
    table = next(tmp_path.glob("fleet-*.md")).read_text()
    assert "× raw ceiling" in table
    if importlib.util.find_spec("matplotlib") is not None:  # the chart needs `.[bench]`
        assert next(tmp_path.glob("fleet-*.png")).stat().st_size > 0
