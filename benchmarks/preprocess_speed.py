"""Speed and memory of NaViL multi-scale preprocessing: navil_utils vs the reference pipeline.

    .venv/bin/python benchmarks/preprocess_speed.py [--repeat 3]

The reference path is NaViL's ``anyres_preprocess_multi_scale`` loop on top of transformers'
``Qwen2VLImageProcessorPil`` configured as NaViL configures its processor
(:mod:`navil_utils.reference.preprocessing`).  Both run with NaViL's real budget (65,536 …
6,291,456 px) on a small, a medium and a 4K image; the script asserts identical ``pixel_values``
and grids, then prints the best-of-``repeat`` wall time (ours single-threaded, and with the default
``num_workers`` that resizes scales in parallel threads), the speed ratios and the peak memory of one
call: the ``tracemalloc`` peak (Python/numpy allocations only: PIL's pixel buffers and torch's
allocator are not traced, so the reference's ``torch.cat`` outputs are invisible there) and the peak
RSS growth of one call in a fresh process (Linux high-water mark), which sees everything.
"""
from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import tracemalloc

import torch

from navil_utils.constants import NAVIL_MAX_PIXELS, NAVIL_MIN_PIXELS
from navil_utils.processing.image_io import make_test_pattern
from navil_utils.processing.multiscale import preprocess_multiscale
from navil_utils.reference.preprocessing import (
    make_reference_processor,
    reference_preprocess_multiscale,
)

SIZES = {"small 320x240": (240, 320), "medium 1024x768": (768, 1024), "4K 3840x2160": (2160, 3840)}


def ours(image, num_workers: int | None = 1):
    out = preprocess_multiscale(image, min_pixels=NAVIL_MIN_PIXELS, max_pixels=NAVIL_MAX_PIXELS,
                                num_workers=num_workers)
    return out.pixel_values, out.image_grid_thw


def ours_threaded(image):
    return ours(image, num_workers=None)


def reference(image):
    pixel_values, grids, _ = reference_preprocess_multiscale(image, NAVIL_MIN_PIXELS, NAVIL_MAX_PIXELS)
    return pixel_values, grids


PIPELINES = {"ours": ours, "reference": reference}


def best_time(fn, image, repeat: int, min_total: float = 1.0) -> float:
    """Best of ``repeat`` runs (more for fast cases, until ``min_total`` seconds were spent)."""
    times: list[float] = []
    while len(times) < repeat or (sum(times) < min_total and len(times) < 200):
        gc.collect()
        start = time.perf_counter()
        fn(image)
        times.append(time.perf_counter() - start)
    return min(times)


def peak_traced_mib(fn, image) -> float:
    gc.collect()
    tracemalloc.start()
    try:
        fn(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _child_peak_rss(pipeline: str, height: int, width: int) -> float:
    """In a fresh process: peak RSS growth (MiB) of one call, after imports and the input image exist."""
    image = make_test_pattern(height, width)
    make_reference_processor(NAVIL_MIN_PIXELS, NAVIL_MAX_PIXELS)  # import transformers' modules first
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the high-water mark to the current RSS
    base = _status_kib("VmRSS")
    PIPELINES[pipeline](image)
    return (_status_kib("VmHWM") - base) / 1024


def peak_rss_mib(pipeline: str, height: int, width: int) -> float:
    """Peak resident-memory growth of one call, measured in a fresh Python process (Linux; NaN
    elsewhere).  Unlike tracemalloc this also sees PIL's pixel buffers and torch's allocations."""
    if not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    command = [sys.executable, os.path.abspath(__file__), "--child-rss", pipeline, str(height), str(width)]
    # fixed glibc mmap threshold: freed large buffers go back to the OS instead of being silently reused
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return float(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per pipeline (best is reported)")
    parser.add_argument("--child-rss", nargs=3, metavar=("PIPELINE", "HEIGHT", "WIDTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_rss:
        pipeline, height, width = args.child_rss
        print(_child_peak_rss(pipeline, int(height), int(width)))
        return 0
    print(f"torch threads: {torch.get_num_threads()}; budget {NAVIL_MIN_PIXELS:,} … {NAVIL_MAX_PIXELS:,} px")
    header = (f"{'image':<16}{'scales':>7}{'patches':>8}{'ref s':>8}{'ours s':>8}{'speed-up':>9}"
              f"{'threads s':>10}{'speed-up':>9}  {'traced MiB ref/ours':>19}  {'RSS MiB ref/ours':>16}")
    print(header)
    print("-" * len(header))
    ratios = []
    for name, (height, width) in SIZES.items():
        image = make_test_pattern(height, width)
        theirs = reference(image)  # warm-up + equality check (single- and multi-threaded)
        for mine in (ours(image), ours_threaded(image)):
            assert torch.equal(mine[1], theirs[1]), f"{name}: grids differ"
            assert torch.equal(mine[0], theirs[0]), f"{name}: pixel_values differ"
        t_ref = best_time(reference, image, args.repeat)
        t_ours = best_time(ours, image, args.repeat)
        t_threads = best_time(ours_threaded, image, args.repeat)
        m_ref, m_ours = peak_traced_mib(reference, image), peak_traced_mib(ours, image)
        r_ref, r_ours = peak_rss_mib("reference", height, width), peak_rss_mib("ours", height, width)
        ratios.append(t_ref / t_ours)
        print(f"{name:<16}{len(theirs[1]):>7}{theirs[0].shape[0]:>8}{t_ref:>8.3f}{t_ours:>8.3f}{t_ref / t_ours:>8.1f}x"
              f"{t_threads:>10.3f}{t_ref / t_threads:>8.1f}x  {m_ref:>9.1f} /{m_ours:>7.1f}  {r_ref:>8.1f} /{r_ours:>6.1f}")
    print(f"outputs identical on all images; single-thread speed-up min {min(ratios):.1f}x (target >= 3x); "
          f"'threads' = default num_workers (parallel resizes, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
