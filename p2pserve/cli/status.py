"""`p2pserve status`: the swarm as its bootstrap sees it — workers, layers, devices, load,
chains and the layers no worker holds — as a table, or as JSON for programs.

``swarm_view`` turns the bootstrap's STATUS answer into that view; the dashboard and
``--json`` print exactly it."""

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
def status(peer, as_json, timeout, home):
    """Show the swarm behind --peer: its workers, chains and gaps."""
    import trio

    from p2pserve.home import bootstrap_addr, home_dir

    view = swarm_view(trio.run(fetch_status, bootstrap_addr(peer, home_dir(home)), timeout))
    if as_json:
        click.echo(json.dumps(view, indent=2))
    else:
        print_view(view)


async def fetch_status(peer: str, timeout: float) -> dict:
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.net.client import status
    from p2pserve.net.host import connect, quiet_libp2p_logs, running_host

    quiet_libp2p_logs()
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"]) as host:
        return await status(host, await connect(host, peer, timeout=timeout), timeout=timeout)


def swarm_view(st: dict) -> dict:
    """The bootstrap's STATUS answer as people read it: one entry per worker with its layers,
    devices and load, the chains as layer ranges, and the gaps (layer ranges no worker holds)."""
    plans = st.get("plans") or []
    n_layers = sum(plans[0]["pp_partition"]) if plans else max((w["end"] for w in st.get("workers", [])), default=0)
    in_chains: dict[str, int] = {}
    for chain in st.get("chains", []):
        for p in chain:
            in_chains[p] = in_chains.get(p, 0) + 1
    workers = [_worker_view(w, in_chains.get(w["peer_id"], 0)) for w in st.get("workers", [])]
    by_id = {w["peer_id"]: w for w in workers}
    return {
        "model": st.get("model", ""),
        "n_layers": n_layers,
        "plans": [_flags(p) for p in plans],
        "workers": workers,
        "chains": [{"peers": chain, "layers": [by_id[p]["layers"] for p in chain if p in by_id]}
                   for chain in st.get("chains", [])],
        "gaps": gaps([tuple(w["layers"]) for w in workers], n_layers),
        "missing": st.get("missing", ""),
        "stats": st.get("stats", {}),
        "banned": st.get("banned", {}),
    }


def gaps(ranges, n_layers: int) -> list[list[int]]:
    """The layer ranges [a, b) of 0..n_layers that none of ``ranges`` covers."""
    out, pos = [], 0
    for start, end in sorted(ranges):
        if start > pos:
            out.append([pos, start])
        pos = max(pos, end)
    if pos < n_layers:
        out.append([pos, n_layers])
    return out


def _worker_view(w: dict, chains: int) -> dict:
    devices = [d for d in w.get("devices", []) if isinstance(d, dict)]
    load = w.get("load", {}) if isinstance(w.get("load"), dict) else {}
    layer_times = [d["layer_time"] for d in devices if isinstance(d.get("layer_time"), (int, float))]
    n = w["end"] - w["start"]
    return {
        "peer_id": w["peer_id"],
        "addrs": w.get("addrs", []),
        "stage": w.get("stage", -1),
        "layers": [w["start"], w["end"]],
        "tp": w.get("tp", 1),
        "devices": [str(d.get("name", "?")) for d in devices],
        "dtype": next((str(d["dtype"]) for d in devices if d.get("dtype")), ""),
        "memory_gib": round(sum(d.get("memory", 0) for d in devices) / 2**30, 1),
        "sessions": load.get("sessions", 0),
        "max_sessions": load.get("max_sessions"),
        "queue": load.get("queue", 0),
        # the cost model's figure for this stage's decode step (the slowest rank paces a TP group)
        "step_ms": round(max(layer_times) * n * 1e3, 3) if layer_times else None,
        "group_id": w.get("group_id", ""),
        "version": w.get("version", ""),
        "chains": chains,
    }


def _flags(plan: dict) -> str:
    return (f"--hetero-config {' '.join(map(str, plan['hetero_config']))} "
            f"--pp-partition {' '.join(map(str, plan['pp_partition']))}")


def print_view(view: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table = Table(title=f"{view['model']}: {view['n_layers']} layers, {len(view['workers'])} workers, "
                        f"{len(view['chains'])} complete chains")
    for col in ("worker", "layers", "stage", "TP", "devices", "dtype", "sessions", "queue", "ms/step", "chains"):
        table.add_column(col, justify="left" if col in ("worker", "devices", "dtype") else "right")
    for w in view["workers"]:
        table.add_row(w["peer_id"][-12:], f"{w['layers'][0]}-{w['layers'][1]}",
                      str(w["stage"]) if w["stage"] >= 0 else "-", str(w["tp"]), ", ".join(w["devices"]),
                      w["dtype"], f"{w['sessions']}/{w['max_sessions'] or '?'}", str(w["queue"]),
                      f"{w['step_ms']:.1f}" if w["step_ms"] is not None else "?", str(w["chains"]))
    console.print(table)
    for i, chain in enumerate(view["chains"]):
        hops = " -> ".join(f"{p[-8:]} [{a}-{b})" for p, (a, b) in zip(chain["peers"], chain["layers"]))
        console.print(f"chain {i}: {hops}")
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
