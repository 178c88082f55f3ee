"""The benchmark: speed and memory ratios of the pair, measured in one run (see benchmarks/)."""

from __future__ import annotations

from core.cli import command, emit, load_pair_from, model_arguments


def _bench_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument(
        "--random-config",
        default=None,
        help="benchmark random weights built from a config.json instead (e.g. Qwen2.5-1.5B's)",
    )
    parser.add_argument("--json", action="store_true")


@command("bench", "speed and memory ratios, measured in one run (see benchmarks/)", _bench_arguments)
def run_bench(args) -> int:
    from benchmarks.bench import gpu_throughput, run_all  # beside core/: importable wherever core is

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
