"""What a direction is made of: its logit lens and who writes it (direct attribution)."""

from __future__ import annotations

from pathlib import Path

from core.cli import command, emit, load_pair_from, model_arguments, progress_bar


def _anatomy_arguments(parser):
    from core.anatomy import DEFAULT_PROMPTS, READS

    model_arguments(parser)
    parser.add_argument("--direction", type=Path, required=True, help="a direction file from `extract`")
    parser.add_argument("--layers", default="all", help="layers to read: 12, 10-14, 3,19 or all (default: all)")
    parser.add_argument(
        "--side", default="both", choices=["both", "base", "finetuned"], help="which model reads (default: both)"
    )
    parser.add_argument("--top-k", type=int, default=10, help="tokens promoted and suppressed per layer (default: 10)")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_PROMPTS,
        help="paired JSONL whose prompts (and answers) the attribution reads (default: the shipped general prompts)",
    )
    parser.add_argument("--split", default="all", choices=["all", "train", "heldout"], help="which records of --data")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records (default: all)")
    parser.add_argument(
        "--read",
        default="last-token",
        choices=list(READS),
        help="where the attribution reads: " + "; ".join(f"{name}: {text}" for name, text in READS.items()),
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")


@command("anatomy", "what a direction is made of: its logit lens and who writes it, per layer", _anatomy_arguments)
def run_anatomy(args) -> int:
    from core.anatomy import AnatomyError, direction_anatomy
    from core.cache import Cache
    from core.data import load_paired_jsonl
    from core.directions import Direction
    from core.parsing import parse_layer_list

    direction = Direction.load(args.direction)
    layers = parse_layer_list(args.layers, direction.n_layers)
    if args.top_k < 1:
        raise AnatomyError(f"--top-k {args.top_k}: expected at least 1")
    if args.limit is not None and args.limit < 1:
        raise AnatomyError(f"--limit {args.limit}: expected at least 1")
    records = load_paired_jsonl(args.data, None if args.split == "all" else args.split)[: args.limit]
    pair = load_pair_from(args)
    if args.side != "both" and args.side not in pair.sides:
        raise AnatomyError(f"--side {args.side}: the loaded pair has no fine-tuned model (--finetuned none)")
    sides = list(pair.sides) if args.side == "both" else [args.side]
    result = direction_anatomy(
        pair,
        direction,
        layers,
        sides,
        records,
        read=args.read,
        top_k=args.top_k,
        batch_size=args.batch_size,
        cache=Cache(args.cache_dir),
        progress=lambda side: progress_bar(f"attribution ({side})"),
    )
    result = {"direction": str(args.direction), "data": str(args.data), "split": args.split, **result}

    def table() -> str:
        from core.anatomy import Attribution

        lines = []
        for side in sides:
            lines.append(f"[{side}] logit lens: tokens the direction promotes (+) and suppresses (-)")
            for row in result["logit_lens"][side]:
                promoted = " ".join(f"{t['token']!r}({t['score']:+.2f})" for t in row["promoted"][:5])
                suppressed = " ".join(f"{t['token']!r}({t['score']:+.2f})" for t in row["suppressed"][:5])
                lines.append(f"  L{row['layer']:<3} + {promoted}\n       - {suppressed}")
            lines.append(f"[{side}] direct attribution ({args.read}, {len(records)} records of {args.data.name})")
            for row in result["attribution"][side]:
                attribution = Attribution.from_json(row)
                writers = ", ".join(f"{name} {value:+.3f}" for name, value in attribution.largest_parts(4))
                lines.append(
                    f"  L{attribution.layer:<3} total {attribution.total:+.3f} = embedding {attribution.embedding:+.3f}"
                    f" + attention {sum(attribution.attention):+.3f} + MLP {sum(attribution.mlp):+.3f}"
                    f" (unexplained {attribution.unexplained:+.1e}); largest: {writers}"
                )
        return "\n".join(lines)

    emit(result, args.json, table)
    return 0
