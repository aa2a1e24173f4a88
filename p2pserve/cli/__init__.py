"""The `p2pserve` command line. Each subcommand lives beside the code it drives and is
imported only when used, so `p2pserve --help` stays fast."""

from __future__ import annotations

import importlib
import sys

import click

from p2pserve.errors import P2PServeError

# name -> "module:attribute" of a click command
COMMANDS = {
    "run": "p2pserve.cli.run:run",
    "plan": "p2pserve.cli.plan:plan",
    "bootstrap": "p2pserve.cli.bootstrap:bootstrap",
    "worker": "p2pserve.cli.worker:worker",
    "query": "p2pserve.cli.query:query",
    "status": "p2pserve.cli.status:status",
    "train": "p2pserve.cli.train:train",
    "keygen": "p2pserve.cli.keygen:keygen",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith((module.split(".")[0], "p2pserve")):
                raise
            return None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="p2pserve")
def cli():
    """Serve Llama-family models from a peer-to-peer swarm of unequal machines."""


def main(argv=None):
    from p2pserve.cli.options import expand_list_flags

    try:
        argv = expand_list_flags(list(sys.argv[1:] if argv is None else argv))
        cli.main(args=argv, prog_name="p2pserve", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _interrupted()
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except P2PServeError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except BaseExceptionGroup as group:
        # trio nurseries wrap errors; a user-facing one inside is still one line
        if group.subgroup(KeyboardInterrupt) is not None:
            _interrupted()
        user_errors, _ = group.split(P2PServeError)
        if user_errors is None:
            raise
        click.echo(f"error: {_first_leaf(user_errors)}", err=True)
        sys.exit(2)
    sys.exit(0)


def _interrupted():
    """Ctrl-C: one line and the conventional exit code, never a traceback."""
    click.echo("interrupted", err=True)
    sys.exit(130)


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    e = group
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


if __name__ == "__main__":
    main()
