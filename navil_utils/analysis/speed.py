"""Generation speed: tokens per second with and without the KV cache (notebook 03, benchmarks).

    speed = measure_generation_speed(model, tokenizer, image, "Describe it.", new_tokens=32, use_cache=False)
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from navil_utils.errors import ConfigError


# ---------------------------------------------------------------------------------------------------
# Generation speed
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSpeed:
    """Timing of one chat turn that generates exactly ``new_tokens`` tokens greedily.

    ``seconds`` is the median over the timed repeats (prompt pass, ViT and decoding included);
    ``generated_ids`` ``[1, new_tokens]`` are the tokens of the last run.
    """

    use_cache: bool
    new_tokens: int
    prompt_tokens: int
    seconds: float
    repeats: int
    generated_ids: Any

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {"KV cache": self.use_cache, "prompt tokens": self.prompt_tokens, "new tokens": self.new_tokens,
                "seconds (median)": self.seconds, "tokens/s": self.tokens_per_second, "repeats": self.repeats}


def measure_generation_speed(model: Any, tokenizer: Any, image: Any, question: str, *, new_tokens: int = 32,
                             use_cache: bool = True, repeats: int = 3, warmup: bool = True) -> GenerationSpeed:
    """Time :func:`navil_utils.chat_turn` forced to emit exactly ``new_tokens`` tokens (greedy,
    ``min_new_tokens = max_new_tokens``) with the KV cache on or off.

    The image is preprocessed once before timing; tokenising the prompt is inside the timed call
    (negligible).  Without the cache every step re-runs the decoder over the whole sequence; the ViT
    runs once either way (the prompt is embedded once by ``generate``).
    """
    from navil_utils.chatting import chat_turn
    from navil_utils.processing.multiscale import (
        MultiScaleInputs,
        preprocess_multiscale,
    )
    from navil_utils.processing.processor import pixel_budget

    if new_tokens < 1 or repeats < 1:
        raise ConfigError(f"need new_tokens >= 1 and repeats >= 1, got {new_tokens}, {repeats}")
    inputs = image
    if image is not None and not isinstance(image, MultiScaleInputs):
        inputs = preprocess_multiscale(image, **pixel_budget(model.config))
    kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": use_cache}
    if warmup:
        chat_turn(model, tokenizer, inputs, question, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    times, turn = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        turn = chat_turn(model, tokenizer, inputs, question, **kwargs)
        times.append(time.perf_counter() - start)
    generated = turn.generated_ids
    if generated.shape[1] != new_tokens:  # pragma: no cover - min_new_tokens guarantees it
        raise ConfigError(f"generate returned {generated.shape[1]} tokens instead of {new_tokens}")
    return GenerationSpeed(use_cache, new_tokens, int(turn.input_ids.shape[1]), statistics.median(times), repeats,
                           generated)


def compare_kv_cache(model: Any, tokenizer: Any, image: Any, question: str, *, new_tokens: Sequence[int] = (8, 32),
                     repeats: int = 3) -> list[GenerationSpeed]:
    """:func:`measure_generation_speed` with the cache on and off for every length in ``new_tokens``
    (order: for each length, cache on then off)."""
    return [measure_generation_speed(model, tokenizer, image, question, new_tokens=n, use_cache=cache,
                                     repeats=repeats)
            for n in new_tokens for cache in (True, False)]


def speed_frame(speeds: Sequence[GenerationSpeed]):
    """A DataFrame of :class:`GenerationSpeed` results plus the cached/uncached speed-up per length."""
    import pandas as pd

    frame = pd.DataFrame([s.as_dict() for s in speeds])
    uncached = frame[~frame["KV cache"]].set_index("new tokens")["tokens/s"]
    frame["speed-up vs no cache"] = [rate / uncached.get(n, math.nan) if cache else math.nan
                                     for n, rate, cache in zip(frame["new tokens"], frame["tokens/s"], frame["KV cache"])]
    return frame
