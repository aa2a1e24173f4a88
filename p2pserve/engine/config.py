"""The shape of a Llama-family model, read from a Hugging Face config.json or GGUF metadata.

The families differ in attention: Qwen2 adds biases to the q/k/v projections, Qwen3
normalises each q and k head (RMSNorm over the head dimension) before RoPE; Mistral is
a Llama whose context is bounded by its sliding window. Mixtral is a Mistral, and Qwen3-MoE
a Qwen3, whose MLP is a mixture of experts (``n_experts`` of them a layer,
``n_experts_used`` for each token, each ``intermediate_size`` wide).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from p2pserve.errors import ConfigError

# Hugging Face architecture -> its family, named as GGUF's general.architecture names it
# (llama.cpp converts Mistral to "llama").
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3moe",
}
SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Off in a Llama; left out of the fingerprint while off (the experts' fields in a dense
# model), so a Llama's fingerprint does not change when this version learns another family.
_FAMILY_FEATURES = ("qkv_bias", "qk_norm")
_EXPERT_FIELDS = ("n_experts", "n_experts_used", "norm_topk")


@dataclass(frozen=True)
class ModelConfig:
    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False, compare=True)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    arch: str = "llama"
    qkv_bias: bool = False  # the q, k and v projections add a bias (Qwen2)
    qk_norm: bool = False  # each q and k head is RMS-normalised before RoPE (Qwen3)
    n_experts: int = 0  # MLPs a layer, of which a router picks n_experts_used a token (Mixtral); 0: one, dense
    n_experts_used: int = 0
    norm_topk: bool = True  # the chosen experts' probabilities are renormalised to sum to 1

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{self.name}: {self.n_heads} attention heads is not a multiple of "
                f"{self.n_kv_heads} KV heads"
            )
        if self.n_experts and not 0 < self.n_experts_used <= self.n_experts:
            raise ConfigError(
                f"{self.name}: {self.n_experts_used} experts used a token is not between 1 and its "
                f"{self.n_experts} experts a layer"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{self.name}: rope_scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def fingerprint(self) -> str:
        """A short digest of everything that must agree between stages of one pipeline."""
        shape = asdict(self)
        shape.pop("name")
        for feature in _FAMILY_FEATURES:
            if not shape[feature]:
                del shape[feature]
        if not self.is_moe:
            for name in _EXPERT_FIELDS:
                del shape[name]
        blob = json.dumps(shape, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["eos_token_ids"] = tuple(d.get("eos_token_ids") or ())
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict, name: str) -> "ModelConfig":
        """Build from the dict of a Hugging Face ``config.json``."""
        archs = hf.get("architectures") or ["LlamaForCausalLM"]
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if family is None:
            raise ConfigError(
                f"{name}: architecture {archs[0]} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        # attention_bias gives o_proj a bias too (Qwen2 hard-codes biases on q/k/v only).
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError(
                f"{name}: attention_bias/mlp_bias (biases on the output or MLP projections) "
                "are not supported; only Qwen2's q/k/v biases are"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{name}: activation {hf['hidden_act']!r} is not supported (silu)")
        n_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        # transformers >= 5 writes rope_parameters (theta included); older versions rope_scaling.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
        scaling = None if rope["rope_type"] == "default" else rope
        context = hf.get("max_position_embeddings", 4096)
        # Within its window, sliding-window attention is full attention, so bounding the
        # context by the window keeps every answer exact. A config that names a window
        # without switching it off (Mistral's) uses it; Qwen's say use_sliding_window.
        window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
        if window:
            context = min(context, window)
        experts, used, inter = 0, 0, hf["intermediate_size"]
        if family == "llama" and "MixtralForCausalLM" in archs:
            experts, used = hf["num_local_experts"], hf["num_experts_per_tok"]
        elif family == "qwen3moe":
            # every layer's MLP a mixture (Qwen3-30B-A3B's, 235B-A22B's): a dense MLP among
            # them would give layers of two shapes
            if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
                raise ConfigError(f"{name}: dense MLP layers among the experts' (mlp_only_layers, "
                                  "decoder_sparse_step) are not supported: every layer must be a mixture")
            # Qwen's own configs say num_experts; transformers 5 writes num_local_experts
            experts = hf.get("num_experts") or hf["num_local_experts"]
            used, inter = hf["num_experts_per_tok"], hf["moe_intermediate_size"]
        return cls(
            name=name,
            n_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            intermediate_size=inter,
            vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=context,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            arch=family,
            qkv_bias=family == "qwen2",
            qk_norm=family in ("qwen3", "qwen3moe"),
            n_experts=experts,
            n_experts_used=used,
            # transformers' Qwen3-MoE default is off; Mixtral always renormalises
            norm_topk=hf.get("norm_topk_prob", False) if family == "qwen3moe" else True,
        )

    @classmethod
    def from_gguf(cls, reader, name: str) -> "ModelConfig":
        """Build from the metadata of a ``gguf.GGUFReader``.

        The reader, not just its fields: whether the embedding is tied (no ``output.weight``)
        and Llama 3 rope scaling (a ``rope_freqs.weight`` tensor) are told by the tensor table.
        """
        from gguf import GGUFValueType

        fields = reader.fields
        tensors = {t.name: t for t in reader.tensors}

        def get(key, default=None):
            field = fields.get(key)
            if field is None:
                return default
            value = field.contents()
            if field.types == [GGUFValueType.FLOAT32]:
                # The shortest decimal of the float32: 1e-05, as config.json has it, not 9.99999974e-06.
                value = float(str(np.float32(value)))
            return value

        arch = get("general.architecture", "(none)")
        if arch not in SUPPORTED_GGUF_ARCHITECTURES:
            raise ConfigError(
                f"{name}: architecture {arch} is not supported "
                f"(supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})"
            )

        def meta(key, default=None):  # the architecture's own keys are prefixed with its name
            return get(f"{arch}.{key}", default)

        n_heads = meta("attention.head_count")
        hidden = meta("embedding_length")
        required = {
            f"{arch}.block_count": meta("block_count"),
            f"{arch}.embedding_length": hidden,
            f"{arch}.feed_forward_length": meta("feed_forward_length"),
            f"{arch}.attention.head_count": n_heads,
        }
        missing = [key for key, value in required.items() if value is None]
        if missing:
            raise ConfigError(f"{name}: the GGUF metadata has no {', '.join(missing)}")
        head_dim = meta("attention.key_length") or meta("rope.dimension_count") or hidden // n_heads
        vocab = meta("vocab_size")
        if vocab is None and "tokenizer.ggml.tokens" in fields:
            vocab = len(fields["tokenizer.ggml.tokens"].data)
        if vocab is None:
            raise ConfigError(
                f"{name}: the GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens"
            )
        rope_theta = meta("rope.freq_base", 10000.0)
        if "rope_freqs.weight" in tensors:
            factors = tensors["rope_freqs.weight"].data.tolist()
            scaling = _llama3_rope_from_factors(factors, head_dim, rope_theta, name)
        else:
            scaling = _rope_scaling_from_gguf(meta)
        # llama.cpp converts Mixtral to "llama" (and Qwen3-MoE to "qwen3moe") with a router
        # (ffn_gate_inp) and each layer's experts stacked in one tensor a projection
        # (ffn_gate_exps, ...); it renormalises the chosen experts' weights for both
        experts, used = meta("expert_count", 0), meta("expert_used_count", 0)
        if experts or "blk.0.ffn_gate_inp.weight" in tensors:
            if not (experts and used):
                raise ConfigError(f"{name}: a mixture-of-experts model whose metadata lacks "
                                  f"{arch}.expert_count or {arch}.expert_used_count")
            if "blk.0.ffn_gate_exps.weight" not in tensors:
                raise ConfigError(f"{name}: the experts are not stacked in blk.N.ffn_gate_exps (a GGUF "
                                  "of llama.cpp before 2024, one tensor an expert): convert it again")
        if "blk.0.attn_output.bias" in tensors:
            raise ConfigError(f"{name}: a bias on the attention output projection is not supported")
        eos_keys = (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        eos = tuple(dict.fromkeys(v for v in map(get, eos_keys) if v is not None))
        return cls(
            name=name,
            n_layers=meta("block_count"),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=meta("attention.head_count_kv") or n_heads,
            head_dim=head_dim,
            intermediate_size=meta("expert_feed_forward_length") or meta("feed_forward_length"),
            vocab_size=vocab,
            rms_norm_eps=meta("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=meta("context_length", 4096),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos,
            arch=arch,
            qkv_bias="blk.0.attn_q.bias" in tensors,
            qk_norm="blk.0.attn_q_norm.weight" in tensors,
            n_experts=experts,
            n_experts_used=used,
        )


def _rope_scaling_from_gguf(meta) -> dict | None:
    kind = meta("rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": meta("rope.scaling.factor", 1.0)}
    original = meta("rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = original
    return scaling


def llama3_rope_factors(scaling: dict, head_dim: int, theta: float) -> list[float]:
    """What llama.cpp's converter stores as ``rope_freqs.weight``: the divisor of each rotary
    frequency under Llama 3 rope scaling (1 for fast ones, ``factor`` for slow ones)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    out = []
    for i in range(head_dim // 2):
        wavelen = 2 * math.pi * theta ** (2 * i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def _llama3_rope_from_factors(factors: list[float], head_dim: int, theta: float, name: str) -> dict | None:
    """Recover Llama 3 rope scaling parameters from llama.cpp's per-frequency divisors.

    Between the clamps, 1/divisor is linear in the frequency; its slope and intercept give
    ``original / (high - low)`` and ``low / (high - low)``. Scaling original, low and high
    together changes no frequency, so low is fixed at 1 (what Llama 3.x uses). The result
    is checked to reproduce every divisor.
    """
    factor = max(factors)
    if factor <= 1.0:
        return None
    points = []
    for i, r in enumerate(factors):
        if 1.0 + 1e-6 < r < factor * (1 - 1e-6):
            freq = theta ** (-2 * i / head_dim)
            points.append((freq, (1 / r - 1 / factor) / (1 - 1 / factor)))
    scaling = None
    if len(points) >= 2:
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
        intercept = my - slope * mx
        high = round(1 - 1 / intercept, 4)
        scaling = {
            "rope_type": "llama3",
            "factor": round(factor, 4),
            "low_freq_factor": 1.0,
            "high_freq_factor": high,
            "original_max_position_embeddings": round(2 * math.pi * slope * (high - 1)),
        }
    if scaling is None or not all(
        math.isclose(a, b, rel_tol=1e-4)
        for a, b in zip(llama3_rope_factors(scaling, head_dim, theta), factors)
    ):
        raise ConfigError(
            f"{name}: rope_freqs.weight does not describe Llama 3 rope scaling "
            "(the only per-frequency rope scaling supported)"
        )
    return scaling
