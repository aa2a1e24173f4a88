"""A worker's life: join, learn the plan, load its layers, serve, announce, leave cleanly."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import click
import trio

from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError, NetworkError, P2PServeError
from p2pserve.heap import freeze_startup_heap
from p2pserve.metrics import serve_worker_metrics
from p2pserve.net.host import (connect, host_multiaddrs, own_identity, pinned_identity, quiet_libp2p_logs,
                               running_dht, running_host, serve_protocol)
from p2pserve.net.nat import traversing_nat
from p2pserve.net.protocols import LINK, PLAN, RING, SESSION
from p2pserve.net.wire import read_frame, write_frame
from p2pserve.node.announce import announce_forever, make_record
from p2pserve.node.budget import max_sessions
from p2pserve.node.compute import compute_for
from p2pserve.node.sessions import StageServer
from p2pserve.plan import Plan
from p2pserve.planner.swarm import auto_request, device_entries, measure_devices
from p2pserve.progress import loading_bar
from p2pserve.ranks import world
from p2pserve.ranks.cores import CoreShare, machine_cores
from p2pserve.ranks.pipeline import kv_dtype_name, parse_dtype, parse_kv_dtype, weight_format
from p2pserve.ranks.stages import StagesSpec, open_runner

log = logging.getLogger("p2pserve.worker")

DRAIN_TIMEOUT = 30.0  # seconds a leaving worker gives its sessions to finish


@dataclass
class WorkerOptions:
    peer: str
    stage: str
    layers: str | None
    model_path: str | None
    devices: str
    group_id: str
    listen: str
    max_sessions: int | None
    max_seq_len: int
    dtype: str
    home: Path
    verbose: bool = False
    kv_dtype: str = "auto"  # --kv-dtype: the KV cache's (auto: the activations')
    kv_memory: str | None = None
    max_queue: int | None = None
    threads: int | None = None
    identity: Path | None = None  # pinned key file; else --group-id's, else the first free one
    swarm_key: str | None = None  # the private swarm's pre-shared key, 64 hex digits
    join_timeout: float = 300.0  # seconds to wait for a bootstrap that is not up yet
    metrics: str | None = None  # HOST:PORT to serve Prometheus metrics at
    token_path: str = "ring"  # how tokens reach this worker as stage 0 (protocols.TOKEN_PATHS)
    announce: tuple[str, ...] = ()  # --announce: addresses announced before the listen ones (port forwarding)


def parse_layers(text: str, n_layers: int) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise ConfigError(f"--layers {text!r}: expected A:B, e.g. --layers 0:15") from None
    if not 0 <= a < b <= n_layers:
        raise ConfigError(f"--layers {text}: need 0 <= A < B <= {n_layers}")
    return a, b


def choose_layers(opts: WorkerOptions, info: dict, n_layers: int) -> tuple[int, int, int, int]:
    """(stage index, start, end, tp) from --layers, --stage auto and the bootstrap's assignment,
    or --stage N and the published plan."""
    plan = Plan.from_dict(info["plans"][0])
    n_devices = len(opts.devices.split(","))
    if opts.layers:
        a, b = parse_layers(opts.layers, n_layers)
        return -1, a, b, n_devices
    if opts.stage == "auto":
        a = info.get("assignment")
        if not isinstance(a, dict) or not 0 <= a.get("start", -1) < a.get("end", -1) <= n_layers:
            raise ConfigError(f"--stage auto: the bootstrap assigned no layers ({a!r}); is it older than "
                              f"--stage auto? give --stage N or --layers A:B")
        return -1, int(a["start"]), int(a["end"]), int(a.get("tp", 1))
    try:
        index = int(opts.stage)
    except ValueError:
        raise ConfigError(f"--stage {opts.stage!r}: expected auto or a stage index 0..{plan.n_stages - 1}") from None
    if not 0 <= index < plan.n_stages:
        raise ConfigError(f"--stage {index}: the plan ({plan.flags()}) has stages 0..{plan.n_stages - 1}")
    s = plan.stages[index]
    return index, s.start, s.end, s.tp


def chain_stages(opts: WorkerOptions, info: dict) -> list[tuple[int, int, int]] | None:
    """``--stage 1,2``: the (start, end, tp) of each of several consecutive plan stages."""
    if "," not in opts.stage:
        return None
    plan = Plan.from_dict(info["plans"][0])
    try:
        indices = [int(x) for x in opts.stage.split(",")]
    except ValueError:
        raise ConfigError(f"--stage {opts.stage!r}: expected stage indices like 1,2") from None
    if any(b != a + 1 for a, b in zip(indices, indices[1:])) or not 0 <= indices[0] or indices[-1] >= plan.n_stages:
        raise ConfigError(f"--stage {opts.stage}: give consecutive stages of the plan ({plan.flags()}), "
                          f"e.g. --stage 0,1")
    return [(plan.stages[i].start, plan.stages[i].end, plan.stages[i].tp) for i in indices]


def device_list(devices: str, tp: int) -> list[str]:
    devs = [d.strip() for d in devices.split(",") if d.strip()]
    if devs == ["cpu"]:
        return ["cpu"] * tp
    if len(devs) != tp:
        raise ConfigError(f"this stage has TP degree {tp}: give {tp} devices in --devices, got {len(devs)}")
    return devs


def plan_request(opts: WorkerOptions, speeds) -> dict:
    """The PLAN request; a --stage auto worker adds its measured device, to be told where to serve."""
    if opts.stage != "auto" or opts.layers:
        return {"type": "plan"}
    # without --max-sessions the KV cache is sized after loading (node/budget.py): one must fit
    return {"type": "plan", "auto": auto_request(speeds[0], n_devices=len(speeds), dtype=opts.dtype,
                                                 kv_dtype=kv_dtype_name(opts.dtype, opts.kv_dtype),
                                                 max_sessions=opts.max_sessions or 1, max_seq_len=opts.max_seq_len)}


def trusted_heads(joined: str, info: dict) -> frozenset[str]:
    """Whose session tickets this worker honours: the head it joined through, and the heads
    that head names as the swarm's (the one that certified it)."""
    named = info.get("heads")
    named = [h for h in named if isinstance(h, str) and len(h) <= 128][:8] if isinstance(named, list) else []
    return frozenset({joined, *named})


