"""Train the embedded tiny NaViL natively on the synthetic VQA task (``make train-tiny``).

    python -m navil_utils.train --out runs/navil-tiny                       # CPU, the default
    python -m navil_utils.train --out runs/navil-tiny --device cuda         # bf16 autocast on a GPU
    python -m navil_utils.train --out runs/navil-tiny --ship data/models/navil-tiny

The whole NaViL is trained from scratch with the project's own classes: the ViT (2-D RoPE, packed
multi-scale input exactly as at inference), the pixel-shuffle connector and the Qwen3-VE decoder with
modality experts.  The loss is the cross-entropy on answer tokens (and the closing ``<|im_end|>``).

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
step; re-running the same command continues where a killed run stopped, bit for bit.  ``<out>/log.jsonl``
gets one JSON line per logged step and per evaluation.
"""
from __future__ import annotations

import argparse
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

from navil_utils.constants import TINY_MAX_PIXELS, TINY_MIN_PIXELS
from navil_utils.errors import ConfigError
from navil_utils.models.presets import TINY_SYSTEM_MESSAGE, tiny_model_config
from navil_utils.tiny.checkpointing import (
    load_checkpoint,
    recover_checkpoint,
    save_checkpoint,
)

#: Curriculum: ``(start_fraction, {question type: weight})``; a stage runs until the next one starts.
#: Easy, fast-learning types first (colour, count), then geometry, then text reading, then all mixed.
DEFAULT_CURRICULUM: tuple[tuple[float, dict[str, float]], ...] = (
    (0.00, {"color": 1.0, "count": 1.0}),
    (0.10, {"color": 1.0, "count": 1.0, "position": 1.0, "relation": 1.0}),
    (0.25, {"color": 1.0, "count": 1.0, "position": 1.0, "relation": 1.0, "text": 2.0}),
    (0.45, {"color": 1.0, "count": 1.5, "position": 1.5, "relation": 1.0, "text": 2.5}),
)


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
    log_every: int = 50
    eval_every: int = 1000
    eval_batches: int = 8
    checkpoint_every: int = 500
    time_limit_minutes: float | None = None   # checkpoint and stop after this much wall time
    device: str = "cpu"
    bf16: bool | None = None           # autocast; None = on for CUDA, off on CPU
    threads: int | None = None
    num_workers: int = 0
    model: dict[str, Any] = field(default_factory=dict)     # overrides of tiny_model_config()
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
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown training options {unknown}")
        values = dict(values)
        if "curriculum" in values:
            values["curriculum"] = tuple((float(s), dict(w)) for s, w in values["curriculum"])
        if "betas" in values:
            values["betas"] = tuple(values["betas"])
        return cls(**values)


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
        self.collator = TinyCollator(tokenizer, min_pixels=config.min_pixels, max_pixels=config.max_pixels,
                                     qa_packing=config.qa_packing, pad_to_multiple_of=8)

    def __len__(self) -> int:
        return self.config.total_steps

    def __getitem__(self, step: int):
        data = self.stages[curriculum_stage(self.config, step)]
        b = self.config.batch_size
        return self.collator([data.sample(step * b + j) for j in range(self.rank, b, self.world)])


def build_model(config: TrainConfig, tokenizer: Any):
    """A freshly initialised tiny NaViL sized by ``config.model`` for ``tokenizer``.

    The initialisation is seeded with ``config.seed`` on a forked RNG: the caller's RNG state is unchanged.
    """
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
        return NaViLForConditionalGeneration(cfg)


def _tokenizer_for(config: TrainConfig):
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer, train_tiny_tokenizer

    directory = Path(config.tokenizer or Path(config.out) / "tokenizer")
    if not (directory / "tokenizer.json").exists():
        train_tiny_tokenizer(directory)
    return load_tiny_tokenizer(directory), directory


