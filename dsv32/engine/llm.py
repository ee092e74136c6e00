"""The offline API, shaped like vLLM's so users can switch: ``LLM(...).generate(prompts, params)`` and ``.chat``.
Requests enter the engine here, so they are validated here (``RequestValidator``, the offline rule: an oversized
``max_tokens`` is capped at the context length)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from tqdm import tqdm

from dsv32.config import EngineConfig, ModelConfig
from dsv32.encoding import prepare_chat_request
from dsv32.engine.core import EngineCore
from dsv32.engine.lifetime import cap_onednn_primitive_cache
from dsv32.engine.outputs import RequestOutput, fill_decoded_tokens
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.validation import RequestValidator
from dsv32.tokenizer import Tokenizer

# A prompt: text (BOS is prepended, as vLLM does for completions) or {"prompt_token_ids": [...]} (used as is).
PromptType = str | Mapping[str, Any]
Messages = Sequence[Mapping[str, Any]]


class LLM:
    """Load a model once, then run batches of prompts through continuous batching.

    ``model`` is ``"tiny"`` (the built-in preset with dummy weights) or an HF checkpoint folder; any other keyword
    is an ``EngineConfig`` field (``max_num_seqs``, ``kv_cache_dtype``, ``enable_prefix_caching`` ...).
    ``model_config`` replaces the config read from ``model`` (e.g. the tiny preset with other dimensions).
    """

    def __init__(self, model: str = "tiny", *, tokenizer: str | None = None, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, model_config: ModelConfig | None = None,
                 **engine_kwargs: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_kwargs) - known)
        if unknown:
            raise TypeError(f"LLM() got unknown engine arguments {unknown}; valid ones are {sorted(known)}")
        config = EngineConfig(model=model, tokenizer=tokenizer, dtype=dtype, max_model_len=max_model_len, seed=seed,
                              **engine_kwargs)
        cap_onednn_primitive_cache()  # the engine runs in this process
        self.engine = EngineCore(config, model_config)
        self.validator = RequestValidator.for_engine(config, self.engine.model_config, self.engine.max_model_len)
        self._request_counter = itertools.count()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def get_tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of ``prompts``."""
        if isinstance(prompts, str | Mapping):
            prompts = [prompts]
        token_prompts = [self._tokenize(p) for p in prompts]
        return self._run(token_prompts, sampling_params, use_tqdm)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = True,
             tools: Sequence[Mapping[str, Any]] | None = None,
             chat_template_kwargs: Mapping[str, Any] | None = None) -> list[RequestOutput]:
        """Chat completion of one conversation (a list of messages) or of a batch of them, rendered with the
        DeepSeek-V3.2 encoding (``chat_template_kwargs={"thinking": True}`` for thinking mode)."""
        conversations = [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
        token_prompts = []
        for conversation in conversations:
            encoded = prepare_chat_request(conversation, tools=tools, chat_template_kwargs=chat_template_kwargs)
            token_prompts.append((encoded.prompt, self.engine.tokenizer.encode(encoded.prompt)))
        return self._run(token_prompts, sampling_params, use_tqdm)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt, add_special_tokens=True)
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
        if "prompt" in prompt:
            return prompt["prompt"], self.engine.tokenizer.encode(prompt["prompt"], add_special_tokens=True)
        raise ValueError(f"a prompt is a string, {{'prompt': str}} or {{'prompt_token_ids': [...]}}, got {prompt!r}")

    def _run(self, prompts: list[tuple[str | None, list[int]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = ([sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams)
                       else list(sampling_params))
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        # Validate everything before running anything, so a bad prompt does not leave half a batch behind.
        for (_, token_ids), params in zip(prompts, params_list, strict=True):
            self.validator.validate(token_ids, params, strict_max_tokens=False)
        ids = [f"offline-{next(self._request_counter)}" for _ in prompts]
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(prompts), desc="Processed prompts", disable=not use_tqdm, dynamic_ncols=True)
        try:
            # The engine may still refuse one (a grammar that does not compile): those added before it are aborted.
            for request_id, (text, token_ids), params in zip(ids, prompts, params_list, strict=True):
                self.engine.add_request(request_id, token_ids, params, prompt=text, stream=False)
            while self.engine.has_unfinished_requests():
                # The requests do not stream: each is reported once, finished, and that delta is its whole answer.
                for out in self.engine.step():
                    fill_decoded_tokens(out, self.engine.tokenizer)
                    finished[out.request_id] = out
                    bar.update(1)
                failures = self.engine.take_failures()
                if failures:
                    request_id, exc = next(iter(failures.items()))
                    raise RuntimeError(f"request {request_id} failed: {exc}") from exc
        except BaseException:
            # Refused, interrupted (or the model failed): free what is left, so the engine stays usable.
            for request_id in ids:
                self.engine.abort_request(request_id)
            raise
        finally:
            bar.close()
        return [finished[request_id] for request_id in ids]
