"""The list of commands the CLI offers (each lives in its own cmd_*.py module)."""

from __future__ import annotations

import click


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

    return [
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
