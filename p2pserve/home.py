"""Where a peer keeps its state on this machine: identity keys and the bootstrap's address.

``$P2PSERVE_HOME`` or ``~/.p2pserve``. The bootstrap writes its multiaddr here so that a
worker or query on the same machine finds it without ``--peer``.
"""

from __future__ import annotations

import os
from pathlib import Path

from p2pserve.errors import ConfigError


def home_dir(home: str | None = None) -> Path:
    path = Path(home or os.environ.get("P2PSERVE_HOME") or "~/.p2pserve").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_bootstrap_addr(home: Path, addr: str) -> Path:
    path = home / "bootstrap.addr"
    path.write_text(addr + "\n")
    return path


def bootstrap_addr(peer: str | None, home: Path) -> str:
    """``--peer`` if given, else the address a bootstrap on this machine left behind."""
    if peer:
        return peer
    path = home / "bootstrap.addr"
    if not path.exists():
        raise ConfigError(f"no --peer given and no bootstrap address in {path}: start `p2pserve bootstrap` "
                          f"on this machine or pass --peer /ip4/<ip>/tcp/<port>/p2p/<peer-id>")
    return path.read_text().strip()
