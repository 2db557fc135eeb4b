"""Training batches for the tiny NaViL from synthetic samples.

:class:`TinyCollator` turns :class:`~navil_utils.tiny.synthetic.Sample` objects into model inputs::

    collator = TinyCollator(tokenizer, max_pixels=128 * 128)
    batch = collator([data.sample(i) for i in range(32)])
    out = model(**batch.model_inputs())          # out.loss: CE on answer tokens + <|im_end|>
    correct = qa_exact_match(out.logits, batch)  # greedy exact match per QA (teacher forcing)

Sequence of one sample (NaViL's ``qwen3-chat`` format, :mod:`navil_utils.processing.templates`)::

    <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n<img>…</img>\\n{question}<|im_end|>
    <|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n  ← prompt (labels -100)
    {answer}<|im_end|>                                  ← labels = input ids

The prompt tokens equal ``tokenizer(processor.render(...))`` exactly (the text around the image span comes
from :meth:`NaViLProcessor.text_around_image`), and the answer is tokenised on its
own — as it is generated after the prompt — so training and inference see the same ids.

:class:`TiledCollator` is the same collator for the tiny NVLM-D: only the image part differs (NVLM-D's dynamic
tiles + thumbnail, ``<Image><tile_1>`` + pads … ``<tile_global_thumbnail>`` + pads ``</Image>``).

``qa_packing="isolated"`` puts all QA pairs of a sample (``Sample.qas``) after one shared image
prefix; each QA block attends to the prefix and to itself only (4-D additive mask) and its positions
restart after the prefix, so every block is computed exactly as a separate single-QA sequence while
the ViT and the prefix run once (the "isolated multi-QA" lever of the tiny-model study).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from navil_utils.constants import (
    IMG_CONTEXT_TOKEN,
    IMG_END_TOKEN,
    IMG_FRAME_BREAK_TOKEN,
    IMG_LINE_BREAK_TOKEN,
    IMG_START_TOKEN,
    NAVIL_MERGE_SIZE,
    NAVIL_PATCH_SIZE,
    NAVIL_SCALE_DOWNSAMPLE_RATIO,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
)
from navil_utils.errors import ConfigError
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE, TINY_TEMPLATE
from navil_utils.processing.image_tokens import image_span_ids
from navil_utils.processing.multiscale import preprocess_multiscale
from navil_utils.processing.processor import NaViLProcessor
from navil_utils.processing.templates import check_message
from navil_utils.processing.tokenizers import navil_token_ids
from navil_utils.tiny.synthetic import QA, Sample

IGNORE_INDEX = -100
_PREFIX_BLOCK = -1  # block id of the shared prefix (system, user role, image span)
_PAD_BLOCK = -2


@dataclass(frozen=True)
class EncodedSample:
    """One sample as token ids and patches (cacheable: pre-encode once, collate many times).

    ``labels`` are -100 except on answer tokens (+ ``<|im_end|>``); ``qa_index`` is the QA number of an
    answer token and -1 elsewhere; ``block_ids`` / ``position_ids`` are set for isolated packing only.
    """

    index: int
    input_ids: list[int]
    labels: list[int]
    qa_index: list[int]
    pixel_values: torch.Tensor      # (N_i, 3, p, p) float32 in [-1, 1]
    image_grid_thw: torch.Tensor    # (S_i, 3) int64, smallest scale first
    qas: tuple[QA, ...]
    block_ids: list[int] | None = None
    position_ids: list[int] | None = None
    token_targets: torch.Tensor | None = None   # (n_merged_tokens, 3) raster order, see tiny/token_targets.py

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class TinyBatch:
    """A padded batch (B sequences, T tokens, N patches, S scale grids, Q question-answer pairs).

    ``attention_mask`` ``(B, T)`` is 1 on tokens, 0 on padding; with isolated packing
    ``attention_mask_4d`` ``(B, 1, T, T)`` (0 = attend, dtype-min = blocked; derived from ``block_ids``
    ``(B, T)`` on the batch's device, so that data-loader workers hand over ``T`` numbers per sequence, not
    ``T²``) and ``position_ids`` ``(B, T)`` replace it as model inputs.  ``qas[q]`` is the q-th QA of the batch (sample order, then
    QA order) and ``answer_qa`` ``(B, T)`` holds q on its answer tokens, -1 elsewhere.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    num_scales: list[int]
    answer_qa: torch.Tensor
    qas: list[QA]
    sample_indices: list[int]
    position_ids: torch.Tensor | None = None
    block_ids: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def attention_mask_4d(self) -> torch.Tensor | None:
        """The isolated-packing mask ``(B, 1, T, T)`` float32 (:func:`isolated_block_mask`), None without packing."""
        return None if self.block_ids is None else isolated_block_mask(self.block_ids)

    def model_inputs(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``NaViL.forward`` (``pixel_values`` and a 4-D mask cast to ``dtype``)."""
        pixel_values = self.pixel_values if dtype is None else self.pixel_values.to(dtype)
        inputs = {"input_ids": self.input_ids, "pixel_values": pixel_values, "image_grid_thw": self.image_grid_thw,
                  "labels": self.labels}
        if self.block_ids is not None:  # built in dtype, so that "blocked" is that dtype's minimum
            inputs["attention_mask"] = isolated_block_mask(self.block_ids, dtype or torch.float32)
            inputs["position_ids"] = self.position_ids
        else:
            inputs["attention_mask"] = self.attention_mask
        return inputs

    def to(self, device: torch.device | str) -> TinyBatch:
        moved = {name: getattr(self, name).to(device) for name in (
            "input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "answer_qa")}
        for name in ("position_ids", "block_ids"):
            value = getattr(self, name)
            moved[name] = None if value is None else value.to(device)
        return replace(self, **moved)

    @property
    def num_answer_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


class TinyCollator:
    """Encode and batch synthetic samples for a NaViL model with the tiny tokenizer.

    Args:
        tokenizer: a tokenizer with NaViL's special tokens (``load_tiny_tokenizer``).
        system_message: system prompt (default: the tiny model's short English one).
        template: conversation template name (``"qwen3-chat"``).
        min_pixels, max_pixels, scale_downsample_ratio, patch_size, merge_size: multi-scale
            preprocessing (:func:`~navil_utils.processing.multiscale.preprocess_multiscale`).
        padding_side: ``"right"`` (training) or ``"left"`` (generation).
        qa_packing: ``"single"`` — the primary QA only; ``"isolated"`` — all ``Sample.qas`` packed
            after one image prefix with a block mask.
        pad_to_multiple_of: round the padded length up (fewer distinct shapes).
        token_target_classes: class names per target (:func:`~navil_utils.tiny.token_targets.target_classes`)
            to attach every visual token's object classes to batches as ``extra["token_targets"]``
            ``(n_visual_tokens, 3)`` in raster order (the auxiliary token loss of training); None: not computed.
    """

    #: Class of the batches :meth:`collate` returns.
    batch_class: type[TinyBatch] = TinyBatch

    def __init__(
        self,
        tokenizer: Any,
        *,
        system_message: str = TINY_SYSTEM_MESSAGE,
        template: str = TINY_TEMPLATE,
        min_pixels: int = TINY_MIN_PIXELS,
        max_pixels: int = TINY_MAX_PIXELS,
        scale_downsample_ratio: float = NAVIL_SCALE_DOWNSAMPLE_RATIO,
        patch_size: int = NAVIL_PATCH_SIZE,
        merge_size: int = NAVIL_MERGE_SIZE,
        padding_side: str = "right",
        qa_packing: str = "single",
        pad_to_multiple_of: int | None = None,
        token_target_classes: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        if padding_side not in ("left", "right"):
            raise ConfigError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if qa_packing not in ("single", "isolated"):
            raise ConfigError(f"qa_packing must be 'single' or 'isolated', got {qa_packing!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.tokenizer = tokenizer
        self.system_message = system_message
        self.processor = NaViLProcessor(tokenizer, template, dict(
            min_pixels=min_pixels, max_pixels=max_pixels, scale_downsample_ratio=scale_downsample_ratio,
            patch_size=patch_size, merge_size=merge_size), system_message)
        self.template = self.processor.template
        self.preprocess_kwargs = self.processor.budget
        self.merge_size = merge_size
        self.padding_side = padding_side
        self.qa_packing = qa_packing
        self.pad_to_multiple_of = pad_to_multiple_of
        self.token_target_classes = token_target_classes
        self.token_ids = navil_token_ids(tokenizer)
        for token in (IMG_START_TOKEN, IMG_END_TOKEN, IMG_CONTEXT_TOKEN, IMG_LINE_BREAK_TOKEN, IMG_FRAME_BREAK_TOKEN):
            if token not in self.token_ids:
                raise ConfigError(f"the tokenizer lacks {token}")
        self.sep_id = self._single_id(self.template.sep)
        if tokenizer.pad_token_id is None:
            raise ConfigError("the tokenizer has no pad token")
        self.pad_id = int(tokenizer.pad_token_id)
        # prompt = the processor's pieces before the image span + span ids + its pieces after the span (the
        # question and the open assistant turn), encoded like the processor encodes a chat prompt: control
        # tokens from the template only, questions and answers as plain text (special tokens delimit the
        # pieces, so an ordinary prompt gets the ids of tokenising the whole prompt)
        self.prefix_ids = self.processor.encode_pieces(self.processor.pieces_around_image("")[0],
                                                       add_special_tokens=False)
        self._cache: dict[str, list[int]] = {}
        self._answer_cache: dict[str, list[int]] = {}

    # ---- tokens ----------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]

    def _single_id(self, token: str) -> int:
        ids = self._encode(token)
        if len(ids) != 1:
            raise ConfigError(f"{token!r} is not a single token of this tokenizer")
        return ids[0]

    def question_ids(self, question: str) -> list[int]:
        """Ids of what follows ``</img>`` in the prompt: ``"\\n{question}<|im_end|>"`` + the assistant role.

        The question is plain text: special-token strings in it never become control ids."""
        ids = self._cache.get(question)
        if ids is None:
            after = self.processor.pieces_around_image(question)[1]
            ids = self._cache[question] = self.processor.encode_pieces(after, add_special_tokens=False)
        return ids

    def answer_ids(self, answer: str) -> list[int]:
        """Ids of the answer (plain text) followed by ``<|im_end|>`` (the supervised tokens)."""
        ids = self._answer_cache.get(answer)
        if ids is None:
            check_message(answer, "answer")
            ids = self._answer_cache[answer] = self.processor.encoder.encode_text(answer)
        return ids + [self.sep_id]

    # ---- samples -----------------------------------------------------------------------------------

    def image_inputs(self, image: Any) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """NaViL's multi-scale input of one image: ``(image span ids, pixel_values (N, 3, p, p),
        image_grid_thw (S, 3))`` — the span ``<img>…</img>`` holds one context token per merged patch."""
        pre = preprocess_multiscale(image, **self.preprocess_kwargs)
        return image_span_ids(pre.image_grid_thw, self.token_ids, self.merge_size), pre.pixel_values, pre.image_grid_thw

    @classmethod
    def from_model_config(cls, config: Any, tokenizer: Any, **kwargs: Any) -> TinyCollator:
        """The collator of a NaViL checkpoint's configuration: its pixel budget (patch and merge size, scale
        ratio included) and system message."""
        from navil_utils.processing.processor import pixel_budget

        kwargs.setdefault("system_message", getattr(config, "system_message", None) or TINY_SYSTEM_MESSAGE)
        return cls(tokenizer, **pixel_budget(config), **kwargs)

    def encode(self, sample: Sample, *, with_answers: bool = True) -> EncodedSample:
        """Token ids, labels and patches of one sample (answers omitted for generation prompts).

        Without answers and with ``qa_packing="isolated"`` only the primary question is encoded.
        """
        span, pixel_values, image_grid_thw = self.image_inputs(sample.image)
        prefix = self.prefix_ids + span
        qas = sample.qas if (self.qa_packing == "isolated" and with_answers) else (sample.qa,)
        input_ids, labels, qa_index = list(prefix), [IGNORE_INDEX] * len(prefix), [-1] * len(prefix)
        block_ids = [_PREFIX_BLOCK] * len(prefix)
        position_ids = list(range(len(prefix)))
        for k, qa in enumerate(qas):
            q_ids = self.question_ids(qa.question)
            a_ids = self.answer_ids(qa.answer) if with_answers else []
            input_ids += q_ids + a_ids
            labels += [IGNORE_INDEX] * len(q_ids) + a_ids
            qa_index += [-1] * len(q_ids) + [k] * len(a_ids)
            block_ids += [k] * (len(q_ids) + len(a_ids))
            position_ids += list(range(len(prefix), len(prefix) + len(q_ids) + len(a_ids)))
        packed = self.qa_packing == "isolated" and with_answers
        targets = None
        if self.token_target_classes is not None:
            from navil_utils.tiny.token_targets import token_targets

            targets = token_targets(sample, image_grid_thw, self.token_target_classes, merge_size=self.merge_size)
        return EncodedSample(
            index=sample.index, input_ids=input_ids, labels=labels, qa_index=qa_index,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, qas=tuple(qas),
            block_ids=block_ids if packed else None, position_ids=position_ids if packed else None,
            token_targets=targets,
        )

    def __call__(self, samples: Sequence[Sample], *, with_answers: bool = True) -> TinyBatch:
        return self.collate([self.encode(s, with_answers=with_answers) for s in samples])

    # ---- batches ---------------------------------------------------------------------------------

    def collate(self, encoded: Sequence[EncodedSample]) -> TinyBatch:
        """Pad and stack encoded samples; patches and grids are concatenated in sample order."""
        if not encoded:
            raise ConfigError("cannot collate an empty list of samples")
        packed = encoded[0].block_ids is not None
        if any((e.block_ids is not None) != packed for e in encoded):
            raise ConfigError("cannot mix isolated-packed and single-QA encodings in one batch")
        length = max(len(e) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        answer_qa = torch.full((batch, length), -1, dtype=torch.long)
        positions = torch.zeros((batch, length), dtype=torch.long) if packed else None
        blocks = torch.full((batch, length), _PAD_BLOCK, dtype=torch.long) if packed else None
        qas: list[QA] = []
        for row, e in enumerate(encoded):
            n = len(e)
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            input_ids[row, span] = torch.tensor(e.input_ids)
            attention[row, span] = 1
            labels[row, span] = torch.tensor(e.labels)
            qa = torch.tensor(e.qa_index)
            answer_qa[row, span] = torch.where(qa >= 0, qa + len(qas), qa)
            qas.extend(e.qas)
            if packed:
                positions[row, span] = torch.tensor(e.position_ids)
                blocks[row, span] = torch.tensor(e.block_ids)
        result = self.batch_class(
            input_ids=input_ids, attention_mask=attention, labels=labels,
            pixel_values=torch.cat([e.pixel_values for e in encoded]),
            image_grid_thw=torch.cat([e.image_grid_thw for e in encoded]),
            num_scales=[int(e.image_grid_thw.shape[0]) for e in encoded],
            answer_qa=answer_qa, qas=qas, sample_indices=[e.index for e in encoded],
        )
        if packed:
            result.position_ids = positions
            result.block_ids = blocks
        if all(e.token_targets is not None for e in encoded):
            result.extra["token_targets"] = torch.cat([e.token_targets for e in encoded])
        return result


class TiledBatch(TinyBatch):
    """A batch of :class:`TiledCollator`: ``pixel_values`` ``(T, 3, S, S)`` are the NVLM-D tiles of all images
    (each image: regular tiles row-major, thumbnail last), ``image_grid_thw`` ``(B, 3)`` holds
    ``(tiles incl. thumbnail, rows, cols)`` per image and is not a model input."""

    def model_inputs(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``NVLMDForConditionalGeneration.forward`` (no ``image_grid_thw``)."""
        inputs = super().model_inputs(dtype)
        inputs.pop("image_grid_thw")
        return inputs


