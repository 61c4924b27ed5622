"""The bexpr subset used by ``filter=``."""

from __future__ import annotations

import pytest

from nomadscale.sim.filters import compile_filter
from nomadscale.sim.model import ApiError

NODE = {
    "Datacenter": "zone-a",
    "Status": "ready",
    "Drain": False,
    "CreateIndex": 12,
    "Meta": {"gpu": "l4", "zone": "zone-a"},
    "Tags": ["a", "b"],
}


@pytest.mark.parametrize(
    ("expr", "ok"),
    [
        ('Datacenter == "zone-a"', True),
        ("Datacenter == zone-a", True),
        ('Datacenter != "zone-a"', False),
        ("Drain == false", True),
        ("CreateIndex == 12", True),
        ('Meta.gpu == "l4" and (Status == "down" or Datacenter == `zone-a`)', True),
        ('not Meta.gpu == "l4"', False),
        ('"b" in Tags', True),
        ('"c" not in Tags', True),
        ('Tags contains "a"', True),
        ('Meta.missing == "x"', False),
        ("Meta.missing is empty", True),
        ('Datacenter matches "^zone-[ab]$"', True),
    ],
)
def test_filter_expressions(expr, ok):
    assert compile_filter(expr)(NODE) is ok


@pytest.mark.parametrize("expr", ["Datacenter ==", "(Status == ready", "Status ~ x", "== x"])
def test_filter_syntax_errors_are_400(expr):
    with pytest.raises(ApiError) as e:
        compile_filter(expr)
    assert e.value.status == 400
