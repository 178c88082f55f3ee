"""Sampling throughput of a vLLM server over the in-process engine, in one run on one machine.

The server is the real one of ``.venv-vllm`` (``make vllm``), started here on the pair's base
model directory with its adapter as a LoRA and stopped at the end; both engines sample the same
rows (one prompt, the fine-tuned side, ``samples`` samples of up to ``tokens`` tokens, temperature
1, the same row seeds), interleaved, and each rate is the tokens they generated over the seconds
they took (median of ``repeats``).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench import PROMPT, machine, median_ratio
from core.generation import Sampling, Variant, generate
from core.server_engine import ServerConfig, ServerEngine
from testkit.vllm_server import VENV, VLLMServer, vllm_installed


def server_throughput(pair, samples: int = 64, tokens: int = 64, repeats: int = 3) -> dict:
    if not vllm_installed():
        raise RuntimeError(f"{VENV} is missing: `make vllm` builds it")
    if not pair.is_adapter:
        raise RuntimeError("the server benchmark serves the pair's fine-tune as a LoRA: it needs an adapter pair")
    sampling = Sampling(temperature=1.0, max_new_tokens=tokens)
    variant = Variant("finetuned")
    counts: dict[str, int] = {}

    with VLLMServer(Path(pair.base.location), Path(pair.finetuned.location)) as server:
        engine = ServerEngine(ServerConfig(urls=(server.url,), concurrency=samples))

        def sample(name: str, engine_call) -> None:
            rows = engine_call(pair, [PROMPT], [variant], sampling=sampling, samples=samples)
            counts[name] = sum(len(row.token_ids) for row in rows)

        _, served_s, in_process_s = median_ratio(
            lambda: sample("server", engine), lambda: sample("in_process", generate), repeats
        )
        startup_s = server.startup_s
    served_rate, in_process_rate = counts["server"] / served_s, counts["in_process"] / in_process_s
    return {
        "value": served_rate / in_process_rate,
        "server_tokens_per_s": served_rate,
        "in_process_tokens_per_s": in_process_rate,
        "server_s": served_s,
        "in_process_s": in_process_s,
        "tokens": counts,
        "samples": samples,
        "max_new_tokens": tokens,
        "repeats": repeats,
        "server_startup_s": startup_s,
        "server": engine.provenance(),
        "machine": machine(),
        "pair": pair.info(),
    }
