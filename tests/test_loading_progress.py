"""The bytes a stage has loaded, reported as it loads (``load_stage(progress=...)``) and drawn
as a bar on a terminal only (``p2pserve/progress.py``, `p2pserve run`, `p2pserve worker`)."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch
from rich.console import Console

from p2pserve.engine.build import load_stage
from p2pserve.engine.weights import open_weights
from p2pserve.plan import Plan
from p2pserve.progress import loading_bar
from p2pserve.ranks.pipeline import LocalPipeline
from tests.tiny import make_tiny_llama, make_tiny_qwen2, make_tiny_qwen3


def reports(source, *args, **kwargs) -> list[tuple[int, int]]:
    calls = []
    load_stage(source, *args, progress=lambda done, total: calls.append((done, total)), **kwargs)
    return calls


def assert_monotone_to_total(calls: list[tuple[int, int]]) -> int:
    total = calls[0][1]
    assert total > 0 and calls[0] == (0, total)
    assert all(t == total for _, t in calls)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == total
    return total


def test_a_whole_one_rank_stage_reports_every_byte_of_the_checkpoint(tmp_path):
    path = make_tiny_llama(tmp_path / "llama")
    source = open_weights(path)
    calls = reports(source, 0, source.config.n_layers)
    total = assert_monotone_to_total(calls)
    # one call per tensor read, and the total is the checkpoint's fp32 bytes, every tensor once
    assert len(calls) == len(source.reads) + 1
    index = json.loads((path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (path / "model.safetensors").read_bytes()[:8], "little")])
    values = sum(torch.Size(v["shape"]).numel() for k, v in index.items() if k != "__metadata__")
    assert total == 4 * values


@pytest.mark.parametrize("build, kwargs", [
    (make_tiny_qwen2, {"start": 0, "end": 4, "rank": 1, "tp": 2}),  # q/k/v biases, a tied head
    (make_tiny_qwen3, {"start": 1, "end": 4}),  # q/k norms, the last stage's head
    (make_tiny_llama, {"start": 0, "end": 2, "dtype": torch.bfloat16}),
    (make_tiny_llama, {"start": 0, "end": 4, "quant": "int8"}),
    (make_tiny_llama, {"start": 2, "end": 4, "quant": "int4"}),
])
def test_progress_is_monotone_and_ends_at_the_total(tmp_path, build, kwargs):
    source = open_weights(build(tmp_path / "model"))
    start, end = kwargs.pop("start"), kwargs.pop("end")
    calls = reports(source, start, end, **kwargs)
    assert_monotone_to_total(calls)
    assert len(calls) == len(source.reads) + 1


def test_a_tp_rank_loads_its_share(tmp_path):
    source = open_weights(make_tiny_llama(tmp_path / "llama"))
    whole = reports(source, 1, 3)[-1][1]
    halves = [reports(source, 1, 3, rank=r, tp=2)[-1][1] for r in (0, 1)]
    # the linear weights split in two; each rank holds every norm (2 x 64 values a layer)
    assert halves[0] == halves[1] == (whole - 2 * 2 * 64 * 4) // 2 + 2 * 2 * 64 * 4


def test_the_bar_is_drawn_on_a_terminal_and_nothing_elsewhere(tmp_path):
    source = open_weights(make_tiny_llama(tmp_path / "llama"))
    total = reports(source, 0, 4)[-1][1]
    terminal = io.StringIO()
    with loading_bar("loading layers 0-4", Console(file=terminal, force_terminal=True, width=120)) as progress:
        load_stage(source, 0, 4, progress=progress)
    drawn = terminal.getvalue()
    assert "loading layers 0-4" in drawn and "━" in drawn
    assert f"{total / 1000:.1f}/{total / 1000:.1f} kB" in drawn
    pipe = io.StringIO()
    with loading_bar("loading layers 0-4", Console(file=pipe)) as progress:
        load_stage(source, 0, 4, progress=progress)
    assert pipe.getvalue() == ""


def test_several_ranks_report_rank_0s_loading_through_the_pipe(tmp_path):
    path = make_tiny_llama(tmp_path / "llama")
    calls = []
    with LocalPipeline(path, Plan([1, 1], [2, 2]), progress=lambda d, t: calls.append((d, t))):
        pass
    total = assert_monotone_to_total(calls)
    source = open_weights(path)
    assert total == reports(source, 0, 2)[-1][1]  # rank 0 holds stage 0


def test_run_draws_the_bar_on_a_terminal():
    from click.testing import CliRunner

    from p2pserve.cli import cli

    # rich's own switch for a terminal; the bar's absence elsewhere is the test above
    r = CliRunner().invoke(cli, ["run", "--max-new-tokens", "1", "--dtype", "bf16", "Hi"], env={"TTY_COMPATIBLE": "1"})
    assert r.exit_code == 0, r.output
    assert "loading bf16 weights" in r.stderr and "━" in r.stderr
    assert re.search(r"(\d+\.\d)/\1 MB", r.stderr), r.stderr  # done/total at the end, equal