class TiledCollator(TinyCollator):
    """:class:`TinyCollator` for NVLM-D: each image becomes dynamic tiles + a thumbnail
    (:func:`~navil_utils.processing.tiling.preprocess_tiles`) and the span
    ``<Image><tile_1>`` + n pads + … + ``<tile_global_thumbnail>`` + n pads + ``</Image>`` (1-D tile tags,
    ``n = tokens_per_tile``).  Prompt text, answers, labels, padding and QA packing are the NaViL collator's.

    Args:
        tokenizer: the tiny tokenizer extended with NVLM-D's tokens
            (:func:`navil_utils.tiny.nvlm_d.extend_tokenizer_with_nvlm_tokens`).
        tile_size, max_tiles, min_tiles, use_thumbnail: the tiling (``plan_tiles``).
        patch_size, merge_size: ViT patch and pixel-shuffle merge → ``(S/p)² / m²`` pads per tile.
        Other arguments as :class:`TinyCollator`.
    """

    batch_class = TiledBatch

    def __init__(self, tokenizer: Any, *, tile_size: int, max_tiles: int, min_tiles: int = 1,
                 use_thumbnail: bool = True, patch_size: int = NAVIL_PATCH_SIZE, merge_size: int = NAVIL_MERGE_SIZE,
                 system_message: str = TINY_SYSTEM_MESSAGE, template: str = TINY_TEMPLATE,
                 padding_side: str = "right", qa_packing: str = "single",
                 pad_to_multiple_of: int | None = None) -> None:
        from navil_utils.errors import CheckpointError
        from navil_utils.processing.tiling import (
            NVLM_IMAGE_CONTEXT_TOKEN,
            nvlm_special_tokens,
        )

        super().__init__(tokenizer, system_message=system_message, template=template, padding_side=padding_side,
                         qa_packing=qa_packing, pad_to_multiple_of=pad_to_multiple_of)
        if tile_size < 1 or tile_size % (patch_size * merge_size):
            raise ConfigError(f"tile_size {tile_size} must be a positive multiple of patch_size × merge_size = "
                              f"{patch_size * merge_size}")
        if not 1 <= min_tiles <= max_tiles:
            raise ConfigError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
        self.tile_size, self.max_tiles, self.min_tiles = tile_size, max_tiles, min_tiles
        self.use_thumbnail = use_thumbnail
        self.tokens_per_tile = (tile_size // patch_size) ** 2 // merge_size ** 2
        try:
            self.nvlm_ids = navil_token_ids(tokenizer, nvlm_special_tokens(max_tiles))
        except CheckpointError as error:
            raise ConfigError(f"{error}: extend the tokenizer with navil_utils.tiny.nvlm_d."
                              "extend_tokenizer_with_nvlm_tokens") from None
        self.image_pad_id = self.nvlm_ids[NVLM_IMAGE_CONTEXT_TOKEN]

    @classmethod
    def from_model_config(cls, config: Any, tokenizer: Any, **kwargs: Any) -> TiledCollator:
        """The collator of an :class:`~navil_utils.models.configuration_nvlm_d.NVLMDConfig` (tiling, template,
        system message)."""
        kwargs.setdefault("system_message", getattr(config, "system_message", None) or TINY_SYSTEM_MESSAGE)
        kwargs.setdefault("template", config.template or TINY_TEMPLATE)
        return cls(tokenizer, tile_size=config.tile_size, max_tiles=config.max_dynamic_patch,
                   min_tiles=config.min_dynamic_patch, use_thumbnail=config.use_thumbnail,
                   patch_size=config.tile_size // config.patches_per_side, merge_size=config.merge_size, **kwargs)

    def plan(self, height: int, width: int):
        """The :class:`~navil_utils.processing.tiling.TilePlan` of an ``height × width`` image."""
        from navil_utils.processing.tiling import plan_tiles

        return plan_tiles(height, width, self.max_tiles, self.tile_size, self.use_thumbnail, self.min_tiles)

    def visual_tokens(self, height: int, width: int) -> int:
        """Image pad tokens (= visual tokens) of an ``height × width`` image: tiles × ``tokens_per_tile``."""
        return self.plan(height, width).num_tiles * self.tokens_per_tile

    def image_inputs(self, image: Any) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """``(span ids, pixel_values (T, 3, S, S) ImageNet-normalised, [[T, rows, cols]])`` of one image."""
        from navil_utils.processing.tiling import nvlm_image_span_ids, preprocess_tiles

        tiles = preprocess_tiles(image, self.max_tiles, self.tile_size, self.use_thumbnail, self.min_tiles)
        span = nvlm_image_span_ids(tiles.num_tiles, self.nvlm_ids, self.tokens_per_tile)
        cols, rows = tiles.grid
        return span, tiles.pixel_values, torch.tensor([[tiles.num_tiles, rows, cols]], dtype=torch.long)


def isolated_block_mask(block_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask ``(B, 1, T, T)`` for isolated QA packing.

    ``block_ids`` ``(B, T)``: -1 = shared prefix, k ≥ 0 = QA block k, -2 = padding.  Query i may attend
    key j ≤ i when j is in the prefix or in i's own block; padding queries attend only themselves
    (keeps softmax finite).  0 = attend, ``finfo(dtype).min`` = blocked (works for eager and SDPA).
    """
    length, device = block_ids.shape[1], block_ids.device
    q, k = block_ids[:, :, None], block_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    allowed = causal & (k != _PAD_BLOCK) & ((k == _PREFIX_BLOCK) | (k == q))
    eye = torch.eye(length, dtype=torch.bool, device=device)
    allowed = torch.where((q == _PAD_BLOCK) & eye, True, allowed & (q != _PAD_BLOCK))
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def qa_exact_match(logits: torch.Tensor, batch: TinyBatch) -> torch.Tensor:
    """``(Q,)`` bool: whether greedy decoding would reproduce each QA's answer exactly.

    With teacher forcing, greedy decoding emits the answer and ``<|im_end|>`` iff the arg-max at every
    answer position (predicted from the previous token, ``logits[:, i-1]``) is the label.
    """
    predicted = logits[:, :-1].argmax(-1)                 # (B, T-1): prediction of token i+1
    target, qa = batch.labels[:, 1:].to(predicted.device), batch.answer_qa[:, 1:].to(predicted.device)
    wrong = (predicted != target) & (qa >= 0)
    errors = torch.zeros(len(batch.qas), dtype=torch.long, device=predicted.device)
    errors.scatter_add_(0, qa[qa >= 0], wrong[qa >= 0].long())
    return errors == 0


class SyntheticBatches(torch.utils.data.IterableDataset):
    """Stream of collated batches of consecutive sample indices, resumable and shardable.

    Batch ``b`` holds samples ``start + b·batch_size … + batch_size - 1``; with
    ``DataLoader(SyntheticBatches(...), batch_size=None, num_workers=k)`` worker ``w`` builds batches
    ``w, w + k, …`` and the loader returns them in order ``0, 1, 2, …`` — the same stream as with no
    workers.  Resume a run from sample index ``start`` (e.g. ``steps_done · batch_size``).
    Set ``TOKENIZERS_PARALLELISM=false`` before forking workers to silence the tokenizers warning.
    """

    def __init__(self, data: Any, collator: TinyCollator, batch_size: int, *, start: int = 0,
                 num_batches: int | None = None) -> None:
        if batch_size < 1 or start < 0 or (num_batches is not None and num_batches < 0):
            raise ConfigError(f"need batch_size >= 1, start >= 0, num_batches >= 0; got {batch_size}, {start}, "
                              f"{num_batches}")
        self.data, self.collator = data, collator
        self.batch_size, self.start, self.num_batches = batch_size, start, num_batches

    def batch(self, b: int) -> TinyBatch:
        """Batch number ``b`` of the stream."""
        first = self.start + b * self.batch_size
        return self.collator([self.data.sample(i) for i in range(first, first + self.batch_size)])

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        b, step = (info.id, info.num_workers) if info is not None else (0, 1)
        while self.num_batches is None or b < self.num_batches:
            yield self.batch(b)
            b += step
