"""Training that survives a rank's death: Oobleck's reconfiguration from templates.

When a rank dies mid-step, the step is taken by no one (``RankTrainer.step`` commits at
its last all-reduce over the world). The survivors' pieces and optimizer state stay
where they are; the layout is re-instantiated from the templates for the ranks still
alive, every rank of it cuts its pieces out of the survivors' (a tensor part the dead
rank held is held by the other pipelines, since each pipeline holds the whole model),
and training continues from the same step with the same global batches, now spread over
the surviving pipelines.

The ranks are threads of this process (``ThreadWorld``); a rank dies by raising.
"""

from __future__ import annotations

from collections.abc import Callable

from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError
from p2pserve.train import checkpoint
from p2pserve.train.comm import ThreadWorld
from p2pserve.train.data import TokenWindows
from p2pserve.train.layout import TrainLayout
from p2pserve.train.model import TrainStage
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
                committed = {trainers[r].step_index for r in alive}
                if len(committed) != 1:
                    raise RuntimeError(f"survivors disagree on the step taken: {sorted(committed)}") from e
                step = committed.pop()
                self.losses += losses[alive[0]]
                survivors = checkpoint.by_name([rec for r in alive for rec in checkpoint.records(trainers[r])])
                self.n_ranks -= 1
                if self.n_ranks < 1:
                    raise ConfigError("every rank died") from e
        return self.losses
