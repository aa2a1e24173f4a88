"""Measure the local device: matmul FLOP/s and memory bandwidth, as the cost model uses them.

``measure_device("cpu")`` (or ``"cuda:0"``) times a few matmuls of prefill-like shape
(compute-bound: FLOP/s) and matrix-vector products of decode-like shape (bound by reading
the weights: bytes/s), about two seconds in all, and caches the result in
``~/.cache/p2pserve/devices.json`` (``P2PSERVE_CACHE_DIR`` overrides the directory), keyed by
device name, torch version and thread count. Workers announce these figures in their DHT
records; ``DeviceSpeed.device_type()`` turns them into a planner device.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .devices import HOST, PCIE4, DeviceType, GiB

BUDGET_S = 0.25  # per timed shape


@dataclass(frozen=True)
class DeviceSpeed:
    name: str
    flops: float  # matmul FLOP/s in ``dtype``
    bandwidth: float  # bytes/s, reading weights in a matrix-vector product
    copy_bandwidth: float  # bytes/s, read + write of a large copy
    memory: float  # bytes
    dtype: str
    torch_version: str
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceSpeed":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def device_type(self) -> DeviceType:
        on_cpu = self.name.startswith("cpu")
        # The planner's flop figure is an fp16 rate; a measured rate is already in the dtype served.
        return DeviceType(self.name, self.memory, self.flops, self.bandwidth, HOST if on_cpu else PCIE4,
                          kind="cpu" if on_cpu else "gpu", reserved=(1 if on_cpu else 0.5) * GiB)


def cache_path() -> Path:
    base = os.environ.get("P2PSERVE_CACHE_DIR") or Path.home() / ".cache" / "p2pserve"
    return Path(base) / "devices.json"


def measure_device(device: str = "cpu", *, hidden: int = 2048, refresh: bool = False) -> DeviceSpeed:
    """FLOP/s and bandwidth of ``device`` ("cpu", "cuda", "cuda:1"), from the cache if measured."""
    import torch

    dev = torch.device(device)
    name, memory = describe_device(dev)
    threads = torch.get_num_threads()
    key = _key(name, torch.__version__, threads)
    path = cache_path()
    cache = _read(path)
    if key in cache and not refresh:
        try:
            return DeviceSpeed.from_dict(cache[key])
        except (KeyError, TypeError):
            pass
    dtype = torch.float32 if dev.type == "cpu" else torch.float16
    speed = DeviceSpeed(
        name=name,
        flops=_matmul_flops(dev, dtype, hidden),
        bandwidth=_matvec_bandwidth(dev, dtype, hidden),
        copy_bandwidth=_copy_bandwidth(dev),
        memory=memory,
        dtype=str(dtype).removeprefix("torch."),
        torch_version=torch.__version__,
        threads=threads,
    )
    cache[key] = speed.to_dict()
    _write(path, cache)
    return speed


def remember(speed: DeviceSpeed) -> None:
    """Cache ``speed`` as if ``measure_device`` had measured it: to describe a device by hand
    (less memory than it has, say), or to give tests a known device."""
    path = cache_path()
    cache = _read(path)
    cache[_key(speed.name, speed.torch_version, speed.threads)] = speed.to_dict()
    _write(path, cache)


def _key(name: str, torch_version: str, threads: int) -> str:
    return f"{name}|torch {torch_version}|threads {threads}"


def describe_device(dev) -> tuple[str, float]:
    import torch

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return props.name, float(props.total_memory)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        memory = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        memory = 8.0 * GiB
    return f"cpu ({model})", memory


def _best_time(fn, dev, budget=BUDGET_S) -> float:
    """The fastest of repeated runs within ``budget`` seconds (after one warm-up)."""
    import torch

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    best, deadline = float("inf"), time.perf_counter() + budget
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _matmul_flops(dev, dtype, hidden) -> float:
    import torch
    import torch.nn.functional as F

    rates = []
    for tokens in (128, 512):  # prefill-like: a prompt's rows against a square weight
        a = torch.full((tokens, hidden), 0.01, device=dev, dtype=dtype)
        w = torch.full((hidden, hidden), 0.01, device=dev, dtype=dtype)
        rates.append(2 * tokens * hidden * hidden / _best_time(lambda a=a, w=w: F.linear(a, w), dev))
    return max(rates)


def _matvec_bandwidth(dev, dtype, hidden) -> float:
    import torch
    import torch.nn.functional as F

    # decode-like: one token against an MLP-sized weight, large enough to leave the caches
    w = torch.full((4 * hidden, 2 * hidden), 0.01, device=dev, dtype=dtype)
    x = torch.full((1, 2 * hidden), 0.01, device=dev, dtype=dtype)
    bytes_read = w.numel() * w.element_size()
    return bytes_read / _best_time(lambda: F.linear(x, w), dev)


def _copy_bandwidth(dev) -> float:
    import torch

    src = torch.zeros(16 * 2**20, device=dev, dtype=torch.float32)  # 64 MB: past the caches
    dst = torch.zeros_like(src)
    return 2 * src.numel() * 4 / _best_time(lambda: dst.copy_(src), dev, budget=BUDGET_S / 2)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs a re-measurement next time
