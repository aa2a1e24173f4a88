"""What an operator meets: startup failures as one line, a worker that waits for its
bootstrap, Ctrl-C, `query --stats`, `p2pserve status`, config files and metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from .swarm import Swarm

ROOT = Path(__file__).resolve().parents[1]


def p2pserve(*args: str, home: Path, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "P2PSERVE_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "p2pserve.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)


def assert_one_line_error(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0], (f, r.stderr)


# --- startup failures: one line before any banner, exit 2 ----------------------------------------


def test_bootstrap_http_on_a_port_in_use_is_one_line_before_the_banner(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = p2pserve("bootstrap", "--listen", "/ip4/127.0.0.1/tcp/0", "--http", f"127.0.0.1:{port}", home=tmp_path)
    assert_one_line_error(r, f"--http 127.0.0.1:{port}", "address already in use")
    assert "bootstrap serving" not in r.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_worker_on_cuda_without_cuda_is_one_line(tmp_path):
    r = p2pserve("worker", "--peer", "/ip4/127.0.0.1/tcp/9/p2p/QmNotThere", "--devices", "cuda:0", home=tmp_path)
    assert_one_line_error(r, "--devices cuda:0", "CUDA is not available", "--devices cpu")


@pytest.mark.parametrize("size, message", [("lots", "bad memory size 'lots'"), ("0GB", "positive size")])
def test_bad_kv_memory_fails_before_anything_loads(tmp_path, size, message):
    t0 = time.monotonic()
    r = p2pserve("worker", "--peer", "/ip4/127.0.0.1/tcp/9/p2p/QmNotThere", "--kv-memory", size, home=tmp_path)
    assert_one_line_error(r, message)
    assert time.monotonic() - t0 < 30


# --- a worker started before its bootstrap waits for it --------------------------------------------


def test_worker_started_before_its_bootstrap_waits_for_it(tmp_path):
    with Swarm(tmp_path) as swarm:
        addr = swarm.start_bootstrap("--pp-partition", "30")  # once, to learn its identity and port
        port = swarm.bootstrap_port
        swarm.signal(swarm.bootstrap_proc)
        swarm.bootstrap_proc.wait()

        gives_up = swarm.cli("worker", "--peer", addr, "--listen", "/ip4/127.0.0.1/tcp/0", "--join-timeout", "1")
        assert gives_up.returncode == 2, gives_up.stderr
        assert "gave up after --join-timeout 1 s" in gives_up.stderr.strip().splitlines()[-1]
        assert "Traceback" not in gives_up.stderr

        worker = swarm.start_worker("--stage", "0", "--join-timeout", "120", wait=False)
        swarm._wait_for(worker, next(log for p, log in swarm.procs if p is worker), "waiting for the bootstrap")
        swarm.start_bootstrap("--pp-partition", "30", port=port)
        swarm.wait_serving(worker)
        log = swarm.log(worker)
    assert log.count("waiting for the bootstrap") == 1, log  # one line, not one per retry


# --- Ctrl-C on a query ------------------------------------------------------------------------------


def test_ctrl_c_on_query_is_one_line_and_exit_130(tmp_path):
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    # a "bootstrap" that accepts the connection and never answers: the query hangs in connect
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted = threading.Event()
    conns = []

    def accept():
        conn, _ = silent.accept()
        conns.append(conn)
        accepted.set()

    threading.Thread(target=accept, daemon=True).start()
    peer_id = ID.from_pubkey(create_new_key_pair().public_key).to_base58()
    addr = f"/ip4/127.0.0.1/tcp/{silent.getsockname()[1]}/p2p/{peer_id}"
    env = {**os.environ, "P2PSERVE_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "p2pserve.cli", "query", "--peer", addr, "hi"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert accepted.wait(60), "the query never dialled"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        silent.close()
        for c in conns:
            c.close()
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted", err


# --- scripts/local-swarm.sh --------------------------------------------------------------------------


def test_local_swarm_script_splits_the_cores_between_its_workers(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "p2pserve"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
case "$1" in
  bootstrap) echo /ip4/127.0.0.1/tcp/4001/p2p/QmFake; exec sleep 60;;
  worker) echo "worker x serving layers"; exec sleep 60;;
  query) echo Paris;;
esac
""")
    fake.chmod(0o755)
    env = {**os.environ, "LOCAL_SWARM_P2PSERVE": str(fake), "LOCAL_SWARM_TIMEOUT": "30"}
    r = subprocess.run(["bash", str(ROOT / "scripts/local-swarm.sh"), "hi"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "Paris"
    workers = [line.split() for line in calls.read_text().splitlines() if line.startswith("worker")]
    assert len(workers) == 2
    expected = str(max(1, len(os.sched_getaffinity(0)) // 2))  # what nproc says
    for args in workers:
        assert args[args.index("--threads") + 1] == expected, args


def test_query_stats_line_shows_time_to_first_token():
    from p2pserve.cli.query import answer_stats

    line = answer_stats({"n_tokens": 11, "failovers": 0}, ttft=0.25, total=1.25)
    assert line == "[11 tokens in 1.25 s; time to first token 250 ms; 10.0 tokens/s after it; failovers 0]"
