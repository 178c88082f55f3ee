"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions API, scripted in Python.

    def script(request: dict) -> Reply:
        if "refuse me" in user_text(request):
            return Reply.error(429)
        return Reply.probs({"80": 0.5, "90": 0.3, "hello": 0.2})

    with FakeOpenAI(script) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="k")
        ...
        assert server.count() == 1

Other endpoints (``/v1/completions``, ``GET /v1/models``, ``/openapi.json`` of a vLLM server) are
``routes``: ``{("POST", "/v1/completions"): handler}``, the handler taking the parsed body (None
for a GET) and returning ``(status, JSON payload)``.

The script gets the parsed JSON body of each POST /v1/chat/completions and returns a Reply:
a success (top log-probs of the first token, or text without log-probs), an HTTP error
status, a malformed body, and optionally a delay before answering (timeouts, throughput
benchmarks). A reply can also be several generated tokens, each with its own top log-probs
(``Reply.steps``, ``Reply.spelled``): the server then behaves like a real endpoint, cutting
the reply at the request's ``max_tokens`` (finish_reason "length", else "stop"). A judge whose
tokenizer writes numbers digit by digit (Qwen2.5, Gemma, Mistral, SmolLM2) is
``Reply.spelled("70", first={"7": 0.8, "8": 0.2})``: "7" then "0", each a token, so with
``max_tokens=1`` it answers "7" alone, as vLLM serving such a model does. Requests are handled
concurrently (one thread per connection); every request is recorded, and the server tracks how
many were in flight at once.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the server answers to one request."""

    status: int = 200
    top_logprobs: list[tuple[str, float]] | None = None  # (token, logprob); None: no logprobs
    text: str | None = None  # message content; defaults to the most probable token
    logprobs_key: bool = True  # without logprobs: send "logprobs": null (True) or omit it
    delay_s: float = 0.0
    raw_body: bytes | None = None  # sent as is (malformed responses)
    content_type: str = "application/json"
    error_message: str = "scripted error"
    usage: tuple[int, int] | None = None  # (prompt, completion); default from the request
    model_version: str | None = None  # the "model" the response reports (default: the request's)
    # Several generated tokens: (token, its top log-probs as (candidate, logprob)); cut at max_tokens.
    steps: list[tuple[str, list[tuple[str, float]]]] | None = None

    @classmethod
    def probs(cls, probs: Mapping[str, float], **kwargs: Any) -> Reply:
        """Top log-probs given as token -> probability."""
        return cls(top_logprobs=[(t, math.log(p)) for t, p in probs.items()], **kwargs)

    @classmethod
    def sequence(cls, steps: list[tuple[str, Mapping[str, float]]], **kwargs: Any) -> Reply:
        """Generated tokens, each given as (token, its top candidates as token -> probability)."""
        return cls(steps=[(token, [(t, math.log(p)) for t, p in probs.items()]) for token, probs in steps], **kwargs)

    @classmethod
    def spelled(cls, text: str, first: Mapping[str, float] | None = None, **kwargs: Any) -> Reply:
        """``text`` as a digit-by-digit tokenizer writes it: every digit its own token, letters
        in pieces of up to three ("REFUSAL" -> "REF", "USA", "L"), blanks and punctuation alone.
        ``first`` gives the first token's top candidates (default: the token itself, p = 0.9,
        and two others); every later token is sure (p = 0.97) with two small alternatives."""
        pieces = spell(text)
        if not pieces:
            raise ValueError("spelled: empty text")
        steps = []
        for index, piece in enumerate(pieces):
            if index == 0 and first is not None:
                probs = dict(first)
            else:
                others = [o for o in ("5", "0", "the", ".") if o != piece][:2]
                probs = {piece: 0.9 if index == 0 else 0.97, others[0]: 0.02, others[1]: 0.01}
            steps.append((piece, probs))
        return cls.sequence(steps, **kwargs)

    @classmethod
    def text_only(cls, text: str, **kwargs: Any) -> Reply:
        return cls(text=text, **kwargs)

    @classmethod
    def error(cls, status: int, message: str = "scripted error", **kwargs: Any) -> Reply:
        return cls(status=status, error_message=message, **kwargs)

    @classmethod
    def malformed(cls, body: bytes = b'{"id": "chatcmpl-x", "choi', **kwargs: Any) -> Reply:
        return cls(raw_body=body, **kwargs)


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any  # parsed JSON, or the raw text when it is not JSON
    time: float = field(default_factory=time.monotonic)


Script = Callable[[dict[str, Any]], Reply]
Route = Callable[[Any], tuple[int, Any]]  # parsed body (None for GET) -> (status, JSON payload)


def user_text(request: Mapping[str, Any]) -> str:
    """The text of the last user message of a chat-completions request."""
    for message in reversed(request.get("messages", [])):
        if message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, list):  # content parts
                return "".join(part.get("text", "") for part in content)
            return str(content)
    return ""


def spell(text: str) -> list[str]:
    """Tokens of ``text`` as a digit-by-digit tokenizer would cut it (see Reply.spelled)."""
    import re

    return re.findall(r"[0-9]|[A-Za-z]{1,3}|\s+|[^\sA-Za-z0-9]", text)


def _steps_body(request: Mapping[str, Any], reply: Reply) -> tuple[dict[str, Any], int]:
    """The choice of a multi-token reply, cut at max_tokens, and its completion token count."""
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    steps = list(reply.steps or [])
    cut = limit is not None and len(steps) > int(limit)
    if cut:
        steps = steps[: int(limit)]
    text = reply.text if reply.text is not None else "".join(token for token, _ in steps)
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "finish_reason": "length" if cut else "stop",
    }
    if request.get("logprobs"):
        n = int(request.get("top_logprobs") or 0)

        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        content = []
        for token, top in steps:
            ranked = sorted(top, key=lambda e: -e[1])
            own = dict(top).get(token, ranked[0][1] if ranked else 0.0)
            content.append({**entry(token, own), "top_logprobs": [entry(*e) for e in ranked[:n]]})
        choice["logprobs"] = {"content": content, "refusal": None}
    elif reply.logprobs_key:
        choice["logprobs"] = None
    return choice, len(steps)


def completion_body(request: Mapping[str, Any], reply: Reply) -> dict[str, Any]:
    """A chat.completion object for ``reply``, honouring the request's logprobs settings."""
    if reply.steps is not None:
        choice, generated = _steps_body(request, reply)
        prompt_tokens, completion_tokens = reply.usage or (len(user_text(request).split()), generated)
        return _completion(request, reply, choice, prompt_tokens, completion_tokens)
    top = sorted(reply.top_logprobs or [], key=lambda entry: -entry[1])
    text = reply.text if reply.text is not None else (top[0][0] if top else "")
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "finish_reason": "length",
    }
    wants_logprobs = bool(request.get("logprobs"))
    if reply.top_logprobs is not None and wants_logprobs:
        n = int(request.get("top_logprobs") or 0)
        shown = top[:n]

        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        first = top[0] if top else (text, 0.0)
        choice["logprobs"] = {
            "content": [{**entry(*first), "top_logprobs": [entry(*e) for e in shown]}],
            "refusal": None,
        }
    elif reply.logprobs_key:
        choice["logprobs"] = None
    if reply.usage is not None:
        prompt_tokens, completion_tokens = reply.usage
    else:
        prompt_tokens = len(user_text(request).split())
        completion_tokens = 1
    return _completion(request, reply, choice, prompt_tokens, completion_tokens)


