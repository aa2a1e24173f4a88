"""A head peer's life: join or start a swarm, serve its protocols, its HTTP API and the
checks that keep it honest, until cancelled (`p2pserve bootstrap` parses the flags,
``p2pserve/cli/bootstrap.py``)."""

from __future__ import annotations

import click
import trio

from p2pserve.bootstrap.discovery import discover_forever
from p2pserve.bootstrap.http import serve_http
from p2pserve.bootstrap.integrity import Admission, SpotChecks
from p2pserve.bootstrap.planning import Planning
from p2pserve.bootstrap.server import Bootstrap
from p2pserve.engine.tp import split_evenly
from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError, NetworkError
from p2pserve.heap import freeze_startup_heap
from p2pserve.home import write_bootstrap_addr
from p2pserve.net.host import (connect, host_multiaddrs, own_identity, quiet_libp2p_logs, running_dht,
                               running_host, serve_protocol)
from p2pserve.net.nat import serving_relay
from p2pserve.net.protocols import ANNOUNCE, PLAN, QUERY, STATUS, STREAM_INTERVAL
from p2pserve.net.wire import RemoteError
from p2pserve.node.run import fetch_plan
from p2pserve.plan import Plan


async def join_swarm(host, peers: tuple[str, ...], config):
    """(the swarm's plan, (this head's certificate, its issuer), the reachable peers) from the first head
    of ``peers`` that answers; it must serve the same model."""
    failures = []
    for address in peers:
        try:
            head = await connect(host, address, timeout=15)
            info = await fetch_plan(host, head, {"type": "plan", "head": True, "addrs": host_multiaddrs(host)})
        except (NetworkError, RemoteError) as e:
            failures.append(str(e))
            continue
        if info.get("fingerprint") != config.fingerprint():
            raise ConfigError(f"--peer {address} serves {info.get('model')} (fingerprint {info.get('fingerprint')}), "
                              f"but --model is {config.name} ({config.fingerprint()}): give the same weights")
        return Plan.from_dict(info["plans"][0]), (info.get("head_cert"), head.to_base58()), (address,)
    raise NetworkError("cannot join the swarm as another head: " + "; ".join(failures))


def default_plan(n_layers: int, stages: int = 2):
    """Without a plan, before any worker joined: an even split into two TP-1 stages (then the
    planner plans from the devices the workers announce, bootstrap/planning.py)."""
    stages = min(stages, n_layers)
    return Plan([1] * stages, [b - a for a, b in split_evenly(n_layers, stages)])


async def serve(listen, model_path, explicit: Plan | None, policy, home, verbose=False,
                http_bind=None, task_status=None, *, stream_interval: float = STREAM_INTERVAL,
                api_keys: tuple[str, ...] = (), rate_limit: int | None = None,
                swarm_key: str | None = None, allowed_peers: frozenset[str] | None = None,
                worker_dtypes: frozenset[str] | None = None, admission_probe: bool = True,
                spot_check: float = 0.0, join_peers: tuple[str, ...] = ()):
    quiet_libp2p_logs(verbose)
    source = open_weights(model_path)
    config = source.config
    plan = explicit or default_plan(config.n_layers)  # without a plan: planned from the workers that join
    plan.check_model(config)
    tokenizer = source.tokenizer()
    key = own_identity(home, "bootstrap")
    async with running_host(key, [listen], swarm_key) as host:
        head_cert = (None, None)
        if join_peers:  # another head of a running swarm: its plan is the swarm's
            plan, head_cert, join_peers = await join_swarm(host, join_peers, config)
            explicit = plan
        # every head relays for workers behind NATs and tells a worker whether it can be dialled
        async with serving_relay(host, swarm_key), \
                running_dht(host, server=True, bootstrap_peers=join_peers) as dht:
            node = Bootstrap(host, config, tokenizer, [plan],
                             policy="least-loaded" if policy == "latency" else "round-robin",
                             stream_interval=stream_interval, allowed_peers=allowed_peers,
                             worker_dtypes=worker_dtypes)
            node.planning = Planning(config, node.registry, explicit=explicit, fallback=plan)
            (node.head_cert, node.certified_by), node.certify_heads = head_cert, swarm_key is not None
            if node.certified_by:
                node.note_head(node.certified_by, list(join_peers))
            for protocol, handler in ((ANNOUNCE, node.handle_announce), (PLAN, node.handle_plan),
                                      (QUERY, node.handle_query), (STATUS, node.handle_status)):
                serve_protocol(host, protocol, handler)
            addrs = host_multiaddrs(host)
            write_bootstrap_addr(home, addrs[0])
            click.echo(f"p2pserve bootstrap serving {config.name} (fingerprint {config.fingerprint()})")
            click.echo(f"plan: {plan.flags()}")
            for a in addrs:
                click.echo(f"  {a}")
            click.echo("join a worker for each stage with:")
            for stage in plan.stages:
                click.echo(f"  p2pserve worker --peer {addrs[0]} --stage {stage.index}")
            click.echo("ask with:")
            click.echo(f"  p2pserve query --peer {addrs[0]} \"What is the capital of France?\"", nl=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(discover_forever, node, dht)
                if admission_probe:
                    nursery.start_soon(Admission(node).run)
                if spot_check > 0:
                    node.spot_checks = SpotChecks(node, spot_check)
                    nursery.start_soon(node.spot_checks.run)
                if http_bind:
                    try:
                        await nursery.start(serve_http, node, http_bind, api_keys, rate_limit)
                    except OSError as e:
                        raise ConfigError(f"--http {http_bind}: cannot listen there ({e.strerror or e})") from None
                    click.echo(f"OpenAI-compatible API: http://{http_bind}/v1 (model {config.name}"
                               f"{', API keys required' if api_keys else ''})")
                    if not api_keys and not http_bind.startswith(("127.", "localhost:", "[::1]")):
                        click.echo("warning: the HTTP API is open to anyone who reaches it: give --api-key")
                if task_status is not None:
                    task_status.started(node)
                freeze_startup_heap()  # full GC passes must not walk the libraries and the tokenizer
                await trio.sleep_forever()
