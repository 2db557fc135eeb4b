"""Overhead of the scaling sweep: one sweep run vs a plain training loop, and Ray vs the local pool.

    .venv/bin/python benchmarks/sweep_throughput.py [--samples 4096] [--rounds 2]

1. **One run.**  The same model (LLM 64×2, ViT 64×2, the grid's smallest row) on the same batches:
   (a) a plain loop — build the model, then forward/backward/AdamW step on ``StepBatches`` and nothing
   else; (b) the sweep — ``run_sweep([run], workers=2)`` in a fresh process pool, which trains through
   the project's trainer (logging, one evaluation of one batch at the end, checkpoints at the budget,
   export), counts parameters and appends the JSON record.  Training samples/s of each over its
   whole wall time (process start, imports and model construction included for the sweep; only the
   loop for the plain run; the trainer's own clock, which excludes start-up, is printed too), alternated
   ``rounds`` times, best of each.  Target: sweep ≥ 0.95× plain during training.
2. **Backends.**  The same 4 short runs with ``backend="local"`` (2 worker processes) and
   ``backend="ray"`` (a local Ray started by the sweep, 2 CPUs): wall time of the whole sweep and the
   ratio; Ray includes starting and stopping its cluster.

Both use one torch thread per run, as the sweep does.  Prints a table and the ratios; the numbers
depend on the machine (run it on an otherwise idle one).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from navil_utils.tiny.sweep import ScalingRun, run_sweep


def plain_loop(run: ScalingRun, workdir: Path) -> float:
    """Samples/s of a bare training loop on the sweep run's model and batches."""
    from navil_utils.tiny.tokenizer import load_tiny_tokenizer
    from navil_utils.tiny.train import StepBatches, build_model
    from navil_utils.paths import repo_root

    torch.set_num_threads(1)
    tokenizer_dir = repo_root() / "data" / "models" / "navil-tiny"
    config = run.train_config(workdir / "plain", tokenizer_dir)
    tokenizer = load_tiny_tokenizer(tokenizer_dir)
    model = build_model(config, tokenizer).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=run.lr, betas=config.betas, weight_decay=config.weight_decay)
    batches = StepBatches(config, tokenizer)
    start = time.perf_counter()
    for step in range(config.total_steps):
        loss = model(**batches[step].model_inputs()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
    return run.samples[-1] / (time.perf_counter() - start)


def sweep_once(runs: list[ScalingRun], workdir: Path, backend: str, workers: int) -> tuple[float, list[dict]]:
    """Wall seconds of a fresh sweep of ``runs``, and its records."""
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.perf_counter()
    records = run_sweep(runs, workdir / "results.jsonl", out_root=workdir / "runs", workers=workers,
                        backend=backend, progress=False)
    return time.perf_counter() - start, records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4096, help="training samples of the one-run comparison")
    parser.add_argument("--short-samples", type=int, default=256, help="samples of each of the 4 backend runs")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    common = dict(llm_width=64, llm_layers=2, vit_width=64, vit_layers=2, batch_size=16, warmup_samples=256,
                  lr=4e-3, eval_batches=1, study="bench")
    run = ScalingRun(samples=(args.samples,), **common)
    short = [ScalingRun(samples=(args.short_samples,), seed=seed, **{**common, "llm_width": width})
             for width in (64, 128) for seed in (0, 1)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, swept, in_trainer = [], [], []
        for _ in range(args.rounds):
            plain.append(plain_loop(run, tmp))
            # workers=2 runs the single run in a spawned worker process, as a real sweep does
            wall, (record,) = sweep_once([run], tmp / "one", "local", workers=2)
            swept.append(args.samples / wall)
            in_trainer.append(args.samples / record["train_seconds"])
        local, ray = [], []
        for _ in range(args.rounds):
            local.append(sweep_once(short, tmp / "local", "local", workers=2)[0])
            ray.append(sweep_once(short, tmp / "ray", "ray", workers=2)[0])
    print(f"one run of {args.samples} samples (LLM 64x2, ViT 64x2), best of {args.rounds}:")
    print(f"  plain loop       {max(plain):8.1f} samples/s   (rounds: {', '.join(f'{v:.1f}' for v in plain)})")
    print(f"  sweep, training  {max(in_trainer):8.1f} samples/s   (the trainer's own clock: eval + checkpoints + logging)")
    print(f"  sweep, end to end{max(swept):8.1f} samples/s   (+ process start, imports, model build, record)")
    print(f"  ratio training   {max(in_trainer) / max(plain):8.3f}   (target >= 0.95)")
    print(f"  ratio end to end {max(swept) / max(plain):8.3f}   (fixed start-up cost: shrinks with the run's length)")
    print(f"4 runs of {args.short_samples} samples (LLM 64/128 x 2 seeds), 2 workers, best of {args.rounds}:")
    print(f"  local pool       {min(local):8.1f} s   (rounds: {', '.join(f'{v:.1f}' for v in local)})")
    print(f"  ray              {min(ray):8.1f} s   (rounds: {', '.join(f'{v:.1f}' for v in ray)})")
    print(f"  ray / local      {min(ray) / min(local):8.3f}   (wall-time ratio; > 1 = Ray slower)")


if __name__ == "__main__":
    main()
