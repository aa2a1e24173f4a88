"""`p2pserve bootstrap`: start the head peer of a swarm."""

from __future__ import annotations

import logging
from functools import partial

import click

from p2pserve.cli.options import (
    ENGINE_DTYPES,
    bind_text,
    check_bindable,
    config_option,
    plan_from_options,
    plan_options,
)
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
@click.option("--worker-dtype", "worker_dtypes", multiple=True, type=click.Choice(ENGINE_DTYPES),
              help="Take only workers whose weights run in this dtype (repeatable; default: any). The "
                   "result checks compare chains of one precision, so a pin keeps every worker checkable.")
@click.option("--admission-probe/--no-admission-probe", default=True, show_default=True,
              help="Give a new worker user traffic only once its chain answers a probe as admitted workers do.")
@click.option("--spot-check", "spot_check", type=click.FloatRange(0, 1), default=0.05, show_default=True,
              metavar="RATE", help="The share of greedy and seeded answers checked as they stream: a second chain "
                                   "computes their first tokens alongside, a third settles a disagreement, a "
                                   "worker caught lying is banned and the answer goes on on an honest chain.")
@click.option("--home", default=None, help="State directory (default $P2PSERVE_HOME or ~/.p2pserve).")
@click.option("--verbose", is_flag=True, help="Show libp2p's own logs too.")
def bootstrap(join_peers, listen, model_path, hetero_config, pp_partition, policy, http_bind, api_keys, api_key_file,
              rate_limit, stream_interval, swarm_key, allow_peers, worker_dtypes, admission_probe, spot_check, home,
              verbose):
    """Start the head peer: DHT server, worker registry, router and query endpoint."""
    import trio  # here, not at the top: `p2pserve bootstrap --help` loads none of the runtime

    from p2pserve.bootstrap.http import read_api_keys
    from p2pserve.bootstrap.run import serve
    from p2pserve.home import home_dir
    from p2pserve.net.host import read_peer_list, read_swarm_key

    api_keys = read_api_keys(api_keys, api_key_file, http_bind)
    if http_bind:
        http_bind = bind_text(*check_bindable(http_bind, "--http"))  # one line before any banner
    elif rate_limit:
        raise click.UsageError("--rate-limit limits the HTTP API: give --http too")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    for operator_log in ("p2pserve.bootstrap", "p2pserve.http"):  # joins, leaves, bans, failovers, requests
        logging.getLogger(operator_log).setLevel(logging.INFO)
    trio.run(partial(serve, listen, model_path, plan_from_options(hetero_config, pp_partition), policy,
                     home_dir(home), verbose,
                     http_bind, stream_interval=stream_interval, api_keys=api_keys, rate_limit=rate_limit,
                     swarm_key=swarm_key and read_swarm_key(swarm_key),
                     allowed_peers=allow_peers and read_peer_list(allow_peers),
                     worker_dtypes=frozenset(worker_dtypes) or None, admission_probe=admission_probe,
                     spot_check=spot_check, join_peers=join_peers))
