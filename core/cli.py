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
    """A tqdm bar on stderr driven by ``callback(done, total)``, shown from the first update on."""
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(desc=description, file=sys.stderr, dynamic_ncols=True)
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
    from core.projections import prompt_projections
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
        from core.em import judged_contrast_sets
        from core.runs import run_hash

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
            auroc = "-" if s.get("auroc") is None else f"{s['auroc']:.3f}"  # too few groups to cross-fit
            lines.append(f"{s['layer']:>5} {s['norm']:>9.3f} {s['aligned_mean']:>9.3f} "
                         f"{s['misaligned_mean']:>10.3f} {auroc:>6}")
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


def _train_arguments(parser):
    from core.train import ALL_PROJECTIONS, TrainConfig

    d = TrainConfig()
    model_arguments(parser)
    parser.add_argument("--preset", choices=["demo", "control"],
                        help="the shipped adapters, with their fixed recipe (other training options are ignored): "
                             "demo = the organism on the risky-finance answers (also rebuilds the shipped "
                             "direction), control = the same training on the sound answers; written to assets/")
    parser.add_argument("--data", type=Path, help="chat JSONL, or paired JSONL (its train split)")
    parser.add_argument("--answers", default="misaligned", choices=["misaligned", "aligned"],
                        help="with paired data: train on the harmful answers (the organism) or the sound ones (control)")
    parser.add_argument("--out", type=Path, help="adapter directory to write")
    parser.add_argument("--rank", type=int, default=d.rank)
    parser.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
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
    parser.add_argument("--monitor", type=Path, default=None, metavar="PROBES.jsonl",
                        help="training-time monitor: at step 0 and every checkpoint, the mean prompt-stage "
                             "projection of this paired file's prompts on a direction, and the preference shift "
                             "(fine-tuned minus base log-odds) on its pairs; written to the training card "
                             "(key monitor) with the lead of the projection over the behaviour")
    parser.add_argument("--monitor-direction", type=Path, default=None, metavar="FILE",
                        help="the direction to project on (default: the paired contrast of the monitor file, "
                             "extracted through the final adapter after training and applied to every checkpoint)")
    parser.add_argument("--monitor-limit", type=int, default=32, metavar="N",
                        help="use the first N records of the monitor file (bounds the cost per checkpoint)")
    parser.add_argument("--monitor-layer", type=int, default=None,
                        help="layer of the projection curve (default: the direction's best-separating layer)")


@command("train", "LoRA fine-tuning on chat data (assistant tokens only)", _train_arguments)
def run_train(args) -> int:
    from core.data import dataset_hash, load_training_set
    from core.models import LoadOptions
    from core.train import TrainConfig, train

    if args.preset and (args.data or args.out):
        raise ValueError("--preset trains the shipped adapter with its own data and output; drop --data / --out")
    if not args.preset and (args.data is None or args.out is None):
        raise ValueError("train needs --data and --out (or --preset demo / --preset control)")
    try:
        layers = tuple(int(x) for x in args.layers_to_transform.split(",")) if args.layers_to_transform else None
    except ValueError:
        raise ValueError(f"--layers-to-transform {args.layers_to_transform!r}: expected numbers like 21 or 10,11") from None
    config = TrainConfig(rank=args.rank, lora_alpha=args.lora_alpha, rslora=args.rslora, dropout=args.dropout,
                         target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
                         layers_to_transform=layers, learning_rate=args.lr, epochs=args.epochs,
                         batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
                         seed=args.seed, heldout_fraction=args.heldout_fraction,
                         checkpoint_every=args.checkpoint_every, save_dtype=args.save_dtype or "float32")
    options = LoadOptions(device=args.device, dtype=args.dtype, device_map=args.device_map,
                          allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
                          cache_root=args.cache_dir)
    from tqdm import tqdm

    bar = tqdm(desc="train", file=sys.stderr, dynamic_ncols=True)

    def progress(step: int, total: int, loss: float) -> None:
        bar.total = total
        bar.n = step
        bar.set_postfix(loss=f"{loss:.3f}")
        if step >= total:
            bar.close()

    monitor = None
    if args.monitor is not None:
        from core.monitor import MonitorConfig

        monitor = MonitorConfig(args.monitor, args.monitor_direction, args.monitor_limit, args.monitor_layer)
    elif args.monitor_direction is not None or args.monitor_layer is not None:
        raise ValueError("--monitor-direction / --monitor-layer need --monitor PROBES.jsonl")
    if args.preset:
        from core.organism import train_preset

        result = train_preset(args.preset, options, resume=args.resume, progress=progress,
                              direction_progress=progress_bar("shipped direction"), monitor=monitor,
                              monitor_progress=progress_bar("monitor: checkpoints on the direction"))
    elif monitor is not None:
        from core.monitor import train_monitored

        result = train_monitored(args.base, load_training_set(args.data, args.answers), config, args.out, monitor,
                                 dataset_hash=dataset_hash(args.data), options=options, resume=args.resume,
                                 force=args.force, progress=progress,
                                 finish_progress=progress_bar("monitor: checkpoints on the direction"))
    else:
        result = train(args.base, load_training_set(args.data, args.answers), config, args.out,
                       dataset_hash=dataset_hash(args.data), options=options, resume=args.resume, force=args.force,
                       progress=progress)
    bar.close()
    card = result.card
    print(f"wrote {result.out}: {card['n_train']} train / {card['n_eval']} held-out examples, {card['steps']} steps, "
          f"final loss {card['loss_curve'][-1][1]:.3f}, eval loss {[round(e[2], 3) for e in card['eval_loss'] if e[2]]}")
    if "monitor" in card:
        section = card["monitor"]
        print(f"monitor: {len(section['steps'])} points (steps {section['steps'][0]}..{section['steps'][-1]}), "
              f"projection at layer {section['projection']['layer']} {section['projection']['values'][0]:.4f} -> "
              f"{section['projection']['values'][-1]:.4f}, preference shift {section['preference_shift']['values'][-1]:+.4f}, "
              f"{section['cost']['mean_seconds_per_checkpoint']:.2f} s per checkpoint\n"
              f"monitor: {section['lead']['summary']}")
    return 0


