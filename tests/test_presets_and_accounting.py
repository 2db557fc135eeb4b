"""Full-size NaViL configs: parameter counts vs the paper, meta-device models, device-map plans."""
from __future__ import annotations

import json
import math

import pytest
import torch

from navil_utils.analysis.device_maps import plan_device_map
from navil_utils.analysis.parameters import (
    PAPER_PARAMETERS,
    compare_with_paper,
    count_parameters,
    expected_parameter_counts,
    parameter_component,
)
from navil_utils.errors import ConfigError
from navil_utils.models.presets import (
    FULL_SIZE_CONFIGS,
    build_empty_model,
    navil_2b_config,
    navil_9b_config,
    navil_config_dict,
)
from navil_utils.reference.fixtures import GOLDEN_VARIANTS, golden_dir

BUILDERS = {"NaViL-2B": navil_2b_config, "NaViL-9B": navil_9b_config}


@pytest.fixture(scope="module")
def meta_models():
    return {name: build_empty_model(builder(), dtype=torch.bfloat16) for name, builder in BUILDERS.items()}


def test_configs_follow_table_6():
    c2, c9 = navil_2b_config(), navil_9b_config()
    table6 = {  # (ViT depth, width, MLP, heads, LLM depth, width, MLP, heads)
        "NaViL-2B": (24, 1472, 5888, 23, 24, 2048, 8192, 16),
        "NaViL-9B": (32, 1792, 7168, 28, 36, 4096, 12288, 32),
    }
    for name, cfg in (("NaViL-2B", c2), ("NaViL-9B", c9)):
        v, llm = cfg.vision_config, cfg.llm_config
        assert (v.num_hidden_layers, v.hidden_size, v.intermediate_size, v.num_attention_heads,
                llm.num_hidden_layers, llm.hidden_size, llm.intermediate_size, llm.num_attention_heads) == table6[name]
        assert v.patch_size == 16 and cfg.merge_size == 2 and v.head_dim == 64
    assert (c2.template, c9.template) == ("internlm2-chat", "qwen3-chat")
    assert c2.llm_architecture == "InternLM2VEForCausalLM" and c9.llm_architecture == "Qwen3VEForCausalLM"


def test_overrides_and_unknown_name():
    small = navil_2b_config(llm_config={"num_hidden_layers": 2}, template="qwen3-chat")
    assert small.llm_config.num_hidden_layers == 2 and small.llm_config.hidden_size == 2048
    assert small.template == "qwen3-chat"
    assert navil_2b_config().llm_config.num_hidden_layers == 24   # the module constant is not mutated
    with pytest.raises(ConfigError, match="unknown NaViL size"):
        navil_config_dict("NaViL-72B")


@pytest.mark.parametrize("name", sorted(FULL_SIZE_CONFIGS))
def test_meta_model_counts_match_closed_form(name, meta_models):
    model = meta_models[name]
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model).as_dict() == expected_parameter_counts(navil_config_dict(name)).as_dict()


@pytest.mark.parametrize("variant", GOLDEN_VARIANTS)
def test_counts_on_golden_tiny_models(variant):
    """The fixtures' reference parameter counts (359,296 / 433,792) from the real weights' keys."""
    from safetensors import safe_open

    config = json.loads((golden_dir(variant) / "config.json").read_text())
    expected = {"internlm2_ve": 359_296, "qwen3_ve": 433_792}[variant]
    assert expected_parameter_counts(config).total == expected
    components: dict[str, int] = {}
    with safe_open(str(golden_dir(variant) / "model.safetensors"), "pt") as f:
        for key in f.keys():
            part = parameter_component(key)
            components[part] = components.get(part, 0) + math.prod(f.get_slice(key).get_shape())
    assert components == {k: v for k, v in expected_parameter_counts(config).components.items() if v}


@pytest.mark.parametrize("name", sorted(FULL_SIZE_CONFIGS))
def test_counts_agree_with_paper_within_six_percent(name, meta_models):
    counts = count_parameters(meta_models[name])
    paper = PAPER_PARAMETERS[name]
    for quantity in ("total", "active", "vision_encoder", "llm_active"):
        if paper[quantity]:
            assert abs(getattr(counts, quantity) / paper[quantity] - 1) < 0.06, quantity
    # the explanation in the module docstring: experts duplicate attention + FFN only
    parts = counts.components
    assert counts.total == counts.active + parts["visual_experts"]
    assert parts["text_experts"] == parts["visual_experts"]


def test_exact_counts_documented_in_notebook(meta_models):
    c2, c9 = (count_parameters(meta_models[n]) for n in ("NaViL-2B", "NaViL-9B"))
    assert round(c2.total / 1e9, 2) == 4.04 and round(c2.active / 1e9, 2) == 2.53
    assert round(c2.vision_encoder / 1e9, 3) == 0.626
    assert round(c9.active / 1e9, 2) == 9.47 and round(c9.vision_encoder / 1e9, 3) == 1.235
    table = compare_with_paper({"NaViL-2B": c2, "NaViL-9B": c9})
    assert set(table["model"]) == {"NaViL-2B", "NaViL-9B"} and len(table) == 8


@pytest.mark.parametrize("num_gpus", [1, 2, 4, 8])
def test_device_map_plans(meta_models, num_gpus):
    model = meta_models["NaViL-9B"]
    plan = plan_device_map(model, num_gpus, gpu_memory_gib=80, dtype=torch.bfloat16)
    total_bytes = 2 * count_parameters(model).total  # bf16; buffers are non-persistent
    assert plan.fits_on_gpus
    assert sum(plan.bytes_per_device.values()) == total_bytes
    assert set(plan.bytes_per_device) == set(range(num_gpus))
    assert max(plan.bytes_per_device.values()) <= 76 * 1024**3
    # decoder layers are never split across devices
    assert not any(".layers." in name and name.count(".") > 3 for name in plan.device_map)
    summary = plan.summary()
    assert list(summary["device"]) == [str(i) for i in range(num_gpus)]


def test_device_map_offloads_when_too_small(meta_models):
    plan = plan_device_map(meta_models["NaViL-9B"], 1, gpu_memory_gib=24, dtype=torch.bfloat16)
    assert not plan.fits_on_gpus and "cpu" in plan.bytes_per_device
    assert plan.bytes_per_device[0] <= 20 * 1024**3
