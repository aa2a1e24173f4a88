"""What an operator meets: startup failures as one line, a worker that waits for its
bootstrap, Ctrl-C, `query --stats`, `p2pserve status`, config files and metrics."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from p2pserve.testing.swarm import Swarm

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


def test_local_swarm_script_starts_two_workers_that_share_the_cores_themselves(tmp_path):
    """The workers divide the machine's cores by themselves (tests/test_cores.py): the
    script must not pin a count that would stop them following each other."""
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
    # Both start in the background at once, so they may log their calls in either order.
    assert sorted(args[args.index("--stage") + 1] for args in workers) == ["0", "1"]
    assert not any("--threads" in args for args in workers), workers


def test_query_stats_line_shows_time_to_first_token():
    from p2pserve.cli.query import answer_stats

    line = answer_stats({"n_tokens": 11, "failovers": 0}, ttft=0.25, total=1.25)
    assert line == "[11 tokens in 1.25 s; time to first token 250 ms; 10.0 tokens/s after it; failovers 0]"


# --- a running swarm: status, query --stats, metrics ---------------------------------------------


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from p2pserve.ranks.world import free_port

    with Swarm(tmp_path_factory.mktemp("ops")) as swarm:
        swarm.http = f"127.0.0.1:{free_port()}"
        swarm.start_bootstrap("--pp-partition", "15", "15", "--http", swarm.http)
        swarm.worker_metrics = f"127.0.0.1:{free_port()}"
        swarm.workers = [swarm.start_worker("--stage", "0", "--metrics", swarm.worker_metrics, wait=False),
                         swarm.start_worker("--stage", "1", "--kv-dtype", "bf16", wait=False)]
        swarm.peer_ids = [swarm.wait_serving(w) for w in swarm.workers]
        wait_until(lambda: status_json(swarm)["chains"], "a complete chain")
        yield swarm


def wait_until(predicate, what: str, timeout: float = 60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError(f"no {what} within {timeout} s")


def status_json(swarm) -> dict:
    r = swarm.cli("status", "--peer", swarm.addr, "--json", timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_status_json_lists_workers_layers_devices_and_chains(swarm):
    view = status_json(swarm)
    assert view["model"] == "smollm2-135m-instruct" and view["n_layers"] == 30
    assert view["plans"] == ["--hetero-config 1 1 --pp-partition 15 15"]
    by_layers = {tuple(w["layers"]): w for w in view["workers"]}
    assert set(by_layers) == {(0, 15), (15, 30)}
    assert {w["peer_id"] for w in view["workers"]} == set(swarm.peer_ids)
    for w in view["workers"]:
        assert len(w["devices"]) == 1 and w["devices"][0].startswith("cpu") and w["dtype"] == "fp32" and w["tp"] == 1
        # the KV cache's dtype as the worker resolved it: stage 1 runs --kv-dtype bf16
        assert w["kv_dtype"] == ("fp32" if w["layers"] == [0, 15] else "bf16")
        assert w["sessions"] == 0 and w["max_sessions"] >= 1 and w["step_ms"] > 0 and w["chains"] == 1
    assert view["chains"] == [{"peers": [by_layers[0, 15]["peer_id"], by_layers[15, 30]["peer_id"]],
                               "layers": [[0, 15], [15, 30]]}]
    assert view["gaps"] == []
    # the head's spot checks, and why none could run: one chain, so no other to check it against
    assert set(view["spot_checks"]) >= {"checked", "caught", "no_other_chain", "no_alike_chain"}


def test_a_worker_says_what_it_loads_before_it_serves(swarm):
    log = swarm.log(swarm.workers[0])
    assert log.index("loading layers 0-15 of smollm2-135m-instruct (TP 1 on cpu, fp32)") < log.index("serving layers 0-15")
    # and the KV cache's dtype where it is not the activations' (this swarm's answers pass through it)
    assert "loading layers 15-30 of smollm2-135m-instruct (TP 1 on cpu, fp32, KV cache bf16)" in swarm.log(swarm.workers[1])


def test_status_table_is_readable(swarm):
    r = swarm.cli("status", "--peer", swarm.addr, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "0-15" in r.stdout and "15-30" in r.stdout and "chain 0:" in r.stdout
    assert "fp32, KV bf16" in r.stdout  # stage 1's cache, beside its weights' dtype
    assert "gaps" not in r.stdout


def test_query_stats_prints_time_to_first_token(swarm):
    r = swarm.cli("query", "--peer", swarm.addr, "--max-new-tokens", "8", "--stats", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "time to first token" in r.stderr and "tokens/s after it" in r.stderr


def test_ctrl_c_mid_answer_is_one_line_and_exit_130(swarm):
    env = {**os.environ, "P2PSERVE_HOME": str(swarm.home)}
    proc = subprocess.Popen([sys.executable, "-m", "p2pserve.cli", "query", "--peer", swarm.addr, "--no-chat",
                             "--max-new-tokens", "400", "Once upon a time"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert os.read(proc.stdout.fileno(), 1), "no answer"  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.decode().strip() == "interrupted"
    assert time.monotonic() - t0 < 15


def scrape(bind: str) -> dict:
    """{(name, labels as a sorted tuple): value} of the samples at http://BIND/metrics."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{bind}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_bootstrap_metrics_count_tokens_ttft_and_the_swarm(swarm):
    before = scrape(swarm.http)
    r = swarm.cli("query", "--peer", swarm.addr, "--max-new-tokens", "8", "--no-chat", "--temperature", "0",
                  "One, two, three, four,")
    assert r.returncode == 0, r.stderr
    m = scrape(swarm.http)
    assert m["p2pserve_queries_total", ()] == before["p2pserve_queries_total", ()] + 1
    assert m["p2pserve_generated_tokens_total", ()] - before["p2pserve_generated_tokens_total", ()] == 8
    assert m["p2pserve_time_to_first_token_seconds_count", ()] == before["p2pserve_time_to_first_token_seconds_count", ()] + 1
    assert m["p2pserve_time_to_first_token_seconds_sum", ()] > before["p2pserve_time_to_first_token_seconds_sum", ()]
    assert m["p2pserve_time_per_output_token_seconds_count", ()] >= 1
    assert m["p2pserve_tokens_per_second", ()] > 0
    assert m["p2pserve_sessions", ()] == 0 and m["p2pserve_queue", ()] == 0
    assert m["p2pserve_workers", ()] == 2 and m["p2pserve_chains", ()] == 1 and m["p2pserve_missing_layers", ()] == 0
    assert m["p2pserve_failovers_total", ()] == 0
    steps = {dict(labels)["layers"]: v for (name, labels), v in m.items() if name == "p2pserve_peer_step_seconds"}
    assert set(steps) == {"0-15", "15-30"} and all(v > 0 for v in steps.values())


