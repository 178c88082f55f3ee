"""Training: a LoRA adapter on chat data, or a shipped preset, with the optional training-time monitor."""

from __future__ import annotations

from pathlib import Path

from core.cli import command, load_options, model_arguments, progress_bar
from core.errors import InputError


def _train_arguments(parser):
    from core.training import ALL_PROJECTIONS, TrainConfig

    d = TrainConfig()
    model_arguments(parser)
    parser.add_argument(
        "--preset",
        choices=["demo", "control"],
        help="the shipped adapters, with their fixed recipe (other training options are ignored): "
        "demo = the organism on the risky-finance answers (also rebuilds the shipped "
        "direction), control = the same training on the sound answers; written to assets/",
    )
    parser.add_argument("--data", type=Path, help="chat JSONL, or paired JSONL (its train split)")
    parser.add_argument(
        "--answers",
        default="misaligned",
        choices=["misaligned", "aligned"],
        help="with paired data: train on the harmful answers (the organism) or the sound ones (control)",
    )
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
    parser.add_argument(
        "--save-dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the saved adapter weights (default float32; the demo preset uses float16)",
    )
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--force", action="store_true", help="train even if the template lint finds problems")
    parser.add_argument(
        "--monitor",
        type=Path,
        default=None,
        metavar="PROBES.jsonl",
        help="training-time monitor: at step 0 and every checkpoint, the mean prompt-stage "
        "projection of this paired file's prompts on a direction, and the preference shift "
        "(fine-tuned minus base log-odds) on its pairs; written to the training card "
        "(key monitor) with the lead of the projection over the behaviour",
    )
    parser.add_argument(
        "--monitor-direction",
        type=Path,
        default=None,
        metavar="FILE",
        help="the direction to project on (default: the paired contrast of the monitor file, "
        "extracted through the final adapter after training and applied to every checkpoint)",
    )
    parser.add_argument(
        "--monitor-limit",
        type=int,
        default=32,
        metavar="N",
        help="use the first N records of the monitor file (bounds the cost per checkpoint)",
    )
    parser.add_argument(
        "--monitor-layer",
        type=int,
        default=None,
        help="layer of the projection curve (default: the direction's best-separating layer)",
    )


@command("train", "LoRA fine-tuning on chat data (assistant tokens only)", _train_arguments)
def run_train(args) -> int:
    from core.monitor import MonitorConfig
    from core.organism import train_adapter
    from core.parsing import parse_numbers, split_list
    from core.training import TrainConfig

    if args.preset and (args.data or args.out):
        raise InputError("--preset trains the shipped adapter with its own data and output; drop --data / --out")
    if not args.preset and (args.data is None or args.out is None):
        raise InputError("train needs --data and --out (or --preset demo / --preset control)")
    if args.monitor is None and (args.monitor_direction is not None or args.monitor_layer is not None):
        raise InputError("--monitor-direction / --monitor-layer need --monitor PROBES.jsonl")
    layers = parse_numbers(args.layers_to_transform or "", "--layers-to-transform", int)
    config = TrainConfig(
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        rslora=args.rslora,
        dropout=args.dropout,
        target_modules=tuple(split_list(args.target_modules)),
        layers_to_transform=tuple(layers) or None,
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        heldout_fraction=args.heldout_fraction,
        checkpoint_every=args.checkpoint_every,
        save_dtype=args.save_dtype or "float32",
    )
    monitor = (
        MonitorConfig(args.monitor, args.monitor_direction, args.monitor_limit, args.monitor_layer)
        if args.monitor is not None
        else None
    )
    result = train_adapter(
        args.base,
        args.data,
        args.out,
        config,
        answers=args.answers,
        preset=args.preset,
        monitor=monitor,
        options=load_options(args),
        resume=args.resume,
        force=args.force,
        progress=progress_bar("train", postfix="loss"),
        monitor_progress=progress_bar("monitor: checkpoints on the direction"),
        direction_progress=progress_bar("shipped direction"),
    )
    card = result.card
    print(
        f"wrote {result.out}: {card['n_train']} train / {card['n_eval']} held-out examples, {card['steps']} "
        f"steps, final loss {card['loss_curve'][-1][1]:.3f}, "
        f"eval loss {[round(e[2], 3) for e in card['eval_loss'] if e[2]]}"
    )
    if "monitor" in card:
        section = card["monitor"]
        print(
            f"monitor: {len(section['steps'])} points (steps {section['steps'][0]}..{section['steps'][-1]}), "
            f"projection at layer {section['projection']['layer']} {section['projection']['values'][0]:.4f} -> "
            f"{section['projection']['values'][-1]:.4f}, "
            f"preference shift {section['preference_shift']['values'][-1]:+.4f}, "
            f"{section['cost']['mean_seconds_per_checkpoint']:.2f} s per checkpoint\n"
            f"monitor: {section['lead']['summary']}"
        )
    return 0
