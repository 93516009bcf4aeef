"""FrequencyFilter: doubling per sighting, decay by 1 per interval, bound, off switch."""

from __future__ import annotations

import pytest

from kvtier.core.filter import FrequencyFilter, FrequencyFilterConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_second_sighting_passes_and_counts_double() -> None:
    clock = Clock()
    f = FrequencyFilter(clock=clock)
    assert f.should_offload(7) is False
    assert f.count(7) == 1
    assert f.should_offload(7) is True
    assert f.count(7) == 2
    f.should_offload(7)
    f.should_offload(7)
    assert f.count(7) == 8
    assert f.count(8) == 0


def test_decay_one_per_interval() -> None:
    clock = Clock()
    f = FrequencyFilter(clock=clock)
    f.should_offload(1)
    f.should_offload(1)
    f.should_offload(1)  # count 4
    clock.now += 599.9
    assert f.count(1) == 4
    clock.now += 0.1  # first interval boundary
    assert f.count(1) == 3
    clock.now += 2 * 600
    assert f.count(1) == 1
    assert f.should_offload(1) is True  # 1 -> 2
    clock.now += 2 * 600
    assert f.count(1) == 0
    assert f.should_offload(1) is False  # decayed away: starts again at 1
    assert f.count(1) == 1


def test_decay_is_aligned_to_global_intervals() -> None:
    clock = Clock()
    f = FrequencyFilter(clock=clock)
    f.should_offload(1)  # origin of the intervals
    clock.now += 500
    f.should_offload(2)  # count 1, seen just before the first boundary
    clock.now += 100  # boundary: every count drops by one, as a periodic sweep would
    assert (f.count(1), f.count(2)) == (0, 0)
    assert f.should_offload(2) is False


def test_disabled_passes_everything_and_records_nothing() -> None:
    f = FrequencyFilter(FrequencyFilterConfig(enabled=False), clock=Clock())
    assert f.should_offload(1) is True
    assert f.enabled is False
    assert len(f) == 0


def test_custom_threshold_and_bound() -> None:
    clock = Clock()
    f = FrequencyFilter(FrequencyFilterConfig(min_frequency=4, max_entries=2), clock=clock)
    assert [f.should_offload(1) for _ in range(3)] == [False, False, True]
    f.should_offload(2)
    f.should_offload(3)  # bound 2: hash 1, least recently seen, is forgotten
    assert len(f) == 2
    assert f.count(1) == 0
    assert f.count(2) == 1 and f.count(3) == 1


def test_decayed_entries_are_pruned() -> None:
    clock = Clock()
    f = FrequencyFilter(clock=clock)
    for h in range(5):
        f.should_offload(h)
    clock.now += 600
    f.should_offload(99)
    assert len(f) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_frequency": 0}, "min_frequency must be >= 1"),
        ({"decay_interval_s": 0.0}, "decay_interval_s must be finite, > 0"),
        ({"decay_interval_s": float("inf")}, "decay_interval_s must be finite, > 0"),
        ({"max_entries": 0}, "max_entries must be >= 1"),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrequencyFilterConfig(**kwargs)  # type: ignore[arg-type]
