"""Requests to an OpenAI-compatible endpoint, as the judge and the server engine both make them.

One request is retried with exponential backoff on what can pass (HTTP 408 / 429 / 5xx, time-outs,
lost connections, malformed bodies) and given up at once on what cannot (another 4xx, specific to
that request). HTTP 401 / 403 / 404 mean every request would fail alike (bad key, no access,
unknown model or URL): the caller's ``refuse`` turns them into the error that stops the run, and
the shared ``stop`` event drops the requests still queued in the bounded pool.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import openai

T = TypeVar("T")


class MalformedResponse(Exception):
    """A response that is not what the request asks for (bad JSON, missing choices): retried."""


def with_retries(
    send: Callable[[], T],
    *,
    max_retries: int,
    backoff_s: float,
    timeout_s: float,
    stop: threading.Event,
    refuse: Callable[[openai.APIStatusError], Exception],
    api_key: str,
) -> tuple[T | None, str | None, int]:
    """``send()`` with retries: (result, None, attempts) on success, (None, error, attempts) once
    retries run out or on a request-specific client error, (None, None, attempts) when ``stop`` is
    set first. On HTTP 401 / 403 / 404 sets ``stop`` and raises ``refuse(exc)``."""
    error = ""
    attempts = 0
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        if stop.is_set():
            return None, None, attempts
        attempts += 1
        try:
            return send(), None, attempts
        except openai.APIStatusError as exc:
            status = exc.status_code
            if status in (401, 403, 404):
                stop.set()
                raise refuse(exc) from None
            error = f"HTTP {status}" + server_detail(exc, api_key)
            if not (status in (408, 429) or status >= 500):
                break  # a request error specific to this request: retrying cannot help
        except openai.APITimeoutError:
            error = f"timed out after {timeout_s:g} s"
        except openai.APIConnectionError:
            error = "connection error"
        except (MalformedResponse, json.JSONDecodeError, openai.APIResponseValidationError) as exc:
            reason = exc if isinstance(exc, MalformedResponse) else "body is not valid JSON"
            error = f"malformed response: {reason}"
    return None, error, attempts


def attempts_text(error: str, attempts: int) -> str:
    return f"{error} (after {attempts} attempt{'s' if attempts > 1 else ''})"


def server_detail(exc: openai.APIStatusError, api_key: str, limit: int = 200) -> str:
    """': <server message>' with the key redacted, or '' when the server gave none."""
    body = exc.body
    message = body.get("message") if isinstance(body, dict) else None
    if not isinstance(message, str) or not message.strip():
        return ""
    message = message.replace(api_key, "<redacted>").strip()
    return ": " + (message if len(message) <= limit else message[: limit - 3] + "...")


@contextmanager
def bounded_pool(concurrency: int, name: str, stop: threading.Event) -> Iterator[ThreadPoolExecutor]:
    """At most ``concurrency`` requests in flight. On leaving, normally or by an error or interrupt,
    ``stop`` is set and queued work dropped; running requests finish before this returns, so no
    thread outlives the caller."""
    executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=name)
    try:
        yield executor
    finally:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
