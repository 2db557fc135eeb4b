"""Conversation templates and prompt assembly of NaViL's chat format.

NaViL reuses InternVL's "MPT-style" templates: a prompt is::

    system_template.format(system_message) + sep + Σ_turns (role + message + sep) + assistant_role

with ``sep = "<|im_end|>"`` and no newline after ``sep``.  Two templates matter:

* ``internlm2-chat`` (NaViL-2B): roles ``<|im_start|>user\\n`` / ``<|im_start|>assistant\\n``;
* ``qwen3-chat`` (NaViL-9B): the same, but the assistant role opens an empty think block
  ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n`` (Qwen3's non-thinking mode).

Images enter the conversation as ``<image>`` placeholders (one per image, prepended to the first
question as ``"<image>\\n" * n``); after the template is rendered, the k-th placeholder is replaced by
the multi-scale span of image k (:func:`navil_utils.processing.image_tokens.image_span_text`).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from navil_utils.constants import IMAGE_PLACEHOLDER
from navil_utils.errors import ConfigError, PromptError
from navil_utils.processing.image_tokens import image_span_text, split_grids_per_image

#: Default system message of NaViL's templates (inherited from InternVL), used unless the model
#: config carries ``system_message``.
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)

#: Partial separators that can survive decoding when generation stops inside ``<|im_end|>``.
_STRAY_SEP_FRAGMENTS = ("<|im_end|", "<|im_end", "<|im")

History = list[tuple[str, str]]


class PromptPiece(NamedTuple):
    """A piece of a rendered prompt and where it came from.

    ``role`` is ``"template"`` for text our code writes (roles, separators, image spans: its special-token
    strings are control tokens) and ``"system"``, ``"user"`` or ``"assistant"`` for the messages, which
    are plain text whatever they contain.
    """

    text: str
    role: str

    @property
    def is_user_text(self) -> bool:
        """Whether the text comes from a message (to be tokenised as plain text)."""
        return self.role != "template"


def join_pieces(pieces: Sequence[PromptPiece]) -> str:
    """The prompt string of ``pieces``."""
    return "".join(piece.text for piece in pieces)


def check_message(text: Any, what: str) -> str:
    """Return ``text`` if it is a string that can be encoded (UTF-8, no lone surrogate); else raise
    :class:`PromptError` naming ``what`` (e.g. ``"question"``, ``"history[0] answer"``)."""
    if not isinstance(text, str):
        raise PromptError(f"{what} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise PromptError(f"{what} is not valid Unicode text: {err.reason} at position {err.start} "
                          f"({text[err.start:err.end]!r}); lone surrogates cannot be tokenised") from None
    return text


def check_history(history: Any) -> History | None:
    """Validate a chat history: ``None`` or a list of ``(question, answer)`` string pairs.

    Returns it as a list of tuples; raises :class:`PromptError` naming the first bad entry.
    """
    if history is None:
        return None
    if isinstance(history, (str, bytes, dict)) or not isinstance(history, (list, tuple)):
        raise PromptError(f"history must be a list of (question, answer) string pairs, got {type(history).__name__}")
    turns = []
    for index, turn in enumerate(history):
        if isinstance(turn, (str, bytes)) or not isinstance(turn, (list, tuple)) or len(turn) != 2:
            shown = repr(turn) if len(repr(turn)) <= 80 else repr(turn)[:77] + "..."
            raise PromptError(f"history[{index}] must be a (question, answer) pair of strings, got {shown}")
        question = check_message(turn[0], f"history[{index}] question")
        answer = check_message(turn[1], f"history[{index}] answer")
        turns.append((question, answer))
    return turns


@dataclass(frozen=True)
class ChatTemplate:
    """One MPT-style conversation template.

    ``render`` turns ``[(question, answer), …, (question, None)]`` into the prompt string.
    """

    name: str
    system_template: str
    user_role: str
    assistant_role: str
    sep: str = "<|im_end|>"
    system_message: str = DEFAULT_SYSTEM_MESSAGE

    def render(self, turns: Sequence[tuple[str, str | None]], system_message: str | None = None) -> str:
        """Render the conversation; the last turn's answer is normally ``None`` (generation prompt).

        Like the reference, an empty or ``None`` message contributes only its role (no ``sep``).
        """
        return join_pieces(self.render_pieces(turns, system_message))

    def render_pieces(self, turns: Sequence[tuple[str, str | None]],
                      system_message: str | None = None) -> list[PromptPiece]:
        """:meth:`render` as :class:`PromptPiece` s: template text apart from the messages' text."""
        system = self.system_message if system_message is None else system_message
        before, after = self.system_template.split("{system_message}")
        pieces = [PromptPiece(before, "template"), PromptPiece(system, "system"),
                  PromptPiece(after + self.sep, "template")]
        for question, answer in turns:
            for role, name, message in ((self.user_role, "user", question), (self.assistant_role, "assistant", answer)):
                pieces.append(PromptPiece(role, "template"))
                if message:
                    pieces += [PromptPiece(message, name), PromptPiece(self.sep, "template")]
        return [piece for piece in pieces if piece.text]

    def to_jinja(self, default_system_message: str | None = None) -> str:
        """The same format as a Jinja chat template (``tokenizer.apply_chat_template``).

        ``messages`` hold ``system`` (optional, first), ``user`` and ``assistant`` turns; the system message
        defaults to ``default_system_message`` (else this template's) and can be overridden by a leading
        system message or ``apply_chat_template(..., system_message=...)``.  Renders exactly what
        :meth:`render` renders for the same turns (``add_generation_prompt`` = an open assistant turn).
        """
        system = self.system_message if default_system_message is None else default_system_message
        before, after = self.system_template.split("{system_message}")
        role = {"user": _jinja_literal(self.user_role), "assistant": _jinja_literal(self.assistant_role)}
        sep = _jinja_literal(self.sep)
        return (
            "{%- set ns = namespace(system=system_message if system_message is defined else "
            + json.dumps(system, ensure_ascii=False) + ", start=0) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{%- set ns.system = messages[0]['content'] -%}{%- set ns.start = 1 -%}"
            "{%- endif -%}"
            "{{- " + _jinja_concat(before, "ns.system", after) + " + " + sep + " -}}"
            "{%- for message in messages[ns.start:] -%}"
            "{%- if message['role'] == 'assistant' -%}"
            "{%- set role = " + role["assistant"] + " -%}"
            "{%- elif message['role'] == 'user' -%}"
            "{%- set role = " + role["user"] + " -%}"
            "{%- else -%}"
            "{{- raise_exception('unsupported role ' + message['role'] + ' (use system/user/assistant)') -}}"
            "{%- endif -%}"
            "{%- if message['content'] -%}{{- role + message['content'] + " + sep + " -}}"
            "{%- else -%}{{- role -}}{%- endif -%}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + role["assistant"] + " -}}{%- endif -%}"
        )


