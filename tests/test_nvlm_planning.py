"""NVLM-D-72B on the meta device: parameters per component, the card's split_model placement vs accelerate,
and KV-cache / activation estimates (the KV formula checked against a real DynamicCache)."""
from __future__ import annotations

import math

import matplotlib
import pytest
import torch

from navil_utils.analysis.device_maps import GiB
from navil_utils.analysis.nvlm_planning import (
    PUBLISHED_NVLM_D_PARAMETERS,
    LLMGeometry,
    accelerate_placement,
    count_nvlm_d_parameters,
    expected_nvlm_d_parameters,
    kv_cache_bytes,
    llm_prefill_activation_bytes,
    navil_request_memory,
    nvlm_d_parameter_table,
    nvlm_d_request_memory,
    placement_comparison,
    placement_table,
    request_memory_table,
    split_model_device_map,
    split_model_layer_quota,
    split_model_layers_per_gpu,
    split_model_placement,
)
from navil_utils.models.configuration_nvlm_d import nvlm_d_72b_config, tiny_nvlm_d_config
from navil_utils.models.modeling_nvlm_d import NVLMDForConditionalGeneration, build_empty_nvlm_d
from navil_utils.models.presets import navil_9b_config
from navil_utils.processing.multiscale import navil_token_count

matplotlib.use("Agg")

# exact counts of NVLM-D-72B, each written out from the sizes
VIT_LAYER = 3 * 3200**2 + (3200**2 + 3200) + 2 * 3200 + (3200 * 12800 + 12800 + 12800 * 3200 + 3200) + 2 * 3200 + 2 * 3200
VIT = 3 * 14 * 14 * 3200 + 3200 + 3200 + 1025 * 3200 + 45 * VIT_LAYER
MLP1 = 2 * 12800 + 12800 * 29568 + 29568 * 8192
EMBED = 152064 * 8192
LLM_LAYER = (8192 * 8192 + 8192) + 2 * (8192 * 1024 + 1024) + 8192 * 8192 + 3 * 8192 * 29568 + 2 * 8192
EXPECTED = {
    "vision_model": 5_536_496_000, "mlp1": 620_717_056, "language_model.embed_tokens": 1_245_708_288,
    "language_model.layers": 70_214_778_880, "language_model.norm": 8192, "language_model.lm_head": 1_245_708_288,
    "language_model": 72_706_203_648, "total": 78_863_416_704,
}


@pytest.fixture(scope="module")
def nvlm_72b():
    return build_empty_nvlm_d(nvlm_d_72b_config(), torch.bfloat16)


def test_72b_parameters_per_component(nvlm_72b):
    assert (VIT, MLP1, EMBED, 80 * LLM_LAYER) == (EXPECTED["vision_model"], EXPECTED["mlp1"],
                                                   EXPECTED["language_model.embed_tokens"], EXPECTED["language_model.layers"])
    counted = count_nvlm_d_parameters(nvlm_72b)
    assert counted == EXPECTED
    assert expected_nvlm_d_parameters(nvlm_d_72b_config()) == EXPECTED
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in nvlm_72b.parameters())
    for component, published in PUBLISHED_NVLM_D_PARAMETERS.items():
        assert abs(counted[component] - published) / published < 0.01, component
    table = nvlm_d_parameter_table(nvlm_72b).set_index("component")
    assert table.loc["total", "parameters"] == 78_863_416_704 and table.loc["total", "difference (%)"] == -0.17
    assert table.loc["vision_model", "published (B)"] == 5.54 and table.loc["vision_model", "difference (%)"] == -0.06
    assert (table["parameters"] == table["closed form"]).all()
    assert table["explanation"].str.len().min() > 10


def test_closed_form_matches_the_model_for_a_tiny_config():
    config = tiny_nvlm_d_config()
    assert count_nvlm_d_parameters(NVLMDForConditionalGeneration(config)) == expected_nvlm_d_parameters(config)


