"""`p2pserve keygen`: write a swarm key, which makes a swarm private."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), default="swarm.key")
def keygen(path):
    """Write a new random swarm key to PATH (default ./swarm.key), in the format IPFS uses.

    Give the same file to the bootstrap, every worker and every client with --swarm-key:
    connections are encrypted with it, and a peer without it cannot connect at all."""
    from p2pserve.errors import ConfigError
    from p2pserve.net.host import write_swarm_key

    try:
        write_swarm_key(path)
    except FileExistsError:
        raise ConfigError(f"{path} exists; a swarm key is never overwritten (remove it first)") from None
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror or e}") from None
    click.echo(f"wrote a swarm key to {path}; pass --swarm-key {path} to the bootstrap, workers and clients")
