"""`pipeline asyncapi`: the AsyncAPI document and JSON Schemas, and their committed copies."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import asyncapi
from pipeline.cli import main
from pipeline.topology import STREAMS

SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"


def test_committed_documents_match_the_code() -> None:
    """Drift check: a changed model or subject without `pipeline asyncapi --out schemas` fails."""
    stale = [
        name
        for name, text in asyncapi.files().items()
        if not (SCHEMAS / name).exists() or (SCHEMAS / name).read_text() != text
    ]
    assert not stale, f"stale: {stale}; run pipeline asyncapi --out schemas"


def test_every_stream_subject_has_a_channel_in_the_document() -> None:
    addresses = {c["address"] for c in asyncapi.document()["channels"].values()}
    for stream in STREAMS:
        for subject in stream.subjects:
            root = subject.removesuffix(".>")
            assert any(address.startswith(root + ".") for address in addresses), subject


def test_the_output_channel_carries_the_messwert_schema_consumers_rely_on() -> None:
    doc = asyncapi.document()
    channel = next(c for c in doc["channels"].values() if c["address"].startswith("messwerte."))
    assert channel["address"] == "messwerte.{organizationId}.{einheitId}"
    schema = doc["components"]["schemas"]["MesswertMessage"]
    assert set(schema["required"]) >= {
        "organizationId", "einheitId", "zeit", "intervalStart", "verbrauch", "einspeisung",
        "anzahlRohwerte", "quelle", "revision",
    }  # fmt: skip


def test_cli_writes_the_document_and_a_schema_per_message(tmp_path, capsys) -> None:
    assert main(["asyncapi", "--out", str(tmp_path)]) == 0
    written = {p.name for p in tmp_path.iterdir()}
    assert written == set(asyncapi.files())
    assert json.loads((tmp_path / "asyncapi.json").read_text())["asyncapi"] == "3.0.0"
    assert "asyncapi: wrote" in capsys.readouterr().out