def other_heads(info: dict) -> list[str]:
    """Multiaddrs of the swarm's other heads, as the joined head names them: where a worker
    behind a NAT reserves a second relay slot (net/nat.py: RelaySlots)."""
    named = info.get("other_heads")
    return [a for a in named if isinstance(a, str) and len(a) <= 512][:8] if isinstance(named, list) else []


async def fetch_plan(host, peer_id, request: dict | None = None) -> dict:
    stream = await host.new_stream(peer_id, [PLAN])
    await write_frame(stream, request or {"type": "plan"})
    info = await read_frame(stream, timeout=15)
    await stream.close()
    return info


async def wait_for_bootstrap(host, address: str, join_timeout: float):
    """Connect to the bootstrap, retrying with backoff (a worker may start first) for at most
    ``join_timeout`` seconds; one line on stderr says it waits."""
    deadline, delay = trio.current_time() + join_timeout, 0.5
    while True:
        try:
            return await connect(host, address, timeout=max(1.0, min(15.0, deadline - trio.current_time())))
        except NetworkError as e:
            if trio.current_time() + delay >= deadline:
                raise NetworkError(f"{e}; gave up after --join-timeout {join_timeout:g} s") from None
            if delay == 0.5:
                click.echo(f"waiting for the bootstrap ({e}); retrying for up to {join_timeout:g} s "
                           f"(--join-timeout)", err=True)
        await trio.sleep(delay)
        delay = min(delay * 2, 10.0)


