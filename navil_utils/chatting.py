"""Chat with a native NaViL model: single turn, multi-turn history, streaming and batches.

(The module is called ``chatting`` rather than ``chat`` on purpose: a submodule named ``chat`` would
replace the lazily exported function ``navil_utils.chat`` by the module object as soon as anything
imported ``navil_utils.chat``.)

Follows the reference ``NaViL.chat`` (spec §7.2): multi-scale preprocessing with the model config's
pixel budget (``min/max_dynamic_patch · patch_size²``), the template named by ``config.template``,
``<image>`` placeholders expanded into the multi-scale image span, ``eos = id("<|im_end|>")``
(the template separator), greedy decoding by default, answer = decoded new tokens cut at the
separator and stripped.  Unlike the reference it runs on whatever device/dtype the model is on,
accepts several images, streams, and batches with left padding.

    answer, history = navil_utils.chat(model, tokenizer, "photo.jpg", "What is in the image?")
    answer, history = navil_utils.chat(model, tokenizer, "photo.jpg", "And the colours?", history)
    for piece in navil_utils.chat(model, tokenizer, "photo.jpg", "Describe it.", stream=True):
        print(piece, end="")
"""
from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import PromptError
from .prompting import History, add_image_placeholders, build_prompt, clean_response, template_from_config
from .tokenization import token_id

#: Generation defaults of the reference demo (greedy, up to 1024 new tokens).
DEFAULT_GENERATION: dict[str, Any] = {"max_new_tokens": 1024, "do_sample": False}


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
@dataclass
class ChatInputs:
    """Everything one chat turn feeds to ``model.generate``.

    ``input_ids``/``attention_mask`` ``[B, L]`` (left-padded when B > 1); ``pixel_values``
    ``[N, 3, p, p]`` and ``image_grid_thw`` ``[S, 3]`` of all images of the batch in order (``None``
    for text only); ``prompts`` and ``questions`` (as stored in the history, with placeholders) per
    sample; ``num_scales`` per image.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    prompts: list[str]
    questions: list[str]
    num_scales: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ChatInputs:
        """Move ids and pixels to ``device``; pixels also to the model's floating ``dtype``."""
        pixels = None
        if self.pixel_values is not None:
            pixels = self.pixel_values.to(device=device, dtype=dtype or self.pixel_values.dtype)
        grids = None if self.image_grid_thw is None else self.image_grid_thw.to(device)
        return ChatInputs(self.input_ids.to(device), self.attention_mask.to(device), pixels, grids,
                          self.prompts, self.questions, self.num_scales)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.pixel_values is not None:
            kwargs.update(pixel_values=self.pixel_values, image_grid_thw=self.image_grid_thw)
        return kwargs


def _config(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def pixel_budget(config: Any) -> dict[str, Any]:
    """``preprocess_multiscale`` settings from a NaViL config (pixels = dynamic patches × p²)."""
    vision = config.vision_config
    patch = int(vision.patch_size)
    return {
        "min_pixels": int(config.min_dynamic_patch) * patch * patch,
        "max_pixels": int(config.max_dynamic_patch) * patch * patch,
        "scale_downsample_ratio": float(config.scale_downsample_ratio),
        "patch_size": patch,
        "merge_size": int(round(1.0 / float(config.downsample_ratio))),
    }


def _preprocess(image: Any, config: Any):
    """``None`` → no image; a ``MultiScaleInputs`` is used as is; anything else is preprocessed."""
    from .preprocessing import MultiScaleInputs, preprocess_multiscale

    if image is None or (isinstance(image, (list, tuple)) and len(image) == 0):
        return None
    if isinstance(image, MultiScaleInputs):
        return image
    return preprocess_multiscale(image, **pixel_budget(config))


def _pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, longest - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, longest - len(seq):] = 1
    return ids, mask


def _pad_id(tokenizer: Any, eos_id: int) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return eos_id if pad is None else int(pad)


