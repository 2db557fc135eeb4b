"""Train the embedded tiny NaViL natively on the synthetic VQA task (``make train-tiny``).

    python -m navil_utils.train --out runs/navil-tiny                       # CPU, the default
    python -m navil_utils.train --out runs/navil-tiny --device cuda         # bf16 autocast on a GPU
    python -m navil_utils.train --out runs/navil-tiny --ship data/models/navil-tiny

The whole NaViL is trained from scratch with the project's own classes: the ViT (2-D RoPE, packed
multi-scale input exactly as at inference), the pixel-shuffle connector and the Qwen3-VE decoder with
modality experts.  The loss is the cross-entropy on answer tokens (and the closing ``<|im_end|>``).

``TrainConfig.architecture = "nvlm_d"`` trains the tiny NVLM-D (:mod:`navil_utils.tiny.nvlm_d`, the comparison
system of issue 15) instead — InternViT-style ViT, pixel shuffle, ``mlp1``, dense Qwen2, fed NVLM-D's tiles +
thumbnail by :class:`~navil_utils.tiny.data.TiledCollator`, from scratch and end to end — with the same data,
loss, schedule, logging, checkpoints and evaluation; the option is saved with the run, so a resume cannot mix
the two.

Recipe (see :class:`TrainConfig`): AdamW, linear warm-up then cosine decay to ``min_lr_ratio``, gradient
clipping, a curriculum over question types (:data:`DEFAULT_CURRICULUM`).  Every step's batch is a pure
function of ``(data_seed, step)``, so the data position is just the step counter.

Data parallel: launched by ``accelerate launch --multi_gpu --num_processes N -m navil_utils.train ...`` the
same run splits every step's batch across the N processes (process r takes samples r, r+N, …) and averages the
gradients weighted by answer tokens, so the update is the single-process one (up to float round-off);
process 0 evaluates, logs and checkpoints.  On a machine without GPUs the same command runs N CPU processes
over gloo (accelerate's ``--cpu`` flag alone starts a single process unless MPI is set up).

Runs are resumable: ``<out>/checkpoint/`` (safetensors + JSON, written atomically every
``checkpoint_every`` steps and when the time limit is hit) holds model, optimiser, scheduler, RNG and
step; re-running the same command continues where a killed run stopped, bit for bit, whatever the moment
of the kill.  ``<out>/log.jsonl`` gets one JSON line per logged step and per evaluation (one ``write`` each);
on resume it is cut back to the checkpoint's step (a torn last line dropped), so every record appears once.
The configuration is validated before ``<out>`` is touched, and a relaunch into a directory that holds a
checkpoint must repeat its options (``--out`` spelling, device, threads, workers, time limit aside); a refusal
names each option that differs with both values.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from navil_utils.constants import (
    NAVIL_MERGE_SIZE,
    NAVIL_PATCH_SIZE,
    TINY_MAX_PIXELS,
    TINY_MIN_PIXELS,
)
from navil_utils.errors import ConfigError, RunDirectoryError
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE, tiny_model_config
from navil_utils.tiny.checkpointing import (
    fsync_directory,
    load_checkpoint,
    load_weights,
    recover_checkpoint,
    save_checkpoint,
    write_atomic,
)
from navil_utils.tiny.objectives import attach_position_head, attach_token_heads, grid_positions, question_loss

#: Curriculum: ``(start_fraction, {question type: weight})``; a stage runs until the next one starts.
#: Easy, fast-learning types first (colour, count), then geometry, then text reading, then all mixed.
DEFAULT_CURRICULUM: tuple[tuple[float, dict[str, float]], ...] = (
    (0.00, {"color": 1.0, "count": 1.0}),
    (0.10, {"color": 1.0, "count": 1.0, "position": 1.0, "relation": 1.0}),
    (0.25, {"color": 1.0, "count": 1.0, "position": 1.0, "relation": 1.0, "text": 2.0}),
    (0.45, {"color": 1.0, "count": 1.5, "position": 1.5, "relation": 1.0, "text": 2.5}),
)

#: Values of ``TrainConfig.architecture``: the model and its image preprocessing.
ARCHITECTURES: tuple[str, ...] = ("navil", "nvlm_d")
#: Values of ``TrainConfig.loss_averaging``.
LOSS_AVERAGING: tuple[str, ...] = ("token", "question")


@dataclass
class TrainConfig:
    """Every knob of a training run (saved to ``<out>/train_config.json``)."""

    out: str = "runs/navil-tiny"
    seed: int = 0                      # model init and dropout-free training RNG
    data_seed: int = 1                 # training data; evaluation seeds must differ
    eval_seed: int = 7                 # held-out data for periodic evaluation (never the final eval seed)
    total_steps: int = 20000
    batch_size: int = 32
    lr: float = 5e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = 1.0
    curriculum: tuple[tuple[float, dict[str, float]], ...] = DEFAULT_CURRICULUM
    qa_packing: str = "single"         # "single" or "isolated" (several QAs per image, block mask)
    extra_qas: int = 0                 # extra QAs per image with qa_packing="isolated"
    loss_averaging: str = "token"      # "token": mean over answer tokens; "question": mean over QAs of each
    #                                    QA's mean (a long answer weighs as much as a one-word answer)
    token_loss: float = 0.0            # weight of the auxiliary per-visual-token loss (NaViL only; 0 = off):
    #                                    linear heads on the LLM's visual tokens predict the kind, colour and
    #                                    glyph of the object each token shows (tiny/token_targets.py)
    position_loss: float = 0.0         # weight of the auxiliary position loss (NaViL only; 0 = off): a head on the
    #                                    LLM's visual tokens after decoder layer position_loss_layer predicts each
    #                                    token's row and column fraction (tiny/objectives.py, PositionHead)
    position_loss_layer: int = 1
    token_loss_weights: dict[str, float] | None = None  # weight per token-loss target (kind/color/glyph;
    #                                    missing = 1, None = equal): Σ w·CE / Σ w; 0 leaves a target untrained
    connector_init_scale: float = 1.0  # multiplies the initial weights of the connector's last linear layer
    #                                    (< 1 starts the visual tokens nearer the text embeddings' scale)
    log_every: int = 50
    eval_every: int = 1000
    eval_batches: int = 8
    checkpoint_every: int = 500
    time_limit_minutes: float | None = None   # checkpoint and stop after this much wall time
    device: str = "cpu"
    bf16: bool | None = None           # autocast; None = on for CUDA, off on CPU
    threads: int | None = None
    num_workers: int = 0
    model: dict[str, Any] = field(default_factory=dict)     # overrides of tiny_model_config() (NaViL) or
    #                                                         of TINY_NVLM_D_MODEL (NVLM-D)
    architecture: str = "navil"        # "navil" (multi-scale input) or "nvlm_d" (tiles + thumbnail, tiny/nvlm_d.py)
    data: dict[str, Any] = field(default_factory=dict)      # overrides of SyntheticConfig
    min_pixels: int = TINY_MIN_PIXELS
    max_pixels: int = TINY_MAX_PIXELS
    tokenizer: str | None = None       # directory; default: <out>/tokenizer (trained on first run)
    init_from: str | None = None       # start from these weights (a checkpoint directory) instead of random
    progress: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a configuration from JSON-like values (not validated: see :meth:`validate`)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training options {unknown}")
        values = dict(values)
        try:
            if "curriculum" in values:
                values["curriculum"] = tuple((float(s), dict(w)) for s, w in values["curriculum"])
        except (TypeError, ValueError) as error:
            raise ConfigError(f"training option curriculum={values['curriculum']!r} is invalid: expected a list "
                              "of [start_fraction, {question_type: weight}] pairs") from error
        try:
            if "betas" in values:
                values["betas"] = tuple(values["betas"])
        except TypeError as error:
            raise ConfigError(f"training option betas={values['betas']!r} is invalid: expected two numbers "
                              "in [0, 1)") from error
        return cls(**values)

    def validate(self) -> TrainConfig:
        """Check every option's type and range; raise :class:`~navil_utils.errors.ConfigError` naming the
        first bad option and its value.  Return ``self``.  :func:`train` calls it before touching ``out``."""

        def fail(option: str, value: Any, expected: str) -> None:
            raise ConfigError(f"training option {option}={value!r} is invalid: expected {expected}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)

        for option, minimum in (("seed", 0), ("data_seed", 0), ("eval_seed", 0), ("total_steps", 1),
                                ("batch_size", 1), ("warmup_steps", 0), ("extra_qas", 0), ("log_every", 1),
                                ("eval_every", 1), ("eval_batches", 0), ("checkpoint_every", 1),
                                ("num_workers", 0), ("min_pixels", 1), ("max_pixels", 1)):
            value = getattr(self, option)
            if not is_int(value) or value < minimum:
                fail(option, value, f"an integer >= {minimum}")
        if self.eval_seed == self.data_seed:
            fail("eval_seed", self.eval_seed, f"a seed other than data_seed={self.data_seed} (held-out data)")
        if self.max_pixels < self.min_pixels:
            fail("max_pixels", self.max_pixels, f">= min_pixels={self.min_pixels}")
        if not is_number(self.lr) or not 0 < self.lr < math.inf:
            fail("lr", self.lr, "a finite number > 0")
        if not is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        if not is_number(self.weight_decay) or not 0 <= self.weight_decay < math.inf:
            fail("weight_decay", self.weight_decay, "a finite number >= 0")
        if not is_number(self.grad_clip) or self.grad_clip <= 0:
            fail("grad_clip", self.grad_clip, "a number > 0")
        if (not isinstance(self.betas, (tuple, list)) or len(self.betas) != 2
                or not all(is_number(b) and 0 <= b < 1 for b in self.betas)):
            fail("betas", self.betas, "two numbers in [0, 1)")
        starts = []
        for stage in self.curriculum if isinstance(self.curriculum, (tuple, list)) else [None]:
            if (not isinstance(stage, (tuple, list)) or len(stage) != 2 or not is_number(stage[0])
                    or not 0 <= stage[0] <= 1 or not isinstance(stage[1], dict) or not stage[1]
                    or not all(isinstance(k, str) and is_number(w) and 0 < w < math.inf for k, w in stage[1].items())):
                fail("curriculum", self.curriculum, "a list of [start_fraction in [0, 1], {question_type: weight > 0}] "
                     "pairs")
            starts.append(stage[0])
        if not starts or starts != sorted(starts):
            fail("curriculum", self.curriculum, "at least one stage, start fractions in increasing order")
        if self.architecture not in ARCHITECTURES:
            fail("architecture", self.architecture, " or ".join(repr(a) for a in ARCHITECTURES))
        if self.architecture == "nvlm_d" and isinstance(self.model, dict):
            from navil_utils.tiny.nvlm_d import check_model_overrides

            check_model_overrides(self.model)
        if self.qa_packing not in ("single", "isolated"):
            fail("qa_packing", self.qa_packing, "'single' or 'isolated'")
        if self.loss_averaging not in LOSS_AVERAGING:
            fail("loss_averaging", self.loss_averaging, " or ".join(repr(a) for a in LOSS_AVERAGING))
        if not is_number(self.token_loss) or not 0 <= self.token_loss < math.inf:
            fail("token_loss", self.token_loss, "a finite number >= 0")
        weights = self.token_loss_weights
        if weights is not None:
            from navil_utils.tiny.token_targets import TOKEN_TARGETS

            if (not isinstance(weights, dict) or not set(weights) <= set(TOKEN_TARGETS)
                    or not all(is_number(w) and 0 <= w < math.inf for w in weights.values())
                    or not any(weights.get(t, 1) > 0 for t in TOKEN_TARGETS)):
                fail("token_loss_weights", weights, f"null or {{target: weight}} with targets from {TOKEN_TARGETS}, "
                     "finite weights >= 0, not all 0")
        if not is_number(self.position_loss) or not 0 <= self.position_loss < math.inf:
            fail("position_loss", self.position_loss, "a finite number >= 0")
        if not is_int(self.position_loss_layer) or self.position_loss_layer < 0:
            fail("position_loss_layer", self.position_loss_layer, "an integer >= 0 (a decoder layer index)")
        if self.position_loss and self.architecture != "navil":
            fail("position_loss", self.position_loss, "0 with architecture='nvlm_d' (the position loss is NaViL's)")
        if self.token_loss and self.architecture != "navil":
            fail("token_loss", self.token_loss, "0 with architecture='nvlm_d' (the per-token loss is NaViL's)")
        if not is_number(self.connector_init_scale) or not 0 < self.connector_init_scale < math.inf:
            fail("connector_init_scale", self.connector_init_scale, "a finite number > 0")
        if self.time_limit_minutes is not None and (not is_number(self.time_limit_minutes)
                                                    or self.time_limit_minutes <= 0):
            fail("time_limit_minutes", self.time_limit_minutes, "null or a number > 0")
        if self.threads is not None and (not is_int(self.threads) or self.threads < 1):
            fail("threads", self.threads, "null or an integer >= 1")
        if self.bf16 is not None and not isinstance(self.bf16, bool):
            fail("bf16", self.bf16, "null, true or false")
        if not isinstance(self.progress, bool):
            fail("progress", self.progress, "true or false")
        for option in ("model", "data"):
            if not isinstance(getattr(self, option), dict):
                fail(option, getattr(self, option), "a JSON object of overrides")
        if not isinstance(self.out, str) or not self.out:
            fail("out", self.out, "a directory path (a string)")
        for option in ("tokenizer", "init_from"):
            value = getattr(self, option)
            if value is not None and (not isinstance(value, str) or not value):
                fail(option, value, "null or a directory path (a string)")
        try:
            if not isinstance(self.device, str):
                raise TypeError
            torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ConfigError(f"training option device={self.device!r} is invalid: expected a torch device "
                              "such as 'cpu' or 'cuda'") from error
        return self


def curriculum_stage(config: TrainConfig, step: int) -> int:
    """Index of the curriculum stage that ``step`` belongs to."""
    fraction = step / max(1, config.total_steps)
    stage = 0
    for i, (start, _) in enumerate(config.curriculum):
        if fraction >= start:
            stage = i
    return stage


def lr_factor(config: TrainConfig, step: int) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``total_steps``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.total_steps - config.warmup_steps))
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class StepBatches(torch.utils.data.Dataset):
    """``dataset[step]`` is the (collated) training batch of that step — a pure function of the step.

    Each curriculum stage has its own :class:`~navil_utils.tiny.synthetic.SyntheticVQA` (same seed,
    stage-specific question-type weights); batch ``step`` holds samples ``step·B … step·B+B-1``.
    """

    def __init__(self, config: TrainConfig, tokenizer: Any, seed: int | None = None, *, rank: int = 0,
                 world: int = 1) -> None:
        from navil_utils.tiny.data import TinyCollator
        from navil_utils.tiny.synthetic import SyntheticVQA

        self.config = config
        self.rank, self.world = rank, world
        seed = config.data_seed if seed is None else seed
        self.stages = []
        for _, weights in config.curriculum:
            types = tuple(weights)
            self.stages.append(SyntheticVQA(seed=seed, question_types=types,
                                            qtype_weights=tuple(weights[t] for t in types),
                                            extra_qas=config.extra_qas, **config.data))
        if config.architecture == "nvlm_d":  # NVLM-D's tiles; everything else as NaViL's collator
            from navil_utils.tiny.nvlm_d import collator_for

            self.collator = collator_for(config, tokenizer, qa_packing=config.qa_packing, pad_to_multiple_of=8)
            return
        classes = None
        if config.token_loss:
            from navil_utils.tiny.synthetic import SyntheticConfig
            from navil_utils.tiny.token_targets import target_classes

            classes = target_classes(SyntheticConfig(**config.data))
        self.collator = TinyCollator(tokenizer, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
                                     patch_size=config.model.get("patch_size", NAVIL_PATCH_SIZE),
                                     merge_size=config.model.get("merge_size", NAVIL_MERGE_SIZE),
                                     qa_packing=config.qa_packing, pad_to_multiple_of=8,
                                     token_target_classes=classes)

    def __len__(self) -> int:
        return self.config.total_steps

    def __getitem__(self, step: int):
        data = self.stages[curriculum_stage(self.config, step)]
        b = self.config.batch_size
        return self.collator([data.sample(step * b + j) for j in range(self.rank, b, self.world)])


def build_model(config: TrainConfig, tokenizer: Any):
    """A freshly initialised tiny NaViL sized by ``config.model`` for ``tokenizer``.

    The initialisation is seeded with ``config.seed`` on a forked RNG: the caller's RNG state is unchanged.
    ``config.architecture == "nvlm_d"`` builds the tiny NVLM-D instead
    (:func:`navil_utils.tiny.nvlm_d.build_nvlm_d_model`).
    """
    if config.architecture == "nvlm_d":
        from navil_utils.tiny.nvlm_d import build_nvlm_d_model

        return build_nvlm_d_model(config, tokenizer)
    from navil_utils.models.configuration_navil import NaViLChatConfig
    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
    from navil_utils.processing.tokenizers import navil_token_ids

    ids = navil_token_ids(tokenizer)
    model_kwargs = dict(config.model)
    model_kwargs.setdefault("min_pixels", config.min_pixels)
    model_kwargs.setdefault("max_pixels", config.max_pixels)
    model_kwargs.setdefault("system_message", TINY_SYSTEM_MESSAGE)
    cfg = NaViLChatConfig(**tiny_model_config(len(tokenizer), ids, **model_kwargs))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = NaViLForConditionalGeneration(cfg)
    if config.connector_init_scale != 1.0:
        with torch.no_grad():
            last = model.mlp1[-1]
            last.weight.mul_(config.connector_init_scale)
            last.bias.mul_(config.connector_init_scale)
    return model


def initial_model(config: TrainConfig, tokenizer: Any, *, resuming: bool = False):
    """The model a run of ``config`` starts from: :func:`build_model`, then the ``init_from`` weights unless the run
    is resuming (its checkpoint is loaded over it instead)."""
    model = build_model(config, tokenizer)
    if config.init_from and not resuming:
        load_weights(Path(config.init_from) / "model.safetensors", model)
    return model


def _tokenizer_for(config: TrainConfig):
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer, train_tiny_tokenizer

    directory = Path(config.tokenizer or Path(config.out) / "tokenizer")
    if not (directory / "tokenizer.json").exists():
        # trained aside and moved in with tokenizer.json last, so that its presence means a whole tokenizer
        staging = directory.with_name(directory.name + ".tmp")
        if staging.exists():
            shutil.rmtree(staging)
        train_tiny_tokenizer(staging)
        directory.mkdir(parents=True, exist_ok=True)
        names = sorted(item.name for item in staging.iterdir())
        for name in sorted(names, key=lambda n: n == "tokenizer.json"):
            os.replace(staging / name, directory / name)
        fsync_directory(directory)
        shutil.rmtree(staging)
    if config.architecture == "nvlm_d":  # the same tokenizer plus NVLM-D's tokens, appended (ids unchanged)
        from navil_utils.tiny.nvlm_d import (
            extend_tokenizer_with_nvlm_tokens,
            has_nvlm_tokens,
        )

        if not has_nvlm_tokens(load_tiny_tokenizer(directory)):
            extended = Path(config.out) / "tokenizer_nvlm_d"
            if not (extended / "tokenizer.json").exists():
                extend_tokenizer_with_nvlm_tokens(directory, extended)
                fsync_directory(extended)
            directory = extended
    return load_tiny_tokenizer(directory), directory


def _autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast on CUDA (default) or when ``bf16`` is forced; a no-op context otherwise."""
    enabled = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def main_process_threads(device: torch.device, num_workers: int, threads: int | None) -> int | None:
    """Intra-op threads for the training process: ``threads`` when given; on a GPU with data-loader workers the
    cores the workers leave free (at least 1); else None (torch's default, one per core).

    torch's default beside ``num_workers`` busy single-threaded workers oversubscribes the CPU, and each CPU-side
    operation of a step then waits for descheduled threads (suspected cause of the 1.3–1.8 s steps of the
    2026-12-04 GPU run, whose steps took 0.13 s with the workers idle: ``configs/README.md``)."""
    if threads:
        return threads
    if device.type == "cuda" and num_workers:
        return max(1, (os.cpu_count() or 1) - num_workers)
    return None