def _jinja_literal(text: str) -> str:
    """A single-quoted Jinja string literal of ``text``."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def _jinja_concat(before: str, expression: str, after: str) -> str:
    parts = ([_jinja_literal(before)] if before else []) + [expression] + ([_jinja_literal(after)] if after else [])
    return " + ".join(parts)


TEMPLATES: dict[str, ChatTemplate] = {
    "internlm2-chat": ChatTemplate(
        name="internlm2-chat",
        system_template="<|im_start|>system\n{system_message}",
        user_role="<|im_start|>user\n",
        assistant_role="<|im_start|>assistant\n",
    ),
    "qwen3-chat": ChatTemplate(
        name="qwen3-chat",
        system_template="<|im_start|>system\n{system_message}",
        user_role="<|im_start|>user\n",
        assistant_role="<|im_start|>assistant\n<think>\n\n</think>\n\n",
    ),
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    """Look up a template by name (``"internlm2-chat"`` or ``"qwen3-chat"``)."""
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown conversation template {name!r}; known: {sorted(TEMPLATES)}") from None


def template_from_config(config: Any) -> tuple[ChatTemplate, str]:
    """The template and system message a NaViL config asks for.

    Reads ``config.template`` (required, as in the reference) and the optional
    ``config.system_message`` override.  ``config`` may be a config object or a plain dict.
    """
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    name = get("template")
    if not name:
        raise ConfigError("the model config has no 'template' (expected 'internlm2-chat' or 'qwen3-chat')")
    template = get_template(name)
    system_message = get("system_message")
    return template, template.system_message if system_message is None else system_message


def add_image_placeholders(question: str, num_images: int, history: Sequence[tuple[str, str]] | None = None) -> str:
    """Prepend ``"<image>\\n" × num_images`` to the first question of a conversation.

    Nothing is added when there is history (the images sit in the first turn), when there are no
    images, or when the question already places its own ``<image>`` placeholders.
    """
    if num_images < 0:
        raise PromptError(f"num_images must be >= 0, got {num_images}")
    if history or num_images == 0 or IMAGE_PLACEHOLDER in question:
        return question
    return (IMAGE_PLACEHOLDER + "\n") * num_images + question


def image_grids_per_image(image_grid_thw=None, num_scales: Sequence[int] | None = None) -> list[list[tuple[int, int, int]]]:
    """Split ``image_grid_thw`` ``[Σ scales, 3]`` into one list of ``(t, h, w)`` rows per image.

    ``num_scales=None`` means a single image owning every row.
    """
    if image_grid_thw is None:
        if num_scales:
            raise PromptError(f"num_scales={list(num_scales)} given without image_grid_thw")
        return []
    rows = image_grid_thw.tolist() if hasattr(image_grid_thw, "tolist") else list(image_grid_thw)
    if len(rows) == 0:
        return []
    if num_scales is None:
        num_scales = [len(rows)]
    num_scales = num_scales.tolist() if hasattr(num_scales, "tolist") else list(num_scales)
    try:
        return split_grids_per_image(rows, num_scales)
    except ValueError as err:
        raise PromptError(str(err)) from None


def expand_image_placeholders(text: str, image_grids: Sequence[Sequence[Sequence[int]]], merge_size: int = 2) -> str:
    """Replace the k-th ``<image>`` of ``text`` by the multi-scale span of image k.

    ``image_grids[k]`` holds the ``(t, h, w)`` rows of image k (smallest scale first).  The number of
    placeholders must equal the number of images.
    """
    pieces = text.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(image_grids):
        raise PromptError(
            f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image_grids)} "
            "image(s) were given (a follow-up turn must pass the conversation's image(s) again)"
        )
    out = [pieces[0]]
    for grids, rest in zip(image_grids, pieces[1:]):
        out.append(image_span_text(grids, merge_size))
        out.append(rest)
    return "".join(out)


def expand_image_pieces(pieces: Sequence[PromptPiece], image_grids: Sequence[Sequence[Sequence[int]]],
                        merge_size: int = 2) -> list[PromptPiece]:
    """:func:`expand_image_placeholders` on pieces: the ``<image>`` placeholders of the *user* messages
    (questions) become template pieces holding the image spans; other text keeps ``<image>`` as text."""
    count = sum(piece.text.count(IMAGE_PLACEHOLDER) for piece in pieces if piece.role == "user")
    if count != len(image_grids):
        raise PromptError(
            f"the prompt has {count} {IMAGE_PLACEHOLDER} placeholder(s) but {len(image_grids)} "
            "image(s) were given (a follow-up turn must pass the conversation's image(s) again)"
        )
    out: list[PromptPiece] = []
    images = iter(image_grids)
    for piece in pieces:
        if piece.role != "user" or IMAGE_PLACEHOLDER not in piece.text:
            out.append(piece)
            continue
        parts = piece.text.split(IMAGE_PLACEHOLDER)
        out.append(PromptPiece(parts[0], piece.role))
        for rest in parts[1:]:
            out.append(PromptPiece(image_span_text(next(images), merge_size), "template"))
            out.append(PromptPiece(rest, piece.role))
    return [piece for piece in out if piece.text]


def build_prompt_pieces(
    question: str,
    image_grid_thw=None,
    num_scales: Sequence[int] | None = None,
    *,
    template: str | ChatTemplate = "internlm2-chat",
    history: Sequence[tuple[str, str]] | None = None,
    system_message: str | None = None,
    merge_size: int = 2,
) -> list[PromptPiece]:
    """:func:`build_prompt` as :class:`PromptPiece` s (what the processor tokenises piece by piece).

    Validates the messages first: ``question``/``system_message`` must be strings and ``history`` a list of
    ``(question, answer)`` string pairs, all valid Unicode (:class:`PromptError` otherwise).
    """
    chat_template = get_template(template)
    check_message(question, "question")
    if system_message is not None:
        check_message(system_message, "system_message")
    history = check_history(history)
    grids = image_grids_per_image(image_grid_thw, num_scales)
    question = add_image_placeholders(question, len(grids), history)
    turns: list[tuple[str, str | None]] = [(q, a) for q, a in (history or [])]
    turns.append((question, None))
    return expand_image_pieces(chat_template.render_pieces(turns, system_message), grids, merge_size)


def build_prompt(
    question: str,
    image_grid_thw=None,
    num_scales: Sequence[int] | None = None,
    *,
    template: str | ChatTemplate = "internlm2-chat",
    history: Sequence[tuple[str, str]] | None = None,
    system_message: str | None = None,
    merge_size: int = 2,
) -> str:
    """The full prompt string NaViL's ``chat`` feeds to the tokenizer.

    Args:
        question: the new user message; ``<image>`` placeholders are added for a first turn with
            images unless the question already contains them.
        image_grid_thw: ``[Σ scales, 3]`` grids of every image (smallest scale first per image),
            or ``None`` for a text-only prompt.
        num_scales: scales per image (``sum == len(image_grid_thw)``); ``None`` → one image.
        template: template name or object.
        history: earlier ``(question, answer)`` turns (questions as stored by ``chat``, i.e. with
            their placeholders).
        system_message: overrides the template's default system message.
        merge_size: ViT merge size m (one visual token per m×m patches).
    """
    return join_pieces(build_prompt_pieces(question, image_grid_thw, num_scales, template=template, history=history,
                                           system_message=system_message, merge_size=merge_size))


def clean_response(text: str, sep: str = "<|im_end|>") -> str:
    """Post-process decoded generation like the reference ``chat``.

    Keeps the text before the first ``sep``, strips surrounding whitespace and removes a stray
    partial separator (``<|im_end|``, ``<|im_end``, ``<|im``) left at the end.  (Assumption: the
    reference removes these fragments; we remove them only at the end of the answer, where they
    arise when generation stops inside the separator.)
    """
    text = text.split(sep)[0].strip()
    for fragment in _STRAY_SEP_FRAGMENTS:
        if text.endswith(fragment):
            text = text[: -len(fragment)].rstrip()
            break
    return text