async def run_worker(opts: WorkerOptions, task_status=trio.TASK_STATUS_IGNORED) -> None:
    quiet_libp2p_logs(opts.verbose)
    source = open_weights(opts.model_path)
    config = source.config
    # measured once per machine and cached: the bootstrap plans with these figures
    # Every torch computation of this process runs on one thread (see compute.py): the
    # loop's own on CPU, a compute thread on CUDA.
    device_names = [d.strip() for d in opts.devices.split(",") if d.strip()]
    compute = compute_for(device_names)
    speeds = await compute.run(partial(measure_devices, device_names))
    if opts.identity is not None or opts.group_id:
        key = pinned_identity(opts.identity or opts.home / f"worker-{opts.group_id}.key")
    else:
        key = own_identity(opts.home, "worker")
    async with running_host(key, [opts.listen], opts.swarm_key) as host:
        bootstrap_id = await wait_for_bootstrap(host, opts.peer, opts.join_timeout)
        info = await fetch_plan(host, bootstrap_id, plan_request(opts, speeds))
        if info.get("fingerprint") != config.fingerprint():
            raise P2PServeError(
                f"refusing to join: this swarm serves {info.get('model')} (fingerprint {info.get('fingerprint')}) "
                f"but --model {opts.model_path or 'default'} is {config.name} (fingerprint {config.fingerprint()}); "
                f"point --model at the same weights the bootstrap serves")
        chain = chain_stages(opts, info)
        if chain:  # several stages in this worker: torch.distributed between them, not libp2p
            stage, start, end, tp = int(opts.stage.split(",")[0]), chain[0][0], chain[-1][1], chain[0][2]
            devices = device_list(opts.devices, 1) * tp
            stages = tuple(chain)
            world_devices = device_list(opts.devices, 1) * sum(t for _, _, t in chain)
        else:
            stage, start, end, tp = choose_layers(opts, info, config.n_layers)
            devices = device_list(opts.devices, tp)
            stages = ((start, end, tp),)
            world_devices = devices
        # CPU workers of one machine divide its cores between them (ranks/cores.py)
        share = CoreShare(max(t for _, _, t in stages), opts.threads) if devices[0].startswith("cpu") else None
        spec = StagesSpec(opts.model_path and str(opts.model_path), stages, parse_dtype(opts.dtype),
                          world.World(tuple(world_devices)), opts.threads, quant=weight_format(opts.dtype),
                          kv_dtype=parse_kv_dtype(opts.kv_dtype), share_cores=share is not None)
        if share is not None:
            others = share.others()
            click.echo(f"{share.threads()} torch thread(s) per rank: {machine_cores()} cores"
                       + (f" shared with {others} rank(s) of other p2pserve workers on this machine"
                          if others else "") + (" (--threads)" if opts.threads else ", following as workers come and go"),
                       err=True)
        # before the weights load: a --kv-memory that holds no session fails at once
        sessions = opts.max_sessions or max_sessions(config, end - start, tp, opts.max_seq_len,
                                                     spec.kv_dtype or spec.dtype, devices[0], opts.kv_memory)
        kv = "" if spec.kv_dtype is None else f", KV cache {opts.kv_dtype}"
        click.echo(f"loading layers {start}-{end} of {config.name} (TP {tp} on {','.join(devices)}, {opts.dtype}{kv})…",
                   err=True)
        # a bar on a terminal only; a TP group's or several stages' other ranks load theirs meanwhile
        ranks = spec.world.size
        with loading_bar(f"loading layers {start}-{end}" + (f", rank 0 of {ranks}" if ranks > 1 else "")) as progress:
            runner, close_runner = await compute.run(partial(open_runner, spec, source, progress))
        try:
            await compute.run(partial(runner.allocate, sessions, opts.max_seq_len))
            server = StageServer(host, runner, model_name=config.name, fingerprint=config.fingerprint(),
                                 start=start, end=end, max_sessions=sessions, max_len=opts.max_seq_len,
                                 max_waiting=opts.max_queue, compute=compute,
                                 heads=trusted_heads(bootstrap_id.to_base58(), info), token_path=opts.token_path,
                                 threads=spec.thread_follower())
            await compute.run(server.executor.warm_up)
            serve_protocol(host, SESSION, server.handle)
            serve_protocol(host, LINK, server.handle_link)
            serve_protocol(host, RING, server.handle_ring)
            # measured again: the stage now runs with its own thread count (--threads, or
            # cores // TP), which the record's speed must reflect (cached per thread count)
            device_info = device_entries(await compute.run(partial(measure_devices, devices)), config, opts.dtype,
                                         kv_dtype_name(opts.dtype, opts.kv_dtype), first=start == 0,
                                         last=end == config.n_layers)

            def record():
                return make_record(host, server, stage=stage, tp=tp, devices=device_info,
                                   group_id=opts.group_id, addrs=reach.addrs)

            async def heads_named_by(head) -> list[str]:  # a head that joined after this worker, too
                return other_heads(await fetch_plan(host, head))

            # reachable directly, or behind a NAT through relay slots on the heads (a line says which;
            # reach.addrs follows the reservations as they are lost and made again)
            async with traversing_nat(host, bootstrap_id, opts.peer, host_multiaddrs(host), opts.announce,
                                      other_heads(info), heads_named_by) as reach, \
                    running_dht(host, server=True, bootstrap_peers=[opts.peer]) as dht:
                addrs = reach.addrs
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.serve)
                    if opts.metrics:
                        nursery.start_soon(serve_worker_metrics, opts.metrics, server, start, end)
                    announcing = trio.CancelScope()

                    async def keep_announcing():
                        with announcing:
                            await announce_forever(host, key, opts.peer, record, dht, reach.changed,
                                                  lambda: heads_named_by(bootstrap_id))

                    nursery.start_soon(keep_announcing)
                    freeze_startup_heap()  # full GC passes must not walk the model and libraries
                    click.echo(f"worker {host.get_id().to_base58()} serving layers {start}-{end} of {config.name} "
                               f"(TP {tp} on {','.join(devices)}, {sessions} sessions) at {addrs[0]}", err=True)
                    task_status.started(server)
                    await _wait_for_signal()
                    # Leave gracefully: closing the announce stream drops this worker from the
                    # bootstrap's view at once (no new sessions), then current sessions finish.
                    server.draining = True
                    announcing.cancel()
                    await _drain(server)
                    click.echo(f"worker {host.get_id().to_base58()} left the swarm", err=True)
                    nursery.cancel_scope.cancel()
        finally:
            close_runner()
            if share is not None:
                share.close()


async def _wait_for_signal() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            return


async def _drain(server) -> None:
    """Let current sessions finish (bounded by DRAIN_TIMEOUT)."""
    log.warning("leaving: %d sessions to finish", len(server.sessions))
    with trio.move_on_after(DRAIN_TIMEOUT):
        while server.sessions:
            await trio.sleep(0.1)
