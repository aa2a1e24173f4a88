"""Training that survives a rank's death: Oobleck's reconfiguration from templates.

When a rank dies mid-step, the step is taken by all survivors or by none
(``RankTrainer.step`` commits at its last all-reduce over the world, and a rank whose side
of it broke after the others' returned finishes the step with their norm:
``agree_on_step``). The survivors' pieces and optimizer state stay
where they are; the layout is re-instantiated from the templates for the ranks still
alive, every rank of it cuts its pieces out of the survivors' (a tensor part the dead
rank held is held by the other pipelines, since each pipeline holds the whole model),
and training continues from the same step with the same global batches, now spread over
the surviving pipelines.

Two forms of the same job: ``run_elastic`` (``p2pserve train --templates``), whose ranks
are processes that outlive their world: a killed rank breaks the survivors' collectives
(gloo reports a reset connection within moments), they leave that world, and the
launcher gives each its place in the next one, with the survivors' state; and
``ElasticJob``, the ranks as threads of one process (``ThreadWorld``), a rank dying by
raising, for fast tests of the reconfiguration itself.
"""

from __future__ import annotations

import gc
import io
import multiprocessing as mp
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2pserve.engine.weights import open_weights
from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError, P2PServeError
from p2pserve.ranks import world
from p2pserve.train import checkpoint
from p2pserve.train.comm import DistComm, ThreadWorld
from p2pserve.train.data import TokenWindows
from p2pserve.train.launch import exit_when_orphaned
from p2pserve.train.layout import TrainLayout
from p2pserve.train.model import TrainStage
from p2pserve.train.sync import collective_groups
from p2pserve.train.templates import PipelineTemplate, instantiate
from p2pserve.train.trainer import OptimConfig, RankTrainer


class RankDied(RuntimeError):
    """Rank ``rank`` is gone; the job reconfigures around it."""

    def __init__(self, rank: int):
        super().__init__(f"rank {rank} died")
        self.rank = rank


class ElasticJob:
    def __init__(self, model_path, templates: list[PipelineTemplate], n_ranks: int, global_batch: int,
                 micro_batch: int, data: TokenWindows, optim: OptimConfig, schedule_kind: str = "1f1b"):
        self.model_path, self.templates = model_path, templates
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.data, self.optim, self.schedule_kind = data, optim, schedule_kind
        self.n_ranks = n_ranks
        self.layouts: list[TrainLayout] = []  # every layout the job ran under, in order
        self.losses: list[float] = []
        self.final_pieces: list = []  # each rank's (piece, value) once training ends

    def run(self, steps: int, on_start: Callable[[int, RankTrainer], None] | None = None) -> list[float]:
        """Train until ``steps`` optimizer steps are taken; the loss of each. ``on_start(rank,
        trainer)`` is called on every rank of every layout before it trains (tests kill ranks there)."""
        survivors: dict[str, list[dict]] | None = None
        step = 0
        while step < steps:
            layout = instantiate(self.templates, self.n_ranks, self.global_batch, self.micro_batch)
            self.layouts.append(layout)
            trainers: dict[int, RankTrainer] = {}
            losses: dict[int, list[float]] = {}

            def rank_main(comm, layout=layout, state=survivors, start=step):
                stage = TrainStage.load(open_weights(self.model_path), layout.role(comm.rank), comm)
                trainer = RankTrainer(stage, layout, comm, self.data, self.optim, self.schedule_kind)
                if state is not None:
                    checkpoint.restore(trainer, state, start)
                trainers[comm.rank] = trainer
                losses[comm.rank] = []
                if on_start is not None:
                    on_start(comm.rank, trainer)
                while trainer.step_index < steps:
                    losses[comm.rank].append(trainer.step())

            world = ThreadWorld(layout.world_size)
            try:
                world.run(rank_main, timeout=None)
                self.losses += losses[0]
                self.final_pieces = [[(piece, p.detach().clone()) for piece, p in trainers[r].stage.named_pieces()]
                                     for r in sorted(trainers)]
                return self.losses
            except RankDied as e:
                alive = [r for r in sorted(trainers) if r != e.rank]
                step, behind = agree_on_step(
                    {r: (trainers[r].step_index, trainers[r].awaiting_norm, trainers[r].grad_norm) for r in alive})
                for r, norm in behind.items():
                    trainers[r].finish_step(norm)
                    losses[r].append(trainers[r].last_loss)
                self.losses += losses[alive[0]]
                survivors = checkpoint.by_name([rec for r in alive for rec in checkpoint.records(trainers[r])])
                self.n_ranks -= 1
                if self.n_ranks < 1:
                    raise ConfigError("every rank died") from e
        return self.losses


