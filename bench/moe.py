"""One-stage decode of a Mixtral-style mixture of experts, against transformers and the floor.

No Mixtral checkpoint can be downloaded here, so the bench builds a random one with
transformers (``MixtralForCausalLM``, Mixtral 8x7B's proportions scaled down: 8 experts, 2
a token, an expert's MLP 3.5 times the hidden size) in a temporary directory. A decode step
of one sequence reads the attention weights, the router and the 2 experts its token picks
in every layer, and the head: that is the floor's byte count (the other experts stay in
memory unread). Per dtype it prints:

- decode ms per token (one sequence, after an 8-token prompt, each step at the same position
  with the next of 64 tokens, so that the experts read change), the real path
  (``StageModel.forward``: the fused step with its experts, the head, a greedy argmax);
- transformers' fp32 decode step on the same weights (its own ``forward`` with a KV cache),
  timed in the same rounds, in alternation, and the ratio of the two medians;
- the floor: read bandwidth (measured in this run, the fastest of its measurements) over
  the bytes a step reads, and the step's fraction of it.

    python bench/moe.py                                  # fp32 bf16 int8 int4
    python bench/moe.py --dtypes int4 --hidden 1024 --layers 4
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile
import time
from pathlib import Path

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch
from rich.console import Console
from rich.table import Table

from engine import BANDWIDTH_BYTES, CORES, DTYPES, Bandwidth, nbytes
from p2pserve.engine.build import load_stage
from p2pserve.engine.model import Batch
from p2pserve.engine.weights import open_weights
from p2pserve.ranks.pipeline import parse_dtype, weight_format
from p2pserve.testing.machine import cpu_model

PROMPT = list(range(3, 11))
# the token each step decodes, in turn: a different token picks other experts, as a real
# answer's do (one token again and again would read the same two experts every step)
TOKENS = list(range(100, 164))


def make_mixtral(path: Path, hidden: int, layers: int, experts: int, used: int) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    heads = hidden // 64
    config = MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                           num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
                           num_local_experts=experts, num_experts_per_tok=used, max_position_embeddings=4096)
    torch.manual_seed(0)
    MixtralForCausalLM(config).save_pretrained(path)
    return path


def bytes_per_token(stage) -> float:
    """What one decode step of one sequence reads: every weight but the experts its token
    leaves alone (the experts of a layer are all the same size)."""
    total = nbytes(stage.head) + nbytes(stage.norm.weight)
    for b in stage.blocks:
        total += sum(nbytes(w) for w in (b.attn.wqkv, b.attn.wo, b.attn_norm.weight, b.mlp_norm.weight, b.mlp.router))
        experts = b.mlp.experts
        total += sum(nbytes(x.w13) + nbytes(x.w2) for x in experts) * b.mlp.top_k / len(experts)
    return total


def ours(path: Path, dtype: str):
    """A function that runs one decode step and returns its seconds."""
    source = open_weights(path)
    stage = load_stage(source, 0, source.config.n_layers, dtype=parse_dtype(dtype), quant=weight_format(dtype))
    stage.allocate(1, 4096)
    tokens = itertools.cycle(torch.tensor(TOKENS)[:, None, None])
    position = len(PROMPT)
    stage.forward(Batch((0,), (0,), len(PROMPT)), torch.tensor([PROMPT]))

    def step() -> float:
        token = next(tokens)
        t0 = time.perf_counter()
        int(torch.argmax(stage.forward(Batch((0,), (position,), 1), token)[0]))
        return time.perf_counter() - t0

    return stage, step


def theirs(path: Path):
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cache = DynamicCache()
    with torch.inference_mode():
        model(torch.tensor([PROMPT]), cache=cache, use_cache=True)
    tokens = itertools.cycle(torch.tensor(TOKENS)[:, None, None])

    def step() -> float:
        token = next(tokens)
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(token, cache=cache, use_cache=True).logits
        int(torch.argmax(logits[0, -1]))
        cache.crop(-1)  # every step at the same position, as ours
        return time.perf_counter() - t0

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--used", type=int, default=2)
    parser.add_argument("--reps", type=int, default=20, help="steps timed per dtype, each beside one of transformers'")
    parser.add_argument("--threads", type=int, default=CORES)
    args = parser.parse_args()
    console = Console(width=130)
    torch.set_num_threads(args.threads)
    bandwidth = Bandwidth(args.threads)
    console.print(f"{cpu_model()}, {args.threads} threads; read bandwidth {bandwidth.read(reps=5) / 1e9:.1f} GB/s")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_mixtral(Path(tmp), args.hidden, args.layers, args.experts, args.used)
        reference = theirs(path)
        for dtype in args.dtypes:
            console.print(f"measuring {dtype}…")
            stage, step = ours(path, dtype)
            step(), reference()  # warm-up: the fused step is built on the first
            mine, hf = [], []
            for r in range(args.reps):
                for fn, out in ((step, mine), (reference, hf)) if r % 2 == 0 else ((reference, hf), (step, mine)):
                    out.append(fn())
            rows.append((dtype, statistics.median(mine), statistics.median(hf), bytes_per_token(stage)))
            del stage, step
            bandwidth.read(reps=5)
    # from memory: the experts a token does not pick pass through the cache between its steps
    fastest = bandwidth.fastest[BANDWIDTH_BYTES]
    console.print(f"read bandwidth, the fastest of the run: {fastest / 1e9:.1f} GB/s (the floors below use it)")
    table = Table(title=f"one-stage MoE decode, {args.experts} experts ({args.used} a token), hidden {args.hidden}, "
                        f"{args.layers} layers; {cpu_model()}, {args.threads} threads")
    for col in ("dtype", "ms/token", "transformers fp32 ms", "vs transformers", "MB read/token", "floor ms",
                "of floor"):
        table.add_column(col, justify="left" if col == "dtype" else "right")
    for dtype, mine, hf, read in rows:
        floor = read / fastest
        table.add_row(dtype, f"{mine * 1e3:.2f}", f"{hf * 1e3:.2f}", f"{hf / mine:.2f}x", f"{read / 1e6:.0f}",
                      f"{floor * 1e3:.2f}", f"{floor / mine:.0%}")
    console.print(table)
    console.print(f"(load average now {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
