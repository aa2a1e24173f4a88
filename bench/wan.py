"""A swarm across emulated WAN links: per-token latency and time to first token against
loopback and against the floor, and prefill of a long prompt over 100 Mbit/s.

    python bench/wan.py [--stages 2 3] [--delays 5 25 50] [--rate 100mbit] [--tokens 16]
                        [--reps 3] [--prefill-tokens 500] [--paths ring relay]
                        [--baseline REV]                            (as root: tests/netns.py)

For each number of stages k (plans --pp-partition 15 15 and 10 10 10 of the default model,
SmolLM2-135M-Instruct, fp32 on CPU, every worker --threads 1 --max-sessions 2), and for
each variant, two swarms started through the CLI as a user does, each bootstrap at
--stream-interval 0 so that each token is its own frame:

  loopback   the bootstrap and k workers on one machine (one network namespace)
  WAN        the bootstrap and each worker on its own emulated machine (tests/netns.py):
             --rate both ways on each machine's cable, and each one-way delay in turn
             (set live in the hub's delay relay: the same swarm, the same connections)

The variants: each token path of --paths (workers --token-path ring / relay), and with
--baseline REV the code of git revision REV (run from a temporary worktree, with its own
defaults), e.g. the revision before prefill chunks were pipelined across stages.

A timing client on each bootstrap's machine (this file's `client` mode) asks for
`--tokens` greedy tokens (no stop on EOS) of a short chat prompt, then for one token of a
`--prefill-tokens` prompt. The rounds interleave everything, so that the load of other
processes falls on all alike: in each round run's compute, loopback, then each delay.
TTFT is from the request to the first token; ms/token is TPOT, (last - first) /
(tokens - 1); each cell is the median over the rounds and their spread [min-max].

The floor of a decode step is its compute plus the link latencies it must cross:
compute is `p2pserve run`'s decode with the same plan and one thread per stage
(LocalPipeline, as bench/swarm.py times it), in this process; d is the link's one-way
delay as measured (half a TCP echo's round trip between two machines, so the relay's own
overshoot counts as link delay, not as p2pserve's). A decode step now crosses every link
twice with the relay (hidden state down the chain, the token relayed back up to stage 0):
2(k-1)*d; once with the ring (the last stage sends the token straight to stage 0): k*d.
The prefill's expected time is loopback's plus the delays it crosses (the head's 'open'
to stage 0 and down the chain, 'ready' back up, the steps down, the token back to stage 0
and on to the head: 3k*d with the ring, (4k-2)*d with the relay) plus sending the prompt's
fp32 activations, n * hidden * 4 bytes, down each of the k-1 links at --rate one after
the other (no overlap between links or with compute: pipelining beats it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pserve.testing.machine import cpu_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "What is the capital of France?"
PLANS = {2: [15, 15], 3: [10, 10, 10]}
HIDDEN = 576  # SmolLM2-135M
ECHO_PORT = 7001


# --- run on an emulated machine: the timing client, and a TCP echo for the link's delay ---


def client_main(addr: str, tokens: int, prefill_tokens: int) -> None:
    """Answer each line on stdin, "decode" or "prefill", with one timed query's JSON line:
    {"ttft", "tpot", "tokens", "prompt_tokens"}. Prints "ready" after a warm-up of each."""
    import trio

    from p2pserve.engine.generate import SamplingParams
    from p2pserve.engine.weights import open_weights
    from p2pserve.net.client import ask
    from p2pserve.testing.swarm import client

    tokenizer = open_weights(None).tokenizer()
    short = tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
    filler = "The quick brown fox jumps over the lazy dog near the river bank. "
    text = filler * (2 * prefill_tokens // len(tokenizer.encode(filler)) + 1)
    prompts = {"decode": (short, tokens), "prefill": (tokenizer.encode(text)[:prefill_tokens], 1)}

    async def timed(c, kind):
        ids, n = prompts[kind]
        stamps, out = [], []
        t0 = time.perf_counter()
        async for frame in ask(c.host, c.bootstrap_id, tokens=ids, params=SamplingParams(max_new_tokens=n),
                               stop_on_eos=False):
            if frame["type"] == "token":
                stamps.append(time.perf_counter())
                out.append(int(frame["token"]))
        return {"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1),
                "tokens": out, "prompt_tokens": len(ids)}

    async def serve():
        async with client(addr) as c:
            await c.wait_chains(1, timeout=120)
            for kind in prompts:  # warm-up: streams opened, first-use costs
                await timed(c, kind)
            print("ready", flush=True)
            while line := await trio.to_thread.run_sync(sys.stdin.readline):
                print(json.dumps(await timed(c, line.strip())), flush=True)

    trio.run(serve)


def echo_main(port: int) -> None:
    import socket

    server = socket.create_server(("0.0.0.0", port))
    print("echoing", flush=True)
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            while data := conn.recv(64):
                conn.sendall(data)


def rtt_main(ip: str, port: int, n: int = 30) -> None:
    import socket

    with socket.create_connection((ip, port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(n):
            t = time.perf_counter()
            s.sendall(b"x")
            s.recv(64)
            rtts.append(time.perf_counter() - t)
    print(statistics.median(rtts), flush=True)


# --- the bench ----------------------------------------------------------------------------


def _here(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


class Client:
    """A timing client on ``machine`` (bench/wan.py client), asked one query at a time."""

    def __init__(self, net, machine, addr: str, args):
        self.proc = net.spawn(machine, _here("client", addr, str(args.tokens), str(args.prefill_tokens)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the timing client did not start (its errors are above)")

    def ask(self, kind: str) -> dict:
        self.proc.stdin.write(kind + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the timing client died (its errors are above)")
        return json.loads(line)


def start_swarm(peers, head, stage_machines, k, variant, port) -> list[subprocess.Popen]:
    """A bootstrap on ``head`` and stage i's worker on ``stage_machines[i]`` (not waited for)."""
    peers.start_bootstrap(head, "--pp-partition", *map(str, PLANS[k]), "--stream-interval", "0", port=port)
    path = [] if variant.baseline else ["--token-path", variant.name]
    return [peers.start_worker(m, "--stage", str(i), "--max-sessions", "2", *path, name=f"stage{i}")
            for i, m in enumerate(stage_machines)]


