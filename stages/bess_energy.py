"""The arithmetic of a BESS interval (design §13): energy by trapezoidal integration of power
between consecutive samples, and the statistics of the samples in the interval.

Between two consecutive samples of a device at most `max_gap_s` apart, p(t) is the straight
line between them; farther apart, the stretch is a gap and holds no energy. Discharged energy
is ∫ max(p, 0) dt, charged energy ∫ max(−p, 0) dt, each over the part of a stretch inside the
interval (end − 15 min, end]; a stretch that crosses zero is split at its zero. Pure functions
of plain values, so they can be checked against a brute-force integration.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

from schemas.messages import interval_end

INTERVAL = timedelta(minutes=15)
KWH_SCALE = Decimal("0.0001")
_US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class Sample:
    """What the interval arithmetic needs of a stored sample."""

    ts: datetime
    p: float
    soc: float = 0.0
    t_cell_max: float | None = None
    soh: float | None = None
    alarms: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Energy:
    charged_kwh: Decimal
    discharged_kwh: Decimal
    #: Whole seconds of the interval covered by stretches (900 = complete).
    covered_seconds: int


@dataclass(frozen=True, slots=True)
class Interval:
    """One computed `bess_interval` row, without its identity and revision."""

    energy: Energy
    samples: int
    soc_min: float | None
    soc_max: float | None
    soc_last: float | None
    t_cell_max: float | None
    soh_last: float | None
    alarms: tuple[str, ...]

    @property
    def exists(self) -> bool:
        """A row exists when the interval has a sample or covered seconds (design §13)."""
        return self.samples > 0 or self.energy.covered_seconds > 0


def _us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def kwh(kw_seconds: float) -> Decimal:
    """kW·s to kWh, rounded to 4 decimals half away from zero (as NUMERIC(12,4) stores it)."""
    # Divided in decimal, not binary: 0.18 kW·s is 0.00005 kWh exactly, and rounds up.
    value = (Decimal(repr(kw_seconds)) / 3600).quantize(KWH_SCALE, rounding=ROUND_HALF_UP)
    return value + 0  # -0 -> 0


def _areas(p0: float, p1: float, seconds: float) -> tuple[float, float]:
    """(discharged, charged) kW·s of the straight line from p0 to p1 over `seconds`."""
    if p0 >= 0 and p1 >= 0:
        return (p0 + p1) / 2 * seconds, 0.0
    if p0 <= 0 and p1 <= 0:
        return 0.0, -(p0 + p1) / 2 * seconds
    zero = seconds * p0 / (p0 - p1)  # where the line crosses zero
    if p0 > 0:
        return p0 * zero / 2, -p1 * (seconds - zero) / 2
    return p1 * (seconds - zero) / 2, -p0 * zero / 2


def energy(samples: Sequence[Sample], end: datetime, max_gap_s: float) -> Energy:
    """Energy and coverage of the interval (end − 15 min, end] from a device's samples, which
    must include the neighbours just outside it (sorted by `ts` here)."""
    start_us, end_us = _us(end - INTERVAL), _us(end)
    gap_us = max_gap_s * _US
    points = sorted((_us(s.ts), s.p) for s in samples)
    discharged = charged = 0.0
    covered_us = 0
    for (a_us, pa), (b_us, pb) in itertools.pairwise(points):
        span_us = b_us - a_us
        if span_us <= 0 or span_us > gap_us:
            continue  # a gap holds no energy
        lo_us, hi_us = max(a_us, start_us), min(b_us, end_us)
        if hi_us <= lo_us:
            continue
        slope = (pb - pa) / span_us
        p_lo = pa + slope * (lo_us - a_us)
        p_hi = pa + slope * (hi_us - a_us)
        out, into = _areas(p_lo, p_hi, (hi_us - lo_us) / _US)
        discharged += out
        charged += into
        covered_us += hi_us - lo_us
    return Energy(kwh(charged), kwh(discharged), (covered_us + _US // 2) // _US)


def in_interval(samples: Iterable[Sample], end: datetime) -> list[Sample]:
    """The samples with ts in (end − 15 min, end], oldest first."""
    start = end - INTERVAL
    return sorted((s for s in samples if start < s.ts <= end), key=lambda s: s.ts)


def interval(samples: Sequence[Sample], end: datetime, max_gap_s: float) -> Interval:
    """The whole row of the interval ending at `end`: energy from the stretches around it,
    statistics from the samples inside it."""
    inside = in_interval(samples, end)
    temperatures = [s.t_cell_max for s in inside if s.t_cell_max is not None]
    healths = [s.soh for s in inside if s.soh is not None]
    return Interval(
        energy=energy(samples, end, max_gap_s),
        samples=len(inside),
        soc_min=min((s.soc for s in inside), default=None),
        soc_max=max((s.soc for s in inside), default=None),
        soc_last=inside[-1].soc if inside else None,
        t_cell_max=max(temperatures, default=None),
        soh_last=healths[-1] if healths else None,
        alarms=tuple(sorted({alarm for s in inside for alarm in s.alarms})),
    )


def touched_ends(ts: datetime, max_gap_s: float) -> list[datetime]:
    """Ends of every interval a stretch from or to a sample at `ts` can reach: those of
    [ts − gap, ts + gap]. A sample that arrives or changes can change only these."""
    gap = timedelta(seconds=max_gap_s)
    first, last = interval_end(ts - gap), interval_end(ts + gap)
    ends = [first]
    while ends[-1] < last:
        ends.append(ends[-1] + INTERVAL)
    return ends
