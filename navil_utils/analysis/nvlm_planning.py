"""NVLM-D-72B on paper: parameters per component, GPU placement, and the memory one realistic request needs.

Everything here runs on the ``meta`` device (no weights, no GPU):

* :func:`nvlm_d_parameter_table` — parameters of ``vision_model`` / ``mlp1`` / the Qwen2 parts, counted on the
  model and in closed form from the config, next to the published figures (Qwen2-72B ≈ 72.7B,
  InternViT-6B-448px-V1-5 5.54B per the InternVL-1.5 release, MLP ≈ 0.62B, NVLM-D-72B ≈ 79B — NVLM paper
  arXiv 2409.11402 and the NVLM-D-72B model card).
* :func:`split_model_device_map` — the NVLM-D-72B model card's hand-written ``split_model`` placement,
  re-implemented from its description; :func:`placement_table` sets it against accelerate's automatic,
  balanced plan (:func:`~navil_utils.analysis.device_maps.plan_device_map`) and NaViL-2B / 9B.
* :func:`request_memory_table` — KV cache and a rough prefill activation peak for a 1920×1080 image
  (NVLM-D: dynamic tiling, ≤ 6 tiles + thumbnail; NaViL: multi-scale packing) + text + generated tokens.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from navil_utils.analysis.device_maps import (
    GiB,
    device_map_bytes,
    device_of_parameter,
    modules_per_device,
    plan_device_map,
)

#: Published sizes (parameters) the counts are compared with.
PUBLISHED_NVLM_D_PARAMETERS: dict[str, float] = {
    "vision_model": 5.54e9,     # InternViT-6B-448px-V1-5 (InternVL-1.5 release: 5.54B; "6B" is nominal)
    "mlp1": 0.62e9,             # NVLM paper §4.2: 12800 → 29568 → 8192 (weights ≈ 0.62B)
    "language_model": 72.7e9,   # Qwen2-72B(-Instruct), the NVLM-D-72B decoder
    "total": 79.0e9,            # NVLM-D-72B ≈ 79B (model card)
}

_EXPLANATIONS: dict[str, str] = {
    "vision_model": "InternViT-6B-448px-V1-5: 45 layers × (qkv 3·3200², proj, FFN 2·3200·12800, QK-norm, 2 RMSNorms, "
                    "layer scale) + 14-px patch conv + class token + 1025 position embeddings; '6B' is nominal",
    "mlp1": "LayerNorm(12800) + Linear(12800→29568) + Linear(29568→8192), no biases: the 2×2 pixel shuffle makes the "
            "input 4 × 3200 wide; the hidden width reuses Qwen2-72B's FFN width",
    "language_model.embed_tokens": "152,064 × 8192 input table (Qwen2-72B vocabulary)",
    "language_model.layers": "80 × (q 8192² + k,v 2·8192·1024 with biases + o 8192² + SwiGLU 3·8192·29568 + 2 RMSNorms)",
    "language_model.norm": "final RMSNorm",
    "language_model.lm_head": "untied output projection, 152,064 × 8192",
    "language_model": "Qwen2-72B total (embeddings + layers + norm + head)",
    "total": "sum; an HF metadata figure of 79.38B is also quoted for the checkpoint — our count is ~0.5B below it "
             "(unresolved: a larger tokenizer vocabulary would explain it, but the released config was not available)",
}


# ---------------------------------------------------------------------------------------------------
# parameters
def nvlm_d_component(name: str) -> str:
    """Component of an NVLM-D parameter: ``vision_model``, ``mlp1``, ``language_model.{embed_tokens|layers|norm|lm_head}``."""
    if name.startswith("vision_model."):
        return "vision_model"
    if name.startswith("mlp1."):
        return "mlp1"
    for part, prefix in (("embed_tokens", "language_model.model.embed_tokens."),
                         ("layers", "language_model.model.layers."), ("norm", "language_model.model.norm."),
                         ("lm_head", "language_model.lm_head.")):
        if name.startswith(prefix):
            return f"language_model.{part}"
    raise ValueError(f"cannot attribute parameter {name!r} to an NVLM-D component")


def count_nvlm_d_parameters(model) -> dict[str, int]:
    """Parameters per component of an NVLM-D model (meta device fine), plus ``language_model`` and ``total``."""
    counts = dict.fromkeys(("vision_model", "mlp1", "language_model.embed_tokens", "language_model.layers",
                            "language_model.norm", "language_model.lm_head"), 0)
    for name, param in model.named_parameters():
        counts[nvlm_d_component(name)] += param.numel()
    counts["language_model"] = sum(v for k, v in counts.items() if k.startswith("language_model."))
    counts["total"] = counts["vision_model"] + counts["mlp1"] + counts["language_model"]
    return counts


def _pair(value: Any) -> int:
    return int(value[0]) if isinstance(value, (list, tuple)) else int(value)


def expected_nvlm_d_parameters(config) -> dict[str, int]:
    """Closed-form parameter counts from an :class:`~navil_utils.models.configuration_nvlm_d.NVLMDConfig`
    (independent of the model code; same keys as :func:`count_nvlm_d_parameters`)."""
    vis, llm = config.vision_config, config.llm_config
    d, di, p = vis.hidden_size, vis.intermediate_size, _pair(vis.patch_size)
    patches = (_pair(vis.image_size) // p) ** 2
    norm = d * (2 if vis.norm_type == "layer_norm" else 1)
    vit_layer = (3 * d * d + (3 * d if vis.attention_bias else 0)      # q, k, v
                 + d * d + d                                             # output projection (bias)
                 + (2 * d if vis.use_qk_norm else 0)                     # q_norm, k_norm over the full width
                 + d * di + di + di * d + d                              # fc1, fc2 with biases
                 + 2 * norm + 2 * d)                                     # two norms, two layer scales
    vision = 3 * p * p * d + d + d + (patches + 1) * d + vis.num_hidden_layers * vit_layer
    c, f, h = config.connector_input_size, config.connector_hidden_size, llm.hidden_size
    connector = 2 * c + c * f + f * h
    heads, kv = llm.num_attention_heads, llm.num_key_value_heads or llm.num_attention_heads
    hd = getattr(llm, "head_dim", None) or h // heads
    attention = h * heads * hd + heads * hd + 2 * (h * kv * hd + kv * hd) + heads * hd * h
    layer = attention + 3 * h * llm.intermediate_size + 2 * h
    counts = {
        "vision_model": vision, "mlp1": connector,
        "language_model.embed_tokens": llm.vocab_size * h,
        "language_model.layers": llm.num_hidden_layers * layer,
        "language_model.norm": h,
        "language_model.lm_head": 0 if llm.tie_word_embeddings else llm.vocab_size * h,
    }
    counts["language_model"] = sum(v for k, v in counts.items() if k.startswith("language_model."))
    counts["total"] = vision + connector + counts["language_model"]
    return counts


def nvlm_d_parameter_table(model=None, config=None):
    """DataFrame: parameters per NVLM-D component — counted, closed form, billions, published, difference, why.

    ``model`` defaults to NVLM-D-72B built on the meta device from ``config`` (default :func:`nvlm_d_72b_config`).
    """
    import pandas as pd

    from navil_utils.models.configuration_nvlm_d import nvlm_d_72b_config
    from navil_utils.models.modeling_nvlm_d import build_empty_nvlm_d

    config = config if config is not None else (model.config if model is not None else nvlm_d_72b_config())
    model = model if model is not None else build_empty_nvlm_d(config, torch.bfloat16)
    counted, closed = count_nvlm_d_parameters(model), expected_nvlm_d_parameters(config)
    rows = []
    for component, n in counted.items():
        published = PUBLISHED_NVLM_D_PARAMETERS.get(component)
        rows.append({
            "component": component, "parameters": n, "closed form": closed[component],
            "billions": round(n / 1e9, 3), "published (B)": published / 1e9 if published else None,
            "difference (%)": round(100 * (n - published) / published, 2) if published else None,
            "explanation": _EXPLANATIONS.get(component, ""),
        })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------
# the model card's split_model
NVLM_D_NUM_LAYERS = 80
#: Modules the card pins to GPU 0 besides the ViT-side ones (our names; ``rotary_emb`` holds no weights).
SPLIT_MODEL_GPU0_MODULES: tuple[str, ...] = (
    "vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.rotary_emb",
    "language_model.model.norm", "language_model.lm_head",
)


def split_model_layer_quota(num_gpus: int, num_layers: int = NVLM_D_NUM_LAYERS) -> list[int]:
    """The card's nominal layers per GPU: ``q = ceil(L / (N − 0.5))`` for every GPU, GPU 0 ``ceil(q / 2)``
    ("the first GPU is used for the ViT: treat it as half a GPU").  The quotas may sum to more than ``L``."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    per_gpu = math.ceil(num_layers / (num_gpus - 0.5))
    return [math.ceil(per_gpu * 0.5)] + [per_gpu] * (num_gpus - 1)


