"""Integer weights over two processes: a rank reads only its part of an INT checkpoint's codes (rows with their
scales; input columns with INT8's row scales, or with the INT4 groups they fall in), so TP=2 and TP=2 + EP compute
what one process computes on the same checkpoint: identical greedy tokens, and logits within 1e-4 (fp32) for the
weight-only ``compressed-tensors`` W4A16 with zero points (a TP=2 cut of the tiny experts' 64 intermediate columns
splits their groups of 64 in half). SGLang's ``w8a8_int8`` rounds activations per rank, and online ``--quantization
int8`` quantises each rank's own shard, as vLLM's online quantisation does: their logits differ by that rounding."""

from __future__ import annotations

import pytest
import torch

from dsv32 import LLM, SamplingParams
from dsv32.engine.executor.multiproc import MultiprocExecutor
from tests.distributed.conftest import CHUNKED_BUDGET, prompt_logits
from tests.distributed.test_equivalence import LAYOUTS, LONG_PROMPT

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("restore_threads")]

PROMPT = [t % 1000 for t in LONG_PROMPT]  # the checkpoints' vocabulary has 1024 tokens
PROMPTS = [PROMPT, PROMPT[10:40], PROMPT[:7]]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    # Imported here, not at collection: compressed_tensors imports triton, which must not load before
    # tests/kernels/conftest.py switches it to its interpreter.
    from tests.model.conftest import make_hf_checkpoint
    from tests.model.test_quant_checkpoints import write_w4a16_checkpoint, write_w8a8

    root = tmp_path_factory.mktemp("quant_tp")
    src = make_hf_checkpoint(str(root / "plain"), "v32")
    return {"plain": src, "w8a8_int8": write_w8a8(src, str(root / "w8a8"))[0],
            "w4a16": write_w4a16_checkpoint(src, str(root / "w4a16"), symmetric=False)[0]}


def _llm(path: str, **kwargs: object) -> LLM:
    return LLM(path, tokenizer="tiny", dtype="float32", max_model_len=512, max_num_seqs=8,
               max_num_batched_tokens=CHUNKED_BUDGET, device="cpu", **kwargs)


def _run(path: str, **kwargs: object) -> tuple[torch.Tensor, list[list[int]], bool]:
    llm = _llm(path, **kwargs)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        return (prompt_logits(llm, PROMPT), [list(o.outputs[0].token_ids) for o in outputs],
                isinstance(llm.engine.executor, MultiprocExecutor))
    finally:
        llm.engine.close()


# W4A16 is weight-only: exact. W8A8 rounds each rank's part of a row-parallel layer's input to int8 with that part's
# own per-token scale (as vLLM does), so its logits differ by that rounding; online INT8 scales each rank's rows.
CASES = [("w4a16", "tp2", {}, 1e-4), ("w4a16", "tp2_ep", {}, 1e-4), ("w8a8_int8", "tp2", {}, 3e-2),
         ("plain", "tp2", {"quantization": "int8"}, 3e-2)]


@pytest.mark.parametrize(("fmt", "layout", "kwargs", "atol"), CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in CASES])
def test_int_weights_over_two_ranks_match_one(checkpoints: dict[str, str], fmt: str, layout: str,
                                              kwargs: dict[str, str], atol: float) -> None:
    want_logits, want_tokens, _ = _run(checkpoints[fmt], **kwargs)
    logits, tokens, multiproc = _run(checkpoints[fmt], **kwargs, **LAYOUTS[layout]())
    assert multiproc
    assert tokens == want_tokens
    torch.testing.assert_close(logits, want_logits, atol=atol, rtol=0)
