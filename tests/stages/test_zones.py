"""Zone split: odd/even by default, shortfalls moved to the healthy zone and reported."""

import pytest

from nomadscale.core.errors import InputError
from nomadscale.stages.zones import split

ZONES = ("asia-southeast2-a", "asia-southeast2-b")
GROUPS = ("ml-worker-a", "ml-worker-b")


def counts(s):
    return [z.count for z in s.counts]


@pytest.mark.parametrize(("total", "want"), [(0, [0, 0]), (1, [1, 0]), (2, [1, 1]), (7, [4, 3])])
def test_odd_even_split_gives_zone_a_the_odd_worker(total, want):
    s = split(total, zones=ZONES, groups=GROUPS)
    assert counts(s) == want
    assert [z.group for z in s.counts] == list(GROUPS)
    assert s.moved == 0
    assert s.note == ""


def test_groups_can_be_a_mapping_and_three_zones_round_robin():
    s = split(8, zones=("a", "b", "c"), groups={"a": "ga", "c": "gc"})
    assert counts(s) == [3, 3, 2]
    assert [z.group for z in s.counts] == ["ga", "", "gc"]


def test_zone_that_lost_nodes_keeps_what_it_can_host_and_the_rest_moves():
    s = split(10, zones=ZONES, healthy_capacity={"asia-southeast2-b": 2, "asia-southeast2-a": None})
    assert counts(s) == [8, 2]
    assert s.moved == 3
    assert "asia-southeast2-b can host 2, short 3" in s.note
    assert "moved 3 to asia-southeast2-a" in s.note


def test_degraded_zone_hands_its_whole_share_to_the_healthy_zone():
    s = split(5, zones=ZONES, degraded={"asia-southeast2-a"})
    assert counts(s) == [0, 5]
    assert s.moved == 3
    assert "asia-southeast2-a degraded" in s.note


def test_all_zones_degraded_falls_back_to_plain_split():
    s = split(5, zones=ZONES, degraded=set(ZONES))
    assert counts(s) == [3, 2]
    assert s.moved == 0
    assert "all zones degraded" in s.note


def test_workers_nobody_can_host_stay_pending_in_their_home_zone():
    s = split(10, zones=ZONES, healthy_capacity={"asia-southeast2-a": 2, "asia-southeast2-b": 4})
    assert sum(counts(s)) == 10  # desired total is never lost
    assert s.unplaced == 4
    assert s.moved == 0
    assert counts(s) == [5, 5]
    assert "4 unplaceable" in s.note


def test_partial_room_in_other_zone_moves_what_fits():
    s = split(10, zones=ZONES, healthy_capacity={"asia-southeast2-a": 1, "asia-southeast2-b": 7})
    assert counts(s) == [3, 7]
    assert s.moved == 2
    assert s.unplaced == 2


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"total": 3, "zones": ()}, "at least one zone"),
        ({"total": -1, "zones": ZONES}, "must not be negative"),
        ({"total": 3, "zones": ("a", "a")}, "unique"),
        ({"total": 3, "zones": ZONES, "groups": ("g",)}, "2 zones but 1 groups"),
        ({"total": 3, "zones": ZONES, "healthy_capacity": {"asia-southeast2-a": -1}}, "negative"),
    ],
)
def test_bad_input_is_a_one_line_input_error(kwargs, msg):
    total = kwargs.pop("total")
    with pytest.raises(InputError, match=msg):
        split(total, **kwargs)
