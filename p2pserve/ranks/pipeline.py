"""`p2pserve run`: a whole asymmetric pipeline on this machine, in one local world.

HexGen's "independent inference process": no bootstrap, no libp2p. The plan's stages run
as one world of ranks (``p2pserve/ranks/stages.py``); rank 0 drives the generation loop
(``p2pserve/engine/generate.py``), the one the swarm's stage 0 drives too, and samples
from the last stage's logits. A one-rank plan runs in this process; larger plans run
every rank in a child process and rank 0 talks to this one over a pipe, so that a dead
rank is an error here rather than a hang.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from p2pserve.engine.generate import GenerationLoop
from p2pserve.engine.model import Batch
from p2pserve.engine.generate import SamplingParams, sample
from p2pserve.engine.weights import open_weights
from p2pserve.errors import ConfigError, P2PServeError
from p2pserve.heap import freeze_startup_heap
from p2pserve.plan import Plan
from p2pserve.ranks import world
from p2pserve.ranks.stages import LocalStages, StagesSpec, serve_rank


def parse_dtype(name: str) -> torch.dtype:
    """The activations' (and KV cache's) dtype of ``--dtype name``: fp32 for the quantized
    weight formats, whose weights ``weight_format`` names."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "int8": torch.float32, "int4": torch.float32}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}: use fp32, bf16, fp16, int8 or int4")
    return table[name]


KV_DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8}


def parse_kv_dtype(name: str) -> torch.dtype | None:
    """The KV cache's dtype of ``--kv-dtype name``; None (auto) for the activations'."""
    if name not in KV_DTYPES:
        raise ConfigError(f"unknown KV cache dtype {name!r}: use {', '.join(KV_DTYPES)}")
    return KV_DTYPES[name]


def kv_dtype_name(dtype: str, kv_dtype: str) -> str:
    """The KV cache's dtype of ``--dtype dtype --kv-dtype kv_dtype`` by name, auto resolved to
    the activations' dtype (what a worker's record says its cache holds)."""
    cache = parse_kv_dtype(kv_dtype) or parse_dtype(dtype)
    return next(name for name, t in KV_DTYPES.items() if t == cache)


def weight_format(name: str) -> str | None:
    """The quantized weight format of ``--dtype name`` (int8, int4), None for a float dtype."""
    return name if name in ("int8", "int4") else None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N")
    return device


@dataclass
class Generation:
    tokens: list[int]
    prompt_tokens: int
    ttft: float  # seconds from request to first token
    decode_time: float  # seconds from first to last token
    prompt_logits: torch.Tensor | None = None  # [vocab] at the last prompt position, if asked for

    @property
    def decode_tokens_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_time if n > 0 and self.decode_time > 0 else float("nan")


def _check_length(config, n_prompt: int, params: SamplingParams) -> int:
    if n_prompt == 0:
        raise ConfigError("the prompt is empty")
    need = n_prompt + params.max_new_tokens
    if need > config.max_position_embeddings:
        raise ConfigError(
            f"prompt ({n_prompt} tokens) + max-new-tokens ({params.max_new_tokens}) = {need} is "
            f"above {config.name}'s context of {config.max_position_embeddings} tokens"
        )
    return need


def _capacity(need: int, current: int, limit: int) -> int:
    """Grow the KV cache in powers of two so that repeated requests do not reallocate."""
    if need <= current:
        return current
    size = 256
    while size < need:
        size *= 2
    return min(size, limit)


class _Driver:
    """Rank 0: runs the generation loop through the world's stages and samples."""

    def __init__(self, stages: LocalStages):
        self.stages = stages

    def generate(self, prompt, params, stop_on_eos, capture_logits=False) -> Iterator[int | Generation]:
        stages = self.stages
        config = stages.config
        cap = _capacity(len(prompt) + params.max_new_tokens, stages.max_len, config.max_position_embeddings)
        if cap != stages.max_len:
            stages.allocate(1, cap)
        loop = GenerationLoop(prompt, params.max_new_tokens, config.eos_token_ids, stop_on_eos)
        logits = None
        t0 = time.perf_counter()
        t_first = None
        while (step := loop.next_step()) is not None:
            n = len(step.tokens)
            out = stages.forward(Batch((0,), (step.start,), n), torch.tensor([step.tokens], dtype=torch.int64))
            if not step.want:
                continue
            if capture_logits and logits is None:
                logits = out[0].float().cpu()
            loop.take(sample(out[0], params, step.start + n, loop.tokens))
            t_first = t_first or time.perf_counter()
            yield loop.tokens[-1]
        yield Generation(loop.tokens, len(prompt), t_first - t0, time.perf_counter() - t_first, logits)


