"""Shared helpers for the policy tests: the shipped policy as data, and path edits."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from nomadscale.config.validate import PolicyError, validate_files

SHIPPED = Path(__file__).resolve().parents[2] / "policies" / "ekyc-ml.yaml"
ERROR_LINE = r"^.+:\d+: \S+: .+$"


def shipped_data() -> dict[str, Any]:
    data = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def edited(path: tuple[str | int, ...], value: Any, *, delete: bool = False) -> dict[str, Any]:
    """The shipped policy with ``path`` set to ``value`` (or deleted)."""
    data = copy.deepcopy(shipped_data())
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    if delete:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data


def write(tmp: Path, data: Any, name: str = "p.yaml") -> Path:
    path = tmp / name
    text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(tmp: Path, data: Any) -> list[PolicyError]:
    return validate_files([write(tmp, data)])
