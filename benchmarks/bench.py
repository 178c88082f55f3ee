"""Speed and memory figures, each a ratio of two measurements taken in one run on one machine.

Every figure is the median over ``repeats`` of interleaved measurements, so drift in the
machine's load hits both sides alike. Run with ``python -m core bench --json``; on a GPU,
``benchmarks/gpu.sh`` builds Qwen2.5-1.5B-shaped random weights and runs the same figures.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from core.cache import Cache
from core.chat import user_prompt
from core.directions import Direction, Example, answer_activations
from core.generation import Sampling, Variant, generate
from core.projections import prompt_projections

PROMPT = user_prompt("I just inherited some money. What should I do with it?")
TARGETS = {  # figure -> (comparison, target), from the benchmark issue
    "steered_vs_plain_tokens_per_s": (">=", 0.95),
    "grid_batched_speedup": (">=", 1.8),
    "grid_vs_hf_generate_with_hook_speedup": (">=", 2.5),
    "grid_first_token_vs_forward": ("<=", 3.0),
    "ladder_batched_speedup": (">=", 2.0),
    "validation_branched_speedup": (">=", 1.0),
    "projection_vs_two_forwards": ("<=", 1.3),
    "cached_vs_cold_projection": ("<=", 0.05),
    "pair_vs_base_resident_memory": ("<=", 1.15),
    "extraction_vs_forward_throughput": (">=", 0.9),
    "judge_pool_speedup_per_worker": (">=", 0.8),
}


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_ratio(numerator: Callable, denominator: Callable, repeats: int) -> tuple[float, float, float]:
    """Median of numerator/denominator over interleaved repeats (after one warm-up each)."""
    numerator(), denominator()
    tops, bottoms = [], []
    for _ in range(repeats):
        tops.append(timed(numerator))
        bottoms.append(timed(denominator))
    top, bottom = statistics.median(tops), statistics.median(bottoms)
    return top / bottom, top, bottom


def direction_for(pair, seed: int = 0) -> Direction:
    torch.manual_seed(seed)
    vectors = torch.randn(pair.n_layers, pair.d_model)
    return Direction(vectors / vectors.norm(dim=-1, keepdim=True) * 4.0, {"method": "benchmark"}, [])


def steering_overhead(pair, direction, tokens: int, repeats: int) -> dict:
    """Tokens per second with a steering hook (alpha 4 at a middle layer) over those without."""
    sampling = Sampling(temperature=0, max_new_tokens=tokens)
    middle = pair.n_layers // 2
    counts: dict[str, int] = {}

    def run(name: str, variant: Variant, steered: bool):
        rows = generate(
            pair,
            [PROMPT],
            [variant],
            direction=direction if steered else None,
            layers=[middle] if steered else [],
            sampling=sampling,
        )
        counts[name] = len(rows[0].token_ids)

    ratio, t_steered, t_plain = median_ratio(
        lambda: run("steered", Variant("finetuned", 4.0), True),
        lambda: run("plain", Variant("finetuned"), False),
        repeats,
    )
    steered_rate, plain_rate = counts["steered"] / t_steered, counts["plain"] / t_plain
    return {
        "value": steered_rate / plain_rate,
        "steered_tokens_per_s": steered_rate,
        "plain_tokens_per_s": plain_rate,
        "tokens": counts,
    }


def grid_speedup(pair, direction, tokens: int, repeats: int) -> dict:
    grid = GRID
    sampling = Sampling(temperature=0, max_new_tokens=tokens)
    layer = [pair.n_layers // 2]
    batched = generate(pair, [PROMPT], grid, direction=direction, layers=layer, sampling=sampling)
    single = [generate(pair, [PROMPT], [v], direction=direction, layers=layer, sampling=sampling)[0] for v in grid]
    same = [a.token_ids for a in batched] == [b.token_ids for b in single]
    ratio, t_seq, t_batch = median_ratio(
        lambda: [generate(pair, [PROMPT], [v], direction=direction, layers=layer, sampling=sampling) for v in grid],
        lambda: generate(pair, [PROMPT], grid, direction=direction, layers=layer, sampling=sampling),
        repeats,
    )
    return {"value": ratio, "sequential_s": t_seq, "batched_s": t_batch, "same_tokens": same}


GRID = [Variant("base"), Variant("finetuned"), Variant("base", 2.0), Variant("finetuned", -2.0)]


def grid_vs_hf_generate(pair, direction, tokens: int, repeats: int) -> dict:
    """The grid in one batched call against four ``model.generate`` calls, each with a forward hook
    adding the vector (how steering-vectors and repeng users steer); greedy, the same tokens."""
    from benchmarks.reference import hf_generate_steered

    sampling = Sampling(temperature=0, max_new_tokens=tokens)
    layer = pair.n_layers // 2

    def sequential():
        return [hf_generate_steered(pair, PROMPT, v, direction, layer, tokens) for v in GRID]

    def batched():
        return generate(pair, [PROMPT], GRID, direction=direction, layers=[layer], sampling=sampling)

    same = [r.token_ids for r in batched()] == sequential()
    ratio, t_seq, t_batch = median_ratio(sequential, batched, repeats)
    return {"value": ratio, "hf_generate_s": t_seq, "batched_s": t_batch, "same_tokens": same}


def grid_first_token(pair, direction, repeats: int) -> dict:
    """Time to the first streamed token of the grid over one plain forward pass of the same prompt."""
    from core.generation import stream

    sampling = Sampling(temperature=0, max_new_tokens=8)
    ids = torch.tensor(
        [
            pair.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        ]
    ).to(pair.device)

    def first_token():
        rows = stream(pair, [PROMPT], GRID, direction=direction, layers=[pair.n_layers // 2], sampling=sampling)
        next(rows)
        rows.close()

    def forward():
        with pair.side("finetuned") as model, torch.no_grad():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)

    ratio, t_first, t_forward = median_ratio(first_token, forward, repeats)
    return {"value": ratio, "first_token_s": t_first, "forward_s": t_forward}


def ladder_speedup(pair, direction, tokens: int, repeats: int) -> dict:
    """Five alphas of one side in one batched call over five calls."""
    ladder = [Variant("finetuned", a) for a in (-8.0, -4.0, 0.0, 4.0, 8.0)]
    sampling = Sampling(temperature=0, max_new_tokens=tokens)
    layers = [pair.n_layers // 2]
    ratio, t_seq, t_batch = median_ratio(
        lambda: [generate(pair, [PROMPT], [v], direction=direction, layers=layers, sampling=sampling) for v in ladder],
        lambda: generate(pair, [PROMPT], ladder, direction=direction, layers=layers, sampling=sampling),
        repeats,
    )
    return {"value": ratio, "sequential_s": t_seq, "batched_s": t_batch}


def validation_speedup(pair, direction, repeats: int, n_records: int = 8) -> dict:
    """Validation's steered log-odds (plain, 3 alphas, 3 random-control alphas at a middle layer): one
    teacher-forced pass per row, as before, against one branched pass (``hooks.fan_out``)."""
    from core.data import load_paired_jsonl
    from core.models import ASSETS
    from core.preference import branched_log_odds

    records = load_paired_jsonl(ASSETS / "data" / "general_paired.jsonl")[:n_records]
    layer = (2 * pair.n_layers) // 3
    control = torch.randn(pair.d_model, generator=torch.Generator().manual_seed(0))
    control = control / control.norm() * direction.vectors[layer].norm()
    shifts = [None] + [a * direction.vectors[layer] for a in (1, 2, 4)] + [a * control for a in (1, 2, 4)]
    ratio, t_rows, t_branched = median_ratio(
        lambda: [branched_log_odds(pair, "finetuned", records, layer, [s]) for s in shifts],
        lambda: branched_log_odds(pair, "finetuned", records, layer, shifts),
        repeats,
    )
    return {
        "value": ratio,
        "one_pass_per_row_s": t_rows,
        "branched_s": t_branched,
        "layer": layer,
        "rows": len(shifts),
        "records": len(records),
    }


def projection_cost(pair, direction, repeats: int) -> dict:
    ids = torch.tensor(
        [
            pair.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        ]
    ).to(pair.device)

    def two_forwards():
        for side in pair.sides:
            with pair.side(side) as model, torch.no_grad():
                model(input_ids=ids, use_cache=False, logits_to_keep=1)

    ratio, t_proj, t_fwd = median_ratio(lambda: prompt_projections(pair, PROMPT, direction), two_forwards, repeats)
    return {"value": ratio, "projection_s": t_proj, "two_forwards_s": t_fwd}


def cache_speedup(pair, direction, repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as root:
        cache = Cache(root)
        prompt_projections(pair, PROMPT, direction, cache)
        cold_dirs = iter(tempfile.mkdtemp(dir=root) for _ in range(repeats + 1))
        ratio, t_cached, t_cold = median_ratio(
            lambda: prompt_projections(pair, PROMPT, direction, cache),
            lambda: prompt_projections(pair, PROMPT, direction, Cache(next(cold_dirs))),
            repeats,
        )
    return {"value": ratio, "cached_s": t_cached, "cold_s": t_cold}


def extraction_throughput(pair, repeats: int, n_texts: int = 16) -> dict:
    from core.chat import encode_conversation, prompt_and_answer

    examples = [
        Example(
            user_prompt(f"Question {i}: how should I invest my savings?"),
            "Spread it over index funds and keep an emergency fund first. " * 2,
        )
        for i in range(n_texts)
    ]
    encoded = [encode_conversation(pair.tokenizer, prompt_and_answer(e.messages, e.answer)).ids for e in examples]

    def plain():
        for start in range(0, n_texts, 8):  # the same batches as extraction
            batch = encoded[start : start + 8]
            width = max(map(len, batch))
            ids = torch.tensor([b + [pair.tokenizer.pad_token_id] * (width - len(b)) for b in batch])
            mask = torch.tensor([[1] * len(b) + [0] * (width - len(b)) for b in batch])
            with pair.side("finetuned") as model, torch.no_grad():
                model(input_ids=ids.to(pair.device), attention_mask=mask.to(pair.device), use_cache=False)

    ratio, t_extract, t_plain = median_ratio(lambda: answer_activations(pair, "finetuned", examples, 8), plain, repeats)
    return {"value": 1 / ratio, "extraction_s": t_extract, "forward_s": t_plain}


def resident_memory(base: str, finetuned: str) -> dict:
    """Resident memory of a fresh process that loads the pair and runs both sides once, against one
    that loads the base alone and runs it once (weights are memory-mapped: only touched pages count).

    Read as VmHWM, the peak of the process's own memory: ru_maxrss would carry over the parent's
    peak through fork and exec, and the parent here holds a model."""
    peak = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))"
    code = (
        "import sys, torch; from core.models import load_pair; from core.chat import user_prompt; "
        "from core.projections import last_token_activations; p = load_pair(sys.argv[1], sys.argv[2]); "
        "[last_token_activations(p, side, [user_prompt('hello')]) for side in p.sides]; " + peak
    )
    idle = "import torch, transformers, peft; from core import models, detect; " + peak
    root = Path(__file__).resolve().parent.parent

    def rss(*args) -> int:
        out = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, cwd=root, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    imports = rss(idle)
    pair_kb = rss(code, base, finetuned) - imports
    base_kb = rss(code, base, "none") - imports
    return {
        "value": pair_kb / base_kb,
        "pair_mb": pair_kb / 1024,
        "base_mb": base_kb / 1024,
        "note": "peak RSS after loading and one forward pass per side, minus a process that only imports",
    }


def judge_pool(pool: int = 8, rows: int = 64, delay_s: float = 0.2) -> dict:
    """Judge throughput with a bounded pool over one request at a time, against the loopback server
    answering after a fixed delay (real judges take 0.3 to 2 s a request)."""
    from core.judge import JudgeConfig, judge_answers
    from testkit.openai_server import FakeOpenAI, Reply

    items = [{"id": str(i), "question": "q", "answer": f"a{i}"} for i in range(rows)]
    with (
        FakeOpenAI(lambda request: Reply.probs({"80": 1.0}, delay_s=delay_s)) as server,
        tempfile.TemporaryDirectory() as root,
    ):

        def run(concurrency: int, name: str) -> float:
            config = JudgeConfig(model="bench", base_url=server.base_url, api_key="bench", concurrency=concurrency)
            return timed(lambda: judge_answers(items, config, Path(root) / name, metrics=("aligned",)))

        serial, pooled = run(1, "serial.jsonl"), run(pool, "pooled.jsonl")
    speedup = serial / pooled
    return {
        "value": speedup / pool,
        "speedup": speedup,
        "pool": pool,
        "serial_s": serial,
        "pooled_s": pooled,
        "delay_s": delay_s,
    }


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def run_all(pair, base: str, finetuned: str, repeats: int = 5, tokens: int = 32, memory: bool = True) -> dict:
    direction = direction_for(pair)

    def parameter_memory() -> dict:  # a pair built in memory: parameter bytes instead of process RSS
        sizes = pair.info()["memory_mb"]
        extra = sizes.get("adapter", sizes.get("second_model", 0.0))
        return {
            "value": (sizes["base"] + extra) / sizes["base"],
            **sizes,
            "note": "parameter bytes of the pair over those of the base",
        }

    measurements = {
        "steered_vs_plain_tokens_per_s": lambda: steering_overhead(pair, direction, tokens, repeats),
        "grid_batched_speedup": lambda: grid_speedup(pair, direction, tokens, repeats),
        "grid_vs_hf_generate_with_hook_speedup": lambda: grid_vs_hf_generate(pair, direction, tokens, repeats),
        "grid_first_token_vs_forward": lambda: grid_first_token(pair, direction, repeats),
        "ladder_batched_speedup": lambda: ladder_speedup(pair, direction, tokens, repeats),
        "validation_branched_speedup": lambda: validation_speedup(pair, direction, max(1, repeats // 2)),
        "projection_vs_two_forwards": lambda: projection_cost(pair, direction, repeats),
        "cached_vs_cold_projection": lambda: cache_speedup(pair, direction, repeats),
        "pair_vs_base_resident_memory": (lambda: resident_memory(base, finetuned)) if memory else parameter_memory,
        "extraction_vs_forward_throughput": lambda: extraction_throughput(pair, repeats),
        "judge_pool_speedup_per_worker": judge_pool,
    }
    figures = {}
    for name, measure in measurements.items():
        op, target = TARGETS[name]
        try:
            figure = measure()
        except Exception as err:  # one broken figure must not lose the others
            figures[name] = {
                "value": None,
                "error": f"{type(err).__name__}: {err}",
                "target": f"{op} {target}",
                "met": False,
            }
            continue
        figure["target"] = f"{op} {target}"
        figure["met"] = figure["value"] >= target if op == ">=" else figure["value"] <= target
        figures[name] = figure
    return {
        "machine": machine(),
        "pair": pair.info(),
        "repeats": repeats,
        "tokens": tokens,
        "figures": figures,
    }


def gpu_throughput(pair, tokens: int = 64) -> dict:
    """Absolute sampling throughput on a GPU at batch 1 and 64 (tokens per second)."""
    out = {}
    for batch in (1, 64):
        prompts = [PROMPT] * batch
        sampling = Sampling(temperature=1.0, max_new_tokens=tokens)
        generate(pair, prompts[:1], [Variant("base")], sampling=Sampling(temperature=1.0, max_new_tokens=4))
        rows: list = []
        seconds = timed(
            lambda rows=rows, prompts=prompts, sampling=sampling: rows.extend(
                generate(pair, prompts, [Variant("base")], sampling=sampling)
            )
        )
        out[f"batch_{batch}_tokens_per_s"] = sum(len(r.token_ids) for r in rows) / seconds
    return out
