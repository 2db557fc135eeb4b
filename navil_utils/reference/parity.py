"""Live parity check of the native NaViL model against the reference outputs of a golden fixture.

``compare_with_golden(model, fixture_dir)`` re-runs the fixture's inputs through ``model`` and
reports, per reference tensor, the maximum absolute error (ids: number of mismatches).  The
fixture's reference tensors came from the official code (transformers 4.51, float32, CPU).
:func:`parity_verdicts` condenses a float32 and a float64 run into a table that is the same on every machine.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

#: Suggested float32 tolerances of the fixtures (golden README): atol 1e-4, rtol 1e-4 on logits,
#: hidden states and ViT tensors (elementwise ``|ours − ref| <= atol + rtol·|ref|``, as torch.allclose).
DEFAULT_ATOL = 1e-4


DEFAULT_RTOL = 1e-4


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from navil_utils.errors import CheckpointError

    if not path.is_file():
        raise CheckpointError(f"golden file {path} is missing")
    return load_file(str(path))


def golden_tensors(fixture_dir: str | os.PathLike) -> dict[str, dict[str, torch.Tensor]]:
    """``{"pixels": …, "inputs": …, "outputs": …}`` of one fixture variant directory."""
    directory = Path(fixture_dir)
    return {
        "pixels": _load(directory.parent / "common" / "pixel_inputs.safetensors"),
        "inputs": _load(directory / "inputs.safetensors"),
        "outputs": _load(directory / "outputs.safetensors"),
    }


def _row(name: str, ours: torch.Tensor, reference: torch.Tensor, atol: float, exact: bool = False,
         rtol: float = DEFAULT_RTOL) -> dict[str, Any]:
    ours = ours.detach().to("cpu")
    reference = reference.to("cpu")
    if ours.shape != reference.shape:
        return {"tensor": name, "shape": tuple(reference.shape), "max_abs_error": float("nan"),
                "tolerance": 0 if exact else atol, "passed": False,
                "note": f"shape {tuple(ours.shape)} != reference {tuple(reference.shape)}"}
    if exact:
        error = float((ours != reference).sum().item())
        return {"tensor": name, "shape": tuple(reference.shape), "max_abs_error": error, "tolerance": 0,
                "passed": error == 0, "note": "mismatching ids" if error else "identical"}
    error = float((ours.double() - reference.double()).abs().max().item()) if ours.numel() else 0.0
    passed = bool(torch.allclose(ours.double(), reference.double(), rtol=rtol, atol=atol))
    return {"tensor": name, "shape": tuple(reference.shape), "max_abs_error": error, "tolerance": atol,
            "passed": passed, "note": "" if passed else f"outside atol {atol:g} + rtol {rtol:g}·|ref|"}


@contextmanager
def strict_float32():
    """Disable TF32 (matmuls and cuDNN) while comparing: with TF32 a float32 model on an Ampere/Hopper
    GPU differs from the CPU reference by ~1e-3 instead of ~1e-5."""
    precision = torch.get_float32_matmul_precision()
    cudnn_tf32 = torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32


def _device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    weight = model.get_input_embeddings().weight
    return weight.device, weight.dtype


def compare_with_golden(model: Any, fixture_dir: str | os.PathLike, atol: float = DEFAULT_ATOL,
                        rtol: float = DEFAULT_RTOL, generate: bool = True):
    """Max abs error of ``model`` vs the reference outputs stored in ``fixture_dir``.

    Rows: ViT output (window order) and window permutation, visual tokens after the connector,
    full-forward logits, every hidden state, the loss, and (``generate=True``) the greedy generations
    with and without the image (``max_abs_error`` = number of differing ids).  Float tensors pass when
    ``torch.allclose(ours, ref, rtol, atol)``; TF32 is switched off during the comparison.  Returns a pandas
    DataFrame with columns ``tensor, shape, max_abs_error, tolerance, passed, note``.
    """
    import pandas as pd

    gold = golden_tensors(fixture_dir)
    pixels, inputs, outputs = gold["pixels"], gold["inputs"], gold["outputs"]
    device, dtype = _device_dtype(model)
    pixel_values = pixels["pixel_values"].to(device=device, dtype=dtype)
    grid = pixels["image_grid_thw"].to(device)
    input_ids = inputs["input_ids"].to(device)
    attention_mask = inputs["attention_mask"].to(device)
    rows: list[dict[str, Any]] = []

    def add(name: str, ours: torch.Tensor, reference: torch.Tensor, exact: bool = False) -> None:
        rows.append(_row(name, ours, reference, atol, exact=exact, rtol=rtol))

    with torch.inference_mode(), strict_float32():
        vision = model.vision_model(pixel_values, grid)
        add("vision_last_hidden_state", vision.last_hidden_state, outputs["vision_last_hidden_state"])
        add("vision_window_index", vision.window_index.long(), outputs["vision_window_index"].long(), exact=True)
        features = model.get_image_features(pixel_values, grid)
        add("vision_mlp1_out", features.reshape(outputs["vision_mlp1_out"].shape), outputs["vision_mlp1_out"])
        out = model(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                    attention_mask=attention_mask, labels=inputs["labels"].to(device), output_hidden_states=True)
        add("logits", out.logits, outputs["logits"])
        for index, hidden in enumerate(out.hidden_states):
            key = f"hidden_states.{index:02d}"
            if key in outputs:
                add(key, hidden, outputs[key])
        add("loss", out.loss.reshape(1), outputs["loss"].reshape(1))
        if generate:
            from navil_utils.reference.fixtures import read_meta

            eos = int(read_meta(fixture_dir)["special_token_ids"]["<|im_end|>"])  # the template separator
            steps = outputs["generated_ids"].shape[1]
            ids = model.generate(input_ids=input_ids, pixel_values=pixel_values, image_grid_thw=grid,
                                 attention_mask=attention_mask, max_new_tokens=steps, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos)
            add("generated_ids", ids[:, input_ids.shape[1]:], outputs["generated_ids"], exact=True)
            text_ids = inputs["text_only_input_ids"].to(device)
            ids = model.generate(input_ids=text_ids, attention_mask=torch.ones_like(text_ids),
                                 max_new_tokens=steps, do_sample=False, eos_token_id=eos, pad_token_id=eos)
            add("text_only_generated_ids", ids[:, text_ids.shape[1]:], outputs["text_only_generated_ids"], exact=True)
    return pd.DataFrame(rows)


def format_error(error: float, digits: int = 2) -> str:
    """``1.234e-05 -> "1.2e-05"``; exact zero -> ``"0"``; NaN (shape mismatch) -> ``"n/a"``."""
    if error != error:
        return "n/a"
    return "0" if error == 0 else f"{error:.{digits - 1}e}"


def parity_verdicts(float32_reports: dict[str, Any], float64_reports: dict[str, Any]):
    """One machine-independent table from a float32 and a float64 run of :func:`compare_with_golden`.

    The float32 run is the real check (``passed``: within tolerance, ids identical), but the last digits
    of its errors depend on the CPU's float kernels (vector width, summation order), so only its verdict
    is reported.  The float64 run of the same weights measures how far the official float32 outputs are
    from (nearly) exact arithmetic — the reference's own round-off; its errors vary across machines only
    around the 1e-15 level, so two significant digits are the same everywhere.

    Args:
        float32_reports / float64_reports: ``{variant: compare_with_golden(...) frame}``; the float64 run
            may omit the generation rows (``generate=False``).
    Returns:
        DataFrame with columns ``variant, tensor, shape, tolerance, float32 within tolerance,
        reference round-off (float64 run)``.
    """
    import pandas as pd

    rows = []
    for variant, report in float32_reports.items():
        exact64 = float64_reports[variant].set_index("tensor")
        for row in report.itertuples(index=False):
            exact = row.tolerance == 0
            if row.tensor not in exact64.index:
                roundoff = "not run"
            elif exact:
                roundoff = "identical" if exact64.loc[row.tensor, "passed"] else "differs"
            else:
                roundoff = format_error(float(exact64.loc[row.tensor, "max_abs_error"]))
            rows.append({"variant": variant, "tensor": row.tensor, "shape": row.shape,
                         "tolerance": "exact" if exact else f"{row.tolerance:g}",
                         "float32 within tolerance": bool(row.passed),
                         "reference round-off (float64 run)": roundoff})
    return pd.DataFrame(rows)
