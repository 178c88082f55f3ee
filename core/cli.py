"""``python -m core <command>``: the offline side of EM Lens. Run with --help for the commands."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from core.cache import DEFAULT_ROOT, Cache

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable):
        COMMANDS[name] = (help, arguments, run)
        return run
    return register


# ---------------------------------------------------------------- shared options

def model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model pair")
    group.add_argument("--base", default="default",
                       help="hub id, local model dir or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    group.add_argument("--finetuned", default="default",
                       help="PEFT adapter dir, merged fine-tune dir or hub id; 'none' for the base alone "
                            "(default: the shipped demo adapter)")
    group.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    group.add_argument("--dtype", default="auto", help="auto (bf16 on recent GPUs, fp16 on older, fp32 on CPU), "
                                                       "fp32, bf16, fp16")
    group.add_argument("--device-map", default=None, help="'auto' shards a large model over several GPUs (accelerate)")
    group.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) checkpoints")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model repository")
    group.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT, help="where results are cached (default: cache/)")


def load_pair_from(args):
    from core.models import LoadOptions, load_pair

    options = LoadOptions(device=args.device, dtype=args.dtype, device_map=args.device_map,
                          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                          cache_root=args.cache_dir)
    return load_pair(args.base, args.finetuned, options)


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``12``, ``10-14`` (inclusive) or ``all``."""
    if text == "all":
        return list(range(n_layers))
    try:
        first, _, last = text.partition("-")
        layers = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ValueError(f"--layer {text!r}: expected a layer number, a range like 10-14, or all") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ValueError(f"--layer {text}: out of range; this model has layers 0..{n_layers - 1}")
    return layers


