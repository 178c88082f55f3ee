"""SAE latents of a direction: decoder cosines and the aligned / misaligned activation contrast."""

from __future__ import annotations

import sys
from pathlib import Path

from core.cli import command, emit, load_pair_from, model_arguments, progress_bar


def _sae_arguments(parser):
    model_arguments(parser)
    parser.add_argument("--direction", type=Path, required=True, help="a direction file from `extract`")
    parser.add_argument(
        "--sae",
        required=True,
        help="an SAE directory in sae-lens' format (cfg.json + sae_weights.safetensors), or an sae-lens "
        "release id with --sae-id (needs hub access)",
    )
    parser.add_argument("--sae-id", default=None, help="the SAE's id within an sae-lens release")
    parser.add_argument("--layer", type=int, default=None, help="the layer to read; must be the SAE's own")
    parser.add_argument(
        "--data",
        default=None,
        help="paired JSONL whose aligned and misaligned answers the activation contrast reads (default: the "
        "file the direction was extracted from, when it is at hand); 'none' for decoder cosines only",
    )
    parser.add_argument("--split", default=None, choices=["train", "heldout", "all"], help="records of --data")
    parser.add_argument("--limit", type=int, default=None, help="at most this many records (default: all)")
    parser.add_argument(
        "--side",
        default=None,
        choices=["base", "finetuned"],
        help="the model the answers go through (default: finetuned)",
    )
    parser.add_argument("--top-k", type=int, default=10, help="latents per list (default: 10)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", action="store_true")


def _data(args, direction) -> tuple[Path, str] | None:
    from core.sae import extraction_data

    if args.data == "none":
        return None
    if args.data is not None:
        return Path(args.data), args.split or "all"
    found = extraction_data(direction)
    if found is None:
        return None
    path, split = found
    return path, args.split or split


@command("sae", "SAE latents of a direction: decoder cosines and the aligned / misaligned contrast", _sae_arguments)
def run_sae(args) -> int:
    from core.cache import Cache
    from core.data import load_paired_jsonl
    from core.directions import Direction
    from core.sae import SAEError, answer_sets, check_fits, check_layer, load_sae, sae_latents

    direction = Direction.load(args.direction)
    sae = load_sae(args.sae, args.sae_id)
    check_layer(sae, args.layer)
    check_fits(sae, direction)
    if args.limit is not None and args.limit < 1:
        raise SAEError(f"--limit {args.limit}: expected at least 1")
    data = _data(args, direction)
    if data is None:
        if args.data is None:
            print(
                "note: the direction's extraction file is not at hand; pass --data for the activation contrast",
                file=sys.stderr,
            )
        result = sae_latents(sae, direction, layer=args.layer, top_k=args.top_k)
    else:
        path, split = data
        aligned, misaligned = answer_sets(load_paired_jsonl(path, None if split == "all" else split)[: args.limit])
        result = sae_latents(
            sae,
            direction,
            layer=args.layer,
            top_k=args.top_k,
            pair=load_pair_from(args),
            aligned=aligned,
            misaligned=misaligned,
            side=args.side,
            batch_size=args.batch_size,
            cache=Cache(args.cache_dir),
            progress=progress_bar("SAE latents"),
        )
    summary = {"direction": str(args.direction), "data": None if data is None else str(data[0]), **result.to_json()}

    def table() -> str:
        lines = [
            f"SAE {result.sae}: {result.hook_name} (layer {result.layer}), "
            f"{result.architecture}, {result.d_sae} latents"
        ]
        if result.neuronpedia_id:
            lines.append(f"Neuronpedia: {result.neuronpedia_id}")
        lists = [("decoder most along the direction", result.toward), ("decoder most against it", result.against)]
        if result.activations:
            a = result.activations
            lines.append(
                f"activation contrast through {a.side}: {a.n_aligned} aligned answers ({a.aligned_tokens} tokens), "
                f"{a.n_misaligned} misaligned ({a.misaligned_tokens} tokens) of {summary['data']}"
            )
            lists += [
                ("more active on misaligned answers", a.more_on_misaligned),
                ("more on aligned", a.more_on_aligned),
            ]
        for title, rows in lists:
            lines.append(f"\n{title}\n{'latent':>8} {'cosine':>8} {'aligned':>9} {'misaligned':>10} {'diff':>9}")
            for r in rows:
                means = (
                    f" {r.aligned_mean:>9.4f} {r.misaligned_mean:>10.4f} {r.difference:>+9.4f}"
                    if r.difference is not None
                    else ""
                )
                lines.append(f"{r.latent:>8} {r.cosine:>+8.4f}{means}")
        return "\n".join(lines)

    emit(summary, args.json, table)
    return 0
