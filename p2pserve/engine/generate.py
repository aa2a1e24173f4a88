"""The generation loop: which tokens go through the pipeline next, and when an answer ends.

It is a pure decision, like a scheduler: ``next_step()`` says what to run, the caller runs
it (through torch.distributed ranks in ``p2pserve run``, through libp2p links on stage 0
of a swarm) and hands back the sampled token with ``take()``. Both executors use this one
class, so a seeded answer is the same token for token on either, and the stop rule exists
once.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pserve.errors import ConfigError

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
