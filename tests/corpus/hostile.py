"""A corpus of malformed and hostile MQTT messages, each with the reason it must be rejected for.

`HOSTILE` is the table; `carried_by` says which brokers pass a message on at all: some
topics are refused or rewritten by nats-server's MQTT listener (a space, a `>` token, a
payload over its 1 MiB limit), and some are not valid MQTT publish topics anywhere (`+`, `#`,
invalid UTF-8); those are checked against the stage functions directly.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Literal

ORG_A = uuid.UUID("550e8400-e29b-41d4-a716-446655440000")
ORG_B = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
#: Units the corpus assumes registered: unit 1 in ORG_A, unit 2 in ORG_B.
UNITS = {1: ORG_A, 2: ORG_B}
TOPIC = f"zev/{ORG_A}/1/messwert"
TS = "2025-06-01T10:07:00Z"

Carrier = Literal["any", "mosquitto", "none"]


@dataclass(frozen=True)
class Hostile:
    name: str
    topic: str
    payload: bytes
    reason: str
    carried_by: Carrier = "any"


def obj(**fields: object) -> bytes:
    """A payload from fields, with the good defaults for those not given (`...` drops one)."""
    base: dict[str, object] = {"timestamp": TS, "verbrauch": 1.5, "einspeisung": 0.25}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def raw(text: str) -> bytes:
    """A payload written by hand, for what `json.dumps` would never produce."""
    return text.encode()


GOOD = obj()

HOSTILE: tuple[Hostile, ...] = (
    # --- topics ---------------------------------------------------------------------------
    Hostile("dot inside the organization", f"zev/{ORG_A}.x/1/messwert", GOOD, "invalid_topic"),
    Hostile("NATS wildcard * as organization", "zev/*/1/messwert", GOOD, "invalid_topic"),
    Hostile(
        "NATS wildcard > as unit", f"zev/{ORG_A}/>/messwert", GOOD, "invalid_topic", "mosquitto"
    ),
    Hostile("token of 300 characters", f"zev/{'9' * 300}/1/messwert", GOOD, "invalid_topic"),
    Hostile("space in the unit", f"zev/{ORG_A}/1 /messwert", GOOD, "invalid_topic", "mosquitto"),
    Hostile("organization not a UUID", "zev/not-a-uuid/1/messwert", GOOD, "invalid_topic"),
    Hostile("organization a UUID with junk", f"zev/{ORG_A}0/1/messwert", GOOD, "invalid_topic"),
    Hostile("unit zero", f"zev/{ORG_A}/0/messwert", GOOD, "invalid_topic"),
    Hostile("unit negative", f"zev/{ORG_A}/-1/messwert", GOOD, "invalid_topic"),
    Hostile("unit with a dot", f"zev/{ORG_A}/1.5/messwert", GOOD, "invalid_topic"),
    Hostile("unit in letters", f"zev/{ORG_A}/abc/messwert", GOOD, "invalid_topic"),
    Hostile("unit in full-width digits", f"zev/{ORG_A}/１/messwert", GOOD, "invalid_topic"),
    Hostile("unit in exponent notation", f"zev/{ORG_A}/1e3/messwert", GOOD, "invalid_topic"),
    Hostile("unit beyond BIGINT", f"zev/{ORG_A}/{'9' * 25}/messwert", GOOD, "invalid_topic"),
    Hostile("dollar token", "zev/$SYS/1/messwert", GOOD, "invalid_topic"),
    Hostile("unit unknown", f"zev/{ORG_A}/999/messwert", GOOD, "unknown_unit"),
    Hostile(
        "unit of another organization", f"zev/{ORG_B}/1/messwert", GOOD, "organization_mismatch"
    ),
    Hostile("extra topic level", f"zev/{ORG_A}/1/messwert/x", GOOD, "invalid_topic", "none"),
    Hostile(
        "MQTT wildcard + in a publish topic",
        f"zev/{ORG_A}/+/messwert",
        GOOD,
        "invalid_topic",
        "none",
    ),
    # --- not JSON, or not an object ---------------------------------------------------------
    Hostile("empty payload", TOPIC, b"", "invalid_json"),
    Hostile("only white space", TOPIC, b"  \n\t ", "invalid_json"),
    Hostile("plain text", TOPIC, b"not json", "invalid_json"),
    Hostile(
        "truncated object", TOPIC, raw('{"timestamp": "2025-06-01T10:07:00Z",'), "invalid_json"
    ),
    Hostile("invalid UTF-8", TOPIC, b'{"timestamp": "\xff\xfe"}', "invalid_json"),
    Hostile("UTF-8 byte order mark", TOPIC, b"\xef\xbb\xbf" + GOOD, "invalid_json"),
    Hostile("arrays nested 5000 deep", TOPIC, b"[" * 5000 + b"]" * 5000, "invalid_json"),
    Hostile(
        "objects nested 3000 deep", TOPIC, b'{"a":' * 3000 + b"1" + b"}" * 3000, "invalid_json"
    ),
    Hostile(
        "field nested 20000 deep",
        TOPIC,
        b'{"timestamp": "2025-06-01T10:07:00Z", "einspeisung": 0, "verbrauch": '
        + b"[" * 20000
        + b"]" * 20000
        + b"}",
        "invalid_json",
    ),
    Hostile(
        "duplicate keys",
        TOPIC,
        raw(
            '{"timestamp": "2025-06-01T10:07:00Z", "verbrauch": 1, "verbrauch": 2, '
            '"einspeisung": 0}'
        ),
        "invalid_json",
    ),
    Hostile("two objects back to back", TOPIC, GOOD + GOOD, "invalid_json"),
    Hostile("single quotes", TOPIC, raw("{'timestamp': '2025-06-01T10:07:00Z'}"), "invalid_json"),
    Hostile("trailing comma", TOPIC, GOOD[:-1] + b", }", "invalid_json"),
    Hostile("comment", TOPIC, b"/* meter */ " + GOOD, "invalid_json"),
    Hostile(
        "hexadecimal number",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": 0x10, "einspeisung": 0}}'),
        "invalid_json",
    ),
    Hostile(
        "number with leading zero",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": 01.5, "einspeisung": 0}}'),
        "invalid_json",
    ),
    Hostile(
        "number with plus sign",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": +1, "einspeisung": 0}}'),
        "invalid_json",
    ),
    Hostile("array", TOPIC, b"[1, 2, 3]", "not_an_object"),
    Hostile("null", TOPIC, b"null", "not_an_object"),
    Hostile("string", TOPIC, b'"text"', "not_an_object"),
    Hostile("number", TOPIC, b"42", "not_an_object"),
    Hostile("boolean", TOPIC, b"true", "not_an_object"),
    # --- size -------------------------------------------------------------------------------
    Hostile("payload bomb of 70 KiB", TOPIC, obj(padding="x" * 70_000), "payload_too_large"),
    Hostile(
        "payload bomb of 2 MiB",
        TOPIC,
        obj(padding="x" * 2_000_000),
        "payload_too_large",
        "mosquitto",
    ),
    # --- fields -----------------------------------------------------------------------------
    Hostile("empty object", TOPIC, b"{}", "missing_field"),
    Hostile("timestamp missing", TOPIC, obj(timestamp=...), "missing_field"),
    Hostile("verbrauch missing", TOPIC, obj(verbrauch=...), "missing_field"),
    Hostile("einspeisung missing", TOPIC, obj(einspeisung=...), "missing_field"),
    Hostile("verbrauch null", TOPIC, obj(verbrauch=None), "missing_field"),
    Hostile("timestamp null", TOPIC, obj(timestamp=None), "missing_field"),
    Hostile("verbrauch as a string", TOPIC, obj(verbrauch="1.5"), "invalid_number"),
    Hostile("verbrauch as a boolean", TOPIC, obj(verbrauch=True), "invalid_number"),
    Hostile(
        "verbrauch NaN",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": NaN, "einspeisung": 0}}'),
        "invalid_number",
    ),
    Hostile(
        "verbrauch Infinity",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": Infinity, "einspeisung": 0}}'),
        "invalid_number",
    ),
    Hostile(
        "einspeisung -Infinity",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": 1, "einspeisung": -Infinity}}'),
        "invalid_number",
    ),
    Hostile("verbrauch an object", TOPIC, obj(verbrauch={"kWh": 1}), "invalid_number"),
    Hostile("verbrauch an array", TOPIC, obj(verbrauch=[1]), "invalid_number"),
    Hostile("zaehlerstand as a string", TOPIC, obj(zaehlerstandVerbrauch="12"), "invalid_number"),
    Hostile("verbrauch negative", TOPIC, obj(verbrauch=-1), "negative_value"),
    Hostile("einspeisung slightly negative", TOPIC, obj(einspeisung=-0.0001), "negative_value"),
    Hostile("zaehlerstand negative", TOPIC, obj(zaehlerstandEinspeisung=-5), "negative_value"),
    Hostile(
        "verbrauch 1e12",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": 1e12, "einspeisung": 0}}'),
        "out_of_range",
    ),
    Hostile("verbrauch exactly 10^8", TOPIC, obj(verbrauch=100_000_000), "out_of_range"),
    Hostile(
        "verbrauch 1e400, beyond a float",
        TOPIC,
        raw(f'{{"timestamp": "{TS}", "verbrauch": 1e400, "einspeisung": 0}}'),
        "out_of_range",
    ),
    Hostile("verbrauch with 50 digits", TOPIC, obj(verbrauch=10**50), "out_of_range"),
    Hostile("zaehlerstand 1e9", TOPIC, obj(zaehlerstandVerbrauch=1_000_000_000), "out_of_range"),
    Hostile(
        "timestamp without offset", TOPIC, obj(timestamp="2025-06-01T10:07:00"), "invalid_timestamp"
    ),
    Hostile("timestamp in words", TOPIC, obj(timestamp="yesterday"), "invalid_timestamp"),
    Hostile("timestamp as epoch seconds", TOPIC, obj(timestamp=1_700_000_000), "invalid_timestamp"),
    Hostile("month 13", TOPIC, obj(timestamp="2025-13-01T00:00:00Z"), "invalid_timestamp"),
    Hostile("30 February", TOPIC, obj(timestamp="2025-02-30T00:00:00Z"), "invalid_timestamp"),
    Hostile("week date", TOPIC, obj(timestamp="2025-W01-1T00:00:00Z"), "invalid_timestamp"),
    Hostile("date only", TOPIC, obj(timestamp="2025-06-01"), "invalid_timestamp"),
    Hostile(
        "offset of 25 hours", TOPIC, obj(timestamp="2025-06-01T10:07:00+25:00"), "invalid_timestamp"
    ),
    Hostile(
        "timestamp of 60000 characters", TOPIC, obj(timestamp="2" * 60_000), "invalid_timestamp"
    ),
    Hostile(
        "NUL inside the timestamp",
        TOPIC,
        obj(timestamp="2025-06-01T10:07:00Z\u0000"),
        "invalid_timestamp",
    ),
    Hostile(
        "lone surrogate in the timestamp",
        TOPIC,
        raw('{"timestamp": "\\ud800", "verbrauch": 1, "einspeisung": 0}'),
        "invalid_json",
    ),
    Hostile(
        "lone surrogate in a key", TOPIC, raw('{"\\udfff": 1, ' + GOOD.decode()[1:]), "invalid_json"
    ),
)
