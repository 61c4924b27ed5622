"""``nomadscale policy validate PATH...`` and ``nomadscale policy show PATH``.

Exit codes: 0 all valid, 1 a policy is invalid, 2 usage error (e.g. a path that does not
exist). Never a traceback for a user mistake.
"""

from __future__ import annotations

import click
import yaml

from nomadscale.config.validate import check_file, check_paths
from nomadscale.core.paths import is_dir, path_problem

EXIT_INVALID = 1
EXIT_USAGE = 2


def _missing(paths: tuple[str, ...]) -> list[str]:
    return [problem for p in paths if (problem := path_problem(p)) is not None]


def _usage_fail(problems: list[str]) -> None:
    for problem in problems:
        click.echo(f"error: {problem}", err=True)
    raise SystemExit(EXIT_USAGE)


@click.group("policy")
def policy() -> None:
    """Check and show autoscaling policy files (policies/*.yaml)."""


@policy.command("validate")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
def validate_cmd(paths: tuple[str, ...]) -> None:
    """Validate policy files and directories; print every problem as file:line: field: what.

    A directory means its *.yaml and *.yml files. Exits 0 when every policy is valid, 1 when
    one is not (every problem is printed), 2 when a path does not exist."""
    missing = _missing(paths)
    if missing:
        _usage_fail(missing)
    path_errors, results = check_paths(paths)
    for e in path_errors:
        click.echo(str(e))
    bad = bool(path_errors)
    for f, pol, errs in results:
        if pol is None:
            bad = True
            for e in errs:
                click.echo(str(e))
        else:
            click.echo(f"OK {f} ({pol.name})")
    raise SystemExit(EXIT_INVALID if bad else 0)


@policy.command("show")
@click.argument("path", type=click.Path())
def show_cmd(path: str) -> None:
    """Print the effective policy (defaults filled in) as YAML.

    Exits 0, 1 when the file is not a valid policy (every problem is printed), 2 when PATH
    does not exist or is a directory."""
    problem = path_problem(path)
    if problem is not None:
        _usage_fail([problem])
    if is_dir(path):
        click.echo(f"error: {path} is a directory; show takes one policy file", err=True)
        raise SystemExit(EXIT_USAGE)
    pol, errs = check_file(path)
    if pol is None:
        for e in errs:
            click.echo(str(e), err=True)
        raise SystemExit(EXIT_INVALID)
    click.echo(f"# effective policy from {path}")
    click.echo(yaml.safe_dump(pol.to_yaml_dict(), sort_keys=False, allow_unicode=True), nl=False)


if __name__ == "__main__":  # pragma: no cover - exercised by a subprocess test
    policy()
