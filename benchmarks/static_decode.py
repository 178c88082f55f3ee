"""Batch-1 steered decoding: the eager loop (dynamic KV cache) against the static path (static
cache, compiled step; CUDA graphs on a GPU), both steering at a middle layer, measured in one run;
and how far the static path's logits move from the eager loop's along the same tokens.

``benchmarks/gpu.sh`` runs it on Qwen2.5-1.5B-shaped random weights in bf16::

    python -m benchmarks.static_decode --random-config benchmarks/qwen2.5-1.5b-config.json \\
        --dtype bf16 --device cuda --json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys

import torch

from benchmarks.bench import PROMPT, direction_for, timed
from core.chat import encode_prompt
from core.fast_decode import StaticOptions
from core.generation import Sampling, Variant, generate
from testkit.decoding import forced_logits

# Published memory bandwidth (TB/s) by a word of the card's name: what bounds batch-1 decoding,
# where every step reads every weight once.
BANDWIDTH_TB_S = {"H200": 4.8, "H100": 3.35, "A100": 2.0, "L40S": 0.864, "L4": 0.3, "T4": 0.32}
# bf16: the largest |static − eager| logit along the same tokens, over the largest |logit| there.
RELATIVE_TOLERANCE = 0.05
ALPHA = 4.0


def weight_bytes(module) -> int:
    """Bytes of the distinct parameter storages (tied embeddings once)."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


def tokens_per_s(pair, variant, direction, layer, tokens, repeats, static) -> tuple[float, list[int]]:
    sampling = Sampling(temperature=0, max_new_tokens=tokens)
    rows: list = []

    def run():
        rows[:] = generate(
            pair, [PROMPT], [variant], direction=direction, layers=[layer], sampling=sampling, static=static
        )

    seconds = statistics.median(timed(run) for _ in range(repeats))
    return len(rows[0].token_ids) / seconds, rows[0].token_ids


def measure(pair, tokens: int = 128, repeats: int = 3, check_steps: int = 32, options=None) -> dict:
    from torch._dynamo.utils import counters

    options = options or StaticOptions()
    direction = direction_for(pair)
    layer = pair.n_layers // 2
    variant = Variant("finetuned", ALPHA)
    tokens_per_s(pair, variant, direction, layer, tokens, 1, None)  # warm-up
    eager_rate, eager_tokens = tokens_per_s(pair, variant, direction, layer, tokens, repeats, None)

    first_call_s = timed(lambda: tokens_per_s(pair, variant, direction, layer, tokens, 1, options))  # compiles
    graphs = counters["stats"]["unique_graphs"]
    static_rate, static_tokens = tokens_per_s(pair, variant, direction, layer, tokens, repeats, options)
    other_alpha = Variant("finetuned", -ALPHA)
    _, other_tokens = tokens_per_s(pair, other_alpha, direction, layer, tokens, 1, options)
    recompiled = counters["stats"]["unique_graphs"] - graphs

    prompt_ids = encode_prompt(pair.tokenizer, PROMPT)
    forced = eager_tokens[: check_steps - 1]
    eager_logits = forced_logits(pair, prompt_ids, forced, variant, direction, [layer])
    static_logits = forced_logits(pair, prompt_ids, forced, variant, direction, [layer], static=options)
    difference = (static_logits - eager_logits).abs().max().item()
    largest = eager_logits.abs().max().item()
    same_prefix = next((i for i, (a, b) in enumerate(zip(eager_tokens, static_tokens)) if a != b), len(eager_tokens))

    name = torch.cuda.get_device_name() if pair.device.type == "cuda" else platform.processor() or "cpu"
    bandwidth = next((tb for word, tb in BANDWIDTH_TB_S.items() if word in name), None)
    per_token = weight_bytes(pair.module("finetuned"))
    bound = bandwidth * 1e12 / per_token if bandwidth else None
    return {
        "device": name,
        "torch": torch.__version__,
        "pair": pair.info(),
        "options": {"backend": str(options.backend), "mode": options.mode},
        "tokens": tokens,
        "repeats": repeats,
        "steering": f"finetuned {ALPHA:+g}·d at layer {layer}",
        "eager_dynamic_tokens_per_s": eager_rate,
        "static_compiled_tokens_per_s": static_rate,
        "speedup": static_rate / eager_rate,
        "weight_mb_read_per_token": per_token / 2**20,
        "bandwidth_tb_s": bandwidth,
        "bandwidth_bound_tokens_per_s": bound,
        "static_fraction_of_bound": static_rate / bound if bound else None,
        "first_static_call_s": first_call_s,
        "graphs_compiled_for_a_new_alpha": recompiled,
        "new_alpha_changes_tokens": other_tokens != static_tokens,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
        "logits": {
            "steps": check_steps,
            "max_abs_difference": difference,
            "max_abs_logit": largest,
            "relative": difference / largest,
            "tolerance": f"relative <= {RELATIVE_TOLERANCE}",
            "met": difference / largest <= RELATIVE_TOLERANCE,
            "argmax_agreement": (static_logits.argmax(-1) == eager_logits.argmax(-1)).float().mean().item(),
        },
        "greedy_tokens_equal_for_steps": same_prefix,
    }


def main(argv: list[str] | None = None) -> int:
    from benchmarks.random_pair import random_pair

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--random-config", required=True, help="a config.json to build random weights from")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a quick check off a GPU)")
    parser.add_argument("--mode", default="reduce-overhead", help="torch.compile mode, or none")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    pair, _, _ = random_pair(args.random_config, args.device, args.dtype)
    options = StaticOptions(args.backend, None if args.mode == "none" else args.mode)
    result = measure(pair, args.tokens, args.repeats, options=options)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(
            f"{result['device']}: eager {result['eager_dynamic_tokens_per_s']:.1f} tokens/s, static "
            f"{result['static_compiled_tokens_per_s']:.1f} tokens/s ({result['speedup']:.2f}x), "
            f"logits max |diff| {result['logits']['max_abs_difference']:.3g}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
