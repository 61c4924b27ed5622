"""A subset of go-bexpr, the filter language of Nomad's ``filter`` query parameter.

Supported: ``==``, ``!=``, ``in``, ``not in``, ``contains``, ``not contains``, ``matches``,
``not matches``, ``is empty``, ``is not empty``, ``and``, ``or``, ``not``, parentheses;
selectors like ``Datacenter``, ``Meta.gpu``, ``Meta["gpu"]``; values quoted with ``"`` or
backticks, numbers, booleans or bare words.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from nomadscale.sim.model import ApiError

_TOKEN = re.compile(
    r'\s*(?:(?P<str>"(?:[^"\\]|\\.)*"|`[^`]*`)|(?P<op>==|!=|\(|\)|\[|\])'
    r"|(?P<word>[A-Za-z0-9_\-./:*]+))"
)
_MISSING = object()

Predicate = Callable[[Any], bool]


def _tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise ApiError(400, f"failed to parse filter: unexpected input at {pos}: {text!r}")
        pos = m.end()
        if m.group("str") is not None:
            s = m.group("str")
            val = s[1:-1].encode().decode("unicode_escape") if s[0] == '"' else s[1:-1]
            out.append(("str", val))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            out.append(("word", m.group("word")))
    return out


def _lookup(obj: Any, path: list[str]) -> Any:
    cur = obj
    for part in path:
        if isinstance(cur, dict):
            if part in cur:
                cur = cur[part]
            else:
                low = {str(k).lower(): v for k, v in cur.items()}
                if part.lower() not in low:
                    return _MISSING
                cur = low[part.lower()]
        else:
            return _MISSING
    return cur


def _equal(field: Any, value: str) -> bool:
    if field is _MISSING or field is None:
        return False
    if isinstance(field, bool):
        return str(field).lower() == value.lower()
    if isinstance(field, int | float):
        try:
            return float(field) == float(value)
        except ValueError:
            return False
    return str(field) == value


def _contains(field: Any, value: str) -> bool:
    if isinstance(field, dict):
        return value in field
    if isinstance(field, list | tuple | set):
        return any(_equal(x, value) for x in field)
    if isinstance(field, str):
        return value in field
    return False


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self, n: int = 0) -> tuple[str, str] | None:
        j = self.i + n
        return self.toks[j] if j < len(self.toks) else None

    def next(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise ApiError(400, "failed to parse filter: unexpected end of expression")
        self.i += 1
        return tok

    def word(self, w: str, n: int = 0) -> bool:
        tok = self.peek(n)
        return tok is not None and tok[0] == "word" and tok[1].lower() == w

    def parse(self) -> Predicate:
        pred = self.or_()
        if self.peek() is not None:
            raise ApiError(400, f"failed to parse filter: unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return pred

    def or_(self) -> Predicate:
        left = self.and_()
        while self.word("or"):
            self.i += 1
            right = self.and_()
            left = (lambda a, b: lambda o: a(o) or b(o))(left, right)
        return left

    def and_(self) -> Predicate:
        left = self.not_()
        while self.word("and"):
            self.i += 1
            right = self.not_()
            left = (lambda a, b: lambda o: a(o) and b(o))(left, right)
        return left

    def not_(self) -> Predicate:
        if self.word("not"):
            self.i += 1
            inner = self.not_()
            return lambda o: not inner(o)
        if self.peek() == ("op", "("):
            self.i += 1
            inner = self.or_()
            if self.next() != ("op", ")"):
                raise ApiError(400, "failed to parse filter: missing ')'")
            return inner
        return self.match()

    def selector(self) -> list[str]:
        kind, w = self.next()
        if kind != "word":
            raise ApiError(400, f"failed to parse filter: expected a selector, got {w!r}")
        path = w.split(".")
        while self.peek() == ("op", "["):
            self.i += 1
            _, key = self.next()
            if self.next() != ("op", "]"):
                raise ApiError(400, "failed to parse filter: missing ']'")
            path.append(key)
        return path

    def value(self) -> str:
        kind, v = self.next()
        if kind == "op":
            raise ApiError(400, f"failed to parse filter: expected a value, got {v!r}")
        return v

    def match(self) -> Predicate:
        # value in selector / value not in selector
        if self.peek() is not None and (
            self.word("in", 1) or (self.word("not", 1) and self.word("in", 2))
        ):
            value = self.value()
            neg = self.word("not")
            self.i += 2 if neg else 1
            path = self.selector()
            return lambda o: _contains(_lookup(o, path), value) != neg
        path = self.selector()
        tok = self.next()
        if tok == ("op", "=="):
            v = self.value()
            return lambda o: _equal(_lookup(o, path), v)
        if tok == ("op", "!="):
            v = self.value()
            return lambda o: not _equal(_lookup(o, path), v)
        neg = False
        if tok[0] == "word" and tok[1].lower() == "not":
            neg = True
            tok = self.next()
        op = tok[1].lower()
        if op == "contains":
            v = self.value()
            return lambda o: _contains(_lookup(o, path), v) != neg
        if op == "matches":
            rx = re.compile(self.value())
            return lambda o: (
                (isinstance(_lookup(o, path), str) and rx.search(_lookup(o, path)) is not None)
                != neg
            )
        if op == "is":
            neg = self.word("not")
            if neg:
                self.i += 1
            if not self.word("empty"):
                raise ApiError(400, "failed to parse filter: expected 'empty'")
            self.i += 1
            return lambda o: (_lookup(o, path) in (_MISSING, None, "", [], {})) != neg
        raise ApiError(400, f"failed to parse filter: unknown operator {tok[1]!r}")


def compile_filter(text: str) -> Predicate:
    return _Parser(text).parse()
