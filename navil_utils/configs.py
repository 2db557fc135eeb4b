"""Full-size NaViL-2B / NaViL-9B configurations, parameter accounting and device-map planning.

The released ``config.json`` files were not obtainable offline, so the two configurations below are
assembled from (sources in ``paper_notes.md``):

* the paper's Table 6 (ViT depth / width / MLP width / heads; LLM depth / width / MLP width / heads);
* the public configs of the base LLMs NaViL starts from — InternLM2-1.8B (NaViL-2B) and Qwen3-8B
  (NaViL-9B): vocabulary, KV heads, head dim, RoPE, norm eps, token ids;
* the reference code defaults (``patch_size`` 16 as in ``demo.py``, ``downsample_ratio`` 0.5,
  pixel budgets 256 / 24576 patches, ``scale_downsample_ratio`` 0.7071) and the facts of the spec §2.1.

Assumptions that do not change the parameter count by more than 0.01 %: ViT ``qkv_bias`` false
(reference default), ``qk_normalization`` false (True crashes the reference ViT), no window attention;
NaViL-2B's vocabulary = InternLM2's 92 544 rows + one row per NaViL image token (12).

Parameter counts (see :func:`count_parameters`) agree with the paper within 6 % (2.4–5.5 %); the paper quotes
*nominal* sizes: NaViL-2B "2.4B active = 1.8B LLM + 0.6B ViT" and "4.2B total = 2 × 1.8B + 0.6B",
NaViL-9B "9.2B active = 8.0B LLM + 1.2B ViT".  The exact numbers differ because
(1) InternLM2-"1.8B" has 1.89B parameters, Qwen3-"8B" 8.19B;
(2) the visual experts duplicate only the attention and FFN matrices of each layer — not the
    embedding table and the LM head (0.38B for NaViL-2B) — so the total is below 2 × LLM + ViT;
(3) the MLP connector (16M / 46M) and the ViT patch embedding are not in the nominal sums.
"""
from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from .image_tokens import SPECIAL_TOKEN_LIST

GiB = 1024**3

