"""Scaling sweeps in miniature: many small NaViLs trained on the synthetic captions, one JSON line per run.

A sweep is a list of :class:`ScalingRun` specs (LLM width × depth, ViT width × depth, learning rate,
seed, data budgets).  Every run trains the same NaViL architecture as the embedded model (multi-scale ViT,
pixel-shuffle connector, Qwen3-VE decoder with modality experts) from scratch on caption-only data
(``Describe the image.`` → the scene's caption), with a warm-up and then a **constant** learning rate,
and is evaluated at each data budget on the same held-out captions: several budgets come from one run
as evaluated checkpoints of a constant schedule (no cool-down branches), which the analysis states.

    runs = expand_grid({"llm": [[64, 2], [128, 2]], "vit": [[32, 2], [64, 2]], "samples": [4096, 8192]})
    run_sweep(runs, "data/scaling/demo.jsonl", workers=2)

Results are appended to a JSONL file when a run finishes (one line, flushed and synced); a sweep that
is killed resumes where it stopped: finished runs are skipped, an interrupted run resumes from its last
checkpoint (``<out_root>/<run_id>/``), and a torn last line is dropped — nothing is lost or duplicated.
Runs execute in a local process pool (``backend="local"``) or as Ray tasks (``backend="ray"``,
optional dependency, ``address`` for an existing cluster).

Command line::

    python -m navil_utils.tiny.sweep configs/scaling/<grid>.json --results data/scaling/<grid>.jsonl --workers 2
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from navil_utils.errors import ConfigError

#: Head dimension of every sweep model (heads = width / 32): widths must be multiples of 32.
HEAD_DIM = 32


@dataclass(frozen=True)
class ScalingRun:
    """One training run of a sweep.

    Widths must be multiples of :data:`HEAD_DIM`; the LLM's MLP is 4× its width with half as many
    key/value heads as query heads (at least one), the ViT's MLP 4× its width.  ``samples`` are the data
    budgets (training samples seen) at which the held-out caption loss is recorded; the run trains to the
    largest one.  ``visual_experts=False`` trains a dense LLM (same active parameters, no visual experts);
    ``text_pretrain_samples > 0`` first trains the LLM alone on that many caption texts (see
    :mod:`navil_utils.tiny.text_pretraining`) and starts the multimodal run from it.
    """

    llm_width: int
    llm_layers: int
    vit_width: int
    vit_layers: int
    samples: tuple[int, ...]
    lr: float = 1e-3
    seed: int = 0
    batch_size: int = 16
    warmup_samples: int = 1024
    eval_batches: int = 8
    study: str = "grid"
    visual_experts: bool = True        # False: dense LLM (the modality-experts ablation, paper Fig. 3)
    text_pretrain_samples: int = 0     # > 0: LLM initialised from a text-only LM on this many captions (Fig. 2)

    def __post_init__(self) -> None:
        for name in ("llm_width", "vit_width"):
            if getattr(self, name) % HEAD_DIM or getattr(self, name) <= 0:
                raise ConfigError(f"{name}={getattr(self, name)} must be a positive multiple of {HEAD_DIM}")
        if self.text_pretrain_samples < 0:
            raise ConfigError(f"text_pretrain_samples must be >= 0, got {self.text_pretrain_samples}")
        if not self.samples or any(s % self.batch_size for s in self.samples):
            raise ConfigError(f"budgets {self.samples} must be non-empty multiples of batch_size={self.batch_size}")
        object.__setattr__(self, "samples", tuple(sorted(int(s) for s in self.samples)))

    @property
    def run_id(self) -> str:
        """Readable and unique within a sweep: every field that changes the result is in it."""
        variant = ("" if self.visual_experts else "-dense") + (
            f"-textinit{self.text_pretrain_samples}" if self.text_pretrain_samples else "")
        return (f"{self.study}-llm{self.llm_width}x{self.llm_layers}-vit{self.vit_width}x{self.vit_layers}{variant}"
                f"-lr{self.lr:g}-bs{self.batch_size}-n{self.samples[-1]}-s{self.seed}")

    def model_overrides(self) -> dict[str, Any]:
        llm_heads, vit_heads = self.llm_width // HEAD_DIM, self.vit_width // HEAD_DIM
        return {"llm_width": self.llm_width, "llm_layers": self.llm_layers, "llm_heads": llm_heads,
                "llm_kv_heads": max(1, llm_heads // 2), "llm_intermediate": 4 * self.llm_width,
                "vit_width": self.vit_width, "vit_layers": self.vit_layers, "vit_heads": vit_heads,
                **({} if self.visual_experts else {"visual_experts": False})}

    def train_config(self, out: str | os.PathLike, tokenizer: str | os.PathLike, device: str = "cpu",
                     init_from: str | os.PathLike | None = None):
        """The :class:`~navil_utils.tiny.train.TrainConfig` of this run (captions only, constant lr)."""
        import math

        from navil_utils.tiny.train import TrainConfig

        steps = [s // self.batch_size for s in self.samples]
        every = math.gcd(*steps)
        return TrainConfig(
            out=str(out), seed=self.seed, total_steps=steps[-1], batch_size=self.batch_size, lr=self.lr,
            min_lr_ratio=1.0, warmup_steps=max(1, self.warmup_samples // self.batch_size),
            curriculum=((0.0, {"caption": 1.0}),), log_every=every, eval_every=every,
            eval_batches=self.eval_batches, checkpoint_every=every, device=device, threads=1, num_workers=0,
            model=self.model_overrides(), tokenizer=str(tokenizer), progress=False,
            init_from=None if init_from is None else str(init_from))


def expand_grid(spec: dict[str, Any]) -> list[ScalingRun]:
    """Runs of a grid spec: ``llm`` and ``vit`` lists of ``[width, layers]``, ``samples`` (budgets),
    optional ``lrs`` / ``seeds`` lists (or single ``lr`` / ``seed``) and any other :class:`ScalingRun` field
    as a shared value.  A spec may also list explicit ``runs`` (dicts of fields): each is repeated for every
    seed and takes the shared values unless it sets its own."""
    spec = dict(spec)
    explicit = spec.pop("runs", None)
    llms, vits = spec.pop("llm", None), spec.pop("vit", None)
    lrs, seeds = spec.pop("lrs", [spec.pop("lr", 1e-3)]), spec.pop("seeds", [spec.pop("seed", 0)])
    known = {f.name for f in dataclasses.fields(ScalingRun)}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ConfigError(f"unknown sweep options {unknown}")
    runs = []
    if explicit is not None:  # explicit runs take the shared lr unless they set one, and every seed
        runs += [ScalingRun(**{**spec, "lr": lrs[0], "seed": seed, **run}) for run in explicit for seed in seeds]
    if llms is not None or vits is not None:
        if not llms or not vits:
            raise ConfigError("a grid needs both 'llm' and 'vit' lists of [width, layers]")
        for (lw, ll), (vw, vl), lr, seed in ((a, b, c, d) for a in llms for b in vits for c in lrs for d in seeds):
            runs.append(ScalingRun(llm_width=lw, llm_layers=ll, vit_width=vw, vit_layers=vl, lr=lr, seed=seed,
                                   **spec))
    ids = [r.run_id for r in runs]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"the sweep lists the same run twice: {duplicates}")
    return runs


# ---------------------------------------------------------------------------------------------------
# one run
@functools.lru_cache(maxsize=1)
def _git_commit() -> str | None:
    """``HEAD`` of the workbook checkout, with ``+dirty`` when tracked files differ from it.

    Read once per process, when its first run starts (right after the process imported the code): a
    commit made while a sweep is running does not describe the code its workers already loaded.
    """
    from navil_utils.paths import repo_root

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo_root(),
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def _machine(device: str) -> str:
    """What ran the run: the GPU's name, or the CPU model and its core count."""
    import platform

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def execute_run(run: ScalingRun, out_root: str | os.PathLike, device: str = "cpu") -> dict[str, Any]:
    """Train (or resume) one run and return its result record (parameters, budgets, losses, time)."""
    import torch

    from navil_utils.analysis.parameters import count_parameters
    from navil_utils.tiny.train import build_model, train
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer
    from navil_utils.paths import repo_root
    from navil_utils.workbook.quiet import quiet_libraries

    quiet_libraries()  # no per-run progress bars in the sweep's log
    tokenizer_dir = repo_root() / "data" / "models" / "navil-tiny"
    out = Path(out_root) / run.run_id
    commit = _git_commit()  # the code this process runs (cached from its first run)
    start = time.perf_counter()
    pretraining = _text_pretrained_init(run, out, tokenizer_dir) if run.text_pretrain_samples else None
    config = run.train_config(out, tokenizer_dir, device, init_from=out / "text_init" if pretraining else None)
    train(config)
    wall = time.perf_counter() - start
    counts = count_parameters(build_model(config, load_tiny_tokenizer(tokenizer_dir)))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    evals = {r["samples"]: r for r in records if "eval_token_loss" in r}
    trains = {r["samples"]: r for r in records if "loss" in r}
    budgets = []
    for samples in run.samples:
        if samples not in evals:
            raise RuntimeError(f"run {run.run_id} has no evaluation at {samples} samples (log {out / 'log.jsonl'})")
        budgets.append({"samples": samples, "tokens": trains.get(samples, {}).get("tokens"),
                        "caption_tokens": trains.get(samples, {}).get("answer_tokens"),
                        "val_loss": evals[samples]["eval_token_loss"]})
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    return {
        "run_id": run.run_id, **dataclasses.asdict(run), "samples": list(run.samples),
        "params_total": counts.total, "params_active": counts.active, "params_encoder": counts.vision_encoder,
        "params_llm_active": counts.llm_active, "budgets": budgets, "val_loss": budgets[-1]["val_loss"],
        "train_seconds": round(float(state.get("elapsed_seconds", wall)), 1), "device": device,
        "machine": _machine(device),
        **({"text_pretraining": pretraining} if pretraining else {}),
        "torch": torch.__version__, "git_commit": commit,
    }


