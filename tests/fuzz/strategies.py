"""Shared hypothesis strategies for the fuzz tests."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

# Scalars YAML/JSON documents are made of, with the awkward ones well represented.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "0", "-1", "1e999", "nan", "20m", "1h30m", "08:00", "*/5 * * * *"]),
)


def json_like(keys: st.SearchStrategy[str] = st.text(max_size=8)) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=12,
    )


json_values = json_like()


def paths_of(data: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (dict key / list index) inside ``data``."""
    out: list[tuple[Any, ...]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            out.append((*prefix, k))
            out += paths_of(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out.append((*prefix, i))
            out += paths_of(v, (*prefix, i))
    return out


@st.composite
def mutated(
    draw: st.DrawFn,
    base: Any,
    *,
    max_edits: int = 3,
    keys: st.SearchStrategy[str] = st.text(max_size=10),
    values: st.SearchStrategy[Any] = json_values,
) -> Any:
    """``base`` with 1..max_edits random edits: replace a value, delete a key, add a key."""
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, max_edits))):
        paths = paths_of(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        node = data
        for part in path[:-1]:
            node = node[part]
        op = draw(st.sampled_from(["replace", "delete", "add"]))
        if op == "replace":
            node[path[-1]] = draw(values)
        elif op == "delete":
            del node[path[-1]]
        elif isinstance(node, dict):
            node[draw(keys)] = draw(values)
        else:
            node.append(draw(values))
    return data


YAML_PIECES = [
    "name: x\n",
    "cycle: 20m\n",
    "zones:\n  list:\n",
    "  - name: a\n",
    "- ",
    ": ",
    "&a ",
    "*a ",
    "!!python/object/apply:os.system ['id']\n",
    "!!binary aGVsbG8=\n",
    "? ",
    "{",
    "}",
    "[",
    "]",
    "'",
    '"',
    "|\n",
    ">-\n",
    "---\n",
    "...\n",
    "%YAML 1.1\n",
    "\t",
    "  ",
    "\n",
    "#",
    "<<: *a\n",
    "\x00",
    "\ufeff",
    "\x85",
]
yaml_texts = st.one_of(
    st.lists(st.one_of(st.sampled_from(YAML_PIECES), st.text(max_size=6)), max_size=25).map(
        "".join
    ),
    st.text(max_size=200),
)
