"""YAML loading that remembers where every value came from.

``load_yaml`` returns the plain data (as ``yaml.safe_load`` would) together with the 1-based
line of every mapping key and sequence item, keyed by its path (``("bounds", "min")``,
``("schedules", 0, "cron")``). Validation errors are then reported as ``file:line``.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from nomadscale.core.errors import ConfigError

Path = tuple[str | int, ...]

MAX_TEXT_CHARS = 1_000_000  # a policy or runbook is a few kB; refuse anything this large
MAX_VALUES = 50_000  # values after alias expansion (a "billion laughs" file expands to 10^9)


class YamlSyntaxError(ConfigError):
    """The text is not valid YAML. ``line`` is 1-based (0 when unknown)."""

    def __init__(self, message: str, *, line: int) -> None:
        super().__init__(message)
        self.line = line


@dataclass(frozen=True)
class YamlDoc:
    """Loaded YAML: ``data`` plus the line of each key/item path."""

    data: Any
    lines: dict[Path, int] = field(default_factory=dict)
    duplicates: tuple[tuple[Path, int, int], ...] = ()  # (path, line, first line)

    def line_of(self, path: Sequence[str | int]) -> int:
        """Line of ``path``, or of its longest known prefix (1 when nothing matches)."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return self.lines.get((), 1)


def load_yaml(text: str) -> YamlDoc:
    """Parse one YAML document; raise ``YamlSyntaxError`` (with a line) when it is invalid.

    Documents longer than ``MAX_TEXT_CHARS`` or expanding (through aliases) to more than
    ``MAX_VALUES`` values are refused before anything walks them.
    """
    if len(text) > MAX_TEXT_CHARS:
        raise YamlSyntaxError(
            f"file too large ({len(text)} characters, at most {MAX_TEXT_CHARS})", line=0
        )
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise YamlSyntaxError(
            f"character #x{exc.character:04x} is not allowed", line=line
        ) from None
    try:
        node = loader.get_single_node()
        if node is None:
            return YamlDoc(data=None)
        size = _expanded_size(node, {}, set())
        if size > MAX_VALUES:
            raise YamlSyntaxError(
                f"document too large: {size} values after expanding aliases (at most {MAX_VALUES})",
                line=node.start_mark.line + 1,
            )
        data = loader.construct_document(node)
        lines: dict[Path, int] = {(): node.start_mark.line + 1}
        dups: list[tuple[Path, int, int]] = []
        _walk(loader, node, (), lines, dups, set())
        return YamlDoc(data=data, lines=lines, duplicates=tuple(dups))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            what = f"{exc.problem} ({exc.context})"
        raise YamlSyntaxError(" ".join(str(what).split()), line=line) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(" ".join(str(exc).split()), line=0) from None
    except RecursionError:
        raise YamlSyntaxError("nested too deeply", line=0) from None
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Values in ``node`` once aliases are expanded; linear in distinct nodes (memoized)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:  # recursive alias
        return 1
    active.add(key)
    total = 1
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            total += _expanded_size(k, memo, active) + _expanded_size(v, memo, active)
            if total > MAX_VALUES:
                break
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            total += _expanded_size(item, memo, active)
            if total > MAX_VALUES:
                break
    active.discard(key)
    memo[key] = total
    return total


def _walk(
    loader: yaml.SafeLoader,
    node: yaml.Node,
    path: Path,
    lines: dict[Path, int],
    dups: list[tuple[Path, int, int]],
    active: set[int],
) -> None:
    if id(node) in active:  # recursive alias: positions of the first visit suffice
        return
    active.add(id(node))
    try:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Hashable, int] = {}
            for knode, vnode in node.value:
                if not isinstance(knode, yaml.ScalarNode):
                    continue
                try:
                    key = loader.construct_object(knode)
                    hash(key)
                except (yaml.YAMLError, TypeError):
                    continue
                line = knode.start_mark.line + 1
                sub = (*path, key if isinstance(key, int | str) else str(key))
                if key in seen:
                    dups.append((sub, line, seen[key]))
                else:
                    seen[key] = line
                lines.setdefault(sub, line)
                _walk(loader, vnode, sub, lines, dups, active)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                sub = (*path, i)
                lines.setdefault(sub, item.start_mark.line + 1)
                _walk(loader, item, sub, lines, dups, active)
    finally:
        active.discard(id(node))
