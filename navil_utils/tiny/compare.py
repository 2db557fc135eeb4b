"""Tiling vs multi-scale, measured: the tiny NaViL and the tiny NVLM-D trained and evaluated alike (issue 15).

For every (architecture, seed) of a spec, one run trains that model from scratch with
:func:`navil_utils.tiny.train.train` (``TrainConfig.architecture``) on the same synthetic stream, the same
data budget in samples (images) and the same recipe, then evaluates the exported checkpoint by greedy exact
match on the same held-out questions and on subsets that stress the difference between the two image
encodings (by default: extreme aspect ratios, small text, small objects — drawn with the generator's own
knobs ``aspect_ratios``, ``text_sizes``, ``object_size_range``).  Each finished run appends one JSON line:
parameters (total, vision encoder, connector, active), samples, training seconds, machine, git commit,
accuracy per question type and per subset, visual tokens per image and inference seconds per question.

Resumable like :mod:`navil_utils.tiny.sweep` (whose result-file helpers it uses): finished runs are skipped,
an interrupted one resumes from its checkpoint in ``<out_root>/<run_id>/`` and a torn last line is dropped.
The run id holds a hash of everything that changes a result, so an edited spec never reuses a stale line.

    python -m navil_utils.tiny.compare configs/nvlm_d/compare.json --results data/nvlm_d/compare.jsonl \\
        --out-root runs/compare

Spec (JSON object; see ``configs/nvlm_d/compare.json``): ``architectures`` (``["navil", "nvlm_d"]``),
``seeds``, ``samples`` (training images per run, a multiple of ``batch_size``), ``batch_size``,
``warmup_samples``, ``train`` (further :class:`~navil_utils.tiny.train.TrainConfig` options shared by both),
``models`` (per-architecture ``TrainConfig.model`` overrides), ``eval`` (``seed``, ``n``, ``batch_size``),
``subsets`` (name → ``{"n": …, "data": {SyntheticConfig overrides}}``), ``threads``, ``study``, ``tokenizer``
and a free-text ``comment`` (ignored).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from navil_utils.errors import ConfigError

#: Evaluation subsets used when a spec gives none: long thin images (aspect ratios 1:4, 1:3, 3:1, 4:1 — the
#: generator admits sizes within 1.25× of a ratio, so ≥ 2.5:1), small text only (fonts 8/12 px, ink 6–9 px),
#: small shapes (8–12 px) for the non-text questions.
DEFAULT_SUBSETS: dict[str, dict[str, Any]] = {
    "extreme_aspect": {"n": 200, "data": {"aspect_ratios": [0.25, 1 / 3, 3.0, 4.0]}},
    "small_text": {"n": 100, "data": {"question_types": ["text"], "text_sizes": [8, 12]}},
    "small_objects": {"n": 200, "data": {"question_types": ["color", "count", "position", "relation"],
                                         "object_size_range": [8, 12]}},
}
SPEC_KEYS = frozenset({"comment", "study", "architectures", "seeds", "samples", "batch_size", "warmup_samples", "train",
                       "models", "eval", "subsets", "threads", "tokenizer"})
#: TrainConfig options a spec's ``train`` may not set (the runner owns them).
RESERVED_TRAIN_OPTIONS = frozenset({"out", "seed", "architecture", "total_steps", "batch_size", "warmup_steps",
                                    "model", "tokenizer", "device", "threads", "progress", "init_from"})


@dataclass(frozen=True)
class CompareRun:
    """One (architecture, seed) of a comparison: its training options and its evaluation."""

    architecture: str
    seed: int
    samples: int
    batch_size: int
    warmup_samples: int
    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    subsets: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int = 1
    study: str = "compare"
    tokenizer: str = "data/models/navil-tiny"

    def __post_init__(self) -> None:
        from navil_utils.tiny.train import ARCHITECTURES

        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"architecture {self.architecture!r} is not one of {ARCHITECTURES}")
        if self.batch_size < 1 or self.samples < self.batch_size or self.samples % self.batch_size:
            raise ConfigError(f"samples={self.samples} must be a positive multiple of batch_size={self.batch_size}")
        reserved = sorted(set(self.train) & RESERVED_TRAIN_OPTIONS)
        if reserved:
            raise ConfigError(f"'train' may not set {reserved}: the runner sets them (use samples, batch_size, "
                              "warmup_samples, models, seeds, threads)")
        for name, subset in self.subsets.items():
            if not isinstance(subset, dict) or set(subset) - {"n", "data"} or int(subset.get("n", 0)) < 1:
                raise ConfigError(f"subset {name!r} must be {{'n': >= 1, 'data': {{SyntheticConfig overrides}}}}, "
                                  f"got {subset!r}")

    def fingerprint(self) -> str:
        """8 hex digits of a hash of every field that changes the result (architecture and seed are in the id)."""
        payload = {k: v for k, v in self.__dict__.items() if k not in ("architecture", "seed", "study")}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode("utf-8")).hexdigest()[:8]

    @property
    def run_id(self) -> str:
        return f"{self.study}-{self.architecture}-n{self.samples}-bs{self.batch_size}-s{self.seed}-{self.fingerprint()}"

    @property
    def total_steps(self) -> int:
        return self.samples // self.batch_size

    def tokenizer_dir(self) -> Path:
        from navil_utils.paths import repo_root

        path = Path(self.tokenizer)
        return path if path.is_absolute() else repo_root() / path

    def train_config(self, out: str | os.PathLike, device: str = "cpu"):
        """The run's :class:`~navil_utils.tiny.train.TrainConfig` (validated)."""
        from navil_utils.tiny.train import TrainConfig

        values = {**copy.deepcopy(self.train), "out": str(out), "seed": self.seed, "architecture": self.architecture,
                  "total_steps": self.total_steps, "batch_size": self.batch_size,
                  "warmup_steps": max(1, self.warmup_samples // self.batch_size),
                  "model": copy.deepcopy(self.model), "tokenizer": str(self.tokenizer_dir()), "device": device,
                  "threads": self.threads, "progress": False}
        return TrainConfig.from_dict(values).validate()


def expand_spec(spec: dict[str, Any]) -> list[CompareRun]:
    """The runs of a spec: every architecture × every seed (architecture-major order)."""
    if not isinstance(spec, dict):
        raise ConfigError(f"a comparison spec is a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ConfigError(f"unknown comparison options {unknown}; known: {sorted(SPEC_KEYS)}")
    for key in ("samples", "batch_size"):
        if not isinstance(spec.get(key), int) or isinstance(spec.get(key), bool):
            raise ConfigError(f"'{key}' must be an integer, got {spec.get(key)!r}")
    architectures = list(spec.get("architectures", ["navil", "nvlm_d"]))
    models = dict(spec.get("models", {}))
    extra = sorted(set(models) - set(architectures))
    if extra:
        raise ConfigError(f"'models' names architectures that are not compared: {extra}")
    seeds = [int(s) for s in spec.get("seeds", [0])]
    if not seeds or not architectures:
        raise ConfigError("a comparison needs at least one architecture and one seed")
    shared = {"samples": spec["samples"], "batch_size": spec["batch_size"],
              "warmup_samples": int(spec.get("warmup_samples", spec["samples"] // 20)),
              "train": dict(spec.get("train", {})), "eval": {"seed": 1234, "n": 500, "batch_size": 50,
                                                             **dict(spec.get("eval", {}))},
              "subsets": copy.deepcopy(spec.get("subsets", DEFAULT_SUBSETS)), "threads": int(spec.get("threads", 1)),
              "study": str(spec.get("study", "compare")),
              "tokenizer": str(spec.get("tokenizer", "data/models/navil-tiny"))}
    # seed-major: every architecture of one seed finishes before the next seed starts (a stopped job leaves pairs)
    runs = [CompareRun(architecture=a, seed=s, model=dict(models.get(a, {})), **shared)
            for s in seeds for a in architectures]
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"the spec lists the same run twice: {sorted({i for i in ids if ids.count(i) > 1})}")
    return runs


# ---------------------------------------------------------------------------------------------------
# one run
def _evaluation(model: Any, tokenizer: Any, samples: list, seed: int, batch_size: int) -> dict[str, Any]:
    from navil_utils.tiny.evaluate import evaluate_model

    result = evaluate_model(model, tokenizer, samples=samples, seed=seed, batch_size=batch_size)
    return {"n": result.n, "overall": round(result.overall, 4),
            "per_type": {k: round(v, 4) for k, v in result.per_type.items()}, **result.cost()}


@contextlib.contextmanager
def _torch_threads(count: int):
    """Run the enclosed block with ``count`` torch threads, then restore the previous setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _evaluation_sets(run: CompareRun, subsets: bool = True) -> dict[str, list[Any]]:
    """The run's held-out questions (``"all"``) and (``subsets``) each stress subset's, as synthetic samples."""
    from navil_utils.tiny.synthetic import QUESTION_TYPES, SyntheticVQA

    seed, n = int(run.eval["seed"]), int(run.eval["n"])
    main = SyntheticVQA(seed=seed, question_types=QUESTION_TYPES)
    sets = {"all": [main.sample(i) for i in range(n)]}
    for name, subset in (run.subsets.items() if subsets else ()):
        data = SyntheticVQA(seed=seed, **subset.get("data", {}))
        sets[name] = [data.sample(i) for i in range(int(subset["n"]))]
    return sets


def evaluate_run(run: CompareRun, model_dir: str | os.PathLike) -> dict[str, Any]:
    """Evaluate an exported checkpoint on the run's held-out questions and on each subset."""
    from navil_utils.tiny.evaluate import load_eval_model

    seed, batch_size = int(run.eval["seed"]), int(run.eval["batch_size"])
    if seed == run.train.get("data_seed", 1):
        raise ConfigError(f"the evaluation seed {seed} is the training data seed")
    with _torch_threads(run.threads):
        model, tokenizer = load_eval_model(model_dir)
        model.eval()
        evaluated = {name: _evaluation(model, tokenizer, samples, seed, batch_size)
                     for name, samples in _evaluation_sets(run).items()}
    return {"eval": evaluated.pop("all"), "subsets": evaluated}


def execute_run(run: CompareRun, out_root: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """Train (or resume) one run, evaluate its exported model and return its result record."""
    import torch

    from navil_utils.analysis.parameters import count_parameters
    from navil_utils.tiny.sweep import _git_commit, _machine
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer
    from navil_utils.tiny.train import build_model, train
    from navil_utils.workbook.quiet import quiet_libraries

    quiet_libraries()
    out = Path(out_root) / run.run_id
    commit = _git_commit()
    config = run.train_config(out, device)
    start = time.perf_counter()
    train(config)
    wall = time.perf_counter() - start
    final = out / "final"
    counts = count_parameters(build_model(config, load_tiny_tokenizer(final)))
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text(encoding="utf-8"))
    evaluated = evaluate_run(run, final)
    main_eval = evaluated["eval"]
    return {
        "run_id": run.run_id, "study": run.study, "architecture": run.architecture, "seed": run.seed,
        "samples": int(state.get("samples", run.samples)), "batch_size": run.batch_size, "steps": int(state["step"]),
        "params_total": counts.total, "params_encoder": counts.vision_encoder,
        "params_connector": counts.components.get("connector", 0), "params_active": counts.active,
        "train_seconds": round(float(state.get("elapsed_seconds", wall)), 1),
        "accuracy": {"overall": main_eval["overall"], **main_eval["per_type"]},
        "accuracy_subsets": {name: {"overall": s["overall"], **s["per_type"]}
                             for name, s in evaluated["subsets"].items()},
        "visual_tokens_mean": main_eval["visual_tokens_mean"], "visual_tokens_max": main_eval["visual_tokens_max"],
        "inference_seconds_per_sample": main_eval["seconds_per_sample"],
        "eval": {"seed": run.eval["seed"], "n": main_eval["n"]}, "subsets": evaluated["subsets"],
        "spec": {"train": run.train, "model": run.model, "warmup_samples": run.warmup_samples,
                 "eval": run.eval, "threads": run.threads, "fingerprint": run.fingerprint()},
        "device": device, "machine": _machine(device), "torch": torch.__version__, "git_commit": commit,
    }


def run_compare(runs: Sequence[CompareRun], results: str | os.PathLike, *, out_root: str | os.PathLike = "runs/compare",
                device: str = "cpu", progress: bool = True) -> list[dict[str, Any]]:
    """Run every run not yet in ``results`` (one after the other); return the records of all runs, in order."""
    from navil_utils.tiny.sweep import append_result, read_results

    done = {r["run_id"]: r for r in read_results(results)}
    finished = dict(done)
    for run in runs:
        if run.run_id in done:
            continue
        if progress:
            print(f"{run.run_id}: training {run.architecture} on {run.samples} samples", file=sys.stderr, flush=True)
        record = execute_run(run, out_root, device)
        append_result(results, record)
        finished[run.run_id] = record
        if progress:
            print(f"{run.run_id}: exact match {record['accuracy']['overall']:.3f}, "
                  f"{record['visual_tokens_mean']:.1f} visual tokens/image, {record['train_seconds']:.0f} s",
                  file=sys.stderr, flush=True)
    return [finished[r.run_id] for r in runs if r.run_id in finished]


def evaluation_sets(spec: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The exact questions a comparison spec evaluates on: ``{"all": [...], subset: [...]}`` (synthetic samples)."""
    return _evaluation_sets(expand_spec(dict(spec))[0])


def answer_information(model_dirs: Mapping[str, str | os.PathLike], spec: Mapping[str, Any], *,
                       batch_size: int = 50) -> list[dict[str, Any]]:
    """Per model and question type, on the spec's held-out questions: the mean teacher-forced answer loss
    (:func:`~navil_utils.tiny.evaluate.answer_log_loss`), the image-blind optimum
    (:func:`~navil_utils.tiny.evaluate.blind_answer_nll`) and their difference — the nats of information about
    the answer the model takes from the image — with its standard error over questions.  One thread, float32."""
    import math

    import torch

    from navil_utils.tiny.evaluate import answer_log_loss, blind_answer_nll, load_eval_model
    from navil_utils.tiny.synthetic import QUESTION_TYPES, SyntheticVQA

    run = expand_spec(dict(spec))[0]
    samples = _evaluation_sets(run, subsets=False)["all"]
    data = SyntheticVQA(seed=int(run.eval["seed"]), question_types=QUESTION_TYPES)  # its answer spaces
    rows = []
    with _torch_threads(1):
        for label, directory in model_dirs.items():
            model, tokenizer = load_eval_model(directory, dtype=torch.float32)
            by_type: dict[str, list[tuple[float, float]]] = {}
            for record, sample in zip(answer_log_loss(model, tokenizer, samples, batch_size=batch_size), samples):
                blind = blind_answer_nll(data, sample.template, sample.answer)
                by_type.setdefault(record["qtype"], []).append((record["nll"], blind))
            for qtype, pairs in sorted(by_type.items()):
                gains = [b - n for n, b in pairs]
                mean = sum(gains) / len(gains)
                var = sum((g - mean) ** 2 for g in gains) / max(1, len(gains) - 1)
                rows.append({"model": label, "qtype": qtype, "n": len(pairs),
                             "nll": round(sum(n for n, _ in pairs) / len(pairs), 4),
                             "blind_nll": round(sum(b for _, b in pairs) / len(pairs), 4),
                             "information_nats": round(mean, 4), "stderr": round(math.sqrt(var / len(gains)), 4)})
    return rows


# ---------------------------------------------------------------------------------------------------
# a compact copy of a run's model for the repository
#: Files of an exported tiny model other than the weights and config that a shipped copy keeps.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json")
#: Name of the reference answers written next to a shipped model (re-checked by the tests).
REFERENCE_ANSWERS = "reference_answers.json"


def reference_answers(model_dir: str | os.PathLike, *, seed: int = 1234, n: int = 100,
                      batch_size: int = 50) -> dict[str, Any]:
    """Greedy answers of the tiny NVLM-D in ``model_dir`` to the first ``n`` held-out questions of ``seed``,
    computed in float32 with one thread (bf16 weights are upcast exactly)."""
    import torch

    from navil_utils.tiny.evaluate import evaluate_model
    from navil_utils.tiny.nvlm_d import load_tiny_nvlm_d
    from navil_utils.tiny.synthetic import QUESTION_TYPES, SyntheticVQA

    with _torch_threads(1):
        model, tokenizer = load_tiny_nvlm_d(model_dir, dtype=torch.float32)
        data = SyntheticVQA(seed=seed, question_types=QUESTION_TYPES)
        result = evaluate_model(model, tokenizer, samples=[data.sample(i) for i in range(n)], batch_size=batch_size)
    return {"eval_seed": seed, "n": n, "computed_in": "float32, 1 thread",
            "accuracy": round(sum(r["correct"] for r in result.records) / n, 4),
            "predictions": [r["prediction"] for r in result.records]}


def ship_compact(source: str | os.PathLike, target: str | os.PathLike, *, run_id: str, n_reference: int = 100,
                 eval_seed: int = 1234) -> dict[str, Any]:
    """Copy the exported tiny NVLM-D in ``source`` to ``target`` with bf16 weights in the published key layout
    (``vision_model.* / mlp1.* / language_model.*``), its tokenizer files, and ``reference_answers.json``: the
    shipped weights' greedy answers to the first ``n_reference`` held-out questions, plus how many of them the
    float32 original answers the same way; ``run_id`` names the comparison run it comes from.  Returns that
    reference record."""
    import shutil

    import torch

    from navil_utils.models.modeling_nvlm_d import save_nvlm_d
    from navil_utils.tiny.nvlm_d import load_tiny_nvlm_d

    source, target = Path(source), Path(target)
    model, _ = load_tiny_nvlm_d(source, dtype=torch.float32)
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    save_nvlm_d(model, target, layout="published")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    shipped = {"run_id": run_id, **reference_answers(target, seed=eval_seed, n=n_reference)}
    original = reference_answers(source, seed=eval_seed, n=n_reference)
    shipped["float32_original"] = {"accuracy": original["accuracy"],
                                   "same_answers": sum(a == b for a, b in zip(shipped["predictions"],
                                                                              original["predictions"]))}
    (target / REFERENCE_ANSWERS).write_text(json.dumps(shipped, indent=1) + "\n", encoding="utf-8")
    return shipped


PROG = "python -m navil_utils.tiny.compare"


def _spec_file(text: str) -> tuple[str, dict[str, Any]]:
    """argparse type of the ``spec`` argument: an existing file holding a JSON object."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no comparison spec file at {path}")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path} as JSON ({err})") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError(f"{path} must hold a JSON object, not a {type(spec).__name__}")
    return str(path), spec


def main(argv: list[str] | None = None) -> int:
    """Run a comparison from the command line; the last stdout line is a JSON summary.

    Bad arguments exit with 2, a :class:`~navil_utils.errors.NaViLError` or an OS error with 1 (one line on stderr).
    """
    from navil_utils.cli import ArgumentParser, report_error, resolve_device, torch_device_or_auto
    from navil_utils.errors import NaViLError

    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=_spec_file, help="JSON comparison spec (see expand_spec)")
    parser.add_argument("--results", required=True, help="JSONL file the finished runs are appended to")
    parser.add_argument("--out-root", default="runs/compare", help="checkpoints, logs and models of each run")
    parser.add_argument("--device", type=torch_device_or_auto, default="cpu", help="cpu (default), cuda or auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.results).is_dir():
        parser.error(f"argument --results: {args.results} is a directory, expected a JSONL file")
    path, spec = args.spec
    try:
        try:
            runs = expand_spec(spec)
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError(f"{path}: invalid comparison spec ({type(err).__name__}: {err})") from err
        device = resolve_device(args.device)
        records = run_compare(runs, args.results, out_root=args.out_root, device=device,
                              progress=not args.no_progress)
    except (NaViLError, OSError) as error:
        return report_error(PROG, error)
    print(json.dumps({"runs": len(runs), "finished": len(records), "results": str(args.results)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
