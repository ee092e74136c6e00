"""YaRN frequencies, the two RoPE layouts, FP8 helpers and the KV-cache byte layouts."""

from __future__ import annotations

import torch

from dsv32.config import ModelConfig
from dsv32.kernels.cache_format import CacheLayout, prepare_index_q
from dsv32.kernels.fp8 import act_dequant, act_quant, dequantize_block_fp8, hadamard, quantize_block_fp8
from dsv32.model.cache import KVCache
from dsv32.model.rope import Rotary, rope_cos_sin, rope_inv_freq


def test_yarn_frequencies_of_the_real_model() -> None:
    config = ModelConfig()  # the real DeepSeek-V3.2 defaults: d=64, theta=1e4, factor 40, L0 4096, beta 32/1
    inv = rope_inv_freq(config)
    base = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert inv.shape == (32,)
    assert torch.allclose(inv[:11], base[:11])  # low = floor(10.47) = 10: dims 0..10 kept
    assert torch.allclose(inv[23:], base[23:] / 40)  # high = ceil(22.51) = 23: dims >= 23 interpolated
    ramp = (13 - 10) / 13  # dim 13 sits 3/13 of the way along the ramp
    assert torch.isclose(inv[13], base[13] / 40 * ramp + base[13] * (1 - ramp))
    assert abs(config.softmax_scale - 0.1352337789) < 1e-9


def test_interleaved_and_half_split_are_the_same_rotation_up_to_a_permutation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, generator=gen)
    cos, sin = rope_cos_sin(rope_inv_freq(ModelConfig().with_overrides(qk_rope_head_dim=8)), torch.arange(5),
                            torch.float32)
    interleaved = Rotary.build(cos, sin, 8, interleaved=True)(x)
    perm = torch.cat((torch.arange(0, 8, 2), torch.arange(1, 8, 2)))  # (x0, x1, ..) -> (x0, x2, .., x1, x3, ..)
    half = Rotary.build(cos, sin, 8, interleaved=False)(x[..., perm])
    assert torch.allclose(interleaved[..., perm], half, atol=1e-6)
    # rotation preserves norms; position 0 is the identity
    assert torch.allclose(interleaved.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(interleaved[0], x[0])
    # pair (x0, x1) at position p turns by angle p * f_0: the textbook form
    c, s = cos[:, 0, None], sin[:, 0, None]
    assert torch.allclose(interleaved[:, :, 0], x[:, :, 0] * c - x[:, :, 1] * s, atol=1e-6)
    assert torch.allclose(interleaved[:, :, 1], x[:, :, 1] * c + x[:, :, 0] * s, atol=1e-6)


def test_partial_rotary_passes_the_other_dims_through() -> None:
    cos, sin = rope_cos_sin(rope_inv_freq(ModelConfig().with_overrides(qk_rope_head_dim=4)), torch.arange(1, 4),
                            torch.float32)
    x = torch.randn(3, 2, 10, generator=torch.Generator().manual_seed(1))
    y = Rotary.build(cos, sin, 10, interleaved=False)(x)
    assert torch.equal(y[..., 4:], x[..., 4:])
    assert torch.allclose(y[..., 0], x[..., 0] * cos[:, None, 0] - x[..., 2] * sin[:, None, 0], atol=1e-6)
    # a [T, width] input (no head dim) broadcasts the same way
    assert torch.allclose(Rotary.build(cos, sin, 10, interleaved=False)(x[:, 0]), y[:, 0])


def test_block_fp8_roundtrip_with_partial_blocks() -> None:
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(0))
    q, s = quantize_block_fp8(w)
    assert s.shape == (2, 3) and q.dtype == torch.float8_e4m3fn
    back = dequantize_block_fp8(q, s, dtype=torch.float32)
    assert ((back - w).abs() <= w.abs() * 0.07 + 1e-3).all()


def test_act_quant_ue8m0_scales_are_powers_of_two() -> None:
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)) * 3
    q, s = act_quant(x, 128)
    assert s.shape == (4, 2)
    assert torch.equal(torch.log2(s), torch.log2(s).round())
    assert (s >= x.abs().unflatten(-1, (2, 128)).amax(-1) / 448).all()
    assert torch.allclose(act_dequant(q, s, torch.float32), x, rtol=0.07, atol=s.max().item() / 8)


def test_hadamard_is_orthonormal() -> None:
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    y = hadamard(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4)
    assert torch.allclose(hadamard(y), x, atol=1e-5)  # the normalised Sylvester matrix is its own inverse


def test_cache_layout_sizes_match_flashmla_and_deepseek() -> None:
    fp8 = CacheLayout(512, 64, 128, "fp8", torch.bfloat16)
    assert fp8.latent_width == 656 and fp8.index_width == 132 and fp8.bytes_per_token() == 788
    auto = CacheLayout(512, 64, 128, "auto", torch.bfloat16)
    assert auto.bytes_per_token() == (576 + 128) * 2
    dense = CacheLayout(512, 64, 0, "auto", torch.bfloat16)
    assert dense.bytes_per_token() == 1152


def test_fp8_cache_roundtrip() -> None:
    layout = CacheLayout(512, 64, 128, "fp8", torch.bfloat16)
    cache = KVCache(layout, num_layers=1, num_blocks=2, block_size=4, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(3)
    c, k_pe, k = (torch.randn(3, n, generator=gen).bfloat16() for n in (512, 64, 128))
    slots = torch.tensor([5, 0, 7])
    cache.write_latent(0, slots, c, k_pe)
    cache.write_index_k(0, slots, k)
    c2, pe2 = cache.read_latent(0, slots)
    assert torch.equal(pe2, k_pe)  # the rope part is stored exactly (bf16)
    assert torch.allclose(c2.float(), c.float(), rtol=0.07, atol=0.02)
    # index keys come back Hadamard-rotated: scores against a rotated query are preserved
    q = torch.randn(2, 128, generator=gen).bfloat16()
    scores = prepare_index_q(q, layout) @ cache.read_index_k(0, slots).T
    assert torch.allclose(scores, q.float() @ k.float().T, rtol=0.1, atol=1.0)
