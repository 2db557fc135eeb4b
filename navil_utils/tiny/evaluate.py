"""Exact-match evaluation of a NaViL checkpoint on the synthetic VQA task (greedy generation).

    python -m navil_utils.evaluate --model data/models/navil-tiny --n 1000 --seed 1234
    python -m navil_utils.evaluate --model data/models/navil-tiny --n 1000 --seed 1234 --scales largest

Prints a table of exact-match accuracy per question type and, as its last line, one JSON object
``{"overall": …, "per_type": {type: accuracy, …}, "n": …, "seed": S, "scales": …}``.  Bad arguments
(``--n 0``, ``--batch-size -1``, an unavailable ``--device``) exit with status 2 and a missing or broken
checkpoint with status 1, each with a one-line message on stderr and nothing on stdout.

``--scales`` runs the multi-scale ablation with the same weights: ``all`` (NaViL's input: every scale
of the pyramid), ``largest`` (only the full-resolution scale) or ``smallest`` (only the coarsest).
Works on any NaViL checkpoint that answers in this task's format (short canonical answers), and on a tiny
NVLM-D checkpoint (:mod:`navil_utils.tiny.nvlm_d`; detected from ``config.json``'s ``model_type``, tiles
+ thumbnail, ``--scales all`` only).  A second line gives the visual tokens per image and the time per question.
Evaluation seeds must differ from the training seeds (training uses data seed 1, periodic held-out
evaluation seed 7); the model card reports seed 1234.
"""
from __future__ import annotations

import argparse
import json
import numbers
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
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
    architecture: str = "navil"

    @property
    def n(self) -> int:
        return len(self.records)

    @property
    def visual_tokens_mean(self) -> float:
        """Mean visual tokens the model spent per image (records' ``visual_tokens``)."""
        return sum(r["visual_tokens"] for r in self.records) / max(1, self.n)

    @property
    def visual_tokens_max(self) -> int:
        return max((r["visual_tokens"] for r in self.records), default=0)

    @property
    def seconds_per_sample(self) -> float:
        """Wall time per question: preprocessing, prompt building and greedy generation, batched."""
        return self.seconds / max(1, self.n)

    def cost(self) -> dict[str, float]:
        """``visual_tokens_mean``, ``visual_tokens_max`` (per image) and ``seconds_per_sample``."""
        return {"visual_tokens_mean": round(self.visual_tokens_mean, 3), "visual_tokens_max": self.visual_tokens_max,
                "seconds_per_sample": round(self.seconds_per_sample, 5)}

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
    def per_relation(self) -> dict[str, tuple[float, int]]:
        """``{relation word: (accuracy, questions)}`` of the relation questions (``left of`` … ``below``)."""
        from navil_utils.tiny.synthetic import RELATIONS, relation_word

        hits, total = defaultdict(int), defaultdict(int)
        for r in self.records:
            if r["qtype"] == "relation":
                word = relation_word(r["question"])
                total[word] += 1
                hits[word] += int(r["correct"])
        return {w: (hits[w] / total[w], total[w]) for w in RELATIONS if total[w]}

    @property
    def per_text_size(self) -> dict[int, tuple[float, float, int]]:
        """``{font size px: (exact match, character accuracy, questions)}`` of the text questions whose records
        carry ``text_size``. Character accuracy counts the answer's characters that the (normalised) prediction
        has at the same place: partial reading that exact match hides."""
        hits, chars, total_chars, total = defaultdict(int), defaultdict(int), defaultdict(int), defaultdict(int)
        for r in self.records:
            if r["qtype"] == "text" and r.get("text_size") is not None:
                size, predicted = r["text_size"], normalise_answer(r["prediction"])
                total[size] += 1
                hits[size] += int(r["correct"])
                chars[size] += sum(a == b for a, b in zip(r["answer"], predicted))
                total_chars[size] += len(r["answer"])
        return {size: (hits[size] / total[size], chars[size] / total_chars[size], total[size]) for size in sorted(total)}

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


