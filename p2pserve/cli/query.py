"""`p2pserve query`: ask a swarm and print the answer as it streams."""

from __future__ import annotations

import sys
import time

import click

from p2pserve.cli.options import generation_options, sampling_from_options


@click.command()
@click.argument("prompt")
@click.option("--peer", "peers", multiple=True,
              help="A head's multiaddr (default: the one started on this machine); repeat it to name other heads "
                   "of the swarm, which go on with the answer if the first dies.")
@click.option("--model", default=None, help="Model name (default: the swarm's); NAME_N pins pipeline N.")
@generation_options
@click.option("--timeout", type=float, default=120.0, show_default=True, help="Seconds to wait for each token.")
@click.option("--home", default=None,
              help="State directory where a local bootstrap wrote its address (default $P2PSERVE_HOME or ~/.p2pserve).")
@click.option("--swarm-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The private swarm's key file, if the swarm has one.")
@click.option("--stats/--no-stats", default=False,
              help="Print the chain each attempt took and the answer's timing on stderr.")
def query(prompt, peers, model, timeout, home, swarm_key, stats, **gen):
    """Ask the swarm behind --peer to answer PROMPT."""
    import trio

    from p2pserve.home import bootstrap_addr, home_dir

    from p2pserve.net.host import read_swarm_key

    params, chat = sampling_from_options(gen)
    heads = list(peers) or [bootstrap_addr(None, home_dir(home))]
    trio.run(_query, heads, prompt, model, chat, params, timeout, stats,
             swarm_key and read_swarm_key(swarm_key))


async def _query(peers, prompt, model, chat, params, timeout, stats, swarm_key=None):
    from libp2p.crypto.ed25519 import create_new_key_pair

    from p2pserve.errors import NetworkError
    from p2pserve.net.client import ask_heads
    from p2pserve.net.host import connect, quiet_libp2p_logs, running_host

    quiet_libp2p_logs()
    async with running_host(create_new_key_pair(), ["/ip4/127.0.0.1/tcp/0"], swarm_key) as host:
        heads, unreachable = [], []
        for peer in peers:
            try:
                heads.append(await connect(host, peer, timeout=15))
            except NetworkError as e:
                unreachable.append(e)
        if not heads:
            raise unreachable[0]
        t0, first = time.monotonic(), None
        async for frame in ask_heads(host, heads, prompt=prompt, model=model, chat=chat, params=params,
                                     timeout=timeout):
            if frame["type"] == "route":
                if stats:
                    click.echo(f"[route: {' -> '.join(p[-8:] for p in frame['chain'])}]", err=True)
                continue
            if first is None and frame["type"] == "token":
                first = time.monotonic() - t0
            sys.stdout.write(frame.get("text", ""))
            sys.stdout.flush()
            if frame["type"] == "done":
                sys.stdout.write("\n")
                if stats:
                    click.echo(answer_stats(frame, first, time.monotonic() - t0), err=True)


def answer_stats(done: dict, ttft: float | None, total: float) -> str:
    """``--stats``: time to first token (as this client saw it), then the decode speed."""
    n = done["n_tokens"]
    line = f"[{n} tokens in {total:.2f} s; time to first token {ttft * 1e3:.0f} ms" if ttft is not None \
        else f"[{n} tokens in {total:.2f} s"
    if ttft is not None and n > 1 and total > ttft:
        line += f"; {(n - 1) / (total - ttft):.1f} tokens/s after it"
    return line + f"; failovers {done['failovers']}]"
