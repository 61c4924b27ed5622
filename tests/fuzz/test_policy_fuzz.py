"""Policy files: whatever the file holds, the answer is a Policy or a ConfigError whose lines
all read ``file:line: field: message`` (``file: message`` when the file itself is the problem).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomadscale.config.policy import Policy
from nomadscale.config.validate import load_policy
from nomadscale.core.errors import ConfigError
from tests.config.helpers import shipped_data
from tests.fuzz.counts import tried
from tests.fuzz.strategies import mutated, yaml_texts

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _check(path: Path) -> Policy | None:
    # field: a dotted path; keys that are not plain names appear quoted ('a b', '\\xa0x')
    field = r"""(?:[^\s:'"]|'[^']*'|"[^"]*")+"""
    line = re.compile(rf"^{re.escape(str(path))}(:\d+: {field}: .+|: .+)$")
    try:
        return load_policy(path)
    except ConfigError as exc:
        assert exc.errors, "ConfigError without error lines"
        for text in exc.errors:
            assert "\n" not in text, text
            assert line.match(text), text
            assert "Traceback" not in text
        return None


@FUZZ
@given(data=mutated(shipped_data()))
def test_mutated_policy_gives_policy_or_clear_errors(tmp_path: Path, data: object) -> None:
    tried("policy-mutation")
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    _check(path)


@FUZZ
@given(text=yaml_texts)
def test_random_yaml_text_gives_clear_errors(tmp_path: Path, text: str) -> None:
    tried("policy-yaml-text")
    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    assert _check(path) is None  # no random text is a whole valid policy


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=300))
def test_random_bytes_give_clear_errors(tmp_path: Path, raw: bytes) -> None:
    tried("policy-bytes")
    path = tmp_path / "p.yaml"
    path.write_bytes(raw)
    assert _check(path) is None


def test_billion_laughs_alias_bomb_is_refused_or_bounded(tmp_path: Path) -> None:
    """Nested aliases expand exponentially if anyone walks the tree naively."""
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev = f"*a{i - 1}"
        lines.append(f"a{i}: &a{i} [{', '.join([prev] * 10)}]")
    lines.append("name: *a8")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tried("policy-yaml-text")
    assert _check(path) is None


@pytest.mark.parametrize(
    "text",
    [
        "!!python/object/apply:os.system ['touch /tmp/nomadscale-pwned']\n",
        "name: !!python/name:os.system\n",
    ],
)
def test_python_tags_are_never_constructed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "evil.yaml"
    path.write_text(text, encoding="utf-8")
    assert _check(path) is None
    assert not Path("/tmp/nomadscale-pwned").exists()
