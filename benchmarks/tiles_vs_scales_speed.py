"""Training and inference time of the tiny NaViL (multi-scale) and the tiny NVLM-D (tiles), measured alike.

    .venv/bin/python benchmarks/tiles_vs_scales_speed.py --navil DIR --nvlm-d DIR [--rounds 3] [--json OUT]

The comparison runs (``navil_utils.tiny.compare``) record each run's own training wall time, but those runs
did not share the machine alike (one ran next to other work).  This script measures both architectures in
one process, alternating, on the same machine state:

1. **Training step.**  Each model built exactly as its comparison run (``configs/nvlm_d/compare.json``), the
   same late (full-mix) batches of the training stream: collating the batch (images → patches/tiles,
   prompts → ids) and forward + backward + AdamW step, timed separately, ``--steps`` steps per round,
   architectures alternated for ``--rounds`` rounds; the median step of each is reported.
2. **Inference.**  Greedy answers (``evaluate_model``, batch 50) to the first ``--questions`` held-out
   questions with each *trained* checkpoint (``--navil`` / ``--nvlm-d``: the comparison runs' exported
   models), alternated, median seconds per question.  Skipped for a model not given.

Threads: the spec's (2).  Prints a table and the ratios NVLM-D / NaViL; ``--json`` also writes them.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from navil_utils.paths import repo_root
from navil_utils.tiny.compare import expand_spec
from navil_utils.tiny.sweep import _machine


def training_models(spec: dict, workdir: Path):
    """Per architecture: (model, optimizer, batches, config) built as the comparison run of seed 0 builds them."""
    from navil_utils.tiny.train import StepBatches, _tokenizer_for, build_model

    built = {}
    for run in expand_spec(spec):
        if run.seed != 0:
            continue
        config = run.train_config(workdir / run.run_id)
        tokenizer, _ = _tokenizer_for(config)  # NVLM-D's tokenizer is the tiny one plus its tile tokens
        model = build_model(config, tokenizer).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                      weight_decay=config.weight_decay)
        built[run.architecture] = (model, optimizer, StepBatches(config, tokenizer), config)
    return built


def time_steps(model, optimizer, batches, config, steps: list[int]) -> tuple[list[float], list[float]]:
    """Seconds per step spent collating and in forward/backward/optimizer step."""
    collate, compute = [], []
    for step in steps:
        start = time.perf_counter()
        batch = batches[step]
        middle = time.perf_counter()
        loss = model(**batch.model_inputs()).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        collate.append(middle - start)
        compute.append(time.perf_counter() - middle)
    return collate, compute


def time_inference(model_dir: Path, samples: list) -> tuple[float, float]:
    """Seconds per question of greedy answering, and the accuracy (as a check that the model is the trained one)."""
    from navil_utils.tiny.evaluate import evaluate_model, load_eval_model

    model, tokenizer = load_eval_model(model_dir)
    model.eval()
    evaluate_model(model, tokenizer, samples=samples[:2], batch_size=2)  # warm-up, untimed
    start = time.perf_counter()
    result = evaluate_model(model, tokenizer, samples=samples, batch_size=50)
    return (time.perf_counter() - start) / len(samples), result.overall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=repo_root() / "configs" / "nvlm_d" / "compare.json")
    parser.add_argument("--navil", type=Path, default=None, help="trained tiny NaViL checkpoint (inference timing)")
    parser.add_argument("--nvlm-d", type=Path, default=None, help="trained tiny NVLM-D checkpoint (inference timing)")
    parser.add_argument("--steps", type=int, default=6, help="training steps per architecture and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    from navil_utils.workbook.quiet import quiet_libraries

    quiet_libraries()
    spec = json.loads(args.spec.read_text())
    torch.set_num_threads(int(spec.get("threads", 2)))
    total_steps = spec["samples"] // spec["batch_size"]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        built = training_models(spec, Path(tmp))
        for model, optimizer, batches, config in built.values():  # warm-up step (allocations, kernels), untimed
            time_steps(model, optimizer, batches, config, [total_steps // 2])
        collate = {a: [] for a in built}
        compute = {a: [] for a in built}
        for round_index in range(args.rounds):
            steps = [total_steps - 1 - round_index * args.steps - k for k in range(args.steps)]
            for architecture, (model, optimizer, batches, config) in built.items():
                c, s = time_steps(model, optimizer, batches, config, steps)
                collate[architecture] += c
                compute[architecture] += s
        for architecture in built:
            results[architecture] = {"collate_s_per_step": statistics.median(collate[architecture]),
                                     "compute_s_per_step": statistics.median(compute[architecture]),
                                     "steps_timed": len(compute[architecture])}
    from navil_utils.tiny.synthetic import QUESTION_TYPES, SyntheticVQA

    run = expand_spec(spec)[0]
    data = SyntheticVQA(seed=int(run.eval["seed"]), question_types=QUESTION_TYPES)
    samples = [data.sample(i) for i in range(args.questions)]
    checkpoints = {a: d for a, d in (("navil", args.navil), ("nvlm_d", args.nvlm_d)) if d is not None}
    seconds = {a: [] for a in checkpoints}
    for _ in range(args.rounds):
        for architecture, directory in checkpoints.items():
            per_question, accuracy = time_inference(directory, samples)
            seconds[architecture].append(per_question)
            results[architecture]["accuracy_first_questions"] = accuracy
    for architecture, values in seconds.items():
        results[architecture]["inference_s_per_question"] = statistics.median(values)
    print(f"{'':8} {'collate s/step':>15} {'fwd+bwd+step s':>15} {'total s/step':>13} {'infer ms/question':>18}")
    for architecture, r in results.items():
        infer = r.get("inference_s_per_question")
        print(f"{architecture:8} {r['collate_s_per_step']:15.3f} {r['compute_s_per_step']:15.3f} "
              f"{r['collate_s_per_step'] + r['compute_s_per_step']:13.3f} "
              f"{'' if infer is None else f'{1000 * infer:18.1f}'}")
    ratios = {}
    if {"navil", "nvlm_d"} <= results.keys():
        a, b = results["navil"], results["nvlm_d"]
        ratios["train_step"] = ((b["collate_s_per_step"] + b["compute_s_per_step"])
                                / (a["collate_s_per_step"] + a["compute_s_per_step"]))
        if "inference_s_per_question" in a and "inference_s_per_question" in b:
            ratios["inference"] = b["inference_s_per_question"] / a["inference_s_per_question"]
        print("NVLM-D / NaViL: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if args.json:
        record = {"results": results, "ratios_nvlm_d_over_navil": ratios, "threads": torch.get_num_threads(),
                  "steps_per_round": args.steps, "rounds": args.rounds, "questions": args.questions,
                  "machine": _machine("cpu"),
                  "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        args.json.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
