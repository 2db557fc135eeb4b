"""Attention maps of a NaViL model: recording them (:class:`AttentionRecorder`) and knowing what each
row and column is (:class:`TokenLayout`).

Recording::

    with AttentionRecorder(model, llm_layers=[0, -1], heads="mean", queries="last") as rec:
        model.generate(**inputs, max_new_tokens=16, do_sample=False)
    rows, positions = rec.llm_rows(-1)          # (1, 1 + 15, K_final): prefill row + one row per step

The recorder plugs into the attention-function seam (``ALL_ATTENTION_FUNCTIONS``) of both the LLM and
the ViT: on enter it registers a capture function under a fresh name (with sdpa's mask function, see
:func:`~navil_utils.models.common.register_attention_function`) and switches the sub-models that have
selected layers to it; on exit (also on an exception) it puts the previous implementations back and
unregisters the name.  Every call still computes its output with the implementation the model was
using (sdpa by default), so logits and generated ids do not change; for the *selected* layers the
capture function additionally recomputes ``softmax(q kᵀ · scale + mask)`` for the *selected* query
rows only (in row chunks), reduces the heads if asked and stores the result on CPU in a compact dtype.
Memory therefore grows with the selected rows (``B × heads' × rows × keys``), never with ``S²`` for
rows nobody asked for.

Token bookkeeping::

    layout = TokenLayout.from_model(model, input_ids, image_grid_thw)
    layout.kinds[p]                      # "text", "img_start", "visual", "line_break", ...
    layout.arrange(values, image=0, scale=1)  # (..., T) per LLM position -> (..., rows, cols) raster grid

NaViL's ViT permutes merge blocks into *window order* and never undoes it, so the k-th ``<IMG_CONTEXT>``
of a scale does **not** hold the block at the k-th raster slot as soon as a scale is wider or taller than
``window_size / m`` merged tokens; :class:`TokenLayout` maps every visual token to its true raster
``(row, col)`` (one LLM visual token = an ``m × m`` block of ViT patches after the pixel shuffle) and every
ViT position (encoder order, the order of the recorded ViT segments) to its ``(patch row, patch col)``.
"""
from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from navil_utils.constants import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_START_TOKEN,
    NAVIL_MERGE_SIZE,
    NAVIL_WINDOW_SIZE,
)
from navil_utils.errors import ConfigError, ModelInputError
from navil_utils.models.common import (
    compute_dtype,
    eager_attention_forward,
    register_attention_function,
    repeat_kv,
)
from navil_utils.models.decoder import VEDecoderForCausalLM
from navil_utils.models.internlm2_ve import InternLM2VEAttention
from navil_utils.models.qwen3_ve import Qwen3VEAttention
from navil_utils.models.vision import NaViLVisionAttention, NaViLVisionModel, window_layout

#: Layer selection: ``"all"``, ``None`` (none), one index or a list (negative indices count from the end).
LayerSpec = str | int | Sequence[int] | None
#: Head selection: ``"all"``, ``"mean"`` / ``"max"`` over heads (a heads dim of size 1 is kept), or indices.
HeadSpec = str | Sequence[int] | torch.Tensor
#: Query-row selection of a prefill call: ``"all"``, ``"last"``, a slice, indices (negative allowed) or a
#: boolean mask over the rows, or ``callable(num_queries) -> one of those``.
QuerySpec = str | int | slice | Sequence[int] | torch.Tensor | Callable[[int], Any]

_HEAD_REDUCTIONS = ("mean", "max")


# ---------------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class LLMAttentionCall:
    """Attention probabilities recorded from one call of one LLM layer.

    Attributes:
        call: index of the LLM forward inside the recording (0 = the first; in ``generate``: the prefill,
            then one per decoding step).
        past: positions already in the KV cache before this call (0 for a prefill).
        query_rows: ``(r,)`` long — the recorded rows, as indices into this call's queries.
        probs: ``(B, heads', r, K)`` on the recorder's device and dtype; ``K = past + call length`` keys
            (every position so far, left padding included).  ``heads'`` is the number of selected heads,
            or 1 for ``"mean"`` / ``"max"``.
    """

    call: int
    past: int
    query_rows: torch.Tensor
    probs: torch.Tensor

    @property
    def query_positions(self) -> torch.Tensor:
        """``(r,)`` sequence positions (cache indices = key columns) of the recorded rows."""
        return self.query_rows + self.past


@dataclass(frozen=True)
class VitSegmentAttention:
    """Attention probabilities of one ViT attention segment (one image-scale or one window) in one layer.

    Attributes:
        call: index of the ViT forward inside the recording.
        start, end: the segment's token range ``[start, end)`` in the encoder's (window-permuted) order —
            see :attr:`TokenLayout.vit_row` etc. for what each position is.
        query_rows: ``(r,)`` long — recorded rows, segment-local (``0 … end-start-1``).
        probs: ``(heads', r, end - start)`` — keys are the segment's own tokens.
    """

    call: int
    start: int
    end: int
    query_rows: torch.Tensor
    probs: torch.Tensor

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def query_positions(self) -> torch.Tensor:
        """``(r,)`` encoder-order positions of the recorded rows."""
        return self.query_rows + self.start


@dataclass(frozen=True)
class _Role:
    part: str   # "llm" or "vit"
    layer: int


# ---------------------------------------------------------------------------------------------------
# specification parsing


