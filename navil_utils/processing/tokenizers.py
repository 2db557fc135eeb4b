"""Tokenizers of NaViL checkpoints, loaded without remote code.

* **NaViL-9B** ships Qwen3's byte-level BPE as ``tokenizer.json``: transformers' native classes
  read it (``AutoTokenizer`` → ``Qwen2Tokenizer``), no BOS is added.
* **NaViL-2B** ships InternLM2's sentencepiece model ``tokenizer.model`` whose Python class
  (``InternLM2Tokenizer``) normally comes from the checkpoint's remote code, and the reference demo
  loads it with ``use_fast=False``.  :class:`InternLM2Tokenizer` below re-creates that slow tokenizer
  on top of transformers' :class:`~transformers.tokenization_utils_sentencepiece.SentencePieceBackend`.

Behaviour of InternLM2's slow tokenizer that we reproduce (from its public source as we know it;
the points marked *assumption* could not be re-checked offline):

1. the text is first split on *added tokens* (``<|im_start|>``, ``<|im_end|>``, NaViL's 12 image
   tokens, … as listed in ``tokenizer_config.json`` / ``added_tokens.json``; greedy, longest match);
   every other chunk is encoded by sentencepiece itself (``sp.encode(chunk)``), so the model's own
   normaliser, ``add_dummy_prefix`` and byte fallback apply to each chunk;
2. ``add_bos_token=True`` (``<s>`` = id 1 prepended), ``add_eos_token=False``;
3. ``unk``/``bos``/``eos`` = ``<unk>``/``<s>``/``</s>``, pad = ``</s>`` (InternLM2 default);
4. *assumption* — decoding: runs of ordinary pieces are decoded by sentencepiece (``▁`` → space,
   byte pieces fused, the dummy-prefix space dropped), added tokens are emitted verbatim, with no
   extra spaces around them (the reference's slow decode may insert a space before special tokens;
   this only matters for ``skip_special_tokens=False`` and never for NaViL's answers, which are
   decoded with ``skip_special_tokens=True`` and stripped).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from navil_utils.constants import CHAT_TOKENS, SPECIAL_TOKEN_LIST
from navil_utils.errors import CheckpointError, ConfigError


class InternLM2Tokenizer(SentencePieceBackend):
    """InternLM2's sentencepiece tokenizer (slow), without ``trust_remote_code``.

    ``InternLM2Tokenizer.from_pretrained(dir)`` reads ``tokenizer.model`` and
    ``tokenizer_config.json`` (added tokens, special-token strings).  ``encode("hi")`` →
    ``[bos, *sp.encode("hi")]``.
    """

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str = "</s>",
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ) -> None:
        if vocab_file is None or not os.path.isfile(vocab_file):
            raise CheckpointError(f"InternLM2Tokenizer needs a sentencepiece tokenizer.model, got {vocab_file!r}")
        kwargs.pop("special_tokens_pattern", None)
        kwargs.pop("legacy", None)
        pattern = {(True, False): "bos", (True, True): "bos_eos", (False, True): "eos", (False, False): "none"}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            special_tokens_pattern=pattern[(bool(add_bos_token), bool(add_eos_token))],
            legacy=True,  # sentencepiece encodes every chunk as is (dummy prefix included), like InternLM2
            **kwargs,
        )
        # Added tokens flagged "special" in tokenizer_config.json (NaViL's image tokens, <|im_end|>, …)
        # are skipped by decode(skip_special_tokens=True), as a `tokenizers` fast tokenizer would do.
        for added in self._added_tokens_decoder.values():
            if added.special and added.content not in self.all_special_tokens:
                self._extra_special_tokens.append(added)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Decode pieces: sentencepiece for runs of ordinary pieces, added tokens verbatim."""
        added = self._added_tokens_encoder
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if token in added:  # incl. <s>/</s>, which sentencepiece would decode to ""
                out.append(self.sp_model.decode_pieces(run))
                out.append(token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode_pieces(run))
        return "".join(out)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got a JSON {type(data).__name__}")
    return data


def _llm_architecture(directory: Path) -> str | None:
    config_file = directory / "config.json"
    if not config_file.is_file():
        return None
    config = _json(config_file)
    llm = config.get("llm_config") or {}
    if not isinstance(llm, dict):
        raise ConfigError(f"{config_file}: 'llm_config' must be a JSON object, got {type(llm).__name__}")
    archs = llm.get("architectures") or config.get("architectures") or []
    return str(archs[0]) if isinstance(archs, list) and archs else None