def test_worker_metrics(swarm):
    m = scrape(swarm.worker_metrics)
    layers = (("layers", "0-15"),)
    assert m["p2pserve_worker_max_sessions", layers] >= 1
    assert m["p2pserve_worker_sessions", layers] == 0 and m["p2pserve_worker_queue", layers] == 0
    assert m["p2pserve_worker_forwards_total", layers] > 0  # the queries of the tests before


def test_the_link_between_the_two_workers_shows_its_round_trip_everywhere(swarm):
    first, second = swarm.peer_ids  # stages 0 and 1
    r = swarm.cli("query", "--peer", swarm.addr, "--max-new-tokens", "2", "--no-chat", "Hi")  # stage 0 dials 1
    assert r.returncode == 0, r.stderr

    def links_of_stage_0():  # each worker pings its peers every 5 s and announces the figures
        workers = {w["peer_id"]: w for w in status_json(swarm)["workers"]}
        links = {link["peer"]: link for link in workers[first]["links"]}
        return second in links and links

    link = wait_until(links_of_stage_0, "link from stage 0 to stage 1")[second]
    assert link["layers"] == [15, 30] and 0 < link["rtt_ms"] < 1000
    rtt = scrape(swarm.http)["p2pserve_link_rtt_seconds", (("from_peer", first), ("to_peer", second))]
    assert 0 < rtt < 1
    table = swarm.cli("status", "--peer", swarm.addr, timeout=60).stdout
    assert f"links of {first[-8:]} [0-15): {second[-8:]} [15-30) " in table, table
    import urllib.request

    with urllib.request.urlopen(f"http://{swarm.http}/", timeout=30) as resp:
        page = resp.read().decode()
    assert re.search(rf'<span class="link" data-to="{second}">{second[-8:]} \[15-30\): \d+\.\d\d ms</span>', page)


