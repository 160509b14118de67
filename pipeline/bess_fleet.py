"""Simulated battery storage systems and an HTTP meter gateway for the demo.

Each battery follows a daily schedule (charging from midday solar, discharging in the evening,
idling otherwise), its state of charge follows the energy it moved, its cells warm with the
power, and now and then it raises an alarm. The gateway posts meter readings to the ingest API
with a token, as a device that cannot speak MQTT would.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import aiohttp

from pipeline.config import MqttTarget
from pipeline.fleet import Unit, backfill_then_live, client, reading

CAPACITY_KWH = 200.0
MAX_POWER_KW = 100.0


@dataclass
class Battery:
    site: str
    device: str
    organization_id: UUID
    soc: float = 50.0
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        # Each battery its own noise and starting charge, the same on every run.
        self.rng = random.Random(f"{self.site}/{self.device}")
        self.soc = round(self.rng.uniform(30, 70), 1)

    @property
    def topic(self) -> str:
        return f"bess/{self.site}/{self.device}/telemetry"

    def power_kw(self, at: datetime) -> float:
        """The schedule: charge 10–15 h, discharge 17–22 h (Central European time), else idle;
        never beyond what the state of charge allows."""
        hour = (at.astimezone(UTC).hour + 1) % 24
        if 10 <= hour < 15 and self.soc < 95:
            target = -0.6 * MAX_POWER_KW
        elif 17 <= hour < 22 and self.soc > 10:
            target = 0.7 * MAX_POWER_KW
        else:
            target = 0.0
        return round(target + self.rng.uniform(-3, 3), 2)

    def sample(self, at: datetime, step: timedelta) -> dict[str, Any]:
        p = self.power_kw(at)
        self.soc = min(
            100.0, max(0.0, self.soc - p * step.total_seconds() / 3600 / CAPACITY_KWH * 100)
        )
        v_dc = round(740 + self.soc * 0.6, 1)
        t_cell = round(22 + abs(p) * 0.12 + self.rng.uniform(-0.5, 0.5), 1)
        alarms = []
        if t_cell > 33.5:
            alarms.append("HIGH_CELL_TEMPERATURE")
        if self.rng.random() < 0.005:
            alarms.append("CELL_IMBALANCE")
        return {
            "ts": at.isoformat(),
            "soc": round(self.soc, 2),
            "p": p,
            "p_ch": max(-p, 0.0),
            "p_dis": max(p, 0.0),
            "v_dc": v_dc,
            "i_dc": round(p * 1000 / v_dc, 1),
            "t_cell_max": t_cell,
            "soh": 97.8,
            "alarms": alarms,
        }


class BessFleet:
    def __init__(self, mqtt_url: str, batteries: Sequence[Battery]) -> None:
        self._target = MqttTarget(mqtt_url)
        self.batteries = list(batteries)
        self.published = 0

    async def run(
        self, backfill: timedelta, step: timedelta, every: timedelta, stop: asyncio.Event
    ) -> None:
        """Samples every `step` over the `backfill` before now, then one every `every`."""
        async with client(self._target, "bess") as mqtt:

            async def send(at: datetime, span: timedelta) -> None:
                for battery in self.batteries:
                    payload = json.dumps(battery.sample(at, span)).encode()
                    await mqtt.publish(battery.topic, payload, qos=1)
                    self.published += 1

            await backfill_then_live(send, backfill, step, every, stop)


class Gateway:
    """Posts its units' meter readings to `POST /api/zev/messwerte`, a batch per round."""

    def __init__(self, api_url: str, token: str, units: Sequence[Unit]) -> None:
        self._url = f"{api_url}/api/zev/messwerte"
        self._headers = {"Authorization": f"Bearer {token}"}
        self.units = list(units)
        self._rng = random.Random(11)
        self.accepted = 0

    async def _post(self, session: aiohttp.ClientSession, at: datetime, step: timedelta) -> None:
        items = [
            {"einheitId": unit.einheit_id, **json.loads(reading(at, step, self._rng))}
            for unit in self.units
        ]
        for _ in range(5):  # a 503 asks us to come back: as a real gateway, retry the same batch
            async with session.post(self._url, json=items, headers=self._headers) as resp:
                if resp.status == 202:
                    self.accepted += (await resp.json())["accepted"]
                    return
                if resp.status != 503:
                    return
            await asyncio.sleep(1)

    async def run(
        self, backfill: timedelta, step: timedelta, every: timedelta, stop: asyncio.Event
    ) -> None:
        async with aiohttp.ClientSession() as session:

            async def send(at: datetime, span: timedelta) -> None:
                await self._post(session, at, span)

            await backfill_then_live(send, backfill, step, every, stop)
