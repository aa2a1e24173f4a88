"""One rank's training step: its pipeline's schedule, the gradient sum over pipelines,
clipping on the global norm, and the optimizer on its own pieces.

Exactness across unequal pipelines: a micro-batch's loss is the sum of its token losses
divided by the number of tokens in the whole optimizer step (every pipeline, every
accumulation round), and gradients are *summed* over pipelines. The total is then the
single-process mean loss, and its gradient the single-process gradient, for any mix of
batch sizes. Averaging each pipeline's mean instead weights a sample by the inverse of
its pipeline's batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from p2pserve.train.comm import Comm
from p2pserve.train.data import TokenWindows
from p2pserve.train.layout import TrainLayout
from p2pserve.train.model import TrainStage
from p2pserve.train.schedule import schedule
from p2pserve.train.sync import GradSync

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class OptimConfig:
    kind: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0  # SGD only
    max_grad_norm: float | None = None  # clip the global norm to this; None: no clipping


def make_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # Both are elementwise, so each rank stepping its own pieces is the full model's step.
    if cfg.kind == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.kind == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.kind!r}: use one of {', '.join(OPTIMIZERS)}")


def token_weight(layout: TrainLayout, pipeline: int, seq_len: int) -> float:
    """What one token's loss is multiplied by: one over the tokens of the optimizer step."""
    return 1.0 / (layout.global_batch * seq_len * layout.accum_iter)


class RankTrainer:
    def __init__(self, stage: TrainStage, layout: TrainLayout, comm: Comm, data: TokenWindows,
                 optim: OptimConfig, schedule_kind: str = "gpipe"):
        self.stage, self.layout, self.comm, self.data = stage, layout, comm, data
        self.role = stage.role
        self.pipe = layout.pipelines[self.role.pipeline]
        self.actions = schedule(schedule_kind, self.pipe.chunks, self.role.n_stages, self.role.stage)
        self.sync = GradSync(stage.config, layout, comm.rank)
        self.optim_config = optim
        self.optimizer = make_optimizer([p for _, p in stage.named_pieces()], optim)
        self.seq_len = data.windows.shape[1] - 1
        self.step_index = 0  # optimizer steps taken
        self.grad_norm = float("nan")  # of the last step's summed gradient, before clipping
        self.last_loss = float("nan")  # the mean token loss of the last step computed
        self.awaiting_norm = False  # the step's gradients are summed, its norm not yet known

    def step(self) -> float:
        """One optimizer step; returns its mean token loss (the same on every rank)."""
        loss = torch.zeros(1, dtype=torch.float64, device=self.stage.device)
        for a in range(self.layout.accum_iter):
            batch = self.data.global_batch(self.step_index * self.layout.accum_iter + a, self.layout.global_batch)
            offset = self.layout.batch_offset(self.role.pipeline)
            mine = batch[offset : offset + self.pipe.batch_size].to(self.stage.device)
            loss += self._run_schedule(mine.split(self.pipe.micro_batch))
        self.comm.finish()
        self.comm.all_reduce(loss, tuple(range(self.comm.world_size)))
        self.last_loss = float(loss)
        grads = {piece.name: self._grad(p) for piece, p in self.stage.named_pieces()}
        self.sync.sum_gradients(grads, self.comm)
        # The norm's all-reduce over the world is the step's commit point. A rank that dies
        # before adding its part to it leaves every survivor unstepped. One that dies after
        # can leave a ring all-reduce returned on some ranks and broken on others: those
        # hold their summed gradients (awaiting_norm) and finish the step with the norm
        # the others got (elastic.agree_on_step), so a step is taken by all or none.
        self.awaiting_norm = True
        self.finish_step(self.sync.global_norm(grads, self.comm))
        return self.last_loss

    def finish_step(self, grad_norm: float) -> None:
        """Take the optimizer step of the summed gradients, clipped by ``grad_norm`` (the whole
        model's, the same on every rank)."""
        if not self.awaiting_norm:
            raise RuntimeError(f"rank {self.comm.rank} holds no summed gradients of step {self.step_index + 1}")
        self.grad_norm = grad_norm
        if self.optim_config.max_grad_norm is not None:
            coef = self.optim_config.max_grad_norm / (grad_norm + 1e-6)
            if coef < 1.0:
                for _, p in self.stage.named_pieces():
                    self._grad(p).mul_(coef)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.awaiting_norm = False
        self.step_index += 1

    def _run_schedule(self, micro: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """This stage's share of one global batch; the sum of its scaled losses (last stage, TP rank 0)."""
        role, stage, comm = self.role, self.stage, self.comm
        weight = token_weight(self.layout, role.pipeline, self.seq_len)
        hidden = stage.config.hidden_size
        held: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}
        total = torch.zeros(1, dtype=torch.float64, device=stage.device)
        for kind, m in self.actions:
            tokens = micro[m]
            if kind == "F":
                if role.is_first:
                    x = stage.embed(tokens[:, :-1])
                else:
                    x = torch.empty(tokens.shape[0], self.seq_len, hidden, dtype=stage.dtype, device=stage.device)
                    comm.recv(x, role.prev_ranks[0])
                    x.requires_grad_(True)
                out = stage(x)
                if role.is_last:
                    out = stage.loss_sum(out, tokens[:, 1:]) * weight
                    if role.tp_rank == 0:
                        total += out.detach().double()
                elif role.tp_rank == 0:
                    for r in role.next_ranks:
                        comm.send(out, r)
                held[m] = (x, out)
            else:
                x, out = held.pop(m)
                if role.is_last:
                    out.backward()
                else:
                    grad = torch.empty_like(out)
                    comm.recv(grad, role.next_ranks[0])
                    out.backward(grad)
                if not role.is_first and role.tp_rank == 0:
                    for r in role.prev_ranks:
                        comm.send(x.grad, r)
        return total

    @staticmethod
    def _grad(p: torch.nn.Parameter) -> torch.Tensor:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        return p.grad
