"""Parameter accounting of a NaViL model: per component, active per token, and against the paper.

The paper quotes *nominal* sizes: NaViL-2B "2.4B active = 1.8B LLM + 0.6B ViT" and "4.2B total = 2 × 1.8B + 0.6B",
NaViL-9B "9.2B active = 8.0B LLM + 1.2B ViT" (§5.1, Table 6).  Exact counts differ by 2–6 % because
(1) InternLM2-"1.8B" has 1.89B parameters, Qwen3-"8B" 8.19B;
(2) the visual experts duplicate only the attention and FFN matrices of each layer — not the
    embedding table and the LM head (0.38B for NaViL-2B) — so the total is below 2 × LLM + ViT;
(3) the MLP connector (16M / 46M) and the ViT patch embedding are not in the nominal sums.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from navil_utils.constants import (
    NAVIL_MERGE_SIZE,
    SPECIAL_TOKEN_LIST,
    merge_size_from_ratio,
)

#: The paper's parameter counts (NaViL-2B: §5.1 "4.2B total, 2.4B activated incl. 0.6B encoder";
#: NaViL-9B: App. A "9.2B activated, 1.2B encoder"; Table 6 LLM A-Params 1.8B / 8.0B).
PAPER_PARAMETERS: dict[str, dict[str, float | None]] = {
    "NaViL-2B": {"total": 4.2e9, "active": 2.4e9, "vision_encoder": 0.6e9, "llm_active": 1.8e9},
    "NaViL-9B": {"total": None, "active": 9.2e9, "vision_encoder": 1.2e9, "llm_active": 8.0e9},
}


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
    if components["visual_experts"] and components["text_experts"] != components["visual_experts"]:
        raise ValueError(f"text experts ({components['text_experts']}) and visual experts "
                         f"({components['visual_experts']}) differ in size: 'active' would be ambiguous")
    return ParameterCounts(total=total, active=total - components["visual_experts"], components=components)


def expected_parameter_counts(config) -> ParameterCounts:
    """Closed-form parameter counts from a config dict (independent of the model code).

    Used to cross-check :func:`count_parameters` and to describe the architecture.
    """
    cfg = config.to_dict() if hasattr(config, "to_dict") else config
    vis, llm = cfg["vision_config"], cfg["llm_config"]
    m = merge_size_from_ratio(cfg.get("downsample_ratio", 1 / NAVIL_MERGE_SIZE))
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
        "visual_experts": layers * expert if llm.get("visual_experts", True) else 0,
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