def _resolve_layers(spec: LayerSpec, count: int, part: str) -> list[int]:
    """Normalise a layer spec to sorted, non-negative, unique indices (``ConfigError`` if out of range)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        if spec == "all":
            return list(range(count))
        raise ConfigError(f"{part} layers must be 'all', None, an index or a list of indices, got {spec!r}")
    items = [spec] if isinstance(spec, int) else list(spec)
    out = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int):
            raise ConfigError(f"{part} layer indices must be integers, got {item!r}")
        if not -count <= item < count:
            raise ConfigError(f"unknown {part} layer index {item}: the {part} has {count} layers "
                              f"(indices 0…{count - 1}, or negative from the end)")
        out.add(item % count)
    return sorted(out)


def _resolve_heads(spec: HeadSpec, count: int, part: str) -> str | torch.Tensor:
    """``"all"``, ``"mean"``, ``"max"`` or a ``(h',)`` long tensor of non-negative head indices."""
    if isinstance(spec, str):
        if spec == "all" or spec in _HEAD_REDUCTIONS:
            return spec
        raise ConfigError(f"bad heads spec {spec!r}: use 'all', 'mean', 'max' or a list of head indices")
    try:
        index = torch.as_tensor(spec)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"bad heads spec {spec!r}: use 'all', 'mean', 'max' or a list of head indices") from None
    if index.dtype == torch.bool or index.is_floating_point() or index.ndim > 1 or index.numel() == 0:
        raise ConfigError(f"bad heads spec {spec!r}: head indices must be a non-empty list of integers")
    index = index.reshape(-1).long()
    bad = [int(i) for i in index if not -count <= int(i) < count]
    if bad:
        raise ConfigError(f"bad heads spec: head index {bad[0]} does not exist, the {part} has {count} heads")
    return index % count


def _check_query_spec(spec: QuerySpec, name: str = "queries") -> None:
    if isinstance(spec, str):
        if spec not in ("all", "last"):
            raise ConfigError(f"bad {name} spec {spec!r}: use 'all', 'last', a slice, indices, a boolean mask or a "
                              "callable")
    elif isinstance(spec, bool) or not (isinstance(spec, (int, slice, torch.Tensor, Sequence)) or callable(spec)):
        raise ConfigError(f"bad {name} spec of type {type(spec).__name__}: use 'all', 'last', a slice, indices, "
                          "a boolean mask or a callable")


def _resolve_rows(spec: QuerySpec, count: int, name: str = "queries", nested: bool = False) -> torch.Tensor:
    """Rows selected by ``spec`` among ``count`` query rows: ``(r,)`` long, non-negative, in spec order."""
    if isinstance(spec, str):
        if spec == "all":
            return torch.arange(count)
        if spec == "last":
            return torch.tensor([count - 1])
        raise ConfigError(f"bad {name} spec {spec!r}")
    if isinstance(spec, slice):
        return torch.arange(count)[spec]
    if callable(spec) and not isinstance(spec, torch.Tensor):
        if nested:
            raise ConfigError(f"the {name} callable must return 'all', 'last', a slice or indices, not a callable")
        return _resolve_rows(spec(count), count, name, nested=True)
    index = torch.as_tensor(spec)
    if index.dtype == torch.bool:
        if index.shape != (count,):
            raise ConfigError(f"a boolean {name} mask must have one entry per query row ({count}), "
                              f"got shape {tuple(index.shape)}")
        return index.nonzero().reshape(-1)
    if index.is_floating_point():
        raise ConfigError(f"{name} indices must be integers, got dtype {index.dtype}")
    index = index.reshape(-1).long()
    bad = index[(index < -count) | (index >= count)]
    if bad.numel():
        raise ConfigError(f"{name} index {int(bad[0])} is outside the {count} query rows of this call")
    return index % count if count else index


def _resolve_vit_positions(spec: str | Sequence[int] | torch.Tensor) -> torch.Tensor | None:
    """``None`` for ``"all"``, else the selected encoder-order positions ``(n,)`` (from indices or a mask)."""
    if isinstance(spec, str):
        if spec == "all":
            return None
        raise ConfigError(f"bad vit_queries spec {spec!r}: use 'all', encoder positions or a boolean mask")
    if not isinstance(spec, (torch.Tensor, Sequence)):
        raise ConfigError(f"bad vit_queries spec of type {type(spec).__name__}: use 'all', positions or a mask")
    index = torch.as_tensor(spec)
    if index.dtype == torch.bool:
        return index.reshape(-1).nonzero().reshape(-1)
    if index.is_floating_point() or (index.numel() and int(index.min()) < 0):
        raise ConfigError(f"vit_queries positions must be non-negative integers, got {spec!r}")
    return index.reshape(-1).long()


def _submodels(model: nn.Module) -> tuple[VEDecoderForCausalLM | None, NaViLVisionModel | None]:
    if isinstance(model, VEDecoderForCausalLM):
        return model, None
    if isinstance(model, NaViLVisionModel):
        return None, model
    llm, vit = getattr(model, "language_model", None), getattr(model, "vision_model", None)
    llm = llm if isinstance(llm, VEDecoderForCausalLM) else None
    vit = vit if isinstance(vit, NaViLVisionModel) else None
    if llm is None and vit is None:
        raise ConfigError(f"AttentionRecorder needs a NaViL model (NaViLForConditionalGeneration, its language "
                          f"model or its vision model), got {type(model).__name__}")
    return llm, vit


# ---------------------------------------------------------------------------------------------------
# the recorder


