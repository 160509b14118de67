"""The BESS interval arithmetic of design §13: trapezoidal energy, split at zero crossings and
interval boundaries, gaps, coverage, statistics and the "row exists" rule; hand-computed
cases, and a property against a brute-force numeric integration."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from stages.bess_energy import Sample, energy, interval, kwh, touched_ends

END = datetime(2025, 6, 1, 12, 15, tzinfo=UTC)
START = END - timedelta(minutes=15)
GAP_S = 300.0


def at(seconds: float, p: float, **more: object) -> Sample:
    """A sample `seconds` after the interval's start."""
    return Sample(START + timedelta(seconds=seconds), p, **more)  # type: ignore[arg-type]


def test_constant_discharge_over_the_whole_interval() -> None:
    samples = [at(s, 120.0) for s in range(0, 901, 60)]  # every minute, 0 … 900 s
    e = energy(samples, END, GAP_S)
    assert e.discharged_kwh == Decimal("30.0000")  # 120 kW × 0.25 h
    assert e.charged_kwh == Decimal("0")
    assert e.covered_seconds == 900


def test_constant_charge_counts_as_charged_energy() -> None:
    e = energy([at(0, -40.0), at(300, -40.0)], END, GAP_S)
    assert (e.charged_kwh, e.discharged_kwh) == (Decimal("3.3333"), Decimal("0"))  # 40 × 300/3600


def test_a_ramp_through_zero_is_split_at_its_zero() -> None:
    """From +60 kW to −60 kW in 120 s: zero at 60 s; 60 × 60 / 2 kW·s on each side."""
    e = energy([at(100, 60.0), at(220, -60.0)], END, GAP_S)
    assert e.discharged_kwh == kwh(1800) == Decimal("0.5000")
    assert e.charged_kwh == Decimal("0.5000")
    assert e.covered_seconds == 120


def test_a_stretch_across_the_start_boundary_counts_only_its_inside_part() -> None:
    """0 kW at −100 s to 100 kW at +100 s: inside, 50 → 100 kW over 100 s = 7500 kW·s."""
    e = energy([at(-100, 0.0), at(100, 100.0)], END, GAP_S)
    assert e.discharged_kwh == kwh(7500) == Decimal("2.0833")
    assert e.covered_seconds == 100


def test_a_stretch_across_the_end_boundary_counts_only_its_inside_part() -> None:
    e = energy([at(800, 100.0), at(1000, 100.0)], END, GAP_S)
    assert e.discharged_kwh == kwh(100 * 100)
    assert e.covered_seconds == 100


def test_samples_further_apart_than_the_gap_hold_no_energy() -> None:
    e = energy([at(0, 100.0), at(301, 100.0)], END, GAP_S)
    assert (e.discharged_kwh, e.charged_kwh, e.covered_seconds) == (Decimal(0), Decimal(0), 0)


def test_samples_exactly_the_gap_apart_are_integrated() -> None:
    e = energy([at(0, 36.0), at(300, 36.0)], END, GAP_S)
    assert e.discharged_kwh == Decimal("3.0000")
    assert e.covered_seconds == 300


def test_a_sample_exactly_on_the_boundary_belongs_to_the_interval_it_ends() -> None:
    s = [at(840, 10.0, soc=50.0), at(900, 10.0, soc=51.0), at(960, 10.0, soc=52.0)]
    this, following = interval(s, END, GAP_S), interval(s, END + timedelta(minutes=15), GAP_S)
    assert (this.samples, this.soc_last) == (2, 51.0)
    assert (following.samples, following.soc_last) == (1, 52.0)
    # The stretches split at the boundary: 60 s of 10 kW on each side.
    assert this.energy.discharged_kwh == following.energy.discharged_kwh == kwh(600)
    assert this.energy.covered_seconds == following.energy.covered_seconds == 60


def test_the_first_sample_of_a_device_has_no_energy_before_it() -> None:
    one = interval([at(450, 100.0, soc=40.0)], END, GAP_S)
    assert one.energy.covered_seconds == 0
    assert one.energy.discharged_kwh == Decimal(0)
    assert one.samples == 1
    assert one.exists


