"""TierRegistry: tiers per hash, exact event sequences and ids, bounded queue, off switch."""

from __future__ import annotations

import pytest

from kvtier.core import RegistryError, RemoveEvent, StoreEvent, TierRegistry


def test_event_sequence_and_ids() -> None:
    reg = TierRegistry()
    reg.record_store("G2", 10, None, 99)
    reg.record_store("G3", 10, None)
    reg.record_store("G2", 11, 10)
    reg.record_remove("G2", 10)
    assert reg.pending_events == 4
    assert reg.drain_events() == [
        StoreEvent(1, "G2", 10, None, 99),
        StoreEvent(2, "G3", 10, None),
        StoreEvent(3, "G2", 11, 10),
        RemoveEvent(4, "G2", 10),
    ]
    assert reg.drain_events() == []
    reg.record_remove("G3", 10)
    assert reg.drain_events() == [RemoveEvent(5, "G3", 10)]


def test_tiers_of_holds_and_counts() -> None:
    reg = TierRegistry()
    reg.record_store("G3", 1)
    reg.record_store("G1", 1)
    reg.record_store("G2", 1)
    reg.record_store("G2", 2)
    assert reg.tiers_of(1) == ("G1", "G2", "G3")
    assert reg.tiers_of(2) == ("G2",)
    assert reg.tiers_of(3) == ()
    assert reg.holds("G1", 1) and not reg.holds("G1", 2) and not reg.holds("G9", 1)
    assert (reg.count("G1"), reg.count("G2"), reg.count("G3"), reg.count("G9")) == (1, 2, 1, 0)
    reg.record_remove("G2", 1)
    assert reg.tiers_of(1) == ("G1", "G3")
    assert reg.count("G2") == 1


def test_inconsistent_reports_raise_and_change_nothing() -> None:
    reg = TierRegistry()
    reg.record_store("G2", 1)
    with pytest.raises(RegistryError, match="'G2' already holds sequence hash 1"):
        reg.record_store("G2", 1)
    with pytest.raises(RegistryError, match="'G3' does not hold sequence hash 1"):
        reg.record_remove("G3", 1)
    with pytest.raises(RegistryError, match="'G2' does not hold sequence hash 2"):
        reg.record_remove("G2", 2)
    assert reg.tiers_of(1) == ("G2",)
    assert [e.event_id for e in reg.drain_events()] == [1]


def test_bounded_queue_drops_oldest_and_counts() -> None:
    reg = TierRegistry(max_pending_events=2)
    for h in range(4):
        reg.record_store("G2", h)
    assert reg.dropped_events == 2
    assert [e.sequence_hash for e in reg.drain_events()] == [2, 3]
    with pytest.raises(ValueError, match="max_pending_events must be > 0"):
        TierRegistry(max_pending_events=0)


def test_events_off_still_tracks_tiers() -> None:
    reg = TierRegistry(record_events=False)
    reg.record_store("G2", 5)
    reg.record_remove("G2", 5)
    reg.record_store("G3", 5)
    assert reg.drain_events() == []
    assert reg.tiers_of(5) == ("G3",)