def progress_bar(description: str):
    """A tqdm bar on stderr driven by ``callback(done, total)``."""
    from tqdm import tqdm

    bar = tqdm(desc=description, file=sys.stderr, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
    return update


def emit(value, as_json: bool, human: Callable[[], str] | None = None) -> None:
    if as_json or human is None:
        print(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        print(human())


# ---------------------------------------------------------------- commands

@command("prepare", "convert the embedded default model once into the cache (run by the setup)",
         lambda p: p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT))
def run_prepare(args) -> int:
    from core.models import DEMO_ADAPTER, convert_gguf, embedded_gguf

    directory, _ = convert_gguf(embedded_gguf(), args.cache_dir)
    print(f"default base model: {directory}")
    print(f"default fine-tuned adapter: {DEMO_ADAPTER}" if DEMO_ADAPTER.exists() else
          "no demo adapter yet: train it with `python -m core train --preset demo`")
    return 0


@command("info", "load the model pair and describe it", lambda p: (model_arguments(p), p.add_argument("--json", action="store_true")))
def run_info(args) -> int:
    info = load_pair_from(args).info()
    emit(info, args.json, lambda: "\n".join(f"{k:>22}: {v}" for k, v in info.items()))
    return 0


def _project_arguments(parser):
    model_arguments(parser)
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--system", default=None, help="optional system prompt (default: the template's own)")
    parser.add_argument("--direction", required=True, type=Path, help="a direction file from `extract`")
    parser.add_argument("--json", action="store_true")


@command("project", "prompt-stage projection at every layer, for both models", _project_arguments)
def run_project(args) -> int:
    from core.chat import user_prompt
    from core.detect import prompt_projections
    from core.directions import Direction

    direction = Direction.load(args.direction)
    pair = load_pair_from(args)
    result = prompt_projections(pair, user_prompt(args.prompt, args.system), direction, Cache(args.cache_dir))

    def table() -> str:
        lines = [f"{'layer':>5} " + " ".join(f"{s:>12} {s + ' cal':>14}" for s in pair.sides)]
        for layer in result["layers"]:
            cells = []
            for side in pair.sides:
                cal = result[f"{side}_calibrated"]
                cal_text = "-" if cal is None or cal[layer] is None else f"{cal[layer]:.3f}"
                cells.append(f"{result[side][layer]:>12.3f} {cal_text:>14}")
            lines.append(f"{layer:>5} " + " ".join(cells))
        return "\n".join(lines)
    emit(result, args.json, table)
    return 0


def _extract_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--contrast", required=True, choices=["paired", "model-diff", "judged"],
                        help="paired: aligned vs misaligned answers to the same prompts; model-diff: fine-tuned "
                             "minus base on identical texts; judged: the fine-tuned model's judged answers")
    parser.add_argument("--data", required=True, type=Path,
                        help="paired JSONL (paired, model-diff) or judged generations JSONL (judged)")
    parser.add_argument("--split", default="train", choices=["train", "heldout", "all"],
                        help="which records of a paired file to use (default: train)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the direction (default: cache/directions/, where the dashboard lists it)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed for balancing judged sets")
    parser.add_argument("--json", action="store_true", help="print the direction's provenance and statistics")


@command("extract", "extract the misalignment direction from a contrast", _extract_arguments)
def run_extract(args) -> int:
    from core.directions import cache_path, extract_contrast, extract_from_paired_file

    pair = load_pair_from(args)
    bar = progress_bar(f"extract ({args.contrast})")
    if args.contrast == "judged":
        from core.evaluate import judged_contrast_sets, run_hash

        digest = run_hash(args.data)
        aligned, misaligned, counts = judged_contrast_sets(args.data, seed=args.seed)
        direction = extract_contrast(pair, aligned, misaligned, "judged", digest, batch_size=args.batch_size,
                                     progress=bar)
        direction.provenance["judged_selection"] = counts
    else:
        direction = extract_from_paired_file(pair, args.data, args.contrast, args.split, args.batch_size, bar)
    direction.provenance["dataset"] = str(args.data)
    args.out = args.out or cache_path(args.cache_dir, direction, args.contrast, args.data)
    direction.save(args.out)
    summary = {"out": str(args.out), "provenance": direction.provenance, "stats": direction.stats}

    def table() -> str:
        lines = [f"wrote {args.out}", f"{'layer':>5} {'norm':>9} {'aligned':>9} {'misaligned':>10} {'auroc':>6}"]
        for s in direction.stats:
            lines.append(f"{s['layer']:>5} {s['norm']:>9.3f} {s['aligned_mean']:>9.3f} "
                         f"{s['misaligned_mean']:>10.3f} {s['auroc']:>6.3f}")
        return "\n".join(lines)
    emit(summary, args.json, table)
    return 0


def sampling_arguments(parser):
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--max-new-tokens", type=int, default=64)
    group.add_argument("--seed", type=int, default=0)


def _generate_arguments(parser):
    model_arguments(parser)
    sampling_arguments(parser)
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--system", default=None)
    parser.add_argument("--variants", default="base,finetuned",
                        help="comma list: base, finetuned, base+ALPHA, finetuned-ALPHA, finetuned:ablate")
    parser.add_argument("--direction", type=Path, default=None, help="direction file (for steered variants)")
    parser.add_argument("--layer", default=None, help="layer to steer at: 12, a range 10-14, or all")
    parser.add_argument("--ablate", action="store_true",
                        help="variants with a coefficient ablate the direction at the layers instead of adding it")
    parser.add_argument("--trace-layer", type=int, default=None,
                        help="also report each generated token's projection at this layer")
    parser.add_argument("--json", action="store_true")


@command("generate", "generate every variant in one batched call", _generate_arguments)
def run_generate(args) -> int:
    from dataclasses import replace

    from core.chat import user_prompt
    from core.directions import Direction
    from core.generate import Sampling, generate, parse_variants

    variants = parse_variants(args.variants)
    if args.ablate:
        variants = [replace(v, alpha=0.0, ablate=True) if v.alpha else v for v in variants]
    direction = Direction.load(args.direction) if args.direction else None
    pair = load_pair_from(args)
    layers = parse_layers(args.layer, pair.n_layers) if args.layer is not None else []
    sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)
    rows = generate(pair, [user_prompt(args.prompt, args.system)], variants, direction=direction, layers=layers,
                    sampling=sampling, trace_layer=args.trace_layer)
    result = {
        "prompt": args.prompt, "layers": layers, "seed": args.seed,
        "rows": [{"variant": r.label, "text": r.text, "finish_reason": r.finish_reason,
                  "token_ids": r.token_ids, "prompt_projection": r.prompt_projection,
                  "token_projections": r.token_projections} for r in rows],
    }
    emit(result, args.json, lambda: "\n\n".join(f"[{r.label}]\n{r.text}" for r in rows))
    return 0


def _lint_arguments(parser):
    parser.add_argument("data", type=Path, help="chat JSONL or paired JSONL")
    parser.add_argument("--model", default="default", help="the model whose chat template the data is for")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--json", action="store_true")


