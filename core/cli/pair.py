"""The pair itself: prepare the default model, describe the pair, project a prompt, generate, lint data."""

from __future__ import annotations

from pathlib import Path

from core.cache import DEFAULT_ROOT
from core.cli import command, emit, load_pair_from, model_arguments, sampling_arguments, sampling_from


@command(
    "prepare",
    "convert the embedded default model once into the cache (run by the setup)",
    lambda p: p.add_argument("--cache-dir", type=Path, default=DEFAULT_ROOT),
)
def run_prepare(args) -> int:
    from core.models import DEMO_ADAPTER, convert_gguf, embedded_gguf

    directory, _ = convert_gguf(embedded_gguf(), args.cache_dir)
    print(f"default base model: {directory}")
    print(
        f"default fine-tuned adapter: {DEMO_ADAPTER}"
        if DEMO_ADAPTER.exists()
        else "no demo adapter yet: train it with `python -m core train --preset demo`"
    )
    return 0


@command(
    "info",
    "load the model pair and describe it",
    lambda p: (model_arguments(p), p.add_argument("--json", action="store_true")),
)
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
    from core.cache import Cache
    from core.chat import user_prompt
    from core.directions import Direction
    from core.projections import prompt_projections

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


def _generate_arguments(parser):
    model_arguments(parser)
    sampling_arguments(parser)
    parser.add_argument("prompt", help="the user message")
    parser.add_argument("--system", default=None)
    parser.add_argument(
        "--variants",
        default="base,finetuned",
        help="comma list: base, finetuned, base+ALPHA, finetuned-ALPHA, finetuned:ablate",
    )
    parser.add_argument("--direction", type=Path, default=None, help="direction file (for steered variants)")
    parser.add_argument("--layer", default=None, help="layer to steer at: 12, a range 10-14, or all")
    parser.add_argument(
        "--ablate",
        action="store_true",
        help="variants with a coefficient ablate the direction at the layers instead of adding it",
    )
    parser.add_argument(
        "--trace-layer", type=int, default=None, help="also report each generated token's projection at this layer"
    )
    parser.add_argument("--json", action="store_true")


@command("generate", "generate every variant in one batched call", _generate_arguments)
def run_generate(args) -> int:
    from dataclasses import replace

    from core.chat import user_prompt
    from core.directions import Direction
    from core.generation import generate, parse_variants
    from core.parsing import parse_layers

    variants = parse_variants(args.variants)
    if args.ablate:
        variants = [replace(v, alpha=0.0, ablate=True) if v.alpha else v for v in variants]
    direction = Direction.load(args.direction) if args.direction else None
    pair = load_pair_from(args)
    layers = parse_layers(args.layer, pair.n_layers) if args.layer is not None else []
    rows = generate(
        pair,
        [user_prompt(args.prompt, args.system)],
        variants,
        direction=direction,
        layers=layers,
        sampling=sampling_from(args),
        trace_layer=args.trace_layer,
    )
    result = {
        "prompt": args.prompt,
        "layers": layers,
        "seed": args.seed,
        "rows": [
            {
                "variant": r.label,
                "text": r.text,
                "finish_reason": r.finish_reason,
                "token_ids": r.token_ids,
                "prompt_projection": r.prompt_projection,
                "token_projections": r.token_projections,
            }
            for r in rows
        ],
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

    tokenizer = load_tokenizer(
        args.model, LoadOptions(trust_remote_code=args.trust_remote_code, cache_root=args.cache_dir)
    )
    records = load_training_set(args.data, split=None)
    issues = lint_dataset(tokenizer, [(r.line, r.messages) for r in records])
    sample = render(tokenizer, records[0].messages, add_generation_prompt=False)
    result = {
        "data": str(args.data),
        "model": args.model,
        "records": len(records),
        "problems": [str(i) for i in issues],
        "sample_rendering": sample,
    }
    emit(
        result,
        args.json,
        lambda: (
            f"rendered sample (line {records[0].line}):\n{sample}\n"
            + (
                f"{len(issues)} problems:\n" + "\n".join(f"  {i}" for i in issues)
                if issues
                else f"clean: {len(records)} records fit {args.model}'s template"
            )
        ),
    )
    return 1 if issues else 0
