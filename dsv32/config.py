"""Typed, frozen configuration: the model (from an HF ``config.json`` or a preset) and the engine (from flags).

``ModelConfig`` describes the network exactly as DeepSeek's checkpoints do (``DeepseekV32ForCausalLM`` with the
lightning indexer, ``DeepseekV3ForCausalLM`` without it: dense MLA). ``EngineConfig`` carries the serving knobs that
vLLM users know (``max_model_len``, ``max_num_seqs``, ``kv_cache_dtype`` ...). Both are frozen dataclasses: they are
built once at start-up and flow one way into the engine.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

SUPPORTED_ARCHITECTURES = ("DeepseekV32ForCausalLM", "DeepseekV3ForCausalLM")
TINY_PRESET = "tiny"


class ConfigError(ValueError):
    """A config.json (or flag combination) that we cannot run; the message names the offending key."""


@dataclass(frozen=True)
class YarnConfig:
    """YaRN RoPE scaling (``rope_scaling`` / ``rope_parameters`` with ``type``/``rope_type`` = ``yarn``)."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass(frozen=True)
class QuantConfig:
    """A checkpoint's ``quantization_config``, as vLLM / SGLang name the formats:

    * ``fp8`` (DeepSeek's own): e4m3 ``weight`` with fp32 ``weight_scale_inv`` per ``weight_block_size`` block;
    * ``blockwise_int8`` (SGLang): the same names and blocks, int8 codes;
    * ``w8a8_int8`` (SGLang): int8 ``weight`` with a ``weight_scale`` per output channel, activations rounded to int8
      per token at run time;
    * ``compressed-tensors`` ``pack-quantized`` (GPTQ / AWQ exports, vLLM): ``weight_bits``-bit codes packed in int32
      ``weight_packed`` ``[N, K * bits / 32]``, ``weight_scale`` ``[N, K / group]``, ``weight_shape``, optional
      ``weight_zero_point`` and ``weight_g_idx``; the ``ignore`` list's modules keep plain weights.

    Which tensors are quantised is read from the checkpoint's names: a module with a plain ``weight`` is not."""

    quant_method: str = "fp8"
    fmt: str = "e4m3"
    weight_block_size: tuple[int, int] = (128, 128)
    activation_scheme: str = "dynamic"
    scale_fmt: str | None = "ue8m0"
    weight_bits: int = 8