@torch.no_grad()
def evaluate_teacher_forced(model, batches, device: torch.device, bf16: bool | None = None) -> dict[str, Any]:
    """Exact match per question type with teacher forcing (every answer token must be the argmax), the mean
    batch loss (``eval_loss``) and the loss per answer token over all batches (``eval_token_loss``)."""
    from navil_utils.tiny.data import qa_exact_match

    model.eval()
    correct, total = defaultdict(int), defaultdict(int)
    loss_sum, n, token_loss_sum, tokens = 0.0, 0, 0.0, 0
    for batch in batches:
        batch = batch.to(device)
        with _autocast(device, bf16):
            out = model(**batch.model_inputs())
        loss_sum += float(out.loss)
        n += 1
        token_loss_sum += float(out.loss) * batch.num_answer_tokens  # the loss is the mean over answer tokens
        tokens += batch.num_answer_tokens
        for qa, ok in zip(batch.qas, qa_exact_match(out.logits.float(), batch).tolist()):
            total[qa.qtype] += 1
            correct[qa.qtype] += int(ok)
    model.train()
    per_type = {t: correct[t] / total[t] for t in sorted(total)}
    overall = sum(correct.values()) / max(1, sum(total.values()))
    return {"eval_loss": loss_sum / max(1, n), "eval_token_loss": token_loss_sum / max(1, tokens),
            "eval_overall": overall, "eval_per_type": per_type}