class AttentionRecorder:
    """Record post-softmax attention probabilities of selected layers, heads and query rows.

    ``with AttentionRecorder(model, ...) as rec: model(...)`` (or ``model.generate(...)``); afterwards
    :attr:`llm` / :attr:`vit` hold the records (see :class:`LLMAttentionCall`,
    :class:`VitSegmentAttention`) and :meth:`llm_map`, :meth:`llm_rows`, :meth:`vit_segments` assemble
    them.  Entering again starts a fresh recording.

    Args:
        model: a :class:`~navil_utils.models.NaViLForConditionalGeneration`, or its ``language_model`` /
            ``vision_model`` alone (``"all"`` layers of a part the model does not have select nothing).
        llm_layers: LLM layers to record — ``"all"``, ``None``, an index or a list (negative = from the end).
        vit_layers: ViT layers to record (default: none).
        heads: LLM heads — ``"all"``, ``"mean"``, ``"max"`` (reduced in float32 before the cast; a heads
            dimension of size 1 is kept) or a list of head indices.
        queries: query rows of each *prefill* call (a call with an empty cache: a plain forward, the first
            call of ``generate`` or every step of ``generate(use_cache=False)``) — ``"all"``, ``"last"``, a
            slice, indices (negative allowed; kept in the given order), a boolean mask, or
            ``callable(num_queries)`` returning one of those.
        record_decoding: in calls whose cache already holds positions (decoding steps), record every new
            query row — so each step of ``generate`` appends its row; False records nothing there.
        dtype: storage dtype of the probabilities (float16 by default; float32 for exact comparisons).
        vit_heads: ViT heads (default: ``heads`` when it is a string, else ``"all"``).
        vit_queries: ViT query rows — ``"all"``, or encoder-order positions (indices or a boolean mask over
            all packed patches) whose rows are kept in their segments.
        device: where records are stored (CPU by default).
        max_chunk_elements: the probabilities of a layer call are computed in row chunks of at most about
            this many scores, bounding the temporary memory of long prompts.

    Raises:
        ConfigError: unknown layer or head index, bad heads/queries spec, a model that is not NaViL, nothing
            selected, or an LLM running an attention implementation whose masks are not sdpa/eager masks
            (flash-attention, flex).  A query index outside a call's rows raises ``ConfigError`` from the
            forward (the model is still restored on exit).
    """

    def __init__(self, model: nn.Module, llm_layers: LayerSpec = "all", vit_layers: LayerSpec = None,
                 heads: HeadSpec = "all", queries: QuerySpec = "all", dtype: torch.dtype = torch.float16, *,
                 record_decoding: bool = True, vit_heads: HeadSpec | None = None,
                 vit_queries: str | Sequence[int] | torch.Tensor = "all", device: torch.device | str = "cpu",
                 max_chunk_elements: int = 1 << 25) -> None:
        self.model = model
        self._llm, self._vit = _submodels(model)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating torch dtype, got {dtype!r}")
        if max_chunk_elements < 1:
            raise ConfigError(f"max_chunk_elements must be positive, got {max_chunk_elements}")
        if llm_layers not in (None, "all") and self._llm is None:
            raise ConfigError("llm_layers were selected but the model has no NaViL language model")
        if vit_layers not in (None, "all") and self._vit is None:
            raise ConfigError("vit_layers were selected but the model has no NaViL vision model")
        self.llm_layers: list[int] = []
        self.vit_layers: list[int] = []
        if self._llm is not None:
            config = self._llm.config
            self.llm_layers = _resolve_layers(llm_layers, config.num_hidden_layers, "LLM")
            self._llm_heads = _resolve_heads(heads, config.num_attention_heads, "LLM")
        if self._vit is not None:
            config = self._vit.config
            self.vit_layers = _resolve_layers(vit_layers, config.num_hidden_layers, "ViT")
            vit_heads = vit_heads if vit_heads is not None else (heads if isinstance(heads, str) else "all")
            self._vit_heads = _resolve_heads(vit_heads, config.num_attention_heads, "ViT")
        if not self.llm_layers and not self.vit_layers:
            raise ConfigError("AttentionRecorder has nothing to record: select llm_layers and/or vit_layers")
        _check_query_spec(queries)
        self.queries = queries
        self.vit_queries = vit_queries
        self._vit_selected = _resolve_vit_positions(vit_queries)
        self.record_decoding = bool(record_decoding)
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_chunk_elements = int(max_chunk_elements)
        self.name: str | None = None
        self._llm_records: dict[int, list[LLMAttentionCall]] = {}
        self._vit_records: dict[int, list[VitSegmentAttention]] = {}
        self._restore: list[tuple[Any, str | None]] = []
        self._hooks: list[Any] = []
        self._roles: dict[int, _Role] = {}
        self._delegates: dict[str, Callable[..., Any]] = {}
        self._llm_call = -1
        self._llm_past: int | None = None
        self._vit_call = -1
        self._active = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> AttentionRecorder:
        if self._active:
            raise ConfigError("this AttentionRecorder is already active (it cannot be nested in itself)")
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self._llm_records = {layer: [] for layer in self.llm_layers}
        self._vit_records = {layer: [] for layer in self.vit_layers}
        self._llm_call, self._vit_call, self._llm_past = -1, -1, None
        parts = []
        if self.llm_layers:
            parts.append(("llm", self._llm))
        if self.vit_layers:
            parts.append(("vit", self._vit))

        mask_function = sdpa_mask
        for part, sub in parts:
            previous = sub.config._attn_implementation or "sdpa"
            if part == "llm":
                if previous == "eager":
                    mask_function = eager_mask
                elif previous != "sdpa" and ALL_MASK_ATTENTION_FUNCTIONS.get(previous, sdpa_mask) not in (
                        sdpa_mask, eager_mask):
                    raise ConfigError(f"AttentionRecorder needs an LLM running sdpa, eager or a custom attention "
                                      f"function with sdpa's masks; this one runs {previous!r} (switch with "
                                      f"model.set_attn_implementation('sdpa'))")
            self._delegates[part] = ALL_ATTENTION_FUNCTIONS.get_interface(previous, eager_attention_forward)

        self.name = f"navil_attention_recorder_{uuid.uuid4().hex[:12]}"
        register_attention_function(self.name, self._attend, mask_function)
        self._active = True
        try:
            for part, sub in parts:
                attention_type = (Qwen3VEAttention, InternLM2VEAttention) if part == "llm" else NaViLVisionAttention
                for module in sub.modules():
                    if isinstance(module, attention_type):
                        self._roles[id(module)] = _Role(part, int(module.layer_idx))
                hook = self._llm_pre_hook if part == "llm" else self._vit_pre_hook
                self._hooks.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
                # what set_attn_implementation finally does for each sub-model, without its recursion into
                # other sub-configs and without its default resolution (None stays None on restore)
                self._restore.append((sub.config, sub.config._attn_implementation_internal))
                sub.config._attn_implementation_internal = self.name
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> bool:
        self._close()
        return False

    def _close(self) -> None:
        """Restore the attention implementations, remove the hooks and unregister the capture name."""
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

        for config, previous in reversed(self._restore):
            config._attn_implementation_internal = previous
        self._restore.clear()
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._roles.clear()
        if self.name is not None:
            # register() writes the class-wide mappings; remove the entries so that recorders do not pile up
            AttentionInterface._global_mapping.pop(self.name, None)
            AttentionMaskInterface._global_mapping.pop(self.name, None)
        self._active = False

    # ------------------------------------------------------------------ hooks
    def _llm_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._llm_call += 1
        cache = kwargs.get("cache", args[3] if len(args) > 3 else None)
        self._llm_past = int(cache.get_seq_length()) if cache is not None else 0

    def _vit_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._vit_call += 1

    # ------------------------------------------------------------------ the attention function
    def _attend(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The registered capture function: the previous implementation's output, plus recording."""
        role = self._roles.get(id(module))
        part = role.part if role is not None else ("vit" if "segment_starts" in kwargs else "llm")
        delegate = self._delegates.get(part, eager_attention_forward)
        output = delegate(module, query, key, value, attention_mask, **kwargs)
        if role is not None and self._active:
            with torch.no_grad():
                if part == "llm" and role.layer in self._llm_records:
                    self._record_llm(role.layer, module, query, key, attention_mask, kwargs["scaling"])
                elif part == "vit" and role.layer in self._vit_records:
                    self._record_vit(role.layer, module, query, key, kwargs["scaling"], kwargs)
        return output

    def _record_llm(self, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float) -> None:
        q_len, k_len = query.shape[2], key.shape[2]
        past = self._llm_past if self._llm_past is not None else k_len - q_len
        if past == 0:
            rows = _resolve_rows(self.queries, q_len)
        elif self.record_decoding:
            rows = torch.arange(q_len)
        else:
            return
        if rows.numel() == 0:
            return
        probs = self._probabilities(module, query, key, attention_mask, scaling, rows,
                                    causal=bool(getattr(module, "is_causal", True)), heads=self._llm_heads)
        self._llm_records[layer].append(LLMAttentionCall(max(self._llm_call, 0), past, rows, probs))

    def _record_vit(self, layer: int, module: nn.Module, query: torch.Tensor, key: torch.Tensor, scaling: float,
                    kwargs: dict) -> None:
        """``query, key (n, H, L, hd)``: ``n`` segments of length ``L`` starting at ``segment_starts``."""
        starts = [int(s) for s in kwargs["segment_starts"]]
        length = query.shape[2]
        call = max(self._vit_call, 0)
        records = self._vit_records[layer]
        selected = self._vit_selected
        if selected is None:  # "all": every segment of this length in one batched pass
            rows = torch.arange(length)
            probs = self._probabilities(module, query, key, None, scaling, rows, causal=False, heads=self._vit_heads)
            records.extend(VitSegmentAttention(call, start, start + length, rows, p) for start, p in zip(starts, probs))
            return
        for i, start in enumerate(starts):
            rows = selected[(selected >= start) & (selected < start + length)] - start
            if rows.numel():
                probs = self._probabilities(module, query[i:i + 1], key[i:i + 1], None, scaling, rows, causal=False,
                                            heads=self._vit_heads)
                records.append(VitSegmentAttention(call, start, start + length, rows, probs[0]))

    def _probabilities(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, rows: torch.Tensor, causal: bool,
                       heads: str | torch.Tensor) -> torch.Tensor:
        """Eager attention probabilities of the selected rows: ``(B, heads', r, K)`` on the record device.

        ``query (B, H, Lq, D)``, ``key (B, Hkv, K, D)``; the mask (boolean or additive, broadcastable to
        ``(B, H, Lq, K)``) is sliced to the rows; with no mask and a causal module the queries are the last
        ``Lq`` of the ``K`` positions — the rules of :func:`~navil_utils.models.common.eager_attention_forward`.
        """
        n_rep = getattr(module, "num_key_value_groups", 1)
        if isinstance(heads, torch.Tensor):
            index = heads.to(query.device)
            q_all = query.index_select(1, index)
            k_all = key.index_select(1, torch.div(index, n_rep, rounding_mode="floor"))
        else:
            q_all, k_all = query, repeat_kv(key, n_rep)
        batch, n_heads, q_len, _ = q_all.shape
        k_len = k_all.shape[2]
        key_t = k_all.transpose(2, 3)
        rows_device = rows.to(query.device)
        chunk = max(1, self.max_chunk_elements // max(1, batch * n_heads * k_len))
        pieces = []
        for begin in range(0, rows_device.numel(), chunk):
            part = rows_device[begin:begin + chunk]
            scores = torch.matmul(q_all.index_select(2, part), key_t) * scaling       # (B, H', r, K)
            mask = attention_mask
            if mask is None and causal and q_len > 1:
                positions = (part + (k_len - q_len))[:, None]
                mask = positions >= torch.arange(k_len, device=query.device)[None, :]  # (r, K)
            elif mask is not None and mask.shape[-2] != 1:
                mask = mask.index_select(mask.ndim - 2, part)
            if mask is not None:
                if mask.dtype == torch.bool:
                    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
                else:
                    scores = scores + mask
            probs = nn.functional.softmax(scores, dim=-1, dtype=compute_dtype(query.dtype))
            if heads == "mean":
                probs = probs.mean(dim=1, keepdim=True)
            elif heads == "max":
                probs = probs.amax(dim=1, keepdim=True)
            pieces.append(probs.to(device=self.device, dtype=self.dtype))
        return torch.cat(pieces, dim=2)

    # ------------------------------------------------------------------ results
    @property
    def llm(self) -> dict[int, list[LLMAttentionCall]]:
        """Recorded LLM layer → its calls in order (prefill first, then one per decoding step)."""
        return self._llm_records

    @property
    def vit(self) -> dict[int, list[VitSegmentAttention]]:
        """Recorded ViT layer → its segments, ordered by (ViT call, segment start)."""
        return {layer: sorted(records, key=lambda r: (r.call, r.start)) for layer, records in self._vit_records.items()}

    def _llm_calls(self, layer: int) -> list[LLMAttentionCall]:
        count = self._llm.config.num_hidden_layers if self._llm is not None else 0
        index = layer % count if count and -count <= layer < count else layer
        if index not in self._llm_records:
            raise ConfigError(f"LLM layer {layer} was not recorded (recorded layers: {self.llm_layers})")
        calls = self._llm_records[index]
        if not calls:
            raise ConfigError(f"no LLM call was recorded for layer {layer}: run the model inside the with-block")
        return calls

    def llm_map(self, layer: int, call: int = 0, batch: int = 0) -> torch.Tensor:
        """``(heads', r, K)`` — the map of one recorded call of ``layer`` (default: the first, the prefill)."""
        calls = self._llm_calls(layer)
        if not -len(calls) <= call < len(calls):
            raise ConfigError(f"LLM layer {layer} has {len(calls)} recorded call(s), no call {call}")
        return calls[call].probs[batch]

    def llm_rows(self, layer: int, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """All recorded rows of ``layer`` stacked: ``(probs (heads', R, K_max), positions (R,))``.

        Rows of later calls (decoding steps) follow the prefill rows; keys beyond a call's ``K`` (positions
        that did not exist yet) are zero.  ``positions`` are the rows' sequence positions.
        """
        calls = self._llm_calls(layer)
        k_max = max(c.probs.shape[-1] for c in calls)
        maps = [nn.functional.pad(c.probs[batch], (0, k_max - c.probs.shape[-1])) for c in calls]
        return torch.cat(maps, dim=1), torch.cat([c.query_positions for c in calls])

    def vit_segments(self, layer: int, call: int = 0) -> list[VitSegmentAttention]:
        """The segments of one ViT forward (default: the first) in ``layer``, ordered by start."""
        count = self._vit.config.num_hidden_layers if self._vit is not None else 0
        index = layer % count if count and -count <= layer < count else layer
        if index not in self._vit_records:
            raise ConfigError(f"ViT layer {layer} was not recorded (recorded layers: {self.vit_layers})")
        segments = [s for s in self.vit[index] if s.call == call]
        if not segments:
            raise ConfigError(f"no ViT call {call} was recorded for layer {layer}")
        return segments


# ---------------------------------------------------------------------------------------------------
# token layout

#: Kinds of LLM positions in :attr:`TokenLayout.kinds`.
TOKEN_KINDS: tuple[str, ...] = ("padding", "text", "img_start", "visual", "line_break", "frame_break", "img_end",
                                "answer")


@dataclass(frozen=True)
class LayoutScale:
    """One image-scale of a prompt.

    Attributes:
        image, scale: image index in the prompt and scale index (0 = smallest).
        grid_thw: ``(t, h, w)`` in patches; ``rows = h/m``, ``cols = w/m`` merged tokens per frame.
        vit_start, vit_end: its patch range in the encoder (window-permuted) order — contiguous, because the
            window permutation stays inside a grid.
    """

    image: int
    scale: int
    grid_thw: tuple[int, int, int]
    rows: int
    cols: int
    vit_start: int
    vit_end: int


@dataclass(frozen=True, repr=False)
class TokenLayout:
    """What every LLM position and every ViT position of one prompt is.

    LLM positions (``T`` = prompt length), all ``(T,)`` long tensors with ``-1`` where not applicable:

    * ``kinds`` — a tuple of :data:`TOKEN_KINDS` strings (``"frame_break"`` also separates scales).
    * ``image`` — the image of every token of an ``<img> … </img>`` span; ``scale``, ``frame`` — of visual
      tokens, line breaks and frame breaks.
    * ``row``, ``col`` — raster merged-token coordinates of visual tokens (window permutation undone);
      a line break's ``row`` is the prompt row it closes.
    * ``slot_row``, ``slot_col`` — the *prompt* grid slot of a visual token (where its ``<IMG_CONTEXT>`` sits);
      equal to ``row``/``col`` only where the window order coincides with raster order.
    * ``visual_index`` — the visual token's row in the prompt's visual features (k-th ``<IMG_CONTEXT>``).

    ViT positions (``N`` = patches of the prompt's grids, in the encoder's window-permuted order, i.e. the
    order of :class:`VitSegmentAttention` offsets), ``(N,)`` long tensors:

    * ``vit_image``, ``vit_scale``, ``vit_frame``, ``vit_row``, ``vit_col`` — patch coordinates;
    * ``vit_window`` — the window-attention segment (numbered in encoder order);
    * ``vit_patch_index`` — the row of ``pixel_values`` (processor order) feeding that position;
    * ``vit_llm_position`` — the LLM position of the visual token containing the patch
      (``row = vit_row // m``, ``col = vit_col // m``).

    ViT positions count from the prompt's first patch; in a batch (:meth:`build_batch`) the ViT packs all
    prompts' patches, and the prompt's first patch sits at packed position ``vit_offset``.
    """

    kinds: tuple[str, ...]
    image: torch.Tensor
    scale: torch.Tensor
    frame: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    slot_row: torch.Tensor
    slot_col: torch.Tensor
    visual_index: torch.Tensor
    vit_image: torch.Tensor
    vit_scale: torch.Tensor
    vit_frame: torch.Tensor
    vit_row: torch.Tensor
    vit_col: torch.Tensor
    vit_window: torch.Tensor
    vit_patch_index: torch.Tensor
    vit_llm_position: torch.Tensor
    scales: tuple[LayoutScale, ...]
    merge_size: int
    window_size: int
    vit_offset: int = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, input_ids: torch.Tensor | Sequence[int], image_grid_thw: torch.Tensor | Sequence | None,
              special_token_ids: dict[str, int], *, merge_size: int = NAVIL_MERGE_SIZE,
              window_size: int = NAVIL_WINDOW_SIZE, attention_mask: torch.Tensor | Sequence[int] | None = None,
              answer_start: int | None = None) -> TokenLayout:
        """The layout of one prompt.

        Args:
            input_ids: ``(T,)`` or ``(1, T)`` — may include generated tokens after ``answer_start``.
            image_grid_thw: ``(S, 3)`` grids of exactly this prompt's images (all scales, in prompt order).
            special_token_ids: ids of ``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<IMG_LINE_BREAK>`` and
                ``<IMG_FRAME_BREAK>`` (``model.special_token_ids`` or ``navil_token_ids(tokenizer)``).
            merge_size, window_size: ``m`` and the ViT window size in patches (model's vision config).
            attention_mask: ``(T,)`` 1/0 — zeros become ``"padding"``.
            answer_start: positions from here on are ``"answer"`` (not parsed as image spans).
        Raises:
            ModelInputError: the image spans do not match the grids; ConfigError: a special id is missing.
        """
        ids = torch.as_tensor(input_ids)
        if ids.ndim == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.ndim != 1:
            raise ModelInputError(f"TokenLayout.build takes one prompt (T,) or (1, T), got shape {tuple(ids.shape)}; "
                                  "use TokenLayout.build_batch for a batch")
        mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(-1)
        grids = _grid_list(image_grid_thw)
        layout, used = _parse_prompt(ids.tolist(), None if mask is None else mask.tolist(), grids,
                                     special_token_ids, merge_size, window_size, answer_start)
        if used != len(grids):
            raise ModelInputError(f"the prompt's image spans use {used} grid rows but image_grid_thw has {len(grids)}")
        return layout

    @classmethod
    def build_batch(cls, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | Sequence | None,
                    special_token_ids: dict[str, int], *, merge_size: int = NAVIL_MERGE_SIZE,
                    window_size: int = NAVIL_WINDOW_SIZE, attention_mask: torch.Tensor | None = None,
                    answer_start: int | Sequence[int | None] | None = None) -> list[TokenLayout]:
        """One layout per row of a (left-padded) batch ``(B, T)``; grids are consumed row by row, in the
        order the model scatters visual tokens."""
        ids = torch.as_tensor(input_ids)
        if ids.ndim != 2:
            raise ModelInputError(f"build_batch takes input_ids of shape (B, T), got {tuple(ids.shape)}")
        starts = list(answer_start) if isinstance(answer_start, Sequence) else [answer_start] * ids.shape[0]
        if len(starts) != ids.shape[0]:
            raise ModelInputError(f"answer_start has {len(starts)} entries for a batch of {ids.shape[0]}")
        grids = _grid_list(image_grid_thw)
        layouts, offset, patches = [], 0, 0
        for row in range(ids.shape[0]):
            mask = None if attention_mask is None else torch.as_tensor(attention_mask)[row].tolist()
            layout, used = _parse_prompt(ids[row].tolist(), mask, grids[offset:], special_token_ids, merge_size,
                                         window_size, starts[row])
            layouts.append(dataclasses.replace(layout, vit_offset=patches))
            offset += used
            patches += layout.num_vit_positions
        if offset != len(grids):
            raise ModelInputError(f"the batch's image spans use {offset} grid rows but image_grid_thw has "
                                  f"{len(grids)}")
        return layouts

    @staticmethod
    def model_settings(model: nn.Module) -> dict[str, Any]:
        """``special_token_ids``, ``merge_size`` and ``window_size`` of a NaViL model, for :meth:`build`."""
        ids = getattr(model, "special_token_ids", None)
        config = getattr(model, "config", None)
        vision = getattr(config, "vision_config", None)
        if not ids or vision is None:
            raise ConfigError("TokenLayout.model_settings needs a NaViLForConditionalGeneration with its special-token "
                              "ids set (model.set_special_token_ids)")
        return dict(special_token_ids=dict(ids), merge_size=vision.merge_size, window_size=vision.window_size)

    @classmethod
    def from_model(cls, model: nn.Module, input_ids: torch.Tensor | Sequence[int],
                   image_grid_thw: torch.Tensor | Sequence | None = None, **kwargs: Any) -> TokenLayout:
        """:meth:`build` with the model's special-token ids, merge size and window size."""
        return cls.build(input_ids, image_grid_thw, **cls.model_settings(model), **kwargs)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.kinds)

    def __repr__(self) -> str:
        counts = {kind: self.kinds.count(kind) for kind in TOKEN_KINDS if kind in self.kinds}
        scales = [(s.image, s.scale, s.grid_thw) for s in self.scales]
        return f"TokenLayout(T={len(self)}, kinds={counts}, scales={scales}, vit_positions={self.num_vit_positions})"

    @property
    def num_vit_positions(self) -> int:
        return int(self.vit_row.numel())

    def kind_mask(self, kind: str) -> torch.Tensor:
        """``(T,)`` bool: positions of one kind."""
        if kind not in TOKEN_KINDS:
            raise ConfigError(f"unknown token kind {kind!r}; kinds: {TOKEN_KINDS}")
        return torch.tensor([k == kind for k in self.kinds], dtype=torch.bool)

    def positions(self, kind: str) -> torch.Tensor:
        """``(n,)`` long: positions of one kind, ascending."""
        return self.kind_mask(kind).nonzero().reshape(-1)

    def scale_of(self, image: int, scale: int) -> LayoutScale:
        for item in self.scales:
            if item.image == image and item.scale == scale:
                return item
        raise ConfigError(f"the prompt has no image {image} scale {scale}; it has "
                          f"{[(s.image, s.scale) for s in self.scales]}")

    def arrange(self, values: torch.Tensor, image: int, scale: int, frame: int = 0) -> torch.Tensor:
        """Put a per-LLM-position quantity ``(..., T)`` of one image-scale on its raster grid ``(..., rows, cols)``.

        E.g. ``arrange(rec.llm_map(l)[:, -1], 0, 2)`` → ``(heads', rows, cols)``: how much the last query
        attends to each visual token of image 0's scale 2, laid out as the image.
        """
        info = self.scale_of(image, scale)
        if values.shape[-1] != len(self):
            raise ModelInputError(f"values have {values.shape[-1]} positions on the last dim, the layout {len(self)}")
        picked = ((self.image == image) & (self.scale == scale) & (self.frame == frame)
                  & self.kind_mask("visual")).nonzero().reshape(-1)
        if picked.numel() != info.rows * info.cols:
            raise ConfigError(f"image {image} scale {scale} has no frame {frame}")
        out = values.new_zeros(*values.shape[:-1], info.rows, info.cols)
        device = values.device
        out[..., self.row[picked].to(device), self.col[picked].to(device)] = values[..., picked.to(device)]
        return out

    def arrange_vit(self, values: torch.Tensor, image: int, scale: int, frame: int = 0, offset: int = 0,
                    fill: float = float("nan")) -> torch.Tensor:
        """Put a per-ViT-position quantity on one image-scale's patch grid: ``(..., L)`` → ``(..., h, w)``.

        ``values`` cover encoder positions ``offset … offset+L-1`` (e.g. a :class:`VitSegmentAttention`'s keys
        with ``offset=segment.start``); patches outside get ``fill`` (0 for integer values).
        """
        info = self.scale_of(image, scale)
        length = values.shape[-1]
        positions = torch.arange(offset, offset + length)
        if offset < 0 or offset + length > self.num_vit_positions:
            raise ModelInputError(f"positions {offset}…{offset + length - 1} are outside the prompt's "
                                  f"{self.num_vit_positions} ViT positions")
        keep = ((self.vit_image[positions] == image) & (self.vit_scale[positions] == scale)
                & (self.vit_frame[positions] == frame)).nonzero().reshape(-1)
        h, w = info.grid_thw[1], info.grid_thw[2]
        if values.is_floating_point():
            out = values.new_full((*values.shape[:-1], h, w), fill)
        else:
            out = values.new_zeros(*values.shape[:-1], h, w)
        target, device = positions[keep], values.device
        out[..., self.vit_row[target].to(device), self.vit_col[target].to(device)] = values[..., keep.to(device)]
        return out

    def to_frame(self):
        """One row per LLM position (pandas DataFrame): kind, image, scale, frame, row, col, slots."""
        import pandas as pd

        return pd.DataFrame({"kind": list(self.kinds), "image": self.image.tolist(), "scale": self.scale.tolist(),
                             "frame": self.frame.tolist(), "row": self.row.tolist(), "col": self.col.tolist(),
                             "slot_row": self.slot_row.tolist(), "slot_col": self.slot_col.tolist(),
                             "visual_index": self.visual_index.tolist()})


def _grid_list(image_grid_thw: torch.Tensor | Sequence | None) -> list[tuple[int, int, int]]:
    if image_grid_thw is None:
        return []
    rows = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else list(image_grid_thw)
    out = []
    for row in rows:
        if len(row) != 3:
            raise ModelInputError(f"image_grid_thw rows must be (t, h, w), got {row}")
        out.append(tuple(int(v) for v in row))
    return out


def _parse_prompt(ids: list[int], mask: list[int] | None, grids: list[tuple[int, int, int]],
                  special_token_ids: dict[str, int], merge_size: int, window_size: int,
                  answer_start: int | None) -> tuple[TokenLayout, int]:
    """Walk one prompt, consuming grid rows from ``grids`` for its image spans; ``(layout, grids used)``."""
    needed = (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, IMG_LINE_BREAK_TOKEN, IMG_FRAME_BREAK_TOKEN)
    missing = [t for t in needed if t not in special_token_ids]
    if missing:
        raise ConfigError(f"special_token_ids lacks {missing}: the layout of an image span needs all of "
                          f"{list(needed)}")
    start_id, end_id, ctx_id, lb_id, fb_id = (int(special_token_ids[t]) for t in needed)
    if merge_size < 1 or window_size < merge_size:
        raise ConfigError(f"need 1 <= merge_size <= window_size, got merge_size={merge_size}, "
                          f"window_size={window_size}")
    length = len(ids)
    if mask is not None and len(mask) != length:
        raise ModelInputError(f"attention_mask has {len(mask)} entries for {length} tokens")
    end = length if answer_start is None else int(answer_start)
    if not 0 <= end <= length:
        raise ModelInputError(f"answer_start {answer_start} is outside the prompt of {length} tokens")

    kinds = ["text"] * length
    fields = {name: [-1] * length for name in ("image", "scale", "frame", "row", "slot_row", "slot_col",
                                               "visual_index")}
    for p in range(end, length):
        kinds[p] = "answer"
    scales: list[tuple[int, int, tuple[int, int, int]]] = []  # (image, scale, grid) per consumed grid
    first_slot: list[int] = []                                   # visual index of each consumed grid's first token
    visual = 0
    image = -1
    p = 0

    def expect(position: int, token: int, what: str) -> None:
        if position >= end or ids[position] != token:
            found = "the end of the prompt" if position >= end else f"id {ids[position]}"
            raise ModelInputError(f"position {position}: expected {what}, found {found} (the image spans of "
                                  "input_ids do not match image_grid_thw)")

    while p < end:
        if mask is not None and not mask[p]:
            kinds[p] = "padding"
            p += 1
            continue
        token = ids[p]
        if token in (ctx_id, lb_id, fb_id, end_id):
            raise ModelInputError(f"position {p}: image token id {token} outside an <img> … </img> span")
        if token != start_id:
            p += 1
            continue
        image += 1
        kinds[p], fields["image"][p] = "img_start", image
        p += 1
        scale = 0
        while p < end and ids[p] != end_id:
            if len(scales) >= len(grids):
                raise ModelInputError(f"position {p}: image {image} has more scales than image_grid_thw has grids "
                                      f"({len(grids)})")
            t, h, w = grids[len(scales)]
            if h % merge_size or w % merge_size:
                raise ModelInputError(f"grid {(t, h, w)} is not divisible by the merge size {merge_size}")
            rows, cols = h // merge_size, w // merge_size
            scales.append((image, scale, (t, h, w)))
            first_slot.append(visual)
            for frame in range(t):
                for r in range(rows):
                    for c in range(cols):
                        expect(p, ctx_id, f"<IMG_CONTEXT> (image {image}, scale {scale}, row {r}, col {c})")
                        kinds[p] = "visual"
                        for name, v in (("image", image), ("scale", scale), ("frame", frame), ("slot_row", r),
                                        ("slot_col", c), ("visual_index", visual)):
                            fields[name][p] = v
                        visual += 1
                        p += 1
                    expect(p, lb_id, f"<IMG_LINE_BREAK> after row {r} of image {image}, scale {scale}")
                    kinds[p] = "line_break"
                    for name, v in (("image", image), ("scale", scale), ("frame", frame), ("row", r)):
                        fields[name][p] = v
                    p += 1
                expect(p, fb_id, f"<IMG_FRAME_BREAK> after image {image}, scale {scale}")
                kinds[p] = "frame_break"
                for name, v in (("image", image), ("scale", scale), ("frame", frame)):
                    fields[name][p] = v
                p += 1
            scale += 1
        expect(p, end_id, f"</img> closing image {image}")
        kinds[p], fields["image"][p] = "img_end", image
        p += 1

    used = len(scales)
    tensors = {name: torch.tensor(values, dtype=torch.long) for name, values in fields.items()}
    row, col = tensors.pop("row"), torch.full((length,), -1, dtype=torch.long)
    vit = _vit_positions([g for _, _, g in scales], merge_size, window_size)
    layout_scales = []
    if used:
        # the k-th visual token holds merge block window_index[k] (window order -> raster block)
        visual_positions = (tensors["visual_index"] >= 0).nonzero().reshape(-1)
        blocks = vit["window_index"][tensors["visual_index"][visual_positions]]
        row[visual_positions] = vit["block_row"][blocks]
        col[visual_positions] = vit["block_col"][blocks]
        block_position = torch.empty(visual, dtype=torch.long)
        block_position[vit["window_index"]] = visual_positions   # raster block -> LLM position
        vit_block = vit["window_index"][torch.arange(vit["count"]) // merge_size ** 2]
        vit_llm_position = block_position[vit_block]
        image_of_grid = torch.tensor([s[0] for s in scales])
        scale_of_grid = torch.tensor([s[1] for s in scales])
        vit_image, vit_scale = image_of_grid[vit["grid"]], scale_of_grid[vit["grid"]]
        for index, (img, sc, grid) in enumerate(scales):
            where = (vit["grid"] == index).nonzero().reshape(-1)
            layout_scales.append(LayoutScale(img, sc, grid, grid[1] // merge_size, grid[2] // merge_size,
                                             int(where[0]), int(where[-1]) + 1))
    else:
        empty = torch.zeros(0, dtype=torch.long)
        vit_llm_position = vit_image = vit_scale = empty
    layout = TokenLayout(
        kinds=tuple(kinds), image=tensors["image"], scale=tensors["scale"], frame=tensors["frame"], row=row, col=col,
        slot_row=tensors["slot_row"], slot_col=tensors["slot_col"], visual_index=tensors["visual_index"],
        vit_image=vit_image, vit_scale=vit_scale, vit_frame=vit["frame"], vit_row=vit["row"], vit_col=vit["col"],
        vit_window=vit["window"], vit_patch_index=vit["patch_index"], vit_llm_position=vit_llm_position,
        scales=tuple(layout_scales), merge_size=merge_size, window_size=window_size,
    )
    return layout, used


def _vit_positions(grids: list[tuple[int, int, int]], merge_size: int, window_size: int) -> dict[str, Any]:
    """Per merge block (raster, global over ``grids``) and per encoder position: the coordinates.

    Returns ``window_index (n,)`` (window order → raster block), ``block_row/block_col (n,)`` of raster blocks
    and, per encoder position ``(N,)``: ``grid``, ``frame``, ``row``, ``col`` (patches), ``window``,
    ``patch_index`` (processor order), plus ``count = N``.
    """
    m, unit = merge_size, merge_size * merge_size
    if not grids:
        empty = torch.zeros(0, dtype=torch.long)
        return dict(window_index=empty, block_row=empty, block_col=empty, grid=empty, frame=empty, row=empty,
                    col=empty, window=empty, patch_index=empty, count=0)
    layout = window_layout(torch.tensor(grids, dtype=torch.long), m, window_size)
    block_grid, block_frame, block_row, block_col = [], [], [], []
    for index, (t, h, w) in enumerate(grids):
        gh, gw = h // m, w // m
        local = torch.arange(t * gh * gw)
        block_grid.append(torch.full_like(local, index))
        block_frame.append(local // (gh * gw))
        block_row.append(local % (gh * gw) // gw)
        block_col.append(local % gw)
    block_grid, block_frame = torch.cat(block_grid), torch.cat(block_frame)
    block_row, block_col = torch.cat(block_row), torch.cat(block_col)
    count = block_grid.numel() * unit
    positions = torch.arange(count)
    block = layout.window_index[positions // unit]                 # raster block of each encoder position
    sub = positions % unit                                          # raster index inside the m × m block
    bounds = torch.tensor(sorted(set(layout.cu_window_seqlens)))   # the reference keeps empty windows: dedupe
    return dict(
        window_index=layout.window_index, block_row=block_row, block_col=block_col,
        grid=block_grid[block], frame=block_frame[block],
        row=block_row[block] * m + sub // m, col=block_col[block] * m + sub % m,
        window=torch.searchsorted(bounds, positions, right=True) - 1,
        patch_index=block * unit + sub, count=count,
    )