@dataclass(frozen=True)
class ModelConfig:
    """The DeepSeek-V3.x network. Field names follow the HF ``config.json`` keys."""

    architecture: str = "DeepseekV32ForCausalLM"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    num_attention_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: YarnConfig | None = field(default_factory=YarnConfig)
    max_position_embeddings: int = 163840
    # Lightning indexer (DeepSeek Sparse Attention); index_topk == 0 means dense MLA (V3 / V3.1 / R1).
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    torch_dtype: str = "bfloat16"
    quantization: QuantConfig | None = field(default_factory=QuantConfig)

    # ---- derived quantities -------------------------------------------------------------------------
    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_latent_dim(self) -> int:
        """Width of one cached MLA entry: the normed latent plus the shared rope key (576 for the real model)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5`` times ``mscale(factor, mscale_all_dim)**2`` under YaRN (0.13523 for the real model)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim and self.rope_scaling.factor > 1:
            m = 0.1 * self.rope_scaling.mscale_all_dim * math.log(self.rope_scaling.factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ---- construction ---------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from the dict of an HF ``config.json``; unknown architectures and inconsistent values raise
        ``ConfigError`` naming the key."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            model_type = cfg.get("model_type")
            arch = {"deepseek_v32": "DeepseekV32ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}.get(model_type)
        if arch is None:
            raise ConfigError(
                f"config.json key 'architectures' = {archs!r}: expected one of {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        kwargs: dict[str, Any] = {"architecture": arch}
        simple = {f.name for f in fields(cls)} - {"architecture", "rope_scaling", "quantization", "index_topk",
                                                  "torch_dtype", "rope_theta"}
        for key in simple:
            if key in cfg and cfg[key] is not None:
                kwargs[key] = cfg[key]
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        for key in required:
            if key not in cfg:
                raise ConfigError(f"config.json is missing required key '{key}'")
        if cfg.get("q_lora_rank") is None:
            raise ConfigError("config.json key 'q_lora_rank' is null: models without a q LoRA (V2-Lite) are not "
                              "supported")
        # Indexer: present for V3.2 only. A V3.2 config without index keys is inconsistent.
        if arch == "DeepseekV32ForCausalLM":
            for key in ("index_topk", "index_n_heads", "index_head_dim"):
                if key not in cfg:
                    raise ConfigError(f"config.json for DeepseekV32ForCausalLM is missing key '{key}'")
            kwargs["index_topk"] = int(cfg["index_topk"])
        else:
            kwargs["index_topk"] = 0
        kwargs["torch_dtype"] = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling")
        kwargs["rope_theta"] = float(cfg.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0)
        kwargs["rope_scaling"] = _parse_rope(rope)
        kwargs["quantization"] = _parse_quant(cfg.get("quantization_config"))
        if "n_routed_experts" in cfg and cfg["n_routed_experts"] is None:
            kwargs["n_routed_experts"] = 0
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str) -> ModelConfig:
        """Read ``path/config.json`` (``path`` may also be the file itself) or the name of a built-in preset."""
        if path == TINY_PRESET:
            return tiny_config()
        file = path if path.endswith(".json") else os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise ConfigError(f"no config.json at {file!r} (expected an HF checkpoint folder or the preset 'tiny')")
        try:
            with open(file, encoding="utf-8") as fh:
                cfg = json.load(fh)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON: {e}") from None
        return cls.from_hf_config(cfg)

    def with_overrides(self, **kw: Any) -> ModelConfig:
        return replace(self, **kw)


def _parse_rope(rope: dict[str, Any] | None) -> YarnConfig | None:
    if not rope:
        return None
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"config.json key 'rope_scaling.type' = {kind!r}: only 'yarn' (or none) is supported")
    defaults = YarnConfig()
    return YarnConfig(
        factor=float(rope.get("factor", defaults.factor)),
        original_max_position_embeddings=int(
            rope.get("original_max_position_embeddings", defaults.original_max_position_embeddings)),
        beta_fast=float(rope.get("beta_fast", defaults.beta_fast)),
        beta_slow=float(rope.get("beta_slow", defaults.beta_slow)),
        mscale=float(rope.get("mscale", defaults.mscale)),
        mscale_all_dim=float(rope.get("mscale_all_dim", defaults.mscale_all_dim)),
    )


def _parse_quant(q: dict[str, Any] | None) -> QuantConfig | None:
    if not q:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"config.json key 'quantization_config' = {q!r}: expected an object")
    method = q.get("quant_method")
    if method == "compressed-tensors":
        return _parse_compressed_tensors(q)
    if method == "w8a8_int8":
        return QuantConfig(quant_method=method, fmt="int8", activation_scheme="dynamic", scale_fmt=None)
    if method not in BLOCK_SCALED_QUANTIZATION:
        raise ConfigError(f"config.json key 'quantization_config.quant_method' = {method!r}: expected one of "
                          f"{', '.join(CHECKPOINT_QUANTIZATION)}")
    fmt = q.get("fmt", "e4m3") if method == "fp8" else "int8"
    if fmt != "e4m3" and method == "fp8":
        raise ConfigError(f"config.json key 'quantization_config.fmt' = {fmt!r}: only 'e4m3' is supported")
    block = q.get("weight_block_size", [128, 128])
    if not isinstance(block, (list, tuple)) or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ConfigError(f"config.json key 'quantization_config.weight_block_size' = {block!r}: expected [rows, cols]")
    if q.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"config.json key 'quantization_config.activation_scheme' = {q['activation_scheme']!r}: "
                          "only 'dynamic' is supported")
    return QuantConfig(quant_method=method, fmt=fmt, weight_block_size=(int(block[0]), int(block[1])),
                       activation_scheme="dynamic", scale_fmt=q.get("scale_fmt"))


def _parse_compressed_tensors(q: dict[str, Any]) -> QuantConfig:
    """``compressed-tensors``: weight-only integer ``pack-quantized`` groups (W4A16 / W8A16), one bit width."""
    key = "config.json key 'quantization_config"
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{key}.config_groups' = {groups!r}: expected at least one quantisation group")
    bits: set[int] = set()
    for name, group in groups.items():
        where = f"{key}.config_groups.{name}"
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise ConfigError(f"{where}.weights' is missing: expected the weights' quantisation arguments")
        fmt = group.get("format") or q.get("format")
        if fmt != "pack-quantized":
            raise ConfigError(f"{key}.format' = {fmt!r}: only 'pack-quantized' (W4A16 / W8A16) is supported")
        if group.get("input_activations") is not None:
            raise ConfigError(f"{where}.input_activations': only weight-only quantisation (null) is supported")
        weights = group["weights"]
        if weights.get("type", "int") != "int" or weights.get("num_bits") not in (4, 8):
            raise ConfigError(f"{where}.weights.num_bits' = {weights.get('num_bits')!r} ({weights.get('type')}): "
                              "expected int 4 or 8")
        if weights.get("strategy") not in ("group", "channel"):
            raise ConfigError(f"{where}.weights.strategy' = {weights.get('strategy')!r}: expected 'group' or "
                              "'channel'")
        bits.add(weights["num_bits"])
    if len(bits) > 1:
        raise ConfigError(f"{key}.config_groups': groups of {sorted(bits)} bits; one bit width is supported")
    status = q.get("quantization_status", "compressed")
    if status != "compressed":
        raise ConfigError(f"{key}.quantization_status' = {status!r}: expected 'compressed' (packed weights)")
    return QuantConfig(quant_method="compressed-tensors", fmt="pack-quantized", activation_scheme="none",
                       scale_fmt=None, weight_bits=bits.pop())


def online_quantization(requested: str | None, config: ModelConfig) -> str | None:
    """The online mode to apply at load (``int8`` / ``int4``, or None) when ``--quantization requested`` meets a
    checkpoint of ``config``; a forced checkpoint format that the checkpoint does not have, or an online mode on a
    checkpoint already in integers, is a ``ConfigError``."""
    stored = config.quantization.quant_method if config.quantization is not None else None
    if requested is None or requested == stored:
        return None
    if requested in ONLINE_QUANTIZATION:
        if stored not in (None, "fp8"):
            raise ConfigError(f"--quantization {requested}: the checkpoint is already quantised "
                              f"(config.json 'quantization_config.quant_method' = {stored!r}); omit --quantization")
        return requested
    raise ConfigError(f"--quantization {requested}: the checkpoint's config.json 'quantization_config.quant_method' "
                      f"is {stored!r}")


def _validate(c: ModelConfig) -> None:
    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"config key '{key}' = {getattr(c, key)!r}: {msg}")

    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                "q_lora_rank", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"):
        need(int(getattr(c, key)) > 0, key, "must be a positive integer")
    need(c.qk_rope_head_dim > 0 and c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be positive and even")
    need(c.scoring_func == "sigmoid", "scoring_func", "DeepSeek-V3.x routers use 'sigmoid'")
    need(c.hidden_act == "silu", "hidden_act", "DeepSeek-V3.x uses 'silu'")
    need(c.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0")
    need(c.moe_layer_freq >= 1, "moe_layer_freq", "must be >= 1")
    if c.n_routed_experts > 0:
        need(c.n_group >= 1 and c.n_routed_experts % c.n_group == 0, "n_group", "must divide n_routed_experts")
        need(1 <= c.topk_group <= c.n_group, "topk_group", "must be in [1, n_group]")
        need(1 <= c.num_experts_per_tok <= c.topk_group * (c.n_routed_experts // c.n_group), "num_experts_per_tok",
             "must be at least 1 and fit in the kept groups (topk_group * experts per group)")
        need(c.n_routed_experts // c.n_group >= 2, "n_routed_experts", "groups need >= 2 experts (top-2 group score)")
        need(c.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
    need(c.index_topk >= 0, "index_topk", "must be >= 0 (0 = dense attention)")
    if c.has_indexer:
        need(c.index_n_heads > 0, "index_n_heads", "must be positive")
        need(c.index_head_dim > c.qk_rope_head_dim, "index_head_dim", "must exceed qk_rope_head_dim")
    need(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
    need(c.torch_dtype in ("bfloat16", "float16", "float32"), "torch_dtype", "expected bfloat16, float16 or float32")
    if c.rope_scaling is not None:
        need(c.rope_scaling.factor >= 1.0, "rope_scaling", "yarn factor must be >= 1")


def tiny_config() -> ModelConfig:
    """The built-in ``tiny`` preset: the real V3.2 architecture (indexer, 576-wide MLA latent, grouped sigmoid MoE,
    YaRN, one MTP layer, FP8 block quantisation) at toy width, with the real 129280-token vocabulary so the real
    tokenizer fits. Weights come from ``--load-format dummy``."""
    return ModelConfig(
        architecture="DeepseekV32ForCausalLM",
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=4,
        q_lora_rank=128,
        kv_lora_rank=512,
        qk_nope_head_dim=64,
        qk_rope_head_dim=64,
        v_head_dim=64,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        index_n_heads=16,
        index_head_dim=128,
        index_topk=64,
        num_nextn_predict_layers=1,
        torch_dtype="bfloat16",
    )


# vLLM's method names for DeepSeek's MTP layer; SGLang calls the same thing EAGLE (or NEXTN) with top-k 1.
SPECULATIVE_METHODS = ("mtp", "deepseek_mtp")
SGLANG_SPECULATIVE_ALGORITHMS = ("EAGLE", "NEXTN")
MAX_SPECULATIVE_TOKENS = 8


def _json_flag_value(flag: str, text: str) -> Any:
    """The JSON value of a command-line flag, or a ``ConfigError`` naming the flag."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with the checkpoint's MTP layer: each decode step verifies ``num_speculative_tokens``
    drafted tokens in one forward of the main model. Built from vLLM's ``speculative_config`` dict or SGLang's
    ``--speculative-*`` flags."""

    num_speculative_tokens: int
    method: str = "mtp"

    def __post_init__(self) -> None:
        if self.method not in SPECULATIVE_METHODS:
            raise ConfigError(f"speculative_config key 'method' = {self.method!r}: expected one of "
                              f"{', '.join(SPECULATIVE_METHODS)}")
        object.__setattr__(self, "method", "mtp")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ConfigError(f"speculative_config key 'num_speculative_tokens' = {k!r}: expected an integer in "
                              f"[1, {MAX_SPECULATIVE_TOKENS}]")

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> SpeculativeConfig:
        """vLLM's form: ``{"method": "mtp", "num_speculative_tokens": k}`` (``deepseek_mtp`` is an alias)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"speculative_config must be a JSON object, got {cfg!r}")
        unknown = sorted(set(cfg) - {"method", "num_speculative_tokens", "model"})
        if unknown:
            raise ConfigError(f"speculative_config has unknown key(s) {unknown}: expected 'method' and "
                              "'num_speculative_tokens'")
        if "num_speculative_tokens" not in cfg:
            raise ConfigError("speculative_config is missing key 'num_speculative_tokens'")
        if cfg.get("model") is not None:
            raise ConfigError("speculative_config key 'model': a separate draft model is not supported; the MTP "
                              "layer of the served checkpoint drafts")
        return cls(num_speculative_tokens=cfg["num_speculative_tokens"], method=cfg.get("method", "mtp"))

    @classmethod
    def from_json(cls, text: str) -> SpeculativeConfig:
        return cls.from_dict(_json_flag_value("--speculative-config", text))

    @classmethod
    def from_sglang(cls, algorithm: str, num_steps: int | None, eagle_topk: int | None,
                    num_draft_tokens: int | None) -> SpeculativeConfig:
        """SGLang's ``--speculative-algorithm EAGLE|NEXTN --speculative-num-steps S --speculative-eagle-topk 1
        --speculative-num-draft-tokens S+1``: a chain of S drafts (only top-k 1, i.e. no tree, is supported)."""
        if algorithm.upper() not in SGLANG_SPECULATIVE_ALGORITHMS:
            raise ConfigError(f"--speculative-algorithm {algorithm!r}: expected one of "
                              f"{', '.join(SGLANG_SPECULATIVE_ALGORITHMS)}")
        if eagle_topk not in (None, 1):
            raise ConfigError(f"--speculative-eagle-topk {eagle_topk}: only 1 (a chain of drafts) is supported")
        if num_steps is None and num_draft_tokens is None:
            raise ConfigError("--speculative-algorithm needs --speculative-num-steps (or "
                              "--speculative-num-draft-tokens)")
        if num_steps is None:
            num_steps = num_draft_tokens - 1
        if num_draft_tokens is not None and num_draft_tokens != num_steps + 1:
            raise ConfigError(f"--speculative-num-draft-tokens {num_draft_tokens} must be --speculative-num-steps "
                              f"+ 1 = {num_steps + 1} with --speculative-eagle-topk 1")
        return cls(num_speculative_tokens=num_steps)


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# --quantization: the online weight-only modes, or the name of a checkpoint's own format (vLLM / SGLang names) to
# insist on it (a checkpoint in another format is then an error).
ONLINE_QUANTIZATION = ("int8", "int4")
CHECKPOINT_QUANTIZATION = ("fp8", "blockwise_int8", "w8a8_int8", "compressed-tensors")
BLOCK_SCALED_QUANTIZATION = ("fp8", "blockwise_int8")  # one scale per weight_block_size block of the weight
QUANTIZATION_METHODS = ONLINE_QUANTIZATION + CHECKPOINT_QUANTIZATION
DTYPES = ("auto", "bfloat16", "float16", "float32")
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DEVICES = ("auto", "cpu", "cuda")  # the CLI's choices; EngineConfig also takes "cuda:N"
STRUCTURED_OUTPUT_BACKENDS = ("auto", "xgrammar")
DISTRIBUTED_EXECUTOR_BACKENDS = ("mp",)  # local workers are processes this one spawns (vLLM's "mp")
KERNEL_BACKENDS = ("auto", "torch", "triton")  # dsv32.kernels: auto = Triton on CUDA when it imports, else torch
KERNEL_BACKEND_ENV = "DSV32_KERNEL_BACKEND"  # the default of EngineConfig.kernel_backend
ENFORCE_EAGER_ENV = "DSV32_ENFORCE_EAGER"  # the default of EngineConfig.enforce_eager (1 / true / yes)


