"""JetStreamOut keeps each subject's order when publishes fail (a stream leader being elected):
the second message of a subject goes out only once the first is stored."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors

from pipeline.publishing import JetStreamOut, waves


def out(subject: str, n: int) -> tuple[str, bytes, dict[str, str]]:
    return subject, str(n).encode(), {"Nats-Msg-Id": f"{subject}:{n}"}


def test_waves_hold_the_nth_message_of_every_subject_in_batch_order() -> None:
    batch = [out("a", 1), out("b", 1), out("a", 2), out("c", 1), out("a", 3), out("b", 2)]
    assert waves(batch) == [
        [out("a", 1), out("b", 1), out("c", 1)],
        [out("a", 2), out("b", 2)],
        [out("a", 3)],
    ]


def test_a_batch_of_distinct_subjects_is_one_wave() -> None:
    batch = [out(f"unit.{n}", n) for n in range(500)]
    assert waves(batch) == [batch]


class FlakyStream:
    """Stores what it is sent, except that the first publish of each message in `lose` fails
    (no responders, as while a leader is elected)."""

    def __init__(self, lose: set[bytes]) -> None:
        self.stored: list[tuple[str, bytes]] = []
        self._lose = set(lose)

    async def publish_async(self, subject: str, body: bytes, headers: Any = None) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if body in self._lose:
            self._lose.discard(body)
            future.set_exception(nats.errors.NoRespondersError())
        else:
            self.stored.append((subject, body))
            future.set_result(None)
        return future

    # JetStreamOut declares the streams again on "no responders"; nothing to declare here.
    async def stream_info(self, name: str) -> Any:
        raise nats.errors.NoRespondersError()


async def test_a_lost_publish_is_stored_again_before_the_next_of_its_subject() -> None:
    stream = FlakyStream(lose={b"1"})
    batch = [out("a", 1), out("b", 1), out("a", 2), out("a", 3)]
    await JetStreamOut(stream, asyncio.Event()).publish(batch)
    of_a = [body for subject, body in stream.stored if subject == "a"]
    assert of_a == [b"1", b"2", b"3"]
    assert (("b", b"1")) in stream.stored
