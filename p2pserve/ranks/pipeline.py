"""`p2pserve run`: a whole asymmetric pipeline on this machine, in one torch.distributed world.

HexGen's "independent inference process": no bootstrap, no libp2p. Global ranks are laid
out stage after stage (``Plan.stages``); each stage's TP rank 0 is its leader. Leaders
pass activations down the chain with point-to-point send/recv (gloo on CPU, NCCL on
CUDA), the last leader samples and sends the token back to global rank 0, which owns
the generation loop. A one-rank plan runs in this process; larger plans run every rank
in a child process and talk to rank 0 over a pipe, so that a dead rank is an error
here rather than a hang.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from p2pserve.errors import ConfigError, P2PServeError
from p2pserve.heap import freeze_startup_heap
from p2pserve.engine.build import load_stage
from p2pserve.ranks.shm import all_reduce_for
from p2pserve.engine.model import Batch
from p2pserve.plan import Plan
from p2pserve.engine.sampling import SamplingParams, sample
from p2pserve.ranks.stage import OP_ALLOC, OP_STEP, OP_STOP, StageRunner, follow
from p2pserve.engine.weights import open_weights

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds activation memory on long prompts
OP_BEGIN = 3
WANT_LOGITS = 2  # header want_token value: send the token and the logits back to rank 0
HEADER = 8  # float64 pipeline header: op, n_tokens, start, want_token, temperature, top_k, top_p, seed
# Stage to stage, the header travels in one message with room for one token's hidden
# state: a decode step's activations ride along (one gloo/NCCL message per hop instead of
# two); a longer step sends its [n, hidden] states in a second message.


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}: use fp32, bf16 or fp16")
    return table[name]


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


def generation_loop(step: Callable[[list[int], int, bool], int | None], prompt: list[int],
                    params: SamplingParams, eos: tuple[int, ...], stop_on_eos: bool
                    ) -> Iterator[int | Generation]:
    """Prefill ``prompt`` in chunks, then decode one token at a time; yield each token,
    then the finished Generation.

    ``step(tokens, start, want_token)`` runs ``tokens`` at positions ``start…`` through the
    whole pipeline and returns the sampled next token when ``want_token``.
    """
    t0 = time.perf_counter()
    pos = 0
    token = None
    for i in range(0, len(prompt), PREFILL_CHUNK):
        chunk = prompt[i : i + PREFILL_CHUNK]
        token = step(chunk, pos, pos + len(chunk) == len(prompt))
        pos += len(chunk)
    t_first = time.perf_counter()
    out = []
    while True:
        out.append(token)
        yield token
        if len(out) >= params.max_new_tokens or (stop_on_eos and token in eos):
            break
        token = step([token], pos, True)
        pos += 1
    yield Generation(out, len(prompt), t_first - t0, time.perf_counter() - t_first)


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


def _header(op, n_tokens=0, start=0, want=0, params: SamplingParams | None = None) -> torch.Tensor:
    p = params or SamplingParams()
    seed = -1 if p.seed is None else p.seed
    return torch.tensor([op, n_tokens, start, want, p.temperature, p.top_k, p.top_p, seed],
                        dtype=torch.float64)


def _params_from_header(h: list[float], max_new_tokens: int = 1) -> SamplingParams:
    seed = None if h[7] < 0 else int(h[7])
    return SamplingParams(temperature=h[4], top_k=int(h[5]), top_p=h[6], seed=seed,
                          max_new_tokens=max_new_tokens)


@dataclass
class RankSpec:
    model_path: str | None
    plan: dict
    dtype: str
    device: str
    init_method: str
    threads: int | None  # None: default_threads of the rank's stage


class _Rank:
    """Everything one rank of a one-world pipeline needs, set up from a RankSpec."""

    def __init__(self, rank: int, spec: RankSpec, source=None):
        self.rank = rank
        self.plan = Plan.from_dict(spec.plan)
        torch.set_num_threads(spec.threads or default_threads(self.plan.stage_of_rank(rank).tp))
        device = spec.device
        if device == "cuda":
            device = f"cuda:{rank % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        self.device = device
        groups = [None] * self.plan.n_stages
        if self.plan.world_size > 1:
            backend = "nccl" if device.startswith("cuda") else "gloo"
            dist.init_process_group(backend, init_method=spec.init_method, rank=rank,
                                    world_size=self.plan.world_size,
                                    timeout=datetime.timedelta(minutes=10))
            # every rank creates every group, in the same order
            groups = [dist.new_group(list(s.ranks)) if s.tp > 1 else None for s in self.plan.stages]
        self.stage = self.plan.stage_of_rank(rank)
        self.group = groups[self.stage.index]
        self.source = source or open_weights(spec.model_path)
        self.model = load_stage(self.source, self.stage.start, self.stage.end,
                                rank=rank - self.stage.first_rank, tp=self.stage.tp,
                                all_reduce=all_reduce_for(self.group, device), device=device, dtype=parse_dtype(spec.dtype))
        self.runner = StageRunner(self.model, self.group, self.stage.first_rank)
        stages = self.plan.stages
        i = self.stage.index
        self.prev_leader = stages[i - 1].first_rank if i > 0 else None
        self.next_leader = stages[i + 1].first_rank if i + 1 < len(stages) else None
        self.last_leader = stages[-1].first_rank
        self._hidden_bytes = self.model.config.hidden_size * self.model.dtype.itemsize

    def _send(self, t: torch.Tensor, dst: int):
        dist.send(t.to(self.device) if self.device != "cpu" else t, dst)

    def _recv(self, shape, dtype, src: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        dist.recv(t, src)
        return t

    def _send_header(self, header: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """The header to the next leader, with ``x`` (one token's hidden state) inline."""
        device = x.device if x is not None else header.device
        msg = torch.empty(HEADER * 8 + self._hidden_bytes, dtype=torch.uint8, device=device)
        msg[: HEADER * 8] = header.to(device).view(torch.uint8)
        if x is not None:
            msg[HEADER * 8 :] = x.reshape(-1).view(torch.uint8)
        self._send(msg, self.next_leader)

    def _recv_header(self) -> tuple[list[float], torch.Tensor]:
        """(header values, the inline [1, 1, hidden] state: meaningful on a one-token step)."""
        msg = self._recv(HEADER * 8 + self._hidden_bytes, torch.uint8, self.prev_leader)
        x = msg[HEADER * 8 :].view(self.model.dtype).reshape(1, 1, -1)
        return msg[: HEADER * 8].view(torch.float64).tolist(), x

    def relay(self) -> None:
        """Leader of a stage after the first: serve the chain until told to stop."""
        params = SamplingParams()
        hidden = self.model.config.hidden_size
        while True:
            hl, inline = self._recv_header()
            h = torch.tensor(hl, dtype=torch.float64)
            op = int(hl[0])
            if self.next_leader is not None and op != OP_STEP:
                self._send_header(h)
            if op == OP_STOP:
                self.runner.stop()
                return
            if op == OP_ALLOC:
                self.runner.allocate(1, int(hl[1]))
            elif op == OP_BEGIN:
                params = _params_from_header(hl)
            else:
                n, start, want = int(hl[1]), int(hl[2]), int(hl[3])
                x = inline if n == 1 else self._recv((1, n, hidden), self.model.dtype, self.prev_leader)
                out = self.runner.forward(Batch((0,), (start,), n), x)
                if self.next_leader is None:
                    if want:
                        tok = sample(out[0], params, start + n)
                        self._send(torch.tensor([tok], dtype=torch.int64), 0)
                    if want == WANT_LOGITS:
                        self._send(out[0].float().cpu(), 0)
                else:
                    self._send_step(h, out)

    # ---- rank 0: the driver ----
    def begin(self, need: int, params: SamplingParams) -> None:
        cap = _capacity(need, self.runner.max_len, self.model.config.max_position_embeddings)
        if cap != self.runner.max_len:
            self.runner.allocate(1, cap)
            if self.next_leader is not None:
                self._send_header(_header(OP_ALLOC, cap))
        self.params = params
        if self.next_leader is not None:
            self._send_header(_header(OP_BEGIN, params=params))

    def generate(self, prompt, params, stop_on_eos, capture_logits=False) -> Iterator[int | Generation]:
        self.begin(len(prompt) + params.max_new_tokens, params)
        self.capture_logits = capture_logits
        self.captured_logits = None
        for item in generation_loop(self.step, prompt, params, self.model.config.eos_token_ids, stop_on_eos):
            if isinstance(item, Generation):
                item.prompt_logits = self.captured_logits
            yield item

    def step(self, tokens: list[int], start: int, want: bool) -> int | None:
        n = len(tokens)
        x = torch.tensor([tokens], dtype=torch.int64)
        out = self.runner.forward(Batch((0,), (start,), n), x)
        capture = want and self.capture_logits and self.captured_logits is None
        if self.next_leader is None:
            if capture:
                self.captured_logits = out[0].float().cpu()
            return sample(out[0], self.params, start + n) if want else None
        want_code = WANT_LOGITS if capture else int(want)
        self._send_step(_header(OP_STEP, n, start, want_code), out)
        if not want:
            return None
        token = int(self._recv(1, torch.int64, self.last_leader).item())
        if capture:
            self.captured_logits = self._recv(self.model.config.vocab_size, torch.float32, self.last_leader).cpu()
        return token

    def stop(self) -> None:
        if self.next_leader is not None:
            self._send_header(_header(OP_STOP))
        self.runner.stop()

    def _send_step(self, header: torch.Tensor, out: torch.Tensor) -> None:
        if out.shape[1] == 1:  # one token: its state rides in the header's message
            self._send_header(header, out)
        else:
            self._send_header(header)
            self._send(out.contiguous(), self.next_leader)


def _rank_main(rank: int, spec: RankSpec, conn, errors) -> None:
    try:
        r = _Rank(rank, spec)
        freeze_startup_heap()  # full GC passes must not walk the model and torch
        if r.stage.first_rank != rank:
            follow(r.model, r.group, r.stage.first_rank)
        elif rank != 0:
            r.relay()
        else:
            _serve_driver(r, conn)
        dist.destroy_process_group()
    except BaseException as e:  # report to the parent, which owns the terminal
        msg = str(e) if isinstance(e, P2PServeError) else f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        errors.put((rank, msg))
        raise SystemExit(1)


def _serve_driver(r: _Rank, conn) -> None:
    conn.send(("ready", None))
    while True:
        cmd, arg = conn.recv()
        if cmd == "stop":
            r.stop()
            return
        prompt, params, stop_on_eos, capture_logits = arg
        for item in r.generate(prompt, params, stop_on_eos, capture_logits):
            conn.send(("done", item) if isinstance(item, Generation) else ("token", item))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_threads(tp: int) -> int:
    """Torch threads for a rank of a stage of TP degree ``tp``: stages take turns on a
    sequence, so each may use every core, but the ranks of a TP group compute at once and
    share them (``p2pserve/__init__.py``'s GOMP_SPINCOUNT is why a waiting stage does not
    steal the working one's cores)."""
    return max(1, (os.cpu_count() or 1) // tp)


class LocalPipeline:
    """A plan running on this machine. ``generate`` is the whole public surface."""

    def __init__(self, model_path=None, plan: Plan | None = None, *, dtype: str = "fp32",
                 device: str = "cpu", threads: int | None = None, startup_timeout: float = 600):
        self.source = open_weights(model_path)
        self.config = self.source.config
        self.plan = plan or Plan.single(self.config.n_layers)
        self.plan.check_model(self.config)
        device = resolve_device(device)
        parse_dtype(dtype)
        self._procs: list = []
        spec = RankSpec(None if model_path is None else str(model_path), self.plan.to_dict(),
                        dtype, device, f"tcp://127.0.0.1:{free_port()}", threads)
        if self.plan.world_size == 1:
            self._local = _Rank(0, spec, self.source)
            return
        self._local = None
        ctx = mp.get_context("spawn")
        self._errors = ctx.Queue()
        self._conn, child_conn = ctx.Pipe()
        for rank in range(self.plan.world_size):
            p = ctx.Process(target=_rank_main, args=(rank, spec, child_conn if rank == 0 else None,
                                                     self._errors), daemon=True)
            p.start()
            self._procs.append(p)
        try:
            self._expect("ready", startup_timeout)
        except BaseException:
            self.close()
            raise

    def _expect(self, kind: str, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            if self._conn.poll(0.2):
                got, value = self._recv()
                if got != kind:
                    raise P2PServeError(f"rank 0 sent {got!r} where {kind!r} was expected")
                return value
            self._check_ranks()
            if time.monotonic() > deadline:
                raise P2PServeError(f"the pipeline did not answer within {timeout:.0f} s")

    def _recv(self):
        """The next message from rank 0; if rank 0 is gone, the error of the rank that
        failed first (rank 0 exits as soon as a rank it talks to dies, often before the
        poll loop has seen that rank's death)."""
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            for p in self._procs:
                p.join(timeout=2)
            self._check_ranks()
            raise P2PServeError("rank 0 of the pipeline closed its pipe") from None

    def _check_ranks(self) -> None:
        dead = [(i, p.exitcode) for i, p in enumerate(self._procs) if p.exitcode is not None]
        if not dead:
            return
        killed = [(i, code) for i, code in dead if code < 0]
        if killed:  # the cause; the others' errors (a reset connection) only follow from it
            rank, code = killed[0]
            raise P2PServeError(f"rank {rank} of the pipeline was killed ({signal.Signals(-code).name})")
        detail = ""
        try:
            rank, detail = self._errors.get(timeout=2)
        except Exception:
            rank = dead[0][0]
        raise P2PServeError(f"rank {rank} of the pipeline failed: {detail or f'exit code {dead[0][1]}'}")

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
                self._check_ranks()
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
        if self._procs:
            try:
                if all(p.is_alive() for p in self._procs):
                    self._conn.send(("stop", None))
            except (OSError, BrokenPipeError):
                pass
            for p in self._procs:
                p.join(timeout=10)
            for p in self._procs:
                if p.is_alive():
                    p.kill()
                    p.join(timeout=5)
            self._procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
