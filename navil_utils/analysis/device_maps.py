"""Device-map planning: balanced placement of a NaViL model's weights over GPUs, whole layers only.

    plan = plan_device_map(build_empty_model(navil_9b_config()), num_gpus=2, gpu_memory_gib=80)
    model = load_model(path, device_map=plan.device_map)
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from navil_utils.analysis.parameters import parameter_component

GiB = 1024**3


# ---------------------------------------------------------------------------------------------------
# Device-map planning
# ---------------------------------------------------------------------------------------------------
@contextmanager
def _quiet_accelerate():
    """accelerate warns "Device N is not available" on machines without those GPUs — we plan anyway."""
    loggers = [logging.getLogger(n) for n in ("accelerate", "accelerate.utils.modeling", "accelerate.utils")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@dataclass
class DevicePlan:
    """Where each module goes for ``num_gpus`` GPUs of ``gpu_memory_gib`` each.

    ``device_map`` maps module names to a GPU index, ``"cpu"`` or ``"disk"`` (accelerate format,
    usable as ``device_map=`` of :func:`navil_utils.load_model`); ``bytes_per_device`` holds the weight
    bytes placed on each device.
    """

    num_gpus: int
    gpu_memory_gib: float
    dtype: str
    device_map: dict[str, int | str]
    bytes_per_device: dict[int | str, int]

    @property
    def fits_on_gpus(self) -> bool:
        return all(isinstance(dev, int) for dev in self.device_map.values())

    def summary(self):
        """One row per device: weight GiB and the first/last modules placed there."""
        import pandas as pd

        rows = []
        for device, size in self.bytes_per_device.items():
            modules = [name for name, dev in self.device_map.items() if dev == device]
            rows.append({"device": str(device), "weights (GiB)": round(size / GiB, 2), "modules": len(modules),
                         "first": modules[0] if modules else "", "last": modules[-1] if modules else ""})
        return pd.DataFrame(rows)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_device_map(
    model,
    num_gpus: int,
    gpu_memory_gib: float = 80.0,
    *,
    dtype=None,
    headroom_gib: float = 4.0,
    cpu_memory_gib: float = 512.0,
    no_split_module_classes: Sequence[str] | None = None,
) -> DevicePlan:
    """Plan a balanced device map for a (meta-device) NaViL model with accelerate.

    Args:
        model: the model, typically from :func:`build_empty_model` (no memory needed).
        num_gpus: GPUs to spread over (1, 2, 4, 8, …).
        gpu_memory_gib: memory per GPU.
        dtype: weight dtype for the byte counts (default: the parameters' dtype).
        headroom_gib: memory kept free per GPU for activations and the KV cache.
        cpu_memory_gib: CPU RAM that may take what does not fit (then ``fits_on_gpus`` is False).
        no_split_module_classes: modules kept whole; default ``model._no_split_modules``.
    """
    from accelerate.utils import (
        compute_module_sizes,
        get_balanced_memory,
        infer_auto_device_map,
    )

    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    no_split = list(no_split_module_classes if no_split_module_classes is not None
                    else (getattr(model, "_no_split_modules", None) or []))
    usable = max(gpu_memory_gib - headroom_gib, 0.0)
    max_memory: dict[int | str, int] = {i: int(usable * GiB) for i in range(num_gpus)}
    max_memory["cpu"] = int(cpu_memory_gib * GiB)
    with _quiet_accelerate():
        if num_gpus > 1:
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             dtype=dtype)
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split,
                                           dtype=dtype)
        sizes = compute_module_sizes(model, dtype=dtype)
    per_device: dict[int | str, int] = {}
    for name, device in device_map.items():
        per_device[device] = per_device.get(device, 0) + int(sizes[name])
    first_param = next(model.parameters())
    dtype_name = str(dtype if dtype is not None else first_param.dtype).replace("torch.", "")
    return DevicePlan(num_gpus=num_gpus, gpu_memory_gib=gpu_memory_gib, dtype=dtype_name,
                      device_map=dict(device_map), bytes_per_device=per_device)


#: Coarse plot groups of the components of :func:`~navil_utils.analysis.parameters.parameter_component`.
DEVICE_GROUPS: dict[str, str] = {
    "vision_encoder": "vision encoder",
    "connector": "connector + special embeddings",
    "special_token_embedding": "connector + special embeddings",
    "token_embeddings": "token embeddings",
    "text_experts": "LLM layers (both experts)",
    "visual_experts": "LLM layers (both experts)",
    "lm_head": "LM head",
}


def device_component(param_name: str) -> str:
    """Coarse group of a parameter for plots: ViT, connector, embeddings, LLM layers, head, other norms."""
    try:
        component = parameter_component(param_name)
    except ValueError:
        return "norms / rotary"
    if component == "shared_norms":
        return "LLM layers (both experts)" if ".layers." in param_name else "norms / rotary"
    return DEVICE_GROUPS[component]


def device_of_parameter(param_name: str, device_map: Mapping[str, int | str]) -> int | str:
    """Device of a parameter under an accelerate device map (longest matching module prefix)."""
    best, device = -1, None
    for prefix, dev in device_map.items():
        if (prefix == "" or param_name == prefix or param_name.startswith(prefix + ".")) and len(prefix) > best:
            best, device = len(prefix), dev
    if device is None:
        raise KeyError(f"parameter {param_name!r} is not covered by the device map")
    return device


def device_map_bytes(model, device_map: Mapping[str, int | str], dtype=None) -> dict[int | str, int]:
    """Weight bytes per device of any accelerate-format ``device_map`` (e.g. a hand-written one), summed over
    ``model``'s parameters (``numel × element size`` of ``dtype``, default each parameter's own dtype)."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else None
    totals: dict[int | str, int] = {}
    for name, param in model.named_parameters():
        device = device_of_parameter(name, device_map)
        totals[device] = totals.get(device, 0) + param.numel() * (itemsize or param.element_size())
    return totals


def modules_per_device(device_map: Mapping[str, int | str], module_prefix: str, count: int) -> dict[int | str, int]:
    """How many of the modules ``{module_prefix}.0 … {module_prefix}.{count-1}`` (e.g. decoder layers) each
    device holds under ``device_map`` (accelerate format; a parent entry covers its children)."""
    per: dict[int | str, int] = {}
    for index in range(count):
        device = device_of_parameter(f"{module_prefix}.{index}", device_map)
        per[device] = per.get(device, 0) + 1
    return per
