"""Several consecutive stages inside one worker, as one runner.

A worker that holds stages i..j (``p2pserve worker --stage 1,2``) runs them in one
torch.distributed world of its own: this process leads stage i, a child process leads
each later stage, more children fill each stage's TP group. Activations go from stage
to stage with point-to-point send/recv (gloo on CPU, NCCL on CUDA), never through
libp2p; the last local stage's output comes back to this process. To the worker's
server and batcher the chain looks like one stage: ``forward(batch, x)``.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from p2pserve.errors import P2PServeError
from p2pserve.engine.build import load_stage
from p2pserve.ranks.shm import all_reduce_for
from p2pserve.engine.model import Batch
from p2pserve.plan import Plan
from p2pserve.ranks.stage import OP_ALLOC, OP_STEP, OP_STOP, StageRunner, follow
from p2pserve.ranks.tpgroup import stop_ranks
from p2pserve.engine.weights import open_weights


@dataclass
class ChainSpec:
    model_path: str | None
    stages: list[tuple[int, int, int]]  # (start, end, tp) of each local stage, in order
    dtype: torch.dtype
    device: str
    threads: int
    init_method: str

    @property
    def plan(self) -> Plan:  # the local world laid out as a plan: global ranks stage after stage
        return Plan([tp for _, _, tp in self.stages], [e - s for s, e, _ in self.stages])


def _setup(rank: int, spec: ChainSpec):
    """Join the local world, create every stage's TP group, load this rank's shard."""
    torch.set_num_threads(spec.threads)
    device = spec.device
    if device.startswith("cuda"):
        device = f"cuda:{rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    plan = spec.plan
    dist.init_process_group(backend, init_method=spec.init_method, rank=rank, world_size=plan.world_size,
                            timeout=datetime.timedelta(minutes=10))
    groups = [dist.new_group(list(s.ranks)) if s.tp > 1 else None for s in plan.stages]
    local = plan.stage_of_rank(rank)
    start, end, tp = spec.stages[local.index]
    model = load_stage(open_weights(spec.model_path), start, end, rank=rank - local.first_rank, tp=tp,
                       all_reduce=all_reduce_for(groups[local.index], device), device=device, dtype=spec.dtype)
    return plan, local, groups[local.index], model


def _header(op: int, a: int = 0, b: int = 0, device="cpu") -> torch.Tensor:
    return torch.tensor([op, a, b], dtype=torch.int64, device=device)


def _relay(plan: Plan, local, runner: StageRunner) -> None:
    """Leader of a later local stage: run each batch that comes down, pass it on (or back)."""
    stages = plan.stages
    prev = stages[local.index - 1].first_rank
    nxt = stages[local.index + 1].first_rank if local.index + 1 < len(stages) else 0
    model, device = runner.model, runner.model.device
    header = torch.empty(3, dtype=torch.int64, device=device)
    while True:
        dist.recv(header, prev)
        op, a, b = header.tolist()
        if op != OP_STEP and nxt != 0:
            dist.send(header, nxt)
        if op == OP_STOP:
            runner.stop()
            return
        if op == OP_ALLOC:
            runner.allocate(a, b)
            continue
        size, n_tokens = a, b
        meta = torch.empty(2 * size, dtype=torch.int64, device=device)
        dist.recv(meta, prev)
        x = torch.empty(size, n_tokens, model.config.hidden_size, dtype=model.dtype, device=device)
        dist.recv(x, prev)
        m = meta.tolist()
        out = runner.forward(Batch(tuple(m[:size]), tuple(m[size:]), n_tokens), x)
        if nxt != 0:
            dist.send(header, nxt)
            dist.send(meta, nxt)
        dist.send(out.contiguous(), nxt)


def _child_main(rank: int, spec: ChainSpec) -> None:
    plan, local, group, model = _setup(rank, spec)
    if rank != local.first_rank:
        follow(model, group, local.first_rank)
    else:
        _relay(plan, local, StageRunner(model, group, local.first_rank))
    dist.destroy_process_group()


class ChainModel:
    """What the server asks of a runner's model, for a chain of local stages."""

    def __init__(self, first, config, n_layers_total: int, start: int, end: int):
        self.config, self._first = config, first
        self.start, self.end = start, end
        self.is_first = start == 0
        self.is_last = end == n_layers_total
        self.device, self.dtype = first.device, first.dtype


class ChainRunner:
    """Runs local stages i..j as one: ``forward(batch, x)`` through all of them."""

    def __init__(self, model_path, stages: list[tuple[int, int, int]], dtype: torch.dtype, device: str = "cpu"):
        from p2pserve.ranks.pipeline import free_port

        if any(stages[k][1] != stages[k + 1][0] for k in range(len(stages) - 1)):
            raise P2PServeError(f"the stages of one worker must be consecutive, got {stages}")
        spec = ChainSpec(None if model_path is None else str(model_path), stages, dtype, device,
                         max(1, (os.cpu_count() or 1) // max(tp for _, _, tp in stages)),
                         f"tcp://127.0.0.1:{free_port()}")
        self.plan = spec.plan
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_child_main, args=(r, spec), daemon=True)
                      for r in range(1, self.plan.world_size)]
        for p in self.procs:
            p.start()
        _, local, group, model = _setup(0, spec)
        self.first = StageRunner(model, group, 0)
        self.next_leader = self.plan.stages[1].first_rank if self.plan.n_stages > 1 else None
        self.last_leader = self.plan.stages[-1].first_rank
        config = model.config
        self.model = ChainModel(model, config, config.n_layers, stages[0][0], stages[-1][1])
        self._device = model.device

    @property
    def max_len(self) -> int:
        return self.first.max_len

    def allocate(self, n_slots: int, max_len: int) -> None:
        self.first.allocate(n_slots, max_len)
        if self.next_leader is not None:
            dist.send(_header(OP_ALLOC, n_slots, max_len, self._device), self.next_leader)

    @torch.inference_mode()
    def forward(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        out = self.first.forward(batch, x)
        if self.next_leader is None:
            return out
        dist.send(_header(OP_STEP, batch.size, batch.n_tokens, self._device), self.next_leader)
        dist.send(torch.tensor(batch.slots + batch.starts, dtype=torch.int64, device=self._device), self.next_leader)
        dist.send(out.contiguous(), self.next_leader)
        cfg = self.model.config
        shape = (batch.size, cfg.vocab_size) if self.model.is_last else (batch.size, batch.n_tokens, cfg.hidden_size)
        dtype = torch.float32 if self.model.is_last else self.model.dtype
        result = torch.empty(shape, dtype=dtype, device=self._device)
        dist.recv(result, self.last_leader)
        return result

    def stop(self) -> None:
        if self.next_leader is not None:
            dist.send(_header(OP_STOP, device=self._device), self.next_leader)
        self.first.stop()

    def close(self) -> None:
        stop_ranks(self.procs, self.stop)
        self.procs = []
