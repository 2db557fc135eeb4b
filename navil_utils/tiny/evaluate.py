"""Exact-match evaluation of a NaViL checkpoint on the synthetic VQA task (greedy generation).

    python -m navil_utils.evaluate --model data/models/navil-tiny --n 1000 --seed 1234
    python -m navil_utils.evaluate --model data/models/navil-tiny --n 1000 --seed 1234 --scales largest

Prints a table of exact-match accuracy per question type and, as its last line, one JSON object
``{"overall": …, "per_type": {type: accuracy, …}, "n": …, "seed": S, "scales": …}``.

``--scales`` runs the multi-scale ablation with the same weights: ``all`` (NaViL's input: every scale
of the pyramid), ``largest`` (only the full-resolution scale) or ``smallest`` (only the coarsest).
Works on any NaViL checkpoint that answers in this task's format (short canonical answers).
Evaluation seeds must differ from the training seeds (training uses data seed 1, periodic held-out
evaluation seed 7); the model card reports seed 1234.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch

from navil_utils.analysis.accuracy import normalise_answer  # noqa: F401  (also re-exported here)
from navil_utils.errors import ConfigError

SCALE_CHOICES = ("all", "largest", "smallest")


def select_scales(inputs, which: str):
    """Keep ``"all"`` scales, only the ``"largest"`` or only the ``"smallest"`` of every image.

    ``inputs`` is a :class:`~navil_utils.processing.multiscale.MultiScaleInputs`; returns a new one whose
    ``pixel_values``/``image_grid_thw``/``num_scales``/``scales`` describe the kept scales.
    """
    if which not in SCALE_CHOICES:
        raise ConfigError(f"scales must be one of {SCALE_CHOICES}, got {which!r}")
    if which == "all":
        return inputs
    keep = []
    for image in range(inputs.num_images):
        rows = [i for i, s in enumerate(inputs.scales) if s.image_index == image]
        keep.append(rows[-1] if which == "largest" else rows[0])
    ranges = inputs.patch_ranges()
    pixels = torch.cat([inputs.pixel_values[ranges[i][0]:ranges[i][1]] for i in keep])
    scales = [replace(inputs.scales[i], scale_index=0) for i in keep]
    return replace(inputs, pixel_values=pixels, image_grid_thw=inputs.image_grid_thw[keep],
                   num_scales=[1] * len(keep), scales=scales)


@dataclass
class EvalResult:
    """Per-question records and accuracies of one evaluation run."""

    records: list[dict[str, Any]]
    seed: int
    scales: str
    seconds: float

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def per_type(self) -> dict[str, float]:
        hits, total = defaultdict(int), defaultdict(int)
        for r in self.records:
            total[r["qtype"]] += 1
            hits[r["qtype"]] += int(r["correct"])
        return {t: hits[t] / total[t] for t in sorted(total)}

    @property
    def counts(self) -> dict[str, int]:
        total: dict[str, int] = defaultdict(int)
        for r in self.records:
            total[r["qtype"]] += 1
        return dict(sorted(total.items()))

    @property
    def overall(self) -> float:
        return sum(r["correct"] for r in self.records) / max(1, self.n)

    def summary(self) -> dict[str, Any]:
        return {"overall": round(self.overall, 4), "per_type": {k: round(v, 4) for k, v in self.per_type.items()},
                "n": self.n, "seed": self.seed, "scales": self.scales}

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(self.records)

    def table(self) -> str:
        lines = [f"{'question type':<14}{'n':>6}{'exact match':>14}"]
        for qtype, acc in self.per_type.items():
            lines.append(f"{qtype:<14}{self.counts[qtype]:>6}{acc:>14.3f}")
        lines.append(f"{'overall':<14}{self.n:>6}{self.overall:>14.3f}")
        return "\n".join(lines)


@torch.no_grad()
def evaluate_model(model, tokenizer, *, n: int = 1000, seed: int = 1234, scales: str = "all",
                   batch_size: int = 32, question_types: tuple[str, ...] | None = None,
                   max_new_tokens: int = 8, samples=None) -> EvalResult:
    """Greedy exact-match accuracy on ``n`` fresh synthetic questions drawn with ``seed``.

    ``samples`` (a list of :class:`~navil_utils.tiny.synthetic.Sample`) replaces the generated questions.
    """
    from navil_utils.chatting import batch_chat
    from navil_utils.processing.multiscale import preprocess_multiscale
    from navil_utils.processing.processor import pixel_budget
    from navil_utils.tiny.synthetic import QUESTION_TYPES, SyntheticVQA

    if samples is None:
        data = SyntheticVQA(seed=seed, question_types=tuple(question_types or QUESTION_TYPES))
        samples = [data.sample(i) for i in range(n)]
    budget = pixel_budget(model.config)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [select_scales(preprocess_multiscale(s.image, **budget), scales) for s in chunk]
        turn = batch_chat(model, tokenizer, images, [s.question for s in chunk], do_sample=False,
                          max_new_tokens=max_new_tokens)
        for sample, answer in zip(chunk, turn.answers):
            records.append({"index": sample.index, "qtype": sample.qtype, "question": sample.question,
                            "answer": sample.answer, "prediction": answer,
                            "correct": normalise_answer(answer) == sample.answer})
    return EvalResult(records, seed, scales, time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exact-match evaluation on the synthetic VQA task.")
    parser.add_argument("--model", default="data/models/navil-tiny", help="checkpoint directory")
    parser.add_argument("--n", type=int, default=1000, help="number of questions")
    parser.add_argument("--seed", type=int, default=1234, help="question seed (never a training seed)")
    parser.add_argument("--scales", choices=SCALE_CHOICES, default="all")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    from navil_utils.workbook.quiet import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    from navil_utils.chatting import load_chat_model

    model, tokenizer = load_chat_model(args.model, device_map=args.device if args.device != "cpu" else None)
    model.eval()
    result = evaluate_model(model, tokenizer, n=args.n, seed=args.seed, scales=args.scales,
                            batch_size=args.batch_size)
    print(f"model {args.model} | seed {args.seed} | scales {args.scales} | {result.seconds:.1f} s")
    print(result.table())
    print(json.dumps(result.summary()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