def _text_size(sample: Any) -> int | None:
    """Font size (px) of the text a text question asks about (its only text object); ``None`` otherwise."""
    if sample.qtype != "text":
        return None
    return next(obj.size for obj in sample.objects if obj.kind == "text")


def _is_count(value: object) -> bool:
    """Whether ``value`` is an integer >= 1 (``bool`` is not a count)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


@torch.no_grad()
def evaluate_model(model, tokenizer, *, n: int = 1000, seed: int = 1234, scales: str = "all",
                   batch_size: int = 32, question_types: tuple[str, ...] | None = None,
                   max_new_tokens: int = 8, samples=None) -> EvalResult:
    """Greedy exact-match accuracy on ``n`` fresh synthetic questions drawn with ``seed``.

    ``model`` is a NaViL or a tiny NVLM-D (``config.model_type == "NVLM_D"``: tiles + thumbnail through
    :class:`~navil_utils.tiny.data.TiledCollator`, ``scales`` must be ``"all"``).  Every record holds the
    visual tokens its image cost (NaViL: merged patches of the kept scales; NVLM-D: image pad tokens).
    ``samples`` (a list of :class:`~navil_utils.tiny.synthetic.Sample`) replaces the generated questions.
    Raises :class:`~navil_utils.errors.ConfigError` for ``n < 1``, ``batch_size < 1``, an empty
    ``samples`` list or an unknown ``scales`` — an accuracy of nothing is never reported.
    """
    if not _is_count(batch_size):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if scales not in SCALE_CHOICES:
        raise ConfigError(f"scales must be one of {SCALE_CHOICES}, got {scales!r}")
    if samples is None and not _is_count(n):
        raise ConfigError(f"n (the number of questions) must be a positive integer, got {n!r}")
    if samples is not None and len(samples) == 0:
        raise ConfigError("samples is empty: there is nothing to evaluate")
    from navil_utils.chatting import batch_chat
    from navil_utils.processing.multiscale import preprocess_multiscale
    from navil_utils.processing.processor import pixel_budget
    from navil_utils.tiny.synthetic import QUESTION_TYPES, SyntheticVQA

    if samples is None:
        data = SyntheticVQA(seed=seed, question_types=tuple(question_types or QUESTION_TYPES))
        samples = [data.sample(i) for i in range(n)]
    if is_nvlm_d(model):
        if scales != "all":
            raise ConfigError(f"scales={scales!r} is a NaViL ablation; an NVLM-D model takes its tiles ('all')")
        return _evaluate_nvlm_d(model, tokenizer, samples, seed, batch_size, max_new_tokens)
    budget = pixel_budget(model.config)
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        images = [select_scales(preprocess_multiscale(s.image, **budget), scales) for s in chunk]
        turn = batch_chat(model, tokenizer, images, [s.question for s in chunk], do_sample=False,
                          max_new_tokens=max_new_tokens)
        for sample, image, answer in zip(chunk, images, turn.answers):
            tokens = int(image.image_grid_thw.prod(-1).sum()) // budget["merge_size"] ** 2
            records.append({"index": sample.index, "qtype": sample.qtype, "question": sample.question,
                            "answer": sample.answer, "prediction": answer,
                            "correct": normalise_answer(answer) == sample.answer, "visual_tokens": tokens,
                            "text_size": _text_size(sample)})
    return EvalResult(records, seed, scales, time.perf_counter() - start)


def answer_log_loss(model, tokenizer, samples, *, batch_size: int = 50) -> list[dict[str, Any]]:
    """Teacher-forced negative log-likelihood (nats) of each sample's whole answer — its tokens and the
    closing ``<|im_end|>`` — given the image and the question: one record per sample with ``qtype``,
    ``template``, ``answer_tokens`` and ``nll``.

    More sensitive than exact match early in training: a model that ignores the image can do no better, in
    expectation, than the entropy of the answer given the question (``ln |answer space|`` on this task's
    flat answers, see :func:`blind_answer_nll`), so ``blind − nll`` is what the image tells the model.
    Works for NaViL (its training collator, the model's pixel budget) and the tiny NVLM-D (tiles).
    """
    from navil_utils.tiny.data import TiledCollator, TinyCollator

    if not samples:
        raise ConfigError("samples is empty: there is nothing to evaluate")
    if is_nvlm_d(model):
        collator = TiledCollator.from_model_config(model.config, tokenizer)
    else:
        collator = TinyCollator.from_model_config(model.config, tokenizer)
    device = next(model.parameters()).device
    records = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            batch = collator(list(samples[i:i + batch_size])).to(device)
            logits = model(**batch.model_inputs()).logits.float()
            target, qa = batch.labels[:, 1:], batch.answer_qa[:, 1:]
            token_nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), target.clamp(min=0),
                                                          reduction="none")
            keep = qa >= 0
            nll = torch.zeros(len(batch.qas), dtype=torch.float64, device=device)
            count = torch.zeros(len(batch.qas), dtype=torch.long, device=device)
            nll.scatter_add_(0, qa[keep], token_nll[keep].double())
            count.scatter_add_(0, qa[keep], torch.ones_like(qa[keep]))
            for qa_record, value, tokens in zip(batch.qas, nll.tolist(), count.tolist()):
                records.append({"qtype": qa_record.qtype, "template": qa_record.template, "answer": qa_record.answer,
                                "answer_tokens": int(tokens), "nll": float(value)})
    return records


def blind_answer_nll(data: Any, template: str, answer: str | None = None) -> float:
    """Expected answer loss (nats) of the best image-blind model for one question of ``template``, on a task
    whose answers are drawn uniformly (this one, by construction): ``ln |answer space|``; for ``text`` the
    length is uniform in ``text_length_range`` and each glyph uniform, so ``ln(#lengths) + n · ln(#glyphs)``
    with ``n = len(answer)`` (or the mean length when ``answer`` is not given)."""
    import math

    from navil_utils.analysis.accuracy import answer_space_size

    if template == "text":
        lo, hi = data.config.text_length_range
        length = len(answer) if answer is not None else (lo + hi) / 2
        return math.log(hi - lo + 1) + length * math.log(len(data.config.text_alphabet))
    return math.log(answer_space_size(data, template))


def is_nvlm_d(model: Any) -> bool:
    """Whether ``model`` (or a config) is an NVLM-D (``model_type == "NVLM_D"``)."""
    from navil_utils.models.configuration_nvlm_d import NVLM_D_MODEL_TYPE

    config = getattr(model, "config", model)
    return getattr(config, "model_type", None) == NVLM_D_MODEL_TYPE


def _evaluate_nvlm_d(model: Any, tokenizer: Any, samples: list, seed: int, batch_size: int,
                     max_new_tokens: int) -> EvalResult:
    """Greedy answers of an NVLM-D: prompts from :class:`~navil_utils.tiny.data.TiledCollator` (left-padded,
    the training prompt without the answer), one ``generate`` call per batch."""
    from navil_utils.chatting import _decode_answers
    from navil_utils.tiny.data import TiledCollator

    collator = TiledCollator.from_model_config(model.config, tokenizer, padding_side="left")
    eos, device = collator.sep_id, next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i in range(0, len(samples), batch_size):
        chunk = samples[i:i + batch_size]
        batch = collator(chunk, with_answers=False)
        generated = model.generate(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                                   pixel_values=batch.pixel_values.to(device=device, dtype=dtype),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                   pad_token_id=collator.pad_id)
        answers = _decode_answers(collator.processor, generated[:, batch.input_ids.shape[1]:].cpu())
        pads = (batch.input_ids == collator.image_pad_id).sum(1).tolist()
        for sample, answer, tokens in zip(chunk, answers, pads):
            records.append({"index": sample.index, "qtype": sample.qtype, "question": sample.question,
                            "answer": sample.answer, "prediction": answer,
                            "correct": normalise_answer(answer) == sample.answer, "visual_tokens": int(tokens)})
    return EvalResult(records, seed, "all", time.perf_counter() - start, architecture="nvlm_d")


def load_eval_model(path: str | Path, device_map: Any = None, dtype: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a checkpoint directory, NaViL or tiny NVLM-D by ``config.json``'s
    ``model_type`` (NVLM-D through the strict :func:`~navil_utils.models.modeling_nvlm_d.load_nvlm_d`);
    ``dtype`` (e.g. ``torch.float32`` for bf16 weights) is passed to the loader."""
    from navil_utils.errors import CorruptCheckpointError
    from navil_utils.models.configuration_nvlm_d import NVLM_D_MODEL_TYPE

    config_file = Path(path) / "config.json"
    model_type = None
    if config_file.is_file():
        try:
            model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as error:
            raise CorruptCheckpointError(f"{config_file} is not a JSON object: {error}") from error
    if model_type == NVLM_D_MODEL_TYPE:
        from navil_utils.tiny.nvlm_d import load_tiny_nvlm_d

        options = {k: v for k, v in (("device_map", device_map), ("dtype", dtype)) if v is not None}
        return load_tiny_nvlm_d(path, **options)
    from navil_utils.chatting import load_chat_model

    return load_chat_model(path, device_map=device_map, dtype=dtype)


PROG = "python -m navil_utils.evaluate"


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser: counts must be positive, the seed non-negative, the device usable."""
    from navil_utils.cli import (
        ArgumentParser,
        non_negative_int,
        positive_int,
        torch_device,
    )

    parser = ArgumentParser(prog=PROG, description="Exact-match evaluation on the synthetic VQA task.")
    parser.add_argument("--model", default="data/models/navil-tiny", help="checkpoint directory")
    parser.add_argument("--n", type=positive_int, default=1000, help="number of questions (>= 1)")
    parser.add_argument("--seed", type=non_negative_int, default=1234,
                        help="question seed, >= 0 (never a training seed)")
    parser.add_argument("--scales", choices=SCALE_CHOICES, default="all")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="questions per batch (>= 1)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (>= 1)")
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu, cuda, cuda:N, ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; the last stdout line of a successful run is the JSON summary.

    Bad arguments exit with status 2, a :class:`~navil_utils.errors.NaViLError` (missing or broken
    checkpoint, ...) or an OS error returns 1; either way one line on stderr and no JSON on stdout.
    """
    from navil_utils.cli import report_error
    from navil_utils.errors import CheckpointNotFoundError, NaViLError

    args = build_parser().parse_args(argv)
    from navil_utils.workbook.quiet import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not Path(args.model).is_dir():
            raise CheckpointNotFoundError(f"no model checkpoint directory at {args.model} (pass --model DIR)")
        model, tokenizer = load_eval_model(args.model, device_map=args.device if args.device != "cpu" else None)
        model.eval()
        result = evaluate_model(model, tokenizer, n=args.n, seed=args.seed, scales=args.scales,
                                batch_size=args.batch_size)
    except (NaViLError, OSError) as error:
        return report_error(PROG, error)
    if result.n != args.n:  # never print a score of fewer questions than asked for
        return report_error(PROG, f"evaluated {result.n} questions instead of {args.n}")
    print(f"model {args.model} | seed {args.seed} | scales {args.scales} | {result.seconds:.1f} s")
    cost = result.cost()
    print(f"visual tokens per image: mean {cost['visual_tokens_mean']:.1f}, max {cost['visual_tokens_max']} | "
          f"{cost['seconds_per_sample'] * 1000:.1f} ms per question")
    print(result.table())
    if result.per_relation:
        print("relation by word: " + ", ".join(f"{w} {acc:.3f} (n={k})" for w, (acc, k) in result.per_relation.items()))
    if result.per_text_size:
        print("text by font size (exact / characters): " + ", ".join(
            f"{size} px {acc:.3f} / {chars:.3f} (n={k})" for size, (acc, chars, k) in result.per_text_size.items()))
    print(json.dumps(result.summary()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