@pytest.mark.parametrize("num_gpus, quota, layers", [
    (1, [80], [80]),
    (2, [27, 54], [28, 52]),
    (4, [12, 23, 23, 23], [13, 23, 23, 21]),
    (8, [6, 11, 11, 11, 11, 11, 11, 11], [7, 11, 11, 11, 11, 11, 11, 7]),
])
def test_split_model_places_layers_by_the_cards_rule(num_gpus, quota, layers):
    per_gpu = math.ceil(80 / (num_gpus - 0.5))
    assert quota == [math.ceil(per_gpu / 2)] + [per_gpu] * (num_gpus - 1) == split_model_layer_quota(num_gpus)
    device_map = split_model_device_map(num_gpus)
    assert split_model_layers_per_gpu(num_gpus) == layers and sum(layers) == 80
    for module in ("vision_model", "mlp1", "language_model.model.embed_tokens", "language_model.model.norm",
                   "language_model.lm_head", "language_model.model.rotary_emb", "language_model.model.layers.79"):
        assert device_map[module] == 0
    # layers 0..78 dealt out in order: GPU g holds one contiguous block after GPU g-1's
    order = [device_map[f"language_model.model.layers.{i}"] for i in range(79)]
    assert order == sorted(order) and order[0] == 0
    # the card's loop would also name layers 80, 81, … when the quotas over-count; only real layers are placed
    assert {int(k.rsplit(".", 1)[1]) for k in device_map if ".layers." in k} == set(range(80))


def test_split_model_bytes_per_gpu(nvlm_72b):
    placement = split_model_placement(nvlm_72b, 4)
    layer_bytes = 2 * LLM_LAYER
    gpu0 = 2 * (VIT + MLP1 + 2 * EMBED + 8192) + 13 * layer_bytes
    assert placement.bytes_per_device == {0: gpu0, 1: 23 * layer_bytes, 2: 23 * layer_bytes, 3: 21 * layer_bytes}
    assert sum(placement.bytes_per_device.values()) == 2 * EXPECTED["total"]
    assert placement.layers_per_device == {0: 13, 1: 23, 2: 23, 3: 21} and placement.fits
    # two GPUs: the card's rule puts 52 layers (85.0 GiB of weights) on GPU 1 — more than an 80 GB card
    two = split_model_placement(nvlm_72b, 2)
    assert round(two.bytes_per_device[1] / GiB, 2) == 85.01 and not two.fits


def test_accelerate_plan_next_to_split_model_and_navil(nvlm_72b):
    auto = accelerate_placement(nvlm_72b, 2)
    assert auto.fits and set(auto.bytes_per_device) == {0, 1}
    assert sum(auto.bytes_per_device.values()) == 2 * EXPECTED["total"]
    assert sum(auto.layers_per_device.values()) == 80 and max(auto.bytes_per_device.values()) <= 76 * GiB
    assert auto.vit_device == 0
    one = accelerate_placement(nvlm_72b, 1)                     # 147 GiB of bf16 weights cannot fit one 80 GB GPU
    assert not one.fits and "cpu" in one.bytes_per_device
    table = placement_table(placement_comparison((2,)))
    assert list(table[["model", "method"]].drop_duplicates().itertuples(index=False, name=None)) == [
        ("NVLM-D-72B", "card split_model"), ("NVLM-D-72B", "accelerate balanced"),
        ("NaViL-2B", "accelerate balanced"), ("NaViL-9B", "accelerate balanced")]
    assert len(table) == 8 and set(table["device"]) == {"0", "1"}
    by = table.set_index(["model", "method", "device"])
    assert by.loc[("NVLM-D-72B", "card split_model", "1"), "decoder layers"] == 52
    assert not by.loc[("NVLM-D-72B", "card split_model", "1"), "fits"]
    assert by.loc[("NVLM-D-72B", "accelerate balanced", "0"), "fits"]
    assert table.groupby(["model", "method"])["decoder layers"].sum().to_dict() == {
        ("NVLM-D-72B", "accelerate balanced"): 80, ("NVLM-D-72B", "card split_model"): 80,
        ("NaViL-2B", "accelerate balanced"): 24, ("NaViL-9B", "accelerate balanced"): 36}
    from navil_utils.plotting.planning import plot_placements

    axes = plot_placements(table)
    assert len(axes) == 1 and len(axes[0].patches) == 8


