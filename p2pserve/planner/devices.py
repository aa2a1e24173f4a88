"""Devices a swarm has: a catalogue of common GPUs, and the ``--devices`` spec.

A spec lists devices as comma-separated items ``[COUNTx]NAME[(KEY=VALUE,...)][@MACHINE]``:

    4xA6000@m1,2xA5000@m2,2xA4000@m3           8 catalogue GPUs on three machines
    2xcustom(mem=24GB,tflops=35,bw=900GB/s)@m4  two GPUs described by their numbers
    cpu(mem=16GB)                               a catalogue entry with one figure overridden

Keys: ``mem`` (memory, GB), ``tflops`` (dense fp16 matmul TFLOP/s), ``bw`` (memory
bandwidth, GB/s), ``link`` (bandwidth between devices of that machine, GB/s). ``custom``
needs the first three. Items without ``@MACHINE`` share the machine ``local``. A TP group
is always devices of one machine.

Units: memory sizes are binary, as GPU datasheets print them (``48GB`` = 48 GiB);
bandwidths are decimal (``900GB/s`` = 9e11 B/s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property

from p2pserve.errors import ConfigError

GiB = 2**30
# The share of each device's memory a worker gives its KV cache by default (node/budget.py,
# DEFAULT_SHARE): the planner keeps it free of weights, so the sessions a worker then
# holds, and their activations, fit beside the layers it was planned to hold.
KV_SHARE = 0.1


@dataclass(frozen=True)
class Link:
    bandwidth: float  # bytes/s, one direction
    latency: float  # seconds for a small message (an all-reduce of a few bytes, a frame)


PCIE4 = Link(20e9, 15e-6)  # practical PCIe 4.0 x16 through NCCL
PCIE3 = Link(10e9, 15e-6)
NVLINK2 = Link(150e9, 8e-6)  # V100 SXM2
NVLINK3 = Link(300e9, 8e-6)  # A100 SXM4
NVLINK4 = Link(450e9, 8e-6)  # H100 SXM5
HOST = Link(10e9, 50e-6)  # gloo over shared memory between CPU processes
INTER_MACHINE = Link(1.25e9, 0.5e-3)  # 10 Gbit/s Ethernet
# One hop of a p2pserve swarm: a libp2p stream (Noise, Yamux, msgpack frames in Python), whose
# software, not the wire, is the bound on a LAN; bench/hop.py measures it on loopback.
LIBP2P = Link(30e6, 1e-3)


@dataclass(frozen=True)
class DeviceType:
    name: str
    memory: float  # bytes
    flops: float  # dense fp16 matmul FLOP/s (tensor cores on GPUs)
    bandwidth: float  # memory bytes/s
    link: Link  # to the other devices of its machine
    kind: str = "gpu"  # "gpu" | "cpu": picks the software overhead per layer
    reserved: float = 0.5 * GiB  # CUDA context and allocator slack, never usable
    layer_overhead: float | None = None  # measured s per layer per step beyond bytes; None: CostParams'

    @property
    def usable_memory(self) -> float:
        return self.memory - self.reserved

    def __hash__(self):  # cheap: the planner hashes kinds a great deal
        return hash((self.name, self.memory, self.flops, self.bandwidth))


def _gpu(name, mem_gib, tflops, bw_gbs, link=PCIE4):
    return DeviceType(name, mem_gib * GiB, tflops * 1e12, bw_gbs * 1e9, link)


# Datasheet figures: memory, dense fp16 tensor TFLOP/s (fp32 accumulate), memory GB/s.
CATALOGUE: dict[str, DeviceType] = {
    d.name: d
    for d in (
        _gpu("A100-40G", 40, 312, 1555, NVLINK3),
        _gpu("A100-80G", 80, 312, 2039, NVLINK3),
        _gpu("H100", 80, 989, 3350, NVLINK4),
        _gpu("A6000", 48, 154.8, 768),
        _gpu("A5000", 24, 111.1, 768),
        _gpu("A4000", 16, 76.7, 448),
        _gpu("RTX3090", 24, 71, 936),
        _gpu("RTX4090", 24, 165.2, 1008),
        _gpu("L4", 24, 121, 300),
        _gpu("T4", 16, 65, 320, PCIE3),
        _gpu("V100", 32, 125, 900, NVLINK2),
        _gpu("V100-16G", 16, 125, 900, NVLINK2),
        # A nominal server CPU; describe yours with cpu(mem=..,tflops=..,bw=..) or measure it.
        DeviceType("cpu", 32 * GiB, 1e12, 50e9, HOST, kind="cpu", reserved=1 * GiB),
    )
}

ALIASES = {"h10080g": "H100", "3090": "RTX3090", "4090": "RTX4090", "rtxa6000": "A6000",
           "rtxa5000": "A5000", "rtxa4000": "A4000", "v10032g": "V100", "a10040g": "A100-40G",
           "a10080g": "A100-80G", "v100sxm2": "V100", "teslat4": "T4"}
VENDOR_WORDS = ("nvidia", "geforce", "tesla", "quadro")  # "NVIDIA GeForce RTX 3090" is an RTX3090


def _norm(name: str) -> str:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for word in VENDOR_WORDS:
        if key.startswith(word) and len(key) > len(word):
            key = key[len(word):]
    return key


_BY_NORM = {_norm(n): n for n in CATALOGUE} | {k: v for k, v in ALIASES.items()}


def _kind_order(kind: DeviceType) -> tuple:
    return (kind.name, kind.memory, kind.flops, kind.bandwidth, kind.link.bandwidth, kind.link.latency,
            kind.kind, kind.reserved, -1.0 if kind.layer_overhead is None else kind.layer_overhead)


@dataclass(frozen=True)
class Device:
    kind: DeviceType
    machine: str
    index: int  # position in the spec: keeps devices of one kind apart

    def __hash__(self):
        return hash((self.index, self.machine, self.kind.name))

    @property
    def label(self) -> str:
        return f"{self.kind.name}@{self.machine}"


@dataclass(frozen=True)
class Group:
    """A stage's TP group: devices of one machine that run the same layers in lockstep."""

    devices: tuple[Device, ...]

    @property
    def machine(self) -> str:
        return self.devices[0].machine

    @property
    def tp(self) -> int:
        return len(self.devices)

    @cached_property
    def kinds(self) -> tuple[DeviceType, ...]:
        return tuple(sorted((d.kind for d in self.devices), key=_kind_order))

    @cached_property
    def signature(self) -> tuple:
        """What the cost model sees: groups with equal signatures are interchangeable."""
        return (self.machine, tuple(_kind_order(k) for k in self.kinds))

    @property
    def label(self) -> str:
        names = [k.name for k in self.kinds]
        parts = [f"{names.count(n)}x{n}" for n in dict.fromkeys(names)]
        return "+".join(parts) + f"@{self.machine}"