#: NaViL-2B: ViT 24×1472 (Table 6) + InternLM2-1.8B with modality experts.
NAVIL_2B: dict[str, Any] = {
    "architectures": ["NaViL"],
    "model_type": "navil_chat",
    "template": "internlm2-chat",
    "downsample_ratio": 0.5,
    "force_image_size": 32,
    "anyres_image_size": True,
    "scale_downsample_ratio": 0.7071,
    "min_dynamic_patch": 256,
    "max_dynamic_patch": 24576,
    "select_layer": -1,
    "ps_version": "v2",
    "vision_config": {
        "model_type": "navil_vit",
        "patch_size": 16,
        "image_size": 32,
        "hidden_size": 1472,
        "num_hidden_layers": 24,
        "num_attention_heads": 23,
        "intermediate_size": 5888,
        "qkv_bias": False,
        "qk_normalization": False,
        "norm_type": "rms_norm",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "initializer_factor": 0.1,
        "window_size": 8,
        "fullatt_block_indexes": None,
    },
    "llm_config": {
        "architectures": ["InternLM2VEForCausalLM"],
        "vocab_size": 92544 + len(SPECIAL_TOKEN_LIST),
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rope_theta": 1000000,
        "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "rms_norm_eps": 1e-5,
        "bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    },
}

#: NaViL-9B: ViT 32×1792 (Table 6) + Qwen3-8B with modality experts.
NAVIL_9B: dict[str, Any] = {
    **{k: v for k, v in NAVIL_2B.items() if k not in ("vision_config", "llm_config")},
    "template": "qwen3-chat",
    "vision_config": {
        **NAVIL_2B["vision_config"],
        "hidden_size": 1792,
        "num_hidden_layers": 32,
        "num_attention_heads": 28,
        "intermediate_size": 7168,
    },
    "llm_config": {
        "architectures": ["Qwen3VEForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "max_position_embeddings": 40960,
        "rope_theta": 1000000,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}

FULL_SIZE_CONFIGS: dict[str, dict[str, Any]] = {"NaViL-2B": NAVIL_2B, "NaViL-9B": NAVIL_9B}

#: The paper's parameter counts (NaViL-2B: §5.1 "4.2B total, 2.4B activated incl. 0.6B encoder";
#: NaViL-9B: App. A "9.2B activated, 1.2B encoder"; Table 6 LLM A-Params 1.8B / 8.0B).
PAPER_PARAMETERS: dict[str, dict[str, float | None]] = {
    "NaViL-2B": {"total": 4.2e9, "active": 2.4e9, "vision_encoder": 0.6e9, "llm_active": 1.8e9},
    "NaViL-9B": {"total": None, "active": 9.2e9, "vision_encoder": 1.2e9, "llm_active": 8.0e9},
}


def navil_config_dict(name: str) -> dict[str, Any]:
    """A deep copy of the ``config.json``-style dict of ``"NaViL-2B"`` or ``"NaViL-9B"``."""
    from .errors import ConfigError

    if name not in FULL_SIZE_CONFIGS:
        raise ConfigError(f"unknown NaViL size {name!r}; known: {sorted(FULL_SIZE_CONFIGS)}")
    return copy.deepcopy(FULL_SIZE_CONFIGS[name])


def _chat_config(name: str, overrides: Mapping[str, Any] | None):
    from .models.configuration_navil import NaViLChatConfig

    config = navil_config_dict(name)
    for key, value in (overrides or {}).items():
        if key in ("vision_config", "llm_config") and isinstance(value, Mapping):
            config[key].update(value)
        else:
            config[key] = value
    return NaViLChatConfig(**config)


def navil_2b_config(**overrides: Any):
    """:class:`~navil_utils.models.configuration_navil.NaViLChatConfig` of NaViL-2B (see module doc).

    Keyword overrides replace top-level fields; ``vision_config={…}`` / ``llm_config={…}`` update
    the sub-dicts (e.g. ``llm_config={"num_hidden_layers": 2}`` for a shallow test model).
    """
    return _chat_config("NaViL-2B", overrides)


def navil_9b_config(**overrides: Any):
    """:class:`~navil_utils.models.configuration_navil.NaViLChatConfig` of NaViL-9B (see module doc)."""
    return _chat_config("NaViL-9B", overrides)


# ---------------------------------------------------------------------------------------------------
# Building on the meta device
# ---------------------------------------------------------------------------------------------------
def build_empty_model(config, dtype=None):
    """Instantiate the native NaViL model on the ``meta`` device (no memory, ~1 s for 16B parameters).

    ``dtype`` (e.g. ``torch.bfloat16``) sets the parameters' dtype, which the device-map planner uses.
    """
    import torch
    from accelerate import init_empty_weights

    from .models.modeling_navil import NaViLForConditionalGeneration

    previous = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with init_empty_weights(include_buffers=False):
            model = NaViLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


# ---------------------------------------------------------------------------------------------------
# Parameter accounting
# ---------------------------------------------------------------------------------------------------
COMPONENTS: tuple[str, ...] = (
    "vision_encoder", "connector", "special_token_embedding", "token_embeddings", "lm_head",
    "text_experts", "visual_experts", "shared_norms",
)

_VISUAL_EXPERT = re.compile(r"(^|\.)[a-z0-9_]*_ve(\.|$)")


def parameter_component(name: str) -> str:
    """Which component a parameter belongs to (one of :data:`COMPONENTS`), from its name.

    Names follow the reference state-dict keys (``vision_model.*``, ``mlp1.*``,
    ``special_token_embedding.*``, ``language_model.model.layers.{l}.{attention|feed_forward|self_attn|mlp}[_ve].*``);
    any module whose name ends in ``_ve`` is a visual expert.  Norms outside the experts
    (``attention_norm``/``ffn_norm``, ``input_layernorm``/``post_attention_layernorm``, final ``norm``)
    are shared by both modalities.
    """
    if name.startswith("vision_model.") or ".vision_model." in name:
        return "vision_encoder"
    if name.startswith("mlp1.") or ".mlp1." in name:
        return "connector"
    if "special_token_embedding" in name:
        return "special_token_embedding"
    if "tok_embeddings" in name or "embed_tokens" in name:
        return "token_embeddings"
    leaf_module = name.rsplit(".", 2)[-2] if name.count(".") >= 1 else name
    if leaf_module in ("output", "lm_head"):
        return "lm_head"
    if _VISUAL_EXPERT.search(name):
        return "visual_experts"
    if re.search(r"\.(attention|feed_forward|self_attn|mlp)\.", name):
        return "text_experts"
    if "norm" in leaf_module:
        return "shared_norms"
    raise ValueError(f"cannot attribute parameter {name!r} to a NaViL component")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of one NaViL model (unique tensors; tied weights counted once).

    ``active`` = parameters one token uses: everything except the other modality's experts
    (``total − visual_experts``; text and visual experts have the same size).  Like the paper, it
    includes the vision encoder and the connector.
    """

    total: int
    active: int
    components: dict[str, int] = field(default_factory=dict)

    @property
    def vision_encoder(self) -> int:
        return self.components.get("vision_encoder", 0)

    @property
    def llm_active(self) -> int:
        """LLM parameters one token uses (embeddings, one expert per layer, norms, head)."""
        return self.active - self.vision_encoder - self.components.get("connector", 0)

    def as_dict(self) -> dict[str, int]:
        return {"total": self.total, "active": self.active, "llm_active": self.llm_active, **self.components}


def count_parameters(model) -> ParameterCounts:
    """Count a NaViL model's parameters per component (works on meta-device models)."""
    components = dict.fromkeys(COMPONENTS, 0)
    for name, param in model.named_parameters():
        components[parameter_component(name)] += param.numel()
    total = sum(components.values())
    if components["text_experts"] != components["visual_experts"]:
        raise ValueError(f"text experts ({components['text_experts']}) and visual experts "
                         f"({components['visual_experts']}) differ in size: 'active' would be ambiguous")
    return ParameterCounts(total=total, active=total - components["visual_experts"], components=components)


def expected_parameter_counts(config) -> ParameterCounts:
    """Closed-form parameter counts from a config dict (independent of the model code).

    Used to cross-check :func:`count_parameters` and to describe the architecture.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else config
    vis, llm = cfg["vision_config"], cfg["llm_config"]
    m = int(round(1 / cfg.get("downsample_ratio", 0.5)))
    d, di, p = vis["hidden_size"], vis["intermediate_size"], vis["patch_size"]
    norm = d * (2 if vis.get("norm_type", "rms_norm") == "layer_norm" else 1)
    vit_layer = (3 * d * d + (3 * d if vis.get("qkv_bias") else 0) + d * d + d + d * di + di + di * d + d
                 + 2 * norm + 2 * d + (2 * d if vis.get("qk_normalization") else 0))
    vision = 3 * p * p * d + d + vis["num_hidden_layers"] * vit_layer
    h, i, v, layers = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"], llm["num_hidden_layers"]
    nh = llm["num_attention_heads"]
    nkv = llm.get("num_key_value_heads") or nh
    internlm2 = llm["architectures"][0].startswith("InternLM2")
    hd = h // nh if internlm2 else llm.get("head_dim", h // nh)
    if internlm2:
        bias = llm.get("bias", True)
        attention = (nh + 2 * nkv) * hd * h + (nh + 2 * nkv) * hd * bias + nh * hd * h + h * bias
    else:
        bias = llm.get("attention_bias", False)
        attention = (nh + 2 * nkv) * hd * (h + bias) + nh * hd * h + h * bias + 2 * hd  # + q/k norms
    expert = attention + 3 * h * i
    connector = 2 * d * m * m + d * m * m * h + h + h * h + h
    components = {
        "vision_encoder": vision,
        "connector": connector,
        "special_token_embedding": len(SPECIAL_TOKEN_LIST) * h,
        "token_embeddings": v * h,
        "lm_head": 0 if llm.get("tie_word_embeddings") else v * h,
        "text_experts": layers * expert,
        "visual_experts": layers * expert,
        "shared_norms": layers * 2 * h + h,
    }
    total = sum(components.values())
    return ParameterCounts(total=total, active=total - components["visual_experts"], components=components)


def compare_with_paper(counts: Mapping[str, ParameterCounts]):
    """DataFrame: our counts (billions) next to the paper's for each model name in ``counts``."""
    import pandas as pd

    rows = []
    for name, measured in counts.items():
        paper = PAPER_PARAMETERS.get(name, {})
        for quantity in ("total", "active", "llm_active", "vision_encoder"):
            ours = getattr(measured, quantity)
            theirs = paper.get(quantity)
            rows.append({
                "model": name, "quantity": quantity, "ours (B)": round(ours / 1e9, 3),
                "paper (B)": theirs / 1e9 if theirs else None,
                "difference (%)": round(100 * (ours - theirs) / theirs, 1) if theirs else None,
            })
    return pd.DataFrame(rows)


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
    from accelerate.utils import compute_module_sizes, get_balanced_memory, infer_auto_device_map

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


# ---------------------------------------------------------------------------------------------------
# Readable summaries for notebooks
# ---------------------------------------------------------------------------------------------------
def _num_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_tree(model, max_depth: int = 4) -> str:
    """A compact module tree: one line per module with its class and parameter count.

    Runs of identical layers in a ``ModuleList`` are collapsed into one entry ``[0-23] 24 × Class``
    whose children are those of the first layer; modules deeper than ``max_depth`` are not listed.
    """
    import torch.nn as nn

    lines = [f"{type(model).__name__}  ({_num_params(model):,} parameters)"]

    def walk(module, prefix: str, depth: int) -> None:
        children = list(module.named_children())
        entries = []
        if isinstance(module, nn.ModuleList) and children:
            first = children[0][1]
            same = all(type(child) is type(first) for _, child in children)
            if same:
                label = f"[0-{len(children) - 1}] {len(children)} × {type(first).__name__}"
                entries = [(label, first, f"{_num_params(first):,} each")]
        if not entries:
            entries = [(name, child, f"{_num_params(child):,}") for name, child in children]
        for index, (label, child, count) in enumerate(entries):
            last = index == len(entries) - 1
            if not label.startswith("["):
                label = f"{label}: {type(child).__name__}"
            lines.append(f"{prefix}{'└─ ' if last else '├─ '}{label}  ({count})")
            if depth + 1 < max_depth:
                walk(child, prefix + ("   " if last else "│  "), depth + 1)

    walk(model, "", 0)
    return "\n".join(lines)


def parameter_table(counts: ParameterCounts):
    """DataFrame: parameters per component (count, share of total, used by one token or not)."""
    import pandas as pd

    rows = [{"component": name, "parameters": n, "share (%)": round(100 * n / counts.total, 2),
             "active for one token": name != "visual_experts"}
            for name, n in counts.components.items()]
    rows.append({"component": "total", "parameters": counts.total, "share (%)": 100.0, "active for one token": None})
    rows.append({"component": "active (one expert)", "parameters": counts.active,
                 "share (%)": round(100 * counts.active / counts.total, 2), "active for one token": None})
    return pd.DataFrame(rows)


def device_component(module_name: str) -> str:
    """Coarse group of a module or parameter name for plots: ViT, connector, embeddings, LLM layers, head."""
    if module_name.startswith("vision_model"):
        return "vision encoder"
    if module_name.startswith("mlp1") or "special_token_embedding" in module_name:
        return "connector + special embeddings"
    if ".layers." in module_name:
        return "LLM layers (both experts)"
    if "tok_embeddings" in module_name or "embed_tokens" in module_name:
        return "token embeddings"
    if re.search(r"(^|\.)(output|lm_head)(\.|$)", module_name):
        return "LM head"
    return "norms / rotary"


def _device_of(param_name: str, device_map: Mapping[str, int | str]) -> int | str:
    """Device of a parameter under an accelerate device map (longest matching module prefix)."""
    best, device = -1, None
    for prefix, dev in device_map.items():
        if (prefix == "" or param_name == prefix or param_name.startswith(prefix + ".")) and len(prefix) > best:
            best, device = len(prefix), dev
    if device is None:
        raise KeyError(f"parameter {param_name!r} is not covered by the device map")
    return device


def plot_device_plans(plans: Sequence[DevicePlan], model, ax=None, title: str | None = None):
    """Stacked bars: weight GiB per device and component for several plans (e.g. 1/2/4/8 GPUs).

    Bytes are attributed per parameter (``numel × bytes per element`` of the plan's dtype).
    """
    import matplotlib.pyplot as plt
    import matplotlib.transforms as mtransforms
    import torch

    groups = ["vision encoder", "connector + special embeddings", "token embeddings",
              "LLM layers (both experts)", "LM head", "norms / rotary"]
    colours = dict(zip(groups, ["#d62728", "#ff7f0e", "#9467bd", "#1f77b4", "#2ca02c", "#7f7f7f"]))
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4))
    params = [(name, p.numel()) for name, p in model.named_parameters()]
    labelled: set[str] = set()
    ticks: list[tuple[float, str]] = []
    tallest = 0.0
    below = mtransforms.blended_transform_factory(ax.transData, ax.transAxes)
    x = 0.0
    for plan in plans:
        itemsize = torch.empty((), dtype=getattr(torch, plan.dtype)).element_size()
        gib: dict[tuple[int | str, str], float] = {}
        for name, numel in params:
            key = (_device_of(name, plan.device_map), device_component(name))
            gib[key] = gib.get(key, 0.0) + numel * itemsize / GiB
        devices = sorted({dev for dev, _ in gib}, key=lambda d: (isinstance(d, str), str(d)))
        start = x
        for device in devices:
            bottom = 0.0
            for group in groups:
                value = gib.get((device, group), 0.0)
                if value:
                    visible = value >= 0.005  # a final norm alone (kB) would only clutter the legend
                    ax.bar(x, value, bottom=bottom, color=colours[group], width=0.8,
                           label=group if visible and group not in labelled else None)
                    if visible:
                        labelled.add(group)
                    bottom += value
            tallest = max(tallest, bottom)
            ticks.append((x, str(device)))
            x += 1
        ax.text((start + x - 1) / 2, -0.085, f"{plan.num_gpus} GPU{'s' if plan.num_gpus > 1 else ''}",
                transform=below, ha="center", va="top", fontsize=9)
        x += 0.8
    ax.set_xticks([t for t, _ in ticks], [lbl for _, lbl in ticks], fontsize=8)
    ax.set_ylim(0, 1.08 * tallest)
    ax.set_ylabel("weights per device (GiB)")
    ax.set_xlabel("device index (top), number of GPUs of the plan (bottom)", labelpad=22)
    ax.set_title(title or "Device-map plans")
    ax.legend(fontsize=8, loc="upper right")
    return ax


def plot_parameter_breakdown(counts: Mapping[str, ParameterCounts], ax=None):
    """Horizontal stacked bars (billions) per model: components of the total; markers above each bar
    show the paper's total / active counts next to our active count."""
    import matplotlib.pyplot as plt

    order = ["vision_encoder", "connector", "token_embeddings", "lm_head", "text_experts", "visual_experts",
             "special_token_embedding", "shared_norms"]
    colours = {"vision_encoder": "#d62728", "connector": "#ff7f0e", "token_embeddings": "#9467bd",
               "lm_head": "#2ca02c", "text_experts": "#1f77b4", "visual_experts": "#aec7e8",
               "special_token_embedding": "#8c564b", "shared_norms": "#7f7f7f"}
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3.4))
    names = list(counts)
    for row, name in enumerate(names):
        left = 0.0
        for part in order:
            value = counts[name].components.get(part, 0) / 1e9
            if value < 1e-3:   # special embeddings / norms are invisible at this scale
                continue
            ax.barh(row, value, left=left, color=colours[part], height=0.5, label=part.replace("_", " "))
            left += value
        marker_row = row - 0.4
        ax.plot(counts[name].active / 1e9, marker_row, marker="o", color="black", markerfacecolor="white",
                markersize=7, linestyle="none", label="ours: active")
        paper = PAPER_PARAMETERS.get(name, {})
        for quantity, marker in (("total", "v"), ("active", "o")):
            if paper.get(quantity):
                ax.plot(paper[quantity] / 1e9, marker_row, marker=marker, color="black", markersize=5,
                        linestyle="none", label=f"paper: {quantity}")
    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.6, -0.8)
    ax.set_xlabel("parameters (billions)")
    ax.set_title("Parameters per component (bars) vs the paper's counts (markers)")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per label
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax
