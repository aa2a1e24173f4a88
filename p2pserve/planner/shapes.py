"""Model shapes the planner knows by name, and ``--model`` resolution.

The planner needs only a model's shape, never its weights: ``--model`` is a directory
with a ``config.json``, a ``config.json`` itself, or one of the names below.
"""

from __future__ import annotations

import json
from pathlib import Path

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError


def _shape(name, layers, hidden, heads, kv, inter, vocab, tie=False, experts=(0, 0), head_dim=None) -> ModelConfig:
    """``inter``: the MLP's width, each expert's in a mixture (``experts``: a layer's, a token's)."""
    return ModelConfig(name=name, n_layers=layers, hidden_size=hidden, n_heads=heads, n_kv_heads=kv,
                       head_dim=head_dim or hidden // heads, intermediate_size=inter, vocab_size=vocab,
                       tie_word_embeddings=tie, n_experts=experts[0], n_experts_used=experts[1])


KNOWN_MODELS: dict[str, ModelConfig] = {
    m.name: m
    for m in (
        _shape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000),
        _shape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000),
        _shape("llama-2-70b", 80, 8192, 64, 8, 28672, 32000),
        _shape("llama-3-8b", 32, 4096, 32, 8, 14336, 128256),
        _shape("llama-3-70b", 80, 8192, 64, 8, 28672, 128256),
        _shape("mixtral-8x7b", 32, 4096, 32, 8, 14336, 32000, experts=(8, 2)),
        _shape("qwen3-30b-a3b", 48, 2048, 32, 4, 768, 151936, experts=(128, 8), head_dim=128),
        _shape("smollm2-135m", 30, 576, 9, 3, 1536, 49152, tie=True),
        _shape("tinyllama-1.1b", 22, 2048, 32, 4, 5632, 32000),
    )
}


def resolve_model(arg: str) -> ModelConfig:
    """A ModelConfig from a directory, a config.json path, or a known name."""
    path = Path(arg).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--model {arg}: the directory has no config.json")
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            from p2pserve.engine.weights import open_weights

            return open_weights(path).config  # the header only: its tensors are not read
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"--model {arg}: cannot read {path} as JSON ({e})") from None
        name = path.parent.name if path.name == "config.json" else path.stem
        try:
            return ModelConfig.from_hf(hf, name or "model")
        except KeyError as e:
            raise ConfigError(f"--model {arg}: {path} lacks {e.args[0]!r}; is it a Hugging Face config.json?") from None
    key = arg.strip().lower()
    if key in KNOWN_MODELS:
        return KNOWN_MODELS[key]
    raise ConfigError(f"--model {arg!r} is neither a directory, a config.json nor a known model "
                      f"({', '.join(KNOWN_MODELS)})")
