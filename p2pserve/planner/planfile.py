"""The plan file: what `p2pserve plan --toml` writes and the bootstrap reads.

    model = "llama-2-70b"
    dtype = "fp16"

    [[pipeline]]
    hetero_config = [4, 2, 2]
    pp_partition = [44, 20, 16]
    devices = [["A6000@m1", "A6000@m1", "A6000@m1", "A6000@m1"], ["A5000@m2", "A5000@m2"], ["A4000@m3", "A4000@m3"]]

One ``[[pipeline]]`` table per replica; ``devices`` (optional) names each stage's TP
group, one ``KIND@MACHINE`` per rank.
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
    lines = [f"# p2pserve plan, objective {objective}", f"model = {q(model)}", f"dtype = {q(dtype)}"]
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
    tables = data.get("pipeline")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"plan file {path} has no [[pipeline]] tables: write one per replica "
                          f"with hetero_config and pp_partition")
    plans = []
    for i, t in enumerate(tables, 1):
        where = f"plan file {path}, pipeline {i}"
        if not isinstance(t, dict) or "hetero_config" not in t or "pp_partition" not in t:
            raise ConfigError(f"{where}: needs hetero_config = [..] and pp_partition = [..]")
        try:
            plan = Plan(t["hetero_config"], t["pp_partition"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: hetero_config and pp_partition must be lists of integers ({e})") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        devices = t.get("devices")
        if devices is not None:
            ok = (isinstance(devices, list) and len(devices) == plan.n_stages
                  and all(isinstance(d, list) and len(d) == tp for d, tp in zip(devices, plan.hetero_config)))
            if not ok:
                raise ConfigError(f"{where}: devices must list one group per stage with one device per "
                                  f"TP rank ({list(plan.hetero_config)})")
        plans.append(plan)
    layers = {p.n_layers for p in plans}
    if len(layers) > 1:
        raise ConfigError(f"plan file {path}: pipelines cover different layer counts {sorted(layers)}; "
                          f"every replica must hold the whole model")
    return plans
