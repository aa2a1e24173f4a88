"""`p2pserve train` with every rank a process over torch.distributed (gloo), on one
machine and on two "nodes" of 127.0.0.1: the same losses and parameters as one process;
a failed rank is named and every rank is gone after a failure or Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from p2pserve.engine.weights import open_weights
from p2pserve.errors import P2PServeError
from p2pserve.train import checkpoint
from p2pserve.train.data import TokenWindows
from p2pserve.train.launch import Nodes, parse_nodes, run_processes
from p2pserve.train.layout import make_layout
from tests.test_train import ADAMW, SEQ_LEN, token_data, train_ranks, train_reference, worst_differences
from tests.tiny import make_tiny_llama

# TP 2 against two stages of TP 1, batches 2 and 1: four ranks, two pipelines.
LAYOUT = ([[2], [1, 1]], [[4], [1, 3]], [2, 1], [2, 1])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("gqa"), n_layers=4, hidden=48, n_heads=6, n_kv_heads=3,
                           intermediate=40, vocab=64, tie=True, seed=3)


def test_rank_processes_over_gloo_train_exactly_as_one_process(model, tmp_path):
    from p2pserve.cli.train import TrainJob, train_rank

    layout = make_layout(*LAYOUT)
    job = TrainJob(str(model), layout, token_data(), ADAMW, "1f1b", 5, 0, None, tmp_path / "ckpt")
    results = run_processes(layout, open_weights(model).config, train_rank, job, threads=1)
    assert sorted(results) == [0, 1, 2, 3]
    losses = results[0][0]
    assert all(results[r][0] == losses for r in results)  # every rank reports the step's loss
    saved = checkpoint.saved_pieces(tmp_path / "ckpt", layout.world_size)
    pieces = [[(r["piece"], r["value"]) for records in saved.values() for r in records]]
    ref_losses, ref_state = train_reference(model, layout.global_batch, 5, ADAMW)
    loss_rel, param = worst_differences(losses, pieces, ref_losses, ref_state)
    assert loss_rel < 1e-6 and param < 1e-5


def fail_on_rank_1(comm):
    if comm.rank == 1:
        raise RuntimeError("out of cheese")
    comm.all_reduce(torch.zeros(1), (0, 1))  # rank 0 waits here for a rank that is gone


def test_a_failed_rank_is_named_and_its_peers_are_killed(model):
    layout = make_layout([[2]], [[4]], [1])
    others = {p.pid for p in psutil.Process().children(recursive=True)}  # other tests' peers, left alone
    started = time.monotonic()
    with pytest.raises(P2PServeError, match="rank 1 of the training world failed: RuntimeError: out of cheese"):
        run_processes(layout, open_weights(model).config, fail_on_rank_1, threads=1)
    assert time.monotonic() - started < 60  # not gloo's timeout
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.pid not in others and p.status() != psutil.STATUS_ZOMBIE
                and "resource_tracker" not in " ".join(p.cmdline())]


def test_node_flags_split_the_ranks_in_contiguous_blocks():
    assert [list(Nodes(3, r, "h:1").ranks(8)) for r in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert list(Nodes().ranks(4)) == [0, 1, 2, 3]
    for args, message in [((2, 2, "h:1", 4), "--node-rank 2 is not one of the 2 nodes"),
                          ((2, 0, None, 4), "needs --master HOST:PORT"),
                          ((2, 0, "h", 4), "is not HOST:PORT"),
                          ((5, 0, "h:1", 4), "more than the layout's 4 ranks")]:
        with pytest.raises(Exception, match=message):
            parse_nodes(*args)


@pytest.fixture(scope="module")
def model_with_tokenizer(tmp_path_factory):
    """A tiny checkpoint that `p2pserve train` can read text with: SmolLM2's tokenizer."""
    path = make_tiny_llama(tmp_path_factory.mktemp("with-tokenizer"), vocab=49152, n_layers=4, hidden=32,
                           n_heads=4, n_kv_heads=2, intermediate=32, tie=True, seed=5)
    open_weights().tokenizer()._hf.save_pretrained(path)
    return path


