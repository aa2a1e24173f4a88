"""`p2pserve bootstrap`: start the head peer of a swarm."""

from __future__ import annotations

import logging
from functools import partial

import click

from p2pserve.heap import freeze_startup_heap
from p2pserve.cli.options import bind_text, check_bindable, config_option, plan_from_options, plan_options
from p2pserve.planner.planfile import bootstrap_settings
from p2pserve.net.protocols import DEFAULT_PORT, MAX_STREAM_INTERVAL, STREAM_INTERVAL


@click.command()
@config_option(bootstrap_settings)
@click.option("--peer", "join_peers", multiple=True, metavar="MULTIADDR",
              help="Start another head of the swarm a running head serves: its model and plan come from "
                   "there, its workers from the DHT (repeatable: tried in turn).")
@click.option("--listen", default=f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}", show_default=True,
              help="Multiaddr to listen on.")
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="The model this swarm serves (HF dir or .gguf; default: SmolLM2-135M-Instruct). "
                   "The bootstrap reads only its config and tokenizer.")
@plan_options
@click.option("--policy", type=click.Choice(["latency", "round-robin"]), default="latency", show_default=True,
              help="How a query picks among complete pipelines.")
@click.option("--http", "http_bind", default=None, metavar="[HOST:]PORT",
              help="Also serve the OpenAI-compatible API here: --http 8000 on 127.0.0.1 only, "
                   "--http 0.0.0.0:8000 on every interface (give it --api-key then).")
@click.option("--api-key", "api_keys", multiple=True, metavar="KEY",
              help="An API key the HTTP API accepts (Authorization: Bearer KEY); repeat for several. "
                   "Also read from --api-key-file and $P2PSERVE_API_KEYS (comma-separated). None: open.")
@click.option("--api-key-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A file of API keys, one per line (# comments).")
@click.option("--rate-limit", type=click.IntRange(min=1), default=None, metavar="N",
              help="HTTP requests per minute per API key (per client address without keys); more get 429.")
@click.option("--stream-interval", type=click.FloatRange(0, MAX_STREAM_INTERVAL), default=STREAM_INTERVAL,
              show_default=True, metavar="SECONDS",
              help="Stage 0 sends an answer's tokens at most this often (the first at once); the tokens "
                   "of one interval go in one frame. 0 sends each token as it comes.")
@click.option("--swarm-key", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Make the swarm private: only peers holding this key file (`p2pserve keygen`) connect.")
@click.option("--allow-peers", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A file of peer ids (one per line, # comments) admitted as workers; others are refused.")
@click.option("--admission-probe/--no-admission-probe", default=True, show_default=True,
              help="Give a new worker user traffic only once its chain answers a probe as admitted workers do.")
@click.option("--spot-check", "spot_check", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              metavar="RATE", help="The share of greedy and seeded answers checked as they stream: a second chain "
                                   "computes their first tokens alongside, a third settles a disagreement, a "
                                   "worker caught lying is banned and the answer goes on on an honest chain.")
@click.option("--home", default=None, help="State directory (default $P2PSERVE_HOME or ~/.p2pserve).")
@click.option("--verbose", is_flag=True, help="Show libp2p's own logs too.")
def bootstrap(join_peers, listen, model_path, hetero_config, pp_partition, policy, http_bind, api_keys, api_key_file,
              rate_limit, stream_interval, swarm_key, allow_peers, admission_probe, spot_check, home, verbose):
    """Start the head peer: DHT server, worker registry, router and query endpoint."""
    import trio

    from p2pserve.home import home_dir
    from p2pserve.net.host import read_peer_list, read_swarm_key

    from p2pserve.bootstrap.http import read_api_keys

    api_keys = read_api_keys(api_keys, api_key_file, http_bind)
    if http_bind:
        http_bind = bind_text(*check_bindable(http_bind, "--http"))  # one line before any banner
    elif rate_limit:
        raise click.UsageError("--rate-limit limits the HTTP API: give --http too")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    for operator_log in ("p2pserve.bootstrap", "p2pserve.http"):  # joins, leaves, bans, failovers, requests
        logging.getLogger(operator_log).setLevel(logging.INFO)
    trio.run(partial(serve, listen, model_path, hetero_config, pp_partition, policy, home_dir(home), verbose,
                     http_bind, stream_interval=stream_interval, api_keys=api_keys, rate_limit=rate_limit,
                     swarm_key=swarm_key and read_swarm_key(swarm_key),
                     allowed_peers=allow_peers and read_peer_list(allow_peers), admission_probe=admission_probe,
                     spot_check=spot_check, join_peers=join_peers))


async def join_swarm(host, peers: tuple[str, ...], config):
    """(the swarm's plan, (this head's certificate, its issuer), the reachable peers) from the first head
    of ``peers`` that answers; it must serve the same model."""
    from p2pserve.errors import ConfigError, NetworkError
    from p2pserve.net.host import connect, host_multiaddrs
    from p2pserve.net.wire import RemoteError
    from p2pserve.node.run import fetch_plan
    from p2pserve.plan import Plan

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
    from p2pserve.plan import Plan
    from p2pserve.engine.tp import split_evenly

    stages = min(stages, n_layers)
    return Plan([1] * stages, [b - a for a, b in split_evenly(n_layers, stages)])


async def serve(listen, model_path, hetero_config, pp_partition, policy, home, verbose=False,
                http_bind=None, task_status=None, *, stream_interval: float = STREAM_INTERVAL,
                api_keys: tuple[str, ...] = (), rate_limit: int | None = None,
                swarm_key: str | None = None, allowed_peers: frozenset[str] | None = None,
                admission_probe: bool = True, spot_check: float = 0.0, join_peers: tuple[str, ...] = ()):
    import trio

    from p2pserve.errors import ConfigError
    from p2pserve.home import write_bootstrap_addr
    from p2pserve.net.host import host_multiaddrs, own_identity, quiet_libp2p_logs, running_dht, running_host, serve_protocol
    from p2pserve.net.nat import serving_relay
    from p2pserve.net.protocols import ANNOUNCE, PLAN, QUERY, STATUS
    from p2pserve.engine.weights import open_weights

    from p2pserve.bootstrap.planning import Planning
    from p2pserve.bootstrap.server import Bootstrap

    quiet_libp2p_logs(verbose)
    source = open_weights(model_path)
    config = source.config
    explicit = plan_from_options(hetero_config, pp_partition)  # else: planned from the workers that join
    plan = explicit or default_plan(config.n_layers)
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
                             stream_interval=stream_interval, allowed_peers=allowed_peers)
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
                from p2pserve.bootstrap.discovery import discover_forever
                from p2pserve.bootstrap.integrity import Admission, SpotChecks

                nursery.start_soon(discover_forever, node, dht)
                if admission_probe:
                    nursery.start_soon(Admission(node).run)
                if spot_check > 0:
                    node.spot_checks = SpotChecks(node, spot_check)
                    nursery.start_soon(node.spot_checks.run)
                if http_bind:
                    from p2pserve.bootstrap.http import serve_http

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