@dataclass(frozen=True)
class StructuredOutputsConfig:
    """``--structured-outputs-config`` (vLLM's flag, a JSON object): ``backend`` (``auto`` = ``xgrammar``) and
    ``max_whitespace``, the most whitespace characters a JSON grammar allows between two tokens of JSON (so a model
    cannot loop on spaces forever)."""

    backend: str = "auto"
    max_whitespace: int = 16

    def __post_init__(self) -> None:
        if self.backend not in STRUCTURED_OUTPUT_BACKENDS:
            raise ConfigError(f"--structured-outputs-config backend {self.backend!r}: expected one of "
                              f"{', '.join(STRUCTURED_OUTPUT_BACKENDS)}")
        if not isinstance(self.max_whitespace, int) or self.max_whitespace < 1:
            raise ConfigError(f"--structured-outputs-config max_whitespace must be a positive integer, got "
                              f"{self.max_whitespace!r}")

    @classmethod
    def from_json(cls, text: str) -> StructuredOutputsConfig:
        values = _json_flag_value("--structured-outputs-config", text)
        if not isinstance(values, dict):
            raise ConfigError("--structured-outputs-config must be a JSON object, e.g. '{\"backend\": \"xgrammar\"}'")
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise ConfigError(f"--structured-outputs-config has unknown keys {unknown}; known: backend, max_whitespace")
        return cls(**values)


