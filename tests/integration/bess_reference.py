"""The expected BESS outcome of a set of samples, computed independently of the pipeline:
exact rational arithmetic (`fractions`), one interval at a time, straight from design §13.

It shares no code with `stages.bess_energy`; tests compare the two end to end.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Any

QUARTER = timedelta(minutes=15)
#: (site, device, ts) -> the sample's fields as sent (last write wins)
Samples = dict[tuple[str, str, datetime], dict[str, Any]]


def _seconds(delta: timedelta) -> Fraction:
    return Fraction(delta // timedelta(microseconds=1), 1_000_000)


def _end_of(ts: datetime) -> datetime:
    floor = ts.replace(minute=ts.minute - ts.minute % 15, second=0, microsecond=0)
    return floor if floor == ts else floor + QUARTER


def _kwh(kw_seconds: Fraction) -> Decimal:
    exact = Decimal(kw_seconds.numerator) / Decimal(kw_seconds.denominator) / 3600
    return exact.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP) + 0


@dataclass(frozen=True)
class Expected:
    charged: Decimal
    discharged: Decimal
    covered: int
    samples: int
    soc_min: float | None
    soc_max: float | None
    soc_last: float | None
    t_cell_max: float | None
    soh_last: float | None
    alarms: tuple[str, ...]


def intervals(samples: Samples, max_gap_s: float) -> dict[tuple[str, str, datetime], Expected]:
    """Every interval row there must be, per (site, device, interval end)."""
    by_device: dict[tuple[str, str], list[tuple[datetime, dict[str, Any]]]] = {}
    for (site, device, ts), fields in samples.items():
        by_device.setdefault((site, device), []).append((ts.astimezone(UTC), fields))
    out: dict[tuple[str, str, datetime], Expected] = {}
    gap = Fraction(max_gap_s)
    for which, points in by_device.items():
        points.sort(key=lambda p: p[0])
        ends = {_end_of(ts) for ts, _ in points}
        stretches = [
            (a, Fraction(str(fa["p"])), b, Fraction(str(fb["p"])))
            for (a, fa), (b, fb) in itertools.pairwise(points)
            if _seconds(b - a) <= gap
        ]
        for a, _, b, _ in stretches:
            end = _end_of(a) if _end_of(a) != a else a + QUARTER
            while end - QUARTER < b:
                ends.add(end)
                end += QUARTER
        for end in ends:
            row = _interval(points, stretches, end)
            if row.samples or row.covered:
                out[(*which, end)] = row
    return out


def _interval(
    points: list[tuple[datetime, dict[str, Any]]],
    stretches: list[tuple[datetime, Fraction, datetime, Fraction]],
    end: datetime,
) -> Expected:
    start = end - QUARTER
    charged = discharged = covered = Fraction(0)
    for a, pa, b, pb in stretches:
        lo, hi = max(a, start), min(b, end)
        if hi <= lo:
            continue
        span = _seconds(b - a)
        p_lo = pa + (pb - pa) * _seconds(lo - a) / span
        p_hi = pa + (pb - pa) * _seconds(hi - a) / span
        width = _seconds(hi - lo)
        covered += width
        pieces = [(p_lo, p_hi, width)]
        if p_lo * p_hi < 0:  # crosses zero: two triangles
            zero = width * p_lo / (p_lo - p_hi)
            pieces = [(p_lo, Fraction(0), zero), (Fraction(0), p_hi, width - zero)]
        for p0, p1, w in pieces:
            area = (p0 + p1) / 2 * w
            if area > 0:
                discharged += area
            else:
                charged -= area
    inside = [f for ts, f in points if start < ts <= end]
    socs = [float(f["soc"]) for f in inside]
    temps = [float(f["t_cell_max"]) for f in inside if f.get("t_cell_max") is not None]
    healths = [float(f["soh"]) for f in inside if f.get("soh") is not None]
    return Expected(
        charged=_kwh(charged),
        discharged=_kwh(discharged),
        covered=int(Decimal(covered.numerator) / covered.denominator + Decimal("0.5")),
        samples=len(inside),
        soc_min=min(socs, default=None),
        soc_max=max(socs, default=None),
        soc_last=socs[-1] if socs else None,
        t_cell_max=max(temps, default=None),
        soh_last=healths[-1] if healths else None,
        alarms=tuple(sorted({a for f in inside for a in f.get("alarms") or []})),
    )


def of_row(row: Any) -> Expected:
    """A `bess_interval` row (or a published message, by its JSON names) in reference terms."""
    names = (
        ("energy_charged_kwh", "energyChargedKwh"), ("energy_discharged_kwh", "energyDischargedKwh"),
        ("covered_seconds", "coveredSeconds"), ("samples", "samples"), ("soc_min", "socMin"),
        ("soc_max", "socMax"), ("soc_last", "socLast"), ("t_cell_max", "tCellMax"),
        ("soh_last", "sohLast"), ("alarms", "alarms"),
    )  # fmt: skip
    column = 1 if isinstance(row, dict) else 0
    v = {pair[0]: row[pair[column]] for pair in names}
    return Expected(
        charged=Decimal(str(v["energy_charged_kwh"])).quantize(Decimal("0.0001")),
        discharged=Decimal(str(v["energy_discharged_kwh"])).quantize(Decimal("0.0001")),
        covered=v["covered_seconds"],
        samples=v["samples"],
        soc_min=v["soc_min"],
        soc_max=v["soc_max"],
        soc_last=v["soc_last"],
        t_cell_max=v["t_cell_max"],
        soh_last=v["soh_last"],
        alarms=tuple(v["alarms"]),
    )