def _record_kind(record: dict[str, Any]) -> str:
    return "eval" if "eval_loss" in record else "train"


def _truncate_log(path: Path, step: int) -> int:
    """Make ``log.jsonl`` consistent with a checkpoint at ``step`` (0: none); return the records dropped.

    Records after ``step`` are dropped (they are redone after resuming), as is a torn last line (a run killed
    while appending it) and any repeated (step, kind) record.  The file is replaced atomically, and only when
    something changes.  An unreadable line other than the last raises
    :class:`~navil_utils.errors.RunDirectoryError` naming the file and line.
    """
    stale = path.with_name(path.name + ".tmp")  # left by a kill inside an earlier rewrite
    if stale.exists():
        stale.unlink()
    if not path.exists():
        return 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = lines.pop()  # b"" when the file ends with a newline; else an unfinished last record
    kept, seen, dropped = [], set(), int(bool(torn))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            record_step = int(record["step"])
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines) and not torn:  # a last line that is not JSON: torn as well
                dropped += 1
                continue
            raise RunDirectoryError(f"{path} line {number} is not a log record ({type(error).__name__}: "
                                    f"{line[:80]!r}); fix or remove that line to resume") from error
        key = (record_step, _record_kind(record))
        if record_step > step or key in seen:
            dropped += 1
            continue
        seen.add(key)
        kept.append(line + b"\n")
    new = b"".join(kept)
    if new != data:
        write_atomic(path, new)
    return dropped


