"""Decode roofline accounting: the weights one text-token decode step reads, from the config's shapes."""
from __future__ import annotations

import pytest
import torch

from navil_utils.analysis.roofline import (decode_step_weight_bytes, decode_step_weights, measure_gemv_bandwidth,
                                           measure_matmul_flops, prefill_flops)
from navil_utils.reference.golden import load_golden_case


def _expected_text_path(name: str, c) -> tuple[int, int]:
    h, i, d = c.hidden_size, c.intermediate_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    if name == "internlm2_ve":
        attention = h * (q + 2 * kv) + q * h                      # wqkv, wo
    else:
        attention = h * (q + 2 * kv) + q * h + 2 * d              # q/k/v/o_proj, q_norm, k_norm
    layer = attention + 3 * h * i + 2 * h                         # gated MLP, two RMSNorms
    return c.num_hidden_layers * layer, c.vocab_size * h + h      # layers; LM head + final norm


@pytest.mark.parametrize("name", ["internlm2_ve", "qwen3_ve"])
def test_decode_step_reads_the_text_path_only(name):
    model = load_golden_case(name).model
    config = model.config.llm_config
    layers, head = _expected_text_path(name, config)
    assert decode_step_weights(model) == {"layers": layers, "lm_head": head, "embedding_row": config.hidden_size}
    total = layers + head + config.hidden_size
    assert decode_step_weight_bytes(model) == 4 * total
    assert decode_step_weight_bytes(model, torch.bfloat16) == 2 * total
    # the visual experts double the layers' weights, but a text token does not read them
    language = sum(p.numel() for n, p in model.language_model.named_parameters() if ".layers." in n)
    assert language > 1.9 * layers
    vit = sum(p.numel() for p in model.vision_model.parameters())
    assert prefill_flops(model, 100, 40) == 2.0 * (layers * 100 + vit * 40 + head)


def test_machine_measurements_are_positive_and_finite():
    bandwidth = measure_gemv_bandwidth(torch.float32, mib=16, repeats=2)
    flops = measure_matmul_flops(torch.float32, size=256, repeats=2)
    assert 1e8 < bandwidth < 1e13 and 1e8 < flops < 1e15


def test_decode_roofline_of_layer_and_tensor_parallel_plans():
    from navil_utils.analysis.roofline import decode_roofline

    assert decode_roofline(2e9, 4e12) == pytest.approx(2000.0)
    assert decode_roofline(2e9, 4e12, 8, "layers") == pytest.approx(2000.0)     # GPUs take turns
    assert decode_roofline(2e9, 4e12, 8, "tensor") == pytest.approx(16000.0)
    with pytest.raises(ValueError, match="parallelism"):
        decode_roofline(2e9, 4e12, 2, "pipeline")
    with pytest.raises(ValueError, match="num_gpus"):
        decode_roofline(2e9, 4e12, 0)


@pytest.mark.parametrize("name", ["internlm2_ve", "qwen3_ve"])
def test_decode_weights_of_a_meta_device_model_equal_the_real_ones(name):
    from navil_utils.models.common import build_on_meta
    from navil_utils.models.modeling_navil import NaViLForConditionalGeneration

    model = load_golden_case(name).model
    empty = build_on_meta(NaViLForConditionalGeneration, model.config)
    assert next(empty.parameters()).device.type == "meta"
    assert decode_step_weights(empty) == decode_step_weights(model)


def test_decode_roofline_table_of_navil_2b_from_its_config():
    from navil_utils.analysis.nvlm_planning import kv_cache_bytes
    from navil_utils.analysis.roofline import GPU_BANDWIDTH, decode_roofline_table
    from navil_utils.models.presets import build_empty_model, navil_2b_config

    config = navil_2b_config()
    layers, head = _expected_text_path("internlm2_ve", config.llm_config)
    weights = 2 * (layers + head + config.llm_config.hidden_size)
    llm = config.llm_config
    kv = kv_cache_bytes(llm.num_hidden_layers, llm.num_key_value_heads, llm.hidden_size // llm.num_attention_heads,
                        1000)
    table = decode_roofline_table({"NaViL-2B": build_empty_model(config, torch.bfloat16)}, (1, 4), gpu="H200",
                                  context_tokens=1000)
    assert len(table) == 4 and set(table["parallelism"]) == {"layers", "tensor"}
    row = table[(table["GPUs"] == 4) & (table["parallelism"] == "tensor")].iloc[0]
    assert row["weights GB"] == pytest.approx(weights / 1e9)
    assert row["KV cache GB"] == pytest.approx(kv / 1e9)
    assert row["tokens/s (bound)"] == pytest.approx(4 * GPU_BANDWIDTH["H200"] / (weights + kv))
    layered = table[table["parallelism"] == "layers"]["tokens/s (bound)"]
    assert layered.nunique() == 1
    with pytest.raises(ValueError, match="unknown GPU"):
        decode_roofline_table({}, gpu="TPU")