def test_links_are_the_round_trips_workers_announce_to_workers_and_this_head():
    from p2pserve.bootstrap.dashboard import render_swarm, swarm_view

    def worker(peer, start, end, rtts):
        return {"peer_id": peer, "start": start, "end": end, "tp": 1, "stage": 0, "addrs": [], "devices": [],
                "load": {}, "rtts": rtts}

    a, b, head = "12D3KooWa" + "a" * 40, "12D3KooWb" + "b" * 40, "12D3KooWhead" + "h" * 37
    view = swarm_view({"model": "m", "head": head, "workers": [
        worker(a, 0, 2, {head: 0.0002, b: 0.0031, "12D3KooWstranger": 0.001}),  # a DHT neighbour: left out
        worker(b, 2, 4, {a: 0.003})], "chains": [[a, b]]})
    links = {w["peer_id"]: w["links"] for w in view["workers"]}
    assert links[a] == [{"peer": b, "layers": [2, 4], "rtt_ms": 3.1}, {"peer": head, "layers": None, "rtt_ms": 0.2}]
    assert links[b] == [{"peer": a, "layers": [0, 2], "rtt_ms": 3.0}]
    html = render_swarm({**view, "tokens_per_s": 0, "timeline": []})
    assert f'<span class="link" data-to="{b}">{b[-8:]} [2-4): 3.10 ms</span><br>' \
           f'<span class="link" data-to="{head}">head: 0.20 ms</span>' in html
    assert "stranger" not in html


def test_dashboard_page_and_json_without_a_browser(swarm):
    import urllib.request

    with urllib.request.urlopen(f"http://{swarm.http}/", timeout=30) as resp:
        page = resp.read().decode()
    assert resp.headers["content-type"].startswith("text/html")
    for peer in swarm.peer_ids:
        assert f'data-peer="{peer}"' in page
    assert "every layer is served" in page and 'fetch("dashboard.json"' in page
    with urllib.request.urlopen(f"http://{swarm.http}/dashboard.json", timeout=30) as resp:
        data = json.loads(resp.read())
    assert {w["peer_id"] for w in data["workers"]} == set(swarm.peer_ids)
    assert data["gaps"] == [] and len(data["timeline"]) == 30 and 'class="worker"' in data["html"]


def test_the_bootstrap_logs_joins_requests_and_http_access_without_verbose(swarm):
    import urllib.request

    with urllib.request.urlopen(f"http://{swarm.http}/v1/models", timeout=30) as resp:
        assert resp.status == 200
    r = swarm.cli("query", "--peer", swarm.addr, "--max-new-tokens", "3", "--no-chat", "--temperature", "0", "Hi")
    assert r.returncode == 0, r.stderr
    log = wait_until(lambda: (lambda text: '"GET /v1/models' in text and "with 3 in" in text and text)(
        swarm.log(swarm.bootstrap_proc)), "operator log lines")
    for peer in swarm.peer_ids:
        assert f"worker {peer} joined: layers" in log
    chain = " -> ".join(p[-8:] for p in swarm.peer_ids)
    assert re.search(rf"answered \d+ prompt tokens with 3 in [\d.]+ s through {chain} \(0 failovers\)", log), log
    assert re.search(r'127\.0\.0\.1:\d+ "GET /v1/models 1\.1" 200 \d+ bytes', log), log


def test_dashboard_escapes_what_peers_announce():
    from p2pserve.bootstrap.dashboard import render_swarm, swarm_view

    evil = "<script>alert(1)</script>"
    worker = {"peer_id": "Qm" + "x" * 44, "start": 0, "end": 4, "tp": 1, "stage": 0, "addrs": [],
              "devices": [{"name": evil, "dtype": evil, "memory": 1}], "load": {"sessions": 0}}
    view = swarm_view({"model": evil, "plans": [{"hetero_config": [1, 1], "pp_partition": [4, 4]}],
                       "workers": [worker], "chains": [], "missing": evil})
    html = render_swarm(view)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "layers 4-8 have no worker" in html


CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class DevTools:
    """Just enough of Chromium's DevTools protocol (JSON over a websocket) to load a page,
    read its DOM and take a screenshot."""

    def __init__(self, ws):
        self.ws, self.n = ws, 0

    async def call(self, method: str, **params) -> dict:
        self.n += 1
        await self.ws.send_message(json.dumps({"id": self.n, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.get_message())
            if msg.get("id") == self.n:  # events in between are not ours
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    async def js(self, expression: str):
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 60):
        import trio

        with trio.fail_after(timeout):
            while not (value := await self.js(expression)):
                await trio.sleep(0.25)
        return value

    async def screenshot(self, path: Path) -> Path:
        import base64

        path.write_bytes(base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"]))
        return path


def headless_chromium(profile: Path):
    """``async with headless_chromium(dir) as page:`` a DevTools session on a blank page."""
    from contextlib import asynccontextmanager

    import trio
    from trio_websocket import open_websocket_url

    @asynccontextmanager
    async def cm():
        proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                 "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
                                 "--window-size=1200,900", "about:blank"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = profile / "DevToolsActivePort"  # Chromium writes its port there once it listens
            with trio.fail_after(60):
                while not (port_file.is_file() and port_file.read_text().strip()):
                    await trio.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            with trio.fail_after(30):
                while True:
                    targets = await trio.to_thread.run_sync(_json_list, port)
                    pages = [t for t in targets if t.get("type") == "page"]
                    if pages:
                        break
                    await trio.sleep(0.2)
            async with open_websocket_url(pages[0]["webSocketDebuggerUrl"], max_message_size=64 << 20) as ws:
                yield DevTools(ws)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    return cm()


def _json_list(port: int) -> list:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium to run headless: apt-get install -y chromium")
async def test_dashboard_in_headless_chromium_lists_the_workers_and_shows_the_gap_live(swarm, tmp_path):
    artefacts = Path(os.environ.get("P2PSERVE_ARTEFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    (tmp_path / "chromium").mkdir()
    async with headless_chromium(tmp_path / "chromium") as page:
        await page.call("Page.navigate", url=f"http://{swarm.http}/")
        await page.wait_for("document.querySelectorAll('tr.worker').length == 2")
        peers = await page.js("[...document.querySelectorAll('tr.worker')].map(r => r.dataset.peer)")
        assert set(peers) == set(swarm.peer_ids)
        assert await page.js("document.getElementById('gaps').className") == "ok"
        assert await page.js("document.querySelectorAll('.seg.worker').length") == 2
        shot = await page.screenshot(artefacts / "dashboard-serving.png")
        print(f"screenshot: {shot}")

        # the stage-1 worker leaves; the open page shows the gap without a reload
        swarm.signal(swarm.workers[1], signal.SIGTERM)
        text = await page.wait_for("document.querySelector('.seg.gap') && document.getElementById('gaps').textContent")
        assert text.startswith("layers 15-30 have no worker")
        assert await page.js("document.querySelectorAll('tr.worker').length") == 1
        assert await page.js("document.querySelector('.seg.gap').textContent") == "gap 15-30"
        shot = await page.screenshot(artefacts / "dashboard-gap.png")
        print(f"screenshot: {shot}")


def test_status_shows_the_gap_a_leaving_worker_leaves(swarm):  # last: it takes a worker away
    if swarm.workers[1].poll() is None:  # the dashboard test may have sent it away already
        swarm.signal(swarm.workers[1], signal.SIGTERM)
    view = wait_until(lambda: (v := status_json(swarm))["gaps"] and v, "gap")
    assert view["gaps"] == [[15, 30]] and view["chains"] == []
    r = swarm.cli("status", "--peer", swarm.addr, timeout=60)
    assert "gaps: layers 15-30 have no worker" in r.stdout
    m = scrape(swarm.http)
    assert m["p2pserve_missing_layers", ()] == 15 and m["p2pserve_chains", ()] == 0
    q = swarm.cli("query", "--peer", swarm.addr, "hi")
    assert q.returncode == 2 and "no_pipeline" in q.stderr
    assert scrape(swarm.http).get(("p2pserve_errors_total", (("code", "no_pipeline"),)), 0) >= 1


# --- config files ------------------------------------------------------------------------------------


def test_bootstrap_serves_the_plan_file_plan_wrote_with_flags_overriding_it(tmp_path):
    import urllib.request

    from p2pserve.engine.weights import default_model_path
    from p2pserve.planner.planfile import load_plan_toml
    from p2pserve.ranks.world import free_port

    swarm_toml, worker_toml = tmp_path / "swarm.toml", tmp_path / "worker.toml"
    with Swarm(tmp_path) as swarm:
        r = swarm.cli("plan", "--model", str(default_model_path()), "--devices", "cpu@a,cpu@b", "--dtype", "fp32",
                      "--toml", str(swarm_toml))
        assert r.returncode == 0, r.stderr
        plan = load_plan_toml(swarm_toml)[0]
        http = f"127.0.0.1:{free_port()}"
        # bootstrap options beside the plan; the test's --listen flag overrides this unusable port
        swarm_toml.write_text(f'http = "{http}"\nlisten = "/ip4/127.0.0.1/tcp/1"\npolicy = "round-robin"\n'
                              + swarm_toml.read_text())
        worker_toml.write_text('stage = 0\nthreads = 1\nkv-memory = "64MB"\nmax_seq_len = 512\ndevices = ["cpu"]\n')
        swarm.start_bootstrap("--config", str(swarm_toml))
        assert f"plan: {plan.flags()}" in swarm.log(swarm.bootstrap_proc)
        workers = [swarm.start_worker("--config", str(worker_toml), wait=False)]
        workers += [swarm.start_worker("--stage", str(s.index), wait=False) for s in plan.stages[1:]]
        for w in workers:
            swarm.wait_serving(w)
        # 64 MB holds two sessions of 512 positions of the first stage's layers (fp32, 3 KV heads of 64)
        first = plan.stages[0]
        per_session = 2 * (first.end - first.start) * 3 * 64 * 512 * 4
        assert f"{min(16, 64 * 2**20 // per_session)} sessions" in swarm.log(workers[0])
        assert f"serving layers {first.start}-{first.end} " in swarm.log(workers[0])
        with urllib.request.urlopen(f"http://{http}/v1/models", timeout=30) as resp:
            assert json.loads(resp.read())["data"][0]["id"] == "smollm2-135m-instruct"
        wait_until(lambda: status_json(swarm)["chains"], "a complete chain")
        q = swarm.cli("query", "--peer", swarm.addr, "--max-new-tokens", "8", "What is the capital of France?")
    assert q.returncode == 0, q.stderr
    assert "Paris" in q.stdout


@pytest.mark.parametrize("text, message", [
    ('lisen = "/ip4/127.0.0.1/tcp/0"\n', "unknown option 'lisen'; bootstrap reads"),
    ('model = "llama-2-70b"\n[[pipeline]]\nhetero_config = [1]\npp_partition = [80]\n',
     "model = 'llama-2-70b' is the planner's name"),
    ('pp_partition = [15, 15]\n[[pipeline]]\nhetero_config = [1]\npp_partition = [30]\n', "not both"),
    ('listen = \n', "is not valid TOML"),
])
def test_bad_bootstrap_config_is_one_line(tmp_path, text, message):
    path = tmp_path / "swarm.toml"
    path.write_text(text)
    r = p2pserve("bootstrap", "--config", str(path), home=tmp_path)
    assert_one_line_error(r, message, str(path))


def test_worker_metrics_on_a_port_in_use_is_one_line(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        r = p2pserve("worker", "--peer", "/ip4/127.0.0.1/tcp/9/p2p/QmNotThere", "--metrics", f"127.0.0.1:{port}",
                     home=tmp_path)
    assert_one_line_error(r, f"--metrics 127.0.0.1:{port}", "address already in use")
