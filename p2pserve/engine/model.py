"""One pipeline stage of a Llama-family decoder, on one TP rank.

A stage holds decoder layers ``[start, end)``; stage 0 also holds the embedding and the
last stage the final norm and LM head. Only a stage's TP rank 0 (its *leader*) holds
those two: it embeds and samples, and the layers in between run on every rank.

The KV cache is a preallocated buffer of *slots* (one per live sequence), with the length
of each sequence kept by the caller. It is laid out ``[slot, kv_head, position, head_dim]``
(``KVCache``): a head's keys are one stream in memory, as a decode step's attention reads
them, and as SDPA takes them. Where flash-attn reads it, it is
``[slot, position, kv_head, head_dim]``, the layout ``flash_attn_with_kvcache`` takes.

A decode step is one matrix-vector product per weight, bound by how fast the weights
stream from memory: ``pack_linear`` keeps every linear weight in the layout the fastest
kernel at hand streams best (``kernels.gemv`` on CPU), and ``linear`` applies it. A
quantized stage's linear weights are ``quant`` modules instead, which multiply themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from p2pserve.engine import kernels
from p2pserve.engine.config import ModelConfig
from p2pserve.engine.tp import Shard

try:  # GPU fast path; SDPA everywhere else
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - not installed on CPU machines
    flash_attn_with_kvcache = None


def _flash_reads(device) -> bool:
    """Whether the attention on ``device`` is flash-attn's, which takes its own cache layout."""
    return flash_attn_with_kvcache is not None and torch.device(device).type == "cuda"


