"""The benchmark: speed and memory ratios of the pair, measured in one run (see benchmarks/)."""

from __future__ import annotations

from core.cli import command, emit, load_pair_from, model_arguments
from core.errors import InputError


def _bench_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument(
        "--random-config",
        default=None,
        help="benchmark random weights built from a config.json instead (e.g. Qwen2.5-1.5B's)",
    )
    parser.add_argument(
        "--engine",
        choices=("hf", "server"),
        default="hf",
        help="server: only the sampling throughput of a vLLM server started from .venv-vllm (make vllm) "
        "over the in-process engine's, at --samples samples",
    )
    parser.add_argument("--samples", type=int, default=64, help="samples of one prompt (--engine server)")
    parser.add_argument("--json", action="store_true")


def _server_bench(args) -> int:
    from benchmarks.server import server_throughput
    from testkit.vllm_server import VENV, vllm_installed

    if not vllm_installed():
        raise InputError(f"--engine server starts a vLLM server from {VENV}, which is missing: run `make vllm`")
    result = server_throughput(load_pair_from(args), args.samples, args.tokens, args.repeats)
    emit(
        result,
        args.json,
        lambda: (
            f"server / in-process sampling throughput at {result['samples']} samples: {result['value']:.2f} "
            f"({result['server_tokens_per_s']:.1f} / {result['in_process_tokens_per_s']:.1f} tokens/s; "
            f"server ready after {result['server_startup_s']:.0f} s) on {result['machine']['processor']}, "
            f"{result['machine']['cpus']} CPUs, {result['machine']['device']}"
        ),
    )
    return 0


@command("bench", "speed and memory ratios, measured in one run (see benchmarks/)", _bench_arguments)
def run_bench(args) -> int:
    from benchmarks.bench import gpu_throughput, run_all  # beside core/: importable wherever core is

    if args.engine == "server":
        return _server_bench(args)

    if args.random_config:
        from benchmarks.random_pair import random_pair

        pair, base, finetuned = random_pair(args.random_config, args.device, args.dtype, args.cache_dir)
    else:
        pair, base, finetuned = load_pair_from(args), args.base, args.finetuned
    result = run_all(pair, base, finetuned, args.repeats, args.tokens, memory=base is not None)
    if pair.device.type == "cuda":
        result["gpu_throughput"] = gpu_throughput(pair, args.tokens)
    emit(
        result,
        args.json,
        lambda: "\n".join(
            f"{name:<36} {f['value']:>8.3f}  target {f['target']:<7} {'met' if f['met'] else 'NOT met'}"
            if f["value"] is not None
            else f"{name:<36} failed: {f['error']}"
            for name, f in result["figures"].items()
        ),
    )
    return 0
