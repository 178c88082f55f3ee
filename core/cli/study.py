"""``python -m core study``: the three phases of a study on one pair, and its shareable report."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from core.cli import command, emit, load_pair_from, model_arguments, progress_bar
from core.cli.evaluation import engine_arguments, judge_arguments, judge_config_from, server_engine_from

SIZES = {  # flag -> (StudyConfig field, type, help)
    "--n-train": ("n_train", int, "narrow train-split pairs used for extraction (default: all)"),
    "--n-heldout": ("n_heldout", int, "narrow held-out pairs for validation and transfer (default: all)"),
    "--n-general": ("n_general", int, "general pairs for validation and detection (default: all)"),
    "--n-questions": ("n_questions", int, "judged: the first N questions (default: all)"),
    "--paraphrases": ("paraphrases", int, "judged: the first N paraphrases of each question (default: all)"),
    "--samples": ("samples", int, "judged: samples per paraphrase and sweep cell (default 2)"),
    "--max-new-tokens": ("max_new_tokens", int, "judged: tokens per answer (default 64)"),
    "--random-directions": ("n_random", int, "size of the detection's random-direction null (>= 50; default 100)"),
    "--bootstrap": ("n_boot", int, "bootstrap draws for the detection intervals (default 1000)"),
    "--seed": ("seed", int, "default 0"),
    "--batch-size": ("batch_size", int, "default 8"),
    "--narrow": ("narrow", str, "paired JSONL of the training domain (default: the shipped finance pairs)"),
    "--general": ("general", str, "paired JSONL outside it (default: the shipped general pairs)"),
    "--questions": ("questions", str, "judged: question set YAML (default: the classic eight questions)"),
}


def _study_arguments(parser):
    model_arguments(parser)
    judge_arguments(parser)
    engine_arguments(parser)  # judged runs' sampling; activations and teacher-forced passes stay in process
    parser.add_argument(
        "--preset",
        choices=["demo", "seed-qwen"],
        default=None,
        help="demo: the embedded pair, judge-free, the shipped data; seed-qwen: the original plan "
        "(Qwen2.5-1.5B-Instruct + a published risky-financial adapter, the eight questions, "
        "50 samples each; needs a GPU, hub access and --judge-model)",
    )
    parser.add_argument("--out", type=Path, default=None, help="study folder (default: cache/studies/study-<time>)")
    parser.add_argument(
        "--layers", default=None, help="steering layers, e.g. 10,15,20 (default: the best layer and its neighbours)"
    )
    parser.add_argument("--alphas", default=None, help="steering strengths, e.g. 1,2,4")
    parser.add_argument("--contrasts", default=None, help="paired,model-diff (judged is added with a judge)")
    for flag, (_, kind, text) in SIZES.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument("--json", action="store_true", help="print report.json")


def study_config(args):
    """The StudyConfig of the preset (or the defaults), with every flag given on top."""
    from core.parsing import parse_numbers, split_list
    from core.study import PRESETS, StudyConfig

    config = PRESETS[args.preset]["config"] if args.preset else StudyConfig()
    changes = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _, _) in SIZES.items()}
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.layers:
        changes["layers"] = tuple(parse_numbers(args.layers, "--layers", int))
    if args.alphas:
        changes["alphas"] = tuple(parse_numbers(args.alphas, "--alphas"))
    if args.contrasts:
        changes["contrasts"] = tuple(split_list(args.contrasts))
    return replace(config, **changes)


@command(
    "study", "a whole study: directions, steering both ways, early detection, and a shareable report", _study_arguments
)
def run_study_command(args) -> int:
    from core.study import new_study_dir, preset_pair, run_study

    if args.preset:
        args.base, args.finetuned = preset_pair(args.preset, args.base, args.finetuned, bool(args.judge_model))
    config = study_config(args)
    judge = judge_config_from(args) if args.judge_model else None
    engine = server_engine_from(args)
    out = args.out or new_study_dir(args.cache_dir)
    pair = load_pair_from(args)
    bar = progress_bar("study")  # in percent, described by the step under way
    report = run_study(
        pair,
        out,
        config,
        judge,
        lambda fraction, step: bar(int(100 * fraction), 100, step),  # 100 (which closes it) only at the end
        spec={"base": args.base, "finetuned": args.finetuned},
        engine=engine,
    )
    emit(
        report,
        args.json,
        lambda: "\n\n".join(
            [report["judge_note"]]
            + [
                f"Phase {i} ({name}): {report[name]['verdict']}"
                for i, name in enumerate(("directions", "steering", "detection"), start=1)
            ]
            + [f"report: {Path(out) / 'report.html'}  (numbers: {Path(out) / 'report.json'})"]
        ),
    )
    return 0