SYNTAX = ("expected COUNTxNAME[(mem=GB,tflops=T,bw=GB/s,link=GB/s)][@MACHINE], comma-separated, "
          "e.g. 4xA6000@m1,2xcustom(mem=24GB,tflops=35,bw=900GB/s)@m2")

_ITEM = re.compile(
    r"^(?:(?P<count>\d+)\s*[xX*]\s*)?(?P<name>[A-Za-z0-9][A-Za-z0-9_.\- ]*?)\s*"
    r"(?:\((?P<opts>[^()]*)\))?\s*(?:@\s*(?P<machine>[A-Za-z0-9_.\-:]+))?$"
)
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_MEM_UNITS = {"": GiB, "gb": GiB, "gib": GiB, "g": GiB, "mb": 2**20, "mib": 2**20, "tb": 2**40, "tib": 2**40}
_BW_UNITS = {"": 1e9, "gb/s": 1e9, "gbps": 1e9 / 8, "gbit/s": 1e9 / 8, "mb/s": 1e6, "tb/s": 1e12}


def _quantity(text: str, units: dict[str, float], what: str) -> float:
    m = re.fullmatch(_NUMBER + r"\s*([A-Za-z/]*)", text.strip())
    unit = m and m.group(2).lower()
    if not m or unit not in units:
        raise ValueError(f"{what} {text!r} is not a number with a unit ({', '.join(u for u in units if u)})")
    value = float(m.group(1)) * units[unit]
    if value <= 0:
        raise ValueError(f"{what} must be positive, got {text!r}")
    return value


def _with_options(kind: DeviceType, opts: str) -> DeviceType:
    fields = {}
    for pair in opts.split(","):
        if not pair.strip():
            continue
        key, eq, value = pair.partition("=")
        key = key.strip().lower()
        if not eq:
            raise ValueError(f"option {pair.strip()!r} needs a value: KEY=VALUE")
        if key == "mem":
            fields["memory"] = _quantity(value, _MEM_UNITS, "mem")
        elif key == "tflops":
            fields["flops"] = _quantity(value, {"": 1e12, "tflops": 1e12}, "tflops")
        elif key == "bw":
            fields["bandwidth"] = _quantity(value, _BW_UNITS, "bw")
        elif key == "link":
            fields["link"] = Link(_quantity(value, _BW_UNITS, "link"), kind.link.latency)
        else:
            raise ValueError(f"unknown option {key!r} (known: mem, tflops, bw, link)")
    if kind.name == "custom":
        missing = [k for k, f in (("mem", "memory"), ("tflops", "flops"), ("bw", "bandwidth")) if f not in fields]
        if missing:
            raise ValueError(f"custom devices need {', '.join(missing)}")
    kind = replace(kind, **fields)
    if kind.memory <= kind.reserved:
        raise ValueError(f"mem must be above the {kind.reserved / GiB:g} GB a {kind.kind} keeps for itself")
    return kind


