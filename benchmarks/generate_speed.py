"""Greedy generation speed of the native NaViL model: KV cache vs no cache, plus peak memory.

Four models, for each LLM backbone (InternLM2-VE as in NaViL-2B, Qwen3-VE as in NaViL-9B) fed that
backbone's golden fixture image prompt (a 3-scale image):

* ``<backbone>/fixture``: the tiny golden checkpoint (≈0.4 M parameters);
* ``<backbone>/mid``: a randomly initialised mid-sized NaViL of that backbone (ViT 256×4, LLM 512×6 with GQA
  8/4, vocab 32k; ≈70 M params).

For each, greedy ``generate`` of ``--new-tokens`` tokens runs with ``use_cache=True`` and ``False``
(``--repeats`` timed runs after one warm-up) and reports new tokens/s, the cached/uncached speed ratio
and the peak memory of the generate call (CUDA: ``max_memory_allocated``; CPU: peak RSS growth, via
``/proc/self/clear_refs`` + ``VmHWM``).

Then the roofline (``navil_utils.analysis.roofline``), measured in the same run: the prefill (a 1-token
generate) against ``FLOPs ÷ matmul throughput`` and a cached decode step (``(t(N) − t(1)) / (N − 1)``) against
``bytes of text-path weights ÷ memory bandwidth`` (a float32 matrix-vector product streaming 256 MiB); the
ratio measured / floor says how far from the hardware's limit each is (1.0 = at the limit). The bandwidth a
bfloat16 matrix-vector product reaches is printed too: a slow bf16 kernel is why bf16 decode need not be
faster than float32.

    python benchmarks/generate_speed.py --threads 1       # CPU, float32
    python benchmarks/generate_speed.py --device cuda --dtype bfloat16

On a shared or oversubscribed CPU pass ``--threads 1``: with 2 OpenMP threads competing with other
processes, spin-waiting made these small models 10x slower (measured on the project's 2-core box).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from navil_utils.analysis.roofline import (decode_step_weight_bytes, measure_gemv_bandwidth, measure_matmul_flops,
                                           prefill_flops)
from navil_utils.models.configuration_navil import NaViLChatConfig
from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
from navil_utils.reference.golden import load_golden_case

MID_VISION = dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=4)
MID_LLM = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
               num_key_value_heads=4, head_dim=64, vocab_size=32000)


def _rss_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


class PeakMemory:
    """Peak memory growth (MiB) of the enclosed block on ``device``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            except OSError:
                pass
            self.start = _rss_kib("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2 ** 20
        else:
            peak = _rss_kib("VmHWM")
            self.mib = None if peak is None or self.start is None else (peak - self.start) / 1024


def build_models(device: torch.device, dtype: torch.dtype) -> dict[str, tuple[torch.nn.Module, dict]]:
    """``name → (model, inputs)``: each backbone's golden fixture model and a mid-sized random model of the same
    backbone, with that fixture's image prompt."""
    models = {}
    for backbone in ("internlm2_ve", "qwen3_ve"):
        case = load_golden_case(backbone)
        inputs = {k: v.to(device) for k, v in case.image_inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        models[f"{backbone}/fixture"] = (case.model.to(device=device, dtype=dtype).eval(), inputs)
        data = copy.deepcopy(case.model.config.to_dict())
        data["vision_config"].update(MID_VISION)
        # InternLM2's config derives head_dim (hidden / heads = 64 here as well)
        data["llm_config"].update({k: v for k, v in MID_LLM.items() if k != "head_dim" or k in data["llm_config"]})
        torch.manual_seed(0)
        mid = NaViLForConditionalGeneration(NaViLChatConfig.from_dict(data)).to(device=device, dtype=dtype).eval()
        models[f"{backbone}/mid"] = (mid, inputs)
    return models


def time_generation(model, inputs, new_tokens: int, use_cache: bool, repeats: int) -> tuple[float, float | None]:
    """Median new tokens/s over ``repeats`` runs, and the peak memory (MiB) of one run."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache)
    model.generate(**inputs, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    device = next(model.parameters()).device
    with PeakMemory(device) as memory:
        model.generate(**inputs, **kwargs)
    speeds = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = model.generate(**inputs, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        speeds.append((out.shape[1] - inputs["input_ids"].shape[1]) / (time.perf_counter() - start))
    return statistics.median(speeds), memory.mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    models = build_models(device, dtype)
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} new_tokens={args.new_tokens} "
          f"repeats={args.repeats}; prompts: the golden fixtures' image prompts "
          + ", ".join(f"{name.split('/')[0]} {inputs['input_ids'].shape[1]} tokens"
                      for name, (_, inputs) in models.items() if name.endswith("fixture")))
    print(f"{'model':22} {'params':>9} {'cache':>6} {'tok/s':>9} {'peak MiB':>9}", flush=True)
    with torch.inference_mode():
        for name, (model, inputs) in models.items():
            params = sum(p.numel() for p in model.parameters())
            results = {}
            for use_cache in (True, False):
                speed, peak = time_generation(model, inputs, args.new_tokens, use_cache, args.repeats)
                results[use_cache] = speed
                peak_text = f"{peak:9.1f}" if peak is not None else f"{'n/a':>9}"
                print(f"{name:22} {params / 1e6:8.2f}M {str(use_cache):>6} {speed:9.1f} {peak_text}", flush=True)
            print(f"{name:22} KV-cache speed-up: {results[True] / results[False]:.2f}x", flush=True)
        roofline(models, args.new_tokens, args.repeats, device, dtype)


def _seconds(model, inputs, new_tokens: int, repeats: int, device: torch.device) -> float:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model.generate(**inputs, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def roofline(models: dict, new_tokens: int, repeats: int, device: torch.device, dtype: torch.dtype) -> None:
    """Prefill and decode step of each model against the machine's floors, measured in this run."""
    bandwidth = measure_gemv_bandwidth(torch.float32, device=device)
    dtype_bandwidth = measure_gemv_bandwidth(dtype, device=device) if dtype != torch.float32 else bandwidth
    flops = measure_matmul_flops(dtype, device=device)
    print(f"machine: memory bandwidth {bandwidth / 1e9:.1f} GB/s (float32 matrix-vector), {dtype} matrix-vector "
          f"{dtype_bandwidth / 1e9:.1f} GB/s, {dtype} matmul {flops / 1e9:.0f} GFLOP/s", flush=True)
    print(f"{'model':22} {'prefill ms':>10} {'floor':>7} {'ratio':>6} {'decode ms/tok':>13} {'floor':>7} {'ratio':>6} "
          f"{'MB/step':>8}", flush=True)
    for name, (model, inputs) in models.items():
        patches = int(inputs["image_grid_thw"].prod(-1).sum())
        prompt = int(inputs["input_ids"].shape[1])
        first = _seconds(model, inputs, 1, repeats + 1, device)
        longer = _seconds(model, inputs, new_tokens, repeats + 1, device)
        step = (longer - first) / (new_tokens - 1)
        weight_bytes = decode_step_weight_bytes(model, dtype)
        decode_floor = weight_bytes / bandwidth
        prefill_floor = prefill_flops(model, prompt, patches) / flops
        print(f"{name:22} {1e3 * first:10.2f} {1e3 * prefill_floor:7.2f} {first / prefill_floor:6.1f} "
              f"{1e3 * step:13.3f} {1e3 * decode_floor:7.3f} {step / decode_floor:6.1f} {weight_bytes / 1e6:8.2f}",
              flush=True)


if __name__ == "__main__":
    main()
