"""The ``nomadscale`` command line.

Every command turns nomadscale's own errors into one line on stderr and an exit code:
1 for a failed operation or invalid input file, 2 for a usage error. Tracebacks are for bugs.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from nomadscale import __version__
from nomadscale.core.errors import ConfigError, NomadscaleError, UsageError


class NomadscaleGroup(click.Group):
    """Turns nomadscale errors into one-line messages instead of tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(2)
        except ConfigError as e:
            # every problem of the file, one per line (as `policy validate` prints them)
            for line in e.errors if len(e.errors) > 1 else [str(e)]:
                click.echo(f"error: {line}", err=True)
            ctx.exit(1)
        except NomadscaleError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(1)
        except ValueError as e:
            # click's own Path checks call os.stat(), which raises for a NUL in a name.
            if "null byte" not in str(e):
                raise
            click.echo("error: arguments cannot contain a NUL byte", err=True)
            ctx.exit(2)


@click.group(cls=NomadscaleGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nomadscale")
def cli() -> None:
    """Predictive autoscaling, golden-image rollouts and scripted healing for GPU inference
    fleets on Nomad and Consul.

    Every command exits 0 when done, 1 when the operation failed or an input file or value
    is invalid, 2 on a usage error; an error is one line on stderr. Settings come from the
    environment (NOMAD_ADDR, CONSUL_HTTP_ADDR, PROMETHEUS_URL, NOMADSCALE_*) or
    /etc/nomadscale/nomadscale.yaml: see ops/README.md."""


def _register() -> None:
    from nomadscale.cli import commands

    for command in commands.all_commands():
        cli.add_command(command)


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        cli.main(args=argv, prog_name="nomadscale")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