# oneDNN's linear layer, the op torch.compile's CPU freezing pass emits; None in a torch
# built without oneDNN. Its bf16 path needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which
# an AVX2-only CPU lacks: bf16 weights stay with ``F.linear`` there.
_onednn_linear = None
_onednn_dtypes: tuple[torch.dtype, ...] = ()
if torch.backends.mkldnn.is_available():
    _onednn_linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    _onednn_dtypes = (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() \
        else (torch.float32,)


def _for_kernel(weight: torch.Tensor) -> bool:
    return weight.is_cpu and weight.dtype in kernels.FLOAT_WEIGHTS and kernels.vectorised()


def pack_linear(weight: torch.Tensor) -> torch.Tensor:
    """A linear layer's weight, ``[out, in]``, in the layout ``linear`` multiplies fastest.

    On CPU, fp32 and bf16 weights stay dense ``[out, in]`` for ``kernels.gemv`` and the fused
    decode step, which stream them faster than any library GEMV here (oneDNN's GEMM takes
    batches, dense weights too). Without that kernel they go to oneDNN's packed layout: its
    matrix-vector product streams weights on every core (MKL's fp32 one does not scale past
    one core, and torch's bf16 ``F.linear`` runs at half the speed). Everything else stays
    dense for ``F.linear``.
    """
    if _for_kernel(weight):
        return weight.contiguous()
    if weight.is_cpu and weight.dtype in _onednn_dtypes and _onednn_linear is not None:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    return weight.contiguous()


def kernel_linear(weight):
    """A linear weight as ``kernels.DecodeStep`` takes it, or None where it cannot read it."""
    operands = weight.kernel_operands() if isinstance(weight, nn.Module) else \
        (weight, None, None) if _for_kernel(weight) and not weight.is_mkldnn else None
    return None if operands is None else kernels.linear_operand(*operands)


def linear(x: torch.Tensor, weight) -> torch.Tensor:
    """``x @ W.T`` for a weight ``W`` prepared by ``pack_linear``, or a quantized one (``quant``)."""
    if isinstance(weight, nn.Module):
        return weight(x)
    if weight.is_mkldnn:
        return _onednn_linear(x, weight, None, "none", [], "")
    if _for_kernel(weight):
        if x.numel() <= kernels.MAX_ROWS * x.shape[-1]:
            return kernels.gemv(x, weight)
        if weight.dtype in _onednn_dtypes and _onednn_linear is not None:
            return _onednn_linear(x, weight, None, "none", [], "")
    return F.linear(x, weight)


@dataclass(frozen=True)
class Batch:
    """Which cache slots a forward pass extends, and from which position.

    Every sequence in a batch adds the same number of tokens ``T`` (one for a decode
    step, a chunk for a prefill); ``starts[i]`` is how many tokens slot ``slots[i]``
    already holds.
    """

    slots: tuple[int, ...]
    starts: tuple[int, ...]
    n_tokens: int

    @property
    def size(self) -> int:
        return len(self.slots)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, with the config's rope scaling (as transformers computes them)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


def rope_tables(config: ModelConfig, max_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and *signed* sin, [max_len, head_dim]: the sign of rotate-half is folded into sin."""
    t = torch.arange(max_len, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(config))
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=-1).to(device, dtype), torch.cat([-sin, sin], dim=-1).to(device, dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B or 1, T, 1, D]. Hugging Face's rotate-half convention:
    ``x * cos + [-x2, x1] * sin``, here ``x * cos + [x2, x1] * signed_sin``."""
    B, T, H, D = x.shape
    swapped = x.view(B, T, H, 2, D // 2).flip(3).view(B, T, H, D)
    return torch.addcmul(x * cos, swapped, sin)


def _weight(w):
    """A linear weight as a module attribute: a packed quantized weight is a submodule."""
    return w if isinstance(w, nn.Module) else nn.Parameter(w, requires_grad=False)


_UNBUILT = object()  # a stage's DecodeStep before its first decode step


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:
            # the arithmetic below in one call (bit for bit): a decode step runs two norms a
            # layer, and each Python-level op costs about as much as normalising a token
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # transformers rounds to x's dtype before the weight multiplies; rms_norm does not
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class KVCache(nn.Module):
    """Keys and values of ``n_slots`` sequences of up to ``max_len`` positions, ``[slot,
    kv_head, position, head_dim]``, or ``[slot, position, kv_head, head_dim]`` where
    ``positions_first`` (flash-attn's layout). Head-major, a decode step's attention reads
    each head's keys as one stream: position-major, a head's row of each position lies
    among the other heads', a strided read the CPU's prefetchers did not run ahead of.

    An int8 cache keeps each row of ``head_dim`` values as integers and a scale,
    ``max |row| / 127`` (``k_scales``, ``v_scales``: ``[slot, kv_head, position]`` fp32), as
    llama.cpp's q8_0 cache keeps blocks of 32."""

    def __init__(self, n_slots: int, max_len: int, n_kv_heads: int, head_dim: int, device, dtype,
                 positions_first: bool = False):
        super().__init__()
        self.positions_first = positions_first
        shape = (n_slots, max_len, n_kv_heads, head_dim) if positions_first else (n_slots, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, device=device, dtype=dtype), persistent=False)
        scales = torch.zeros(shape[:3], device=device) if dtype == torch.int8 else None
        self.register_buffer("k_scales", scales, persistent=False)
        self.register_buffer("v_scales", None if scales is None else scales.clone(), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[1 if self.positions_first else 2]

    def write(self, slots: tuple[int, ...], starts: tuple[int, ...], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, T, kv_heads, head_dim]: sequence b's at positions starts[b].. of slot slots[b],
        rounded to the cache's dtype as the fused decode step stores them."""
        if self.k_scales is None:
            parts = [(self.k, k.to(self.k.dtype)), (self.v, v.to(self.v.dtype))]
        else:
            (k, k_scales), (v, v_scales) = quantize_rows(k), quantize_rows(v)
            parts = [(self.k, k), (self.v, v), (self.k_scales, k_scales), (self.v_scales, v_scales)]
        for dst, src in parts:
            self._put(dst, slots, starts, src)

    def _put(self, dst: torch.Tensor, slots, starts, src: torch.Tensor) -> None:
        """src [B, T, kv_heads, ...] into dst at (slot, position)."""
        B, T = src.shape[0], src.shape[1]
        if B == 1:  # slices: views, not an indexed write
            at = slice(starts[0], starts[0] + T)
            if self.positions_first:
                dst[slots[0], at] = src[0]
            else:
                dst[slots[0], :, at] = src[0].transpose(0, 1)
            return
        index = torch.tensor(slots, device=src.device)[:, None]
        positions = torch.tensor(starts, device=src.device)[:, None] + torch.arange(T, device=src.device)
        if self.positions_first:
            dst[index, positions] = src
        else:  # the indices around the slice put their dimensions first: [B, T, kv_heads, ...]
            dst[index, :, positions] = src

    def read(self, slots: slice | torch.Tensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``slots`` at positions [0, end), [B, kv_heads, end, head_dim], in
        the cache's dtype (an int8 cache's: fp32, its integers times their scales)."""
        if self.positions_first:
            return self.k[slots, :end].transpose(1, 2), self.v[slots, :end].transpose(1, 2)
        if self.k_scales is None:
            return self.k[slots, :, :end], self.v[slots, :, :end]
        return (self.k[slots, :, :end].float() * self.k_scales[slots, :, :end, None],
                self.v[slots, :, :end].float() * self.v_scales[slots, :, :end, None])


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] as int8 integers and a scale a row, ``max |row| / 127``, the integers
    ``x / scale`` rounded to nearest even: decode_step.cpp's ``store`` into an int8 cache, the
    same fp32 operations, so that both store the same integers for the same values."""
    x = x.float()
    scales = x.abs().amax(-1) / 127
    q = torch.where(scales[..., None] > 0, torch.round(x / scales[..., None]), 0)
    return q.to(torch.int8), scales


class Attention(nn.Module):
    """``bqkv``: the q/k/v biases side by side, as ``wqkv``'s rows (Qwen2); ``q_norm`` and
    ``k_norm``: RMSNorm over each query and key head before RoPE (Qwen3)."""

    def __init__(self, config: ModelConfig, shard: Shard, wqkv, wo, bqkv=None,
                 q_norm: RMSNorm | None = None, k_norm: RMSNorm | None = None):
        super().__init__()
        self.n_q = shard.n_q_heads
        self.n_kv = shard.n_kv_heads
        self.group = config.group_size
        self.head_dim = config.head_dim
        self.wqkv, self.wo = _weight(wqkv), _weight(wo)
        self.bqkv = None if bqkv is None else nn.Parameter(bqkv, requires_grad=False)
        self.q_norm, self.k_norm = q_norm, k_norm
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, batch: Batch, mask):
        B, T, _ = x.shape
        hd = self.head_dim
        qkv = linear(x, self.wqkv)
        if self.bqkv is not None:
            qkv = qkv + self.bqkv
        qk, v = qkv.split([(self.n_q + self.n_kv) * hd, self.n_kv * hd], dim=-1)
        qk = qk.view(B, T, self.n_q + self.n_kv, hd)
        if self.q_norm is not None:
            q, k = qk.split([self.n_q, self.n_kv], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        qk = apply_rope(qk, cos, sin)  # q and k heads at once
        q, k = qk.split([self.n_q, self.n_kv], dim=2)
        v = v.view(B, T, self.n_kv, hd)
        if self.cache.positions_first:
            out = self._flash(q, k, v, batch)
        else:
            out = self._sdpa(q, k, v, batch, mask)
        return linear(out.reshape(B, T, self.n_q * hd), self.wo)

    def _flash(self, q, k, v, batch: Batch):
        # Writes k/v into the cache slots in place and attends causally over each slot.
        slots = torch.tensor(batch.slots, dtype=torch.int32, device=q.device)
        seqlens = torch.tensor(batch.starts, dtype=torch.int32, device=q.device)
        return flash_attn_with_kvcache(
            q, self.cache.k, self.cache.v, k=k, v=v,
            cache_seqlens=seqlens, cache_batch_idx=slots, causal=True,
        )

    def _sdpa(self, q, k, v, batch: Batch, mask):
        B, T = q.shape[0], q.shape[1]
        self.cache.write(batch.slots, batch.starts, k, v)
        end = max(batch.starts) + T
        first = batch.slots[0]
        if batch.slots == tuple(range(first, first + B)):  # a view, not a gathered copy
            keys, values = self.cache.read(slice(first, first + B), end)
        else:
            keys, values = self.cache.read(torch.tensor(batch.slots, device=q.device), end)
        keys, values = keys.to(q.dtype), values.to(q.dtype)  # a cache of another dtype than the activations'
        if T == 1:
            # One query per sequence: the query heads of a KV group share its keys, so
            # attend as [B, kv_heads, group, D] against [B, kv_heads, L, D], no repeat.
            q = q.view(B, self.n_kv, self.group, self.head_dim)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            return out.reshape(B, 1, self.n_q, self.head_dim)
        q = q.transpose(1, 2)
        keys = keys.repeat_interleave(self.group, dim=1)
        values = values.repeat_interleave(self.group, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return out.transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, w13, w2):
        super().__init__()
        self.w13, self.w2 = _weight(w13), _weight(w2)

    def forward(self, x):
        gate, up = linear(x, self.w13).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2)


class MoE(nn.Module):
    """A sparse MLP (Mixtral's, Qwen3-MoE's): a router scores the experts for each token, the
    ``top_k`` best run, and their outputs are summed weighted by their softmax probabilities,
    renormalised over the chosen ones where ``norm_topk``, as transformers computes it
    (probabilities in fp32, each expert's weighted output rounded to the activations'
    dtype, experts added in index order).
    Under TP each rank holds a slice of every expert and routes the same whole activation,
    so its sum is a part of the full one, as a dense MLP's is."""

    def __init__(self, router, experts: list[MLP], top_k: int, norm_topk: bool = True):
        super().__init__()
        self.router = _weight(router)
        self.experts = nn.ModuleList(experts)
        self.top_k, self.norm_topk = top_k, norm_topk

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = F.softmax(linear(flat, self.router).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights /= weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e in chosen.unique().tolist():  # sorted
            rows, k = torch.where(chosen == e)
            y = self.experts[e](flat[rows]) * weights[rows, k, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out.view(x.shape)


class Block(nn.Module):
    def __init__(self, attn: Attention, mlp: MLP | MoE, attn_norm: RMSNorm, mlp_norm: RMSNorm, all_reduce=None):
        super().__init__()
        self.attn, self.mlp = attn, mlp
        self.attn_norm, self.mlp_norm = attn_norm, mlp_norm
        self.all_reduce = all_reduce  # sums over the stage's TP group in place; None when TP is 1

    def forward(self, x, cos, sin, batch, mask):
        h = self.attn(self.attn_norm(x), cos, sin, batch, mask)
        if self.all_reduce is not None:
            self.all_reduce(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.all_reduce is not None:
            self.all_reduce(h)
        return x + h


class StageModel(nn.Module):
    """Layers ``[start, end)`` of the model on one TP rank, plus embedding / head on the leader.

    A decode step (one token per sequence) of an fp32 stage on a CPU runs its layers in
    ``kernels.DecodeStep``, one call for all of them, where the kernels are built: the same
    arithmetic as the modules' ~40 PyTorch ops a layer, whose overhead is a large part of a
    step that small. Prefill chunks, and everything else, take the modules.
    """

    # False sends decode steps through the modules too (what tests and benchmarks compare)
    fused_decode = True

    def __init__(self, config: ModelConfig, start: int, end: int, shard: Shard, blocks,
                 embed=None, norm=None, head=None, kv_dtype: torch.dtype | None = None):
        super().__init__()
        self.config = config
        self.start, self.end = start, end
        self.shard = shard
        self.blocks = nn.ModuleList(blocks)
        self.embed = None if embed is None else nn.Parameter(embed, requires_grad=False)
        self.norm = norm
        self.head = None if head is None else _weight(head)
        self.cos = self.sin = None
        self.kv_dtype = kv_dtype  # the KV cache's; None: the activations'
        self._decode_step = _UNBUILT
        self._head_in_step = False  # whether _decode_step ends in the final norm and head

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.config.n_layers

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (a quantized stage's weights are integers)."""
        return self.blocks[0].attn_norm.weight.dtype if len(self.blocks) else self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].attn_norm.weight.device if len(self.blocks) else self.embed.device

    def allocate(self, n_slots: int, max_len: int) -> None:
        """(Re)allocate the KV cache: ``n_slots`` sequences of up to ``max_len`` tokens."""
        device, dtype = self.device, self.dtype
        kv_dtype = self.kv_dtype or dtype
        for block in self.blocks:  # flash-attn reads a cache of the activations' dtype only
            block.attn.cache = KVCache(n_slots, max_len, self.shard.n_kv_heads, self.config.head_dim, device,
                                       kv_dtype, positions_first=_flash_reads(device) and kv_dtype == dtype)
        self.cos, self.sin = rope_tables(self.config, max_len, device, dtype)
        self._decode_step = _UNBUILT  # it holds the caches and tables it was built with

    @property
    def max_len(self) -> int:
        """Positions per KV slot (0 before ``allocate``)."""
        return 0 if self.cos is None else self.cos.shape[0]

    @property
    def n_slots(self) -> int:
        cache = self.blocks[0].attn.cache if len(self.blocks) else None
        return 0 if cache is None else cache.k.shape[0]

    def embed_input(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's input as hidden states: token ids [B, T] are embedded on stage 0."""
        if self.is_first:
            x = self.embed_tokens(x.to(self.device))
        return x.to(self.device, self.dtype)

    @torch.inference_mode()
    def forward(self, batch: Batch, x: torch.Tensor) -> torch.Tensor:
        """One batched step: x is token ids [B, T] on stage 0, hidden states [B, T, hidden]
        elsewhere. Returns hidden states [B, T, hidden], or the logits of each sequence's
        last position [B, vocab] on the last stage."""
        x = self.embed_input(x)
        if self.is_last and (step := self._fused_step(batch)) is not None and self._head_in_step:
            return step.forward_logits(x.reshape(batch.size, -1), batch.slots, batch.starts)
        h = self.forward_layers(x, batch)
        return self.logits(h) if self.is_last else h

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.embed)

    def forward_layers(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """x: [B, T, hidden] entering layer ``start``; returns it leaving layer ``end - 1``."""
        T = batch.n_tokens
        if self._fused_step(batch) is not None:
            return self._fused_layers(x, batch)
        if batch.size == 1:
            s = batch.starts[0]
            cos, sin = self.cos[None, s : s + T, None], self.sin[None, s : s + T, None]
        else:
            pos = torch.tensor(batch.starts, device=x.device)[:, None] + torch.arange(T, device=x.device)
            cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]
        mask = self._mask(batch, x.device)
        for block in self.blocks:
            x = block(x, cos, sin, batch, mask)
        return x

    def _fused_step(self, batch: Batch):
        """The ``kernels.DecodeStep`` that runs ``batch`` (built on the first decode step), or
        None where it cannot: a prefill chunk, or a stage it cannot run."""
        if batch.n_tokens != 1 or not self.fused_decode:
            return None
        if self._decode_step is _UNBUILT:
            self._decode_step = self._build_decode_step()
        return self._decode_step

    def _build_decode_step(self):
        """``kernels.DecodeStep`` over this stage's layers, or None where it cannot run them:
        activations other than fp32 or bf16 on a CPU, no vectorised kernels, a weight in a
        layout it does not read."""
        if not (len(self.blocks) and self.device.type == "cpu" and self.dtype in kernels.FLOAT_WEIGHTS
                and kernels.vectorised()):
            return None
        step = kernels.decode_step(self.config.hidden_size, self.shard.n_q_heads, self.shard.n_kv_heads,
                                   self.config.head_dim, self.cos, self.sin)
        for block in self.blocks:
            attn = block.attn
            moe = block.mlp if isinstance(block.mlp, MoE) else None  # a dense MLP: one expert, no router
            experts = moe.experts if moe else [block.mlp]
            qkv, o = kernel_linear(attn.wqkv), kernel_linear(attn.wo)
            gate_up, down = [kernel_linear(x.w13) for x in experts], [kernel_linear(x.w2) for x in experts]
            router = kernel_linear(moe.router) if moe else None
            if None in (qkv, o, *gate_up, *down) or (moe and router is None):
                return None
            q_norm, k_norm = attn.q_norm, attn.k_norm
            step.add_layer(block.attn_norm.weight, block.mlp_norm.weight, block.attn_norm.eps, qkv, o, gate_up, down,
                           router, moe.top_k if moe else 0, moe.norm_topk if moe else False,
                           attn.bqkv, None if q_norm is None else q_norm.weight,
                           None if k_norm is None else k_norm.weight, 0.0 if q_norm is None else q_norm.eps,
                           attn.cache.k, attn.cache.v, attn.cache.k_scales, attn.cache.v_scales)
        # the last stage's norm and head in the same call (an fp32 stage's: a bf16 one rounds
        # its logits to bf16, as transformers does, in ``logits``), but not where a TP group
        # sums each half of a layer between DecodeStep's calls
        head = kernel_linear(self.head) if self.is_last and self.head is not None and \
            self.dtype == torch.float32 and self.blocks[0].all_reduce is None else None
        if head is not None:
            step.set_head(self.norm.weight, self.norm.eps, head)
        self._head_in_step = head is not None
        return step

    def _fused_layers(self, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        """``forward_layers`` of a decode step through ``kernels.DecodeStep``; a TP rank sums
        each half of a layer over its group before the residual adds it, as ``Block`` does.
        The residual stays fp32 from the first layer to the last, in a bf16 stage too, as
        inside ``DecodeStep.forward``."""
        B, step = batch.size, self._decode_step
        h = x.reshape(B, -1)
        slots, starts = batch.slots, batch.starts
        if self.blocks[0].all_reduce is None:
            return step.forward(h, slots, starts).view(B, 1, -1)
        h = h.float()
        for i, block in enumerate(self.blocks):
            a = step.attention(i, h, slots, starts)
            block.all_reduce(a)
            h = h + a
            m = step.mlp(i, h)
            block.all_reduce(m)
            h = h + m
        return h.to(x.dtype).view(B, 1, -1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head on the last position of each sequence: [B, vocab] float32."""
        return linear(self.norm(x[:, -1]), self.head).float()

    @staticmethod
    def _mask(batch: Batch, device):
        """SDPA mask (True = attend), or None where the causal/no-mask fast path applies."""
        T = batch.n_tokens
        if batch.size == 1 and (T == 1 or batch.starts[0] == 0):
            return None
        end = max(batch.starts) + T
        starts = torch.tensor(batch.starts, device=device)
        key_pos = torch.arange(end, device=device)
        query_pos = starts[:, None] + torch.arange(T, device=device)  # [B, T]
        mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, T, L]
        return mask[:, None]  # [B, 1, T, L]: broadcasts over heads (and a KV group's queries)
