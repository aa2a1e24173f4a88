"""The reference every answer is measured against: Hugging Face transformers, fp32."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def hf_model(path: Path):
    from transformers import LlamaForCausalLM

    path = Path(path)
    if path.suffix == ".gguf":
        model = LlamaForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@functools.lru_cache(maxsize=4)
def cached_hf_model(path: str):
    return hf_model(Path(path))


def chat_references(prompts: list[str], n: int) -> dict[str, tuple[list[int], list[int]]]:
    """{prompt: (chat-templated prompt ids, n greedy tokens of transformers)} for SmolLM2."""
    from p2pserve.engine.weights import default_model_path, open_weights

    tokenizer = open_weights(None).tokenizer()
    model = cached_hf_model(str(default_model_path()))
    out = {}
    for p in prompts:
        ids = tokenizer.encode_chat([{"role": "user", "content": p}])
        out[p] = (ids, hf_greedy(model, ids, n)[0])
    return out


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """``n`` greedy tokens (no stop on EOS) and the logits at the last prompt position."""
    out = model(torch.tensor([prompt]), use_cache=True)
    logits = out.logits[0, -1].float()
    past = out.past_key_values
    tokens = [int(logits.argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, logits