def _text_pretrained_init(run: ScalingRun, out: Path, tokenizer_dir: Path) -> dict[str, float]:
    """Write ``<out>/text_init/model.safetensors``: the run's fresh model with a text-pretrained LLM
    (visual experts copied from the text experts); reuse it when a resumed run already made it."""
    from safetensors.torch import save_file

    from navil_utils.tiny.data import TinyCollator
    from navil_utils.tiny.text_pretraining import copy_text_experts_to_visual, pretrain_language_model
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer
    from navil_utils.tiny.train import build_model

    directory = out / "text_init"
    summary_path = directory / "pretraining.json"
    if summary_path.exists():
        return json.loads(summary_path.read_text())
    tokenizer = load_tiny_tokenizer(tokenizer_dir)
    config = run.train_config(out, tokenizer_dir)
    model = build_model(config, tokenizer)
    collator = TinyCollator.from_model_config(model.config, tokenizer)
    summary = pretrain_language_model(model, collator, samples=run.text_pretrain_samples, seed=run.seed,
                                      lr=run.lr)
    if run.visual_experts:
        copy_text_experts_to_visual(model)
    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    temporary = directory / "model.safetensors.tmp"
    save_file(state, str(temporary))
    os.replace(temporary, directory / "model.safetensors")
    summary = {key: round(value, 4) for key, value in summary.items()}
    summary_path.write_text(json.dumps(summary))  # written last: marks the init as complete
    return summary