class _AppendLog:
    """``log.jsonl`` opened for appending: each record is one ``write`` of a whole line (``O_APPEND``), so a
    kill leaves at most a torn last line, which :func:`_truncate_log` drops on resume."""

    def __init__(self, path: Path | None) -> None:
        self.fd = None if path is None else os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def write(self, record: dict[str, Any]) -> None:
        if self.fd is None:
            return
        view = memoryview((json.dumps(record) + "\n").encode("utf-8"))
        while view:
            view = view[os.write(self.fd, view):]

    def sync(self) -> None:
        """Make the records written so far durable (before a checkpoint that counts on them)."""
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, TypeError):
            pass


#: Options that may change between the launches of one run (how it runs, not what it computes).
RUNTIME_OPTIONS = frozenset({"out", "device", "threads", "num_workers", "time_limit_minutes", "progress", "bf16"})


def _comparable(values: dict[str, Any], out: Path) -> dict[str, Any]:
    """The options of a saved or given configuration that must match to resume, paths resolved."""
    config = json.loads(TrainConfig.from_dict(values).to_json())
    result = {k: v for k, v in config.items() if k not in RUNTIME_OPTIONS}
    if result.get("tokenizer") is None:
        result["tokenizer"] = str(out / "tokenizer")
    for key in ("tokenizer", "init_from"):
        if isinstance(result.get(key), str):
            result[key] = os.path.realpath(result[key])
    return result


def _check_run_directory(config: TrainConfig, out: Path, has_checkpoint: bool, *, write: bool) -> None:
    """Refuse to resume a checkpointed run of ``out`` with different options; (re)write ``train_config.json``.

    Without a checkpoint there is nothing to resume (the run starts at step 0 and drops any log records), so
    the saved configuration of a run that never checkpointed is simply replaced.
    """
    config_path = out / "train_config.json"
    text = config.to_json()
    stale = config_path.with_name(config_path.name + ".tmp")  # left by a kill inside an earlier write
    if write and stale.exists():
        stale.unlink()
    if config_path.exists() and has_checkpoint:
        try:
            saved = _comparable(dict(json.loads(config_path.read_text(encoding="utf-8"))), out)
        except (ValueError, TypeError, ConfigError) as error:
            raise RunDirectoryError(f"{out} holds a checkpoint but its configuration {config_path} is unreadable "
                                    f"({error}); use another --out") from error
        given = _comparable(json.loads(text), out)
        differ = [k for k in sorted(set(saved) | set(given)) if saved.get(k) != given.get(k)]
        if differ:
            details = "; ".join(f"{k}: saved {json.dumps(saved.get(k))}, given {json.dumps(given.get(k))}"
                                for k in differ)
            raise RunDirectoryError(f"{out} holds a run with a different configuration ({config_path}): {details}. "
                                    "Use another --out, or the saved options to resume")
    if write and (not config_path.exists() or config_path.read_text(encoding="utf-8") != text):
        write_atomic(config_path, text)


