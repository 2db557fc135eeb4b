"""Chat with a native NaViL model: single turn, multi-turn history, streaming and batches.

(The module is called ``chatting`` rather than ``chat`` on purpose: a submodule named ``chat`` would
replace the lazily exported function ``navil_utils.chat`` by the module object as soon as anything
imported ``navil_utils.chat``.)

Follows the official ``chat`` method: multi-scale preprocessing with the model config's pixel budget (``min/max_dynamic_patch · patch_size²``), the template named by ``config.template``,
``<image>`` placeholders expanded into the multi-scale image span, ``eos = id("<|im_end|>")``
(the template separator), greedy decoding by default, answer = decoded new tokens cut at the
separator and stripped.  Unlike the reference it runs on whatever device/dtype the model is on,
accepts several images, streams, and batches with left padding.  Inputs and prompts come from
:class:`~navil_utils.processing.processor.NaViLProcessor`.

    answer, history = navil_utils.chat(model, tokenizer, "photo.jpg", "What is in the image?")
    answer, history = navil_utils.chat(model, tokenizer, "photo.jpg", "And the colours?", history)
    for piece in navil_utils.chat(model, tokenizer, "photo.jpg", "Describe it.", stream=True):
        print(piece, end="")
"""
from __future__ import annotations

import numbers
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from navil_utils.errors import ConfigError, PromptTooLongError
from navil_utils.processing.processor import ChatInputs, NaViLProcessor
from navil_utils.processing.templates import History, clean_response

#: Generation defaults of the reference demo (greedy, up to 1024 new tokens).
DEFAULT_GENERATION: dict[str, Any] = {"max_new_tokens": 1024, "do_sample": False}


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


def context_length(model: Any) -> int | None:
    """The number of positions the model's LLM supports (``config.llm_config.max_position_embeddings``),
    or None when the config does not say."""
    config = getattr(model, "config", model)
    llm = getattr(config, "llm_config", None) or config
    value = getattr(llm, "max_position_embeddings", None)
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0 else None


def _check_max_new_tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"max_new_tokens must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ConfigError(f"max_new_tokens must be a positive int, got {value}")
    return int(value)


def _generation_kwargs(processor: NaViLProcessor, generation: dict[str, Any], model: Any = None,
                       inputs: ChatInputs | None = None) -> dict[str, Any]:
    """``generate`` options: defaults + ``generation``, eos/pad ids, and the context-window check.

    An explicit ``max_new_tokens`` must be a positive int and fit with the prompt into the model's
    positions (else :class:`PromptTooLongError`, before anything runs); the default (1024) is lowered to
    what is left of the context.
    """
    explicit = "max_new_tokens" in generation
    kwargs = {**DEFAULT_GENERATION, **generation}
    kwargs["max_new_tokens"] = _check_max_new_tokens(kwargs["max_new_tokens"])
    kwargs["eos_token_id"] = processor.eos_token_id   # like the reference: eos = id of the template separator
    kwargs.setdefault("pad_token_id", processor.pad_token_id)
    limit = None if model is None else context_length(model)
    if limit is not None and inputs is not None:
        prompt = int(inputs.input_ids.shape[1])
        wanted = kwargs["max_new_tokens"]
        if prompt >= limit or (explicit and prompt + wanted > limit):
            batch = "" if inputs.input_ids.shape[0] == 1 else " (the longest prompt of the batch)"
            raise PromptTooLongError(
                f"the prompt has {prompt} tokens{batch} and max_new_tokens is {wanted}: {prompt} + {wanted} = "
                f"{prompt + wanted} > the model's {limit} positions (config.llm_config.max_position_embeddings); "
                "shorten the question/history or lower max_new_tokens")
        kwargs["max_new_tokens"] = min(wanted, limit - prompt)
    return kwargs


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


def _decode_answers(processor: NaViLProcessor, generated: torch.Tensor) -> list[str]:
    """Decode each row up to its first separator (eos), then post-process like the reference."""
    eos_id, sep = processor.eos_token_id, processor.template.sep
    answers = []
    for row in generated.tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        answers.append(clean_response(processor.tokenizer.decode(row, skip_special_tokens=True), sep))
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
    processor = NaViLProcessor.from_config(model, tokenizer)
    _check_max_new_tokens(generation.get("max_new_tokens", DEFAULT_GENERATION["max_new_tokens"]))
    inputs = processor([image], [question], [history], system_message)
    generated = _run_generate(model, inputs, _generation_kwargs(processor, generation, model, inputs))
    answers = _decode_answers(processor, generated)
    new_history = [*(history or []), (inputs.questions[0], answers[0])]
    return ChatTurn(answers, [new_history], inputs.prompts, inputs.input_ids, generated)