@dataclass(frozen=True)
class EngineConfig:
    """Serving knobs, named as vLLM names its flags."""

    model: str = TINY_PRESET
    tokenizer: str | None = None
    served_model_name: str | None = None
    dtype: str = "auto"
    load_format: str = "auto"  # auto | safetensors | dummy
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 64
    kv_cache_dtype: str = "auto"
    # Weight quantisation (vLLM's --quantization): None = as the checkpoint stores it (config.json's
    # quantization_config); int8 / int4 = quantise online at load; a checkpoint format's name = insist on it.
    quantization: str | None = None
    kv_cache_memory: int | None = None  # bytes for the KV cache; None = from gpu_memory_utilization / a CPU default
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    max_waiting_requests: int = 1024
    # A step that makes no progress for this long means a hung engine: the server fails it (503, /health 503).
    engine_step_timeout_s: float = 300.0
    structured_outputs_config: StructuredOutputsConfig = field(default_factory=StructuredOutputsConfig)
    max_logprobs: int = 20  # most top alternatives a request may ask for (vLLM's --max-logprobs)
    # None = no speculation. A dict (vLLM's ``LLM(speculative_config={...})``) is converted on construction.
    speculative_config: SpeculativeConfig | None = None
    # One model over several processes (``dsv32.distributed``): tensor parallelism over every rank, routed experts
    # split by expert with ``enable_expert_parallel``; several machines with ``nnodes`` / ``node_rank``.
    tensor_parallel_size: int = 1
    # Data-parallel attention (SGLang's --enable-dp-attention): attention replicated, each rank its own sequences and
    # cache, the MoE shared by all ranks. The model then runs over data_parallel_size ranks (tensor_parallel_size 1).
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False
    distributed_executor_backend: str = "mp"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None: a free port on one node, 29500 (torchrun's) across nodes
    distributed_timeout_s: float = 300.0  # rendezvous and per-collective limit before a silent rank is a failure
    # The model's kernels (``dsv32.kernels``); default $DSV32_KERNEL_BACKEND, else auto.
    kernel_backend: str = field(default_factory=lambda: os.environ.get(KERNEL_BACKEND_ENV) or "auto")
    # libgomp's spin count (GOMP_SPINCOUNT) in the processes the engine starts (the engine-core process, the model's
    # workers; never the caller's own); None: the one they inherit if set, else 20M (``dsv32.engine.lifetime``).
    openmp_spin_count: int | None = None
    # Every step eagerly (vLLM's --enforce-eager): no compiled decode graphs (``dsv32.model.graphs``). Default
    # $DSV32_ENFORCE_EAGER, else off.
    enforce_eager: bool = field(
        default_factory=lambda: os.environ.get(ENFORCE_EAGER_ENV, "").lower() in ("1", "true", "yes"))
    # The decode batch sizes captured (vLLM's --cuda-graph-sizes); None: ``DEFAULT_CAPTURE_SIZES`` up to
    # max_num_seqs.
    cuda_graph_sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):
            object.__setattr__(self, "speculative_config", SpeculativeConfig.from_dict(self.speculative_config))
        if self.cuda_graph_sizes is not None:
            object.__setattr__(self, "cuda_graph_sizes", tuple(self.cuda_graph_sizes))
            if not self.cuda_graph_sizes or any(not isinstance(s, int) or s <= 0 for s in self.cuda_graph_sizes):
                raise ConfigError(f"--cuda-graph-sizes must be positive integers, got {list(self.cuda_graph_sizes)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"--quantization {self.quantization!r}: expected one of "
                              f"{', '.join(QUANTIZATION_METHODS)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"--kv-cache-dtype {self.kv_cache_dtype!r}: expected one of {', '.join(KV_CACHE_DTYPES)}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"--load-format {self.load_format!r}: expected auto, safetensors or dummy")
        for key in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_waiting_requests"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.engine_step_timeout_s <= 0:
            raise ConfigError(f"--engine-step-timeout must be positive, got {self.engine_step_timeout_s}")
        if self.max_logprobs < 0:
            raise ConfigError(f"--max-logprobs must be non-negative, got {self.max_logprobs}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ConfigError(f"--max-model-len must be positive, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.kernel_backend.lower() not in KERNEL_BACKENDS:
            raise ConfigError(f"--kernel-backend {self.kernel_backend!r}: expected one of {', '.join(KERNEL_BACKENDS)}")
        if self.openmp_spin_count is not None and self.openmp_spin_count < 0:
            raise ConfigError(f"--openmp-spin-count must be non-negative, got {self.openmp_spin_count}")
        self._validate_distributed()

    @property
    def world_size(self) -> int:
        """Processes (devices) the model runs over."""
        return self.tensor_parallel_size * self.data_parallel_size

    def _validate_distributed(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"--tensor-parallel-size must be >= 1, got {self.tensor_parallel_size}")
        if self.data_parallel_size < 1:
            raise ConfigError(f"--data-parallel-size must be >= 1, got {self.data_parallel_size}")
        if self.data_parallel_size > 1 and self.tensor_parallel_size > 1:
            raise ConfigError(f"--data-parallel-size {self.data_parallel_size} with --tensor-parallel-size "
                              f"{self.tensor_parallel_size}: data-parallel attention runs one rank per attention "
                              "replica (attention tensor parallelism inside a replica is not supported); use "
                              "--data-parallel-size N alone (SGLang: --tp N --dp N --enable-dp-attention)")
        if self.distributed_executor_backend not in DISTRIBUTED_EXECUTOR_BACKENDS:
            raise ConfigError(f"--distributed-executor-backend {self.distributed_executor_backend!r}: expected "
                              f"{' or '.join(DISTRIBUTED_EXECUTOR_BACKENDS)}")
        if self.nnodes < 1 or not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"--node-rank {self.node_rank} must be in [0, --nnodes {self.nnodes})")
        if self.world_size % self.nnodes:
            raise ConfigError(f"{self.world_size} ranks (--tensor-parallel-size x --data-parallel-size) must be a "
                              f"multiple of --nnodes {self.nnodes} (the same number of ranks on every node)")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"--master-port must be in [1, 65535], got {self.master_port}")
        if self.distributed_timeout_s <= 0:
            raise ConfigError(f"--distributed-timeout must be positive, got {self.distributed_timeout_s}")

    def weight_quantization(self, model_config: ModelConfig) -> str | None:
        """The weights' format as served: ``--quantization``, else the checkpoint's ``quant_method`` (None for
        dummy weights, drawn in the compute dtype whatever the config says)."""
        if self.quantization is not None:
            return self.quantization
        dummy = self.model == TINY_PRESET or self.load_format == "dummy"
        return model_config.quantization.quant_method if model_config.quantization and not dummy else None

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    @property
    def num_speculative_tokens(self) -> int:
        return self.speculative_config.num_speculative_tokens if self.speculative_config else 0