def prepare_chat_inputs(
    model_or_config: Any,
    tokenizer: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    histories: Sequence[History | None] | None = None,
    system_message: str | None = None,
) -> ChatInputs:
    """Preprocess images and build/tokenise the prompts of a batch of chat turns (left padding).

    ``images[i]`` is ``None``, one image, a list of images, or a ready ``MultiScaleInputs``.
    """
    config = _config(model_or_config)
    if len(images) != len(questions):
        raise PromptError(f"{len(images)} image entries for {len(questions)} questions")
    histories = list(histories) if histories is not None else [None] * len(questions)
    if len(histories) != len(questions):
        raise PromptError(f"{len(histories)} histories for {len(questions)} questions")
    template, default_system = template_from_config(config)
    system = default_system if system_message is None else system_message
    merge = pixel_budget(config)["merge_size"]
    prompts, stored, sequences, pixels, grids, num_scales = [], [], [], [], [], []
    for image, question, history in zip(images, questions, histories):
        if not isinstance(question, str):
            raise PromptError(f"question must be a string, got {type(question).__name__}")
        inputs = _preprocess(image, config)
        n_images = 0 if inputs is None else inputs.num_images
        question = add_image_placeholders(question, n_images, history)
        prompt = build_prompt(question, None if inputs is None else inputs.image_grid_thw,
                              None if inputs is None else inputs.num_scales, template=template,
                              history=history, system_message=system, merge_size=merge)
        prompts.append(prompt)
        stored.append(question)
        sequences.append([int(i) for i in tokenizer.encode(prompt)])
        if inputs is not None:
            pixels.append(inputs.pixel_values)
            grids.append(inputs.image_grid_thw)
            num_scales.extend(int(n) for n in inputs.num_scales)
    eos_id = token_id(tokenizer, template.sep)
    input_ids, attention_mask = _pad_left(sequences, _pad_id(tokenizer, eos_id))
    return ChatInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.cat(pixels) if pixels else None,
        image_grid_thw=torch.cat(grids).long() if grids else None,
        prompts=prompts,
        questions=stored,
        num_scales=num_scales,
    )