def _autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast on CUDA (default) or when ``bf16`` is forced; a no-op context otherwise."""
    enabled = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


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


def _truncate_log(path: Path, step: int) -> None:
    """Drop log records after ``step`` (they are redone after resuming from that checkpoint)."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def train(config: TrainConfig, *, _simulate_kill_after: int | None = None) -> Path:
    """Run (or resume) training; return the output directory.

    The caller's global state is left as it was: torch's RNG is forked for the run (model init, dropout;
    the run's own RNG state is saved in every checkpoint and restored on resume) and the intra-op thread
    count is restored afterwards.

    ``_simulate_kill_after`` (tests only) stops dead after that many steps of this session, without a
    final checkpoint or export — like ``kill -9`` — so that resuming from the last periodic checkpoint
    can be checked against an uninterrupted run.
    """
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

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64)."""
        if self.accelerator is None:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()


def _train(config: TrainConfig, _simulate_kill_after: int | None) -> Path:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "train_config.json"
    if config_path.exists():
        saved = TrainConfig.from_dict(json.loads(config_path.read_text()))
        comparable = lambda c: {k: v for k, v in json.loads(c.to_json()).items()  # noqa: E731
                                if k not in {"device", "threads", "num_workers", "time_limit_minutes", "progress", "bf16"}}
        if comparable(saved) != comparable(config):
            raise ConfigError(f"{out} holds a run with a different configuration ({config_path}); "
                              "use another --out or the same options to resume")
    config_path.write_text(config.to_json())
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    parallel = DataParallel(device)
    if config.batch_size % parallel.world:
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the {parallel.world} data-parallel processes")
    with parallel.main_process_first():  # a missing tokenizer is trained once, by process 0
        tokenizer, tokenizer_dir = _tokenizer_for(config)
    model = build_model(config, tokenizer)
    torch.manual_seed(config.seed)  # the run's own RNG stream (forked by train(); saved in checkpoints)
    if config.init_from and not recover_checkpoint(out / "checkpoint"):
        from safetensors.torch import load_file

        model.load_state_dict(load_file(Path(config.init_from) / "model.safetensors"), strict=True)
    model = model.to(device)
    model.train()
    exempt = no_weight_decay(model)  # names of the unwrapped model; the optimiser holds the same tensors
    decay = [p for n, p in model.named_parameters() if n not in exempt]
    no_decay = [p for n, p in model.named_parameters() if n in exempt]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.lr, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(config, s))
    checkpoint_dir = out / "checkpoint"
    state = {"step": 0, "samples": 0, "elapsed_seconds": 0.0}
    if recover_checkpoint(checkpoint_dir):
        state = load_checkpoint(checkpoint_dir, model, optimizer, scheduler)
        if parallel.is_main:
            _truncate_log(out / "log.jsonl", state["step"])
            print(f"resuming {out} at step {state['step']} ({state['elapsed_seconds'] / 60:.1f} min trained)", flush=True)
    elif parallel.is_main:  # a run killed before its first checkpoint starts again from step 0: drop its log records
        _truncate_log(out / "log.jsonl", 0)
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

    log = (out / "log.jsonl").open("a") if parallel.is_main else open(os.devnull, "w")  # noqa: SIM115
    progress = None
    if config.progress and parallel.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=config.total_steps, initial=state["step"], dynamic_ncols=True, file=sys.stderr)
    start_wall = time.perf_counter() - state["elapsed_seconds"]
    session_start = time.perf_counter()
    window_loss, window_correct, window_total = 0.0, 0, 0
    stopped_early = False
    first_step = state["step"]

    def checkpoint() -> None:
        state["elapsed_seconds"] = time.perf_counter() - start_wall
        if parallel.is_main:
            save_checkpoint(checkpoint_dir, module, optimizer, scheduler, state)

    from navil_utils.tiny.data import qa_exact_match

    for batch in loader:
        step = state["step"]
        batch = batch.to(device)
        with _autocast(device, config.bf16):
            out_ = model(**batch.model_inputs())
        loss = out_.loss  # mean over this process's answer tokens
        local_tokens = batch.num_answer_tokens
        answer_tokens = parallel.sum([local_tokens])[0] if parallel.world > 1 else local_tokens
        optimizer.zero_grad(set_to_none=True)
        # weight so that the gradient DDP averages over processes is that of the mean over all answer tokens
        parallel.backward(loss * (local_tokens * parallel.world / answer_tokens) if parallel.world > 1 else loss)
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
            log.write(json.dumps(record) + "\n")
            log.flush()
            if progress is not None:
                progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['train_acc']:.2f}",
                                     stage=record["stage"])
            window_loss, window_correct, window_total = 0.0, 0, 0
        if eval_set and (state["step"] % config.eval_every == 0 or state["step"] == config.total_steps):
            record = {"step": state["step"], "samples": state["samples"], **evaluate_teacher_forced(module, eval_set, device, config.bf16)}
            log.write(json.dumps(record) + "\n")
            log.flush()
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
    checkpoint()
    if progress is not None:
        progress.close()
    log.close()
    if parallel.is_main:
        export_model(module, tokenizer_dir, out / "final")
    if stopped_early:
        print(f"time limit reached at step {state['step']}/{config.total_steps}; re-run the same command to resume", flush=True)
    return out


def export_model(model, tokenizer_dir: str | Path, directory: str | Path) -> Path:
    """Save a loadable checkpoint: config.json, model.safetensors, tokenizer, generation_config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ids = model.special_token_ids or {}
    generation = model.generation_config
    generation.do_sample, generation.max_new_tokens = False, 8
    if "<|im_end|>" in ids:
        generation.eos_token_id = ids["<|im_end|>"]
    generation.pad_token_id = 0
    model.save_pretrained(directory, safe_serialization=True)
    for item in Path(tokenizer_dir).iterdir():
        if item.name in TOKENIZER_FILES:
            shutil.copy2(item, directory / item.name)
    return directory


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the tiny NaViL on synthetic VQA (resumable).")
    parser.add_argument("--out", default="runs/navil-tiny", help="run directory (checkpoint, log, final model)")
    parser.add_argument("--config", default=None, help="JSON file of TrainConfig options")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="override one option, e.g. --set total_steps=100 --set lr=3e-4")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    parser.add_argument("--time-limit", type=float, default=None, help="minutes before checkpoint-and-stop")
    parser.add_argument("--ship", default=None, help="copy the final model to this directory when training ends")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        values.update(json.loads(Path(args.config).read_text()))
    for item in args.set:
        key, _, raw = item.partition("=")
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
    config = TrainConfig.from_dict(values)
    out = train(config)
    if args.ship:
        ship = Path(args.ship)
        ship.mkdir(parents=True, exist_ok=True)
        for item in (out / "final").iterdir():
            shutil.copy2(item, ship / item.name)
        print(f"shipped {out / 'final'} -> {ship}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
