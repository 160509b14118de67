"""Malformed and hostile BESS telemetry over MQTT, each with the reason it must be rejected for
(design §13). `carried_by` as in `tests.corpus.hostile`."""

from __future__ import annotations

import json
import uuid

from tests.corpus.hostile import Hostile, raw

ORG = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
#: Devices the corpus assumes registered, all in ORG.
DEVICES = {("site1", "bess1"): ORG}
TOPIC = "bess/site1/bess1/telemetry"
TS = "2025-06-01T10:07:00Z"


def obj(**fields: object) -> bytes:
    """A sample from fields, with good defaults for those not given (`...` drops one)."""
    base: dict[str, object] = {"ts": TS, "soc": 55.5, "p": -12.5, "alarms": []}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


GOOD = obj()

HOSTILE_BESS: tuple[Hostile, ...] = (
    # --- topics ---------------------------------------------------------------------------
    Hostile("bess: site with a dot", "bess/site.1/bess1/telemetry", GOOD, "invalid_topic"),
    Hostile("bess: NATS wildcard * as device", "bess/site1/*/telemetry", GOOD, "invalid_topic"),
    Hostile(
        "bess: site of 65 characters", f"bess/{'s' * 65}/bess1/telemetry", GOOD, "invalid_topic"
    ),
    Hostile("bess: umlaut in the device", "bess/site1/bäss1/telemetry", GOOD, "invalid_topic"),
    Hostile(
        "bess: space in the site", "bess/site 1/bess1/telemetry", GOOD, "invalid_topic", "mosquitto"
    ),
    # Not matched by the bridge's subscription: checked against the stage functions only.
    Hostile("bess: five levels", "bess/site1/bess1/x/telemetry", GOOD, "invalid_topic", "none"),
    Hostile("bess: unregistered device", "bess/site1/bess9/telemetry", GOOD, "unknown_device"),
    Hostile("bess: unregistered site", "bess/site9/bess1/telemetry", GOOD, "unknown_device"),
    # --- site and device in the payload ------------------------------------------------------
    Hostile("bess: payload names another site", TOPIC, obj(site="site2"), "topic_mismatch"),
    Hostile("bess: payload names another device", TOPIC, obj(device="bess2"), "topic_mismatch"),
    Hostile("bess: device as a number", TOPIC, obj(device=1), "topic_mismatch"),
    # --- JSON ---------------------------------------------------------------------------------
    Hostile("bess: empty payload", TOPIC, b"", "invalid_json"),
    Hostile("bess: truncated JSON", TOPIC, GOOD[:-3], "invalid_json"),
    Hostile(
        "bess: duplicate soc",
        TOPIC,
        raw(f'{{"ts": "{TS}", "soc": 1, "soc": 2, "p": 0}}'),
        "invalid_json",
    ),
    Hostile(
        "bess: NaN power", TOPIC, raw(f'{{"ts": "{TS}", "soc": 1, "p": NaN}}'), "invalid_number"
    ),
    Hostile(
        "bess: Infinity soc",
        TOPIC,
        raw(f'{{"ts": "{TS}", "soc": Infinity, "p": 0}}'),
        "invalid_number",
    ),
    Hostile("bess: an array", TOPIC, b"[1, 2, 3]", "not_an_object"),
    Hostile(
        "bess: nested 100 000 deep", TOPIC, b"[" * 100_000 + b"]" * 100_000, "payload_too_large"
    ),
    Hostile("bess: nested 5 000 deep", TOPIC, b'{"a":' * 5000 + b"1" + b"}" * 5000, "invalid_json"),
    Hostile("bess: not UTF-8", TOPIC, b'{"ts": "\xff\xfe", "soc": 1, "p": 0}', "invalid_json"),
    # --- fields -------------------------------------------------------------------------------
    Hostile("bess: soc missing", TOPIC, obj(soc=...), "missing_field"),
    Hostile("bess: p null", TOPIC, obj(p=None), "missing_field"),
    Hostile("bess: ts missing", TOPIC, obj(ts=...), "missing_field"),
    Hostile("bess: soc a string", TOPIC, obj(soc="55"), "invalid_number"),
    Hostile("bess: p a boolean", TOPIC, obj(p=False), "invalid_number"),
    Hostile("bess: soc 100.5", TOPIC, obj(soc=100.5), "out_of_range"),
    Hostile("bess: soc negative", TOPIC, obj(soc=-1), "out_of_range"),
    Hostile("bess: p beyond a gigawatt", TOPIC, obj(p=1e7), "out_of_range"),
    Hostile("bess: p_dis negative", TOPIC, obj(p_dis=-5), "out_of_range"),
    Hostile("bess: v_dc negative", TOPIC, obj(v_dc=-800), "out_of_range"),
    Hostile(
        "bess: i_dc 1e400",
        TOPIC,
        raw(f'{{"ts": "{TS}", "soc": 1, "p": 0, "i_dc": 1e400}}'),
        "out_of_range",
    ),
    Hostile("bess: cell at 151 °C", TOPIC, obj(t_cell_max=151), "out_of_range"),
    Hostile("bess: cell at -61 °C", TOPIC, obj(t_cell_max=-61), "out_of_range"),
    Hostile("bess: soh 120", TOPIC, obj(soh=120), "out_of_range"),
    Hostile("bess: 65 alarms", TOPIC, obj(alarms=[f"A{i}" for i in range(65)]), "out_of_range"),
    Hostile("bess: alarm of 65 characters", TOPIC, obj(alarms=["A" * 65]), "out_of_range"),
    Hostile("bess: empty alarm", TOPIC, obj(alarms=[""]), "out_of_range"),
    Hostile("bess: alarms an object", TOPIC, obj(alarms={"a": 1}), "out_of_range"),
    Hostile("bess: ts without offset", TOPIC, obj(ts="2025-06-01T10:07:00"), "invalid_timestamp"),
    Hostile("bess: ts epoch millis", TOPIC, obj(ts=1_748_772_420_000), "invalid_timestamp"),
)
