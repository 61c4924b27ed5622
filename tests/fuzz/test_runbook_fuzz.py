"""Runbook files: any content gives a Runbook or ``file:line: field: message`` errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomadscale.core.errors import ConfigError
from nomadscale.healing.runbook import check_runbook, load_runbooks
from tests.fuzz.counts import tried
from tests.fuzz.strategies import json_like, mutated, yaml_texts

ROOT = Path(__file__).resolve().parents[2]
BASE = yaml.safe_load((ROOT / "runbooks" / "node-down.yaml").read_text())
# Keys with control characters are covered by test_control_characters_in_keys below.
PRINTABLE_KEYS = st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=10)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _check(path: Path) -> Any:
    line = re.compile(rf"^{re.escape(str(path))}(:\d+: .+|: .+)$")  # field optional: see report
    rb, errors = check_runbook(path)
    if rb is not None:
        assert errors == []
        return rb
    assert errors
    for text in errors:
        assert "\n" not in text and line.match(text), text
    try:
        load_runbooks([path])
    except ConfigError as exc:
        assert exc.errors == errors
    else:
        raise AssertionError("check_runbook failed but load_runbooks accepted the file")
    return None


@FUZZ
@given(data=mutated(BASE, keys=PRINTABLE_KEYS, values=json_like(PRINTABLE_KEYS)))
def test_mutated_runbook(tmp_path: Path, data: Any) -> None:
    tried("runbook-mutation")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    _check(path)


@FUZZ
@given(text=yaml_texts)
def test_random_runbook_text(tmp_path: Path, text: str) -> None:
    tried("runbook-yaml-text")
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert _check(path) is None


def test_control_characters_in_keys_stay_on_one_line(tmp_path: Path) -> None:
    tried("runbook-mutation")
    data = dict(BASE, triggers={"\r\nfake: log line": None})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    assert _check(path) is None