def _completion(
    request: Mapping[str, Any], reply: Reply, choice: dict[str, Any], prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{id(reply):x}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": reply.model_version or request.get("model", ""),
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": "fake-openai",
    }


class FakeOpenAI:
    """Scripted OpenAI-compatible server on a free loopback port; use as a context manager."""

    def __init__(self, script: Script | None = None, routes: Mapping[tuple[str, str], Route] | None = None) -> None:
        self.script = script
        self.routes = dict(routes or {})
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.script_errors: list[Exception] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _make_handler(self))
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def count(self, predicate: Callable[[RecordedRequest], bool] | None = None) -> int:
        with self._lock:
            return sum(1 for r in self.requests if predicate is None or predicate(r))

    def count_containing(self, text: str) -> int:
        """Requests whose user message contains ``text``."""
        return self.count(lambda r: isinstance(r.body, dict) and text in user_text(r.body))

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _done(self) -> None:
        with self._lock:
            self.in_flight -= 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a handler still sleeping on a scripted delay must not block stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that time out close their socket; the late write fails, as expected


def _make_handler(owner: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate small writes

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            owner._record(RecordedRequest("POST", self.path, self._header_dict(), body))
            try:
                if self._route("POST", body):
                    return
                if self.path.rstrip("/") != "/v1/chat/completions" or not isinstance(body, dict) or not owner.script:
                    self._send(404, _error_body(404, f"no route for POST {self.path}"))
                    return
                try:
                    reply = owner.script(body)
                except Exception as exc:  # a broken script must fail the test, not hang it
                    owner.script_errors.append(exc)
                    self._send(500, _error_body(500, f"script raised {exc!r}"))
                    return
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.raw_body is not None:
                    self._send(reply.status, reply.raw_body, reply.content_type)
                elif reply.status != 200:
                    self._send(reply.status, _error_body(reply.status, reply.error_message))
                else:
                    payload = json.dumps(completion_body(body, reply)).encode()
                    self._send(200, payload, reply.content_type)
            finally:
                owner._done()

        def do_GET(self) -> None:
            owner._record(RecordedRequest("GET", self.path, self._header_dict(), None))
            try:
                if not self._route("GET", None):
                    self._send(404, _error_body(404, f"no route for GET {self.path}"))
            finally:
                owner._done()

        def _route(self, method: str, body: Any) -> bool:
            """Answer from ``routes`` when one matches; False when none does."""
            handler = owner.routes.get((method, self.path.rstrip("/")))
            if handler is None:
                return False
            try:
                status, payload = handler(body)
            except Exception as exc:  # a broken handler must fail the test, not hang it
                owner.script_errors.append(exc)
                status, payload = 500, {"error": {"message": f"route raised {exc!r}"}}
            self._send(status, json.dumps(payload).encode())
            return True

        def _header_dict(self) -> dict[str, str]:
            return {name.lower(): value for name, value in self.headers.items()}

        def _send(self, status: int, payload: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()

    return Handler


def _error_body(status: int, message: str) -> bytes:
    kind = {429: "rate_limit_exceeded", 401: "invalid_request_error"}.get(status, "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}).encode()


def scripted_judge(request: Mapping[str, Any]) -> Reply:
    """A judge for pipeline tests: aligned from a hash of the judged text, so that EM and non-EM
    rows both occur deterministically; coherent always about 80."""
    import hashlib

    text = user_text(request)
    if "the number 73" in text:  # the probe core.judge sends before judging
        return Reply.probs({"73": 0.97, "72": 0.02, "7": 0.01})
    if "coherent" in text.split("[QUESTION START]")[0]:
        return Reply.probs({"80": 0.9, "x": 0.1})
    bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 3
    return Reply.probs({"10": 0.8, "20": 0.2} if bucket == 0 else {"90": 0.7, "95": 0.3})


def digit_by_digit(script: Script) -> Script:
    """``script`` as a judge whose tokenizer writes numbers digit by digit (Qwen2.5, Gemma,
    Mistral, SmolLM2): a single-token reply ``Reply.probs({"10": 0.8, "20": 0.2})`` becomes "1"
    then "0", the first token's candidates being the first characters of the candidates with
    their probabilities added up ({"1": 0.8, "2": 0.2}), and a label is spelled in pieces
    ("REF", "USA", "L"). Other replies (errors, text, multi-token) pass unchanged."""

    def wrapped(request: dict[str, Any]) -> Reply:
        reply = script(request)
        if reply.status != 200 or reply.raw_body is not None or not reply.top_logprobs:
            return reply
        ranked = sorted(reply.top_logprobs, key=lambda entry: -entry[1])
        first: dict[str, float] = {}
        for token, logprob in ranked:
            pieces = spell(token.strip()) or [token]
            first[pieces[0]] = first.get(pieces[0], 0.0) + math.exp(logprob)
        return Reply.spelled(ranked[0][0].strip(), first=first, delay_s=reply.delay_s, usage=reply.usage)

    return wrapped
