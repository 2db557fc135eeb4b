"""Decoding without per-step waste (navil_utils.models.fast_decode): the preallocated KV cache returns exactly
what transformers' DynamicCache returns, and generation with it — and with prepacked bf16 linears — gives the
same ids as without, and the golden fixtures' ids."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from navil_utils.models.fast_decode import (
    PreallocatedCache,
    PreallocatedLayer,
    pack_cpu_linears,
    packed_linears_supported,
    unpack_cpu_linears,
)
from navil_utils.reference.golden import load_golden_case

VARIANTS = ("internlm2_ve", "qwen3_ve")


def _chunks(lengths, batch=2, heads=3, dim=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, heads, n, dim, generator=generator), torch.randn(batch, heads, n, dim, generator=generator))
            for n in lengths]


def test_preallocated_layer_returns_what_concatenation_returns():
    ours, plain = PreallocatedLayer(), DynamicLayer()
    pointers = set()
    for keys, values in _chunks([5] + [1] * 70 + [3]):               # grows past the first 64-position buffer
        k1, v1 = ours.update(keys, values)
        k2, v2 = plain.update(keys, values)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
        assert ours.get_seq_length() == plain.get_seq_length()
        pointers.add(k1.data_ptr())
    assert ours.get_seq_length() == 78
    assert len(pointers) == 2                                           # one reallocation (64 -> 128), no copy per step


def test_preallocated_layer_after_crop_and_batch_selection():
    ours, plain = PreallocatedLayer(), DynamicLayer()
    chunks = _chunks([6, 1, 1, 1, 1], seed=1)
    for keys, values in chunks[:3]:
        ours.update(keys, values)
        plain.update(keys, values)
    for layer in (ours, plain):
        layer.crop(-2)
        layer.batch_select_indices(torch.tensor([1, 0]))
    for keys, values in chunks[3:]:
        k1, v1 = ours.update(keys, values)
        k2, v2 = plain.update(keys, values)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    assert ours.get_seq_length() == 6 + 2 - 2 + 2


def test_preallocated_layer_rejects_keys_of_another_shape():
    layer = PreallocatedLayer()
    layer.update(*_chunks([3])[0])
    with pytest.raises(ValueError, match="cache holds"):
        layer.update(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4))


@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_with_the_preallocated_cache_equals_dynamic_cache(variant):
    case = load_golden_case(variant)
    model = case.model
    layers = model.config.llm_config.num_hidden_layers
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    ours = model.generate(**case.image_inputs, cache=PreallocatedCache(layers), **kwargs)
    plain = model.generate(**case.image_inputs, cache=DynamicCache(config=model.config.llm_config), **kwargs)
    default = model.generate(**case.image_inputs, **kwargs)
    assert torch.equal(ours.sequences, plain.sequences) and torch.equal(default.sequences, ours.sequences)
    for a, b in zip(ours.scores, plain.scores):
        assert torch.equal(a, b)
    assert ours.sequences[0, -8:].tolist() == case.meta["generated_ids"][:8]
    beams = [model.generate(**case.image_inputs, cache=cache, max_new_tokens=6, num_beams=3, do_sample=False)
             for cache in (PreallocatedCache(layers), DynamicCache(config=model.config.llm_config))]
    assert torch.equal(beams[0], beams[1])


def test_decoder_forward_builds_a_preallocated_cache():
    case = load_golden_case("qwen3_ve")
    out = case.model(**case.image_inputs, use_cache=True)
    assert isinstance(out.cache, PreallocatedCache)
    assert out.cache.get_seq_length() == case.image_inputs["input_ids"].shape[1]


def test_packed_linear_equals_the_default_bf16_linear():
    linear = nn.Linear(96, 200).to(torch.bfloat16)
    x = torch.randn(1, 1, 96).to(torch.bfloat16)
    with torch.no_grad():
        expected = nn.functional.linear(x, linear.weight, linear.bias)
        count = pack_cpu_linears(nn.Sequential(linear))
        if packed_linears_supported():
            assert count == 1 and "forward" in linear.__dict__
            assert torch.equal(linear(x), expected)
            assert linear._navil_packed is not None                       # the packed path ran
            linear.weight.mul_(2)                                         # a changed weight is repacked
            assert torch.equal(linear(x), nn.functional.linear(x, linear.weight, linear.bias))
        else:                                                             # nothing is patched where unsupported
            assert count == 0 and "forward" not in linear.__dict__
    # calls with gradients (training) take the ordinary path
    y = linear(x.requires_grad_())
    y.float().sum().backward()
    assert linear.weight.grad is not None
    assert unpack_cpu_linears(nn.Sequential(linear)) == count and "forward" not in linear.__dict__


@pytest.mark.parametrize("variant", VARIANTS)
def test_bfloat16_greedy_ids_equal_golden_with_and_without_packed_linears(variant):
    case = load_golden_case(variant, dtype=torch.bfloat16)
    model = case.model
    packed = model.generate(**case.image_inputs, max_new_tokens=8, do_sample=False)
    patched = sum("forward" in m.__dict__ for m in model.language_model.modules())
    assert patched == (sum(type(m) is nn.Linear for m in model.language_model.modules())
                       if packed_linears_supported() else 0)
    unpack_cpu_linears(model)
    model.pack_cpu_linears = False
    plain = model.generate(**case.image_inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(packed, plain)
    assert packed[0, -8:].tolist() == case.meta["generated_ids"][:8]


def _rms_norm_by_steps(norm, hidden: torch.Tensor) -> torch.Tensor:
    """The reference RMSNorms written out (cast to float32, scale by 1/rms, weight before or after the cast back)."""
    x = hidden.to(torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    if norm.weight_in_fp32:
        return (norm.weight * x).to(hidden.dtype)
    return norm.weight * x.to(hidden.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("weight_in_fp32", [False, True])
def test_fused_rms_norm_is_bit_identical_to_the_written_out_steps(dtype, weight_in_fp32):
    from navil_utils.models.common import NaViLRMSNorm

    generator = torch.Generator().manual_seed(3)
    for shape in [(1, 1, 512), (2, 491, 96), (1, 8, 1, 64), (3, 77, 4096), (5, 13)]:
        norm = NaViLRMSNorm(shape[-1], 1e-6, weight_in_fp32=weight_in_fp32).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(shape[-1], generator=generator))
        hidden = (torch.randn(*shape, generator=generator) * 7).to(dtype)
        assert torch.equal(norm(hidden), _rms_norm_by_steps(norm, hidden)), shape
