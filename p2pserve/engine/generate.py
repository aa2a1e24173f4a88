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
from dataclasses import asdict, dataclass, replace
from typing import NamedTuple

import torch

from p2pserve.errors import ConfigError

MAX_TOP_LOGPROBS = 20  # OpenAI's limit on alternatives per token

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 128
    # OpenAI's penalties: each token's logit is lowered by presence_penalty once it has been
    # generated and by frequency_penalty per time it has (the prompt does not count).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # with each token its log-probability and the N most likely (0-20)

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
            (number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             f"presence-penalty must be a number in [-2, 2], got {self.presence_penalty!r}"),
            (number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             f"frequency-penalty must be a number in [-2, 2], got {self.frequency_penalty!r}"),
            (self.logprobs is None or (integer(self.logprobs) and 0 <= self.logprobs <= MAX_TOP_LOGPROBS),
             f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or absent, got {self.logprobs!r}"),
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

    def for_choice(self, index: int) -> "SamplingParams":
        """The parameters of choice ``index`` of a request for several answers: each its
        own seed, derived from the request's, so that every choice is reproducible."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=(self.seed * _MIX + index) % 2**63)


_MIX = 0x9E3779B97F4A7C15


def _generator(seed: int | None, position: int) -> torch.Generator:
    g = torch.Generator()
    base = torch.initial_seed() if seed is None else seed
    g.manual_seed((base * _MIX + position) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def first_max(x: torch.Tensor) -> int:
    """The index of x's largest value, the first where several tie (NaN counts as largest),
    as ``torch.argmax`` gives it. On a CPU fp32 vector, numpy's: torch's CPU argmax is not
    vectorised, and over a vocabulary it took about 2% of a small model's decode step."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return int(x.numpy().argmax())
    return int(torch.argmax(x))


def sample(logits: torch.Tensor, params: SamplingParams, position: int, history=()) -> int:
    """Next token for one sequence. logits: [vocab] float32; position: index of the new token;
    history: the tokens generated so far (for the penalties)."""
    logits = penalized(logits, params, history)
    if params.greedy:
        return first_max(logits)
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
    return first_max(probs / noise)


def penalized(logits: torch.Tensor, params: SamplingParams, history) -> torch.Tensor:
    """The logits less the presence and frequency penalties of the tokens generated so far:
    a function of ``history`` alone, so a replay with the same tokens samples the same."""
    if not history or not (params.presence_penalty or params.frequency_penalty):
        return logits
    counts = torch.bincount(torch.as_tensor(history, dtype=torch.long), minlength=logits.numel())
    counts = counts[: logits.numel()].to(torch.float32)
    return logits.float() - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


class Sampled(NamedTuple):
    """A sampled token with its log-probability and the ``params.logprobs`` most likely
    tokens as [[id, logprob], ...]: the last stage's answer to a step when logprobs are
    asked for (a plain token id otherwise). A tuple, so it travels as a msgpack list."""
    token: int
    logprob: float
    top: list


def next_token(logits: torch.Tensor, params: SamplingParams, position: int, history=()) -> int | Sampled:
    """The last stage's answer to a step that wants a token. Log-probabilities are those of
    the distribution the sampler starts from: the model's, less the penalties, before
    temperature, top-k and top-p (OpenAI's and vLLM's convention)."""
    token = sample(logits, params, position, history)
    if params.logprobs is None:
        return token
    logp = torch.log_softmax(penalized(logits, params, history).float(), dim=-1)
    top = torch.topk(logp, min(params.logprobs, logp.numel())) if params.logprobs else None
    return Sampled(token, float(logp[token]),
                   [[int(i), float(v)] for v, i in zip(top.values, top.indices)] if top is not None else [])


def check_sampled(value, vocab_size: int | None = None) -> int | Sampled:
    """A token result received from the next stage: a token id, or a Sampled as a list.
    ValueError if it is neither (a peer's answer is checked before it is relayed)."""
    def token_id(t):
        return type(t) is int and 0 <= t and (vocab_size is None or t < vocab_size)

    def logprob(v):
        return isinstance(v, float) and not v > 0

    if token_id(value):
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 3 and token_id(value[0]) and logprob(value[1])
            and isinstance(value[2], list) and len(value[2]) <= MAX_TOP_LOGPROBS
            and all(isinstance(p, (list, tuple)) and len(p) == 2 and token_id(p[0]) and logprob(p[1])
                    for p in value[2])):
        return Sampled(value[0], value[1], [list(p) for p in value[2]])
    raise ValueError(f"expected a token id or [token, logprob, top], got {str(value)[:200]}")


def check_generated(tokens, vocab_size: int, max_len: int) -> list[int]:
    """The tokens already generated that an 'open' frame names (a replay after failover):
    the penalties count them."""
    if not isinstance(tokens, list) or len(tokens) > max_len or not all(
            type(t) is int and 0 <= t < vocab_size for t in tokens):
        raise ValueError(f"generated must be at most {max_len} token ids in [0, {vocab_size})")
    return tokens


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