class Variant:
    """A token path of the code beside this file (``name`` ring or relay), or the code of
    a git revision (``baseline``: its worktree). Its processes run that tree's code."""

    def __init__(self, name: str, baseline: Path | None = None):
        self.name, self.baseline = name, baseline

    def peers(self, net, root: Path):
        from tests.netns import Peers

        tree = self.baseline or ROOT

        class At(Peers):
            def _cli(self, machine, args):
                argv = super()._cli(machine, args)
                i = argv.index("-m")
                return [*argv[:i], "-c", AT_REVISION, str(tree), *argv[i + 2:]]

        return At(net, root)


# `python -c AT_REVISION TREE ARGS...`: the p2pserve CLI of the source tree TREE (this
# file's, or a baseline's worktree), whatever the editable install points at: it maps
# p2pserve.node and p2pserve.bootstrap to its checkout's folders, so they are loaded from
# TREE's by hand first. Run from a worktree of a commit, the bench measures that commit.
AT_REVISION = """
import importlib.util, sys
tree = sys.argv.pop(1)
sys.path.insert(0, tree)
for name in ("node", "bootstrap"):
    spec = importlib.util.spec_from_file_location(f"p2pserve.{name}", f"{tree}/{name}/__init__.py",
                                                  submodule_search_locations=[f"{tree}/{name}"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
from p2pserve.cli import main
main()
"""


