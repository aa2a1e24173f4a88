"""A KV cache in 16 bits or int8 (``--kv-dtype bf16|fp16|int8``) beside fp32 or int4 weights
and fp32 activations: keys and values are rounded as they are stored (int8: a scale a head's
row), and nothing else changes.

The reference is the same stage with its cache in the activations' dtype (``auto``). The
rounding moves the logits a little, so: a logit tolerance, and top-1 agreement where the
reference's best logit leads the next by more than twice it (test_quant's measure). On
one stage every position is a decode step (the fused step reads the cache); on the
multi-rank plans each position's prefix is a prefill (the modules write the cache and
read it back).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from p2pserve.engine.build import load_stage
from p2pserve.engine.generate import SamplingParams
from p2pserve.engine.model import Batch
from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError
from p2pserve.plan import Plan
from p2pserve.ranks.pipeline import LocalPipeline, parse_kv_dtype

from .tiny import make_tiny_llama, scale_layers

PROMPT = [(i * 37) % 250 + 3 for i in range(96)]
# |logit - reference logit| of a bf16, fp16 or int8 cache, the largest logit ~10: a cached
# value rounds by up to 2^-9 (bf16) or 2^-12 (fp16) of itself, or 1/254 of its row's
# largest (int8); measured 0.016, 0.003 and 0.055 here
TOLERANCE = {"bf16": 0.05, "fp16": 0.01, "int8": 0.1}
MIN_TOP1 = 0.99


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return scale_layers(make_tiny_llama(tmp_path_factory.mktemp("llama"), tie=True), 0.35)


def decoded_logits(path, quant: str | None, kv_dtype: str) -> torch.Tensor:
    """One stage, PROMPT one decode step a token: the logits after each, [len(PROMPT), vocab]."""
    source = open_weights(path)
    stage = load_stage(source, 0, source.config.n_layers, quant=quant, kv_dtype=parse_kv_dtype(kv_dtype))
    stage.allocate(1, 128)
    assert stage.blocks[0].attn.cache.k.dtype == (parse_kv_dtype(kv_dtype) or torch.float32)
    with torch.inference_mode():
        return torch.stack([stage(Batch((0,), (i,), 1), torch.tensor([[t]]))[0].float()
                            for i, t in enumerate(PROMPT)])


def prefilled_logits(path, plan: Plan, kv_dtype: str) -> torch.Tensor:
    """The logits after each prefix of PROMPT on ``plan``, each prefix one prefill."""
    with LocalPipeline(path, plan, kv_dtype=kv_dtype) as pipe:
        return torch.stack([pipe.generate(PROMPT[:n], SamplingParams(max_new_tokens=1), stop_on_eos=False,
                                          capture_logits=True).prompt_logits for n in range(1, len(PROMPT) + 1)])


def assert_agree(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str) -> None:
    best = want.topk(2, dim=-1).values
    decisive = best[:, 0] - best[:, 1] > 2 * tolerance
    assert decisive.float().mean() > 0.8  # the measure covers most positions
    top1 = (got.argmax(-1) == want.argmax(-1))[decisive].float().mean().item()
    assert top1 >= MIN_TOP1, f"{what}: top-1 {top1:.3f}"
    assert (got - want).abs().max() < tolerance, what
    assert (got - want).abs().max() > 0, f"{what}: the cache was not rounded"


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("quant", [None, "int4"])
def test_a_16_bit_cache_decodes_as_the_fp32_one_within_its_rounding(quant, kv_dtype, tiny):
    assert_agree(decoded_logits(tiny, quant, kv_dtype), decoded_logits(tiny, quant, "auto"),
                 TOLERANCE[kv_dtype], f"{quant or 'fp32'} weights, {kv_dtype} cache")


@pytest.mark.parametrize("hetero, partition, kv_dtype", [([1, 1], [2, 2], "bf16"), ([2, 1], [3, 1], "int8")])
def test_a_smaller_cache_prefills_as_the_fp32_one_on_every_plan(hetero, partition, kv_dtype, tiny):
    plan = Plan(hetero, partition)
    assert_agree(prefilled_logits(tiny, plan, kv_dtype), prefilled_logits(tiny, plan, "auto"),
                 TOLERANCE[kv_dtype], f"{plan.flags()}, {kv_dtype} cache")


def test_a_smaller_cache_holds_more_sessions(tiny):
    from p2pserve.node.budget import kv_bytes_per_session, max_sessions

    config = open_weights(tiny).config  # head_dim 16: an int8 row is 16 bytes and a 4-byte scale
    args = (config, config.n_layers, 1, 2048)
    fp32 = max_sessions(*args, torch.float32, "cpu", "64MB")
    assert max_sessions(*args, torch.bfloat16, "cpu", "64MB") == 2 * fp32
    assert kv_bytes_per_session(*args, torch.int8) * 64 == kv_bytes_per_session(*args, torch.float32) * 20


def test_an_unknown_kv_dtype_is_refused():
    from p2pserve.cli.run import run

    with pytest.raises(ConfigError, match="fp8"):
        parse_kv_dtype("fp8")
    result = CliRunner().invoke(run, ["--kv-dtype", "fp8", "hi"])
    assert result.exit_code == 2 and "fp8" in result.output


def test_run_int4_with_an_fp16_cache_answers_the_capital_of_france():
    from p2pserve.cli.run import run

    result = CliRunner().invoke(run, ["--dtype", "int4", "--kv-dtype", "fp16", "--max-new-tokens", "12",
                                      "What is the capital of France?"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output
