"""Loading and validating policy files: every error in one pass, as file:line: field: message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nomadscale.config.policy import load_policies as load_policies_reexport
from nomadscale.config.validate import PolicyError, load_policies, load_policy, validate_files
from nomadscale.core.errors import ConfigError
from tests.config.helpers import ERROR_LINE, SHIPPED, edited, errors_of, write

FIVE_MISTAKES = [
    # (original text, replacement, field, message fragment)
    ("cycle: 20m ", "cycle: 20 minutes", "cycle", "not a duration: '20 minutes'"),
    ("lead_time: 10m", "laed_time: 10m", "laed_time", "unknown key, did you mean 'lead_time'?"),
    ("timezone: Asia/Jakarta\n    target", "timezone: Asia/Jakata\n    target",
     "forecast.business_hours.timezone", "unknown time zone 'Asia/Jakata'"),
    ("  min: 2\n", "  min: 50\n", "bounds.min", "must be <= bounds.max (50 > 40)"),
    ('cron: "0 7 28-31 * *"', 'cron: "0 7 32 * *"', "schedules[0].cron", "bad cron expression"),
]  # fmt: skip


def five_mistakes_text() -> tuple[str, list[int]]:
    text = SHIPPED.read_text(encoding="utf-8")
    lines = []
    for old, new, _, _ in FIVE_MISTAKES:
        assert text.count(old) == 1, old
        lines.append(text[: text.index(old) + len(old) - len(old.lstrip())].count("\n") + 1)
        text = text.replace(old, new)
    return text, lines


def test_shipped_policy_is_valid() -> None:
    assert validate_files([SHIPPED]) == []
    assert validate_files([SHIPPED.parent]) == []


def test_five_mistakes_give_five_lines_with_file_line_and_field(tmp_path: Path) -> None:
    text, lines = five_mistakes_text()
    path = write(tmp_path, text, "ekyc.yaml")
    errors = validate_files([path])
    assert len(errors) == 5, [str(e) for e in errors]
    for err, line, (_, _, field, fragment) in zip(errors, lines, FIVE_MISTAKES, strict=True):
        assert (err.file, err.line, err.field) == (str(path), line, field)
        assert fragment in err.message
        assert str(err) == f"{path}:{line}: {field}: {err.message}"
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert info.value.errors == [str(e) for e in errors]
    assert "and 4 more" in str(info.value)


def test_error_str_format() -> None:
    assert (
        str(PolicyError("a.yaml", 3, "bounds.min", "required")) == "a.yaml:3: bounds.min: required"
    )
    assert str(PolicyError("a.yaml", 0, "", "no such file")) == "a.yaml: no such file"


def test_unknown_nested_key_suggests_the_closest(tmp_path: Path) -> None:
    data = edited(("bounds", "max_stepup"), 3)
    errors = errors_of(tmp_path, data)
    assert [(e.field, e.message) for e in errors] == [
        ("bounds.max_stepup", "unknown key, did you mean 'max_step_up'?")
    ]
    data = edited(("zones", "list", 1, "nodepool"), "x")
    errors = errors_of(tmp_path, data)
    assert [(e.field, e.message) for e in errors] == [
        ("zones.list[1].nodepool", "unknown key, did you mean 'node_pool'?")
    ]
    data = edited(("demand", "qeury"), "x")
    assert [e.message for e in errors_of(tmp_path, data)] == ["unknown key, did you mean 'query'?"]


def test_unknown_key_without_close_match_lists_choices(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, edited(("capacity", "zzz"), 1))
    assert [(e.field, e.message) for e in errors] == [
        ("capacity.zzz", "unknown key (expected one of: rpm_per_worker)")
    ]


def test_odd_keys_are_reported_on_the_parent(tmp_path: Path) -> None:
    errors = errors_of(tmp_path, edited(("bounds", "a b"), 1))
    assert [(e.field, e.message) for e in errors] == [("bounds", "unknown key 'a b'")]
    errors = errors_of(tmp_path, edited((7,), 1))
    assert [(e.field, e.message) for e in errors] == [("policy", "keys must be text, got 7")]


def test_yaml_syntax_error_has_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x\nbounds:\n  min: [1, 2\n  max: 3\n")
    errors = validate_files([path])
    assert len(errors) == 1
    assert errors[0].field == "yaml" and errors[0].line >= 3
    assert re.match(ERROR_LINE, str(errors[0]))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "file is empty, expected policy keys"),
        ("# nothing\n", "file is empty, expected policy keys"),
        ("- a\n- b\n", "must be a mapping of keys, got a list"),
        ("just text\n", "must be a mapping of keys, got a string"),
    ],
)
def test_whole_file_problems_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert [str(e) for e in validate_files([path])] == [f"{path}:1: policy: {message}"]


def test_missing_file_and_empty_directory(tmp_path: Path) -> None:
    assert [str(e) for e in validate_files([tmp_path / "nope.yaml"])] == [
        f"{tmp_path / 'nope.yaml'}: no such file"
    ]
    assert [str(e) for e in validate_files([tmp_path])] == [
        f"{tmp_path}: no policy files (*.yaml, *.yml) here"
    ]
    with pytest.raises(ConfigError, match="no such file"):
        load_policy(tmp_path / "nope.yaml")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    text = SHIPPED.read_text(encoding="utf-8").replace(
        "lead_time: 10m", "lead_time: 10m\ncycle: 30m"
    )
    errors = validate_files([write(tmp_path, text)])
    assert [(e.field, e.line, e.message) for e in errors] == [
        ("cycle", 7, "duplicate key (first at line 5)")
    ]


def test_load_policies_reads_directories_and_rejects_duplicate_names(tmp_path: Path) -> None:
    write(tmp_path, SHIPPED.read_text(encoding="utf-8"), "a.yaml")
    other = SHIPPED.read_text(encoding="utf-8").replace("name: ekyc-ml", "name: ocr")
    write(tmp_path, other, "b.yml")
    (tmp_path / "notes.txt").write_text("not a policy", encoding="utf-8")
    policies = load_policies([tmp_path])
    assert [p.name for p in policies] == ["ekyc-ml", "ocr"]
    assert [p.name for p in load_policies_reexport([tmp_path / "b.yml"])] == ["ocr"]

    write(tmp_path, SHIPPED.read_text(encoding="utf-8"), "c.yaml")
    with pytest.raises(ConfigError) as info:
        load_policies([tmp_path])
    assert info.value.errors == [
        f"{tmp_path / 'c.yaml'}:4: name: policy 'ekyc-ml' is also defined in {tmp_path / 'a.yaml'}"
    ]


def test_all_errors_are_reported_in_one_pass_across_sections(tmp_path: Path) -> None:
    data = edited(("bounds", "min"), "two")
    data["deploy"]["canary"] = -1
    data["schedules"][1]["cron"] = "every sunday"
    data["forecast"]["business_hours"]["min_workers"] = 99
    del data["target"]["job"]
    errors = errors_of(tmp_path, data)
    assert sorted(e.field for e in errors) == [
        "bounds.min",
        "deploy.canary",
        "forecast.business_hours.min_workers",
        "schedules[1].cron",
        "target.job",
    ]
    assert all(re.match(ERROR_LINE, str(e)) for e in errors)
    assert [e.line for e in errors] == sorted(e.line for e in errors)
