"""Decoding without per-step waste (navil_utils.models.fast_decode): the preallocated KV cache returns exactly
what transformers' DynamicCache returns, and generation with it — and with prepacked bf16 linears, column-major
float32 weights and the float32 attention of bf16 decode steps — gives the same ids as without, and the golden
fixtures' ids."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from navil_utils.models.fast_decode import (
    PreallocatedCache,
    PreallocatedLayer,
    column_major_cpu_linears,
    cpu_decode_attention,
    pack_cpu_linears,
    packed_linears_supported,
    prepare_cpu_decode,
    restore_cpu_linears,
    unpack_cpu_linears,
    uses_cpu_decode_attention,
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
    restore_cpu_linears(model)
    model.cpu_decode_kernels = False
    plain = model.generate(**case.image_inputs, max_new_tokens=8, do_sample=False)
    assert not any("forward" in m.__dict__ for m in model.language_model.modules())   # stayed unpacked
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


def test_column_major_weights_keep_values_keys_and_training():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.Linear(96, 16), nn.Linear(24, 24)).float()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 32)
    expected = model[1](model[0](x))
    with torch.inference_mode():                       # generate may run under inference mode
        assert column_major_cpu_linears(model) == 2      # 32->96 and 24->24 (out >= in); 96->16 stays
    wide, narrow, square = model[0].weight, model[1].weight, model[2].weight
    assert wide.stride() == (1, 96) and square.stride() == (1, 24) and narrow.is_contiguous()
    assert not wide.is_inference()                     # still trainable
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(model[1](model[0](x)), expected, rtol=1e-6, atol=1e-6)
    assert column_major_cpu_linears(model) == 0        # idempotent
    model[1](model[0](x)).sum().backward()             # training works on the moved weights
    assert wide.grad is not None and wide.grad.shape == wide.shape
    assert restore_cpu_linears(model) == 2 and wide.is_contiguous() and square.is_contiguous()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


def test_column_major_model_saves_and_reloads(tmp_path):
    from navil_utils.models import load_model

    case = load_golden_case("qwen3_ve")
    model = case.model
    reference = model(**case.image_inputs).logits
    generated = model.generate(**case.image_inputs, max_new_tokens=8, do_sample=False)   # prepares the linears
    assert any(m.weight.stride()[0] == 1 for m in model.language_model.modules()
               if type(m) is nn.Linear and m.out_features > 1 and m.out_features >= m.in_features)
    assert generated[0, -8:].tolist() == case.meta["generated_ids"][:8]
    model.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path, special_token_ids=case.meta["special_token_ids"])
    torch.testing.assert_close(reloaded(**case.image_inputs).logits, reference, rtol=0, atol=1e-6)


def test_prepare_cpu_decode_is_idempotent_per_dtype():
    fp32 = nn.Sequential(nn.Linear(8, 32))
    assert prepare_cpu_decode(fp32) == 1 and prepare_cpu_decode(fp32) == 0
    bf16 = nn.Sequential(nn.Linear(8, 32)).to(torch.bfloat16)
    expected = 1 if packed_linears_supported() else 0
    assert prepare_cpu_decode(bf16) == expected and prepare_cpu_decode(bf16) == 0
    assert bf16[0].weight.is_contiguous()                 # bf16 weights keep their layout (packed copy instead)


def _attention_reference(query, key, value, mask=None):
    """Plain float64 attention with grouped heads repeated: (B, H, Lq, D) -> (B, Lq, H, D)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(groups, dim=1) for t in (key, value))
    scores = query.double() @ key.transpose(-1, -2) / query.shape[-1] ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_decode_attention_matches_float64_attention(dtype):
    generator = torch.Generator().manual_seed(3)
    query = (3 * torch.randn(2, 8, 1, 64, generator=generator)).to(dtype)
    key, value = (torch.randn(2, 4, 57, 64, generator=generator).to(dtype) for _ in range(2))
    mask = torch.ones(2, 1, 1, 57, dtype=torch.bool)
    mask[1, ..., :9] = False                                       # left padding of the second sequence
    ours, probs = cpu_decode_attention(None, query, key, value, mask, scaling=64 ** -0.5)
    assert probs is None and ours.dtype == dtype and ours.shape == (2, 1, 8, 64)
    reference = _attention_reference(query, key, value, mask)
    error = (ours.double() - reference).abs().max().item()
    sdpa = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
    sdpa_error = (sdpa.transpose(1, 2).double() - reference).abs().max().item()
    # computed in float32: for bf16/fp16 the output's rounding dominates (within one unit of its precision);
    # float32 inputs keep a few float32 roundings of the sums
    units = 1 if dtype != torch.float32 else 16
    assert error <= units * torch.finfo(dtype).eps * reference.abs().max().item()
    assert error <= 2 * sdpa_error + 1e-7        # as accurate as torch's SDPA (whose kernels differ by CPU)
    additive = torch.zeros(2, 1, 1, 57).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(cpu_decode_attention(None, query, key, value, additive)[0], ours, rtol=0, atol=0)


def test_cpu_decode_attention_is_chosen_for_half_precision_decode_steps_on_cpu():
    one, many = torch.zeros(1, 1, 8), torch.zeros(1, 5, 8)
    assert uses_cpu_decode_attention("sdpa", one.bfloat16()) and uses_cpu_decode_attention("sdpa", one.half())
    assert not uses_cpu_decode_attention("sdpa", one)                   # float32: sdpa is fast
    assert not uses_cpu_decode_attention("sdpa", many.bfloat16())       # prompts keep sdpa
    assert not uses_cpu_decode_attention("eager", one.bfloat16())       # other implementations are respected