def test_statistics_of_the_samples_inside_the_interval() -> None:
    s = [
        at(-10, 1.0, soc=10.0, t_cell_max=99.0, soh=10.0, alarms=("outside",)),
        at(100, 1.0, soc=55.0, t_cell_max=30.5, soh=98.0, alarms=("b", "a")),
        at(400, 1.0, soc=40.0, t_cell_max=31.0, alarms=("a",)),
        at(700, 1.0, soc=60.0),
    ]
    row = interval(s, END, GAP_S)
    assert row.samples == 3
    assert (row.soc_min, row.soc_max, row.soc_last) == (40.0, 60.0, 60.0)
    assert row.t_cell_max == 31.0
    assert row.soh_last == 98.0  # of the latest sample that has one
    assert row.alarms == ("a", "b")


def test_no_sample_and_no_coverage_means_no_row() -> None:
    row = interval([at(-900, 5.0), at(-700, 5.0)], END, GAP_S)
    assert not row.exists
    assert (row.soc_min, row.t_cell_max, row.soh_last, row.alarms) == (None, None, None, ())


def test_a_covered_interval_without_samples_has_a_row() -> None:
    """With a gap longer than the interval, a stretch may cover it with no sample inside."""
    row = interval([at(-60, 10.0), at(960, 10.0)], END, 1200.0)
    assert row.samples == 0
    assert row.exists
    assert row.energy.covered_seconds == 900
    assert row.energy.discharged_kwh == Decimal("2.5000")


def test_energy_rounds_half_away_from_zero_to_four_decimals() -> None:
    assert kwh(0.18) == Decimal("0.0001")  # 0.00005 kWh
    assert kwh(0.17) == Decimal("0.0000")


def test_a_sample_reaches_the_intervals_within_the_gap_on_both_sides() -> None:
    ends = touched_ends(START + timedelta(minutes=1), GAP_S)
    assert ends == [START, END]  # 11:56 … 12:06: the intervals ending 12:00 and 12:15
    assert touched_ends(START + timedelta(minutes=7), GAP_S) == [END]


# --- property: the trapezoids equal a brute-force integration -------------------------------

STEP_S = 0.25


def brute_force(samples: list[Sample], gap_s: float) -> tuple[float, float, float]:
    """Discharged and charged kW·s and covered seconds, by summing p(t) over small steps."""
    points = sorted((s.ts, s.p) for s in samples)
    out = into = covered = 0.0
    t = START + timedelta(seconds=STEP_S / 2)
    while t < END:
        for (a, pa), (b, pb) in itertools.pairwise(points):
            span = (b - a).total_seconds()
            if a <= t < b and span <= gap_s:
                p = pa + (pb - pa) * (t - a).total_seconds() / span
                out += max(p, 0) * STEP_S
                into += max(-p, 0) * STEP_S
                covered += STEP_S
                break
        t += timedelta(seconds=STEP_S)
    return out, into, covered


device_samples = st.lists(
    st.tuples(st.integers(-400, 1300), st.floats(-500, 500, allow_nan=False)),
    min_size=0,
    max_size=12,
    unique_by=lambda pair: pair[0],
).map(lambda pairs: [at(s, p) for s, p in pairs])


@settings(max_examples=150, deadline=None)
@given(samples=device_samples, gap_s=st.sampled_from([60.0, 300.0, 1200.0]))
def test_energy_equals_a_brute_force_integration(samples: list[Sample], gap_s: float) -> None:
    e = energy(samples, END, gap_s)
    out, into, covered = brute_force(samples, gap_s)
    # Midpoint sums are exact on straight lines; only a step with a kink (a zero crossing)
    # differs, by at most |p| × step per kink.
    kinks = len(samples) + 1
    tolerance = 500 * STEP_S * kinks / 3600 + 0.0001
    assert abs(float(e.discharged_kwh) - out / 3600) <= tolerance
    assert abs(float(e.charged_kwh) - into / 3600) <= tolerance
    assert abs(e.covered_seconds - covered) <= 0.5 + STEP_S * kinks
