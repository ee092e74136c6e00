"""ModelConfig from HF config.json (V3.2, V3, FP8, YaRN), the tiny preset, and errors that name the key."""

from __future__ import annotations

import json

import pytest

from dsv32.config import ConfigError, EngineConfig, ModelConfig, tiny_config

REAL_V32 = {
    "architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32", "vocab_size": 129280,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "rms_norm_eps": 1e-6, "rope_theta": 10000, "max_position_embeddings": 163840,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "index_n_heads": 64, "index_head_dim": 128, "index_topk": 2048, "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
}


def test_real_v32_config() -> None:
    c = ModelConfig.from_hf_config(REAL_V32)
    assert c.has_indexer and c.index_topk == 2048 and c.kv_latent_dim == 576
    assert c.rope_scaling is not None and c.rope_scaling.factor == 40.0
    assert c.quantization is not None and c.quantization.scale_fmt == "ue8m0"
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]


def test_v3_config_is_dense_mla() -> None:
    cfg = {k: v for k, v in REAL_V32.items() if not k.startswith("index_")}
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    assert not ModelConfig.from_hf_config(cfg).has_indexer


def test_rope_parameters_spelling_is_accepted() -> None:
    cfg = dict(REAL_V32)
    cfg.pop("rope_scaling")
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
                              "original_max_position_embeddings": 4096}
    c = ModelConfig.from_hf_config(cfg)
    assert c.rope_theta == 50000.0 and c.rope_scaling is not None and c.rope_scaling.factor == 8.0


@pytest.mark.parametrize("change, key", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "architectures"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 9}, "topk_group"),
    ({"scoring_func": "softmax"}, "scoring_func"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling.type"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
    ({"index_topk": None}, "index_topk"),
])
def test_inconsistent_config_names_the_key(change: dict, key: str) -> None:
    cfg = {**REAL_V32, **change}
    if change.get("index_topk", 0) is None:
        del cfg["index_topk"]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        ModelConfig.from_hf_config(cfg)


def test_from_pretrained_reads_folder_and_reports_bad_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(REAL_V32))
    assert ModelConfig.from_pretrained(str(tmp_path)).hidden_size == 7168
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_pretrained(str(tmp_path / "nope"))


def test_tiny_preset_is_a_real_v32_architecture() -> None:
    c = ModelConfig.from_pretrained("tiny")
    assert c == tiny_config()
    assert c.vocab_size == 129280 and c.has_indexer and c.kv_latent_dim == 576 and c.n_group > 1
    assert c.num_nextn_predict_layers == 1


def test_engine_config_validates_flags() -> None:
    with pytest.raises(ConfigError, match="--kv-cache-dtype"):
        EngineConfig(kv_cache_dtype="int4")
    with pytest.raises(ConfigError, match="--max-num-seqs"):
        EngineConfig(max_num_seqs=0)


def test_kernel_backend_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSV32_KERNEL_BACKEND", raising=False)
    assert EngineConfig().kernel_backend == "auto"
    monkeypatch.setenv("DSV32_KERNEL_BACKEND", "torch")
    assert EngineConfig().kernel_backend == "torch"
    assert EngineConfig(kernel_backend="triton").kernel_backend == "triton"
    with pytest.raises(ConfigError, match="--kernel-backend 'cutlass'"):
        EngineConfig(kernel_backend="cutlass")
    with pytest.raises(ConfigError, match="--openmp-spin-count"):
        EngineConfig(openmp_spin_count=-1)