def _rank_main(rank: int, spec: StagesSpec, conn) -> None:
    if rank != 0:
        serve_rank(rank, spec)
        return
    last = 0.0

    def loading(done: int, total: int) -> None:  # a message per tenth of a second at most
        nonlocal last
        if done == total or time.monotonic() - last > 0.1:
            last = time.monotonic()
            conn.send(("loading", (done, total)))

    stages = LocalStages(spec, progress=loading)
    freeze_startup_heap()  # full GC passes must not walk the model and torch
    driver = _Driver(stages)
    conn.send(("ready", None))
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            stages.stop()
            world.leave()
            return
        prompt, params, stop_on_eos, capture_logits = arg
        for item in driver.generate(prompt, params, stop_on_eos, capture_logits):
            conn.send(("done", item) if isinstance(item, Generation) else ("token", item))


class LocalPipeline:
    """A plan running on this machine. ``generate`` is the whole public surface."""

    def __init__(self, model_path=None, plan: Plan | None = None, *, dtype: str = "fp32", kv_dtype: str = "auto",
                 device: str = "cpu", threads: int | None = None, startup_timeout: float = 600,
                 progress: Callable[[int, int], None] | None = None):
        """``progress(done, total)``: the bytes rank 0 has loaded of its own (``load_stage``);
        the other ranks load theirs meanwhile, unreported."""
        self.source = open_weights(model_path)
        self.config = self.source.config
        self.plan = plan or Plan.single(self.config.n_layers)
        self.plan.check_model(self.config)
        stages = tuple((s.start, s.end, s.tp) for s in self.plan.stages)
        spec = StagesSpec(None if model_path is None else str(model_path), stages, parse_dtype(dtype),
                          world.World(world.rank_devices(resolve_device(device), self.plan.world_size)), threads,
                          quant=weight_format(dtype), kv_dtype=parse_kv_dtype(kv_dtype))
        self._ranks = None
        if self.plan.world_size == 1:
            self._local = _Driver(LocalStages(spec, self.source, progress=progress))
            return
        self._local = None
        self._conn, child_conn = mp.get_context("spawn").Pipe()
        self._ranks = world.Ranks(_rank_main, range(self.plan.world_size), spec, child_conn)
        try:
            self._expect("ready", startup_timeout, progress)
        except BaseException:
            self.close()
            raise

    def _expect(self, kind: str, timeout: float, progress=None):
        """The value of rank 0's next ``kind`` message; ``loading`` ones on the way go to ``progress``."""
        deadline = time.monotonic() + timeout
        while True:
            if self._conn.poll(0.2):
                got, value = self._recv()
                if got == "loading":
                    if progress is not None:
                        progress(*value)
                    continue
                if got != kind:
                    raise P2PServeError(f"rank 0 sent {got!r} where {kind!r} was expected")
                return value
            self._ranks.check()
            if time.monotonic() > deadline:
                raise P2PServeError(f"the pipeline did not answer within {timeout:.0f} s")

    def _recv(self):
        """The next message from rank 0; if rank 0 is gone, the error of the rank that
        failed first (rank 0 exits as soon as a rank it talks to dies, often before the
        poll loop has seen that rank's death)."""
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._ranks.join(timeout=2)
            self._ranks.check()
            raise P2PServeError("rank 0 of the pipeline closed its pipe") from None

    def stream(self, prompt: list[int], params: SamplingParams, *, stop_on_eos: bool = True,
               capture_logits: bool = False, step_timeout: float = 300) -> Iterator[int | Generation]:
        """Yield each token as it is sampled, then the finished Generation."""
        _check_length(self.config, len(prompt), params)
        if self._local is not None:
            yield from self._local.generate(prompt, params, stop_on_eos, capture_logits)
            return
        self._conn.send(("generate", (list(prompt), params, stop_on_eos, capture_logits)))
        while True:
            deadline = time.monotonic() + step_timeout
            while not self._conn.poll(0.2):
                self._ranks.check()
                if time.monotonic() > deadline:
                    raise P2PServeError(f"no token within {step_timeout:.0f} s")
            kind, value = self._recv()
            yield value
            if kind == "done":
                return

    def generate(self, prompt: list[int], params: SamplingParams, *, stop_on_eos: bool = True,
                 capture_logits: bool = False, on_token: Callable[[int], None] | None = None) -> Generation:
        for item in self.stream(prompt, params, stop_on_eos=stop_on_eos, capture_logits=capture_logits):
            if isinstance(item, Generation):
                return item
            if on_token is not None:
                on_token(item)
        raise P2PServeError("the pipeline ended without finishing the answer")

    def close(self) -> None:
        if self._ranks is not None:
            self._ranks.stop(lambda: self._conn.send(("stop", None)))
            self._ranks = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
