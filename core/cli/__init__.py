"""``python -m core <command>``: the offline side of EM Lens. Run with --help for the commands.

Each command parses its arguments, makes one library call and prints. A module of this package
registers its commands with :func:`command`; :data:`MODULES` gives the order of the help listing,
and any other module here is picked up after them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from core.cache import DEFAULT_ROOT
from core.errors import user_message

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}
MODULES = ("pair", "directions", "training", "evaluation", "detection", "bench")


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]):
    def register(run: Callable):
        COMMANDS[name] = (help, arguments, run)
        return run

    return register


# ---------------------------------------------------------------- shared options and helpers


def model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model pair")
    group.add_argument(
        "--base",
        default="default",
        help="hub id, local model dir or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    group.add_argument(
        "--finetuned",
        default="default",
        help="PEFT adapter dir, merged fine-tune dir or hub id; 'none' for the base alone "
        "(default: the shipped demo adapter)",
    )
    group.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    group.add_argument(
        "--dtype", default="auto", help="auto (bf16 on recent GPUs, fp16 on older, fp32 on CPU), fp32, bf16, fp16"
    )
    group.add_argument("--device-map", default=None, help="'auto' shards a large model over several GPUs (accelerate)")
    group.add_argument("--allow-pickle", action="store_true", help="allow loading pickle (.bin) checkpoints")
    group.add_argument("--trust-remote-code", action="store_true", help="allow model code from the model repository")
    group.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_ROOT, help="where results are cached (default: cache/)"
    )


def sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--max-new-tokens", type=int, default=64)
    group.add_argument("--seed", type=int, default=0)


def load_options(args):
    from core.models import LoadOptions

    return LoadOptions(
        device=args.device,
        dtype=args.dtype,
        device_map=args.device_map,
        allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
        cache_root=args.cache_dir,
    )


def load_pair_from(args):
    from core.models import load_pair

    return load_pair(args.base, args.finetuned, load_options(args))


def sampling_from(args):
    from core.generation import Sampling

    return Sampling(args.temperature, args.top_p, args.max_new_tokens, args.seed)


def progress_bar(description: str, postfix: str | None = None):
    """A tqdm bar on stderr driven by ``callback(done, total)``, shown from the first update on; with
    ``postfix`` (e.g. ``"loss"``), ``callback(done, total, value)`` also shows ``postfix=value``; a text
    ``value`` replaces the description (the step under way)."""
    from tqdm import tqdm

    bar, shown = None, None

    def update(done: int, total: int, value: float | str | None = None) -> None:
        nonlocal bar, shown
        if shown == (done, total, value):  # nothing visible changed
            return
        shown = (done, total, value)
        if bar is None:
            bar = tqdm(desc=description, file=sys.stderr, dynamic_ncols=True)
        bar.total = total
        bar.n = done
        if isinstance(value, str):
            bar.set_description(value, refresh=False)
        elif postfix is not None and value is not None:
            bar.set_postfix({postfix: f"{value:.3f}"}, refresh=False)
        bar.refresh()
        if done >= total:
            bar.close()

    return update


def emit(value, as_json: bool, human: Callable[[], str] | None = None) -> None:
    if as_json or human is None:
        print(json.dumps(value, indent=2, ensure_ascii=False))
    else:
        print(human())


def run_folder(args, kind: str) -> Path:
    """``--out``, else a new folder by the library's one rule (``core.runs.new_run_dir``)."""
    from core.runs import new_run_dir

    return args.out or new_run_dir(args.cache_dir, kind)


# ---------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    found = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in MODULES)
    for name in (*MODULES, *found):
        importlib.import_module(f"{__name__}.{name}")
    parser = argparse.ArgumentParser(prog="python -m core", description="EM Lens: emergent-misalignment research tools")
    debug_help = "show the traceback of an error the tool reports in one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, arguments, run) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        arguments(child)
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
        child.set_defaults(handler=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Errors the user can act on (``core.errors.user_message``) print one line and exit 2
    (with ``--debug``, after their traceback); anything else is a bug and propagates with its traceback."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept and a rerun resumes", file=sys.stderr)
        return 130
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        print(f"error: {message}", file=sys.stderr)
        return 2
