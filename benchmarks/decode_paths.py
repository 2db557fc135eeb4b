"""Decode speed of the workbook's generation paths against each other and against the machine's roofline.

For each LLM backbone a randomly initialised mid-sized NaViL (``generate_speed.MID_*``: ViT 256×4, LLM 512×6,
vocab 32k) decodes greedily after its golden fixture's image prompt. Measured in one process, alternating the
paths round by round (best of ``--rounds``), one decode step = ``(t(1 + N) − t(1)) / N``:

* float32 with transformers' ``DynamicCache`` (concatenates the cache every step — the former default)
  vs float32 with :class:`~navil_utils.models.fast_decode.PreallocatedCache`, both with PyTorch's default
  (row-major) weights, vs the default now: ``PreallocatedCache`` and wide weights stored column-major
  (:func:`~navil_utils.models.fast_decode.column_major_cpu_linears`);
* bfloat16 with PyTorch's default CPU kernels and layouts vs the default now: prepacked oneDNN linears
  (:func:`~navil_utils.models.fast_decode.pack_cpu_linears`) and float32 attention of the one-token steps
  (:func:`~navil_utils.models.fast_decode.cpu_decode_attention`);

next to the decode floor of each dtype: the bytes of text-path weights one step reads ÷ the float32
matrix-vector bandwidth measured in the same run (:mod:`navil_utils.analysis.roofline`). Greedy ids are
checked equal between the float32 paths; for bfloat16 the benchmark reports for how many tokens each path's
ids equal the float32 ids (random weights make near-ties common) and how far its logits are from float32's when
both decode the float32 tokens.

    python benchmarks/decode_paths.py                  # one thread
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from transformers.cache_utils import DynamicCache

from generate_speed import build_models
from navil_utils.analysis.roofline import decode_step_weight_bytes, measure_gemv_bandwidth
from navil_utils.models.fast_decode import PreallocatedCache


def _generate(model, inputs, tokens: int, cache_class):
    config = model.config.llm_config
    cache = DynamicCache(config=config) if cache_class is DynamicCache else PreallocatedCache(config.num_hidden_layers)
    out = model.generate(**inputs, cache=cache, max_new_tokens=tokens, do_sample=False)
    if out.shape[1] != inputs["input_ids"].shape[1] + tokens:          # (min_new_tokens would add logits processors)
        raise SystemExit(f"generation stopped early at {out.shape[1]} tokens: choose another --new-tokens")
    return out


def _agreeing_tokens(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading generated ids of ``a`` and ``b`` (batch 1) are equal."""
    differ = (a[0] != b[0]).nonzero()
    return int(differ[0]) if len(differ) else a.shape[1]


def _teacher_forced_error(model, inputs, ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over decode steps of the largest |logit - reference logit| when ``model`` decodes the given ``ids``
    (prompt first, then one token per step with its cache); ``reference``: float32 logits of all positions."""
    prompt = inputs["input_ids"].shape[1]
    cache = model(**inputs, use_cache=True).cache
    language = model.language_model
    language.cpu_decode_attention = model.cpu_decode_kernels     # as generate sets it
    errors = []
    for position in range(prompt, ids.shape[1]):
        step = language(inputs_embeds=language.embedding_module()(ids[:, position:position + 1]), cache=cache,
                        use_cache=True, logits_to_keep=1)
        errors.append((step.logits[0, -1].float() - reference[0, position]).abs().max().item())
    return sum(errors) / len(errors)


def _time(model, inputs, tokens: int, cache_class) -> float:
    start = time.perf_counter()
    _generate(model, inputs, tokens, cache_class)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    fp32, bf16 = build_models(cpu, torch.float32), build_models(cpu, torch.bfloat16)
    bandwidth = measure_gemv_bandwidth(torch.float32)
    print(f"threads={torch.get_num_threads()} new_tokens={args.new_tokens} rounds={args.rounds}; float32 "
          f"matrix-vector bandwidth {bandwidth / 1e9:.1f} GB/s (measured now)")
    header = (f"{'model':18} {'path':28} {'decode ms/tok':>13} {'floor ms':>9} {'/floor':>7}")
    print(header)
    with torch.inference_mode():
        for name in [n for n in fp32 if n.endswith("/mid")]:
            (model32, inputs32), (model16, inputs16) = fp32[name], bf16[name]
            plain32, plain16 = copy.deepcopy(model32), copy.deepcopy(model16)   # generate prepares lazily
            plain32.cpu_decode_kernels = plain16.cpu_decode_kernels = False
            paths = {"float32 DynamicCache": (plain32, inputs32, DynamicCache),
                     "float32 PreallocatedCache": (plain32, inputs32, PreallocatedCache),
                     "float32 + column-major": (model32, inputs32, PreallocatedCache),
                     "bfloat16 PyTorch defaults": (plain16, inputs16, PreallocatedCache),
                     "bfloat16 packed + attention": (model16, inputs16, PreallocatedCache)}
            ids = {path: _generate(m, i, args.new_tokens, c) for path, (m, i, c) in paths.items()}
            best = {path: [float("inf"), float("inf")] for path in paths}
            for _ in range(args.rounds):
                for path, (model, inputs, cache) in paths.items():
                    best[path][0] = min(best[path][0], _time(model, inputs, 1, cache))
                    best[path][1] = min(best[path][1], _time(model, inputs, 1 + args.new_tokens, cache))
            steps = {path: (long - short) / args.new_tokens for path, (short, long) in best.items()}
            for path, step in steps.items():
                dtype = torch.float32 if path.startswith("float32") else torch.bfloat16
                floor = decode_step_weight_bytes(paths[path][0], dtype) / bandwidth
                print(f"{name:18} {path:28} {1e3 * step:13.2f} {1e3 * floor:9.2f} {step / floor:7.2f}")
            same32 = all(torch.equal(ids["float32 DynamicCache"], ids[p]) for p in paths if p.startswith("float32"))
            same16 = torch.equal(ids["bfloat16 PyTorch defaults"], ids["bfloat16 packed + attention"])
            prompt = inputs32["input_ids"].shape[1]
            agree = {path: _agreeing_tokens(ids[path][:, prompt:], ids["float32 + column-major"][:, prompt:])
                     for path in paths if path.startswith("bfloat16")}
            print(f"{name:18} bfloat16 greedy ids equal to float32's for the first "
                  + ", ".join(f"{n} ({path})" for path, n in agree.items()) + f" of {args.new_tokens} tokens")
            forced = ids["float32 + column-major"]
            reference = model32(**{**inputs32, "input_ids": forced, "attention_mask": torch.ones_like(forced)}).logits
            errors = {path: _teacher_forced_error(paths[path][0], inputs16, forced, reference.float())
                      for path in agree}
            print(f"{name:18} bfloat16 logits vs float32 on float32's tokens (mean over steps of max |difference|): "
                  + ", ".join(f"{e:.4f} ({path})" for path, e in errors.items()))
            print(f"{name:18} speed-ups: preallocated / dynamic cache "
                  f"{steps['float32 DynamicCache'] / steps['float32 PreallocatedCache']:.2f}x; column-major / row-major "
                  f"{steps['float32 PreallocatedCache'] / steps['float32 + column-major']:.2f}x; bf16 ours / defaults "
                  f"{steps['bfloat16 PyTorch defaults'] / steps['bfloat16 packed + attention']:.2f}x; bf16 / float32 (ours) "
                  f"{steps['float32 + column-major'] / steps['bfloat16 packed + attention']:.2f}x; "
                  f"greedy ids equal: float32 {same32}, bfloat16 {same16}", flush=True)


if __name__ == "__main__":
    main()
