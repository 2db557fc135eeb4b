"""Rooflines for generation: how fast could a decode step be on this machine, and how close do we get?

A greedy decode step of one text token must read every weight on the text path of the decoder once — each
layer's attention and MLP *text* experts (a text token never touches the visual twins ``*_ve``), the norms and
the LM head — plus one row of the embedding table. At batch 1 that is a chain of matrix-vector products, so
its floor is ``bytes read ÷ memory bandwidth``. The prefill is matrix-matrix work: its floor is
``FLOPs ÷ matmul throughput``. Both machine numbers are measured here, in the same process as the timing
they are compared with (``benchmarks/generate_speed.py``).

    floor_s = decode_step_weight_bytes(model) / measure_gemv_bandwidth(torch.float32)
"""
from __future__ import annotations

import time
from typing import Any

import torch

#: Name fragments of the decoder's input embedding tables (only one row is read per token).
EMBEDDING_NAMES = ("tok_embeddings", "embed_tokens")


def _is_visual_expert(name: str) -> bool:
    return any(part.endswith("_ve") for part in name.split("."))


def decode_step_weights(model: Any) -> dict[str, int]:
    """Elements read per decode step of one text token, by kind: ``layers`` (text experts, norms),
    ``lm_head`` (output projection and final norm), ``embedding_row``. Parameters shared between modules
    (tied embeddings) are counted once; the visual experts and the vision tower are not read."""
    language = model.language_model if hasattr(model, "language_model") else model
    seen: set[int] = set()           # by object: tied weights share one Parameter (also on the meta device)
    counts = {"layers": 0, "lm_head": 0, "embedding_row": 0}
    for name, parameter in language.named_parameters(remove_duplicate=False):
        if id(parameter) in seen or _is_visual_expert(name):
            continue
        seen.add(id(parameter))
        if any(part in name for part in EMBEDDING_NAMES):
            counts["embedding_row"] += parameter.shape[-1]
        elif ".layers." in name:
            counts["layers"] += parameter.numel()
        else:
            counts["lm_head"] += parameter.numel()
    tied = getattr(language, "get_output_embeddings", lambda: None)()
    if tied is not None and id(tied.weight) in {id(p) for n, p in language.named_parameters(remove_duplicate=False)
                                                if any(e in n for e in EMBEDDING_NAMES)}:
        counts["lm_head"] += tied.weight.numel()  # tied head: the whole table is read by the output projection
    return counts


def decode_step_weight_bytes(model: Any, dtype: torch.dtype | None = None) -> int:
    """Bytes of weights one decode step reads (:func:`decode_step_weights` × the element size of ``dtype``,
    default: the model's parameter dtype)."""
    dtype = dtype or next(model.parameters()).dtype
    return sum(decode_step_weights(model).values()) * torch.empty((), dtype=dtype).element_size()