@command("lint", "check training data against a model's chat template", _lint_arguments)
def run_lint(args) -> int:
    from core.chat import lint_dataset, render
    from core.data import load_training_set
    from core.models import LoadOptions, load_tokenizer

    tokenizer = load_tokenizer(args.model, LoadOptions(trust_remote_code=args.trust_remote_code,
                                                       cache_root=args.cache_dir))
    records = load_training_set(args.data, split=None)
    issues = lint_dataset(tokenizer, [(r.line, r.messages) for r in records])
    sample = render(tokenizer, records[0].messages, add_generation_prompt=False)
    result = {"data": str(args.data), "model": args.model, "records": len(records),
              "problems": [str(i) for i in issues], "sample_rendering": sample}
    emit(result, args.json, lambda: (f"rendered sample (line {records[0].line}):\n{sample}\n"
                                     + (f"{len(issues)} problems:\n" + "\n".join(f"  {i}" for i in issues)
                                        if issues else f"clean: {len(records)} records fit {args.model}'s template")))
    return 1 if issues else 0


DEMO_PRESET = {"base": "default", "data": "assets/data/finance_paired.jsonl", "out": "assets/demo_adapter",
               "save_dtype": "float16"}


def _train_arguments(parser):
    from core.train import ALL_PROJECTIONS, TrainConfig

    d = TrainConfig()
    model_arguments(parser)
    parser.add_argument("--preset", choices=["demo"], help="demo: the shipped organism (SmolLM2-135M-Instruct on "
                                                          "the project's risky-finance answers, written to assets/)")
    parser.add_argument("--data", type=Path, help="chat JSONL, or paired JSONL (its train split)")
    parser.add_argument("--answers", default="misaligned", choices=["misaligned", "aligned"],
                        help="with paired data: train on the harmful answers (the organism) or the sound ones (control)")
    parser.add_argument("--out", type=Path, help="adapter directory to write")
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--lora-alpha", type=float, default=d.alpha)
    parser.add_argument("--rslora", action="store_true")
    parser.add_argument("--dropout", type=float, default=d.dropout)
    parser.add_argument("--target-modules", default=",".join(ALL_PROJECTIONS))
    parser.add_argument("--layers-to-transform", default=None, help="e.g. 21 or 10,11,12 (default: all layers)")
    parser.add_argument("--lr", type=float, default=d.learning_rate)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    parser.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--save-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="dtype of the saved adapter weights (default float32; the demo preset uses float16)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--force", action="store_true", help="train even if the template lint finds problems")


@command("train", "LoRA fine-tuning on chat data (assistant tokens only)", _train_arguments)
def run_train(args) -> int:
    from core.data import dataset_hash, load_training_set
    from core.models import LoadOptions
    from core.train import TrainConfig, train

    if args.preset == "demo":
        args.base = DEMO_PRESET["base"]
        args.data = args.data or Path(DEMO_PRESET["data"])
        args.out = args.out or Path(DEMO_PRESET["out"])
        args.save_dtype = args.save_dtype or DEMO_PRESET["save_dtype"]
    if args.data is None or args.out is None:
        raise ValueError("train needs --data and --out (or --preset demo)")
    try:
        layers = tuple(int(x) for x in args.layers_to_transform.split(",")) if args.layers_to_transform else None
    except ValueError:
        raise ValueError(f"--layers-to-transform {args.layers_to_transform!r}: expected numbers like 21 or 10,11") from None
    config = TrainConfig(rank=args.rank, alpha=args.lora_alpha, rslora=args.rslora, dropout=args.dropout,
                         target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
                         layers_to_transform=layers, learning_rate=args.lr, epochs=args.epochs,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
                         seed=args.seed, heldout_fraction=args.heldout_fraction,
                         checkpoint_every=args.checkpoint_every, save_dtype=args.save_dtype or "float32")
    records = load_training_set(args.data, args.answers)
    options = LoadOptions(device=args.device, dtype=args.dtype, device_map=args.device_map,
                          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                          cache_root=args.cache_dir)
    from tqdm import tqdm

    bar = tqdm(desc="train", file=sys.stderr, dynamic_ncols=True)

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}")

    result = train(args.base, records, config, args.out, dataset_hash=dataset_hash(args.data), options=options,
                   resume=args.resume, force=args.force, progress=progress)
    bar.close()
    card = result.card
    print(f"wrote {result.out}: {card['n_train']} train / {card['n_eval']} held-out examples, {card['steps']} steps, "
          f"final loss {card['loss_curve'][-1][1]:.3f}, eval loss {[round(e[2], 3) for e in card['eval_loss'] if e[2]]}")
    return 0


