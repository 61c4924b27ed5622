from __future__ import annotations

import pytest

from nomadscale.config.yamlpos import YamlSyntaxError, load_yaml

TEXT = """\
# comment
name: x
bounds:
  min: 1

  max: 2
list:
  - a: 1
    b: 2
  - c
"""


def test_records_line_of_every_key_and_item() -> None:
    doc = load_yaml(TEXT)
    assert doc.data["bounds"] == {"min": 1, "max": 2}
    assert doc.line_of(("name",)) == 2
    assert doc.line_of(("bounds", "max")) == 6
    assert doc.line_of(("list", 0, "b")) == 9
    assert doc.line_of(("list", 1)) == 10


def test_unknown_path_falls_back_to_longest_known_prefix() -> None:
    doc = load_yaml(TEXT)
    assert doc.line_of(("bounds", "missing")) == 3
    assert doc.line_of(("nothing", "here")) == 2  # the document starts at the first key


def test_duplicate_keys_are_recorded_with_both_lines() -> None:
    doc = load_yaml("a: 1\nb: 2\na: 3\n")
    assert doc.duplicates == ((("a",), 3, 1),)
    assert doc.data["a"] == 3


def test_syntax_error_carries_line() -> None:
    with pytest.raises(YamlSyntaxError) as info:
        load_yaml("a: 1\nb: [1, 2\nc: 3\n")
    assert info.value.line >= 2
    assert "\n" not in info.value.message


def test_empty_document_and_recursive_alias() -> None:
    assert load_yaml("").data is None
    assert load_yaml("# only a comment\n").data is None
    doc = load_yaml("a: &x [1, *x]\n")
    assert doc.line_of(("a", 0)) == 1