def agree_on_step(survivors: dict[int, tuple[int, bool, float]]) -> tuple[int, dict[int, float]]:
    """The step the survivors of a death go on from, and the norm each rank one step behind
    must finish its step with first (``RankTrainer.finish_step``).

    ``survivors``: each rank's steps taken, whether its summed gradients await their norm,
    and its last step's norm. A rank that returned from the norm's all-reduce took the step;
    one whose side of it broke holds the gradients every rank summed, so the norm the first
    got is the one it would have got."""
    taken = {steps for steps, _, _ in survivors.values()}
    ahead = max(taken)
    behind = [r for r, (steps, _, _) in survivors.items() if steps < ahead]
    if behind and (min(taken) != ahead - 1 or not all(survivors[r][1] for r in behind)):
        raise P2PServeError(f"the surviving ranks disagree on the steps taken: {sorted(taken)}")
    norm = next(n for steps, _, n in survivors.values() if steps == ahead)
    return ahead, {r: norm for r in behind}


# ---- ranks as processes -------------------------------------------------------------------

REPORT_TIMEOUT = 300.0  # seconds the survivors of a death have to leave their broken world


@dataclass(frozen=True)
class ElasticSpec:
    """What every rank of an elastic job needs, sent to its process."""

    model_path: str | None
    templates: tuple[PipelineTemplate, ...]
    global_batch: int
    micro_batch: int
    data: TokenWindows
    optim: OptimConfig
    schedule_kind: str
    steps: int
    resume_dir: Path | None = None
    save_dir: Path | None = None


@dataclass
class ElasticRun:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    layouts: list[TrainLayout] = field(default_factory=list)  # every layout the job ran under, in order
    final_pieces: dict[int, list[dict]] = field(default_factory=dict)  # the last layout's records, by rank
    seconds: float = 0.0


