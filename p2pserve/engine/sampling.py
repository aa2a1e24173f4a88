"""Choosing the next token from the last stage's logits.

Randomness is a pure function of (seed, position): the noise for the token at position
``p`` comes from a generator seeded with ``(seed, p)``. So a seeded answer is the same on
every plan, and a session replayed on another chain after a failure continues exactly
where it stopped, with no generator state to carry over.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from p2pserve.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top-k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top-p must be in (0, 1], got {self.top_p}"),
            (self.max_new_tokens >= 1, f"max-new-tokens must be >= 1, got {self.max_new_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int | None, position: int) -> torch.Generator:
    g = torch.Generator()
    base = torch.initial_seed() if seed is None else seed
    g.manual_seed((base * _MIX + position) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def sample(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """Next token for one sequence. logits: [vocab] float32; position: index of the new token."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = sorted_probs.cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = cumulative - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p, and the noise
    # depends only on (seed, position).
    noise = torch.empty_like(probs).exponential_(generator=_generator(params.seed, position))
    return int(torch.argmax(probs / noise))