# ---------------------------------------------------------------------------------------------------
# results file
def read_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Finished runs of a results file; a torn last line (a sweep killed while writing) is removed."""
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines) - 1:
                raise ConfigError(f"{path}: line {number + 1} is not JSON (only a torn last line is repaired)")
            path.write_text("".join(f"{kept}\n" for kept in lines[:number]), encoding="utf-8")
    return records


def append_result(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record as a JSON line and sync it to disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------------------------------
# the sweep
def run_sweep(runs: Sequence[ScalingRun], results: str | os.PathLike, *, out_root: str | os.PathLike = "runs/scaling",
              workers: int = 1, backend: str = "local", address: str | None = None, device: str = "cpu",
              progress: bool = True) -> list[dict[str, Any]]:
    """Run every run not yet in ``results``; return all records of the sweep (old and new).

    ``backend="local"``: a process pool of ``workers`` processes (one torch thread each);
    ``backend="ray"``: one Ray task per run (``num_cpus=1``, one GPU each when ``device="cuda"``) on a local
    Ray started here, or on the cluster at ``address``.
    """
    if backend not in ("local", "ray"):
        raise ConfigError(f"backend must be 'local' or 'ray', got {backend!r}")
    done = {r["run_id"]: r for r in read_results(results)}
    todo = [r for r in runs if r.run_id not in done]
    bar = _progress(len(runs), len(runs) - len(todo), progress)
    finished = dict(done)
    try:
        for record in (_run_local(todo, out_root, workers, device) if backend == "local"
                       else _run_ray(todo, out_root, address, device)):
            append_result(results, record)
            finished[record["run_id"]] = record
            if bar is not None:
                bar.update(1)
                bar.write(f"{record['run_id']}: val loss {record['val_loss']:.4f} after "
                          f"{record['samples'][-1]} samples ({record['train_seconds']:.0f} s)")
    finally:
        if bar is not None:
            bar.close()
    return [finished[r.run_id] for r in runs if r.run_id in finished]


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="sweep", unit="run", file=sys.stderr, dynamic_ncols=True)


def _run_local(todo: Sequence[ScalingRun], out_root, workers: int, device: str) -> Iterable[dict[str, Any]]:
    if workers <= 1:
        for run in todo:
            yield execute_run(run, out_root, device)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(execute_run, run, out_root, device) for run in todo]
        for future in as_completed(futures):
            yield future.result()


def _run_ray(todo: Sequence[ScalingRun], out_root, address: str | None, device: str) -> Iterable[dict[str, Any]]:
    try:
        import ray
    except ImportError as err:
        raise ConfigError("backend='ray' needs the optional dependency: pip install 'navil-utils[sweep]'") from err
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=1, num_gpus=1 if device.startswith("cuda") else 0)(execute_run)
        pending = [task.remote(run, str(Path(out_root).resolve()), device) for run in todo]
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    finally:
        if started_here:
            ray.shutdown()


PROG = "python -m navil_utils.tiny.sweep"


def _grid_spec_file(text: str) -> tuple[str, dict[str, Any]]:
    """argparse type of the ``grid`` argument: an existing file holding a JSON object."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"no grid spec file at {path}")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a file (expected a JSON grid spec)")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise argparse.ArgumentTypeError(f"cannot read {path} ({err})") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError(f"{path} must hold a JSON object (a grid spec), not a {type(spec).__name__}")
    return str(path), spec


