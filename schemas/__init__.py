"""Pydantic models of every message the pipeline reads or writes, and their JSON Schemas.

One module per concern: `payload` is what a smart meter sends, `messages` what travels
between stages, `output` what downstream consumers receive on `messwerte.>`.
"""

from schemas.messages import IngestMessage, Persisted, Reading, Reject
from schemas.output import MesswertMessage
from schemas.payload import MesswertPayload

__all__ = [
    "IngestMessage",
    "MesswertMessage",
    "MesswertPayload",
    "Persisted",
    "Reading",
    "Reject",
]