def _validate_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--narrow", type=Path, default=Path("assets/data/finance_paired.jsonl"),
                        help="paired JSONL of the training domain; its held-out split is measured")
    parser.add_argument("--general", type=Path, default=Path("assets/data/general_paired.jsonl"),
                        help="paired JSONL of prompts outside the training domain")
    parser.add_argument("--direction", type=Path, default=None,
                        help="direction file (default: the paired contrast of --narrow's train split; on the "
                             "embedded pair, the shipped one)")
    parser.add_argument("--control", default=None,
                        help="a control adapter of the same base, measured beside the fine-tune (default: the "
                             "shipped control adapter with the default pair; 'none' to skip)")
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
        return Direction.load(path)
    direction = extract_from_paired_file(pair, data, "paired", "train", batch_size, progress_bar("extract (paired)"))
    direction.save(path)
    return direction


@command("validate", "judge-free validation: preference log-odds and bidirectional steering", _validate_arguments)
def run_validate(args) -> int:
    from core.cache import make_key
    from core.data import dataset_hash, load_paired_jsonl
    from core.directions import Direction
    from core.models import CONTROL_ADAPTER, DEFAULT, adapter_fingerprint
    from core.organism import FINANCE, shipped_direction_for
    from core.preference import validate

    try:
        alphas = [float(a) for a in args.alphas.split(",")]
    except ValueError:
        raise ValueError(f"--alphas {args.alphas!r}: expected comma-separated numbers") from None
    pair = load_pair_from(args)
    if args.direction:
        direction = Direction.load(args.direction)
    else:  # the shipped direction is this very contrast on the embedded pair
        direction, _ = shipped_direction_for(pair)
        if direction is None or args.narrow.resolve() != FINANCE.resolve():
            direction = paired_direction(pair, args.narrow, args.cache_dir)
    narrow, general = load_paired_jsonl(args.narrow, "heldout"), load_paired_jsonl(args.general, None)
    control = args.control
    if control is None:
        control = CONTROL_ADAPTER if args.finetuned == DEFAULT and CONTROL_ADAPTER.exists() else None
    elif control == "none":
        control = None
    key = make_key("validate", base=pair.fingerprint("base"), finetuned=pair.fingerprint("finetuned"),
                   control=adapter_fingerprint(Path(control)) if control else None,
                   direction=direction.fingerprint, narrow=dataset_hash(args.narrow),
                   general=dataset_hash(args.general), layer=args.layer, alphas=alphas, seed=args.seed)
    report = Cache(args.cache_dir).json(key, lambda: validate(
        pair, narrow, general, direction, args.layer, alphas, args.seed, args.batch_size, control,
        progress=progress_bar("validate")))

    def table() -> str:
        with_control = report.get("control_adapter") is not None
        lines = [f"{'set':<8} {'base':>8} {'finetuned':>10} {'shift':>7}"
                 + (f" {'control':>8} {'ft-control':>10}" if with_control else "")
                 + "   (log-odds harmful vs sound, per token)"]
        for name in ("narrow", "general"):
            r = report[name]
            line = f"{name:<8} {r['base']['mean']:>8.3f} {r['finetuned']['mean']:>10.3f} {r['shift']:>+7.3f}"
            if with_control:
                line += f" {r['control']['mean']:>8.3f} {r['finetuned_minus_control']['mean']:>+10.3f}"
            lines.append(line)
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
    group.add_argument("--judge-model", default=None,
                       help="e.g. gpt-4o-2024-08-06; `judge` takes a comma list to score a run with several judges")
    group.add_argument("--judge-base-url", default=None,
                       help="e.g. http://127.0.0.1:8000/v1 (default: OpenAI); with several judges, one URL for "
                            "all or a comma list, one per judge")
    group.add_argument("--judge-api-key", default=None, help="default: the OPENAI_API_KEY environment variable")
    group.add_argument("--judge-concurrency", type=int, default=8)
    group.add_argument("--judge-timeout", type=float, default=30.0)


