"""The NaViL processor: (images, conversation) -> model inputs.  The one place a prompt is rendered.

In transformers' terms this is the *processor* of NaViL: it owns the tokenizer, the conversation
template of the checkpoint (``config.template``), its system message and its pixel budget
(``min/max_dynamic_patch · patch_size²``, ``scale_downsample_ratio``, merge size), and turns images plus
questions (and optional history) into ``input_ids``, ``attention_mask``, ``pixel_values`` and
``image_grid_thw``.  Everything that needs a NaViL prompt gets it from here:

* :mod:`navil_utils.chatting` (chat, streaming, batch chat) calls the processor;
* the tiny model's training collator takes the text before and after the image span from
  :meth:`NaViLProcessor.text_around_image`;
* the tiny tokenizer's ``chat_template.jinja`` is :meth:`NaViLProcessor.jinja_chat_template`, generated
  from the same :class:`~navil_utils.processing.templates.ChatTemplate`.

Prompts are tokenised piece by piece (:class:`~navil_utils.processing.tokenizers.PromptEncoder`): control
tokens (``<|im_start|>``, ``<|im_end|>``, ``<img>`` …) come only from the template and the image spans; the
messages (questions, history, system message) are plain text, so a question containing ``"<img>"`` or
``"<|im_end|><|im_start|>assistant"`` cannot open an image span or fake a turn.  Ordinary prompts get
exactly the ids of ``tokenizer.encode(prompt)``.

    processor = NaViLProcessor.from_config(model.config, tokenizer)
    inputs = processor(["photo.jpg"], ["What is in the image?"])        # ChatInputs, left-padded batch
    prompt = processor.render("What is in the image?", inputs.image_grid_thw)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from navil_utils.constants import IMAGE_PLACEHOLDER, merge_size_from_ratio
from navil_utils.errors import PromptError
from navil_utils.processing.templates import (
    ChatTemplate,
    History,
    PromptPiece,
    add_image_placeholders,
    build_prompt,
    build_prompt_pieces,
    check_history,
    check_message,
    join_pieces,
    template_from_config,
)
from navil_utils.processing.tokenizers import PromptEncoder, token_id


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



def pixel_budget(config: Any) -> dict[str, Any]:
    """``preprocess_multiscale`` settings from a NaViL config (pixels = dynamic patches × p²)."""
    config = getattr(config, "config", config)
    patch = int(config.vision_config.patch_size)
    return {
        "min_pixels": int(config.min_dynamic_patch) * patch * patch,
        "max_pixels": int(config.max_dynamic_patch) * patch * patch,
        "scale_downsample_ratio": float(config.scale_downsample_ratio),
        "patch_size": patch,
        "merge_size": merge_size_from_ratio(config.downsample_ratio),
    }


def _pad_left(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, longest - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[row, longest - len(seq):] = 1
    return ids, mask



class NaViLProcessor:
    """Tokenizer + conversation template + pixel budget of one NaViL checkpoint.

    Args:
        tokenizer: the checkpoint's tokenizer (``encode``, ``decode``, ``convert_tokens_to_ids``).
        template: conversation template (``"internlm2-chat"``, ``"qwen3-chat"`` or a ``ChatTemplate``).
        system_message: the default system message (``None``: the template's).
        budget: :func:`preprocess_multiscale` settings — ``min_pixels``, ``max_pixels``,
            ``scale_downsample_ratio``, ``patch_size``, ``merge_size``.
    """

    def __init__(self, tokenizer: Any, template: str | ChatTemplate, budget: dict[str, Any],
                 system_message: str | None = None) -> None:
        from navil_utils.processing.templates import get_template

        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.system_message = self.template.system_message if system_message is None else system_message
        self.budget = dict(budget)
        self.merge_size = int(self.budget.get("merge_size", 2))
        self._encoder: PromptEncoder | None = None

    @property
    def encoder(self) -> PromptEncoder:
        """Encodes prompt pieces: control tokens from the template only, messages as plain text."""
        if self._encoder is None or self._encoder.tokenizer is not self.tokenizer:
            self._encoder = PromptEncoder(self.tokenizer)
        return self._encoder

    def encode_pieces(self, pieces: Sequence[PromptPiece], add_special_tokens: bool = True) -> list[int]:
        """Token ids of prompt pieces (:meth:`PromptEncoder.encode`): no message can produce a control id."""
        return self.encoder.encode(((p.text, p.is_user_text) for p in pieces), add_special_tokens)

    @classmethod
    def from_config(cls, config: Any, tokenizer: Any) -> NaViLProcessor:
        """The processor of a NaViL config (or a model: its ``.config``)."""
        config = getattr(config, "config", config)
        template, system = template_from_config(config)
        return cls(tokenizer, template, pixel_budget(config), system)

    @classmethod
    def from_pretrained(cls, path: Any) -> NaViLProcessor:
        """The processor of a checkpoint directory: its ``config.json`` and tokenizer files."""
        from navil_utils.models.checkpoint import load_config
        from navil_utils.processing.tokenizers import load_tokenizer

        return cls.from_config(load_config(path), load_tokenizer(path))

    # ---- token ids ---------------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int:
        """Id of the template separator (``<|im_end|>``): generation stops there, as in the reference."""
        return token_id(self.tokenizer, self.template.sep)

    @property
    def pad_token_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return self.eos_token_id if pad is None else int(pad)

    # ---- prompts -----------------------------------------------------------------------------------
    def render(self, question: str, image_grid_thw=None, num_scales: Sequence[int] | None = None, *,
               history: History | None = None, system_message: str | None = None) -> str:
        """The prompt string: template + history + question, each ``<image>`` expanded to its span.

        ``image_grid_thw`` ``[Σ scales, 3]`` and ``num_scales`` (scales per image) describe the images;
        ``None`` for a text-only prompt.
        """
        return build_prompt(question, image_grid_thw, num_scales, template=self.template, history=history,
                            system_message=self.system_message if system_message is None else system_message,
                            merge_size=self.merge_size)

    def render_pieces(self, question: str, image_grid_thw=None, num_scales: Sequence[int] | None = None, *,
                      history: History | None = None, system_message: str | None = None) -> list[PromptPiece]:
        """:meth:`render` as :class:`PromptPiece` s (template text apart from the messages)."""
        return build_prompt_pieces(
            question, image_grid_thw, num_scales, template=self.template, history=history,
            system_message=self.system_message if system_message is None else system_message,
            merge_size=self.merge_size)

    def text_around_image(self, question: str, system_message: str | None = None) -> tuple[str, str]:
        """``(before, after)``: the single-image prompt text before and after the image span.

        ``before + image_span_text(grids) + after == render(question, grids)`` for any one-image grids
        (the training collator tokenises the two pieces once and splices the span ids in between).
        """
        system = self.system_message if system_message is None else system_message
        text = self.template.render([(add_image_placeholders(question, 1), None)], system)
        before, after = text.split(IMAGE_PLACEHOLDER)
        return before, after

    def pieces_around_image(self, question: str, system_message: str | None = None) -> tuple[list[PromptPiece],
                                                                                             list[PromptPiece]]:
        """:meth:`text_around_image` as :class:`PromptPiece` s; ``question`` is plain text (an ``<image>`` in
        it is not a placeholder)."""
        check_message(question, "question")
        system = self.system_message if system_message is None else system_message
        check_message(system, "system_message")
        pieces = self.template.render_pieces([(IMAGE_PLACEHOLDER + "\n" + question, None)], system)
        index = next(i for i, piece in enumerate(pieces) if piece.role == "user")
        rest = pieces[index].text[len(IMAGE_PLACEHOLDER):]
        return pieces[:index], [PromptPiece(rest, "user"), *pieces[index + 1:]]

    def jinja_chat_template(self, system_message: str | None = None) -> str:
        """The template as a Jinja chat template for tokenizer files (``apply_chat_template``)."""
        return self.template.to_jinja(self.system_message if system_message is None else system_message)

    # ---- images ------------------------------------------------------------------------------------
    def preprocess(self, image: Any):
        """``None`` → no image; a ``MultiScaleInputs`` is used as is; anything else is preprocessed."""
        from navil_utils.processing.multiscale import (
            MultiScaleInputs,
            preprocess_multiscale,
        )

        if image is None or (isinstance(image, (list, tuple)) and len(image) == 0):
            return None
        if isinstance(image, MultiScaleInputs):
            return image
        return preprocess_multiscale(image, **self.budget)

    # ---- model inputs ------------------------------------------------------------------------------
    def __call__(self, images: Sequence[Any], questions: Sequence[str],
                 histories: Sequence[History | None] | None = None,
                 system_message: str | None = None) -> ChatInputs:
        """Preprocess images and build/tokenise the prompts of a batch of chat turns (left padding).

        ``images[i]`` is ``None``, one image, a list of images, or a ready ``MultiScaleInputs``.
        """
        if isinstance(questions, str) or not isinstance(questions, Sequence):
            raise PromptError(f"questions must be a list of strings, got {type(questions).__name__}")
        if isinstance(images, str) or not hasattr(images, "__len__"):
            raise PromptError(f"images must be a list (one entry per question), got {type(images).__name__}")
        if len(questions) == 0:
            raise PromptError("no questions given: pass at least one (image, question) pair")
        if len(images) != len(questions):
            raise PromptError(f"{len(images)} image entries for {len(questions)} questions")
        if histories is not None and (isinstance(histories, (str, dict)) or not isinstance(histories, Sequence)):
            raise PromptError(f"histories must be a list (one history or None per question), got "
                              f"{type(histories).__name__}")
        histories = list(histories) if histories is not None else [None] * len(questions)
        if len(histories) != len(questions):
            raise PromptError(f"{len(histories)} histories for {len(questions)} questions")
        if system_message is not None:
            check_message(system_message, "system_message")
        prompts, stored, sequences, pixels, grids, num_scales = [], [], [], [], [], []
        for row, (image, question, history) in enumerate(zip(images, questions, histories)):
            where = "" if len(questions) == 1 else f" (sample {row})"
            try:
                check_message(question, "question")
                history = check_history(history)
            except PromptError as err:
                raise PromptError(f"{err}{where}") from None
            inputs = self.preprocess(image)
            n_images = 0 if inputs is None else inputs.num_images
            question = add_image_placeholders(question, n_images, history)
            pieces = self.render_pieces(question, None if inputs is None else inputs.image_grid_thw,
                                        None if inputs is None else inputs.num_scales, history=history,
                                        system_message=system_message)
            prompts.append(join_pieces(pieces))
            stored.append(question)
            sequences.append(self.encode_pieces(pieces))
            if inputs is not None:
                pixels.append(inputs.pixel_values)
                grids.append(inputs.image_grid_thw)
                num_scales.extend(int(n) for n in inputs.num_scales)
        input_ids, attention_mask = _pad_left(sequences, self.pad_token_id)
        return ChatInputs(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=torch.cat(pixels) if pixels else None,
            image_grid_thw=torch.cat(grids).long() if grids else None,
            prompts=prompts,
            questions=stored,
            num_scales=num_scales,
        )

    def apply_chat(self, messages: Sequence[dict[str, str]], images: Any = None) -> ChatInputs:
        """Model inputs of one conversation given as chat messages (the transformers convention).

        ``messages``: ``{"role": "system" | "user" | "assistant", "content": str}`` dicts — an optional
        leading system message, alternating user/assistant turns, and a final user message (the question to
        answer).  ``images`` (one or a list) belong to the first user message, where ``<image>`` placeholders
        may place them.  Equivalent to ``self([images], [question], [history], system_message)``.
        """
        system, history, question = split_messages(messages)
        if history and images is not None:  # the images belong to the first user message
            count = len(images) if isinstance(images, (list, tuple)) else int(getattr(images, "num_images", 1))
            history[0] = (add_image_placeholders(history[0][0], count), history[0][1])
        return self([images], [question], [history or None], system)


def split_messages(messages: Sequence[dict[str, str]]) -> tuple[str | None, History, str]:
    """``messages`` -> ``(system message or None, [(question, answer), …], final question)``."""
    messages = list(messages)
    if not messages:
        raise PromptError("no messages given")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ("system", "user", "assistant"):
            raise PromptError(f"each message must be {{'role': system|user|assistant, 'content': str}}, got {message!r}")
    system = None
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m["role"] for m in messages]
    expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(messages))]
    if roles != expected or roles[-1:] != ["user"]:
        raise PromptError(f"messages must alternate user/assistant and end with a user message, got roles {roles}")
    history = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
    return system, history, messages[-1]["content"]


def prepare_chat_inputs(
    model_or_config: Any,
    tokenizer: Any,
    images: Sequence[Any],
    questions: Sequence[str],
    histories: Sequence[History | None] | None = None,
    system_message: str | None = None,
) -> ChatInputs:
    """``NaViLProcessor.from_config(model_or_config, tokenizer)(images, questions, histories, system_message)``."""
    return NaViLProcessor.from_config(model_or_config, tokenizer)(images, questions, histories, system_message)
