"""Measure the local device as the engine uses it: FLOP/s, weight-streaming bytes/s and the
software cost of a layer, the three figures the cost model needs.

``measure_device("cpu")`` (or ``"cuda:0"``) runs decode steps and a short prefill through
the engine's own decoder layers (``p2pserve.engine.build`` / ``p2pserve.engine.model``, constant weights):

- a *narrow* model (hidden 64), whose bytes cost nothing: its decode step per layer is the
  layer's software cost (dispatching ~30 small ops; on a busy CPU, waiting for threads);
- a *wide* model (hidden ``hidden``, two layers of 67 MB in fp32, past the caches): its decode step
  per layer, less that software cost, gives the bytes/s the engine streams weights at;
  its prefill of ``PREFILL_TOKENS`` tokens gives the FLOP/s.

Each figure is the *median* of repeated steps over ``BUDGET_S``: the device as it typically
runs here, the load of other processes included, not at its rare best. That takes about
two seconds; the result is cached in ``~/.cache/p2pserve/devices.json``
(``P2PSERVE_CACHE_DIR`` overrides the directory), keyed by device name, torch version and
thread count; ``refresh=True`` measures again. Workers announce these figures in their DHT
records; ``DeviceSpeed.device_type()`` turns them into a planner device.

torch and the engine are imported inside the functions that measure: the package imports
this module, and the rest of the planner (``p2pserve plan``) runs without torch.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from p2pserve.planner.devices import HOST, PCIE4, DeviceType, GiB

BUDGET_S = 0.25  # seconds per timed figure
PREFILL_TOKENS = 32  # a short prompt: the prefill rate of chat-sized prompts


@dataclass(frozen=True)
class DeviceSpeed:
    name: str
    flops: float  # FLOP/s of the engine's prefill in ``dtype``
    bandwidth: float  # bytes/s the engine streams weights at in a decode step
    memory: float  # bytes
    dtype: str
    torch_version: str
    threads: int
    layer_overhead: float | None = None  # s per decoder layer per decode step beyond moving bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DeviceSpeed":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def device_type(self) -> DeviceType:
        on_cpu = self.name.startswith("cpu")
        # The planner's flop figure is an fp16 rate; a measured rate is already in the dtype served.
        return DeviceType(self.name, self.memory, self.flops, self.bandwidth, HOST if on_cpu else PCIE4,
                          kind="cpu" if on_cpu else "gpu", reserved=(1 if on_cpu else 0.5) * GiB,
                          layer_overhead=self.layer_overhead)


def cache_path() -> Path:
    base = os.environ.get("P2PSERVE_CACHE_DIR") or Path.home() / ".cache" / "p2pserve"
    return Path(base) / "devices.json"


def measure_device(device: str = "cpu", *, hidden: int = 1024, refresh: bool = False) -> DeviceSpeed:
    """The figures of ``device`` ("cpu", "cuda", "cuda:1"), from the cache if measured."""
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
    overhead, bandwidth, flops = _engine_figures(dev, dtype, hidden)
    speed = DeviceSpeed(
        name=name,
        flops=flops,
        bandwidth=bandwidth,
        layer_overhead=overhead,
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


def _median_time(fn, dev, budget=BUDGET_S, least: int = 3) -> float:
    """The median of repeated runs within ``budget`` seconds (at least ``least``, after a warm-up)."""
    import statistics

    import torch

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    fn()
    sync()
    times, deadline = [], time.perf_counter() + budget
    while time.perf_counter() < deadline or len(times) < least:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class _ConstantWeights:
    """A weight source of constant tensors in a model's Hugging Face shapes: timing needs
    shapes, not values."""

    def __init__(self, config):
        self.config = config

    def get(self, name: str, rows=None, cols=None):
        import torch

        c, hd = self.config, self.config.head_dim
        shapes = {"q_proj": (c.n_heads * hd, c.hidden_size), "k_proj": (c.n_kv_heads * hd, c.hidden_size),
                  "v_proj": (c.n_kv_heads * hd, c.hidden_size), "o_proj": (c.hidden_size, c.n_heads * hd),
                  "gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
                  "down_proj": (c.hidden_size, c.intermediate_size)}
        t = torch.full(shapes.get(name.split(".")[-2], (c.hidden_size,)), 0.01)
        t = t if rows is None else t[rows[0]: rows[1]]
        return t if cols is None else t[:, cols[0]: cols[1]]


def _probe(dev, dtype, hidden: int, layers: int):
    """``layers`` middle layers of a Llama of width ``hidden`` on ``dev``, and a step function."""
    import torch

    from p2pserve.engine.config import ModelConfig
    from p2pserve.engine.build import load_stage
    from p2pserve.engine.model import Batch

    heads = max(1, hidden // 64)
    config = ModelConfig(name="probe", n_layers=layers + 2, hidden_size=hidden, n_heads=heads, n_kv_heads=heads,
                         head_dim=hidden // heads, intermediate_size=4 * hidden, vocab_size=256)
    model = load_stage(_ConstantWeights(config), 1, layers + 1, device=dev, dtype=dtype)
    model.allocate(1, 2 * PREFILL_TOKENS)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) / layers

    @torch.inference_mode()
    def step(tokens: int):
        x = torch.full((1, tokens, hidden), 0.01, device=dev, dtype=dtype)
        # a decode step attends over a prompt's worth of keys, as one after a short prompt does
        return lambda: model.forward_layers(x, Batch((0,), (PREFILL_TOKENS if tokens == 1 else 0,), tokens))

    return step, weight_bytes, 2 * weight_bytes / dtype.itemsize  # bytes and FLOPs per token per layer


def _engine_figures(dev, dtype, hidden: int) -> tuple[float, float, float]:
    """(seconds of software per layer, weight bytes/s, FLOP/s) of the engine's layers."""
    narrow_layers, wide_layers = 8, 2
    narrow, _, _ = _probe(dev, dtype, 64, narrow_layers)
    overhead = _median_time(narrow(1), dev) / narrow_layers
    wide, weight_bytes, flops = _probe(dev, dtype, hidden, wide_layers)
    # what the wide layers take beyond their software cost (never less than a tenth of their time)
    decode = _median_time(wide(1), dev) / wide_layers
    prefill = _median_time(wide(PREFILL_TOKENS), dev, least=2) / wide_layers
    return (overhead, weight_bytes / max(decode - overhead, decode / 10),
            flops * PREFILL_TOKENS / max(prefill - overhead, prefill / 10))


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