def split_model_device_map(num_gpus: int, num_layers: int = NVLM_D_NUM_LAYERS) -> dict[str, int]:
    """The NVLM-D-72B card's ``split_model`` placement for ``num_gpus`` GPUs (accelerate ``device_map`` format).

    Rule (re-implemented from the card): layers are dealt out in order, GPU by GPU, following
    :func:`split_model_layer_quota`; then ``vision_model``, ``mlp1``, ``embed_tokens``, rotary embedding, the
    final ``norm``, ``lm_head`` **and the last decoder layer** are put on GPU 0 (the last layer sits next to the
    final norm and head, so the logits are computed where the embeddings are).  The card's loop also writes
    entries for layer indices ≥ ``num_layers`` when the quotas over-count (e.g. 81 for N = 2); such layers do
    not exist and are left out here, so the last GPU ends up with fewer layers than its quota.
    """
    quota = split_model_layer_quota(num_gpus, num_layers)
    device_map: dict[str, int] = {}
    layer = 0
    for gpu, count in enumerate(quota):
        for _ in range(count):
            if layer < num_layers:
                device_map[f"language_model.model.layers.{layer}"] = gpu
            layer += 1
    for module in SPLIT_MODEL_GPU0_MODULES:
        device_map[module] = 0
    device_map[f"language_model.model.layers.{num_layers - 1}"] = 0
    return device_map


