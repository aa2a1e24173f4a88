"""Tolerances for comparing float results computed two ways (kernels blocked differently,
prefill cut into pieces, another CPU's vector width).

Rounding in a dot product of length n is bounded by about n·eps·|terms|, and a stack of
layers adds each layer's share. So the tolerance follows from the dtype, the scale of the
values and the length of the reductions behind them, not from a constant that happened
to pass on one CPU. Token-identity checks never use this.
"""

from __future__ import annotations

import torch


def stack_reduction_length(config, n_layers: int) -> int:
    """The reductions behind one hidden state after ``n_layers`` decoder layers: per layer,
    q/k/v and the gate/up projections reduce over the hidden size, o over the heads,
    down over the intermediate size."""
    return n_layers * (2 * config.hidden_size + config.n_heads * config.head_dim + config.intermediate_size)


def rounding_tolerance(expected: torch.Tensor, reduction_length: int) -> dict:
    """``atol``/``rtol`` for ``torch.testing.assert_close`` against ``expected``."""
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, expected.abs().max().item())
    return dict(atol=eps * reduction_length * scale, rtol=eps * reduction_length)
