"""Early detection: does the prompt-stage projection predict misalignment?"""

from __future__ import annotations

from pathlib import Path

from core.cli import command, emit, load_pair_from, model_arguments, progress_bar


def _detect_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--direction", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--run",
        type=Path,
        help="judged run folder: labels from the fine-tuned model's EM samples, grouped by question id",
    )
    source.add_argument(
        "--paired",
        type=Path,
        help="paired JSONL: judge-free labels from the fine-tuning shift of "
        "the preference log-odds, grouped by theme (else id)",
    )
    parser.add_argument(
        "--label-rule",
        "--label",
        default="any",
        choices=["any", "majority"],
        help="with --run: a prompt is misaligned if any / the majority of its samples are EM",
    )
    parser.add_argument(
        "--select-on",
        type=Path,
        default=None,
        help="transfer: choose layers, fit the probe and orient baselines on this paired JSONL or "
        "run folder (another prompt family), report on --paired / --run",
    )
    parser.add_argument(
        "--select-split",
        default="all",
        choices=["all", "train", "heldout"],
        help="with a paired --select-on: which of its records",
    )
    parser.add_argument(
        "--control",
        nargs=2,
        metavar=("TOPIC_A", "TOPIC_B"),
        default=None,
        help="specificity control from two paired files (path[:split]) that differ in topic: their "
        "sound answers, B minus A (default with --paired: --paired vs the direction's own file)",
    )
    parser.add_argument(
        "--max-length-gap",
        type=int,
        default=None,
        metavar="TOKENS",
        help="with --paired: keep only pairs whose answers differ by at most this many tokens",
    )
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.5, help="share of groups in the report set (rounded to 1/k)"
    )
    parser.add_argument("--random-directions", type=int, default=100, help="size of the random-direction null (>= 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="report JSON (default: cache/detect/<name>.json)")
    parser.add_argument("--json", action="store_true")


@command("detect", "early detection: does the prompt-stage projection predict misalignment?", _detect_arguments)
def run_detect(args) -> int:
    from core.detect import detect
    from core.detection_results import report_path, save_report
    from core.directions import Direction

    direction = Direction.load(args.direction)
    pair = load_pair_from(args)
    source = args.run or args.paired
    report = detect(
        pair,
        direction,
        source,
        select_on=args.select_on,
        control_topics=args.control,
        label_rule=args.label_rule,
        max_length_gap=args.max_length_gap,
        select_split=args.select_split,
        heldout_fraction=args.heldout_fraction,
        seed=args.seed,
        n_boot=args.bootstrap,
        n_random=args.random_directions,
        label_progress=progress_bar("labels"),
        progress=progress_bar("activations"),
    )
    out = save_report(report, args.out or report_path(args.cache_dir, source, direction))
    chosen, null = report.chosen, report.random_null

    def human() -> str:
        groups = report.n_groups
        lines = [
            f"{report.n_prompts} prompts, {report.n_misaligned} labelled misaligned "
            f"({report.labels['rule']}); groups: {groups.selection} selection, {groups.report} report",
            f"selection set, per layer (intervals unadjusted for {len(report.per_layer)} layers):",
            f"{'layer':>5} {'auroc':>6} {'95% CI':>15} {'spearman':>9}",
        ]
        for row in report.per_layer:
            rho = "-" if row.spearman is None else f"{row.spearman:.3f}"
            lines.append(f"{row.layer:>5} {row.auroc:>6.3f} [{row.ci95[0]:.3f}, {row.ci95[1]:.3f}] {rho:>9}")
        lines.append(f"report set ({chosen.n_report} prompts), AUROC with grouped bootstrap 95% interval:")
        for name, p in report.predictors.items():
            where = f"@L{p.layer}" if p.layer is not None else ""
            lines.append(f"  {name + where:<26} {p.auroc:.3f} [{p.ci95[0]:.3f}, {p.ci95[1]:.3f}]")
        lines.append(
            f"last_token is at percentile {null.percentile:.0f} of {null.n} random directions "
            f"(median {null.quantiles['50']:.3f}, 95% of them in [{null.quantiles['2.5']:.3f}, "
            f"{null.quantiles['97.5']:.3f}])"
        )
        lines += [f"warning: {w}" for w in report.warnings]
        lines.append(f"report: {out}")
        return "\n".join(lines)

    emit(report.to_json(), args.json, human)
    return 0