def lookup(name: str) -> DeviceType:
    """A catalogue entry by name, case, spaces and punctuation ignored, vendor words and a
    missing family prefix too: ``RTX 3090``, ``rtx3090``, ``3090``, ``NVIDIA A100-80GB``."""
    norm = _norm(name)
    key = _BY_NORM.get(norm) or _BY_NORM.get(norm.removesuffix("b"))  # "80GB" as "80G"
    # "3090" of "rtx3090" (one catalogue name ends with it), "a100" of "a100-40g" and "a100-80g"
    for found in ({v for k, v in _BY_NORM.items() if k.endswith(norm)},
                  {v for k, v in _BY_NORM.items() if k.startswith(norm)}):
        if key is not None or not norm or not found:
            continue
        if len(found) > 1:
            raise ConfigError(f"device {name!r} is ambiguous: {' or '.join(sorted(found))}?")
        key = found.pop()
    if key is None:
        raise ConfigError(f"unknown device {name!r}: known devices are {', '.join(CATALOGUE)}, "
                          f"or describe it as custom(mem=GB,tflops=T,bw=GB/s)")
    return CATALOGUE[key]


def parse_devices(spec: str) -> list[Device]:
    """``"4xA6000@m1,2xA5000@m2"`` -> 6 devices. Raises ConfigError naming the bad part."""
    devices: list[Device] = []
    for item in _split_items(spec):
        m = _ITEM.match(item)
        if not m:
            raise ConfigError(f"bad --devices entry {item!r}: {SYNTAX}")
        count = int(m["count"] or 1)
        if not 1 <= count <= 4096:
            raise ConfigError(f"bad --devices entry {item!r}: the count must be 1 to 4096")
        name = m["name"]
        if _norm(name) == "custom":
            kind = DeviceType("custom", 0.0, 0.0, 0.0, PCIE4)
        else:
            count_first = re.match(r"(\d+)\s+(\S.*)", name)
            if count_first and not m["count"]:
                raise ConfigError(f"bad --devices entry {item!r}: write the count as "
                                  f"{count_first[1]}x{count_first[2]}; {SYNTAX}")
            try:
                kind = lookup(name)
            except ConfigError as e:
                raise ConfigError(f"bad --devices entry {item!r}: {e}") from None
        try:
            kind = _with_options(kind, m["opts"] or "")
        except ValueError as e:
            raise ConfigError(f"bad --devices entry {item!r}: {e}; {SYNTAX}") from None
        machine = m["machine"] or "local"
        devices += [Device(kind, machine, len(devices) + i) for i in range(count)]
    return devices


def _split_items(spec: str) -> list[str]:
    """Split on commas outside parentheses; an empty spec or item is an error."""
    items, depth, current = [], 0, ""
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += ch
    items.append(current.strip())
    if depth != 0:
        raise ConfigError(f"bad --devices spec {spec!r}: unbalanced parentheses; {SYNTAX}")
    if not any(items) or not all(items):
        raise ConfigError(f"bad --devices spec {spec!r}: empty entry; {SYNTAX}")
    return items


def parse_link(text: str) -> Link:
    """``"1.25GB/s,0.5ms"`` or ``"10Gbit/s,0.5ms"`` -> Link."""
    bw, sep, lat = text.partition(",")
    try:
        bandwidth = _quantity(bw, _BW_UNITS, "bandwidth")
        m = re.fullmatch(_NUMBER + r"\s*(ms|us|s)", lat.strip()) if sep else None
        if not m:
            raise ValueError(f"latency {lat.strip()!r} is not a number with a unit (ms, us, s)")
    except ValueError as e:
        raise ConfigError(f"bad link {text!r}: {e}; expected BANDWIDTH,LATENCY e.g. 1.25GB/s,0.5ms") from None
    scale = {"ms": 1e-3, "us": 1e-6, "s": 1.0}[m.group(2)]
    return Link(bandwidth, float(m.group(1)) * scale)
