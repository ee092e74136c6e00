"""Write a trained ``TrainableDeepseekV32`` as an HF checkpoint folder: ``config.json`` (``DeepseekV32ForCausalLM``),
``model.safetensors`` in the real checkpoint's tensor names and per-expert layout, and the tokenizer files.

The compact vocabulary is expanded to the model's full one: the embedding rows of tokens the corpus never uses are
zero, and their LM-head rows are all the one shared row the trainer learned for "any other token" (so they score
alike, and low). Identical and zero rows cost almost nothing once compressed (git stores objects zlib-compressed).
The MTP layer is written as ``model.layers.{num_hidden_layers}`` without its copies of the embedding and head
(vLLM, SGLang and our loader share the main model's).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dsv32.config import ModelConfig
from dsv32.tokenizer import DEFAULT_BOS_TOKEN, DEFAULT_EOS_TOKEN, packaged_tokenizer_path
from dsv32.train.network import TrainableDeepseekV32

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """``config.json`` as HF transformers' ``DeepseekV32Config`` and our ``ModelConfig.from_hf_config`` read it."""
    if config.rope_scaling is not None or config.quantization is not None:
        raise ValueError("the demo export writes unquantised weights with plain RoPE (rope_scaling None)")
    keys = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "first_k_dense_replace", "moe_layer_freq", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
            "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts",
            "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor", "norm_topk_prob", "scoring_func",
            "topk_method", "hidden_act", "rms_norm_eps", "rope_theta", "max_position_embeddings", "index_n_heads",
            "index_head_dim", "index_topk", "num_nextn_predict_layers", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "torch_dtype")
    out: dict[str, Any] = {"architectures": [config.architecture], "model_type": "deepseek_v32"}
    out.update({key: getattr(config, key) for key in keys})
    out.update(num_key_value_heads=config.num_attention_heads, rope_scaling=None, attention_bias=False,
               dtype=config.torch_dtype)
    return out


def state_dict(model: TrainableDeepseekV32, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: ``token_ids[i]`` is the real id of compact token ``i``."""
    config = model.config
    dtype = _DTYPES[config.torch_dtype]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        # Norms, the router and its bias stay fp32, as in DeepSeek's checkpoints; matrices in the config's dtype.
        keep_fp32 = tensor.dim() == 1 or name.endswith("mlp.gate.weight")
        tensors[name] = tensor.detach().to(torch.float32 if keep_fp32 else dtype).contiguous()
    embed = model.model.embed_tokens.weight.detach()
    head = model.lm_head.weight.detach()
    full_embed = torch.zeros(config.vocab_size, config.hidden_size, dtype=dtype)
    full_embed[token_ids] = embed.to(dtype)
    full_head = head[-1].to(dtype).expand(config.vocab_size, -1).clone()
    full_head[token_ids] = head[:-1].to(dtype)
    tensors["model.embed_tokens.weight"] = full_embed
    tensors["lm_head.weight"] = full_head
    return tensors


def export_checkpoint(model: TrainableDeepseekV32, token_ids: torch.Tensor, out_dir: str | Path,
                      metadata: dict[str, str] | None = None) -> Path:
    """Write the checkpoint folder ``out_dir`` (created if needed) and return it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_dict(model, token_ids), str(out / "model.safetensors"),
              metadata={"format": "pt", **(metadata or {})})
    (out / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(packaged_tokenizer_path(), out / "tokenizer.json")
    tokenizer_config = {"bos_token": DEFAULT_BOS_TOKEN, "eos_token": DEFAULT_EOS_TOKEN, "add_bos_token": False,
                        "add_eos_token": False, "model_max_length": model.config.max_position_embeddings,
                        "tokenizer_class": "PreTrainedTokenizerFast"}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    return out
