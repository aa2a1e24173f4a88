"""The one message format between the ranks of a world: a stage leader to its TP
followers (broadcast), and a stage leader to the next (send/recv).

A message is an int64 header ``(op, a, b)``, and for a step the batch's slots and start
positions and its activations. A step of one token of one sequence (every decode step of
``p2pserve run``) travels whole in one fixed-size message, its state inline: one
gloo/NCCL message per hop instead of three. Larger steps send the meta and the
activations after the header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from p2pserve.engine.model import Batch

OP_STOP, OP_STEP, OP_ALLOC = 0, 1, 2
_HEADER = 5  # op, a, b, and the slot and start of a one-token step
_HEADER_BYTES = _HEADER * 8


@dataclass
class Message:
    op: int
    a: int = 0  # STEP: batch size; ALLOC: slots
    b: int = 0  # STEP: tokens per sequence; ALLOC: positions per slot
    batch: Batch | None = None
    x: torch.Tensor | None = None  # [size, n_tokens, hidden]


class Messenger:
    """Sends and receives messages through ``send(tensor)`` / ``recv(tensor)``: point to
    point or a broadcast, whatever the caller binds. Both ends must agree on the model's
    hidden size and dtype."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device, send: Callable | None,
                 recv: Callable | None):  # None: this end never sends (or receives)
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self._send, self._recv = send, recv
        self._size = _HEADER_BYTES + hidden_size * dtype.itemsize

    def put(self, op: int, a: int = 0, b: int = 0) -> None:
        self._send(self._envelope(op, a, b))

    def put_step(self, batch: Batch, x: torch.Tensor) -> None:
        inline = batch.size == 1 and batch.n_tokens == 1
        env = self._envelope(OP_STEP, batch.size, batch.n_tokens,
                             (batch.slots[0], batch.starts[0]) if inline else (0, 0))
        if inline:
            env[_HEADER_BYTES:] = x.reshape(-1).to(self.device).view(torch.uint8)
        self._send(env)
        if not inline:
            self._send(torch.tensor(batch.slots + batch.starts, dtype=torch.int64, device=self.device))
            self._send(x.to(self.device).contiguous())

    def get(self) -> Message:
        env = torch.empty(self._size, dtype=torch.uint8, device=self.device)
        self._recv(env)
        op, a, b, slot, start = env[:_HEADER_BYTES].view(torch.int64).tolist()
        if op != OP_STEP:
            return Message(op, a, b)
        if a == 1 and b == 1:
            x = env[_HEADER_BYTES:].view(self.dtype).reshape(1, 1, self.hidden_size)
            return Message(op, a, b, Batch((slot,), (start,), 1), x)
        meta = torch.empty(2 * a, dtype=torch.int64, device=self.device)
        self._recv(meta)
        meta = meta.tolist()
        x = torch.empty(a, b, self.hidden_size, dtype=self.dtype, device=self.device)
        self._recv(x)
        return Message(op, a, b, Batch(tuple(meta[:a]), tuple(meta[a:]), b), x)

    def _envelope(self, op: int, a: int, b: int, inline_meta=(0, 0)) -> torch.Tensor:
        env = torch.empty(self._size, dtype=torch.uint8, device=self.device)
        env[:_HEADER_BYTES].view(torch.int64).copy_(
            torch.tensor([op, a, b, *inline_meta], dtype=torch.int64, device=self.device))
        return env