def split_model_layers_per_gpu(num_gpus: int, num_layers: int = NVLM_D_NUM_LAYERS) -> list[int]:
    """Decoder layers each GPU really holds under :func:`split_model_device_map` (sums to ``num_layers``)."""
    per = modules_per_device(split_model_device_map(num_gpus, num_layers), "language_model.model.layers", num_layers)
    return [per.get(gpu, 0) for gpu in range(num_gpus)]


# ---------------------------------------------------------------------------------------------------
# placement: split_model vs accelerate, NVLM-D-72B vs NaViL
@dataclass
class Placement:
    """Weights and decoder layers per device of one placement of one model."""

    model: str
    method: str
    num_gpus: int
    gpu_memory_gib: float
    bytes_per_device: dict[int | str, int]
    layers_per_device: dict[int | str, int]
    vit_device: int | str

    @property
    def fits(self) -> bool:
        """True when nothing is on CPU/disk and no GPU holds more weights than its memory."""
        return all(isinstance(d, int) and b <= self.gpu_memory_gib * GiB for d, b in self.bytes_per_device.items())


def _llm_layers(model) -> tuple[str, int]:
    """Module prefix and count of the decoder layers (NVLM-D and NaViL both use ``language_model.model.layers``)."""
    return "language_model.model.layers", model.config.llm_config.num_hidden_layers


def split_model_placement(model, num_gpus: int, gpu_memory_gib: float = 80.0, dtype=torch.bfloat16,
                          name: str = "NVLM-D-72B") -> Placement:
    """:func:`split_model_device_map` applied to a (meta) NVLM-D model: bytes and layers per GPU."""
    prefix, layers = _llm_layers(model)
    device_map = split_model_device_map(num_gpus, layers)
    return Placement(name, "card split_model", num_gpus, gpu_memory_gib, device_map_bytes(model, device_map, dtype),
                     modules_per_device(device_map, prefix, layers), device_map["vision_model"])