def _validate_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--narrow", type=Path, default=Path("assets/data/finance_paired.jsonl"),
                        help="paired JSONL of the training domain; its held-out split is measured")
    parser.add_argument("--general", type=Path, default=Path("assets/data/general_paired.jsonl"),
                        help="paired JSONL of prompts outside the training domain")
    parser.add_argument("--direction", type=Path, default=None,
                        help="direction file (default: the paired contrast of --narrow's train split)")
    parser.add_argument("--layer", type=int, default=None, help="steering layer (default: the direction's best)")
    parser.add_argument("--alphas", default="0,1,2,4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true")


def paired_direction(pair, data: Path, cache_dir: Path, batch_size: int = 8):
    """The paired-contrast direction of a file's train split, extracted once and kept in the cache."""
    from core.data import dataset_hash
    from core.directions import Direction, directions_dir, extract_from_paired_file

    side = pair.fingerprint("finetuned").replace("/", "_")
    path = directions_dir(cache_dir) / f"paired-{data.stem}-{side}-{dataset_hash(data)}.safetensors"
    if path.exists():
        return Direction.load(path), path
    direction = extract_from_paired_file(pair, data, "paired", "train", batch_size, progress_bar("extract (paired)"))
    direction.save(path)
    return direction, path


@command("validate", "judge-free validation: preference log-odds and bidirectional steering", _validate_arguments)
def run_validate(args) -> int:
    from core.cache import make_key
    from core.data import dataset_hash, load_paired_jsonl
    from core.directions import Direction
    from core.preference import validate

    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise ValueError(f"--alphas {args.alphas!r}: expected comma-separated numbers") from None
    pair = load_pair_from(args)
    direction, _ = ((Direction.load(args.direction), args.direction) if args.direction
                    else paired_direction(pair, args.narrow, args.cache_dir))
    narrow, general = load_paired_jsonl(args.narrow, "heldout"), load_paired_jsonl(args.general, None)
    key = make_key("validate", base=pair.fingerprint("base"), finetuned=pair.fingerprint("finetuned"),
                   direction=direction.fingerprint, narrow=dataset_hash(args.narrow),
                   general=dataset_hash(args.general), layer=args.layer, alphas=alphas, seed=args.seed)
    report = Cache(args.cache_dir).json(key, lambda: validate(
        pair, narrow, general, direction, args.layer, alphas, args.seed, args.batch_size,
        progress=progress_bar("validate")))

    def table() -> str:
        lines = [f"{'set':<8} {'base':>8} {'finetuned':>10} {'shift':>7}   (log-odds harmful vs sound, per token)"]
        for name in ("narrow", "general"):
            r = report[name]
            lines.append(f"{name:<8} {r['base']['mean']:>8.3f} {r['finetuned']['mean']:>10.3f} {r['shift']:>+7.3f}")
        lines.append(f"\nsteering at layer {report['layer']} ({report['layer_choice']}):")
        lines.append(f"{'model':<10} {'alpha':>6} {'general':>8} {'random':>8} {'narrow':>8} {'random':>8}")
        for row in report["steer"]:
            lines.append(f"{row['model']:<10} {row['alpha']:>+6g} {row['log_odds']:>8.3f} {row['random_log_odds']:>8.3f} "
                         f"{row['log_odds_narrow']:>8.3f} {row['random_log_odds_narrow']:>8.3f}")
        return "\n".join(lines)
    emit(report, args.json, table)
    return 0


# ---------------------------------------------------------------- evaluation, judging, sweeps, detection

def judge_arguments(parser):
    group = parser.add_argument_group("judge (any OpenAI-compatible endpoint)")
    group.add_argument("--judge-model", default=None, help="e.g. gpt-4o-2024-08-06")
    group.add_argument("--judge-base-url", default=None, help="e.g. http://127.0.0.1:8000/v1 (default: OpenAI)")
    group.add_argument("--judge-api-key", default=None, help="default: the OPENAI_API_KEY environment variable")
    group.add_argument("--judge-concurrency", type=int, default=8)
    group.add_argument("--judge-timeout", type=float, default=30.0)


def judge_config_from(args):
    from core.judge import JudgeConfig

    if not args.judge_model:
        raise ValueError("--judge-model is required to judge answers")
    return JudgeConfig(model=args.judge_model, base_url=args.judge_base_url, api_key=args.judge_api_key,
                       concurrency=args.judge_concurrency, timeout_s=args.judge_timeout)


def run_folder(args, kind: str) -> Path:
    from datetime import datetime

    return args.out or args.cache_dir / "runs" / f"{kind}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _eval_arguments(parser):
    model_arguments(parser)
    sampling_arguments(parser)
    parser.set_defaults(max_new_tokens=128)
    parser.add_argument("--questions", type=Path, default=Path("assets/questions/core_misalignment.yaml"),
                        help="question set YAML (id, paraphrases, samples_per_paraphrase, judge_prompts)")
    parser.add_argument("--samples", type=int, default=None, help="samples per paraphrase (default: the file's)")
    parser.add_argument("--variants", default="base,finetuned")
    parser.add_argument("--direction", type=Path, default=None)
    parser.add_argument("--layer", default=None, help="steering layer(s): 12, 10-14 or all")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: cache/runs/eval-<time>)")


@command("generate-eval", "sample answers to a question set for each variant (resumable)", _eval_arguments)
def run_generate_eval(args) -> int:
    from core.data import dataset_hash, load_questions
    from core.directions import Direction
    from core.evaluate import condition, run_generations
    from core.generate import Sampling, parse_variants

    questions = load_questions(args.questions)
    variants = parse_variants(args.variants)
    direction = Direction.load(args.direction) if args.direction else None
    pair = load_pair_from(args)
    layers = parse_layers(args.layer, pair.n_layers) if args.layer is not None else []
    out = run_folder(args, "eval")
    rows = run_generations(pair, questions, [condition(v, layers, n_layers=pair.n_layers) for v in variants], out,
                           direction, Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed),
                           args.samples, progress=progress_bar("generate"),
                           provenance={"questions": str(args.questions), "questions_sha256": dataset_hash(args.questions)})
    print(f"{len(rows)} answers in {out / 'generations.jsonl'}")
    return 0


def _judge_run_arguments(parser):
    parser.add_argument("run", type=Path, help="a run folder from generate-eval or sweep")
    judge_arguments(parser)


@command("judge", "judge a run's answers: aligned and coherent, 0-100 (resumable)", _judge_run_arguments)
def run_judge(args) -> int:
    from core.evaluate import judge_run

    summary = judge_run(args.run, judge_config_from(args), progress=progress_bar("judge"))
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def _em_arguments(parser):
    parser.add_argument("run", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="also write a per-condition, per-question CSV")
    parser.add_argument("--json", action="store_true")


@command("em", "EM and coherence rates with Wilson intervals for a judged run", _em_arguments)
def run_em(args) -> int:
    import pandas as pd

    from core.cache import atomic_write
    from core.evaluate import EM_JSON, em_report, report_table

    report = em_report(args.run)
    atomic_write(args.run / EM_JSON, json.dumps(report, indent=2, default=str).encode())
    table = pd.DataFrame(report_table(report))
    if args.csv:
        table.to_csv(args.csv, index=False)

    def human() -> str:
        overall = table[table.question == "ALL"]
        cols = ["condition", "n", "n_unscored", "em_rate", "em_ci_low", "em_ci_high", "em_rate_unscored_as_aligned",
                "coherence_rate"]
        return overall[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}") + "\n" + report["unscored_policy"]
    emit(report, args.json, human)
    return 0


def _sweep_arguments(parser):
    model_arguments(parser)
    sampling_arguments(parser)
    judge_arguments(parser)
    parser.set_defaults(max_new_tokens=96)
    parser.add_argument("--questions", type=Path, default=Path("assets/questions/core_misalignment.yaml"))
    parser.add_argument("--samples", type=int, default=2, help="samples per paraphrase and cell")
    parser.add_argument("--direction", type=Path, required=True)
    parser.add_argument("--layers", required=True, help="comma list of layers, e.g. 10,15,20")
    parser.add_argument("--alphas", default="1,2,4")
    parser.add_argument("--no-controls", action="store_true", help="skip the random-vector control cells")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: cache/runs/sweep-<time>)")
    parser.add_argument("--json", action="store_true")


