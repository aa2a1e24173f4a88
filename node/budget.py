"""How many sessions a worker can hold: its KV-cache memory budget."""

from __future__ import annotations

import os

import torch

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import ConfigError
from p2pserve.engine.tp import split_evenly

DEFAULT_SHARE = 0.1  # of the device's total memory (several workers may share a machine)
MAX_DEFAULT_SESSIONS = 16


def kv_bytes_per_session(config: ModelConfig, n_layers: int, tp: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes of K and V one session needs on the busiest TP rank (it holds the most KV heads);
    an int8 cache's with its fp32 scale a head's row (model.KVCache)."""
    heads = max(b - a for a, b in split_evenly(config.n_kv_heads, tp))
    row = config.head_dim * dtype.itemsize + (4 if dtype == torch.int8 else 0)
    return 2 * n_layers * heads * row * max_len


def total_memory(device: str) -> int:
    # total, not free: a default that changes with whatever else runs at start-up would
    # make a worker's capacity a matter of luck
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def parse_size(text: str) -> int:
    units = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30, "TB": 2**40}
    t = text.strip().upper().replace("IB", "B")
    num = t.rstrip("KMGTB")
    try:
        return int(float(num) * units[t[len(num):]])
    except (ValueError, KeyError):
        raise ConfigError(f"bad memory size {text!r}: use e.g. 512MB or 4GB") from None


def max_sessions(config: ModelConfig, n_layers: int, tp: int, max_len: int, dtype: torch.dtype,
                 device: str, kv_memory: str | None = None) -> int:
    """Sessions that fit in ``kv_memory`` (or a share of the free memory), at least one."""
    per_session = kv_bytes_per_session(config, n_layers, tp, max_len, dtype)
    budget = parse_size(kv_memory) if kv_memory else int(total_memory(device) * DEFAULT_SHARE)
    n = budget // per_session
    if kv_memory and n < 1:
        raise ConfigError(f"--kv-memory {kv_memory} holds no session: one needs "
                          f"{per_session / 2**20:.0f} MB at --max-seq-len {max_len}")
    return int(max(1, min(n, MAX_DEFAULT_SESSIONS if not kv_memory else n)))
