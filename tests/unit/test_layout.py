"""The shape rules: stages know no transport, the topology is consistent, the schema ships."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import pytest

from pipeline.app import chains
from pipeline.topology import CONSUMER_STAGES, KINDS, STAGES, STREAMS, rows
from schemas.output import SCHEMA_FILE, json_schema

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"nats", "faststream", "aiomqtt", "paho", "prometheus_client", "pipeline"}


@pytest.mark.parametrize("module", sorted((ROOT / "stages").glob("*.py")), ids=lambda p: p.name)
def test_stages_import_no_transport(module: Path) -> None:
    tree = ast.parse(module.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN


def test_every_consumed_subject_belongs_to_its_stream() -> None:
    streams = {s.name: s for s in STREAMS}
    for stage in STAGES:
        if stage.stream is None:
            continue
        prefix = stage.reads.removesuffix(">")
        assert any(subject.startswith(prefix) for subject in streams[stage.stream].subjects)


def test_each_stage_consumes_what_the_previous_one_of_its_kind_writes() -> None:
    for kind in KINDS:
        for before, after in itertools.pairwise(rows(kind)):
            assert after.consumes in before.writes


def test_consumers_of_one_stream_take_disjoint_subjects() -> None:
    """A work-queue stream refuses overlapping consumers: each kind has its own subject root."""
    for stream in STREAMS:
        reads = [s.reads.removesuffix(">") for s in STAGES if s.stream == stream.name]
        for a, b in itertools.permutations(reads, 2):
            assert not a.startswith(b), (stream.name, a, b)


def _consumers(names: list[str], mode: str) -> list[list[str]]:
    return [[row.consumer for row in group] for group in chains(names, mode)]  # type: ignore[arg-type]


def test_split_mode_runs_one_consumer_per_stage_and_kind() -> None:
    assert _consumers(["validate", "dedupe", "persist"], "split") == [
        ["validate"],
        ["dedupe"],
        ["persist"],
        ["validate_bess"],
        ["dedupe_bess"],
        ["persist_bess"],
    ]


def test_fused_mode_chains_consecutive_stages_of_one_kind() -> None:
    assert _consumers(list(CONSUMER_STAGES), "fused") == [
        list(CONSUMER_STAGES),
        [f"{name}_bess" for name in CONSUMER_STAGES],
    ]
    assert _consumers(["validate", "persist", "window_aggregate"], "fused") == [
        ["validate"],
        ["persist", "window_aggregate"],
        ["validate_bess"],
        ["persist_bess", "window_aggregate_bess"],
    ]


def test_every_kind_has_every_consumer_stage_in_order() -> None:
    for kind in KINDS:
        assert tuple(row.name for row in rows(kind)) == CONSUMER_STAGES


def test_shipped_json_schema_matches_the_model() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "schemas/messwert.schema.json is stale: run python -c "
        "'from schemas.output import write_json_schema; write_json_schema()'"
    )
