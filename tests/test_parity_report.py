"""The parity report that notebook 01 saves: float32 verdicts + float64 round-off, machine-independent."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import navil_utils
from navil_utils.reference.fixtures import GOLDEN_VARIANTS
from navil_utils.reference.parity import (
    compare_with_golden,
    format_error,
    parity_verdicts,
)

FLOAT64_ROUNDOFF_SCRIPT = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[1]))
import navil_utils
from navil_utils.reference.parity import compare_with_golden
out = {}
for variant in %r:
    model, _ = navil_utils.load_golden_chat_model(variant, dtype=torch.float64)
    report = compare_with_golden(model, navil_utils.golden_dir(variant), generate=False)
    out[variant] = dict(zip(report["tensor"], report["max_abs_error"]))
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "errors": out}))
""" % (list(GOLDEN_VARIANTS),)


def float64_report(variant: str) -> pd.DataFrame:
    model, _ = navil_utils.load_golden_chat_model(variant, dtype=torch.float64)
    return compare_with_golden(model, navil_utils.golden_dir(variant), generate=False)


@pytest.fixture(scope="module")
def reports64():
    return {variant: float64_report(variant) for variant in GOLDEN_VARIANTS}


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_float64_model_computes_in_float64(variant):
    """No step of a float64 model falls back to float32 (norms, softmax, RoPE, logits, loss)."""
    from navil_utils.reference.parity import golden_tensors

    model, _ = navil_utils.load_golden_chat_model(variant, dtype=torch.float64)
    gold = golden_tensors(navil_utils.golden_dir(variant))
    pixels = gold["pixels"]["pixel_values"].double()
    grid = gold["pixels"]["image_grid_thw"]
    with torch.inference_mode():
        vision = model.vision_model(pixels, grid)
        out = model(input_ids=gold["inputs"]["input_ids"], pixel_values=pixels, image_grid_thw=grid,
                    attention_mask=gold["inputs"]["attention_mask"], labels=gold["inputs"]["labels"],
                    output_hidden_states=True)
    assert vision.last_hidden_state.dtype == torch.float64
    assert out.logits.dtype == torch.float64 and out.loss.dtype == torch.float64
    assert all(h.dtype == torch.float64 for h in out.hidden_states)


def test_float64_run_is_within_tolerance_of_the_reference(reports64):
    """The official float32 outputs are within the float32 tolerance of (nearly) exact arithmetic too,
    and the ViT output carries the largest round-off (its values are the largest)."""
    for variant, report in reports64.items():
        assert report["passed"].all(), report
        floats = report[report["tolerance"] > 0].set_index("tensor")["max_abs_error"]
        assert (floats > 0).all()  # a float64 run cannot reproduce float32 rounding exactly
        assert floats.idxmax() == "vision_last_hidden_state"


def test_float64_roundoff_does_not_depend_on_cpu_kernels_or_threads(reports64):
    """Another CPU, simulated: generic (non-vector) ATen kernels, MKL and oneDNN limited to SSE, 2 threads.
    The float64 distances agree to ~1e-9 relative, so their two-digit form is the same everywhere."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", MKL_ENABLE_INSTRUCTIONS="SSE4_2",
               ONEDNN_MAX_CPU_ISA="SSE41", OMP_NUM_THREADS="2")
    result = subprocess.run([sys.executable, "-c", FLOAT64_ROUNDOFF_SCRIPT, "2"], env=env, capture_output=True,
                            text=True, timeout=300, check=True)
    other = json.loads(result.stdout.strip().splitlines()[-1])
    assert other["capability"] == "DEFAULT"
    for variant, report in reports64.items():
        for tensor, error in zip(report["tensor"], report["max_abs_error"]):
            theirs = other["errors"][variant][tensor]
            assert theirs == pytest.approx(error, rel=1e-8, abs=1e-15), (variant, tensor)
            assert format_error(theirs) == format_error(error)


def test_parity_verdicts_table(reports64):
    variant = GOLDEN_VARIANTS[0]
    report32 = pd.DataFrame([
        {"tensor": "vision_last_hidden_state", "shape": (29, 2, 2, 64), "max_abs_error": 3.8e-6,
         "tolerance": 1e-4, "passed": True, "note": ""},
        {"tensor": "vision_window_index", "shape": (29,), "max_abs_error": 0.0, "tolerance": 0,
         "passed": True, "note": "identical"},
        {"tensor": "logits", "shape": (1, 148, 288), "max_abs_error": 2e-3, "tolerance": 1e-4,
         "passed": False, "note": "outside"},
        {"tensor": "generated_ids", "shape": (1, 8), "max_abs_error": 1.0, "tolerance": 0,
         "passed": False, "note": "mismatching ids"},
    ])
    table = parity_verdicts({variant: report32}, {variant: reports64[variant]}).set_index("tensor")
    assert list(table.columns) == ["variant", "shape", "tolerance", "float32 within tolerance",
                                   "reference round-off (float64 run)"]
    assert "3.8e-06" not in table.to_string()  # raw float32 errors never reach the saved table
    assert table.loc["vision_last_hidden_state", "float32 within tolerance"]
    assert not table.loc["logits", "float32 within tolerance"]
    assert not table.loc["generated_ids", "float32 within tolerance"]
    assert table.loc["vision_window_index", "reference round-off (float64 run)"] == "identical"
    assert table.loc["generated_ids", "reference round-off (float64 run)"] == "not run"
    assert table.loc["vision_window_index", "tolerance"] == "exact"
    expected = reports64[variant].set_index("tensor").loc["logits", "max_abs_error"]
    assert table.loc["logits", "reference round-off (float64 run)"] == format_error(expected)


def test_format_error():
    assert format_error(1.2345e-5) == "1.2e-05"
    assert format_error(7.617e-05) == "7.6e-05"
    assert format_error(0.0) == "0"
    assert format_error(float("nan")) == "n/a"
    assert format_error(1.2345e-5, digits=3) == "1.23e-05"
