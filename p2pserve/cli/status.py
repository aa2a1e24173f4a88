"""`p2pserve status`: the swarm as its bootstrap sees it — workers, layers, devices, load,
links, chains and the layers no worker holds — as a table, or as JSON for programs
(``--json`` prints the view the dashboard shows, ``p2pserve.bootstrap.dashboard.swarm_view``)."""

from __future__ import annotations

import json

import click


@click.command()
@click.option("--peer", default=None, help="The bootstrap's multiaddr (default: the one started on this machine).")
@click.option("--json", "as_json", is_flag=True, help="Print the view as one JSON object instead of a table.")
@click.option("--timeout", type=click.FloatRange(0.1, 600), default=15.0, show_default=True,
              help="Seconds to wait for the bootstrap.")
@click.option("--home", default=None,
              help="State directory where a local bootstrap wrote its address (default $P2PSERVE_HOME or ~/.p2pserve).")
@click.option("--swarm-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The private swarm's key file, if the swarm has one.")
def status(peer, as_json, timeout, home, swarm_key):
    """Show the swarm behind --peer: its workers, chains and gaps."""
    import trio

    from p2pserve.bootstrap.dashboard import swarm_view
    from p2pserve.home import bootstrap_addr, home_dir
    from p2pserve.net.host import read_swarm_key

    view = swarm_view(trio.run(fetch_status, bootstrap_addr(peer, home_dir(home)), timeout,
                               swarm_key and read_swarm_key(swarm_key)))
    if as_json:
        click.echo(json.dumps(view, indent=2))
    else:
        print_view(view)


async def fetch_status(peer: str, timeout: float, swarm_key: str | None = None) -> dict:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.client import status
    from p2pserve.net.host import connect, quiet_libp2p_logs, running_host

    quiet_libp2p_logs()
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"], swarm_key) as host:
        return await status(host, await connect(host, peer, timeout=timeout), timeout=timeout)


def print_view(view: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from p2pserve.bootstrap.dashboard import link_label, precision_label

    console = Console(highlight=False)
    table = Table(title=f"{view['model']}: {view['n_layers']} layers, {len(view['workers'])} workers, "
                        f"{len(view['chains'])} complete chains")
    for col in ("worker", "layers", "stage", "TP", "devices", "dtype", "sessions", "queue", "ms/step", "chains"):
        table.add_column(col, justify="left" if col in ("worker", "devices", "dtype") else "right",
                         no_wrap=col == "dtype")  # "int4, KV fp16" reads as one
    for w in view["workers"]:
        table.add_row(w["peer_id"][-12:], f"{w['layers'][0]}-{w['layers'][1]}",
                      str(w["stage"]) if w["stage"] >= 0 else "-", str(w["tp"]), ", ".join(w["devices"]),
                      precision_label(w), f"{w['sessions']}/{w['max_sessions'] or '?'}", str(w["queue"]),
                      f"{w['step_ms']:.1f}" if w["step_ms"] is not None else "?", str(w["chains"]))
    console.print(table)
    for i, chain in enumerate(view["chains"]):
        hops = " -> ".join(f"{p[-8:]} [{a}-{b})" for p, (a, b) in zip(chain["peers"], chain["layers"]))
        console.print(f"chain {i}: {hops}")
    for w in view["workers"]:  # the round trips each worker measured, as it announced them
        if w["links"]:
            links = ", ".join(f"{link_label(link)} {link['rtt_ms']:.2f} ms" for link in w["links"])
            console.print(f"links of {w['peer_id'][-8:]} [{w['layers'][0]}-{w['layers'][1]}): {links}")
    if view["gaps"]:
        ranges = ", ".join(f"{a}-{b}" for a, b in view["gaps"])
        console.print(f"[bold red]gaps: layers {ranges} have no worker[/]")
    elif not view["chains"]:
        console.print(f"[yellow]no complete chain: {view['missing']}[/]")
    stats = view["stats"]
    if stats:
        console.print(", ".join(f"{k} {v}" for k, v in stats.items()))
    if view["plans"]:
        console.print(f"plan: {view['plans'][0]}")
