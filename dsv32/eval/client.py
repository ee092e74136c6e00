"""How the evals talk to an OpenAI-compatible server: one request retried like lm-eval, and many at bounded
concurrency with a progress bar."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

from dsv32.bench.serve import wait_for_server

MAX_RETRIES = 3

Item = TypeVar("Item")
Result = TypeVar("Result")


async def model_to_ask(client: httpx.AsyncClient, root: str, model: str | None, timeout_s: float) -> str:
    """Wait for the server at ``root`` to answer; ``model``, else the first model it lists (``--model`` is needed
    when it lists none)."""
    served = await wait_for_server(client, root, timeout_s)
    model = model or (served[0] if served else None)
    if model is None:
        raise ValueError("--model is required: the server lists no model at /v1/models")
    return model


async def post_for_choice(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST ``body`` and return the response payload, which has a ``choices[0]``. Transport errors and 5xx are
    retried (lm-eval does); a 4xx or a payload without choices is a ``ValueError`` naming the URL."""
    last_error = ""
    for _ in range(MAX_RETRIES):
        try:
            response = await client.post(url, json=body)
        except httpx.TransportError as error:
            last_error = f"{type(error).__name__}: {error}"
            continue
        if response.status_code >= 500:
            last_error = f"HTTP {response.status_code}: {response.text[:300]}"
            continue
        if response.status_code != 200:
            raise ValueError(f"{url} answered HTTP {response.status_code}: {response.text[:300]}")
        try:
            payload = response.json()
            if isinstance(payload["choices"][0], dict):
                return payload
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        raise ValueError(f"{url} sent a response without choices[0]: {response.text[:300]}")
    raise ValueError(f"request to {url} failed after {MAX_RETRIES} tries: {last_error}")


async def gather_limited(
    items: Sequence[Item],
    ask: Callable[[Item], Awaitable[Result]],
    concurrency: int,
    desc: str,
    show_progress: bool = True,
) -> list[Result]:
    """``ask`` every item, at most ``concurrency`` at once; the results in the items' order."""
    semaphore = asyncio.Semaphore(concurrency)
    progress = tqdm(total=len(items), disable=not show_progress, file=sys.stderr, desc=desc)

    async def one(item: Item) -> Result:
        async with semaphore:
            result = await ask(item)
        progress.update(1)
        return result

    try:
        return list(await asyncio.gather(*(one(item) for item in items)))
    finally:
        progress.close()
