"""Online weight-only quantisation of a loaded model (``--quantization int8|int4``) and what each mode covers.

Covered (quantised), as in the public quantised DeepSeek checkpoints: the attention projections ``q_a_proj``,
``q_b_proj``, ``kv_a_proj_with_mqa``, ``o_proj``; the indexer's ``wq_b`` and ``wk``; the dense MLPs' and shared
experts' ``gate_proj`` / ``up_proj`` / ``down_proj``; every routed expert. Left in the compute dtype: embeddings, the
LM head, the router gate, norms, the indexer's ``weights_proj`` (fp32), the MTP ``eh_proj``, and ``kv_b_proj``
(MLA absorbs it into the query and output at load, in the compute dtype, so its codes would save nothing). INT4
also leaves a matrix whose input size is not a multiple of the group (128), and on CPU one whose output size is not
one of 16 (the CPU kernel's tiles); none in the real model. The codes are packed in the layout of the device's
integer kernels (``dsv32.kernels.int_weight_layout``: CPU packed kernels, or Triton on CUDA).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from dsv32.kernels import require_int_layout
from dsv32.kernels.quant import INT4_GROUP_SIZE, IntWeight, packable, quantize_int4, quantize_int8
from dsv32.kernels.reference import dequantize_experts
from dsv32.model.linear import Linear
from dsv32.model.moe import Experts

logger = logging.getLogger(__name__)

ONLINE_METHODS = ("int8", "int4")
# Linear layers (by attribute name) that each online mode quantises.
QUANTIZED_PROJECTIONS = frozenset({"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "wq_b", "wk",
                                   "gate_proj", "up_proj", "down_proj"})


def quantizer(method: str) -> tuple[int, Callable[[torch.Tensor], IntWeight]]:
    """``(bits, weight [N, K] -> IntWeight)`` of an online method."""
    if method == "int8":
        return 8, quantize_int8
    if method == "int4":
        return 4, lambda w: quantize_int4(w, INT4_GROUP_SIZE, symmetric=True)
    raise ValueError(f"quantization {method!r}: online quantisation is one of {', '.join(ONLINE_METHODS)}")


def is_quantized_linear(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (at ``name`` in the model) is one of the projections the modes cover."""
    return isinstance(module, Linear) and name.rpartition(".")[2] in QUANTIZED_PROJECTIONS


def quantize_model(model: nn.Module, method: str) -> None:
    """Quantise every covered projection and expert of a loaded ``model`` in place (see the module docstring)."""
    bits, quantize = quantizer(method)
    layout = require_int_layout(next(model.parameters()).device)
    done = skipped = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if is_quantized_linear(name, module) and module.int_weight is None:
                shape = (module.out_features, module.in_features)
                if not packable(shape, bits, layout=layout):
                    skipped += 1
                    continue
                module.quantize(quantize(module.dequantized_weight()))
                done += 1
            elif isinstance(module, Experts) and module.gate_up_int is None:
                stacks = [_expert_weights(module, stack) for stack in ("gate_up_proj", "down_proj")]
                if not all(packable(tuple(w.shape), bits, layout=layout) for w in (stacks[0][0], stacks[1][0])):
                    skipped += 1
                    continue
                module.quantize(*([quantize(w) for w in stack] for stack in stacks))
                done += 1
    logger.info("quantization %s: %d projections / expert sets quantised, %d left in the compute dtype (shape)",
                method, done, skipped)


def _expert_weights(experts: Experts, name: str) -> list[torch.Tensor]:
    """Each expert's ``name`` matrix in the compute dtype (e4m3 experts dequantised)."""
    stack = getattr(experts, name)
    scale = getattr(experts, f"{name}_scale_inv")
    if scale is not None:
        stack = dequantize_experts(stack, scale, torch.float32)
    return list(stack.unbind(0))


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as held: parameters and buffers, plus packed integer weights (oneDNN's
    reordered copies of bf16 weights are not counted: they are the same weights in another layout)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        if isinstance(module, Linear) and module.int_weight is not None:
            total += module.int_weight.nbytes
        elif isinstance(module, Experts) and module.gate_up_int is not None:
            total += module.gate_up_int.nbytes + module.down_int.nbytes
    return total
