"""Latency of one greedy answer of the embedded tiny NaViL on one CPU core (target: <= 50 ms).

    .venv/bin/python benchmarks/answer_latency.py [--model data/models/navil-tiny] [--n 50]
    .venv/bin/python benchmarks/answer_latency.py --shape '{"patch_size": 8}' --max-new-tokens 1

Times the whole ``navil_utils.chat`` call — image loading aside: multi-scale preprocessing, prompt
building, tokenisation, ViT + LLM prefill and KV-cached greedy decoding until ``<|im_end|>`` — on
``n`` synthetic questions (seed 5, after 3 warm-up calls), and prints the median / p90 and the
ratio of the median to the 50 ms target.  Run it on an otherwise idle machine.

``--shape`` times an untrained model of another shape instead (JSON overrides of ``tiny_model_config``, e.g. 8-px
patches) — whether a shape fits the budget, before it is trained.  Its random weights do not stop at
``<|im_end|>``, so compare shapes with ``--max-new-tokens 1`` (image preprocessing, ViT, prefill, one token).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="data/models/navil-tiny")
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--target-ms", type=float, default=50.0)
    parser.add_argument("--shape", default=None, help="JSON overrides of tiny_model_config: time an untrained model")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from navil_utils.chatting import chat, load_chat_model
    from navil_utils.tiny.synthetic import SyntheticVQA
    from navil_utils.workbook.quiet import quiet_libraries

    quiet_libraries()
    if args.shape is not None:
        import json
        import tempfile

        from navil_utils.tiny.train import TrainConfig, _tokenizer_for, build_model, export_model

        config = TrainConfig(out=tempfile.mkdtemp(), model=json.loads(args.shape), tokenizer=args.model)
        tokenizer, tokenizer_dir = _tokenizer_for(config)
        args.model = str(export_model(build_model(config, tokenizer).eval(), tokenizer_dir, config.out + "/model"))
    model, tokenizer = load_chat_model(args.model)
    samples = [SyntheticVQA(seed=5).sample(i) for i in range(args.n + 3)]
    for s in samples[:3]:
        chat(model, tokenizer, s.image, s.question, max_new_tokens=args.max_new_tokens)
    times = []
    for s in samples[3:]:
        start = time.perf_counter()
        chat(model, tokenizer, s.image, s.question, max_new_tokens=args.max_new_tokens)
        times.append(1000 * (time.perf_counter() - start))
    median, p90 = statistics.median(times), statistics.quantiles(times, n=10)[-1]
    print(f"{args.n} answers ({args.shape or args.model}, at most {args.max_new_tokens} new tokens), 1 thread: "
          f"median {median:.1f} ms, p90 {p90:.1f} ms; "
          f"median / target = {median / args.target_ms:.2f} (target {args.target_ms:.0f} ms)")


if __name__ == "__main__":
    main()
