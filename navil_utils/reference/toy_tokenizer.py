"""The golden fixtures' toy tokenizer (a test oracle).

The fixtures under ``tests/fixtures/golden/{internlm2_ve,qwen3_ve}`` were tokenised with a *toy*
tokenizer (no real tokenizer was available offline).  :class:`ToyTokenizer` re-implements it from the
rule recorded in each fixture's ``meta.json`` so that tests and notebooks can rebuild the fixture's
``input_ids`` from ``prompt.txt`` and decode generations like the reference did.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from navil_utils.errors import CheckpointError
from navil_utils.reference.fixtures import read_meta


class ToyTokenizer:
    """The golden fixtures' toy tokenizer.

    Encoding: greedy longest match on the special strings (id = their index), any other character
    ``ch`` becomes ``char_offset + ord(ch) % 256``; the InternLM2 variant prepends ``<s>``.
    Decoding maps ``id ≥ char_offset`` back to ``chr(id − char_offset)`` (lossy above U+00FF) and
    drops the specials when ``skip_special_tokens``.  It offers the subset of the transformers
    tokenizer API that :func:`navil_utils.chat` and ``TextIteratorStreamer`` use.
    """

    def __init__(
        self,
        specials: Sequence[str],
        char_offset: int,
        vocab_size: int,
        add_bos: bool,
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        unk_token: str = "<unk>",
        pad_token: str = "</s>",
    ) -> None:
        if char_offset < len(specials) or vocab_size < char_offset + 256:
            raise ValueError(f"inconsistent toy tokenizer: {len(specials)} specials, offset {char_offset}, vocab {vocab_size}")
        self.specials = list(specials)
        self.char_offset = int(char_offset)
        self.vocab_size = int(vocab_size)
        self.add_bos = bool(add_bos)
        self._special_ids = {tok: i for i, tok in enumerate(self.specials)}
        self._by_length = sorted(self.specials, key=len, reverse=True)
        self.bos_token, self.eos_token, self.unk_token, self.pad_token = bos_token, eos_token, unk_token, pad_token
        self.padding_side = "left"

    @classmethod
    def from_fixture(cls, fixture_dir: str | os.PathLike) -> ToyTokenizer:
        """Build the toy tokenizer a fixture directory was made with (``meta.json["toy_tokenizer"]``)."""
        spec = read_meta(fixture_dir).get("toy_tokenizer")
        if spec is None:
            raise CheckpointError(f"{fixture_dir}/meta.json has no 'toy_tokenizer' entry")
        return cls(spec["specials"], spec["char_offset"], spec["vocab_size"], spec["adds_bos"])

    # ---- ids of named tokens ------------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            if tokens in self._special_ids:
                return self._special_ids[tokens]
            if len(tokens) == 1:
                return self.char_offset + ord(tokens) % 256
            return self._special_ids[self.unk_token]
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.specials[ids] if ids < self.char_offset else chr(ids - self.char_offset)
        return [self.convert_ids_to_tokens(int(i)) for i in ids]

    @property
    def bos_token_id(self) -> int:
        return self._special_ids[self.bos_token]

    @property
    def eos_token_id(self) -> int:
        return self._special_ids[self.eos_token]

    @property
    def unk_token_id(self) -> int:
        return self._special_ids[self.unk_token]

    @property
    def pad_token_id(self) -> int:
        return self._special_ids[self.pad_token]

    @property
    def all_special_ids(self) -> list[int]:
        return list(range(len(self.specials)))

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding -----------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (``[<s>] + …`` for the InternLM2 variant when ``add_special_tokens``).

        ``split_special_tokens=True`` encodes special-token strings as their characters (plain text).
        """
        ids = [self.bos_token_id] if (self.add_bos and add_special_tokens) else []
        specials = () if split_special_tokens else self._by_length
        i = 0
        while i < len(text):
            for special in specials:
                if text.startswith(special, i):
                    ids.append(self._special_ids[special])
                    i += len(special)
                    break
            else:
                ids.append(self.char_offset + ord(text[i]) % 256)
                i += 1
        return ids

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool | str = False,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict[str, Any]:
        """``{"input_ids", "attention_mask"}`` for one text or a batch (padding to the longest)."""
        single = isinstance(text, str)
        batch = [self.encode(t, add_special_tokens) for t in ([text] if single else text)]
        if padding or (return_tensors is not None and len({len(b) for b in batch}) > 1):
            if not padding:
                raise ValueError("texts of different lengths need padding=True to be returned as a tensor")
            longest = max(len(b) for b in batch)
            side = padding_side or self.padding_side
            masks = []
            for k, ids in enumerate(batch):
                pad = [self.pad_token_id] * (longest - len(ids))
                batch[k] = pad + ids if side == "left" else ids + pad
                ones, zeros = [1] * len(ids), [0] * len(pad)
                masks.append(zeros + ones if side == "left" else ones + zeros)
        else:
            masks = [[1] * len(b) for b in batch]
        if return_tensors == "pt":
            import torch

            return {"input_ids": torch.tensor(batch, dtype=torch.long), "attention_mask": torch.tensor(masks, dtype=torch.long)}
        if single:
            return {"input_ids": batch[0], "attention_mask": masks[0]}
        return {"input_ids": batch, "attention_mask": masks}

    # ---- decoding -----------------------------------------------------------------------------
    def decode(self, ids: int | Sequence[int], skip_special_tokens: bool = False, **_: Any) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        out = []
        for token_id in (int(i) for i in ids):
            if token_id < self.char_offset:
                if not skip_special_tokens:
                    out.append(self.specials[token_id])
            else:
                out.append(chr(token_id - self.char_offset))
        return "".join(out)

    def batch_decode(self, sequences: Sequence[Sequence[int]], skip_special_tokens: bool = False, **kwargs: Any) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens, **kwargs) for seq in sequences]

    def __repr__(self) -> str:
        return (f"ToyTokenizer(specials={len(self.specials)}, char_offset={self.char_offset}, "
                f"vocab_size={self.vocab_size}, add_bos={self.add_bos})")
