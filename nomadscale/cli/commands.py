"""The list of commands the CLI offers (each lives in its own cmd_*.py module)."""

from __future__ import annotations

import re

import click

EXIT_STATUS = (
    "Exit status: 0 done; 1 the operation failed or an input file or value is invalid; "
    "2 a usage error (an unknown option, a missing argument). Errors are one line on stderr."
)
_SAYS_EXIT = re.compile(r"\bexits?\b|exit status", re.IGNORECASE)


def with_exit_status(command: click.Command) -> click.Command:
    """Give ``command`` (and every subcommand) the CLI's exit-status contract as the epilog of
    its ``--help``, unless its own help already says what it exits with."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            with_exit_status(sub)
    if not _SAYS_EXIT.search(f"{command.help or ''} {command.epilog or ''}"):
        command.epilog = EXIT_STATUS
    return command


def all_commands() -> list[click.Command]:
    from nomadscale.cli.cmd_backtest import backtest
    from nomadscale.cli.cmd_capacity import capacity
    from nomadscale.cli.cmd_control import COMMANDS as CONTROL_COMMANDS
    from nomadscale.cli.cmd_deploy import deploy, prefetch
    from nomadscale.cli.cmd_policy import policy
    from nomadscale.cli.cmd_run import COMMANDS as RUN_COMMANDS
    from nomadscale.cli.cmd_runbook import COMMANDS as RUNBOOK_COMMANDS
    from nomadscale.cli.cmd_service import COMMANDS as SERVICE_COMMANDS
    from nomadscale.cli.cmd_sim import sim

    commands = [
        *RUN_COMMANDS,
        *SERVICE_COMMANDS,
        *CONTROL_COMMANDS,
        policy,
        backtest,
        capacity,
        deploy,
        prefetch,
        *RUNBOOK_COMMANDS,
        sim,
    ]
    return [with_exit_status(c) for c in commands]
