"""Cost of recording attention: plain forward vs ``AttentionRecorder`` capture vs ``output_attentions=True``.

Model: a randomly initialised NaViL with NaViL-2B's shape ratios, scaled down by ``--scale`` (default 1/4 of
the width and depth): NaViL-2B has a ViT of 24 × 1472 (23 heads) and an InternLM2-VE LLM of 24 × 2048
(16 heads of 128, 8 KV heads, MLP 4×).  Kept: ViT/LLM width ratio 1472/2048 = 0.71875, MLP ratio 4, LLM head
dim 128 and 2:1 GQA, equal ViT and LLM depth; reduced: widths, layers, head counts (ViT: the head dim nearest
NaViL-2B's 64 that divides the width and is a multiple of 4 for the 2-D RoPE — 4 heads of 92 at the default
scale) and the vocabulary (``--vocab``).

Input: one image of ``--image`` pixels through NaViL's multi-scale plan (default 2-B pixel budget), text
around it; the sequence length is printed.  Three modes, each in a fresh subprocess (peak memory is a
process-wide high-water mark):

* ``plain``   — ``model(**inputs, logits_to_keep=1)`` under sdpa;
* ``capture`` — the same inside ``AttentionRecorder(model, llm_layers="all", heads="mean", queries=last 64
  rows)`` (≤ 64 query rows, every LLM layer, head mean, float16 records);
* ``eager``   — ``output_attentions=True`` (eager attention, every layer's full ``B × H × S × S`` map).

Peak memory: the growth of the process's resident set during the first full forward after a short warm-up
(``VmHWM`` reset through ``/proc/self/clear_refs``; ``ru_maxrss`` where that is unavailable), and the total
peak RSS.  Time: best of ``--repeats`` forwards.  Prints both ratios to the plain forward.

Targets (issue 13): capture ≤ 1.05× the plain forward's peak memory and ≤ 1.3× its time.

    python benchmarks/attention_capture.py --threads 1                    # defaults (~1 minute on 1 core)
    python benchmarks/attention_capture.py --image 896x896 --scale 0.5    # bigger
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

MODES = ("plain", "capture", "eager")
CAPTURE_ROWS = 64


def model_config(scale: float, vocab: int):
    """NaViL-2B's config with widths and depths scaled by ``scale`` (ratios kept, see the module doc)."""
    from navil_utils.models.presets import navil_2b_config

    llm_heads = max(2, round(16 * scale))
    llm_heads += llm_heads % 2                           # 2:1 GQA
    llm_width = 128 * llm_heads                           # head dim 128 as in NaViL-2B
    vit_width = round(llm_width * 1472 / 2048)            # 0.71875 of the LLM
    # ViT heads: the head dim nearest NaViL-2B's 64 that divides the width and is a multiple of 4 (2-D RoPE)
    vit_heads = min((h for h in range(1, vit_width + 1) if vit_width % h == 0 and (vit_width // h) % 4 == 0),
                    key=lambda h: abs(vit_width // h - 64))
    layers = max(2, round(24 * scale))
    return navil_2b_config(
        vision_config={"hidden_size": vit_width, "num_attention_heads": vit_heads, "intermediate_size": 4 * vit_width,
                       "num_hidden_layers": layers},
        llm_config={"hidden_size": llm_width, "num_attention_heads": llm_heads, "num_key_value_heads": llm_heads // 2,
                    "intermediate_size": 4 * llm_width, "num_hidden_layers": layers, "vocab_size": vocab},
    )


def build(scale: float, vocab: int, image_hw: tuple[int, int]):
    """(model, inputs, description) — random weights (seed 0), random pixels, NaViL's multi-scale prompt."""
    import torch

    from navil_utils.constants import SPECIAL_TOKEN_LIST
    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration
    from navil_utils.processing.image_tokens import image_span_ids
    from navil_utils.processing.multiscale import plan_multiscale
    from navil_utils.processing.processor import pixel_budget

    config = model_config(scale, vocab)
    torch.manual_seed(0)
    model = NaViLForConditionalGeneration(config).eval()
    special = {token: vocab - len(SPECIAL_TOKEN_LIST) + i for i, token in enumerate(SPECIAL_TOKEN_LIST)}
    model.set_special_token_ids(special)
    budget = pixel_budget(config)
    scales = plan_multiscale(*image_hw, **budget)
    grids = torch.tensor([s.grid_thw for s in scales])
    patches = int(sum(s.num_patches for s in scales))
    p = budget["patch_size"]
    pixel_values = torch.rand(patches, 3, p, p, generator=torch.Generator().manual_seed(1)) * 2 - 1
    text = torch.randint(100, 1000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    ids = text[:20] + image_span_ids(grids, special, budget["merge_size"]) + text[20:]
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
              "pixel_values": pixel_values, "image_grid_thw": grids}
    vision, llm = config.vision_config, config.llm_config
    description = (f"ViT {vision.num_hidden_layers}x{vision.hidden_size} ({vision.num_attention_heads} heads), "
                   f"LLM {llm.num_hidden_layers}x{llm.hidden_size} ({llm.num_attention_heads} heads, "
                   f"{llm.num_key_value_heads} KV), vocab {llm.vocab_size}, "
                   f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params; image {image_hw[0]}x{image_hw[1]}"
                   f" -> {len(scales)} scales, {patches} patches, sequence {len(ids)} tokens")
    return model, inputs, description


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.exists():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")   # VmHWM := current RSS
        return True
    except OSError:
        return False


def _maxrss_kib() -> int:
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage // 1024 if sys.platform == "darwin" else usage


def run_mode(mode: str, scale: float, vocab: int, image_hw: tuple[int, int], repeats: int, threads: int | None) -> dict:
    """Body of one subprocess: build, warm up on a short prompt, measure the first full forward's peak
    memory, then best-of-``repeats`` time."""
    import torch

    from navil_utils.analysis.attention import AttentionRecorder

    if threads:
        torch.set_num_threads(threads)
    model, inputs, description = build(scale, vocab, image_hw)
    length = inputs["input_ids"].shape[1]

    def forward() -> None:
        if mode == "plain":
            model(**inputs, logits_to_keep=1)
        elif mode == "eager":
            out = model(**inputs, logits_to_keep=1, output_attentions=True)
            assert len(out.attentions) == model.config.llm_config.num_hidden_layers
        else:
            with AttentionRecorder(model, llm_layers="all", heads="mean", queries=slice(-CAPTURE_ROWS, None)) as rec:
                model(**inputs, logits_to_keep=1)
            assert rec.llm[0][0].probs.shape == (1, 1, min(CAPTURE_ROWS, length), length)

    with torch.inference_mode():
        text_only = {"input_ids": inputs["input_ids"][:, :20]}          # warm-up: kernels, threads, allocator
        model(**text_only, logits_to_keep=1, output_attentions=mode == "eager")
        resettable = _reset_peak()
        rss_before = _status_kib("VmRSS") if resettable else None
        maxrss_before = _maxrss_kib()
        forward()
        if resettable and rss_before is not None:
            peak_total = _status_kib("VmHWM")
            growth = peak_total - rss_before
        else:
            peak_total = _maxrss_kib()
            growth = peak_total - maxrss_before
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    return {"mode": mode, "growth_mib": growth / 1024, "peak_mib": peak_total / 1024, "best_s": min(times),
            "times": times, "sequence": length, "description": description,
            "method": "VmHWM (clear_refs)" if resettable else "ru_maxrss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.25, help="width/depth factor relative to NaViL-2B")
    parser.add_argument("--vocab", type=int, default=16384, help="vocabulary (NaViL-2B: 92556)")
    parser.add_argument("--image", default="512x512", help="HxW of the input image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each subprocess")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)      # internal: one measurement
    args = parser.parse_args()
    image_hw = tuple(int(v) for v in args.image.lower().split("x"))
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.scale, args.vocab, image_hw, args.repeats, args.threads)))
        return

    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--scale", str(args.scale), "--vocab", str(args.vocab),
                   "--image", args.image, "--repeats", str(args.repeats)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[mode]
        if mode == "plain":
            print(r["description"])
            print(f"memory: {r['method']}; time: best of {args.repeats}; capture: {CAPTURE_ROWS} rows x all layers, "
                  "head mean, float16")
            print(f"{'mode':8} {'peak growth MiB':>16} {'peak RSS MiB':>13} {'best s':>8}")
        print(f"{mode:8} {r['growth_mib']:16.1f} {r['peak_mib']:13.1f} {r['best_s']:8.3f}", flush=True)
    plain = results["plain"]
    for mode, target in (("capture", "targets: memory <= 1.05x, time <= 1.3x"), ("eager", "")):
        r = results[mode]
        print(f"{mode}/plain: peak growth {r['growth_mib'] / plain['growth_mib']:.3f}x, "
              f"peak RSS {r['peak_mib'] / plain['peak_mib']:.3f}x, time {r['best_s'] / plain['best_s']:.3f}x"
              + (f"   ({target})" if target else ""))


if __name__ == "__main__":
    main()
