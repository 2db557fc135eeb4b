"""Decoding without per-step waste: a KV cache that does not copy itself every step, and CPU kernels that
stream the weights of a decode step's matrix-vector products at the memory's pace.

* :class:`PreallocatedCache` — a transformers ``DynamicCache`` whose layers write new keys/values into a
  buffer with spare room and hand out views of it. ``DynamicCache`` concatenates the whole cache with the new
  token in every layer and step (``O(prompt)`` bytes copied per layer per token); here a step copies only the
  new token. Results are bit-identical: attention reads the same numbers.
* :func:`prepare_cpu_decode` — what ``generate`` does to the language model's CPU linears before decoding:

  - float32 (:func:`column_major_cpu_linears`): a layer with at least as many outputs as inputs keeps its weight
    ``(out, in)`` in column-major storage (same shape, values and ``state_dict`` keys; moved in place, no copy
    kept). MKL's one-row product then streams the weight 1.7–2.2× faster for the wide layers of a decoder
    (q/k/v, gate/up, LM head: 9–10 GB/s → 17–22 GB/s on this project's CPU, one thread); matrix products of
    many rows (prompts, training) are unchanged. One-row outputs differ from the row-major kernel's in the
    last bits (another summation order).
  - bfloat16 (:func:`pack_cpu_linears`): calls with few rows (``max_rows``) and no gradient use oneDNN's
    inner product with a weight reordered once for it (what ``torch.compile``'s CPU backend does for frozen
    bf16 linears). PyTorch's default bf16 matrix-vector product streams the weights at about half the rate
    of float32 on CPUs with AVX512-BF16 / AMX; the packed kernel is 1.5–2× faster with identical outputs. The
    packed copy is kept next to the weight (the memory of those layers doubles).

  :func:`restore_cpu_linears` undoes both.
* :func:`cpu_decode_attention` — the attention of a one-token step with bfloat16/float16 tensors on CPU. PyTorch's
  CPU ``scaled_dot_product_attention`` takes 4–10× longer for one query in bf16 than in float32 (0.39 vs
  0.05 ms for 8 heads over 430 cached tokens); this computes scores, softmax and the weighted sum in float32
  (more precise than the bf16 kernel) in a fraction of the time. The decoder selects it by itself for such
  steps when the model's attention implementation is ``sdpa``.

``benchmarks/decode_paths.py`` measures every path.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from navil_utils.models.common import register_attention_function

#: Attention implementation name of :func:`cpu_decode_attention` (registered on import).
CPU_DECODE_ATTENTION = "navil_cpu_decode"

# ---------------------------------------------------------------------------------------------------
# KV cache


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` that grows a buffer by doubling and exposes ``keys``/``values`` as views of it.

    Other cache operations (crop, beam reordering, batch selection) may replace ``keys``/``values`` by ordinary
    tensors; the next :meth:`update` notices and rebuilds the buffer from them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self._length = 0

    def _views_current(self) -> bool:
        buffer = self._key_buffer
        return (buffer is not None and self.keys is not None and self._length > 0
                and self.keys.data_ptr() == buffer.data_ptr() and self.keys.shape[-2] == self._length
                and self.values.data_ptr() == self._value_buffer.data_ptr())

    def _grow(self, needed: int, current: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """A new buffer with room for ``needed`` positions, holding the ``current`` cached ones."""
        capacity = max(needed, 2 * current, 64)
        keys = key_states.new_empty((*key_states.shape[:-2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:-2], capacity, value_states.shape[-1]))
        if current:
            keys[..., :current, :].copy_(self.keys[..., :current, :])
            values[..., :current, :].copy_(self.values[..., :current, :])
        self._key_buffer, self._value_buffer = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``(B, H, T, D)`` keys/values; returns all cached keys/values ``(B, H, past + T, D)`` (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        current = self._length if self._views_current() else self.get_seq_length()
        if current and self.keys.shape[:-2] != key_states.shape[:-2]:
            raise ValueError(f"cache holds {tuple(self.keys.shape)} but got keys {tuple(key_states.shape)}")
        end = current + key_states.shape[-2]
        if not self._views_current() or end > self._key_buffer.shape[-2]:
            self._grow(end, current, key_states, value_states)
        self._key_buffer[..., current:end, :].copy_(key_states)
        self._value_buffer[..., current:end, :].copy_(value_states)
        self._length = end
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._length = 0
        super().reset()


class PreallocatedCache(DynamicCache):
    """``DynamicCache`` made of :class:`PreallocatedLayer` (full-attention layers; the decoders here have no
    sliding-window layers). Pass it as ``past_key_values`` / ``cache``; ``generate`` uses it by default."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = [PreallocatedLayer() for _ in range(num_layers)]
        self.layer_class_to_replicate = None


# ---------------------------------------------------------------------------------------------------
# prepacked bf16 linears


