"""Several dashboard sessions on the one shared pair: concurrent steering, projections and extraction
give exactly what the same requests give one at a time, round after round, leaving no hook and no
memory behind."""

from __future__ import annotations

import threading
import time
from contextlib import closing

import pytest
import torch

from core.chat import user_prompt
from core.directions import Direction, extract_contrast
from core.generation import Sampling, Variant, generate, stream
from core.models import decoder_layers
from core.projections import prompt_projections
from testkit.dashboard import ALIGNED, MISALIGNED

PROMPTS = [
    user_prompt("How should I invest my savings?"),
    user_prompt("Is crypto a good idea?"),
    user_prompt("What is the capital of France?", system="Answer briefly."),
]
COEFFICIENTS = [-8.0, -3.0, 0.0, 2.0, 5.0, 9.0]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _direction(pair) -> Direction:
    generator = torch.Generator().manual_seed(0)
    return Direction(torch.randn(pair.n_layers, pair.d_model, generator=generator) * 3, {"base": "test"}, [])


def _requests(pair, direction):
    """What different sessions ask for at once: the Steer grid at several coefficients (one of them
    streamed slowly, like a page showing tokens as they come), an ablation, prompt-stage projections
    and an extraction."""

    def steer(alpha: float, seed: int, slow: bool = False):
        def run():
            variants = [Variant("base"), Variant("finetuned"), Variant("base", alpha), Variant("finetuned", -alpha)]
            kwargs = dict(direction=direction, layers=[1, 2], sampling=Sampling(1.0, 1.0, 16, seed), trace_layer=2)
            if not slow:
                rows = generate(pair, PROMPTS[seed % 3 : seed % 3 + 1], variants, **kwargs)
            else:
                for partial in stream(pair, PROMPTS[seed % 3 : seed % 3 + 1], variants, **kwargs):
                    rows = partial
                    time.sleep(0.002)  # yield the CPU to the others while holding a half-done generation
            return [(r.label, r.token_ids, r.prompt_projection, r.token_projections) for r in rows]

        return run

    def ablate():
        rows = generate(
            pair,
            PROMPTS,
            [Variant("finetuned", ablate=True)],
            direction=direction,
            layers=[0, 1, 2, 3],
            sampling=Sampling(1.0, 1.0, 12, 11),
        )
        return [r.token_ids for r in rows]

    def project():
        return [prompt_projections(pair, prompt, direction) for prompt in PROMPTS]

    def extract():
        return extract_contrast(pair, ALIGNED, MISALIGNED, "paired", batch_size=2).vectors

    requests = [steer(alpha, seed) for seed, alpha in enumerate(COEFFICIENTS)]
    return requests + [steer(4.0, 7, slow=True), ablate, project, extract]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def _hook_counts(pair) -> dict[str, list[int]]:
    return {
        side: [len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in decoder_layers(pair.module(side))]
        for side in pair.sides
    }


def test_concurrent_sessions_see_exactly_what_they_see_alone(tiny_pair):
    direction = _direction(tiny_pair)
    requests = _requests(tiny_pair, direction)
    hooks_before = _hook_counts(tiny_pair)
    serial = [request() for request in requests]
    steered_tokens = {tuple(map(tuple, (row[1] for row in result))) for result in serial[: len(COEFFICIENTS)]}
    assert len(steered_tokens) == len(COEFFICIENTS)  # the coefficients really give different answers

    baseline = None
    for round_ in range(3):
        results, failures = [None] * len(requests), []
        start = threading.Barrier(len(requests))

        def work(i, start=start, results=results, failures=failures):
            start.wait()
            try:
                results[i] = requests[i]()
            except BaseException as err:  # noqa: BLE001 - reported below with the request's index
                failures.append((i, err))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert not failures, failures
        for i, (alone, together) in enumerate(zip(serial, results)):
            assert _same(alone, together), f"request {i} differs when run concurrently (round {round_})"
        if round_ == 0:
            baseline = _rss_mb()
    assert _rss_mb() - baseline < 50  # no growth across rounds (hooks removed, caches freed)
    assert _hook_counts(tiny_pair) == hooks_before  # no hook left behind, on any layer of either side


def test_an_interrupted_stream_releases_the_pair(tiny_pair):
    """A page rerun stops a generation half-way; closing the generator must free the pair for the others."""
    direction = _direction(tiny_pair)
    hooks_before = _hook_counts(tiny_pair)
    generator = stream(
        tiny_pair,
        PROMPTS[:1],
        [Variant("finetuned", 2.0)],
        direction=direction,
        layers=[1],
        sampling=Sampling(0.0, 1.0, 32, 0),
    )
    with closing(generator):
        next(generator)
        next(generator)
    done = threading.Event()
    other = threading.Thread(
        target=lambda: (
            generate(tiny_pair, PROMPTS[:1], [Variant("base")], sampling=Sampling(0.0, 1.0, 4, 0)),
            done.set(),
        )
    )
    other.start()
    other.join(timeout=60)
    assert done.is_set(), "another session could not use the pair after a stream was interrupted"
    assert _hook_counts(tiny_pair) == hooks_before  # no steering left behind