def cli(*args, **popen):
    return subprocess.Popen([sys.executable, "-m", "p2pserve.cli", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def step_losses(out: str) -> list[float]:
    return [float(line.split()[3]) for line in out.splitlines() if line.startswith("step ")]


def test_two_nodes_on_one_host_train_as_one_process(model_with_tokenizer, tmp_path):
    text = tmp_path / "data.txt"
    text.write_text(" ".join(f"Line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(60)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--model", model_with_tokenizer, "--data", text, "--seq-len", SEQ_LEN, "--steps", 3, "--seed", 1,
             "--hetero-configs", "[[1], [1, 1]]", "--layer-partitions", "[[4], [1, 3]]",
             "--global-batch-sizes", 2, 1, "--chunks", 2, 1, "--threads", 1,
             "--nnodes", 2, "--master", f"127.0.0.1:{port}"]
    nodes = [cli(*flags, "--node-rank", r) for r in (0, 1)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    # node 0 runs ranks 0-1 (pipeline 0, stage 0 of pipeline 1), node 1 rank 2: the
    # pipeline's hop and the gradient sums cross the two "machines"
    assert "ranks 0-1 on node 0 of 2" in outs[0][1] and "rank 2 on node 1 of 2" in outs[1][1]
    losses = step_losses(outs[0][0])
    assert len(losses) == 3 and not step_losses(outs[1][0])  # rank 0, on node 0, prints the steps

    data = TokenWindows.from_file(text, open_weights(model_with_tokenizer).tokenizer(), SEQ_LEN, 1)
    one, _ = train_ranks(model_with_tokenizer, make_layout([[1]], [[4]], [3]), 3, ADAMW.__class__(lr=1e-4),
                         data=data)
    assert max(abs(a - b) / b for a, b in zip(losses, one, strict=True)) < 1e-6


def test_ctrl_c_ends_the_job_and_every_rank_with_exit_130(model_with_tokenizer, tmp_path):
    text = tmp_path / "data.txt"
    text.write_text(" ".join(f"Line {i}: a rather long run of words to train on for a while." for i in range(60)))
    job = cli("--model", model_with_tokenizer, "--data", text, "--seq-len", SEQ_LEN, "--steps", 100000,
              "--hetero-configs", "[[1, 1]]", "--layer-partitions", "[[2, 2]]", "--threads", 1,
              start_new_session=True)
    deadline = time.monotonic() + 240
    while not job.stdout.readline().startswith("step "):  # the ranks are training
        assert job.poll() is None and time.monotonic() < deadline
    os.killpg(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    deadline = time.monotonic() + 10
    while living_in_group(job.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not living_in_group(job.pid)  # nothing of the job's process group lives on


def living_in_group(pgid: int) -> list[int]:
    """Processes of the group that have not exited (a zombie has: this container's init reaps late)."""
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (psutil.Error, ProcessLookupError):
            pass
    return out


def test_a_rank_process_killed_mid_training_leaves_training_exact_on_the_surviving_templates(model):
    """Oobleck's reconfiguration with real processes: six ranks from templates; once step 2
    is taken, a rank of the deepest pipeline is SIGKILLed. The survivors leave their broken
    world, the launcher re-instantiates five ranks from the templates with the survivors'
    pieces and optimizer state, and training goes on from the step all of them committed:
    all 5 losses and the final parameters equal one process's."""
    from p2pserve.train.elastic import ElasticSpec, run_elastic
    from p2pserve.train.templates import PipelineTemplate

    templates = (PipelineTemplate((1, 1, 1), (1, 1, 2)), PipelineTemplate((2,), (4,)),
                 PipelineTemplate((1,), (4,)))
    spec = ElasticSpec(str(model), templates, 6, 1, token_data(), ADAMW, "1f1b", 5)
    killed, said = [], []

    def kill_a_rank_after_step_2(step, loss, pids):
        if step == 2 and not killed:
            # rank 0 reports step 2 as its commit all-reduce returns; the other ranks' side of
            # that ring all-reduce may still be finishing, and a kill now can leave some a
            # step behind rank 0 (CI saw it once): they finish the step with rank 0's norm
            killed.append(pids[1])  # the deepest pipeline's middle stage: its peers wait on it
            os.kill(pids[1], signal.SIGKILL)

    run = run_elastic(spec, 6, open_weights(model).config, threads=1, on_step=kill_a_rank_after_step_2,
                      say=said.append)
    assert killed and any("was killed (SIGKILL)" in line for line in said), said
    assert [layout.world_size for layout in run.layouts] == [6, 5]
    assert [p.tps for p in run.layouts[0].pipelines] != [p.tps for p in run.layouts[1].pipelines]
    ref_losses, ref_state = train_reference(model, 6, 5, ADAMW)
    saved = checkpoint.by_name([r for records in run.final_pieces.values() for r in records])
    pieces = [[(r["piece"], r["value"]) for records in saved.values() for r in records]]
    loss_rel, param = worst_differences(run.losses, pieces, ref_losses, ref_state)
    assert len(run.losses) == 5 and loss_rel < 1e-6 and param < 1e-5


TEMPLATES = "[[[1, 1, 1], [1, 1, 2]], [[2], [4]], [[1], [4]]]"


def test_train_templates_goes_on_when_a_rank_process_is_killed(model_with_tokenizer, tmp_path):
    """`p2pserve train --templates … --ranks 6`: a rank process is SIGKILLed once step 2 is
    printed; the command says so, goes on from the templates on five ranks, exits 0, and
    prints the losses one process prints for the same global batches."""
    text = tmp_path / "data.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--model", model_with_tokenizer, "--data", text, "--seq-len", SEQ_LEN, "--steps", 5, "--threads", 1]
    one = cli(*common, "--global-batch-sizes", 6)
    elastic = cli(*common, "--templates", TEMPLATES, "--ranks", 6, "--global-batch", 6)
    try:
        shown = []
        for line in elastic.stdout:  # bounded by communicate()'s timeout below if step 2 never comes
            shown.append(line)
            if line.startswith("step 2 "):
                break
        ranks = sorted((p for p in psutil.Process(elastic.pid).children() if "spawn_main" in " ".join(p.cmdline())),
                       key=lambda p: p.pid)
        assert len(ranks) == 6
        ranks[1].send_signal(signal.SIGKILL)
        out, err = elastic.communicate(timeout=300)
        one_out, one_err = one.communicate(timeout=300)
    finally:
        for proc in (one, elastic):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert one.returncode == 0, one_err
    assert elastic.returncode == 0, err
    # step 3 needs every rank, so the survivors go on from step 2 (3 if it was taken before the kill landed)
    assert "was killed (SIGKILL)" in err and re.search(r"going on from step [23] on 5 ranks", err), err
    got, want = step_losses("".join(shown) + out), step_losses(one_out)
    assert len(got) == len(want) == 5
    assert max(abs(a - b) / abs(b) for a, b in zip(got, want)) < 1e-6
