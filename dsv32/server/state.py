"""``ServerState``: what every route handler shares (the engine, its tokenizer, the server's config and metrics),
built once when the app is created, plus what every generation endpoint starts with (the model name, the request
id, the output budget)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ParamSpec, Protocol, TypeVar

from pydantic import BaseModel

from dsv32.engine.client import EngineClient
from dsv32.engine.validation import RequestValidator
from dsv32.server.errors import APIError, model_not_found
from dsv32.server.logprobs import LogprobFormatter
from dsv32.server.metrics import ServerMetrics
from dsv32.server.protocol import random_uuid
from dsv32.server.settings import ServerConfig
from dsv32.tokenizer import Tokenizer

logger = logging.getLogger("dsv32.server")

T = TypeVar("T")
P = ParamSpec("P")

# A client's request id goes back out in a response header: printable ASCII only.
_REQUEST_ID = re.compile(r"^[\x20-\x7e]{1,256}$")

# Inputs at least this long (characters, or token ids) are rendered and tokenized on a worker thread: a long prompt
# takes tens of milliseconds to tokenize and would stall every stream on the event loop meanwhile (vLLM tokenizes
# off the loop too). Shorter ones are not worth a thread hop.
OFFLOAD_MIN_SIZE = 16384


class InFlightRequest(Protocol):
    """A request between start and close (``dsv32.server.generation.EngineRequest``), as shutdown sees it."""

    async def abort(self) -> None: ...


@dataclass
class ServerState:
    engine: EngineClient
    config: ServerConfig
    metrics: ServerMetrics
    logprobs: LogprobFormatter = field(init=False)
    # Requests between start and close, for aborting them at shutdown.
    active_requests: set[InFlightRequest] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.logprobs = LogprobFormatter(self.tokenizer)

    async def abort_all(self) -> int:
        """Abort every request in flight (their streams end with finish_reason "abort"); returns how many."""
        requests = list(self.active_requests)
        for request in requests:
            await request.abort()
        return len(requests)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def validator(self) -> RequestValidator:
        return self.engine.validator

    def encode_prompt(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """A prompt's token ids; a text that certainly does not fit the context is refused after tokenizing only
        about ``max_model_len`` tokens of it, so megabytes of prompt cost a fraction of a second, not seconds."""
        at_least = self.tokenizer.count_beyond(text, self.max_model_len)
        if at_least is not None:
            raise self.validator.refuse_overlong_text(at_least)
        return self.tokenizer.encode(text, add_special_tokens)

    async def offload(self, size: int, work: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``work(*args, **kwargs)``, on a worker thread when the input it handles is large (``size`` >=
        OFFLOAD_MIN_SIZE)."""
        if size >= OFFLOAD_MIN_SIZE:
            return await asyncio.to_thread(work, *args, **kwargs)
        return work(*args, **kwargs)

    def max_tokens(self, requested: int | None, num_prompt: int) -> int:
        """The output budget of one request: what it asked for, else ``--default-max-tokens`` or, without one,
        whatever the context has left. At least 1: a prompt that leaves no room is then refused by the validator
        for the one token it would need (vLLM's wording)."""
        if requested is not None:
            return requested
        room = self.max_model_len - num_prompt
        default = self.config.default_max_tokens
        return max(1, room if default is None else min(room, default))

    def check_model(self, model: str | None) -> None:
        """``model`` may be omitted (vLLM allows it); otherwise it must be a served name or the model path."""
        if model is not None and model not in self.config.served_model_names and model != self.config.model_path:
            raise model_not_found(model)

    def request_id(self, prefix: str, header_id: str | None, body_id: str | None) -> str:
        """vLLM honours ``X-Request-Id``; SGLang's body ``rid`` (or vLLM's ``request_id``) works too. A random
        suffix keeps ids unique in the engine even when a client reuses its own."""
        chosen = body_id or header_id
        if chosen is not None and not _REQUEST_ID.match(chosen):
            raise APIError("request_id / X-Request-Id must be 1-256 printable ASCII characters (it is sent back in "
                           "the X-Request-Id header).", 400, param="request_id")
        return f"{prefix}-{chosen}-{random_uuid()[:8]}" if chosen else f"{prefix}-{random_uuid()}"

    def log_request(self, request_id: str, request: BaseModel, prompt_tokens: int) -> None:
        """Prompt text stays out of the logs unless --log-requests asked for it (prompts can be private)."""
        if self.config.log_requests:
            logger.info("request %s (%d prompt tokens): %s", request_id, prompt_tokens,
                        request.model_dump_json(exclude_none=True))
        else:
            logger.info("request %s: %d prompt tokens", request_id, prompt_tokens)
        if request.model_extra:
            logger.warning("request %s: the following fields were present in the request but ignored: %s",
                           request_id, sorted(request.model_extra))