def tokenizer_kind(path: str | os.PathLike) -> str:
    """Which tokenizer a checkpoint directory needs: ``"internlm2-sentencepiece"`` or ``"fast"``.

    InternLM2-based checkpoints (``llm_config.architectures[0]`` starts with ``InternLM2`` or
    ``tokenizer_config.json`` names an ``InternLM2Tokenizer``) that ship ``tokenizer.model`` use the
    sentencepiece tokenizer (what the reference loads, ``use_fast=False``); otherwise a
    ``tokenizer.json`` is loaded with transformers' native fast tokenizer classes.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"tokenizer directory {str(directory)!r} does not exist")
    tokenizer_class = ""
    if (directory / "tokenizer_config.json").is_file():
        tokenizer_class = str(_json(directory / "tokenizer_config.json").get("tokenizer_class") or "")
    is_internlm2 = (_llm_architecture(directory) or "").startswith("InternLM2") or tokenizer_class.startswith("InternLM2")
    if is_internlm2 and (directory / "tokenizer.model").is_file():
        return "internlm2-sentencepiece"
    if (directory / "tokenizer.json").is_file():
        return "fast"
    if (directory / "tokenizer.model").is_file():
        raise CheckpointError(
            f"{directory} has tokenizer.model but is not recognisably InternLM2-based (config.json "
            "llm_config.architectures / tokenizer_config.json tokenizer_class); pass kind='internlm2-sentencepiece'"
        )
    raise CheckpointError(f"{directory} has neither tokenizer.json nor tokenizer.model")


def load_tokenizer(path: str | os.PathLike, *, kind: str | None = None, **kwargs: Any):
    """Load the tokenizer of a NaViL checkpoint directory without remote code.

    Args:
        path: checkpoint directory (``tokenizer.json`` and/or ``tokenizer.model`` + configs).
        kind: force ``"internlm2-sentencepiece"`` or ``"fast"``; default: :func:`tokenizer_kind`.
        kwargs: passed to ``from_pretrained``.
    """
    kind = kind or tokenizer_kind(path)
    if kind == "internlm2-sentencepiece":
        return InternLM2Tokenizer.from_pretrained(str(path), **kwargs)
    if kind == "fast":
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
        except (ValueError, OSError, KeyError):
            # unknown/remote tokenizer_class: the generic tokenizers backend still reads tokenizer.json
            from transformers import PreTrainedTokenizerFast

            return PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)
    raise ValueError(f"unknown tokenizer kind {kind!r}; use 'internlm2-sentencepiece' or 'fast'")


def navil_token_ids(tokenizer: Any, tokens: Iterable[str] = CHAT_TOKENS + SPECIAL_TOKEN_LIST) -> dict[str, int]:
    """Ids of NaViL's chat and image special tokens; raises if the tokenizer lacks any of them.

    The result is what :func:`navil_utils.load_model` takes as ``special_token_ids``.
    """
    ids: dict[str, int] = {}
    missing = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or (token_id == unk and token != getattr(tokenizer, "unk_token", None)):
            missing.append(token)
        else:
            ids[token] = int(token_id)
    if missing:
        raise CheckpointError(f"the tokenizer has no id for NaViL token(s) {missing}")
    return ids



def token_id(tokenizer: Any, token: str) -> int:
    """Id of one token string (e.g. ``<|im_end|>``), checked against ``unk``."""
    return navil_token_ids(tokenizer, [token])[token]


# ---------------------------------------------------------------------------------------------------
# Prompt encoding: control tokens come from our template only, never from user text
# ---------------------------------------------------------------------------------------------------
def control_tokens(tokenizer: Any) -> dict[str, int]:
    """Every token string the tokenizer matches as a whole inside text, with its id.

    That is its added tokens (special or not, e.g. Qwen3's ``<think>``), its special tokens and NaViL's
    chat/image tokens — whatever user text must never turn into.  Works for transformers tokenizers and
    the fixtures' :class:`~navil_utils.reference.toy_tokenizer.ToyTokenizer` (its ``specials``).
    """
    strings: list[str] = []
    added = getattr(tokenizer, "added_tokens_encoder", None)
    if isinstance(added, dict):
        strings += [str(s) for s in added]
    strings += [str(s) for s in getattr(tokenizer, "specials", None) or []]
    strings += [str(s) for s in getattr(tokenizer, "all_special_tokens", None) or []]
    strings += list(CHAT_TOKENS) + list(SPECIAL_TOKEN_LIST)
    unk = getattr(tokenizer, "unk_token_id", None)
    found: dict[str, int] = {}
    for string in strings:
        if not string or string in found:
            continue
        token = tokenizer.convert_tokens_to_ids(string)
        if token is None or (token == unk and string != getattr(tokenizer, "unk_token", None)):
            continue
        found[string] = int(token)
    return found


class PromptEncoder:
    """Token ids of a prompt given as pieces of template text and user text.

    Template text is split on the tokenizer's control tokens (``<|im_start|>``, ``<img>``, …), which become
    their ids; user text is encoded as plain text (``split_special_tokens=True``), so a question that
    contains ``"<img>"`` or ``"<|im_end|>"`` yields the ids of those characters, never a control id.  The
    text between two control tokens is encoded in one call, exactly the chunk the tokenizer itself would
    encode for the joined string — an ordinary prompt gets the same ids as ``tokenizer.encode(prompt)``.

    Where plain encoding still produces a control id (non-special added tokens such as ``<think>``,
    sentencepiece user-defined symbols, tokenizers without ``split_special_tokens``) the text is cut
    inside every control-token string and the parts are encoded separately; if a control id still
    appears, :class:`~navil_utils.errors.PromptError` is raised.
    """

    def __init__(self, tokenizer: Any) -> None:
        import re

        self.tokenizer = tokenizer
        self.controls = control_tokens(tokenizer)
        unk = getattr(tokenizer, "unk_token_id", None)
        self.forbidden = {i for s, i in self.controls.items() if i != unk}
        ordered = sorted(self.controls, key=len, reverse=True)  # longest match first, like the tokenizers
        self._pattern = re.compile("|".join(re.escape(s) for s in ordered)) if ordered else None
        self._affixes: tuple[list[int], list[int]] | None = None

    # ---- plain text ------------------------------------------------------------------------------
    def _encode_chunk(self, text: str) -> list[int]:
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
        except TypeError:  # a tokenizer without split_special_tokens: checked below
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [int(i) for i in ids]

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` as plain text: no control id, no BOS/EOS."""
        if not text:
            return []
        ids = self._encode_chunk(text)
        if self.forbidden.isdisjoint(ids) or self._pattern is None:
            return ids
        cuts = sorted({at + 1 for token in self.controls for at in _occurrences(text, token)})
        bounds = [0, *cuts, len(text)]
        ids = [i for a, b in itertools.pairwise(bounds) if b > a for i in self._encode_chunk(text[a:b])]
        leaked = sorted(self.forbidden.intersection(ids))
        if leaked:
            from navil_utils.errors import PromptError

            names = [s for s, i in self.controls.items() if i in leaked]
            raise PromptError(f"the tokenizer turns user text into control token(s) {names}; cannot encode "
                              f"{text[:80]!r} as plain text")
        return ids

    # ---- prompts ---------------------------------------------------------------------------------
    def affixes(self) -> tuple[list[int], list[int]]:
        """The ids the tokenizer adds around a text with ``add_special_tokens=True`` (e.g. ``[<s>]``, ``[]``)."""
        if self._affixes is None:
            bare = [int(i) for i in self.tokenizer.encode("a", add_special_tokens=False)]
            full = [int(i) for i in self.tokenizer.encode("a")]
            for start in range(len(full) - len(bare) + 1):
                if full[start:start + len(bare)] == bare:
                    self._affixes = (full[:start], full[start + len(bare):])
                    break
            else:
                self._affixes = ([], [])
        return self._affixes

    def encode(self, pieces: Iterable[tuple[str, bool]], add_special_tokens: bool = True) -> list[int]:
        """Ids of ``"".join(text for text, _ in pieces)`` where ``(text, True)`` pieces are user text.

        ``add_special_tokens`` adds what ``tokenizer.encode`` adds (InternLM2's ``<s>``).
        """
        ids: list[int] = []
        run: list[str] = []

        def flush() -> None:
            ids.extend(self.encode_text("".join(run)))
            run.clear()

        for text, is_user in pieces:
            if is_user or self._pattern is None:
                run.append(text)
                continue
            position = 0
            for match in self._pattern.finditer(text):
                run.append(text[position:match.start()])
                flush()
                ids.append(self.controls[match.group(0)])
                position = match.end()
            run.append(text[position:])
        flush()
        if not add_special_tokens:
            return ids
        prefix, suffix = self.affixes()
        return [*prefix, *ids, *suffix]


def _occurrences(text: str, token: str) -> Iterator[int]:
    """Start of every (possibly overlapping) occurrence of ``token`` in ``text``."""
    at = text.find(token)
    while at >= 0:
        yield at
        at = text.find(token, at + 1)


def encode_user_text(tokenizer: Any, text: str) -> list[int]:
    """Ids of user ``text`` as plain text (no control-token id, no BOS): see :class:`PromptEncoder`."""
    return PromptEncoder(tokenizer).encode_text(text)