class _StopFlag:
    """A ``StoppingCriteria`` that ends generation once ``event`` is set (the stream was abandoned)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _generate_in_background(model: Any, inputs: ChatInputs, kwargs: dict[str, Any], streamer: Any,
                            stop: threading.Event, errors: list[BaseException]) -> None:
    """Thread body of :class:`ChatStream` (holds no reference to the stream, so an abandoned stream can be
    garbage-collected, which stops this generation)."""
    from transformers import StoppingCriteriaList

    criteria = StoppingCriteriaList([*(kwargs.pop("stopping_criteria", None) or []), _StopFlag(stop)])
    try:
        _run_generate(model, inputs, {**kwargs, "streamer": streamer, "stopping_criteria": criteria})
    except BaseException as err:  # surfaced in ChatStream.__iter__
        errors.append(err)
        streamer.end()


class ChatStream:
    """Iterator over the answer's text pieces while ``model.generate`` runs in a thread.

    After the iteration ``answer`` (post-processed) and ``history`` are set.  Exceptions raised by
    ``generate`` are re-raised in the consuming thread.  A stream that is abandoned — the loop is left
    early, :meth:`close` is called, or the object is garbage-collected — stops generating at the next
    token instead of running to ``max_new_tokens`` in the background.
    """

    def __init__(self, model: Any, processor: NaViLProcessor, inputs: ChatInputs, kwargs: dict[str, Any],
                 history: History | None) -> None:
        from transformers import TextIteratorStreamer

        self._streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._pieces: list[str] = []
        self._errors: list[BaseException] = []
        self._stop = threading.Event()
        self._sep = processor.template.sep
        self._history = history or []
        self._question = inputs.questions[0]
        self.prompt = inputs.prompts[0]
        self.input_ids = inputs.input_ids
        self.answer: str | None = None
        self.history: History | None = None
        self._thread = threading.Thread(
            target=_generate_in_background,
            args=(model, inputs, kwargs, self._streamer, self._stop, self._errors), daemon=True)
        self._thread.start()
        weakref.finalize(self, self._stop.set)

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            for piece in self._streamer:
                if piece:
                    self._pieces.append(piece)
                    yield piece
            finished = True
        finally:
            if not finished:  # the consumer left the loop: stop the background generation
                self.close()
        self._thread.join()
        if self._errors:
            raise self._errors[0]
        self.answer = clean_response("".join(self._pieces), self._sep)
        self.history = [*self._history, (self._question, self.answer)]

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop generating (at the next token) and wait for the background thread."""
        self._stop.set()
        self._thread.join(timeout)

    @property
    def generating(self) -> bool:
        """Whether the background ``generate`` is still running."""
        return self._thread.is_alive()

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
        generation: ``model.generate`` options (default greedy, ``max_new_tokens=1024``, lowered to what the
            context window leaves).

    Raises:
        PromptError: malformed question/history/system message (not strings, lone surrogates, …);
            :class:`PromptTooLongError` when the prompt plus an explicit ``max_new_tokens`` exceeds the
            model's positions.  ConfigError: ``max_new_tokens`` is not a positive int.
    """
    if stream:
        processor = NaViLProcessor.from_config(model, tokenizer)
        _check_max_new_tokens(generation.get("max_new_tokens", DEFAULT_GENERATION["max_new_tokens"]))
        inputs = processor([image], [question], [history], system_message)
        return ChatStream(model, processor, inputs, _generation_kwargs(processor, generation, model, inputs), history)
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
    processor = NaViLProcessor.from_config(model, tokenizer)
    _check_max_new_tokens(generation.get("max_new_tokens", DEFAULT_GENERATION["max_new_tokens"]))
    inputs = processor(images, questions, histories, system_message)
    generated = _run_generate(model, inputs, _generation_kwargs(processor, generation, model, inputs))
    answers = _decode_answers(processor, generated)
    previous = list(histories) if histories is not None else [None] * len(questions)
    new_histories = [[*(h or []), (q, a)] for h, q, a in zip(previous, inputs.questions, answers)]
    return ChatTurn(answers, new_histories, inputs.prompts, inputs.input_ids, generated)


def load_chat_model(path: str | Any, *, dtype: Any = None, device_map: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for chatting from a checkpoint directory (or a hub id, resolved like
    :func:`navil_utils.load_model` does: :class:`~navil_utils.errors.OfflineError` when unreachable).

    The tokenizer comes from the checkpoint's own files (:func:`navil_utils.load_tokenizer`) and the ids
    of NaViL's tokens are looked up in it, so the model and the tokenizer always agree.  (The golden
    fixtures ship no tokenizer: load them with :func:`navil_utils.load_golden_chat_model`.)
    """
    from navil_utils.errors import CheckpointNotFoundError
    from navil_utils.models.checkpoint import resolve_checkpoint
    from navil_utils.models.loading import load_model
    from navil_utils.processing.tokenizers import load_tokenizer, navil_token_ids

    # a hub id is resolved (or refused with OfflineError) exactly as load_model does it
    hub = {k: kwargs[k] for k in ("revision", "cache_dir", "token", "local_files_only") if kwargs.get(k) is not None}
    directory = resolve_checkpoint(path, **hub)
    if (directory / "meta.json").is_file() and not any(
            (directory / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointNotFoundError(
            f"{directory} has no tokenizer files but a meta.json: a golden fixture? Load it with "
            "navil_utils.load_golden_chat_model(variant), which supplies the fixture's toy tokenizer")
    tokenizer = load_tokenizer(directory)
    model = load_model(directory, special_token_ids=navil_token_ids(tokenizer), dtype=dtype, device_map=device_map,
                       **kwargs)
    return model, tokenizer
