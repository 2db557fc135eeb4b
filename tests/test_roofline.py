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