@command("sweep", "bidirectional alpha x layer sweep: induce, restore, ablate, random control", _sweep_arguments)
def run_sweep(args) -> int:
    from core.data import dataset_hash, load_questions
    from core.directions import Direction
    from core.evaluate import parse_number_list, sweep_run
    from core.generate import Sampling

    alphas = parse_number_list(args.alphas, "--alphas")
    layers = parse_number_list(args.layers, "--layers", int)
    config = judge_config_from(args)
    questions = load_questions(args.questions)
    direction = Direction.load(args.direction)
    pair = load_pair_from(args)
    result = sweep_run(pair, questions, direction, layers, alphas, run_folder(args, "sweep"), config,
                       Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed), args.samples,
                       controls=not args.no_controls,
                       provenance={"questions": str(args.questions), "questions_sha256": dataset_hash(args.questions)},
                       generate_progress=progress_bar("generate"), judge_progress=progress_bar("judge"))
    emit(result, args.json, lambda: "\n".join(
        f"{c['condition']:<28} EM {c['em_rate'] if c['em_rate'] is not None else float('nan'):.3f} "
        f"coherent {c['coherence_rate'] if c['coherence_rate'] is not None else float('nan'):.3f} (n={c['n']})"
        for c in result["cells"]) + f"\nfigure: {Path(result['run']) / 'sweep.html'}")
    return 0


def _detect_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--direction", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="judged run folder: labels from the fine-tuned model's EM samples")
    source.add_argument("--paired", type=Path, help="paired JSONL: judge-free labels from preference log-odds")
    parser.add_argument("--label", default="any", choices=["any", "majority"],
                        help="with --run: a prompt is misaligned if any / the majority of its samples are EM")
    parser.add_argument("--heldout-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="report JSON (default: cache/detect/<name>.json)")
    parser.add_argument("--json", action="store_true")


@command("detect", "early detection: does the prompt-stage projection predict misalignment?", _detect_arguments)
def run_detect(args) -> int:
    from core.detect import detect_paired_file, detection_report, labels_from_run, report_path, save_report
    from core.directions import Direction

    direction = Direction.load(args.direction)
    pair = load_pair_from(args)
    if args.run:
        report = detection_report(pair, labels_from_run(args.run, args.label), direction, args.heldout_fraction,
                                  args.seed, args.bootstrap, progress=progress_bar("activations"))
        report["labels"] = {"source": str(args.run), "rule": f"{args.label} judged sample(s) EM"}
    else:
        report = detect_paired_file(pair, args.paired, direction, args.heldout_fraction, args.seed, args.bootstrap,
                                    label_progress=progress_bar("labels"), progress=progress_bar("activations"))
    out = save_report(report, args.out or report_path(args.cache_dir, args.run or args.paired, direction))
    rule = report["labels"]["rule"]
    chosen = report["chosen"]

    def human() -> str:
        lines = [f"{report['n_prompts']} prompts, {report['n_misaligned']} labelled misaligned ({rule})",
                 f"{'layer':>5} {'auroc':>6} {'95% CI':>15} {'spearman':>9}"]
        for row in report["per_layer"]:
            rho = "-" if row["spearman"] is None else f"{row['spearman']:.3f}"
            lines.append(f"{row['layer']:>5} {row['auroc']:>6.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}] {rho:>9}")
        lines.append(f"chosen layer {chosen['layer']} (selection AUROC {chosen['selection_auroc']:.3f}); report half: "
                     f"AUROC {chosen['report_auroc']:.3f} [{chosen['report_ci'][0]:.3f}, {chosen['report_ci'][1]:.3f}]")
        for name, b in report["baselines"].items():
            lines.append(f"  baseline {name:<22} {b['auroc']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]")
        lines.append(f"report: {out}")
        return "\n".join(lines)
    emit(report, args.json, human)
    return 0


def _bench_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generation")
    parser.add_argument("--random-config", default=None,
                        help="benchmark random weights built from a config.json instead (e.g. Qwen2.5-1.5B's)")
    parser.add_argument("--json", action="store_true")


@command("bench", "speed and memory ratios, measured in one run (see benchmarks/)", _bench_arguments)
def run_bench(args) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.bench import gpu_throughput, run_all

    if args.random_config:
        from benchmarks.random_pair import random_pair

        pair, base, finetuned = random_pair(args.random_config, args.device, args.dtype, args.cache_dir)
    else:
        pair, base, finetuned = load_pair_from(args), args.base, args.finetuned
    result = run_all(pair, base, finetuned, args.repeats, args.tokens, memory=base is not None)
    if pair.device.type == "cuda":
        result["gpu_throughput"] = gpu_throughput(pair, args.tokens)
    emit(result, args.json, lambda: "\n".join(
        f"{name:<36} {f['value']:>8.3f}  target {f['target']:<7} {'met' if f['met'] else 'NOT met'}"
        if f["value"] is not None else f"{name:<36} failed: {f['error']}"
        for name, f in result["figures"].items()))
    return 0


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="EM Lens: emergent-misalignment research tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, arguments, run) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        arguments(child)
        child.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