def accelerate_placement(model, num_gpus: int, gpu_memory_gib: float = 80.0, dtype=torch.bfloat16,
                         name: str = "NVLM-D-72B", headroom_gib: float = 4.0) -> Placement:
    """accelerate's balanced ``infer_auto_device_map`` (via :func:`plan_device_map`) as a :class:`Placement`."""
    prefix, layers = _llm_layers(model)
    plan = plan_device_map(model, num_gpus, gpu_memory_gib, dtype=dtype, headroom_gib=headroom_gib)
    vit_param = next(n for n, _ in model.named_parameters() if n.startswith("vision_model."))
    return Placement(name, "accelerate balanced", num_gpus, gpu_memory_gib,
                     device_map_bytes(model, plan.device_map, dtype), modules_per_device(plan.device_map, prefix, layers),
                     device_of_parameter(vit_param, plan.device_map))


def placement_table(placements: Sequence[Placement]):
    """Long DataFrame (figure-ready): one row per placement and device — weights GiB, decoder layers, ViT there,
    plus per-placement ``max GiB`` and ``fits`` (all weights on GPUs within ``gpu_memory_gib``)."""
    import pandas as pd

    rows = []
    for p in placements:
        extra = (set(p.bytes_per_device) | set(p.layers_per_device)) - set(range(p.num_gpus))
        devices = list(range(p.num_gpus)) + sorted(extra, key=str)     # every GPU, then "cpu" / "disk"
        peak = max(b for d, b in p.bytes_per_device.items() if isinstance(d, int)) if any(
            isinstance(d, int) for d in p.bytes_per_device) else 0
        for device in devices:
            rows.append({
                "model": p.model, "method": p.method, "num_gpus": p.num_gpus, "device": str(device),
                "weights (GiB)": round(p.bytes_per_device.get(device, 0) / GiB, 2),
                "decoder layers": p.layers_per_device.get(device, 0), "holds ViT": device == p.vit_device,
                "max GPU weights (GiB)": round(peak / GiB, 2), "fits": p.fits,
            })
    return pd.DataFrame(rows)


def placement_comparison(gpu_counts: Sequence[int] = (1, 2, 4, 8), gpu_memory_gib: float = 80.0,
                         models: Mapping[str, Any] | None = None) -> list[Placement]:
    """Placements for every GPU count: NVLM-D-72B by the card's ``split_model`` and by accelerate, and the
    NaViL models (default NaViL-2B / NaViL-9B, meta device, bf16) by accelerate."""
    from navil_utils.models.configuration_nvlm_d import nvlm_d_72b_config
    from navil_utils.models.modeling_nvlm_d import build_empty_nvlm_d
    from navil_utils.models.presets import build_empty_model, navil_2b_config, navil_9b_config

    nvlm = build_empty_nvlm_d(nvlm_d_72b_config(), torch.bfloat16)
    if models is None:
        models = {"NaViL-2B": build_empty_model(navil_2b_config(), torch.bfloat16),
                  "NaViL-9B": build_empty_model(navil_9b_config(), torch.bfloat16)}
    placements = []
    for n in gpu_counts:
        placements.append(split_model_placement(nvlm, n, gpu_memory_gib))
        placements.append(accelerate_placement(nvlm, n, gpu_memory_gib))
        for name, model in models.items():
            placements.append(accelerate_placement(model, n, gpu_memory_gib, name=name))
    return placements


# ---------------------------------------------------------------------------------------------------
# KV cache and activations of one request
def kv_cache_bytes(num_layers: int, num_kv_heads: int, head_dim: int, seq_len: int, *, batch_size: int = 1,
                   bytes_per_element: int = 2) -> int:
    """``2 (K and V) × layers × kv_heads × head_dim × seq_len × batch × bytes`` (bf16: 2 bytes)."""
    return 2 * num_layers * num_kv_heads * head_dim * seq_len * batch_size * bytes_per_element