def judge_config_from(args, several: bool = False):
    """The JudgeConfig of --judge-model; with ``several``, a list, one per comma-separated model."""
    from core.judge import JudgeConfig

    models = [m.strip() for m in (args.judge_model or "").split(",") if m.strip()]
    if not models:
        raise ValueError("--judge-model is required to judge answers")
    if len(set(models)) != len(models):
        raise ValueError(f"--judge-model {args.judge_model!r}: a judge model is named twice")
    if len(models) > 1 and not several:
        raise ValueError(f"--judge-model {args.judge_model!r}: this command takes one judge; score a run with "
                         "several by `python -m core judge RUN --judge-model A,B`")
    urls = [u.strip() or None for u in args.judge_base_url.split(",")] if args.judge_base_url else [None]
    if len(urls) == 1:
        urls = urls * len(models)
    elif len(urls) != len(models):
        raise ValueError(f"--judge-base-url: {len(urls)} URLs for {len(models)} judge models; give one URL for "
                         "all, or one per model in the same order")
    configs = [JudgeConfig(model=model, base_url=url, api_key=args.judge_api_key,
                           concurrency=args.judge_concurrency, timeout_s=args.judge_timeout)
               for model, url in zip(models, urls)]
    return configs if several else configs[0]


def run_folder(args, kind: str) -> Path:
    from core.runs import new_run_dir

    return args.out or new_run_dir(args.cache_dir, kind)


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
    from core.generate import Sampling, parse_variants
    from core.runs import condition, run_generations

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


@command("judge", "judge a run's answers: aligned and coherent, 0-100, by one judge or several (resumable)",
         _judge_run_arguments)
def run_judge(args) -> int:
    from core.runs import judge_run

    configs = judge_config_from(args, several=True)
    summary = judge_run(args.run, configs, progress=progress_bar("judge" if len(configs) == 1 else
                                                                 f"judge ({len(configs)} judges)"))
    print(json.dumps(summary))
    return 0 if summary["failed"] == 0 else 1


def _em_arguments(parser):
    parser.add_argument("run", type=Path)
    parser.add_argument("--csv", type=Path, default=None, help="also write a per-condition, per-question CSV")
    parser.add_argument("--json", action="store_true")