def measure_gemv_bandwidth(dtype: torch.dtype = torch.float32, *, mib: int = 256, repeats: int = 7,
                           device: str | torch.device = "cpu") -> float:
    """Bytes per second a matrix-vector product streams from memory (best of ``repeats``), with a matrix of
    ``mib`` MiB — larger than the caches, like a decoder's weights. The decode floor uses this number."""
    element = torch.empty((), dtype=dtype).element_size()
    columns = 4096
    rows = max(1, mib * 2**20 // (element * columns))
    matrix = torch.randn(rows, columns, dtype=torch.float32).to(device=device, dtype=dtype)
    vector = torch.randn(columns, dtype=torch.float32).to(device=device, dtype=dtype)
    return rows * columns * element / _best_seconds(lambda: torch.mv(matrix, vector), repeats, device)


def measure_matmul_flops(dtype: torch.dtype = torch.float32, *, size: int = 1024, repeats: int = 5,
                         device: str | torch.device = "cpu") -> float:
    """Floating-point operations per second of a square ``size`` matmul (best of ``repeats``)."""
    a = torch.randn(size, size).to(device=device, dtype=dtype)
    b = torch.randn(size, size).to(device=device, dtype=dtype)
    return 2 * size**3 / _best_seconds(lambda: torch.mm(a, b), repeats, device)


def prefill_flops(model: Any, prompt_tokens: int, vit_patches: int) -> float:
    """Approximate FLOPs of a prompt pass: 2 × (decoder layer weights a token passes) × prompt tokens — text
    and visual experts have the same shapes, so every token passes as many (InternLM2-VE's visual tokens also
    pass ``wo``: a few percent more) — plus 2 × ViT weights × patches and the LM head at the last position.
    Attention score terms (quadratic in length; small next to the weights for a few hundred tokens) are left out."""
    weights = decode_step_weights(model)
    vit = sum(p.numel() for p in model.vision_model.parameters()) if hasattr(model, "vision_model") else 0
    return 2.0 * (weights["layers"] * prompt_tokens + vit * vit_patches + weights["lm_head"])


def _best_seconds(operation, repeats: int, device: str | torch.device) -> float:
    """Shortest wall time of ``operation()`` over ``repeats`` runs after one warm-up."""
    best = float("inf")
    for run in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        operation()
        _sync(device)
        if run:
            best = min(best, time.perf_counter() - start)
    return best


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------
# decode rooflines of GPU plans

#: Peak HBM bandwidth (bytes/s) from the vendors' datasheets.
GPU_BANDWIDTH = {"A100 80GB SXM": 2.039e12, "H100 SXM": 3.35e12, "H200": 4.8e12}

#: How a model is spread over GPUs: ``layers`` = whole layers per GPU, run one after another (accelerate's
#: device maps, the NVLM-D card's ``split_model``); ``tensor`` = every layer's matrices cut across all GPUs
#: (tensor parallelism, e.g. vLLM), so that all GPUs stream their share of every step at once.
PARALLELISM = ("layers", "tensor")


def decode_roofline(step_bytes: float, bandwidth: float, num_gpus: int = 1, parallelism: str = "layers") -> float:
    """Upper bound on decode tokens/s of one sequence: bytes one step reads ÷ the bandwidth that streams them.

    With ``layers`` the GPUs take turns (a token passes GPU 0's layers, then GPU 1's, ...): more GPUs add memory,
    not speed, so the bound is ``bandwidth / step_bytes`` for any ``num_gpus``. With ``tensor`` all GPUs read
    their share at once: ``num_gpus × bandwidth / step_bytes`` (communication ignored — an optimistic bound).
    """
    if parallelism not in PARALLELISM:
        raise ValueError(f"parallelism must be one of {PARALLELISM}, got {parallelism!r}")
    if step_bytes <= 0 or bandwidth <= 0 or num_gpus < 1:
        raise ValueError(f"need step_bytes > 0, bandwidth > 0, num_gpus >= 1; got {step_bytes}, {bandwidth}, "
                         f"{num_gpus}")
    return (num_gpus if parallelism == "tensor" else 1) * bandwidth / step_bytes


def decode_roofline_table(models: dict[str, Any], gpu_counts=(1, 2, 4, 8), *, gpu: str = "H100 SXM",
                          context_tokens: dict[str, int] | int = 0, dtype: torch.dtype = torch.bfloat16):
    """Decode tokens/s bounds (batch 1) of each model (meta-device models are fine) per GPU count and parallelism.

    A step reads the text-path weights (:func:`decode_step_weight_bytes`) and the KV cache of the context so far
    (``context_tokens``: one number, or one per model name). Columns: ``model, GPUs, parallelism, weights GB,
    KV cache GB, ms per token (floor), tokens/s (bound)``, and the model's whole weights (ViT and visual experts
    included) per GPU if split evenly — whether a plan fits at all is the placement tables' business.
    """
    import pandas as pd

    from navil_utils.analysis.nvlm_planning import LLMGeometry

    if gpu not in GPU_BANDWIDTH:
        raise ValueError(f"unknown GPU {gpu!r}; known: {sorted(GPU_BANDWIDTH)}")
    element = torch.empty((), dtype=dtype).element_size()
    rows = []
    for name, model in models.items():
        weights = decode_step_weight_bytes(model, dtype)
        context = context_tokens[name] if isinstance(context_tokens, dict) else int(context_tokens)
        language = model.language_model if hasattr(model, "language_model") else model
        kv = LLMGeometry.from_config(language.config).kv_bytes(context, bytes_per_element=element)
        everything = sum(p.numel() for p in model.parameters()) * element
        for n in gpu_counts:
            for parallelism in PARALLELISM:
                bound = decode_roofline(weights + kv, GPU_BANDWIDTH[gpu], n, parallelism)
                rows.append({"model": name, "GPUs": n, "parallelism": parallelism,
                             "all weights per GPU GiB (even split)": everything / n / 2**30,
                             "weights GB": weights / 1e9,
                             "KV cache GB": kv / 1e9, "ms per token (floor)": 1e3 / bound,
                             "tokens/s (bound)": bound})
    return pd.DataFrame(rows)
