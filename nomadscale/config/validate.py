"""Policy file validation with ``file:line: field: message`` errors, all found in one pass.

``validate_files`` reports; ``load_policy``/``load_policies`` return ``Policy`` objects or raise
``ConfigError`` whose ``errors`` holds every error line.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from nomadscale.config import policy as pm
from nomadscale.config.yamlpos import YamlDoc, YamlSyntaxError, load_yaml
from nomadscale.core.errors import ConfigError
from nomadscale.core.files import read_small_text

POLICY_SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 256 * 1024  # policies are a few kB; a larger file is a mistake
MAX_LIST_ITEMS = 100  # zones, schedules, days: a longer list is a mistake, reported once
_CLEAN_KEY = re.compile(r"[A-Za-z0-9_-]+")
_DISCRIMINATORS = ("source",)


@dataclass(frozen=True, slots=True)
class PolicyError:
    file: str
    line: int  # 1-based; 0 when the problem is the file itself
    field: str  # dotted path like "schedules[0].cron"; "" when the problem is the file itself
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


# --- public API -----------------------------------------------------------------------------


def check_file(path: str | Path) -> tuple[pm.Policy | None, list[PolicyError]]:
    """Validate one policy file: ``(policy, [])`` when valid, ``(None, errors)`` otherwise."""
    file = str(path)
    p = Path(path)
    try:
        text = read_small_text(p, limit=MAX_FILE_BYTES)
    except FileNotFoundError:
        return None, [PolicyError(file, 0, "", "no such file")]
    except IsADirectoryError:
        return None, [PolicyError(file, 0, "", "is a directory, expected a policy file")]
    except UnicodeDecodeError:
        return None, [PolicyError(file, 0, "", "not a UTF-8 text file")]
    except OSError as exc:
        return None, [PolicyError(file, 0, "", f"cannot read: {exc.strerror or exc}")]
    except ValueError as exc:  # a NUL in the name; a file too large or not a regular file
        return None, [PolicyError(file, 0, "", str(exc))]
    try:
        doc = load_yaml(text)
    except YamlSyntaxError as exc:
        return None, [PolicyError(file, exc.line, "yaml", exc.message)]
    if doc.data is None:
        return None, [PolicyError(file, 1, "policy", "file is empty, expected policy keys")]
    if not isinstance(doc.data, Mapping):
        kind = _kind(doc.data)
        return None, [PolicyError(file, 1, "policy", f"must be a mapping of keys, got {kind}")]
    long = _long_list(doc.data, (), set())
    if long is not None:
        where, n = long
        message = f"too many items ({n}, at most {MAX_LIST_ITEMS})"
        return None, [PolicyError(file, doc.line_of(where), _field(where), message)]
    errors = [
        PolicyError(file, line, _field(path), f"duplicate key (first at line {first})")
        for path, line, first in doc.duplicates
    ]
    context = {"base_dir": str(p.parent), "source": str(p)}
    try:
        policy = pm.Policy.model_validate(doc.data, context=context)
    except ValidationError as exc:
        errors.extend(_pydantic_errors(file, doc, exc))
        # cross-section rules do not run while fields are invalid; check them on raw data
        # and neither do a section's own rules while one of its fields is invalid
        found = pm.section_problems(doc.data) + pm.cross_field_problems(doc.data)
        for rel, message in found:
            errors.append(PolicyError(file, doc.line_of(rel), _field(rel), message))
        return None, _dedupe(errors)
    if errors:
        return None, errors
    return policy, []


def validate_files(paths: Iterable[str | Path]) -> list[PolicyError]:
    """Every error in the given files and directories (a directory means its *.yaml/*.yml).

    Also reports a policy name used by more than one file.
    """
    errors: list[PolicyError] = []
    _load_many(paths, errors)
    return errors


def load_policy(path: str | Path) -> pm.Policy:
    """Load one policy file; raise ConfigError whose ``errors`` lists every problem."""
    policy, errors = check_file(path)
    if policy is None:
        raise _config_error(errors)
    return policy


def load_policies(paths: Iterable[str | Path]) -> list[pm.Policy]:
    """Load files and directories of policies; duplicate names across files are an error."""
    errors: list[PolicyError] = []
    policies = _load_many(paths, errors)
    if errors:
        raise _config_error(errors)
    return policies


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], list[PolicyError]]:
    """Files to check: files as given, directories as their sorted *.yaml/*.yml."""
    files: list[Path] = []
    errors: list[PolicyError] = []
    for raw in paths:
        p = Path(raw)
        try:
            is_dir = p.is_dir()
        except (OSError, ValueError):  # a name too long or with a NUL: check_file reports it
            is_dir = False
        if is_dir:
            found = sorted(f for f in p.iterdir() if f.suffix in POLICY_SUFFIXES and f.is_file())
            if not found:
                errors.append(PolicyError(str(raw), 0, "", "no policy files (*.yaml, *.yml) here"))
            files.extend(found)
        else:
            files.append(p)
    return files, errors


# --- internals ------------------------------------------------------------------------------


def check_paths(
    paths: Iterable[str | Path],
) -> tuple[list[PolicyError], list[tuple[Path, pm.Policy | None, list[PolicyError]]]]:
    """Check files and directories: ``(path errors, [(file, policy or None, errors), ...])``.

    A policy whose name an earlier file already uses is reported as an error (policy None).
    """
    files, path_errors = expand_paths(paths)
    results: list[tuple[Path, pm.Policy | None, list[PolicyError]]] = []
    first_file: dict[str, str] = {}
    for f in files:
        policy, errs = check_file(f)
        if policy is not None and policy.name in first_file:
            other = first_file[policy.name]
            message = f"policy {policy.name!r} is also defined in {other}"
            policy, errs = None, [PolicyError(str(f), _name_line(f), "name", message)]
        if policy is not None:
            first_file[policy.name] = str(f)
        results.append((f, policy, errs))
    return path_errors, results


def _load_many(paths: Iterable[str | Path], errors: list[PolicyError]) -> list[pm.Policy]:
    path_errors, results = check_paths(paths)
    errors.extend(path_errors)
    policies: list[pm.Policy] = []
    for _, policy, errs in results:
        errors.extend(errs)
        if policy is not None:
            policies.append(policy)
    if not results and not errors:
        errors.append(PolicyError("(none)", 0, "", "no policy files given"))
    return policies


def _name_line(path: Path) -> int:
    try:
        return load_yaml(path.read_text(encoding="utf-8")).line_of(("name",))
    except (OSError, ConfigError):
        return 1


def _long_list(
    data: Any, path: tuple[str | int, ...], active: set[int]
) -> tuple[tuple[str | int, ...], int] | None:
    """The first list longer than ``MAX_LIST_ITEMS`` (path, length), or None."""
    if id(data) in active:  # a recursive alias
        return None
    if isinstance(data, list):
        if len(data) > MAX_LIST_ITEMS:
            return path, len(data)
        items: Iterable[tuple[str | int, Any]] = enumerate(data)
    elif isinstance(data, Mapping):
        items = ((k if isinstance(k, str | int) else str(k), v) for k, v in data.items())
    else:
        return None
    active.add(id(data))
    try:
        for key, value in items:
            found = _long_list(value, (*path, key), active)
            if found is not None:
                return found
    finally:
        active.discard(id(data))
    return None


def _config_error(errors: list[PolicyError]) -> ConfigError:
    lines = [str(e) for e in errors]
    more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
    return ConfigError(lines[0] + more, errors=lines)


def _dedupe(errors: list[PolicyError]) -> list[PolicyError]:
    seen: set[tuple[str, str]] = set()
    out = []
    for e in errors:
        if (e.field, e.message) not in seen:
            seen.add((e.field, e.message))
            out.append(e)
    return sorted(out, key=lambda e: e.line)


def _field(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            # keys that are not plain names (spaces, control characters) are shown quoted
            name = part if _CLEAN_KEY.fullmatch(str(part)) else _show(str(part))
            out += f".{name}" if out else name
    return out or "policy"


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return f"a {type(value).__name__}"


def _show(value: Any) -> str:
    text = repr(value)
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _strip_tags(loc: tuple[str | int, ...], data: Any) -> tuple[str | int, ...]:
    """Drop discriminator tags pydantic puts in locations (demand.prometheus.query)."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        if (
            isinstance(node, Mapping)
            and isinstance(part, str)
            and i < len(loc) - 1
            and any(node.get(d) == part for d in _DISCRIMINATORS)
        ):
            continue
        out.append(part)
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            node = None
    return tuple(out)


def _model_at(path: tuple[str | int, ...], data: Any) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at ``path`` (for suggestions)."""
    model: Any = pm.Policy
    node = data
    for part in path:
        if isinstance(part, int):
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        info = next(
            (f for n, f in model.model_fields.items() if (f.alias or n) == part),
            None,
        )
        if info is None:
            return None
        node = node.get(part) if isinstance(node, Mapping) else None
        model = _unwrap(info.annotation, node)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any, node: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if not args:
        meta = getattr(annotation, "__metadata__", None)
        origin = getattr(annotation, "__origin__", None)
        return _unwrap(origin, node) if meta is not None else None
    models = [_unwrap(a, node) for a in args if a is not type(None) and a is not Ellipsis]
    models = [m for m in models if m is not None]
    if len(models) > 1 and isinstance(node, Mapping):  # discriminated union: pick by tag
        for m in models:
            tag = m.model_fields.get("source")
            if tag is not None and node.get("source") in getattr(tag.annotation, "__args__", ()):
                return m
    return models[0] if models else None


def _pydantic_errors(file: str, doc: YamlDoc, exc: ValidationError) -> list[PolicyError]:
    out: list[PolicyError] = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        etype = err["type"]
        ctx = err.get("ctx") or {}
        if etype == "policy_rule":
            loc = loc + tuple(ctx.get("field", ()))
        loc = _strip_tags(loc, doc.data)
        if etype == "extra_forbidden":
            key = loc[-1] if loc else ""
            parent = loc[:-1]
            line = doc.line_of(loc)
            if isinstance(key, str) and _CLEAN_KEY.fullmatch(key):
                message = "unknown key" + _suggest(key, parent, doc.data)
                out.append(PolicyError(file, line, _field(loc), message))
            else:
                out.append(PolicyError(file, line, _field(parent), f"unknown key {_show(key)}"))
            continue
        if etype == "invalid_key":
            parent = loc[:-1]
            message = f"keys must be text, got {_show(err.get('input'))}"
            out.append(PolicyError(file, doc.line_of(parent), _field(parent), message))
            continue
        out.append(PolicyError(file, doc.line_of(loc), _field(loc), _message(err)))
    return out


def _suggest(key: str, parent: tuple[str | int, ...], data: Any) -> str:
    model = _model_at(parent, data)
    if model is None:
        return ""
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f", did you mean {close[0]!r}?"
    return f" (expected one of: {', '.join(names)})"


_KIND_WORDS = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "text",
    "bool_type": "true or false",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _message(err: Any) -> str:
    etype: str = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if etype == "missing":
        return "required"
    if etype in _KIND_WORDS and value is None:
        return f"must be {_KIND_WORDS[etype]}, got nothing"
    if etype in _KIND_WORDS:
        return f"must be {_KIND_WORDS[etype]}, got {_kind(value)} {_show(value)}"
    if etype == "value_error":
        text = str(ctx.get("error", err["msg"]))
    elif etype == "policy_rule":
        text = err["msg"]
    elif etype == "literal_error":
        text = f"must be one of {ctx.get('expected', '?')}; got {_show(value)}"
    elif etype == "union_tag_invalid":
        text = f"source must be one of {ctx.get('expected_tags', '?')}; got {_show(ctx.get('tag'))}"
    elif etype == "union_tag_not_found":
        text = f"needs a {ctx.get('discriminator', 'source')!s} key (prometheus or trace)".replace(
            "'", ""
        )
    elif etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {
            "greater_than": ("gt", ">"),
            "greater_than_equal": ("ge", ">="),
            "less_than": ("lt", "<"),
            "less_than_equal": ("le", "<="),
        }[etype]
        text = f"must be {op[1]} {ctx.get(op[0])}, got {_show(value)}"
    elif etype == "string_too_short":
        text = "must not be empty"
    elif etype == "too_short":
        text = f"needs at least {ctx.get('min_length')} item(s)"
    else:
        text = str(err["msg"])
    return " ".join(text.split()) or etype


def field_path(path: Iterable[str | int]) -> str:
    """``("shapes", 1, "vcpus")`` -> ``shapes[1].vcpus``: fields named as policy errors name
    them, for the other YAML files nomadscale validates (the capacity catalog)."""
    return _field(path)


def error_message(err: Any) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) in the words policy errors
    use ("required", "must be > 0, got 0", "must be a number, got a string 'fast'")."""
    return _message(err)
