"""Decoding without per-step waste: a KV cache that does not copy itself every step, and prepacked oneDNN
kernels for the matrix-vector products of bfloat16 decoding on CPU.

* :class:`PreallocatedCache` — a transformers ``DynamicCache`` whose layers write new keys/values into a
  buffer with spare room and hand out views of it. ``DynamicCache`` concatenates the whole cache with the new
  token in every layer and step (``O(prompt)`` bytes copied per layer per token); here a step copies only the
  new token. Results are bit-identical: attention reads the same numbers.
* :func:`pack_cpu_linears` — bfloat16 ``nn.Linear`` layers on CPU call oneDNN's inner product with a weight
  reordered once for it (what ``torch.compile``'s CPU backend does for frozen bf16 linears). On CPUs with
  AVX512-BF16 / AMX, PyTorch's default bf16 matrix-vector product streams the weights at half the rate of
  float32, which is why bf16 decoding was no faster than float32; the packed kernel reads them 2–3.5× faster
  (measured in ``benchmarks/generate_speed.py``). Only calls with few rows (decoding, ``max_rows``) and no
  gradient use it; everything else takes the ordinary path. The checkpoint keys, parameters and ``state_dict``
  are untouched; :func:`unpack_cpu_linears` restores the plain forward.
"""
from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

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
        self._navil_packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 1)
        self._navil_packed_key = key
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, x.shape[-1]), self._navil_packed,
                                             None if self.bias is None else self.bias.detach(), "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_cpu_linears(model: nn.Module, *, max_rows: int = 16) -> int:
    """Route the bfloat16 CPU ``nn.Linear`` layers of ``model`` through prepacked oneDNN weights for calls with at
    most ``max_rows`` rows (decoding). Returns how many layers were patched (0 when unsupported: nothing changes).
    The packed copy is made lazily, on a layer's first such call, and redone if its weight changes."""
    if not packed_linears_supported():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.bfloat16 and module.weight.device.type == "cpu":
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
