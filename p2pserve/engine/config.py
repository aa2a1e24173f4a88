"""The shape of a Llama-family model, read from a Hugging Face config.json or GGUF metadata."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from p2pserve.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


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

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{self.name}: {self.n_heads} attention heads is not a multiple of "
                f"{self.n_kv_heads} KV heads"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"{self.name}: rope_scaling type {rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def fingerprint(self) -> str:
        """A short digest of everything that must agree between stages of one pipeline."""
        shape = asdict(self)
        shape.pop("name")
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
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ConfigError(
                f"{name}: architecture {archs[0]} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ConfigError(f"{name}: biased attention/MLP projections are not supported")
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
        return cls(
            name=name,
            n_layers=hf["num_hidden_layers"],
            hidden_size=hf["hidden_size"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            intermediate_size=hf["intermediate_size"],
            vocab_size=hf["vocab_size"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
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
        if arch != "llama":
            raise ConfigError(f"{name}: architecture {arch} is not supported (supported: llama)")
        n_heads = get("llama.attention.head_count")
        hidden = get("llama.embedding_length")
        required = {
            "llama.block_count": get("llama.block_count"),
            "llama.embedding_length": hidden,
            "llama.feed_forward_length": get("llama.feed_forward_length"),
            "llama.attention.head_count": n_heads,
        }
        missing = [key for key, value in required.items() if value is None]
        if missing:
            raise ConfigError(f"{name}: the GGUF metadata has no {', '.join(missing)}")
        head_dim = get("llama.attention.key_length") or get("llama.rope.dimension_count") or hidden // n_heads
        vocab = get("llama.vocab_size")
        if vocab is None and "tokenizer.ggml.tokens" in fields:
            vocab = len(fields["tokenizer.ggml.tokens"].data)
        if vocab is None:
            raise ConfigError(
                f"{name}: the GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens"
            )
        rope_theta = get("llama.rope.freq_base", 10000.0)
        if "rope_freqs.weight" in tensors:
            factors = tensors["rope_freqs.weight"].data.tolist()
            scaling = _llama3_rope_from_factors(factors, head_dim, rope_theta, name)
        else:
            scaling = _rope_scaling_from_gguf(get)
        eos_keys = (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        eos = tuple(dict.fromkeys(v for v in map(get, eos_keys) if v is not None))
        return cls(
            name=name,
            n_layers=get("llama.block_count"),
            hidden_size=hidden,
            n_heads=n_heads,
            n_kv_heads=get("llama.attention.head_count_kv") or n_heads,
            head_dim=head_dim,
            intermediate_size=get("llama.feed_forward_length"),
            vocab_size=vocab,
            rms_norm_eps=get("llama.attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=get("llama.context_length", 4096),
            tie_word_embeddings="output.weight" not in tensors,
            bos_token_id=get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=eos,
        )


def _rope_scaling_from_gguf(get) -> dict | None:
    kind = get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    scaling = {"rope_type": kind, "factor": get("llama.rope.scaling.factor", 1.0)}
    original = get("llama.rope.scaling.original_context_length")
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
