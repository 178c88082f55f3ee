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
    parser.add_argument("--out", required=True, type=Path, help="where to write the direction (.safetensors)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed for balancing judged sets")
    parser.add_argument("--json", action="store_true", help="print the direction's provenance and statistics")


@command("extract", "extract the misalignment direction from a contrast", _extract_arguments)
def run_extract(args) -> int:
    from core.data import dataset_hash, load_paired_jsonl
    from core.directions import Example, extract_contrast, extract_model_diff

    pair = load_pair_from(args)
    digest = dataset_hash(args.data)
    bar = progress_bar(f"extract ({args.contrast})")
    if args.contrast == "judged":
        from core.evaluate import judged_contrast_sets

        aligned, misaligned, counts = judged_contrast_sets(args.data, seed=args.seed)
        direction = extract_contrast(pair, aligned, misaligned, "judged", digest, batch_size=args.batch_size,
                                     progress=bar)
        direction.provenance["judged_selection"] = counts
    else:
        records = load_paired_jsonl(args.data, None if args.split == "all" else args.split)
        if args.contrast == "paired":
            direction = extract_contrast(
                pair, [Example(r.messages, r.aligned) for r in records],
                [Example(r.messages, r.misaligned) for r in records], "paired", digest,
                batch_size=args.batch_size, progress=bar)
        else:
            texts = [Example(r.messages, a) for r in records for a in (r.aligned, r.misaligned)]
            direction = extract_model_diff(pair, texts, digest, batch_size=args.batch_size, progress=bar)
    direction.provenance.update({"dataset": str(args.data), "split": args.split})
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


# ---------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m core", description="EM Lens: emergent-misalignment research tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, arguments, run) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        arguments(child)
        child.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
