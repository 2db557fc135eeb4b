"""Decode speed of the workbook's generation paths against each other and against the machine's roofline.

For each LLM backbone a randomly initialised mid-sized NaViL (``generate_speed.MID_*``: ViT 256×4, LLM 512×6,
vocab 32k) decodes greedily after its golden fixture's image prompt. Measured in one process, alternating the
paths round by round (best of ``--rounds``), one decode step = ``(t(1 + N) − t(1)) / N``:

* float32 with transformers' ``DynamicCache`` (concatenates the cache every step — the former default)
  vs float32 with :class:`~navil_utils.models.fast_decode.PreallocatedCache` (the default now);
* bfloat16 with PyTorch's default CPU kernels vs bfloat16 with prepacked oneDNN linears (the default now,
  :func:`~navil_utils.models.fast_decode.pack_cpu_linears`);

next to the decode floor of each dtype: the bytes of text-path weights one step reads ÷ the float32
matrix-vector bandwidth measured in the same run (:mod:`navil_utils.analysis.roofline`). Greedy ids are
checked equal between the two float32 paths and between the two bfloat16 paths.

    python benchmarks/decode_paths.py                  # one thread
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers.cache_utils import DynamicCache

from generate_speed import build_models
from navil_utils.analysis.roofline import decode_step_weight_bytes, measure_gemv_bandwidth
from navil_utils.models.fast_decode import PreallocatedCache, unpack_cpu_linears


def _generate(model, inputs, tokens: int, cache_class):
    config = model.config.llm_config
    cache = DynamicCache(config=config) if cache_class is DynamicCache else PreallocatedCache(config.num_hidden_layers)
    return model.generate(**inputs, cache=cache, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)


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
    bf16_plain = build_models(cpu, torch.bfloat16)
    bandwidth = measure_gemv_bandwidth(torch.float32)
    print(f"threads={torch.get_num_threads()} new_tokens={args.new_tokens} rounds={args.rounds}; float32 "
          f"matrix-vector bandwidth {bandwidth / 1e9:.1f} GB/s (measured now)")
    header = (f"{'model':18} {'path':28} {'decode ms/tok':>13} {'floor ms':>9} {'/floor':>7}")
    print(header)
    with torch.inference_mode():
        for name in [n for n in fp32 if n.endswith("/mid")]:
            (model32, inputs32), (model16, inputs16) = fp32[name], bf16[name]
            plain16, plain_inputs = bf16_plain[name]
            plain16.pack_cpu_linears = False
            unpack_cpu_linears(plain16)
            paths = {"float32 DynamicCache": (model32, inputs32, DynamicCache),
                     "float32 PreallocatedCache": (model32, inputs32, PreallocatedCache),
                     "bfloat16 default kernels": (plain16, plain_inputs, PreallocatedCache),
                     "bfloat16 packed oneDNN": (model16, inputs16, PreallocatedCache)}
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
            same32 = torch.equal(ids["float32 DynamicCache"], ids["float32 PreallocatedCache"])
            same16 = torch.equal(ids["bfloat16 default kernels"], ids["bfloat16 packed oneDNN"])
            print(f"{name:18} preallocated / dynamic cache speed-up {steps['float32 DynamicCache'] / steps['float32 PreallocatedCache']:.2f}x; "
                  f"bf16 packed vs bf16 default {steps['bfloat16 default kernels'] / steps['bfloat16 packed oneDNN']:.2f}x; "
                  f"bf16 packed vs float32 {steps['float32 PreallocatedCache'] / steps['bfloat16 packed oneDNN']:.2f}x; "
                  f"greedy ids equal: float32 {same32}, bfloat16 {same16}", flush=True)


if __name__ == "__main__":
    main()