def _placement(model: Any) -> tuple[torch.device, torch.dtype]:
    """Device of the input embeddings (where ids must go) and the model's floating dtype."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is None:
        weight = next(p for p in model.parameters() if p.is_floating_point())
    return weight.device, weight.dtype


def _vision_device(model: Any, default: torch.device) -> torch.device:
    vision = getattr(model, "vision_model", None)
    if vision is not None:
        for param in vision.parameters():
            return param.device
    return default


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------
@dataclass
class ChatTurn:
    """One answered turn: the answer, the updated history, and the raw ids (for tests/analysis).

    ``generated_ids`` ``[B, T]`` holds only the new tokens (right-padded with eos after a sample ended).
    """

    answers: list[str]
    histories: list[History]
    prompts: list[str]
    input_ids: torch.Tensor
    generated_ids: torch.Tensor

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def history(self) -> History:
        return self.histories[0]


def _generation_kwargs(model: Any, tokenizer: Any, generation: dict[str, Any]) -> tuple[dict[str, Any], str]:
    template, _ = template_from_config(_config(model))
    eos_id = token_id(tokenizer, template.sep)
    kwargs = {**DEFAULT_GENERATION, **generation}
    kwargs["eos_token_id"] = eos_id          # like the reference: eos = id of the template separator
    kwargs.setdefault("pad_token_id", _pad_id(tokenizer, eos_id))
    return kwargs, template.sep


def _run_generate(model: Any, inputs: ChatInputs, kwargs: dict[str, Any]) -> torch.Tensor:
    device, dtype = _placement(model)
    moved = inputs.to(device, dtype)
    if moved.pixel_values is not None:
        moved.pixel_values = moved.pixel_values.to(_vision_device(model, device))
    with torch.inference_mode():
        sequences = model.generate(**moved.generate_kwargs(), **kwargs)
    if not isinstance(sequences, torch.Tensor):  # return_dict_in_generate=True
        sequences = sequences.sequences
    # model.generate returns prompt + new tokens
    return sequences[:, inputs.input_ids.shape[1]:].cpu()


def _decode_answers(tokenizer: Any, generated: torch.Tensor, sep: str) -> list[str]:
    """Decode each row up to its first separator (eos), then post-process like the reference."""
    eos_id = token_id(tokenizer, sep)
    answers = []
    for row in generated.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        answers.append(clean_response(tokenizer.decode(row, skip_special_tokens=True), sep))
    return answers


def chat_turn(
    model: Any,
    tokenizer: Any,
    image: Any,
    question: str,
    history: History | None = None,
    *,
    system_message: str | None = None,
    **generation: Any,
) -> ChatTurn:
    """One chat turn (batch of one) returning the answer, new history and the generated ids."""
    inputs = prepare_chat_inputs(model, tokenizer, [image], [question], [history], system_message)
    kwargs, sep = _generation_kwargs(model, tokenizer, generation)
    generated = _run_generate(model, inputs, kwargs)
    answers = _decode_answers(tokenizer, generated, sep)
    new_history = [*(history or []), (inputs.questions[0], answers[0])]
    return ChatTurn(answers, [new_history], inputs.prompts, inputs.input_ids, generated)


class ChatStream:
    """Iterator over the answer's text pieces while ``model.generate`` runs in a thread.

    After the iteration ``answer`` (post-processed) and ``history`` are set.  Exceptions raised by
    ``generate`` are re-raised in the consuming thread.
    """

    def __init__(self, model: Any, tokenizer: Any, inputs: ChatInputs, kwargs: dict[str, Any], sep: str,
                 history: History | None) -> None:
        from transformers import TextIteratorStreamer

        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._pieces: list[str] = []
        self._error: BaseException | None = None
        self._sep = sep
        self._history = history or []
        self._question = inputs.questions[0]
        self.prompt = inputs.prompts[0]
        self.answer: str | None = None
        self.history: History | None = None
        self._thread = threading.Thread(target=self._generate, args=(model, inputs, kwargs), daemon=True)
        self._thread.start()

    def _generate(self, model: Any, inputs: ChatInputs, kwargs: dict[str, Any]) -> None:
        try:
            _run_generate(model, inputs, {**kwargs, "streamer": self._streamer})
        except BaseException as err:  # surfaced in __iter__
            self._error = err
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        for piece in self._streamer:
            if piece:
                self._pieces.append(piece)
                yield piece
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.answer = clean_response("".join(self._pieces), self._sep)
        self.history = [*self._history, (self._question, self.answer)]

    @property
    def text(self) -> str:
        """The raw streamed text so far."""
        return "".join(self._pieces)


def chat(
    model: Any,
    tokenizer: Any,
    image: Any,
    question: str,
    history: History | None = None,
    stream: bool = False,
    *,
    system_message: str | None = None,
    **generation: Any,
) -> tuple[str, History] | ChatStream:
    """Ask ``question`` about ``image`` (``None``: text only); returns ``(answer, history)``.

    Args:
        model: a native NaViL model (:func:`navil_utils.load_model`), on any device/dtype.
        tokenizer: its tokenizer (:func:`navil_utils.load_tokenizer`, or the fixtures' toy tokenizer).
        image: ``None``, a path / URL / PIL image / array, a list of them (several images), or a
            ``MultiScaleInputs``; follow-up turns must pass the conversation's image(s) again.
        question: the user message; ``<image>`` placeholders may place the images explicitly.
        history: ``(question, answer)`` pairs returned by a previous call.
        stream: return a :class:`ChatStream` that yields text pieces as they are generated (its
            ``answer``/``history`` are set once exhausted).
        system_message: overrides the config's / template's system message.
        generation: ``model.generate`` options (default greedy, ``max_new_tokens=1024``).
    """
    if stream:
        inputs = prepare_chat_inputs(model, tokenizer, [image], [question], [history], system_message)
        kwargs, sep = _generation_kwargs(model, tokenizer, generation)
        return ChatStream(model, tokenizer, inputs, kwargs, sep, history)
    turn = chat_turn(model, tokenizer, image, question, history, system_message=system_message, **generation)
    return turn.answer, turn.history


def batch_chat(
    model: Any,
    tokenizer: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    *,
    histories: Sequence[History | None] | None = None,
    system_message: str | None = None,
    **generation: Any,
) -> ChatTurn:
    """Answer several ``(image, question)`` pairs in one left-padded ``generate`` call.

    ``images[i]`` may be ``None`` (text-only sample).  Returns a :class:`ChatTurn` with one answer and
    history per sample (``.answers``, ``.histories``) and the new ids ``[B, T]``.
    """
    inputs = prepare_chat_inputs(model, tokenizer, images, questions, histories, system_message)
    kwargs, sep = _generation_kwargs(model, tokenizer, generation)
    generated = _run_generate(model, inputs, kwargs)
    answers = _decode_answers(tokenizer, generated, sep)
    previous = list(histories) if histories is not None else [None] * len(questions)
    new_histories = [[*(h or []), (q, a)] for h, q, a in zip(previous, inputs.questions, answers)]
    return ChatTurn(answers, new_histories, inputs.prompts, inputs.input_ids, generated)


def load_chat_model(path: str | Any, *, dtype: Any = None, device_map: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for chatting from a checkpoint directory.

    A golden fixture directory (``meta.json`` with a ``toy_tokenizer`` entry) gets the fixture's toy
    tokenizer and special-token ids; any other checkpoint gets :func:`navil_utils.load_tokenizer` and
    the ids of NaViL's tokens in that tokenizer (so the model and the tokenizer always agree).
    """
    from pathlib import Path

    from .models.loading import load_model
    from .testing import ToyTokenizer, read_meta
    from .tokenization import load_tokenizer, navil_token_ids

    directory = Path(path)
    meta_file = directory / "meta.json"
    if meta_file.is_file() and "toy_tokenizer" in read_meta(directory):
        tokenizer: Any = ToyTokenizer.from_fixture(directory)
        special_ids = read_meta(directory)["special_token_ids"]
    else:
        tokenizer = load_tokenizer(directory)
        special_ids = navil_token_ids(tokenizer)
    model = load_model(directory, special_token_ids=special_ids, dtype=dtype, device_map=device_map, **kwargs)
    return model, tokenizer