def train(config: TrainConfig, *, _simulate_kill_after: int | None = None) -> Path:
    """Run (or resume) training; return the output directory.

    The caller's global state is left as it was: torch's RNG is forked for the run (model init, dropout;
    the run's own RNG state is saved in every checkpoint and restored on resume) and the intra-op thread
    count is restored afterwards.

    ``_simulate_kill_after`` (tests only) stops dead after that many steps of this session, without a
    final checkpoint or export — like ``kill -9`` — so that resuming from the last periodic checkpoint
    can be checked against an uninterrupted run.

    The configuration is validated (:meth:`TrainConfig.validate`) before ``config.out`` is touched.
    """
    config.validate()
    threads = torch.get_num_threads()
    devices = list(range(torch.cuda.device_count())) if torch.device(config.device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            return _train(config, _simulate_kill_after)
    finally:
        torch.set_num_threads(threads)


def no_weight_decay(model: torch.nn.Module) -> set[str]:
    """Names of the parameters trained without weight decay: 1-D tensors (norm weights, biases) and
    every embedding table (``nn.Embedding``: Qwen3-VE ``embed_tokens``, InternLM2-VE ``tok_embeddings``,
    NaViL's ``special_token_embedding``)."""
    names = {name for name, param in model.named_parameters() if param.ndim < 2}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            names |= {f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters()}
    return names


class DataParallel:
    """The processes of an ``accelerate launch`` (gradients all-reduced by DDP); a no-op in one process."""

    def __init__(self, device: torch.device) -> None:
        self.accelerator = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator
            from accelerate.utils import DistributedDataParallelKwargs

            # find_unused_parameters: a batch may not use every special-token embedding
            self.accelerator = Accelerator(cpu=device.type == "cpu", kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=True)])
            self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def main_process_first(self):
        import contextlib

        return contextlib.nullcontext() if self.accelerator is None else self.accelerator.main_process_first()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.accelerator is None else self.accelerator.prepare_model(model)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward() if self.accelerator is None else self.accelerator.backward(loss)

    def close(self) -> None:
        """Wait for every process, free the DDP model while the group is still up, then tear the group down.
        The order matters: a process that exits with its gloo group open can abort in the C++ destructors
        ("terminate called without an active exception"), and one whose DDP reducer outlived the group could
        hang in them at exit (seen about once in seven launches on a loaded 2-core machine). The caller drops
        its own reference to the wrapped model first."""
        if self.accelerator is None:
            return
        import gc

        import torch.distributed as dist

        self.accelerator.wait_for_everyone()
        self.accelerator.free_memory()   # the accelerator's references to the prepared (DDP) model
        gc.collect()
        self.accelerator.wait_for_everyone()
        if dist.is_initialized():
            dist.destroy_process_group()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64)."""
        if self.accelerator is None:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()


def export_checkpoint(run: str | Path, directory: str | Path) -> Path:
    """Export the last checkpoint of run directory ``run`` (finished, stopped or still running: only read) as a
    loadable model in ``directory`` — the weights a resumed run would start from, without training scaffolding.
    Returns ``directory``; the step exported is written to ``directory/trainer_step.json``."""
    run = Path(run)
    config_path, checkpoint = run / "train_config.json", run / "checkpoint"
    if not config_path.exists() or not (checkpoint / "model.safetensors").exists():
        from navil_utils.errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"{run} holds no checkpoint to export (need {config_path} and "
                                      f"{checkpoint / 'model.safetensors'})")
    config = TrainConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8"))).validate()
    tokenizer, tokenizer_dir = _tokenizer_for(config)
    model = build_model(config, tokenizer)
    if config.token_loss:
        attach_token_heads(model, config.data, config.seed + 1)
    if config.position_loss:
        attach_position_head(model, config.seed + 2)
    load_weights(checkpoint / "model.safetensors", model)
    step = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["step"]
    directory = export_model(model.eval(), tokenizer_dir, directory)
    (directory / "trainer_step.json").write_text(json.dumps({"run": str(run), "step": int(step)}) + "\n")
    return directory


def _train(config: TrainConfig, _simulate_kill_after: int | None) -> Path:
    out = Path(config.out)
    device = torch.device(config.device)
    parallel = DataParallel(device)
    if config.batch_size % parallel.world:
        raise ConfigError(f"training option batch_size={config.batch_size} is not divisible by the "
                          f"{parallel.world} data-parallel processes")
    checkpoint_dir = out / "checkpoint"
    # Process 0 alone finishes an interrupted checkpoint write, checks/writes the configuration and trains a
    # missing tokenizer; the others wait for it, then only read.
    with parallel.main_process_first():
        if parallel.is_main:
            out.mkdir(parents=True, exist_ok=True)
            has_checkpoint = recover_checkpoint(checkpoint_dir)
        else:
            has_checkpoint = checkpoint_dir.exists()
        _check_run_directory(config, out, has_checkpoint, write=parallel.is_main)
        tokenizer, tokenizer_dir = _tokenizer_for(config)
    threads = main_process_threads(device, config.num_workers, config.threads)
    if threads:
        torch.set_num_threads(threads)
    model = initial_model(config, tokenizer, resuming=has_checkpoint)
    torch.manual_seed(config.seed)  # the run's own RNG stream (forked by train(); saved in checkpoints)
    visual_tokens: list[torch.Tensor] = []
    if config.token_loss:  # heads built after init_from (its checkpoint has none), before a checkpoint is loaded
        from navil_utils.models.vision import window_layout

        attach_token_heads(model, config.data, config.seed + 1)
        model.mlp1.register_forward_hook(lambda _module, _inputs, output: visual_tokens.append(output))
        merge, window = model.config.merge_size, model.config.vision_config.window_size
    layer_states: list[torch.Tensor] = []
    if config.position_loss:  # built like the token heads; reads the decoder's output at one layer
        from navil_utils.models.vision import window_layout

        layers = model.language_model.model.layers
        if config.position_loss_layer >= len(layers):
            raise ConfigError(f"training option position_loss_layer={config.position_loss_layer} is not a layer of "
                              f"the {len(layers)}-layer decoder")
        attach_position_head(model, config.seed + 2)
        layers[config.position_loss_layer].register_forward_hook(
            lambda _module, _inputs, output: layer_states.append(output[0] if isinstance(output, tuple) else output))
        merge, window = model.config.merge_size, model.config.vision_config.window_size
    model = model.to(device)
    model.train()
    exempt = no_weight_decay(model)  # names of the unwrapped model; the optimiser holds the same tensors
    decay = [p for n, p in model.named_parameters() if n not in exempt]
    no_decay = [p for n, p in model.named_parameters() if n in exempt]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    state = {"step": 0, "samples": 0, "elapsed_seconds": 0.0}
    if has_checkpoint:
        state = load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
    if parallel.is_main:
        # the log must hold each record up to the checkpoint's step exactly once and nothing after it (a run
        # killed before its first checkpoint starts again from step 0: all its records go)
        _truncate_log(out / "log.jsonl", state["step"])
        if has_checkpoint:
            print(f"resuming {out} at step {state['step']} ({state['elapsed_seconds'] / 60:.1f} min trained)", flush=True)
    module = model  # the plain model: evaluation, checkpoints, export
    model = parallel.wrap(model)

    train_batches = StepBatches(config, tokenizer, rank=parallel.rank, world=parallel.world)
    eval_data = StepBatches(config, tokenizer, seed=config.eval_seed)
    eval_steps = [config.total_steps - 1 - i for i in range(config.eval_batches)]  # last stage = full mix
    eval_set = [eval_data[s] for s in eval_steps] if config.eval_batches and parallel.is_main else []
    loader = torch.utils.data.DataLoader(
        train_batches, batch_size=None, num_workers=config.num_workers,
        sampler=range(state["step"], config.total_steps), collate_fn=lambda b: b,
        worker_init_fn=_worker_init, persistent_workers=False,
        prefetch_factor=4 if config.num_workers else None)

    log = _AppendLog(out / "log.jsonl" if parallel.is_main else None)
    progress = None
    if config.progress and parallel.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.total_steps, initial=state["step"], dynamic_ncols=True, file=sys.stderr)
    start_wall = time.perf_counter() - state["elapsed_seconds"]
    session_start = time.perf_counter()
    window_loss, window_correct, window_total = 0.0, 0, 0
    window_objective, window_aux, window_token_acc = 0.0, 0.0, defaultdict(list)
    window_position_aux, window_position_error = 0.0, defaultdict(list)
    stopped_early = False
    first_step = state["step"]
    saved_step = state["step"] if has_checkpoint else None  # the step the checkpoint on disk holds

    def checkpoint() -> None:
        nonlocal saved_step
        state["elapsed_seconds"] = time.perf_counter() - start_wall
        saved_step = state["step"]
        if parallel.is_main:
            log.sync()  # the records up to this step are durable before the checkpoint that implies them
            save_checkpoint(checkpoint_dir, module, optimizer, scheduler, state)

    from navil_utils.tiny.data import qa_exact_match

    for batch in loader:
        step = state["step"]
        batch = batch.to(device)
        visual_tokens.clear()
        layer_states.clear()
        with _autocast(device, config.bf16):
            out_ = model(**batch.model_inputs())
        loss = out_.loss  # mean over this process's answer tokens
        local_tokens = batch.num_answer_tokens
        answer_tokens = parallel.sum([local_tokens])[0] if parallel.world > 1 else local_tokens
        if config.loss_averaging == "question":
            objective_sum, local_units = question_loss(out_.logits, batch.labels, batch.answer_qa)
            objective = objective_sum / max(1, local_units)
        else:
            objective, local_units = loss, local_tokens
        units = parallel.sum([local_units])[0] if parallel.world > 1 else local_units
        # weight so that the gradient DDP averages over processes is that of the mean over all units
        total = objective * (local_units * parallel.world / units) if parallel.world > 1 else objective
        token_accuracy: dict[str, float] = {}
        if config.token_loss:
            targets = batch.extra["token_targets"]
            targets = targets[window_layout(batch.image_grid_thw.cpu(), merge, window).window_index].to(device)
            auxiliary, token_accuracy = module.token_heads(visual_tokens[-1], targets, config.token_loss_weights)
            total = total + config.token_loss * auxiliary
            window_aux += float(auxiliary.detach())
            for target, value in token_accuracy.items():
                window_token_acc[target].append(value)
        if config.position_loss:
            grid = batch.image_grid_thw.cpu()
            targets = grid_positions(grid, merge)[window_layout(grid, merge, window).window_index].to(device)
            states = layer_states[-1][batch.input_ids == module.img_context_token_id]   # k-th <IMG_CONTEXT> = token k
            position_aux, position_error = module.position_head(states, targets)
            total = total + config.position_loss * position_aux
            window_position_aux += float(position_aux.detach())
            for axis, value in position_error.items():
                window_position_error[axis].append(value)
        optimizer.zero_grad(set_to_none=True)
        parallel.backward(total)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        hits = qa_exact_match(out_.logits.detach().float(), batch)
        loss_sum, tokens, correct, total = parallel.sum([float(loss.detach()) * local_tokens,
                                                         int(batch.attention_mask.sum()), int(hits.sum()),
                                                         int(hits.numel())])
        state["step"] = step + 1
        state["samples"] += config.batch_size
        state["tokens"] = state.get("tokens", 0) + int(tokens)
        state["answer_tokens"] = state.get("answer_tokens", 0) + int(answer_tokens)
        window_loss += loss_sum / answer_tokens if parallel.world > 1 else float(loss.detach())
        window_objective += float(objective.detach())
        window_correct += int(correct)
        window_total += int(total)
        if progress is not None:
            progress.update(1)
        if state["step"] % config.log_every == 0 or state["step"] == config.total_steps:
            n = config.log_every if state["step"] % config.log_every == 0 else state["step"] % config.log_every
            record = {"step": state["step"], "samples": state["samples"], "tokens": state["tokens"],
                      "answer_tokens": state["answer_tokens"], "loss": window_loss / n,
                      "train_acc": window_correct / max(1, window_total), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "stage": curriculum_stage(config, step),
                      "minutes": (time.perf_counter() - start_wall) / 60}
            if config.loss_averaging != "token":
                record["objective"] = window_objective / n      # this process's mean-over-questions loss
            if config.token_loss:
                record["token_loss"] = window_aux / n
                record["token_acc"] = {t: sum(v) / len(v) for t, v in sorted(window_token_acc.items())}
            if config.position_loss:
                record["position_loss"] = window_position_aux / n
                record["position_error"] = {a: sum(v) / len(v) for a, v in sorted(window_position_error.items())}
            log.write(record)
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.2f}",
                                     stage=record["stage"])
            window_loss, window_correct, window_total = 0.0, 0, 0
            window_objective, window_aux, window_token_acc = 0.0, 0.0, defaultdict(list)
            window_position_aux, window_position_error = 0.0, defaultdict(list)
        if eval_set and (state["step"] % config.eval_every == 0 or state["step"] == config.total_steps):
            record = {"step": state["step"], "samples": state["samples"], **evaluate_teacher_forced(module, eval_set, device, config.bf16)}
            log.write(record)
            if progress is not None:
                progress.write(f"step {state['step']}: eval loss {record['eval_loss']:.3f}, exact match "
                               f"{record['eval_overall']:.3f} " + json.dumps({k: round(v, 3) for k, v in record['eval_per_type'].items()}))
        if state["step"] % config.checkpoint_every == 0:
            checkpoint()
        if _simulate_kill_after is not None and state["step"] - first_step >= _simulate_kill_after:
            log.close()
            return out
        if config.time_limit_minutes is not None:  # every process stops at the same step
            late = time.perf_counter() - session_start > 60 * config.time_limit_minutes
            if parallel.sum([float(late)])[0] > 0:
                stopped_early = state["step"] < config.total_steps
                break
    if saved_step != state["step"]:  # not when the last periodic checkpoint holds this step already
        checkpoint()
    if progress is not None:
        progress.close()
    log.close()
    if parallel.is_main:
        export_model(module, tokenizer_dir, out / "final")
    del model  # the DDP wrapper goes before the process group (close): freed later, it could hang the exit
    parallel.close()
    if stopped_early:
        print(f"time limit reached at step {state['step']}/{config.total_steps}; re-run the same command to resume", flush=True)
    return out


def export_model(model, tokenizer_dir: str | Path, directory: str | Path) -> Path:
    """Save a loadable checkpoint: config.json, model.safetensors, tokenizer, generation_config.json (a tiny
    NVLM-D through :func:`navil_utils.tiny.nvlm_d.export_nvlm_d`: strict-loadable, native key layout)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "model_type", None) == "NVLM_D":
        from navil_utils.tiny.nvlm_d import export_nvlm_d
        from navil_utils.tiny.tokenizer import load_tiny_tokenizer

        export_nvlm_d(model, directory, load_tiny_tokenizer(tokenizer_dir).convert_tokens_to_ids("<|im_end|>"))
    else:
        ids = model.special_token_ids or {}
        generation = model.generation_config
        generation.do_sample, generation.max_new_tokens = False, 8
        if "<|im_end|>" in ids:
            generation.eos_token_id = ids["<|im_end|>"]
        generation.pad_token_id = 0
        scaffolding = {name: model._modules.pop(name) for name in ("token_heads", "position_head")
                       if name in model._modules}   # training-only heads are not the model's
        try:
            model.save_pretrained(directory, safe_serialization=True)
        finally:
            for name, module in scaffolding.items():
                setattr(model, name, module)
    for item in Path(tokenizer_dir).iterdir():
        if item.name in TOKENIZER_FILES:
            shutil.copy2(item, directory / item.name)
    return directory


