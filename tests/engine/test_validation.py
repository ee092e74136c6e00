"""RequestValidator: the one check of a request, where it enters (the server, the offline LLM)."""

import pytest

from dsv32 import SamplingParams
from dsv32.engine.validation import InvalidRequestError, RequestValidator

VALIDATOR = RequestValidator(max_model_len=100, vocab_size=100, max_logprobs=5, max_num_seqs=4)


def test_token_ids_outside_the_vocabulary_name_their_field() -> None:
    with pytest.raises(InvalidRequestError, match=r"logit_bias has token ids outside the vocabulary \[0, 100\): \[100"):
        VALIDATOR.validate([1], SamplingParams(logit_bias={5: 1.0, 100: 1.0}))
    with pytest.raises(InvalidRequestError, match=r"stop_token_ids .*\[-1\]") as info:
        VALIDATOR.validate([1], SamplingParams(stop_token_ids=[-1]))
    assert info.value.param == "stop_token_ids"
    with pytest.raises(InvalidRequestError, match="prompt has token ids"):
        VALIDATOR.validate([100], SamplingParams())
    VALIDATOR.validate([0], SamplingParams(logit_bias={99: 1.0}, stop_token_ids=[0]))


def test_the_configured_logprobs_limit_rules() -> None:
    VALIDATOR.validate([1], SamplingParams(logprobs=5, prompt_logprobs=5))
    with pytest.raises(InvalidRequestError, match="logprobs=6 is more than max_logprobs=5"):
        VALIDATOR.validate([1], SamplingParams(logprobs=6))
    wide = RequestValidator(max_model_len=100, vocab_size=100, max_logprobs=50, max_num_seqs=4)
    wide.validate([1], SamplingParams(prompt_logprobs=50))


def test_context_length_strict_and_offline() -> None:
    with pytest.raises(InvalidRequestError) as info:
        VALIDATOR.validate([1] * 90, SamplingParams(max_tokens=20))
    assert str(info.value) == ("This model's maximum context length is 100 tokens. However, you requested 110 tokens "
                               "(90 in the messages, 20 in the completion). Please reduce the length of the messages "
                               "or completion.")  # vLLM's wording, which agent frameworks grep for
    assert info.value.param == "messages"
    VALIDATOR.validate([1] * 80, SamplingParams(max_tokens=20))
    VALIDATOR.validate([1] * 90, SamplingParams(max_tokens=20), strict_max_tokens=False)
    with pytest.raises(InvalidRequestError, match="your request has 100 input tokens"):
        VALIDATOR.validate([1] * 100, SamplingParams(max_tokens=20), strict_max_tokens=False)
    with pytest.raises(InvalidRequestError, match="cannot be empty"):
        VALIDATOR.validate([], SamplingParams())


def test_n_is_bounded_by_max_num_seqs() -> None:
    VALIDATOR.validate([1], SamplingParams(n=4))
    with pytest.raises(InvalidRequestError, match="max_num_seqs=4") as info:
        VALIDATOR.validate([1], SamplingParams(n=5))
    assert info.value.param == "n"