def run_elastic(spec: ElasticSpec, n_ranks: int, config: ModelConfig, *, device: str = "cpu",
                threads: int | None = None, on_step: Callable[[int, float, dict[int, int]], None] | None = None,
                say: Callable[[str], None] = lambda line: None) -> ElasticRun:
    """Train ``spec`` on ``n_ranks`` rank processes of this machine, re-instantiating the
    layout from the templates whenever a rank dies. ``on_step(step, loss, pids)`` after
    each optimizer step (``pids``: the live ranks' process ids by rank); ``say`` gets one
    line per reconfiguration."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    orders = [ctx.Queue() for _ in range(n_ranks)]
    devices = world.rank_devices(device, n_ranks)  # a rank keeps its device across worlds
    threads = threads or world.default_threads(n_ranks)
    procs = [ctx.Process(target=_elastic_rank, args=(slot, spec, devices[slot], threads, orders[slot], results,
                                                     os.getpid()), daemon=True) for slot in range(n_ranks)]
    for p in procs:
        p.start()
    run, alive, step, state, losses = ElasticRun(), list(range(n_ranks)), 0, None, {}
    started = time.perf_counter()
    try:
        while True:
            layout = instantiate(list(spec.templates), len(alive), spec.global_batch, spec.micro_batch)
            if run.layouts:
                say(f"going on from step {step} on {len(alive)} ranks: {' + '.join(map(str, layout.pipelines))}")
            run.layouts.append(layout)
            init = f"tcp://127.0.0.1:{world.free_port()}"
            groups = tuple(collective_groups(config, layout))
            for rank, slot in enumerate(alive):
                orders[slot].put(("run", rank, layout, init, groups, step, state))
            reports, dead, deadline = {}, [], None
            while len(reports) + len(dead) < len(alive):
                try:
                    slot, kind, *payload = results.get(timeout=0.2)
                except queue.Empty:
                    for slot in alive:
                        if slot not in reports and slot not in dead and not procs[slot].is_alive():
                            dead.append(slot)
                            deadline = deadline or time.monotonic() + REPORT_TIMEOUT
                            say(f"rank {alive.index(slot)} of {len(alive)} {_how_it_ended(procs[slot])}")
                    if deadline is not None and time.monotonic() > deadline:
                        raise P2PServeError("the surviving ranks did not leave their broken world within "
                                            f"{REPORT_TIMEOUT:g} s") from None
                    continue
                if kind == "step":
                    losses[payload[0]] = payload[1]
                    if on_step is not None:
                        on_step(payload[0], payload[1], {r: procs[s].pid for r, s in enumerate(alive) if s not in dead})
                else:
                    reports[slot] = (kind, *payload)
            if not dead:
                failures = [detail for kind, _, _, detail, *_ in reports.values() if kind == "failed"]
                if failures:
                    raise P2PServeError(f"a rank of the training world failed: {failures[0]}")
                run.final_pieces = {rank: torch.load(io.BytesIO(reports[slot][2]), weights_only=False)
                                    for rank, slot in enumerate(alive)}
                break
            survivors = [slot for slot in alive if slot not in dead]
            if not survivors:
                raise ConfigError("every rank died")
            step, behind = agree_on_step({slot: (reports[slot][1], *reports[slot][4:6]) for slot in survivors})
            if behind:
                say(f"ranks {sorted(alive.index(slot) for slot in behind)} lost step {step}'s commit all-reduce "
                    "as others returned from it: they finish the step with its norm")
            for slot, norm in behind.items():
                orders[slot].put(("finish", norm))
            pending = set(behind)
            while pending:
                try:
                    slot, kind, *payload = results.get(timeout=REPORT_TIMEOUT)
                except queue.Empty:
                    raise P2PServeError(f"ranks {sorted(pending)} did not finish step {step} within "
                                        f"{REPORT_TIMEOUT:g} s") from None
                if kind == "step":
                    losses[payload[0]] = payload[1]
                else:
                    reports[slot] = (kind, *payload)
                    pending.discard(slot)
            # every survivor's pieces and optimizer state, for the next world to cut its own from
            records = [r for slot in survivors for r in torch.load(io.BytesIO(reports[slot][2]), weights_only=False)]
            state = _to_bytes(records) if records else None  # none: no rank had loaded yet
            losses = {k: v for k, v in losses.items() if k <= step}
            alive = survivors
    finally:
        for slot in alive:
            orders[slot].put(("stop",))
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    run.losses = [losses[k] for k in sorted(losses)]
    run.seconds = time.perf_counter() - started
    return run


def _how_it_ended(proc) -> str:
    code = proc.exitcode
    return f"was killed ({signal.Signals(-code).name})" if code is not None and code < 0 else f"exited ({code})"


def _to_bytes(value) -> bytes:
    # Bytes, not tensors, cross the queues: torch would share a tensor's memory through a
    # handle that the sending process must outlive.
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _elastic_rank(slot: int, spec: ElasticSpec, device: str, threads: int, orders, results, parent: int) -> None:
    threading.Thread(target=exit_when_orphaned, args=(parent,), daemon=True).start()
    source = open_weights(spec.model_path)
    trainer: RankTrainer | None = None  # the one of the last world: its state is the committed step's
    rank = 0
    while True:
        order = orders.get()
        if order[0] == "stop":
            break
        if order[0] == "finish":  # the step whose norm this rank's broken all-reduce lost
            trainer.finish_step(order[1])
            if rank == 0:
                results.put((slot, "step", trainer.step_index, trainer.last_loss))
            results.put((slot, "finished", trainer.step_index, _to_bytes(checkpoint.records(trainer)), "",
                         trainer.awaiting_norm, trainer.grad_norm))
            continue
        _, rank, layout, init, groups, step, state = order
        kind, detail, comm = "done", "", None
        try:
            device = world.join(world.World((device,) * layout.world_size, init), rank, threads)
            comm = DistComm(dict(zip(groups, world.new_groups(groups))), device)
            fresh = RankTrainer(TrainStage.load(source, layout.role(rank), comm), layout, comm, spec.data,
                                spec.optim, spec.schedule_kind)
            if state is not None:
                checkpoint.restore(fresh, checkpoint.by_name(torch.load(io.BytesIO(state), weights_only=False)), step)
            elif spec.resume_dir is not None:
                checkpoint.load(spec.resume_dir, fresh)
            trainer = fresh
            while trainer.step_index < spec.steps:
                loss = trainer.step()
                if rank == 0:
                    results.put((slot, "step", trainer.step_index, loss))
            if spec.save_dir is not None:
                checkpoint.save(spec.save_dir, trainer, layout.to_dict())
        except Exception as e:  # a dead peer's reset connection, mostly: the launcher decides
            kind, detail = "failed", f"{type(e).__name__}: {e}"
        finally:
            if comm is not None:
                comm.close()
            world.leave()
            gc.collect()  # the failed step's graph may hold the last references to the groups
        committed = trainer.step_index if trainer is not None else step
        records = checkpoint.records(trainer) if trainer is not None else []
        awaiting, norm = (trainer.awaiting_norm, trainer.grad_norm) if trainer is not None else (False, float("nan"))
        results.put((slot, kind, committed, _to_bytes(records), detail, awaiting, norm))
    results.close()
    results.join_thread()
    os._exit(0)  # the interpreter's teardown after gloo takes seconds nobody waits for
