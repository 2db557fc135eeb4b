"""Command line for chapter 04's attention statistics of one tiny checkpoint on SyntheticVQA questions.

``python -m navil_utils.tiny.attention_statistics --model DIR --out DIR --label NAME --example-index I`` records the
statistics of :mod:`navil_utils.analysis.attention_comparison` with the chapter's settings and writes them where
:meth:`~navil_utils.analysis.attention_comparison.AttentionStatistics.load` reads them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from navil_utils.analysis.attention_comparison import attention_statistics, model_meta


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m navil_utils.tiny.attention_statistics",
                                     description="Chapter 04's attention statistics of one checkpoint, written to a "
                                                 "directory (statistics.csv, example_attention.safetensors, meta.json).")
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--label", required=True, help="how figures name this model")
    parser.add_argument("--data-seed", type=int, default=123, help="SyntheticVQA seed of the questions")
    parser.add_argument("--n-questions", type=int, default=400)
    parser.add_argument("--example-index", type=int, required=True, help="SyntheticVQA index of the example prompt")
    parser.add_argument("--locality-questions", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--n-boot", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    import navil_utils
    from navil_utils.tiny.synthetic import SyntheticVQA

    args = _parse(argv)
    navil_utils.setup_notebook(seed=args.seed, threads=args.threads)
    model, tokenizer = navil_utils.load_chat_model(args.model)
    model.eval()
    data = SyntheticVQA(args.data_seed)
    samples = [data.sample(i) for i in range(args.n_questions)]
    meta = {"data_seed": args.data_seed, "n_questions": args.n_questions, "example_index": args.example_index,
            "locality_questions": args.locality_questions, "batch_size": args.batch_size, "n_boot": args.n_boot,
            "seed": args.seed, **model_meta(model)}
    stats = attention_statistics(model, tokenizer, samples, data.sample(args.example_index), label=args.label,
                                 batch_size=args.batch_size, locality_questions=args.locality_questions,
                                 n_boot=args.n_boot, seed=args.seed, meta=meta)
    out = stats.save(args.out)
    print(f"wrote {out}")
    print(stats.summary().round(3).to_string())


if __name__ == "__main__":
    main()
