"""Pipeline schedules as plain data: the order in which one stage runs the forward (F)
and backward (B) passes of its micro-batches.

Both schedules run micro-batches in order in each direction, so the activations and
gradients between two stages arrive in the order they are read.
"""

from __future__ import annotations

SCHEDULES = ("gpipe", "1f1b")


def schedule(kind: str, chunks: int, n_stages: int, stage: int) -> list[tuple[str, int]]:
    """``[("F", 0), ..., ("B", 0), ...]`` for stage ``stage`` of ``n_stages``."""
    if kind == "gpipe":
        # Every forward, then every backward: simplest, holds all micro-batches' activations.
        return [("F", m) for m in range(chunks)] + [("B", m) for m in range(chunks)]
    if kind == "1f1b":
        # Warm up with as many forwards as stages after this one, then alternate: a stage
        # holds at most n_stages - stage micro-batches' activations at once.
        warmup = min(n_stages - stage - 1, chunks)
        out = [("F", m) for m in range(warmup)]
        for m in range(chunks - warmup):
            out += [("F", warmup + m), ("B", m)]
        return out + [("B", m) for m in range(chunks - warmup, chunks)]
    raise ValueError(f"unknown schedule {kind!r}: use one of {', '.join(SCHEDULES)}")
