"""`python -m bench` end to end on a small load: every system runs, nothing is lost, and the
report carries throughput, ratios and latency percentiles. (Figures are not asserted: this
machine is shared; `make bench` is where they are measured.)"""

from __future__ import annotations

import json

from bench.__main__ import main


def test_bench_runs_every_system_on_the_same_load_and_reports_it(tmp_path, capsys) -> None:
    code = main(
        [
            "--messages", "1200", "--publishers", "4", "--rate", "400",
            "--latency-seconds", "1.5", "--stall-seconds", "15", "--out", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().out
    data = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    closed = {r["kind"]: r for r in data["results"] if r["loop"] == "closed"}
    opened = {r["kind"]: r for r in data["results"] if r["loop"] == "open"}
    assert set(closed) == {"raw", "naive", "fused", "split"}
    assert set(opened) == {"naive", "fused", "split"}
    for result in data["results"]:
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
    assert data["raw_ceiling_msg_s"] == closed["raw"]["rate_msg_s"]