def _runs_of(path: str, spec: dict[str, Any]) -> list[ScalingRun]:
    """The runs of a grid spec read from ``path``; any malformed spec is a ConfigError naming the file."""
    try:
        runs = expand_grid(spec)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{path}: invalid grid spec ({type(err).__name__}: {err})") from err
    if not runs:
        raise ConfigError(f"{path}: the grid spec defines no runs (give 'llm' and 'vit' lists, or 'runs')")
    return runs


def main(argv: list[str] | None = None) -> int:
    """Run a sweep from the command line; the last stdout line of a successful run is a JSON summary.

    Bad arguments (missing grid file, invalid JSON, ``--workers 0``) exit with status 2, a
    :class:`~navil_utils.errors.NaViLError` (e.g. a grid spec that defines no runs) or an OS error
    with 1 — each with a one-line message on stderr.
    """
    from navil_utils.cli import ArgumentParser, positive_int, report_error, resolve_device, torch_device_or_auto
    from navil_utils.errors import NaViLError

    parser = ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("grid", type=_grid_spec_file, help="JSON grid spec (see expand_grid)")
    parser.add_argument("--results", required=True, help="JSONL file the finished runs are appended to")
    parser.add_argument("--out-root", default="runs/scaling", help="checkpoints and logs of each run")
    parser.add_argument("--workers", type=positive_int, default=1, help="parallel runs of the local backend (>= 1)")
    parser.add_argument("--backend", choices=("local", "ray"), default="local")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--device", type=torch_device_or_auto, default="auto",
                        help="cpu, cuda, or auto (cuda when a GPU is present)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.results).is_dir():
        parser.error(f"argument --results: {args.results} is a directory, expected a JSONL file")
    if Path(args.out_root).exists() and not Path(args.out_root).is_dir():
        parser.error(f"argument --out-root: {args.out_root} exists and is not a directory")
    grid_path, spec = args.grid
    try:
        runs = _runs_of(grid_path, spec)
        device = resolve_device(args.device)
        records = run_sweep(runs, args.results, out_root=args.out_root, workers=args.workers, backend=args.backend,
                            address=args.address, device=device, progress=not args.no_progress)
    except (NaViLError, OSError) as error:
        return report_error(PROG, error)
    print(json.dumps({"runs": len(runs), "finished": len(records), "results": str(args.results)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