def bench_stages(k, args, tmp, variants) -> dict:
    """Run's compute, and for each variant loopback and each WAN delay, measured in
    interleaved rounds: {"compute": [run...], name: {"loopback": [query...],
    d: {"rtt": [s...], "runs": [query...]}}}."""
    from p2pserve.plan import Plan
    from p2pserve.ranks.pipeline import LocalPipeline
    from tests.netns import Network

    with Network() as lan, Network(rate=args.rate, delay_ms=args.delays[0]) as net:
        one = lan.machine("one")
        head = net.machine("head")
        stages = [net.machine(f"s{i}") for i in range(k)]
        echo = net.spawn(stages[0], _here("echo", str(ECHO_PORT)), stdout=subprocess.PIPE, text=True)
        echo.stdout.readline()
        swarms, everyone = {}, []
        for i, v in enumerate(variants):  # one bootstrap port per variant on each machine
            loop_peers = v.peers(lan, Path(tmp) / f"loop{k}-{v.name}")
            wan_peers = v.peers(net, Path(tmp) / f"wan{k}-{v.name}")
            procs = [(loop_peers, p) for p in start_swarm(loop_peers, one, [one] * k, k, v, 31337 + i)]
            procs += [(wan_peers, p) for p in start_swarm(wan_peers, head, stages, k, v, 31337 + i)]
            everyone += procs
            for peers, proc in procs:
                peers.wait_serving(proc, timeout=300)
            try:
                swarms[v.name] = (Client(lan, one, loop_peers.addr, args), Client(net, head, wan_peers.addr, args))
            except RuntimeError:
                _dead(everyone)
                raise
        pipe = LocalPipeline(None, Plan([1] * k, PLANS[k]), threads=1)
        try:
            out = {"compute": [], **{v.name: {"loopback": [], **{d: {"rtt": [], "runs": []} for d in args.delays}}
                                     for v in variants}}
            time_run(pipe, args)  # warm-up
            for rep in range(args.reps):
                out["compute"].append(time_run(pipe, args))
                for v in variants:
                    out[v.name]["loopback"].append(round_trip(swarms[v.name][0]))
                for d in args.delays:
                    net.set_delay(d)
                    for v in variants:
                        rtt = net.run(head, _here("rtt", stages[0].ip, str(ECHO_PORT)), capture_output=True,
                                      text=True, timeout=60, check=True)
                        out[v.name][d]["rtt"].append(float(rtt.stdout))
                        out[v.name][d]["runs"].append(round_trip(swarms[v.name][1]))
                print(f"  {k} stages: round {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)
        except RuntimeError:
            _dead(everyone)
            raise
        finally:
            pipe.close()
    return out


def _dead(procs) -> None:
    for peers, proc in procs:
        if proc.poll() is not None:
            print(f"{peers.logs[proc.pid]} exited with {proc.returncode}", file=sys.stderr)


def round_trip(client: Client) -> dict:
    """One decode query and one prefill query: the decode's figures plus "prefill" (its TTFT)
    and "prefill_tokens"."""
    decode, prefill = client.ask("decode"), client.ask("prefill")
    return {**decode, "prefill": prefill["ttft"], "prefill_tokens": prefill["prompt_tokens"]}


def time_run(pipe, args) -> dict:
    """`p2pserve run`'s decode with the swarm's plan (LocalPipeline, as bench/swarm.py times it)."""
    from p2pserve.engine.generate import SamplingParams
    from p2pserve.engine.weights import open_weights

    short = open_weights(None).tokenizer().encode_chat([{"role": "user", "content": PROMPT}])
    stamps, tokens = [], []
    t0 = time.perf_counter()
    for item in pipe.stream(short, SamplingParams(max_new_tokens=args.tokens), stop_on_eos=False):
        if isinstance(item, int):
            stamps.append(time.perf_counter())
            tokens.append(item)
    return {"ttft": stamps[0] - t0, "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "tokens": tokens}


def cell(xs: list[float], scale: float = 1e3) -> str:
    return f"{statistics.median(xs) * scale:.1f} [{min(xs) * scale:.0f}-{max(xs) * scale:.0f}]"


def report(args, results, variants, elapsed) -> None:
    bits = _rate_bits(args.rate)
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; load average {args.load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after; {elapsed / 60:.1f} min")
    print(f"SmolLM2-135M-Instruct fp32, workers --threads 1, bootstrap --stream-interval 0; {args.tokens} greedy "
          f"tokens of a {results['short_prompt']}-token chat prompt; {args.reps} interleaved rounds after one "
          f"warm-up; links {args.rate} both ways; cells: median [min-max] of the runs")
    print(f"{'k':>2} {'path':>8} {'one-way link':>16} {'runs':>4} {'TTFT ms':>15} {'ms/token':>15} {'compute':>7} "
          f"{'ring k*d':>8} {'2(k-1)d':>8} {'/floor':>6} {'same':>4}  {'prefill TTFT ms':>18} {'expected':>8}")
    for k in args.stages:
        r = results[k]
        comp = statistics.median(x["tpot"] for x in r["compute"])
        ref = r["compute"][0]["tokens"]
        for v in variants:
            ring = v.name == "ring"
            loop_prefill = statistics.median(x["prefill"] for x in r[v.name]["loopback"])
            n = r[v.name]["loopback"][0]["prefill_tokens"]
            rows = [("loopback", 0.0, r[v.name]["loopback"])]
            for d in args.delays:
                eff = statistics.median(r[v.name][d]["rtt"]) / 2
                rows.append((f"{d:g} ms (eff {eff * 1e3:.1f})", eff, r[v.name][d]["runs"]))
            for label, d, runs in rows:
                tpot = [x["tpot"] for x in runs]
                floor_ring, floor_relay = comp + k * d, comp + 2 * (k - 1) * d
                crossings = 3 * k if ring else 4 * k - 2
                expect = loop_prefill + (crossings * d + (k - 1) * n * HIDDEN * 4 * 8 / bits if d else 0)
                same = "yes" if all(x["tokens"] == ref for x in runs) else "NO"
                floor = floor_ring if ring else floor_relay
                print(f"{k:>2} {v.name:>8} {label:>16} {len(runs):>4} {cell([x['ttft'] for x in runs]):>15} "
                      f"{cell(tpot):>15} {comp * 1e3:7.1f} {floor_ring * 1e3:8.1f} {floor_relay * 1e3:8.1f} "
                      f"{statistics.median(tpot) / floor:5.2f}x {same:>4}  {cell([x['prefill'] for x in runs]):>18} "
                      f"{expect * 1e3:8.1f}")
    print(f"path: the workers' --token-path, or a --baseline revision (its own default, the relay); compute: "
          f"`p2pserve run`-style decode, ms/token (LocalPipeline with the plan, 1 thread per stage, in the same "
          f"rounds); ring k*d / 2(k-1)d: the floor, compute + the link delays a decode step must cross with a ring / "
          f"with the reverse relay; /floor: measured ms/token over the row's own path's floor; 'same': every "
          f"answer's tokens are run's; prefill: one token of a {n}-token prompt; expected = loopback's + the delays "
          f"it crosses (3k*d ring, (4k-2)*d relay) + (k-1) * n*{HIDDEN}*4 B at {args.rate}, links one after another")


def _rate_bits(rate: str) -> float:
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for unit, scale in units.items():
        if rate.lower().endswith(unit):
            return float(rate[: -len(unit)]) * scale
    raise SystemExit(f"--rate {rate!r}: give it as tc does, e.g. 100mbit")


def main() -> None:
    if sys.argv[1:2] == ["client"]:
        return client_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    if sys.argv[1:2] == ["echo"]:
        return echo_main(int(sys.argv[2]))
    if sys.argv[1:2] == ["rtt"]:
        return rtt_main(sys.argv[2], int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3], choices=sorted(PLANS))
    parser.add_argument("--delays", type=float, nargs="+", default=[5, 25, 50], help="one-way, ms")
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=500)
    parser.add_argument("--paths", nargs="+", default=["ring", "relay"], choices=["ring", "relay"],
                        help="the token paths to measure, one swarm each (worker --token-path)")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also measure the code of this git revision (e.g. before a change)")
    args = parser.parse_args()
    _rate_bits(args.rate)

    from tests.netns import why_unavailable

    why = why_unavailable()
    if why:
        sys.exit(f"bench/wan.py: {why}")
    args.load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    from p2pserve.engine.weights import open_weights

    results = {"short_prompt": len(open_weights(None).tokenizer().encode_chat([{"role": "user", "content": PROMPT}]))}
    with tempfile.TemporaryDirectory(prefix="p2pserve-bench-wan.") as tmp:
        variants = [Variant(p) for p in args.paths]
        if args.baseline:
            tree = Path(tmp) / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
                           check=True, capture_output=True)
            variants.append(Variant(args.baseline[:12], tree))
        try:
            for k in args.stages:
                print(f"{k} stages: a loopback swarm and a WAN swarm for each of {', '.join(v.name for v in variants)}…",
                      file=sys.stderr, flush=True)
                results[k] = bench_stages(k, args, tmp, variants)
        except BaseException:
            kept = shutil.copytree(tmp, f"{tmp}.failed", ignore=shutil.ignore_patterns("baseline"))
            print(f"the swarms' logs are kept in {kept}", file=sys.stderr)
            raise
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               capture_output=True)
    report(args, results, variants, time.monotonic() - t0)


if __name__ == "__main__":
    main()
