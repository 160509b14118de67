"""The shape rules: stages know no transport, the topology is consistent, the schema ships."""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import pytest

from pipeline.app import chains
from pipeline.topology import BY_NAME, CONSUMER_STAGES, STAGES, STREAMS
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


def test_each_stage_consumes_what_the_previous_one_writes() -> None:
    for before, after in itertools.pairwise(CONSUMER_STAGES):
        assert BY_NAME[after].consumes in BY_NAME[before].writes


def test_split_mode_runs_one_consumer_per_stage() -> None:
    assert chains(["validate", "dedupe", "persist"], "split") == [
        ["validate"],
        ["dedupe"],
        ["persist"],
    ]


def test_fused_mode_chains_consecutive_stages() -> None:
    assert chains(CONSUMER_STAGES, "fused") == [list(CONSUMER_STAGES)]
    assert chains(["validate", "persist", "window_aggregate"], "fused") == [
        ["validate"],
        ["persist", "window_aggregate"],
    ]


def test_shipped_json_schema_matches_the_model() -> None:
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema(), (
        "schemas/messwert.schema.json is stale: run python -c "
        "'from schemas.output import write_json_schema; write_json_schema()'"
    )