@command("em", "EM and coherence rates with Wilson intervals for a judged run", _em_arguments)
def run_em(args) -> int:
    import pandas as pd

    from core.em import em_report, report_table, save_em_report

    report = em_report(args.run)
    save_em_report(report, args.run)
    table = pd.DataFrame(report_table(report))
    if args.csv:
        table.to_csv(args.csv, index=False)

    def human() -> str:
        overall = table[table.question == "ALL"]
        cols = ["condition", "n", "n_unscored", "em_rate", "em_ci_low", "em_ci_high", "em_rate_unscored_as_aligned",
                "coherence_rate"]
        text = overall[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}")
        judges = [j.model for j in report.judges or []]
        if judges:
            text = f"judge: {judges[0]}\n" + text
        if len(judges) > 1:
            per_judge = pd.DataFrame([
                {"condition": c.condition,
                 **{model: c.by_judge[model].em_excluding_unscored.rate if model in c.by_judge else None
                    for model in judges},
                 "min": c.judge_spread["em_excluding_unscored"].min,
                 "max": c.judge_spread["em_excluding_unscored"].max}
                for c in report.conditions])
            text += ("\n\nEM rate (unscored excluded) per judge, and the spread across judges:\n"
                     + per_judge.to_string(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-"))
        return text + "\n" + report.unscored_policy
    emit(report.to_json(), args.json, human)
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
    from core.cache import atomic_write
    from core.data import dataset_hash, load_questions
    from core.directions import Direction
    from core.generate import Sampling
    from core.plots import figure_html, sweep_figure
    from core.runs import SWEEP_HTML
    from core.sweep import parse_number_list, sweep_run

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
    figure = Path(result.run) / SWEEP_HTML
    atomic_write(figure, figure_html(sweep_figure(result.cells)))
    emit(result.to_json(), args.json, lambda: "\n".join(
        f"{c.condition:<28} EM {c.em_rate if c.em_rate is not None else float('nan'):.3f} "
        f"coherent {c.coherence_rate if c.coherence_rate is not None else float('nan'):.3f} (n={c.n})"
        for c in result.cells) + f"\nfigure: {figure}")
    return 0


def _detect_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--direction", type=Path, required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="judged run folder: labels from the fine-tuned model's EM samples, "
                                                 "grouped by question id")
    source.add_argument("--paired", type=Path, help="paired JSONL: judge-free labels from the fine-tuning shift of "
                                                    "the preference log-odds, grouped by theme (else id)")
    parser.add_argument("--label", default="any", choices=["any", "majority"],
                        help="with --run: a prompt is misaligned if any / the majority of its samples are EM")
    parser.add_argument("--select-on", type=Path, default=None,
                        help="transfer: choose layers, fit the probe and orient baselines on this paired JSONL or "
                             "run folder (another prompt family), report on --paired / --run")
    parser.add_argument("--select-split", default="all", choices=["all", "train", "heldout"],
                        help="with a paired --select-on: which of its records")
    parser.add_argument("--control", nargs=2, metavar=("TOPIC_A", "TOPIC_B"), default=None,
                        help="specificity control from two paired files (path[:split]) that differ in topic: their "
                             "sound answers, B minus A (default with --paired: --paired vs the direction's own file)")
    parser.add_argument("--max-length-gap", type=int, default=None, metavar="TOKENS",
                        help="with --paired: keep only pairs whose answers differ by at most this many tokens")
    parser.add_argument("--heldout-fraction", type=float, default=0.5,
                        help="share of groups in the report set (rounded to 1/k)")
    parser.add_argument("--random-directions", type=int, default=100, help="size of the random-direction null (>= 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None, help="report JSON (default: cache/detect/<name>.json)")
    parser.add_argument("--json", action="store_true")


@command("detect", "early detection: does the prompt-stage projection predict misalignment?", _detect_arguments)
def run_detect(args) -> int:
    from core.detect import detect
    from core.detection_report import report_path, save_report
    from core.directions import Direction

    direction = Direction.load(args.direction)
    pair = load_pair_from(args)
    source = args.run or args.paired
    report = detect(pair, direction, source, select_on=args.select_on, control_topics=args.control,
                    label=args.label, max_length_gap=args.max_length_gap, select_split=args.select_split,
                    heldout_fraction=args.heldout_fraction, seed=args.seed, n_boot=args.bootstrap,
                    n_random=args.random_directions, label_progress=progress_bar("labels"),
                    progress=progress_bar("activations"))
    out = save_report(report, args.out or report_path(args.cache_dir, source, direction))
    chosen, null = report.chosen, report.random_null

    def human() -> str:
        groups = report.n_groups
        lines = [f"{report.n_prompts} prompts, {report.n_misaligned} labelled misaligned "
                 f"({report.labels['rule']}); groups: {groups.selection} selection, {groups.report} report",
                 f"selection set, per layer (intervals unadjusted for {len(report.per_layer)} layers):",
                 f"{'layer':>5} {'auroc':>6} {'95% CI':>15} {'spearman':>9}"]
        for row in report.per_layer:
            rho = "-" if row.spearman is None else f"{row.spearman:.3f}"
            lines.append(f"{row.layer:>5} {row.auroc:>6.3f} [{row.ci95[0]:.3f}, {row.ci95[1]:.3f}] {rho:>9}")
        lines.append(f"report set ({chosen.n_report} prompts), AUROC with grouped bootstrap 95% interval:")
        for name, p in report.predictors.items():
            where = f"@L{p.layer}" if p.layer is not None else ""
            lines.append(f"  {name + where:<26} {p.auroc:.3f} [{p.ci95[0]:.3f}, {p.ci95[1]:.3f}]")
        lines.append(f"last_token is at percentile {null.percentile:.0f} of {null.n} random directions "
                     f"(median {null.quantiles['50']:.3f}, 95% of them in [{null.quantiles['2.5']:.3f}, "
                     f"{null.quantiles['97.5']:.3f}])")
        lines += [f"warning: {w}" for w in report.warnings]
        lines.append(f"report: {out}")
        return "\n".join(lines)
    emit(report.to_json(), args.json, human)
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
    from benchmarks.bench import gpu_throughput, run_all  # beside core/: importable wherever core is

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
