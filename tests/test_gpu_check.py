"""bench/gpu_check.py, the check a CUDA machine runs, runs its checks on the CPU here."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .tiny import make_tiny_llama

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
CHECKS = ["parity fp32", "parity bf16", "int8 kernels", "int8 stage", "int4 kernels", "int4 stage",
          "MoE parity fp32", "TP-2 all-reduce", "decode speed"]


def run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_cuda_it_says_nothing_was_checked():
    result = run()
    assert result.returncode == 0, result.stderr
    assert "no CUDA device: nothing checked" in result.stdout


def test_the_dry_run_passes_every_check_on_a_tiny_model(tmp_path):
    model = make_tiny_llama(tmp_path / "tiny", tie=True)
    result = run("--cpu-dry-run", "--model", str(model), "--tokens", "8")
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout[result.stdout.index("p2pserve GPU check"):]
    for check in CHECKS:
        line = next(line for line in table.splitlines() if line.startswith(check))
        assert " pass " in line, line
