"""The plan file: what `p2pserve plan --toml` writes and the bootstrap reads.

    model = "llama-2-70b"
    dtype = "fp16"

    [[pipeline]]
    hetero_config = [4, 2, 2]
    pp_partition = [44, 20, 16]
    devices = [["A6000@m1", "A6000@m1", "A6000@m1", "A6000@m1"], ["A5000@m2", "A5000@m2"], ["A4000@m3", "A4000@m3"]]

One ``[[pipeline]]`` table per replica; ``devices`` (optional) names each stage's TP
group, one ``KIND@MACHINE`` per rank. ``model`` is what ``plan --model`` was given (a path
made absolute, or a planner name). ``p2pserve bootstrap --config FILE`` reads this file,
and any bootstrap option beside it (``bootstrap_settings``).
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from p2pserve.errors import ConfigError
from p2pserve.plan import Plan


def dump_plan_toml(pipelines, *, model: str, dtype: str, objective: str) -> str:
    """``pipelines``: PipelineReports (``SwarmPlan.report.pipelines``)."""
    q = json.dumps  # a JSON string is a valid TOML basic string for these labels
    lines = [f"# p2pserve plan, objective {objective}; serve it with: p2pserve bootstrap --config FILE",
             f"model = {q(model)}", f"dtype = {q(dtype)}"]
    for p in pipelines:
        plan = p.to_plan()
        devices = ", ".join("[" + ", ".join(q(d.label) for d in s.group.devices) + "]" for s in p.stages)
        lines += ["", "[[pipeline]]",
                  f"hetero_config = {list(plan.hetero_config)}",
                  f"pp_partition = {list(plan.pp_partition)}",
                  f"devices = [{devices}]"]
    return "\n".join(lines) + "\n"


def load_plan_toml(path) -> list[Plan]:
    """One Plan per ``[[pipeline]]``; ConfigError naming the file and the bad table."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read plan file {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"plan file {path} is not valid TOML: {e}") from None
    return plans_of(data.get("pipeline"), f"plan file {path}")


def plans_of(tables, where: str) -> list[Plan]:
    """The ``[[pipeline]]`` tables of a plan file as Plans, checked."""
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{where} has no [[pipeline]] tables: write one per replica "
                          f"with hetero_config and pp_partition")
    plans = []
    for i, t in enumerate(tables, 1):
        here = f"{where}, pipeline {i}"
        if not isinstance(t, dict) or "hetero_config" not in t or "pp_partition" not in t:
            raise ConfigError(f"{here}: needs hetero_config = [..] and pp_partition = [..]")
        try:
            plan = Plan(t["hetero_config"], t["pp_partition"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{here}: hetero_config and pp_partition must be lists of integers ({e})") from None
        except ConfigError as e:
            raise ConfigError(f"{here}: {e}") from None
        devices = t.get("devices")
        if devices is not None:
            ok = (isinstance(devices, list) and len(devices) == plan.n_stages
                  and all(isinstance(d, list) and len(d) == tp for d, tp in zip(devices, plan.hetero_config)))
            if not ok:
                raise ConfigError(f"{here}: devices must list one group per stage with one device per "
                                  f"TP rank ({list(plan.hetero_config)})")
        plans.append(plan)
    layers = {p.n_layers for p in plans}
    if len(layers) > 1:
        raise ConfigError(f"{where}: pipelines cover different layer counts {sorted(layers)}; "
                          f"every replica must hold the whole model")
    return plans


def bootstrap_settings(data: dict, path) -> tuple[dict, list[str]]:
    """A ``bootstrap --config`` file as bootstrap options, and notes for the operator.

    The file is a plan file (what ``plan --toml`` writes) plus any bootstrap option
    (``listen``, ``http``, ``policy``, …). Its first ``[[pipeline]]`` becomes the published
    plan (``--hetero-config``/``--pp-partition``); a replica with another layout joins with
    ``worker --layers A:B``. ``dtype`` is the workers' (``worker --dtype``), not the
    bootstrap's; ``model`` must be the weights' path, which a planner name is not."""
    from p2pserve.planner.shapes import KNOWN_MODELS

    data = dict(data)
    notes = []
    where = f"--config {path}"
    tables = data.pop("pipeline", None)
    data.pop("dtype", None)
    if tables is not None:
        if "hetero_config" in data or "pp_partition" in data:
            raise ConfigError(f"{where}: give the plan either as [[pipeline]] tables or as "
                              f"hetero_config/pp_partition, not both")
        plans = plans_of(tables, where)
        data["hetero_config"], data["pp_partition"] = list(plans[0].hetero_config), list(plans[0].pp_partition)
        for i, p in enumerate(plans[1:], 2):
            if p != plans[0]:
                ranges = " ".join(f"--layers {s.start}:{s.end}" for s in p.stages)
                notes.append(f"pipeline {i} ({p.flags()}) is not the published plan: "
                             f"join its workers with {ranges}")
    model = data.get("model")
    if isinstance(model, str) and model.strip().lower() in KNOWN_MODELS and not Path(model).expanduser().exists():
        raise ConfigError(f"{where}: model = {model!r} is the planner's name for the model's shape; set model "
                          f"to the path of its weights (a Hugging Face directory or a .gguf file)")
    return data, notes