def export_initial_model(config: TrainConfig, directory: str | Path) -> Path:
    """Export the model exactly as a run of ``config`` starts it — seeded initialisation, then ``init_from`` if
    set — without training: the "step 0" of a run, for comparing its start with its end."""
    tokenizer, tokenizer_dir = _tokenizer_for(config)
    return export_model(initial_model(config, tokenizer).eval(), tokenizer_dir, directory)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


PROG = "python -m navil_utils.train"


def main(argv: list[str] | None = None) -> int:
    """Train from the command line: a bad option or configuration exits with 2, an error found while
    running (a corrupt checkpoint, a run directory holding another run) with 1 — each as one line."""
    from navil_utils.cli import EXIT_USAGE, ArgumentParser, positive_float, report_error
    from navil_utils.errors import NaViLError

    parser = ArgumentParser(prog=PROG, description="Train the tiny NaViL on synthetic VQA (resumable).")
    parser.add_argument("--out", default="runs/navil-tiny", help="run directory (checkpoint, log, final model)")
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig options")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one option, e.g. --set total_steps=100 --set lr=3e-4")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--time-limit", type=positive_float, default=None, help="minutes before checkpoint-and-stop")
    parser.add_argument("--ship", default=None, help="copy the final model to this directory when training ends")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--export-checkpoint", default=None, metavar="DIR",
                        help="do not train: export the last checkpoint of --out to DIR as a loadable model")
    parser.add_argument("--export-init", default=None, metavar="DIR",
                        help="do not train: export the model as this run would start (step 0) to DIR")
    args = parser.parse_args(argv)
    if args.export_checkpoint:
        try:
            exported = export_checkpoint(args.out, args.export_checkpoint)
        except (NaViLError, OSError) as error:
            return report_error(PROG, error)
        print(f"exported step {json.loads((exported / 'trainer_step.json').read_text())['step']} of {args.out} "
              f"-> {exported}")
        return 0
    values: dict[str, Any] = {}
    if args.config:
        try:
            loaded = json.loads(Path(args.config).read_text())
        except OSError as error:
            parser.error(f"--config {args.config}: {error.strerror or error}")
        except json.JSONDecodeError as error:
            parser.error(f"--config {args.config} is not valid JSON: {error}")
        if not isinstance(loaded, dict):
            parser.error(f"--config {args.config} must hold a JSON object of TrainConfig options")
        values.update(loaded)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            parser.error(f"--set expects KEY=JSON, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    values["out"] = args.out
    if args.device:
        values["device"] = args.device
    if args.time_limit is not None:
        values["time_limit_minutes"] = args.time_limit
    if args.no_progress:
        values["progress"] = False
    try:
        config = TrainConfig.from_dict(values)
        if args.export_init:
            exported = export_initial_model(config, args.export_init)
        else:
            out = train(config)
    except ConfigError as error:  # a bad option: the message names it
        report_error(PROG, error)
        return EXIT_USAGE
    except (NaViLError, OSError) as error:  # found while running; the message names the file
        return report_error(PROG, error)
    if args.export_init:
        print(f"exported the initial model of {args.out} -> {exported}")
        return 0
    if args.ship:
        ship = Path(args.ship)
        ship.mkdir(parents=True, exist_ok=True)
        for item in (out / "final").iterdir():
            shutil.copy2(item, ship / item.name)
        print(f"shipped {out / 'final'} -> {ship}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
