"""`p2pserve plan`: the best plan for a model on the devices you have, as HexGen flags and TOML."""

from __future__ import annotations

from pathlib import Path

import click

from p2pserve.errors import ConfigError
from p2pserve.cli.options import KV_DTYPE_NAMES
from p2pserve.planner.cost import DTYPES, CostParams, Workload, dtype_named
from p2pserve.planner.devices import KV_SHARE, GiB, parse_devices, parse_link
from p2pserve.planner.planfile import dump_plan_toml
from p2pserve.planner.search import OBJECTIVES, SwarmPlan, plan_swarm
from p2pserve.planner.shapes import KNOWN_MODELS, resolve_model


@click.command("plan")
@click.option("--model", required=True, metavar="PATH_OR_NAME",
              help=f"A directory with config.json, a config.json, or one of: {', '.join(KNOWN_MODELS)}.")
@click.option("--devices", "devices_spec", required=True, metavar="SPEC",
              help="e.g. 4xA6000@m1,2xA5000@m2 or 2xcustom(mem=24GB,tflops=35,bw=900GB/s)@m3.")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default="fp16", show_default=True)
@click.option("--kv-dtype", type=click.Choice(KV_DTYPE_NAMES), default="auto", show_default=True,
              help="The workers' KV cache (their --kv-dtype; auto: the activations', fp32 for int8 and int4).")
@click.option("--objective", type=click.Choice(OBJECTIVES), default="latency", show_default=True,
              help="latency: per-token latency (then time to first token); throughput: tokens/s.")
@click.option("--prompt-len", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--output-len", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--sessions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Concurrent sessions over the whole swarm.")
@click.option("--inter-link", default="1.25GB/s,0.5ms", show_default=True, metavar="BW,LATENCY",
              help="The network between machines.")
@click.option("--train", "for_training", is_flag=True,
              help="Propose `p2pserve train` layouts instead (every device one rank).")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True, help="With --train.")
@click.option("--global-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="With --train: sequences per optimizer step.")
@click.option("--toml", "toml_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the plan here, for `p2pserve bootstrap --config FILE`.")
def plan(model, devices_spec, dtype, kv_dtype, objective, prompt_len, output_len, sessions, inter_link, for_training,
         seq_len, global_batch, toml_path):
    """Choose an asymmetric TP x PP plan for MODEL on the devices of a swarm."""
    config = resolve_model(model)
    devices = parse_devices(devices_spec)
    params = CostParams(network=parse_link(inter_link))
    if for_training:
        from p2pserve.planner.train import describe, plan_training

        proposals = plan_training(config, devices, seq_len=seq_len, global_batch=global_batch,
                                  params=CostParams(network=params.network, kv_share=0.0))
        for i, proposal in enumerate(proposals, 1):
            click.echo(f"layout {i}: " + "\n".join(describe(proposal)))
        return
    workload = Workload(prompt_len, output_len, sessions)
    found = plan_swarm(devices, config, dtype=dtype_named(dtype, kv_dtype), workload=workload, objective=objective,
                       params=params)
    # the bootstrap (--config) loads weights from `model`: a path stays one, absolute
    written_model = str(Path(model).expanduser().resolve()) if Path(model).expanduser().exists() else model
    toml = dump_plan_toml(found.report.pipelines, model=written_model, dtype=dtype, objective=objective)
    if toml_path is not None:
        try:
            toml_path.write_text(toml)
        except OSError as e:
            raise ConfigError(f"cannot write --toml {toml_path}: {e.strerror or e}") from None

    for i, p in enumerate(found.plans(), 1):
        click.echo(f"pipeline {i}: {p.flags()}")
    _print_table(found, config.name, dtype)
    r = found.report
    click.echo(f"predicted: time to first token {r.ttft * 1e3:.1f} ms, {r.token_latency * 1e3:.1f} ms per "
               f"token, {r.throughput:.1f} tokens/s at {sessions} session(s) "
               f"({'every grouping searched' if found.exhaustive else 'bounded search'})")
    if found.unused:
        click.echo("unused: " + ", ".join(_counted(d.label for d in found.unused)))
        for label, why in found.why_unused.items():
            click.echo(f"  {label}: {why}")
    click.echo(f"memory: {KV_SHARE:.0%} of each device is kept for the KV cache (a worker's default --kv-memory)")
    if toml_path is not None:
        click.echo(f"wrote {toml_path}")
    else:
        click.echo("\n" + toml, nl=False)


def _counted(labels) -> list[str]:
    labels = list(labels)
    return [f"{labels.count(x)}x{x}" for x in dict.fromkeys(labels)]


def _print_table(found: SwarmPlan, model_name: str, dtype: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model_name} ({dtype}), objective {found.objective}")
    for col in ("pipe", "stage", "machine", "devices", "layers", "memory GiB used/avail",
                "TTFT ms", "ms/token", "tokens/s"):
        table.add_column(col, justify="left" if col in ("machine", "devices") else "right")
    for i, p in enumerate(found.report.pipelines, 1):
        for j, s in enumerate(p.stages):
            pipe_figures = ([f"{p.ttft * 1e3:.1f}", f"{p.token_latency * 1e3:.1f}", f"{p.throughput:.1f}"]
                            if j == 0 else ["", "", ""])
            table.add_row(str(i) if j == 0 else "", str(j), s.group.machine,
                          ", ".join(_counted(k.name for k in s.group.kinds)),
                          f"{s.start}-{s.end - 1} ({s.n_layers})",
                          f"{s.memory_used / GiB:.1f} / {s.memory_available / GiB:.1f}", *pipe_figures)
    Console(width=120, highlight=False).print(table)
