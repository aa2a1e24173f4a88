"""Generation: the next token from the last stage's logits, and the loop that decides which
tokens go through the pipeline next and when an answer ends (as gpt-fast's generate.py).

Sampling randomness is a pure function of (seed, position): the noise for the token at
position ``p`` comes from a generator seeded with ``(seed, p)``. So a seeded answer is
the same on every plan, and a session replayed on another chain after a failure
continues exactly where it stopped, with no generator state to carry over.

The loop is a pure decision, like a scheduler: ``next_step()`` says what to run, the
caller runs it (through the ranks of ``p2pserve run``, through libp2p links on stage 0
of a swarm) and hands back the sampled token with ``take()``. Both executors use this one
class, so a seeded answer is the same token for token on either, and the stop rule exists
once.
"""

from __future__ import annotations

import math
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
        # Parameters arrive from the network too: types first, so that one request's bad
        # value is this error and never a TypeError in the middle of a batched decode.
        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        checks = [
            (number(self.temperature) and 0 <= self.temperature <= 100,
             f"temperature must be a number in [0, 100], got {self.temperature!r}"),
            (integer(self.top_k) and self.top_k >= 0, f"top-k must be an integer >= 0 (0 = off), got {self.top_k!r}"),
            (number(self.top_p) and 0 < self.top_p <= 1, f"top-p must be a number in (0, 1], got {self.top_p!r}"),
            (self.seed is None or (integer(self.seed) and -2**63 <= self.seed < 2**63),
             f"seed must be a 64-bit integer or absent, got {self.seed!r}"),
            (integer(self.max_new_tokens) and 1 <= self.max_new_tokens <= 2**20,
             f"max-new-tokens must be an integer in [1, {2**20}], got {self.max_new_tokens!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @classmethod
    def from_dict(cls, d) -> "SamplingParams":
        if not isinstance(d, dict):
            raise ConfigError(f"sampling parameters must be a map, got {type(d).__name__}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return asdict(self)


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


# Tokens per prefill forward. Bounds activation memory on long prompts, and on a swarm the
# size of one hidden-state frame and how long one pass keeps other sessions waiting.
PREFILL_CHUNK = 256


@dataclass(frozen=True)
class Step:
    tokens: list[int]  # token ids at positions start, start + 1, ...
    start: int
    want: bool  # run the last position through the head and sample a token


def check_prompt(prompt: list[int], vocab_size: int) -> None:
    if not prompt:
        raise ConfigError("the prompt is empty")
    if not isinstance(prompt, list) or not all(type(t) is int and 0 <= t < vocab_size for t in prompt):
        raise ConfigError(f"the prompt must be token ids in [0, {vocab_size})")


class GenerationLoop:
    """Prefill the prompt in chunks of ``chunk`` tokens, then decode one token at a time
    until ``max_new_tokens`` tokens or, with ``stop_on_eos``, an end-of-sequence token."""

    def __init__(self, prompt: list[int], max_new_tokens: int, eos: tuple[int, ...] | set[int],
                 stop_on_eos: bool = True, chunk: int | None = None):
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.eos = frozenset(eos) if stop_on_eos else frozenset()
        self.chunk = chunk or PREFILL_CHUNK
        self.tokens: list[int] = []  # sampled so far
        self.pos = 0  # positions already sent through the pipeline
        self._waiting = False  # a wanted step was handed out and its token not yet taken

    @property
    def done(self) -> bool:
        return bool(self.tokens) and (len(self.tokens) >= self.max_new_tokens or self.tokens[-1] in self.eos)

    def next_step(self) -> Step | None:
        """The next step to run, or None when the answer is complete."""
        if self._waiting:
            raise RuntimeError("take() the token of the previous step first")
        if self.done:
            return None
        if self.pos < len(self.prompt):
            tokens = self.prompt[self.pos : self.pos + self.chunk]
        else:
            tokens = [self.tokens[-1]]
        step = Step(tokens, self.pos, self.pos + len(tokens) >= len(self.prompt))
        self.pos += len(tokens)
        self._waiting = step.want
        return step

    def take(self, token: int) -> None:
        """The token sampled at the end of the last step that wanted one."""
        if not self._waiting:
            raise RuntimeError("no step is waiting for a token")
        self._waiting = False
        self.tokens.append(int(token))
