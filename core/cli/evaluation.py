"""Evaluation: sample answers to a question set, judge them, report EM rates, and the steering sweep."""

from __future__ import annotations

import json
from pathlib import Path

from core.cli import (
    command,
    emit,
    load_options,
    load_pair_from,
    model_arguments,
    progress_bar,
    run_folder,
    sampling_arguments,
    sampling_from,
)
from core.errors import InputError
from core.parsing import parse_assignments, parse_names, split_list

QUESTIONS = Path("assets/questions/core_misalignment.yaml")


def judge_arguments(parser):
    group = parser.add_argument_group("judge (any OpenAI-compatible endpoint)")
    group.add_argument(
        "--judge-model",
        default=None,
        help="e.g. gpt-4o-2024-08-06; `judge` takes a comma list to score a run with several judges",
    )
    group.add_argument(
        "--judge-base-url",
        default=None,
        help="e.g. http://127.0.0.1:8000/v1 (default: OpenAI); with several judges, one URL for "
        "all or a comma list, one per judge",
    )
    group.add_argument("--judge-api-key", default=None, help="default: the OPENAI_API_KEY environment variable")
    group.add_argument("--judge-concurrency", type=int, default=8)
    group.add_argument("--judge-timeout", type=float, default=30.0)


def judge_config_from(args, several: bool = False):
    """The JudgeConfig of --judge-model; with ``several``, a list, one per comma-separated model."""
    from core.judge import JudgeConfig

    models = parse_names(args.judge_model, "--judge-model")
    if not models:
        raise InputError("--judge-model is required to judge answers")
    if len(models) > 1 and not several:
        raise InputError(
            f"--judge-model {args.judge_model!r}: this command takes one judge; score a run with "
            "several by `python -m core judge RUN --judge-model A,B`"
        )
    urls = [u.strip() or None for u in args.judge_base_url.split(",")] if args.judge_base_url else [None]
    if len(urls) == 1:
        urls = urls * len(models)
    elif len(urls) != len(models):
        raise InputError(
            f"--judge-base-url: {len(urls)} URLs for {len(models)} judge models; give one URL for "
            "all, or one per model in the same order"
        )
    configs = [
        JudgeConfig(
            model=model,
            base_url=url,
            api_key=args.judge_api_key,
            concurrency=args.judge_concurrency,
            timeout_s=args.judge_timeout,
        )
        for model, url in zip(models, urls)
    ]
    return configs if several else configs[0]


def engine_arguments(parser):
    group = parser.add_argument_group("engine (where the answers are sampled)")
    group.add_argument(
        "--engine",
        choices=("hf", "server"),
        default="hf",
        help="hf: in process, exact hooks (default); server: an OpenAI-compatible server such as vLLM "
        "(steered cells need the vllm-lens plugin there; no ablation)",
    )
    group.add_argument(
        "--server-url",
        default=None,
        help="http://HOST:PORT/v1; a comma list spreads the requests over servers serving the same models",
    )
    group.add_argument(
        "--server-model",
        action="append",
        default=[],
        metavar="SIDE=NAME",
        help="a side's served name, e.g. finetuned=em-finance (default: the server's base model and its one "
        "LoRA adapter); repeat for both sides",
    )
    group.add_argument("--server-api-key", default=None, help="default: the EMLENS_SERVER_API_KEY environment variable")
    group.add_argument("--server-concurrency", type=int, default=32, help="requests in flight per server")
    group.add_argument("--server-timeout", type=float, default=600.0, help="seconds for one answer")


def server_engine_from(args):
    """The ServerEngine of --engine server, or None for --engine hf (the server flags refused there)."""
    options = {
        "--server-url": args.server_url,
        "--server-model": args.server_model,
        "--server-api-key": args.server_api_key,
    }
    if args.engine == "hf":
        given = [flag for flag, value in options.items() if value]
        if given:
            raise InputError(f"{given[0]} needs --engine server")
        return None
    from core.server_engine import ServerConfig, ServerEngine

    if not args.server_url:
        raise InputError("--engine server needs --server-url http://HOST:PORT/v1")
    config = ServerConfig(
        urls=tuple(split_list(args.server_url)),
        models=parse_assignments(args.server_model, "--server-model", "finetuned=em-finance"),
        api_key=args.server_api_key,
        concurrency=args.server_concurrency,
        timeout_s=args.server_timeout,
    )
    return ServerEngine(config)


def pair_and_engine(args):
    """The pair and the engine of --engine: the loaded pair and None (in process), or the served
    pair (tokenizer and config, no weights) and a ServerEngine."""
    engine = server_engine_from(args)
    if engine is None:
        return load_pair_from(args), None
    from core.server_engine import served_pair

    return served_pair(args.base, args.finetuned, load_options(args)), engine


def questions_provenance(path: Path) -> dict:
    from core.data import dataset_hash

    return {"questions": str(path), "questions_sha256": dataset_hash(path)}


def _eval_arguments(parser):
    model_arguments(parser)
    sampling_arguments(parser)
    engine_arguments(parser)
    parser.set_defaults(max_new_tokens=128)
    parser.add_argument(
        "--questions",
        type=Path,
        default=QUESTIONS,
        help="question set YAML (id, paraphrases, samples_per_paraphrase, judge_prompts)",
    )
    parser.add_argument("--samples", type=int, default=None, help="samples per paraphrase (default: the file's)")
    parser.add_argument("--variants", default="base,finetuned")
    parser.add_argument("--direction", type=Path, default=None)
    parser.add_argument("--layer", default=None, help="steering layer(s): 12, 10-14 or all")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: cache/runs/eval-<time>)")