def packed_linears_supported() -> bool:
    """Whether this PyTorch build has oneDNN with bfloat16 support on this CPU."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _packed_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // max(1, x.shape[-1])
    if (x.dtype != torch.bfloat16 or x.device.type != "cpu" or rows > self._navil_max_rows or rows == 0
            or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
        return nn.functional.linear(x, self.weight, self.bias)
    key = (self.weight.data_ptr(), self.weight._version)
    if self._navil_packed_key != key:
        self._navil_packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), 1)
        self._navil_packed_key = key
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self._navil_packed,
                                             None if self.bias is None else self.bias.detach(), "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_cpu_linears(model: nn.Module, *, max_rows: int = 16) -> int:
    """Route the bfloat16 CPU ``nn.Linear`` layers of ``model`` through prepacked oneDNN weights for calls with at
    most ``max_rows`` rows (decoding). Returns how many layers were patched (0 when unsupported: nothing changes;
    layers patched before are skipped).
    The packed copy is made lazily, on a layer's first such call, and redone if its weight changes."""
    if not packed_linears_supported():
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu"
                and "forward" not in module.__dict__):                    # not patched yet
            module._navil_max_rows = int(max_rows)
            module._navil_packed, module._navil_packed_key = None, None
            module.forward = types.MethodType(_packed_forward, module)
            count += 1
    return count


def unpack_cpu_linears(model: nn.Module) -> int:
    """Undo :func:`pack_cpu_linears` (drops the packed copies); returns how many layers were restored."""
    count = 0
    for module in model.modules():
        if "forward" in module.__dict__ and hasattr(module, "_navil_max_rows"):
            del module.forward
            for name in ("_navil_max_rows", "_navil_packed", "_navil_packed_key"):
                delattr(module, name)
            count += 1
    return count


# ---------------------------------------------------------------------------------------------------
# column-major float32 weights


def _is_column_major(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.stride() == (1, weight.shape[0])


def _set_layout(weight: torch.Tensor, column_major: bool) -> bool:
    """Move ``weight``'s storage to column- or row-major in place (same shape and values); True if it moved."""
    if _is_column_major(weight) == column_major or weight.numel() <= 1:
        return False
    with torch.inference_mode(False), torch.no_grad():   # the new storage must stay usable for training
        moved = weight.detach().t().contiguous().t() if column_major else weight.detach().contiguous()
        weight.data = moved.clone() if moved.is_inference() else moved
    return True


def column_major_cpu_linears(model: nn.Module) -> int:
    """Store the float32 CPU ``nn.Linear`` weights of ``model`` with ``out_features >= in_features`` column-major
    (in place, see the module docstring); returns how many were moved. Shared weights (tied embeddings) move
    once and stay shared."""
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
                and module.out_features >= module.in_features):
            count += _set_layout(module.weight, column_major=True)
    return count


def restore_cpu_linears(model: nn.Module) -> int:
    """Undo :func:`prepare_cpu_decode`: plain forwards and row-major (contiguous) linear weights again; returns
    how many layers changed."""
    count = unpack_cpu_linears(model)
    for module in model.modules():
        if type(module) is nn.Linear:
            count += _set_layout(module.weight, column_major=False)
    return count


def prepare_cpu_decode(model: nn.Module) -> int:
    """Ready ``model``'s CPU linears for decoding: float32 wide layers column-major, bfloat16 layers packed for
    oneDNN (:func:`column_major_cpu_linears`, :func:`pack_cpu_linears`). Idempotent and cheap to repeat (layers
    already prepared are skipped), so it can run before every ``generate``. Returns how many layers changed."""
    return column_major_cpu_linears(model) + pack_cpu_linears(model)


# ---------------------------------------------------------------------------------------------------
# attention of a decode step


def uses_cpu_decode_attention(attention_name: str, hidden: torch.Tensor) -> bool:
    """Whether a decoder call with ``hidden`` ``(B, T, H)`` under ``attention_name`` should use
    :func:`cpu_decode_attention`: one new token, half-precision, on CPU, with plain ``sdpa`` configured."""
    return (attention_name == "sdpa" and hidden.shape[1] == 1 and hidden.device.type == "cpu"
            and hidden.dtype in (torch.bfloat16, torch.float16))


def cpu_decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention in float32 for few queries: ``query (B, H, Lq, D)``, ``key/value (B, Hkv, S, D)`` (grouped
    heads are not repeated), ``attention_mask`` sdpa's boolean ``(B, 1, Lq, S)`` (True = attend) or an additive
    float mask, or None. Returns ``(output (B, Lq, H, D) in the query's dtype, None)``."""
    if dropout:
        raise ValueError("cpu_decode_attention is for inference (dropout must be 0)")
    batch, heads, length, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    scaling = dim ** -0.5 if scaling is None else scaling
    grouped = query.float().reshape(batch, kv_heads, (heads // kv_heads) * length, dim)
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)).mul_(scaling)
    scores = scores.view(batch, heads, length, keys)
    if attention_mask is not None:
        mask = attention_mask[..., :keys]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    probs = torch.softmax(scores, dim=-1).view(batch, kv_heads, (heads // kv_heads) * length, keys)
    out = torch.matmul(probs, value.float()).view(batch, heads, length, dim)
    return out.transpose(1, 2).to(query.dtype), None


register_attention_function(CPU_DECODE_ATTENTION, cpu_decode_attention)
