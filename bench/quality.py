"""Quality of quantized answers: top-1 agreement with fp32 and perplexity, per dtype.

    python bench/quality.py [--dtypes fp32 bf16 int8 int4] [--tokens 512] [--threads N]
    python bench/quality.py --dtypes int4 --kv-dtypes auto bf16 fp16   # a 16-bit KV cache's cost

The text is one that ships with Python, so nothing is downloaded: the Zen of Python
(``this.s``, rot13-decoded) and then ``heapq.__about__``, the long essay on heaps in the
standard library's heapq module, as the default model's tokenizer encodes them (no BOS:
SmolLM2 adds none), cut at ``--tokens``. It is "held out" only in that nothing here tunes
on it: a model trained on the web has likely seen both, so the perplexities are low, and
what counts is how much each dtype moves them, not their level.

Teacher-forced: one-stage models of SmolLM2-135M-Instruct from the default GGUF, built as
``p2pserve run --dtype D`` builds them (``load_stage`` with that dtype and weight format),
take the whole text in the engine's prefill chunks, and the logits of every position are
kept. For each dtype the table gives

- top-1 agreement: the share of positions where its argmax is fp32's argmax;
- perplexity: exp of the mean negative log-likelihood of each next token of the text;
- max |logit - fp32's| over all positions and the vocabulary.

The default file is Q4_1, so "fp32" here is the file's weights dequantized to fp32, not
the original bf16 checkpoint, and none of the rows measures what Q4_1 itself costs against
that. int4 serves the layers' Q4_1 blocks as stored (activations fp32): a prefill chunk of
``kernels.GEMM_ROWS`` tokens or more multiplies them dequantized, by a GEMM in fp32, so its
layers compute fp32's products in another order and agree with them almost exactly. The row
"int4, as decode steps compute" prefills in chunks below that, through ``gemv_int4``, whose
AVX2 and AVX-512 loops round each 32 values of X to 16-bit integers: what a decode step's
products cost. The file keeps the token embedding, which SmolLM2's LM head shares, in
Q8_0, and int4 serves that head as
those Q8_0 blocks (``build.quantized_head``: an int4 stage never rounds its head to 4
bits). The row "int4, head at 4 bits" applies the head int4 had before that rule, the
embedding quantized again to int4 in groups of 64, to int4's last hidden states: what the
rule is worth. bf16 rounds activations and weights; int8 serves the layers' Q4_1 values
requantized with a scale per output row, and the head's Q8_0 blocks as stored. A row
"D, KV cache K" (``--kv-dtypes``) keeps D's KV cache in K (``--kv-dtype``): each prefill
chunk reads the earlier chunks' keys and values, and its own, rounded to K.

Where llama-cpp-python is installed (``p2pserve.testing.llamacpp``), llama.cpp evaluates
the same token ids on the same file (``logits_all=True``) and its row stands beside ours:
its own Q4_1 kernels, which also round activations to 8 bits.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import heapq
import io
import math
import time

import p2pserve  # noqa: F401  (sets GOMP_SPINCOUNT before torch loads, as for p2pserve run)
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from p2pserve.engine import kernels, quant
from p2pserve.engine.build import load_stage
from p2pserve.engine.generate import PREFILL_CHUNK
from p2pserve.engine.model import Batch, linear
from p2pserve.engine.weights import default_model_path, open_weights
from p2pserve.ranks.pipeline import KV_DTYPES, parse_dtype, parse_kv_dtype, weight_format
from p2pserve.testing import llamacpp
from p2pserve.testing.machine import cpu_model

DTYPES = ["fp32", "bf16", "int8", "int4"]


def held_out_text() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the Zen
        import this
    return codecs.decode(this.s, "rot13") + "\n\n" + heapq.__about__.strip() + "\n"


@torch.inference_mode()
def engine_states(dtype: str, ids: list[int], chunk: int = PREFILL_CHUNK, kv_dtype: str = "auto"):
    """p2pserve's final-normed hidden states at every position [len(ids), hidden], prefilled in
    chunks of ``chunk`` tokens (the engine's by default), and the stage's LM head."""
    source = open_weights(None)
    stage = load_stage(source, 0, source.config.n_layers, dtype=parse_dtype(dtype), quant=weight_format(dtype),
                       kv_dtype=parse_kv_dtype(kv_dtype))
    stage.allocate(1, len(ids))
    out = []
    for start in range(0, len(ids), chunk):
        part = torch.tensor([ids[start : start + chunk]])
        h = stage.forward_layers(stage.embed_input(part), Batch((0,), (start,), part.shape[1]))
        out.append(stage.norm(h[0]))
    return torch.cat(out), stage.head


@torch.inference_mode()
def head_logits(states: torch.Tensor, head) -> torch.Tensor:
    """[positions, vocab] float32."""
    return linear(states, head).float()


def llama_cpp_logits(ids: list[int], threads: int) -> torch.Tensor:
    llm = llamacpp.open_model(default_model_path(), threads, n_ctx=len(ids), logits_all=True)
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy())


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    """exp(mean NLL) of tokens 1.. given the ones before (token 0 has no prediction)."""
    return math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES,
                        help="fp32 is always measured: it is the reference")
    parser.add_argument("--kv-dtypes", nargs="+", default=["auto"], choices=list(KV_DTYPES),
                        help="the KV cache's dtypes, each with every --dtypes (auto: the activations')")
    parser.add_argument("--tokens", type=int, default=512, help="positions of the text to score (at most its "
                                                                "length, about 1,400 tokens)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads of torch and llama.cpp (default: torch's)")
    args = parser.parse_args()
    console = Console(width=120)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    source = open_weights(None)
    text_ids = source.tokenizer().encode(held_out_text())
    ids = text_ids[: args.tokens]
    console.print(f"{cpu_model()}: {default_model_path().name}, {len(ids)} of the text's {len(text_ids)} tokens "
                  f"(the Zen of Python, heapq.__about__), {args.threads} threads")

    logits = {}
    for dtype in dict.fromkeys(["fp32", *args.dtypes]):
        states, head = engine_states(dtype, ids)
        logits[dtype] = head_logits(states, head)
        if dtype == "int4":
            logits["int4, head at 4 bits"] = head_logits(states, quant.pack(source.get("lm_head.weight"), "int4"))
            if kernels.available():  # chunks below GEMM_ROWS: the products a decode step computes
                states, head = engine_states(dtype, ids, kernels.GEMM_ROWS - 1)
                logits["int4, as decode steps compute"] = head_logits(states, head)
        del states, head
        for kv_dtype in args.kv_dtypes:
            if kv_dtype != "auto":
                states, head = engine_states(dtype, ids, kv_dtype=kv_dtype)
                logits[f"{dtype}, KV cache {kv_dtype}"] = head_logits(states, head)
    if llamacpp.available():
        console.print(f"llama.cpp: {llamacpp.version()}, logits_all=True on the same token ids")
        logits["llama.cpp Q4_1"] = llama_cpp_logits(ids, args.threads)
    else:
        console.print(llamacpp.MISSING)

    ref = logits["fp32"]
    table = Table(title=f"Teacher-forced quality of SmolLM2-135M-Instruct ({default_model_path().name}), "
                        f"{len(ids)} positions, {cpu_model()}",
                  caption="fp32: the file's weights dequantized (layers Q4_1, embedding and LM head Q8_0); "
                          "int4 and int8 serve the head's Q8_0 blocks as stored; int4, head at 4 bits: int4's "
                          "layers, the head requantized to int4 (int4 before its head was kept at 8 bits); "
                          "int4, as decode steps compute: prefilled in chunks below kernels.GEMM_ROWS, through "
                          "gemv_int4's 16-bit activations; "
                          "top-1 agreement: share of positions "
                          "whose argmax is fp32's; perplexity of the text's next tokens; max |dlogit|: largest "
                          "difference from fp32's logits")
    for col in ["engine / dtype", "top-1 agreement with fp32", "perplexity", "ppl vs fp32", "max |dlogit|"]:
        table.add_column(col, justify="left" if col == "engine / dtype" else "right")
    ppl_ref = perplexity(ref, ids)
    for name, lg in logits.items():
        agree = (lg.argmax(-1) == ref.argmax(-1)).float().mean().item()
        ppl = perplexity(lg, ids)
        label = name if name.startswith("llama.cpp") else f"p2pserve {name}"
        table.add_row(label, f"{agree:.2%} ({int(round(agree * len(ids)))}/{len(ids)})", f"{ppl:.3f}",
                      f"{ppl / ppl_ref:.4f}x", f"{(lg - ref).abs().max().item():.3g}")
    console.print(table)
    console.print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
