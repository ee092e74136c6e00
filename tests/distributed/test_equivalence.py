"""One model over two processes computes what one process computes: TP=2, TP=2 with expert parallelism, and the
same through SGLang's ``--tp 2 --ep 2``, for V3.2 (indexer selecting: prompts longer than index_topk) and V3, with
chunked prefill mixed with decodes. Logits agree within 1e-4 and 32 greedy tokens are identical."""

from __future__ import annotations

import random

import pytest
import torch

from dsv32 import SamplingParams
from dsv32.cli import build_parser, engine_config_from_args
from tests.distributed.conftest import ARCHS, make_llm, prompt_logits

pytestmark = pytest.mark.usefixtures("restore_threads")

LONG_PROMPT = [random.Random(0).randrange(100, 120000) for _ in range(150)]  # > index_topk = 64
PROMPTS = [LONG_PROMPT[:90], LONG_PROMPT[10:40], LONG_PROMPT[:7], LONG_PROMPT, LONG_PROMPT[50:115]]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def _reference(arch: str) -> tuple[torch.Tensor, list[list[int]]]:
    """One process: the prompt's logits and each prompt's greedy tokens."""
    llm = make_llm(ARCHS[arch])
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    return prompt_logits(llm, LONG_PROMPT), [list(o.outputs[0].token_ids) for o in outputs]


_REFERENCES: dict[str, tuple[torch.Tensor, list[list[int]]]] = {}


def reference(arch: str) -> tuple[torch.Tensor, list[list[int]]]:
    if arch not in _REFERENCES:
        _REFERENCES[arch] = _reference(arch)
    return _REFERENCES[arch]


def _sglang_ep_kwargs() -> dict[str, object]:
    """SGLang's ``--tp 2 --ep 2`` as the CLI turns it into engine fields."""
    args = build_parser(["serve"]).parse_args(["serve", "--tp", "2", "--ep", "2"])
    config = engine_config_from_args(args)
    return {"tensor_parallel_size": config.tensor_parallel_size,
            "enable_expert_parallel": config.enable_expert_parallel}


LAYOUTS = {
    "tp2": lambda: {"tensor_parallel_size": 2},
    "tp2_ep": lambda: {"tensor_parallel_size": 2, "enable_expert_parallel": True},
    "sglang_tp2_ep2": _sglang_ep_kwargs,
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_two_processes_match_one(arch: str, layout: str) -> None:
    expected_logits, expected_tokens = reference(arch)
    kwargs = LAYOUTS[layout]()
    llm = make_llm(ARCHS[arch], **kwargs)
    try:
        assert llm.engine.distributed is not None
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        logits = prompt_logits(llm, LONG_PROMPT)
    finally:
        llm.engine.close()
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected_tokens
    assert logits.shape == expected_logits.shape
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)


def test_mtp_speculation_under_tensor_parallelism() -> None:
    """The MTP drafter's calls (its own cache layer, the shared head) run on every rank too: same greedy tokens."""
    expected = reference("v32")[1]
    llm = make_llm(ARCHS["v32"], tensor_parallel_size=2, enable_expert_parallel=True,
                   speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
    finally:
        llm.engine.close()
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