@dataclass(frozen=True)
class LLMGeometry:
    """The decoder sizes memory estimates need."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, llm) -> LLMGeometry:
        """From an LLM config (Qwen2 / Qwen3-VE / InternLM2-VE) or a composite config holding ``llm_config``."""
        llm = getattr(llm, "llm_config", llm)
        heads = llm.num_attention_heads
        head_dim = getattr(llm, "head_dim", None) or llm.hidden_size // heads
        return cls(llm.num_hidden_layers, heads, llm.num_key_value_heads or heads, head_dim, llm.hidden_size,
                   llm.intermediate_size, llm.vocab_size)

    def kv_bytes(self, seq_len: int, bytes_per_element: int = 2, batch_size: int = 1) -> int:
        return kv_cache_bytes(self.num_layers, self.num_kv_heads, self.head_dim, seq_len, batch_size=batch_size,
                              bytes_per_element=bytes_per_element)


def llm_prefill_activation_bytes(geometry: LLMGeometry, seq_len: int, bytes_per_element: int = 2,
                                 kept_logits: int = 1) -> int:
    """Rough peak of one decoder layer during an inference prefill (no autograd, one layer alive at a time):
    ``bytes × S × (2·H + 3·I)`` — residual stream in and out + the SwiGLU's gate, up and product — plus
    float32 logits of the ``kept_logits`` last positions (``generate`` keeps 1).  Attention scores are not
    counted (SDPA / flash kernels do not materialise ``S × S``; eager attention would add ``heads × S² × bytes``)."""
    return (bytes_per_element * seq_len * (2 * geometry.hidden_size + 3 * geometry.intermediate_size)
            + 4 * kept_logits * geometry.vocab_size)


def vit_activation_bytes(tokens: int, width: int, ffn: int, bytes_per_element: int = 2) -> int:
    """Rough ViT layer peak for ``tokens`` tokens processed together: ``bytes × N × (2·D + 2·F)`` (residual in/out,
    fc1 output and its GELU); attention scores excluded as above."""
    return bytes_per_element * tokens * (2 * width + 2 * ffn)


def connector_activation_bytes(tokens: int, in_width: int, hidden: int, out_width: int, bytes_per_element: int = 2) -> int:
    """MLP connector: ``bytes × n × (in + 2·hidden + out)`` (input, linear-1 output, GELU output, linear-2 output)."""
    return bytes_per_element * tokens * (in_width + 2 * hidden + out_width)


@dataclass(frozen=True)
class RequestMemory:
    """Token counts and memory (bytes) of one request on one model."""

    model: str
    image_tokens: int
    tag_tokens: int
    text_tokens: int
    generated_tokens: int
    vit_tokens: int
    kv_prefill: int
    kv_final: int
    vit_activation: int
    connector_activation: int
    llm_activation: int

    @property
    def prompt_tokens(self) -> int:
        return self.image_tokens + self.tag_tokens + self.text_tokens

    @property
    def final_tokens(self) -> int:
        return self.prompt_tokens + self.generated_tokens

    @property
    def activation_peak(self) -> int:
        return max(self.vit_activation, self.connector_activation, self.llm_activation)

    @property
    def activation_stage(self) -> str:
        stages = {"ViT": self.vit_activation, "connector": self.connector_activation, "LLM": self.llm_activation}
        return max(stages, key=stages.get)


def nvlm_d_request_memory(config, height: int = 1080, width: int = 1920, text_tokens: int = 256,
                          generated_tokens: int = 512, tag_tokens_per_tile: int = 5, max_tiles: int = 6,
                          bytes_per_element: int = 2, name: str = "NVLM-D-72B") -> RequestMemory:
    """NVLM-D: the image is tiled (``plan_tiles``: ≤ ``max_tiles`` tiles + thumbnail), ``num_image_token`` pads per
    tile, plus the tile tags — counted as ``tag_tokens_per_tile`` text tokens each (an assumption: the tags are
    plain text split by the tokenizer; ``<Image>``/``</Image>`` are counted in ``text_tokens``)."""
    from navil_utils.processing.tiling import plan_tiles

    plan = plan_tiles(height, width, max_num=max_tiles, image_size=config.tile_size)
    tiles = plan.num_tiles
    image_tokens = tiles * config.num_image_token
    geometry = LLMGeometry.from_config(config)
    vis = config.vision_config
    vit_tokens = tiles * (config.patches_per_side ** 2 + 1)
    prompt = image_tokens + tiles * tag_tokens_per_tile + text_tokens
    return RequestMemory(
        name, image_tokens, tiles * tag_tokens_per_tile, text_tokens, generated_tokens, vit_tokens,
        geometry.kv_bytes(prompt, bytes_per_element), geometry.kv_bytes(prompt + generated_tokens, bytes_per_element),
        vit_activation_bytes(vit_tokens, vis.hidden_size, vis.intermediate_size, bytes_per_element),
        connector_activation_bytes(image_tokens, config.connector_input_size, config.connector_hidden_size,
                                   geometry.hidden_size, bytes_per_element),
        llm_prefill_activation_bytes(geometry, prompt, bytes_per_element))


def navil_request_memory(config, height: int = 1080, width: int = 1920, text_tokens: int = 256,
                         generated_tokens: int = 512, bytes_per_element: int = 2, name: str = "NaViL",
                         **multiscale_settings: Any) -> RequestMemory:
    """NaViL: every scale of :func:`~navil_utils.processing.multiscale.plan_multiscale`; image tokens = the whole
    span (visual tokens + ``<img>``, line/frame breaks, ``</img>``: ``navil_token_count(span=True)``); the ViT sees
    all patches of all scales (4 per visual token) at once."""
    from navil_utils.processing.multiscale import navil_token_count, plan_multiscale

    scales = plan_multiscale(height, width, **multiscale_settings)
    visual = sum(s.visual_tokens for s in scales)
    span = navil_token_count(height, width, span=True, **multiscale_settings)
    patches = sum(s.num_patches for s in scales)
    geometry = LLMGeometry.from_config(config)
    vis = config.vision_config
    merged = vis.hidden_size * config.merge_size ** 2
    prompt = span + text_tokens
    return RequestMemory(
        name, visual, span - visual, text_tokens, generated_tokens, patches,
        geometry.kv_bytes(prompt, bytes_per_element), geometry.kv_bytes(prompt + generated_tokens, bytes_per_element),
        vit_activation_bytes(patches, vis.hidden_size, vis.intermediate_size, bytes_per_element),
        connector_activation_bytes(visual, merged, geometry.hidden_size, geometry.hidden_size, bytes_per_element),
        llm_prefill_activation_bytes(geometry, prompt, bytes_per_element))


def request_memory_table(height: int = 1080, width: int = 1920, text_tokens: int = 256, generated_tokens: int = 512,
                         requests: Sequence[RequestMemory] | None = None):
    """DataFrame: NVLM-D-72B vs NaViL-2B / 9B on one ``height × width`` image + ``text_tokens`` + ``generated_tokens``
    — tokens, KV cache after the prefill and at the end (bf16), and the rough prefill activation peak."""
    import pandas as pd

    from navil_utils.models.configuration_nvlm_d import nvlm_d_72b_config
    from navil_utils.models.presets import navil_2b_config, navil_9b_config

    if requests is None:
        requests = [
            nvlm_d_request_memory(nvlm_d_72b_config(), height, width, text_tokens, generated_tokens),
            navil_request_memory(navil_2b_config(), height, width, text_tokens, generated_tokens, name="NaViL-2B"),
            navil_request_memory(navil_9b_config(), height, width, text_tokens, generated_tokens, name="NaViL-9B"),
        ]
    rows = [{
        "model": r.model, "image tokens": r.image_tokens, "tag / break tokens": r.tag_tokens,
        "text tokens": r.text_tokens, "generated": r.generated_tokens, "prompt tokens": r.prompt_tokens,
        "final length": r.final_tokens, "ViT tokens": r.vit_tokens,
        "KV after prefill (GiB)": round(r.kv_prefill / GiB, 3), "KV at end (GiB)": round(r.kv_final / GiB, 3),
        "prefill activation peak (GiB)": round(r.activation_peak / GiB, 3), "peak stage": r.activation_stage,
    } for r in requests]
    return pd.DataFrame(rows)