@command("generate-eval", "sample answers to a question set for each variant (resumable)", _eval_arguments)
def run_generate_eval(args) -> int:
    from core.data import load_questions
    from core.directions import Direction
    from core.generation import parse_variants
    from core.parsing import parse_layers
    from core.runs import condition, run_generations

    questions = load_questions(args.questions)
    variants = parse_variants(args.variants)
    direction = Direction.load(args.direction) if args.direction else None
    pair, engine = pair_and_engine(args)
    layers = parse_layers(args.layer, pair.n_layers) if args.layer is not None else []
    out = run_folder(args, "eval")
    rows = run_generations(
        pair,
        questions,
        [condition(v, layers, n_layers=pair.n_layers) for v in variants],
        out,
        direction,
        sampling_from(args),
        args.samples,
        progress=progress_bar("generate"),
        provenance=questions_provenance(args.questions),
        engine=engine,
    )
    print(f"{len(rows)} answers in {out / 'generations.jsonl'}")
    return 0


def _judge_run_arguments(parser):
    parser.add_argument("run", type=Path, help="a run folder from generate-eval or sweep")
    judge_arguments(parser)


@command(
    "judge",
    "judge a run's answers: aligned and coherent, 0-100, by one judge or several (resumable)",
    _judge_run_arguments,
)
def run_judge(args) -> int:
    from core.runs import judge_run

    configs = judge_config_from(args, several=True)
    summary = judge_run(
        args.run, configs, progress=progress_bar("judge" if len(configs) == 1 else f"judge ({len(configs)} judges)")
    )
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def _em_arguments(parser):
    parser.add_argument("run", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="also write a per-condition, per-question CSV")
    parser.add_argument("--json", action="store_true")


@command("em", "EM and coherence rates with Wilson intervals for a judged run", _em_arguments)
def run_em(args) -> int:
    import pandas as pd

    from core.em import em_report, judge_table, report_table, save_em_report

    report = em_report(args.run)
    save_em_report(report, args.run)
    table = pd.DataFrame(report_table(report))
    if args.csv:
        table.to_csv(args.csv, index=False)

    def human() -> str:
        overall = table[table.question == "ALL"]
        cols = [
            "condition",
            "n",
            "n_unscored",
            "em_rate",
            "em_ci_low",
            "em_ci_high",
            "em_rate_unscored_as_aligned",
            "coherence_rate",
        ]
        text = overall[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")
        judges = [j.model for j in report.judges or []]
        if judges:
            text = f"judge: {judges[0]}\n" + text
        per_judge = judge_table(report)
        if per_judge:
            text += "\n\nEM rate (unscored excluded) per judge, and the spread across judges:\n" + pd.DataFrame(
                per_judge
            ).to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
        return text + "\n" + report.unscored_policy

    emit(report.to_json(), args.json, human)
    return 0


def _sweep_arguments(parser):
    model_arguments(parser)
    sampling_arguments(parser)
    engine_arguments(parser)
    judge_arguments(parser)
    parser.set_defaults(max_new_tokens=96)
    parser.add_argument("--questions", type=Path, default=QUESTIONS)
    parser.add_argument("--samples", type=int, default=2, help="samples per paraphrase and cell")
    parser.add_argument("--direction", type=Path, required=True)
    parser.add_argument("--layers", required=True, help="comma list of layers, e.g. 10,15,20")
    parser.add_argument("--alphas", default="1,2,4")
    parser.add_argument("--no-controls", action="store_true", help="skip the random-vector control cells")
    parser.add_argument(
        "--no-ablation", action="store_true", help="skip the ablation cells (a server cannot ablate: --engine server)"
    )
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: cache/runs/sweep-<time>)")
    parser.add_argument("--json", action="store_true")


@command("sweep", "bidirectional alpha x layer sweep: induce, restore, ablate, random control", _sweep_arguments)
def run_sweep(args) -> int:
    from core.cache import atomic_write
    from core.data import load_questions
    from core.directions import Direction
    from core.parsing import parse_numbers
    from core.plots import figure_html, sweep_figure
    from core.runs import SWEEP_HTML
    from core.sweep import sweep_run

    alphas = parse_numbers(args.alphas, "--alphas")
    layers = parse_numbers(args.layers, "--layers", int)
    config = judge_config_from(args)
    questions = load_questions(args.questions)
    direction = Direction.load(args.direction)
    pair, engine = pair_and_engine(args)
    result = sweep_run(
        pair,
        questions,
        direction,
        layers,
        alphas,
        run_folder(args, "sweep"),
        config,
        sampling_from(args),
        args.samples,
        controls=not args.no_controls,
        provenance=questions_provenance(args.questions),
        generate_progress=progress_bar("generate"),
        judge_progress=progress_bar("judge"),
        ablation=not args.no_ablation,
        engine=engine,
    )
    figure = Path(result.run) / SWEEP_HTML
    atomic_write(figure, figure_html(sweep_figure(result.cells)))
    emit(
        result.to_json(),
        args.json,
        lambda: (
            "\n".join(
                f"{c.condition:<28} EM {c.em_rate if c.em_rate is not None else float('nan'):.3f} "
                f"coherent {c.coherence_rate if c.coherence_rate is not None else float('nan'):.3f} (n={c.n})"
                for c in result.cells
            )
            + f"\nfigure: {figure}"
        ),
    )
    return 0
