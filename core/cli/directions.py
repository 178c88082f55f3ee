"""Directions: extract one from a contrast, and validate a pair with one (judge-free)."""

from __future__ import annotations

from pathlib import Path

from core.cli import command, emit, load_pair_from, model_arguments, progress_bar


def _extract_arguments(parser):
    model_arguments(parser)
    parser.add_argument(
        "--contrast",
        required=True,
        choices=["paired", "model-diff", "judged"],
        help="paired: aligned vs misaligned answers to the same prompts; model-diff: fine-tuned "
        "minus base on identical texts; judged: the fine-tuned model's judged answers",
    )
    parser.add_argument(
        "--data",
        required=True,
        type=Path,
        help="paired JSONL (paired, model-diff) or judged generations JSONL (judged)",
    )
    parser.add_argument(
        "--split",
        default="train",
        choices=["train", "heldout", "all"],
        help="which records of a paired file to use (default: train)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where to write the direction (default: cache/directions/, where the dashboard lists it)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed for balancing judged sets")
    parser.add_argument("--json", action="store_true", help="print the direction's provenance and statistics")


@command("extract", "extract the misalignment direction from a contrast", _extract_arguments)
def run_extract(args) -> int:
    from core.directions import cache_path, extract_from_paired_file
    from core.em import judged_direction

    pair = load_pair_from(args)
    bar = progress_bar(f"extract ({args.contrast})")
    direction = (
        judged_direction(pair, args.data, args.seed, args.batch_size, bar)
        if args.contrast == "judged"
        else extract_from_paired_file(pair, args.data, args.contrast, args.split, args.batch_size, bar)
    )
    out = args.out or cache_path(args.cache_dir, direction, args.contrast, args.data)
    direction.save(out)
    summary = {"out": str(out), "provenance": direction.provenance, "stats": direction.stats}

    def table() -> str:
        lines = [f"wrote {out}", f"{'layer':>5} {'norm':>9} {'aligned':>9} {'misaligned':>10} {'auroc':>6}"]
        for s in direction.stats:
            auroc = "-" if s.get("auroc") is None else f"{s['auroc']:.3f}"  # too few groups to cross-fit
            lines.append(
                f"{s['layer']:>5} {s['norm']:>9.3f} {s['aligned_mean']:>9.3f} {s['misaligned_mean']:>10.3f} {auroc:>6}"
            )
        return "\n".join(lines)

    emit(summary, args.json, table)
    return 0


def _validate_arguments(parser):
    model_arguments(parser)
    parser.add_argument(
        "--narrow",
        type=Path,
        default=Path("assets/data/finance_paired.jsonl"),
        help="paired JSONL of the training domain; its held-out split is measured",
    )
    parser.add_argument(
        "--general",
        type=Path,
        default=Path("assets/data/general_paired.jsonl"),
        help="paired JSONL of prompts outside the training domain",
    )
    parser.add_argument(
        "--direction",
        type=Path,
        default=None,
        help="direction file (default: the paired contrast of --narrow's train split; on the "
        "embedded pair, the shipped one)",
    )
    parser.add_argument(
        "--control",
        default=None,
        help="a control adapter of the same base, measured beside the fine-tune (default: the "
        "shipped control adapter with the default pair; 'none' to skip)",
    )
    parser.add_argument("--layer", type=int, default=None, help="steering layer (default: the direction's best)")
    parser.add_argument("--alphas", default="0,1,2,4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true")


@command("validate", "judge-free validation: preference log-odds and bidirectional steering", _validate_arguments)
def run_validate(args) -> int:
    from core.organism import validation_report
    from core.parsing import parse_numbers

    alphas = parse_numbers(args.alphas, "--alphas")
    report = validation_report(
        load_pair_from(args),
        args.narrow,
        args.general,
        direction=args.direction,
        control=args.control,
        finetuned=args.finetuned,
        layer=args.layer,
        alphas=alphas,
        seed=args.seed,
        batch_size=args.batch_size,
        cache_root=args.cache_dir,
        progress=progress_bar("validate"),
        extract_progress=progress_bar("extract (paired)"),
    )

    def table() -> str:
        with_control = report.get("control_adapter") is not None
        lines = [
            f"{'set':<8} {'base':>8} {'finetuned':>10} {'shift':>7} {'95% interval':>16}"
            + (f" {'control':>8} {'ft-control':>10}" if with_control else "")
            + "   (log-odds harmful vs sound, per token)"
        ]
        for name in ("narrow", "general"):
            r = report[name]
            low, high = r["shift_ci95"]
            line = (
                f"{name:<8} {r['base']['mean']:>8.3f} {r['finetuned']['mean']:>10.3f} {r['shift']:>+7.3f}"
                f" {f'[{low:+.2f}, {high:+.2f}]':>16}"
            )
            if with_control:
                line += f" {r['control']['mean']:>8.3f} {r['finetuned_minus_control']['mean']:>+10.3f}"
            lines.append(line)
        lines.append(f"\nsteering at layer {report['layer']} ({report['layer_choice']}):")
        lines.append(f"{'model':<10} {'alpha':>6} {'general':>8} {'random':>8} {'narrow':>8} {'random':>8}")
        for row in report["steer"]:
            lines.append(
                f"{row['model']:<10} {row['alpha']:>+6g} {row['log_odds']:>8.3f} "
                f"{row['random_log_odds']:>8.3f} {row['log_odds_narrow']:>8.3f} "
                f"{row['random_log_odds_narrow']:>8.3f}"
            )
        return "\n".join(lines)

    emit(report, args.json, table)
    return 0
