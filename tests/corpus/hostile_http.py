"""Hostile HTTP requests to the ingest API, written byte by byte, each with the status it must
get: oversized, slow and malformed heads and bodies, bad tokens, wrong content types, huge
arrays. `{token}` in a request stands for a valid token of ORG, `{other}` for a unit of
another organization."""

from __future__ import annotations

import json
from dataclasses import dataclass

ORG_UNIT = 1
OTHER_UNIT = 2
PATH = "/api/zev/messwerte"
ITEM = {
    "einheitId": ORG_UNIT,
    "timestamp": "2025-06-01T10:07:00Z",
    "verbrauch": 1.5,
    "einspeisung": 0,
}


@dataclass(frozen=True)
class HostileRequest:
    name: str
    head: str  # request line and headers, without the blank line; `{length}` is filled in
    body: bytes
    status: int
    #: Send the head and this much of the body, then nothing more (a slow client).
    stall_after: int | None = None


def post(body: bytes, *headers: str, path: str = PATH) -> str:
    lines = [f"POST {path} HTTP/1.1", "Host: localhost", *headers]
    if not any(h.lower().startswith("content-length") for h in headers):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines)


AUTH = "Authorization: Bearer {token}"
JSON = "Content-Type: application/json"


def good(**changes: object) -> bytes:
    return json.dumps({**ITEM, **changes}).encode()


def _request(name: str, body: bytes, status: int, *headers: str) -> HostileRequest:
    return HostileRequest(name, post(body, *headers), body, status)


HOSTILE_HTTP: tuple[HostileRequest, ...] = (
    # --- tokens ---------------------------------------------------------------------------
    _request("no Authorization header", good(), 401, JSON),
    _request("Basic instead of Bearer", good(), 401, "Authorization: Basic Zm9vOmJhcg==", JSON),
    _request("Bearer without a token", good(), 401, "Authorization: Bearer ", JSON),
    _request("a made-up token", good(), 401, "Authorization: Bearer abcdefghijklmnop", JSON),
    _request("a token of 4 KiB", good(), 401, "Authorization: Bearer " + "x" * 4096, JSON),
    _request("a header line of 20 KiB", good(), 400, "Authorization: Bearer " + "x" * 20_000, JSON),
    _request("a token with non-ASCII bytes", good(), 401, "Authorization: Bearer tök€n", JSON),
    # --- content type and size ----------------------------------------------------------------
    _request("text/plain", good(), 415, AUTH, "Content-Type: text/plain"),
    _request("no content type", good(), 415, AUTH),
    _request(
        "form-encoded", b"a=1&b=2", 415, AUTH, "Content-Type: application/x-www-form-urlencoded"
    ),
    _request("declares 2 MiB", good(), 413, AUTH, JSON, "Content-Length: 2097152"),
    _request("sends 1.5 MiB", b"[" + b" " * 1_500_000 + b"]", 413, AUTH, JSON),
    _request(
        "UTF-16 body",
        good().decode().encode("utf-16"),
        400,
        AUTH,
        "Content-Type: application/json; charset=utf-16",
    ),
    # --- bodies ---------------------------------------------------------------------------
    _request("not JSON", b"<xml/>", 400, AUTH, JSON),
    _request("empty body", b"", 400, AUTH, JSON),
    _request("a JSON string", b'"readings"', 400, AUTH, JSON),
    _request("an empty array", b"[]", 400, AUTH, JSON),
    _request("1001 items", json.dumps([ITEM] * 1001).encode(), 400, AUTH, JSON),
    _request("nested 100 000 deep", b"[" * 100_000 + b"]" * 100_000, 400, AUTH, JSON),
    _request("duplicate keys", b'{"einheitId": 1, "einheitId": 2}', 400, AUTH, JSON),
    _request("NaN in an item", b'[{"einheitId": 1, "verbrauch": NaN}]', 400, AUTH, JSON),
    _request("a lone surrogate", b'{"\\ud800": 1}', 400, AUTH, JSON),
    _request(
        "1000 numbers instead of objects", json.dumps(list(range(1000))).encode(), 422, AUTH, JSON
    ),
    _request("einheitId as a string", good(einheitId="1"), 422, AUTH, JSON),
    _request("einheitId negative", good(einheitId=-1), 422, AUTH, JSON),
    _request("another organization's unit", good(einheitId=OTHER_UNIT), 403, AUTH, JSON),
    # --- the request itself ---------------------------------------------------------------------
    HostileRequest(
        "a body that stops coming", post(good(), AUTH, JSON), good(), 400, stall_after=10
    ),
    HostileRequest("a request line of garbage", "GARBAGE / NONSENSE", b"", 400),
    HostileRequest(
        "PUT instead of POST", post(good(), AUTH, JSON).replace("POST", "PUT", 1), good(), 405
    ),
    HostileRequest("an unknown path", post(good(), AUTH, JSON, path="/api/nowhere"), good(), 404),
    HostileRequest(
        "a path that climbs out", post(good(), AUTH, JSON, path="/api/../etc/passwd"), good(), 404
    ),
)
