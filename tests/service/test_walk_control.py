"""Manual control as an operator uses it, through the real ``nomadscale`` command line against
a REAL Consul: how long things last (and saying so), refusing mistakes before anything is
written, bounds, fleet-wide pauses, and repairing a damaged override key."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from nomadscale.cli.main import _register, cli
from nomadscale.integrations.consul import ConsulKV
from tests.harness.services import ConsulAgent
from tests.service.helpers import make_policy

pytestmark = pytest.mark.consul
_register()

Run = Callable[..., Result]


@pytest.fixture
def run(
    consul_agent: ConsulAgent,
    consul_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Run]:
    """``run("pause", "ekyc")``: the CLI with a policies folder holding ``ekyc`` (bounds 1-40)."""
    (tmp_path / "policies").mkdir()
    doc = make_policy().to_yaml_dict()
    (tmp_path / "policies" / "ekyc.yaml").write_text(yaml.safe_dump(doc))
    (tmp_path / "none.yaml").write_text("{}\n")
    for var, value in {
        "CONSUL_HTTP_ADDR": consul_agent.addr,
        "NOMADSCALE_KV_PREFIX": consul_prefix.rstrip("/"),
        "NOMADSCALE_POLICIES": str(tmp_path / "policies"),
        "NOMADSCALE_CONFIG": str(tmp_path / "none.yaml"),
        "TZ": "Asia/Jakarta",
    }.items():
        monkeypatch.setenv(var, value)
    time.tzset()  # the operator's shell is in Jakarta

    def invoke(*args: str) -> Result:
        return CliRunner().invoke(cli, list(args))

    yield invoke
    monkeypatch.undo()
    time.tzset()


def _stored(consul_agent: ConsulAgent, consul_prefix: str, policy: str) -> object:
    entry = ConsulKV(addr=consul_agent.addr).get(f"{consul_prefix}overrides/{policy}")
    return None if entry is None else json.loads(entry.value or b"null")


def test_pause_says_how_long_it_lasts(run: Run) -> None:
    forever = run("pause", "ekyc", "--reason", "incident")
    assert forever.exit_code == 0, forever.output
    # no --for: the operator is told it has no end, and what ends it
    assert "no --for" in forever.stdout and "nomadscale resume ekyc" in forever.stdout
    timed = run("pause", "ekyc", "--for", "30m", "--reason", "incident")
    assert timed.exit_code == 0, timed.output
    assert "UTC" in timed.stdout and "in 30m" in timed.stdout
    assert "+0700 local" in timed.stdout  # and in the operator's own zone, labelled as such


@pytest.mark.parametrize(
    ("value", "says"),
    [("90", "has no unit"), ("500000w", "too long"), ("-5m", "not a duration")],
)
def test_a_bad_for_is_refused_before_anything_is_written(
    run: Run, consul_agent: ConsulAgent, consul_prefix: str, value: str, says: str
) -> None:
    for args in (
        ("override", "set", "ekyc", "--min", "3", "--for", value, "--reason", "r"),
        ("pause", "ekyc", "--for", value),
        ("scale", "ekyc", "--count", "3", "--for", value, "--reason", "r"),
    ):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output, res.exception)
        assert says in res.stderr and "--for" in res.stderr
        assert res.exception is None or isinstance(res.exception, SystemExit)
    assert _stored(consul_agent, consul_prefix, "ekyc") is None


def test_an_override_beyond_the_bounds_is_applied_as_given_and_says_so(run: Run) -> None:
    res = run("override", "set", "ekyc", "--fixed", "100", "--for", "2h", "--reason", "test")
    assert res.exit_code == 0, res.output
    assert "fixed 100" in res.stdout
    assert "above bounds.max 40" in res.stderr
    res = run("scale", "ekyc", "--count", "0", "--reason", "drain for the night")
    assert res.exit_code == 0, res.output
    assert "below bounds.min 1" in res.stderr
    inside = run("override", "set", "ekyc", "--min", "5", "--reason", "ok")
    assert inside.exit_code == 0 and inside.stderr == ""


def test_resuming_one_policy_under_a_fleet_wide_pause_fails_loudly(run: Run) -> None:
    assert run("pause", "--reason", "freeze").exit_code == 0
    res = run("resume", "ekyc")
    assert res.exit_code == 1, res.output
    assert "still paused" in res.stderr and "nomadscale resume" in res.stderr
    res = run("override", "clear", "ekyc")
    assert res.exit_code == 1 and "still paused" in res.stderr
    assert run("resume").exit_code == 0
    assert run("resume", "ekyc").exit_code == 0


def test_unknown_policy_names_are_refused_by_every_command(run: Run) -> None:
    for args in (
        ("override", "set", "ekyc-typo", "--min", "3", "--reason", "r"),
        ("override", "clear", "ekyc-typo"),
        ("pause", "ekyc-typo"),
        ("resume", "ekyc-typo"),
        ("scale", "ekyc-typo", "--count", "3", "--reason", "r"),
    ):
        res = run(*args)
        assert res.exit_code == 2, (args, res.output)
        assert "'ekyc-typo': unknown" in res.stderr and "known: ekyc" in res.stderr


def test_pause_works_while_another_policy_file_is_broken(run: Run, tmp_path: Path) -> None:
    # in an incident an operator must be able to pause even when a colleague broke a file
    (tmp_path / "policies" / "other.yaml").write_text("name: other\nbounds: {min: 5, max: 1}\n")
    (tmp_path / "policies" / "third.yaml").write_text("name: third\nbounds: [\n")
    res = run("pause", "ekyc", "--for", "1h", "--reason", "incident")
    assert res.exit_code == 0, res.output
    res = run("pause", "other", "--for", "1h", "--reason", "incident")  # named by a broken file
    assert res.exit_code == 0, res.output
    assert run("pause", "nope").exit_code == 2


def test_clear_repairs_a_damaged_override_key(
    run: Run, consul_agent: ConsulAgent, consul_prefix: str
) -> None:
    key = f"{consul_prefix}overrides/ekyc"
    for damaged in (b'[{"policy": "ekyc", "kind": "bogus"}]', b"not json", b'{"a": 1}'):
        req = urllib.request.Request(f"{consul_agent.addr}/v1/kv/{key}", data=damaged, method="PUT")
        urllib.request.urlopen(req, timeout=2).close()
        listed = run("override", "list")
        assert listed.exit_code == 1
        assert "override clear ekyc" in listed.stderr  # the error names the way out
        cleared = run("override", "clear", "ekyc")
        assert cleared.exit_code == 0, cleared.output
        assert "cleared 1 override(s)" in cleared.stdout
        assert _stored(consul_agent, consul_prefix, "ekyc") == []
        assert run("override", "list").stdout.strip() == "no overrides"


def test_list_shows_each_entry_once_readably(run: Run) -> None:
    assert run("pause", "--reason", "freeze").exit_code == 0
    assert (
        run("override", "set", "ekyc", "--max", "9", "--for", "3h", "--reason", "cap").exit_code
        == 0
    )
    out = run("override", "list").stdout
    assert "all policies: pause" in out and "_all" not in out
    assert "until until" not in out and "until cleared" in out
    assert "ekyc: max 9" in out
    assert "(in 3h)" in out or "(in 2h59m" in out
