"""``ServerConfig``: the HTTP side's knobs (names, auth, parsers, limits), kept apart from the engine's
``EngineConfig`` so the serving code depends on neither the CLI nor the engine's internals."""

from __future__ import annotations

from dataclasses import dataclass, field

from dsv32.assets import DEMO_PRESET

# vLLM's parser names first; SGLang's spellings map onto them.
REASONING_PARSERS = {"deepseek_v3": "deepseek_v3", "deepseek-v3": "deepseek_v3", "deepseek_r1": "deepseek_v3",
                     "deepseek-r1": "deepseek_v3", "none": "none"}
TOOL_CALL_PARSERS = {"deepseek_v32": "deepseek_v32", "deepseekv32": "deepseek_v32", "none": "none"}


@dataclass(frozen=True)
class RequestLimits:
    """What one request body may be (``dsv32 serve --max-request-bytes / --max-json-depth``)."""

    # vLLM sets none; 32 MiB holds a full 163,840-token context as text many times over.
    max_request_bytes: int = 32 * 1024 * 1024
    # Deep enough for any real tool or response schema (OpenAI's strict mode allows 10 levels of schema nesting,
    # which is about 25 levels of JSON), far below Python's recursion limit.
    max_json_depth: int = 64
    # Time a client gets to send its whole body.
    body_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ValueError(f"--max-request-bytes must be at least 1024, got {self.max_request_bytes}")
        if not 8 <= self.max_json_depth <= 256:
            raise ValueError(f"--max-json-depth must be in [8, 256], got {self.max_json_depth}")


@dataclass(frozen=True)
class ServerConfig:
    """What the OpenAI-compatible layer needs to know beyond the engine."""

    served_model_names: tuple[str, ...] = (DEMO_PRESET,)
    model_path: str = DEMO_PRESET
    host: str = "127.0.0.1"
    port: int = 8000
    # On SIGTERM, seconds in-flight requests get to finish before they are aborted.
    shutdown_timeout: float = 30.0
    uvicorn_log_level: str = "warning"
    api_key: str | None = None
    # "deepseek_v3": split reasoning from content; "none": the reasoning stays in `content`.
    reasoning_parser: str = "deepseek_v3"
    # "deepseek_v32": parse DSML tool calls; "none": no tool calling (`tool_choice` other than "none" is refused).
    tool_call_parser: str = "deepseek_v32"
    log_requests: bool = False
    # Size, nesting and arrival time a request body may have (dsv32.server.boundary).
    limits: RequestLimits = field(default_factory=RequestLimits)
    # Tokens a request that sets no max_tokens may generate; None: whatever the context has left (vLLM's rule). A
    # model with random weights would otherwise babble to the end of a 163,840-token context.
    default_max_tokens: int | None = None
    # Responses (POST /v1/responses with store=true) kept in memory for GET and previous_response_id; the oldest are
    # dropped first. 0 stores none.
    max_stored_responses: int = 1000

    def __post_init__(self) -> None:
        if self.max_stored_responses < 0:
            raise ValueError(f"--max-stored-responses must be non-negative, got {self.max_stored_responses}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"--default-max-tokens must be at least 1, got {self.default_max_tokens}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"--shutdown-timeout must be non-negative, got {self.shutdown_timeout}")
        if not self.served_model_names:
            raise ValueError("at least one served model name is needed")
        if self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {self.reasoning_parser!r}: expected one of "
                             f"{', '.join(REASONING_PARSERS)}")
        if self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool-call parser {self.tool_call_parser!r}: expected one of "
                             f"{', '.join(TOOL_CALL_PARSERS)}")
        object.__setattr__(self, "reasoning_parser", REASONING_PARSERS[self.reasoning_parser])
        object.__setattr__(self, "tool_call_parser", TOOL_CALL_PARSERS[self.tool_call_parser])

    @property
    def model_name(self) -> str:
        """The name responses carry: the first served name."""
        return self.served_model_names[0]