@pytest.mark.parametrize("batch", [1, 2])
def test_kv_formula_matches_a_dynamic_cache(batch):
    torch.manual_seed(0)
    config = tiny_nvlm_d_config(llm_layers=3, llm_heads=4, llm_kv_heads=2)
    model = NVLMDForConditionalGeneration(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 100, (batch, 11))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    cache = out.cache
    stored = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    geometry = LLMGeometry.from_config(config)
    assert (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == (3, 2, 16)
    assert stored == kv_cache_bytes(3, 2, 16, 11, batch_size=batch, bytes_per_element=2) == 2 * 3 * 2 * 16 * 11 * batch * 2
    assert stored == geometry.kv_bytes(11, batch_size=batch)


def test_request_memory_for_a_1920x1080_image():
    nvlm = nvlm_d_request_memory(nvlm_d_72b_config())
    assert (nvlm.image_tokens, nvlm.tag_tokens, nvlm.prompt_tokens, nvlm.final_tokens) == (768, 15, 1039, 1551)
    assert nvlm.kv_prefill == 2 * 80 * 8 * 128 * 1039 * 2 and nvlm.kv_final == 2 * 80 * 8 * 128 * 1551 * 2
    assert nvlm.vit_tokens == 3 * 1025
    assert nvlm.llm_activation == 2 * 1039 * (2 * 8192 + 3 * 29568) + 4 * 152064
    assert nvlm.llm_activation == llm_prefill_activation_bytes(LLMGeometry.from_config(nvlm_d_72b_config()), 1039)
    assert nvlm.vit_activation == 2 * 3075 * (2 * 3200 + 2 * 12800)
    navil = navil_request_memory(navil_9b_config(), name="NaViL-9B")
    assert navil.image_tokens == navil_token_count(1080, 1920) == 4190
    assert navil.image_tokens + navil.tag_tokens == navil_token_count(1080, 1920, span=True) == 4304
    assert navil.kv_final == 2 * 36 * 8 * 128 * (4304 + 256 + 512) * 2
    assert navil.vit_tokens == 4 * 4190
    table = request_memory_table().set_index("model")
    assert list(table.index) == ["NVLM-D-72B", "NaViL-2B", "NaViL-9B"]
    assert table.loc["NVLM-D-72B", "KV at end (GiB)"] == round(nvlm.kv_final / GiB, 3) == 0.473
    assert table.loc["NVLM-D-72B", "peak stage"] == "LLM" and table.loc["NaViL-9B", "peak stage"] == "ViT"
    assert (table["prompt tokens"] == [1039, 4560, 4560]).all()


def test_decode_roofline_of_nvlm_d_72b_and_its_figure():
    from navil_utils.analysis.roofline import GPU_BANDWIDTH, decode_roofline_table, decode_step_weights
    from navil_utils.models.configuration_nvlm_d import nvlm_d_72b_config
    from navil_utils.models.modeling_nvlm_d import build_empty_nvlm_d
    from navil_utils.plotting.planning import plot_decode_roofline

    config = nvlm_d_72b_config()
    model = build_empty_nvlm_d(config, torch.bfloat16)
    llm = config.llm_config
    h, i, kv = llm.hidden_size, llm.intermediate_size, llm.num_key_value_heads * (llm.hidden_size // llm.num_attention_heads)
    layer = h * h + 2 * h * kv + (h + 2 * kv) + h * h + 3 * h * i + 2 * h   # q,k,v (+ biases), o, MLP, two norms
    weights = decode_step_weights(model)
    assert weights["layers"] == llm.num_hidden_layers * layer                # the whole dense decoder is read
    assert weights["lm_head"] == llm.vocab_size * h + h
    table = decode_roofline_table({"NVLM-D-72B": model}, (1, 2, 8), gpu="H200")
    bound = GPU_BANDWIDTH["H200"] / (2 * sum(weights.values()))
    assert table["tokens/s (bound)"].tolist() == pytest.approx([bound, bound, bound, 2 * bound, bound, 8 * bound])
    ax = plot_decode_roofline(table, gpu_memory_gib=80)
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"NVLM-D-72B, tensor parallel", "NVLM-D-72B, layers per GPU"}
    assert list(lines["NVLM-D-72B, tensor parallel"].get_xdata()) == [2, 8]     # 143 GB do not fit one 80 GiB GPU
    assert ax.get_ylabel() and ax.get_xlabel() == "GPUs"
