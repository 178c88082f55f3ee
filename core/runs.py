"""Run folders: where they live, how one is made, and what fills it (sampled answers, then judgements).

A run lives in one folder: ``generations.jsonl`` and ``judgements.jsonl`` are appended row by row
as work completes, so an interrupted run resumes without redoing or losing anything; ``run.json``
records what produced it. Row seeds depend only on the seed, the rendered prompt and the sample
index, so a resumed run writes exactly what an uninterrupted one would have.

Several judges can score one run. ``judgements.jsonl`` holds the scores of the run's first judge
(the one ``extract --contrast judged`` and ``detect --run`` use); every other judge's scores go to
``judges/<model>.jsonl``, each resumable on its own, every line carrying the judge model and the
version the endpoint reported. Before judging, each judge is probed once (core.judge.probe_judge)
and the result is kept in ``judge_probes.json``, so a resumed run reads the judge's numbers the
same way without asking again. The EM report (core.em) and the sweep (core.sweep) are written
beside them as ``em.json`` and ``sweep.json``.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

from core.cache import CacheError, append_jsonl, read_jsonl_tolerant, repair_jsonl_tail, sha256_bytes
from core.data import Question
from core.directions import Direction, random_like
from core.errors import InputError
from core.generation import Generation, Sampling, Variant, generate
from core.typed_json import write_json


class RunError(InputError):
    """A run folder lacks what a step needs, or a step's arguments do not fit together."""


GENERATIONS = "generations.jsonl"
JUDGEMENTS = "judgements.jsonl"
JUDGES_DIR = "judges"  # judgements of every judge but the run's first, one file per judge
PROBES_JSON = "judge_probes.json"  # how each judge writes numbers, probed once per run
RUN_JSON = "run.json"
EM_JSON = "em.json"
SWEEP_JSON = "sweep.json"
SWEEP_HTML = "sweep.html"
RESULT_FILES = (GENERATIONS, JUDGEMENTS, EM_JSON, SWEEP_JSON)  # a folder holding one of them is a run


# ---------------------------------------------------------------- where runs live


def runs_dir(cache_root: Path) -> Path:
    """Where `generate-eval` and `sweep` put their run folders by default."""
    return Path(cache_root) / "runs"


def list_runs(cache_root: Path) -> list[Path]:
    """Run folders under the cache holding generations, judgements, em.json or sweep.json; newest first."""
    found = []
    for folder in runs_dir(cache_root).glob("*"):
        files = [folder / name for name in RESULT_FILES if (folder / name).is_file()]
        if folder.is_dir() and files:
            found.append((max(f.stat().st_mtime for f in files), folder.name, folder))
    return [folder for *_, folder in sorted(found, reverse=True)]


def new_run_dir(cache_root: Path, kind: str = "sweep") -> Path:
    """Create and return a fresh ``<cache>/runs/<kind>-<time>`` folder, suffixed ``-2``, ``-3``, ... when
    that name is taken (a folder made in the same second), so a new job never resumes into another's."""
    stem = runs_dir(cache_root) / f"{kind}-{datetime.now():%Y%m%d-%H%M%S}"
    for n in range(1, 1000):
        candidate = stem if n == 1 else stem.with_name(f"{stem.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as err:
            raise CacheError(f"cannot create {candidate}: {err.strerror or err}") from err
    raise CacheError(f"cannot find a free run folder name next to {stem}")


# ---------------------------------------------------------------- generation


@dataclass(frozen=True)
class Condition:
    """One cell of an evaluation: a side of the pair, optionally steered or ablated at some layers."""

    label: str
    variant: Variant
    layers: tuple[int, ...] = ()
    control: bool = False  # steer with the norm-matched random vector instead of the direction

    @property
    def mode(self) -> str:
        if self.variant.ablate:
            return "ablate"
        if self.variant.alpha == 0:
            return "plain"
        return "induce" if self.variant.alpha > 0 else "restore"


def condition(
    variant: Variant, layers: Sequence[int] = (), control: bool = False, n_layers: int | None = None
) -> Condition:
    where = ""
    if variant.intervenes:
        where = "@all" if n_layers and len(layers) == n_layers else "@L" + "-".join(str(x) for x in layers)
    return Condition(("random:" if control else "") + variant.label + where, variant, tuple(layers), control)


def eval_prompts(questions: Sequence[Question], samples: int | None = None) -> list[dict]:
    return [
        {
            "question_id": q.id,
            "paraphrase": p,
            "messages": messages,
            "question": messages[-1]["content"],
            "samples": samples or q.samples_per_paraphrase,
            "judge_prompts": q.judge_prompts,
        }
        for q in questions
        for p, messages in enumerate(q.prompts())
    ]


def row_id(prompt: dict, label: str, sample: int) -> str:
    return f"{prompt['question_id']}/{prompt['paraphrase']}/{label}/{sample}"


class Engine(Protocol):
    """Where a run's answers are sampled when not in process (core.server_engine.ServerEngine):
    called like core.generation.generate."""

    def check(self, pair, variants: Sequence[Variant]) -> None:
        """Refuse what it cannot sample, before any sampling request."""

    def provenance(self) -> dict:
        """What samples (recorded in run.json)."""

    def __call__(self, pair, prompts, variants, **kwargs) -> list[Generation]: ...


IN_PROCESS = {"name": "hf"}


def _check_same_engine(out_dir: Path, engine: dict) -> None:
    """A run's rows come from one engine: resuming with another would mix them unmarked."""
    if not (out_dir / GENERATIONS).exists() or not read_jsonl_tolerant(out_dir / GENERATIONS):
        return
    before = read_run_json(out_dir).get("engine") or IN_PROCESS
    same = ("name", "models")
    if {k: before.get(k) for k in same} != {k: engine.get(k) for k in same}:
        raise RunError(
            f"{out_dir}: its answers were sampled by engine {before.get('name')!r} "
            f"{before.get('models') or ''}; resume it with the same engine and models, or write to a new --out"
        )


def run_generations(
    pair,
    questions: Sequence[Question],
    conditions: Sequence[Condition],
    out_dir: Path,
    direction: Direction | None = None,
    sampling: Sampling = Sampling(max_new_tokens=128),
    samples: int | None = None,
    prompts_per_batch: int = 4,
    progress: Callable[[int, int], None] | None = None,
    provenance: dict | None = None,
    engine: Engine | None = None,
) -> list[dict]:
    """Sample every prompt x condition x sample; append rows to ``generations.jsonl``; resume.

    ``engine``: None samples in process (core.generation.generate, the exact reference); an Engine
    (a server) is checked before any sampling and recorded in run.json, and a run is only resumed
    with the engine and models that started it."""
    labels = [c.label for c in conditions]
    if len(set(labels)) != len(labels):
        raise RunError(f"conditions must have distinct labels: {labels}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if engine is not None:
        engine.check(pair, [c.variant for c in conditions])
    engine_info = engine.provenance() if engine is not None else IN_PROCESS
    _check_same_engine(out_dir, engine_info)
    write_json(
        out_dir / RUN_JSON,
        {
            "pair": pair.info(),
            "engine": engine_info,
            "direction": direction.provenance if direction else None,
            "direction_fingerprint": direction.fingerprint if direction else None,
            "conditions": [
                {"label": c.label, **asdict(c.variant), "layers": list(c.layers), "control": c.control}
                for c in conditions
            ],
            "sampling": asdict(sampling),
            **(provenance or {}),
        },
    )
    path = out_dir / GENERATIONS
    rows = {r["id"]: r for r in read_jsonl_tolerant(path)}
    repair_jsonl_tail(path)
    prompts = eval_prompts(questions, samples)
    control = random_like(direction, sampling.seed) if direction is not None else None
    groups: dict[tuple, list[Condition]] = defaultdict(list)
    for c in conditions:  # one batched call per (layers, control): they share the hooks
        groups[(c.layers, c.control)].append(c)
    total = sum(p["samples"] for p in prompts) * len(conditions)
    done = sum(1 for p in prompts for c in conditions for k in range(p["samples"]) if row_id(p, c.label, k) in rows)
    if progress:
        progress(done, total)
    for (layers, is_control), members in groups.items():
        for start in range(0, len(prompts), prompts_per_batch):
            chunk = prompts[start : start + prompts_per_batch]
            for n_samples in sorted({p["samples"] for p in chunk}):
                batch = [p for p in chunk if p["samples"] == n_samples]
                wanted = [row_id(p, c.label, k) for p in batch for c in members for k in range(n_samples)]
                if all(w in rows for w in wanted):
                    continue
                generated = (engine or generate)(
                    pair,
                    [p["messages"] for p in batch],
                    [c.variant for c in members],
                    direction=control if is_control else direction,
                    layers=list(layers),
                    sampling=sampling,
                    samples=n_samples,
                )
                for g in generated:
                    prompt = batch[[p["messages"] for p in batch].index(g.prompt)]
                    member = members[[c.variant for c in members].index(g.variant)]
                    record = {
                        "id": row_id(prompt, member.label, g.sample),
                        "condition": member.label,
                        "mode": member.mode,
                        "side": member.variant.side,
                        "alpha": member.variant.alpha,
                        "layers": list(member.layers),
                        "control": member.control,
                        "question_id": prompt["question_id"],
                        "paraphrase": prompt["paraphrase"],
                        "sample": g.sample,
                        "messages": prompt["messages"],
                        "question": prompt["question"],
                        "answer": g.text,
                        "finish_reason": g.finish_reason,
                        "n_tokens": len(g.token_ids),
                        "token_ids": g.token_ids,
                        "seed": sampling.seed,
                        "judge_prompts": prompt["judge_prompts"],
                    }
                    if record["id"] not in rows:
                        append_jsonl(path, record)
                        rows[record["id"]] = record
                        done += 1
                if progress:
                    progress(done, total)
    return list(rows.values())


# ---------------------------------------------------------------- reading a run


def load_run(run_dir: Path) -> tuple[list[dict], dict]:
    """Generations and judgements ``{(id, metric): score/label}`` of a run folder."""
    run_dir = Path(run_dir)
    if not (run_dir / GENERATIONS).exists():
        raise RunError(f"{run_dir}: no {GENERATIONS}; run generate-eval first")
    generations = read_jsonl_tolerant(run_dir / GENERATIONS)
    judgements = {(j["id"], j["metric"]): j for j in read_jsonl_tolerant(run_dir / JUDGEMENTS)}
    return generations, judgements


def run_hash(run_dir: Path) -> str:
    """Content hash of a run's generations and judgements (the data a judged direction came from)."""
    run_dir = Path(run_dir)
    parts = [(run_dir / name).read_bytes() if (run_dir / name).exists() else b"" for name in (GENERATIONS, JUDGEMENTS)]
    return sha256_bytes(b"\0".join(parts))[:16]


def read_run_json(run_dir: Path) -> dict:
    """What produced a run (``run.json``); {} when it is absent or unreadable."""
    try:
        value = json.loads((Path(run_dir) / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# ---------------------------------------------------------------- judging


def _judge_slug(model: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("._")[:60] or "judge"
    return f"{readable}-{sha256_bytes(model.encode())[:8]}"


def _models_in(path: Path) -> set[str]:
    return {r["model"] for r in read_jsonl_tolerant(path) if isinstance(r, dict) and r.get("model")}


def judgements_path(run_dir: Path, model: str) -> Path:
    """Where the judgements of judge ``model`` live in a run: ``judgements.jsonl`` when it is
    absent or holds this judge's (the run's first judge), else ``judges/<model>.jsonl``."""
    primary = Path(run_dir) / JUDGEMENTS
    owners = _models_in(primary)
    if not owners or owners == {model}:
        return primary
    return Path(run_dir) / JUDGES_DIR / f"{_judge_slug(model)}.jsonl"


def _probe_key(config) -> str:
    return f"{config.model} @ {config.base_url or 'default'}"


def _run_probe(run_dir: Path, config):
    """The judge's probe (core.judge.probe_judge), asked once per run: kept in judge_probes.json."""
    from core.judge import Probe, probe_judge

    path = Path(run_dir) / PROBES_JSON
    records = {}
    if path.exists():
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            records = {}  # unreadable: probe again and rewrite it
        if not isinstance(records, dict):
            records = {}
    key = _probe_key(config)
    if isinstance(records.get(key), dict):
        try:
            return Probe.from_dict(records[key])
        except (TypeError, ValueError):
            pass
    probe = probe_judge(config)
    records[key] = probe.to_dict()
    write_json(path, records)
    return probe


def judge_run(run_dir: Path, config, progress: Callable[[int, int], None] | None = None):
    """Judge every generation of a run with one judge or several (a JudgeConfig or a list of them).

    Each judge is probed first (once per run, see _run_probe) and its numbers read accordingly;
    question-specific judge prompts are used where the question set has them; each judge's
    judgements go to its own file (judgements_path) and resume from it. Returns the totals
    over all judges and, under "judges", one summary per judge (model, reading, file, counts)."""
    from core.judge import JUDGE_PROMPTS, judge_answers

    run_dir = Path(run_dir)
    configs = list(config) if isinstance(config, (list, tuple)) else [config]
    if not configs:
        raise RunError("no judge to run: give at least one judge model")
    models = [c.model for c in configs]
    if len(set(models)) != len(models):
        raise RunError(f"judge models {models}: each judge may appear once")
    generations, _ = load_run(run_dir)
    by_prompts: dict[str, list[dict]] = defaultdict(list)
    templates: dict[str, dict] = {}
    for g in generations:
        custom = g.get("judge_prompts") or {}
        key = json.dumps(custom, sort_keys=True)
        templates[key] = {**JUDGE_PROMPTS, **custom}
        by_prompts[key].append({"id": g["id"], "question": g["question"], "answer": g["answer"]})
    metrics = ("aligned", "coherent")
    total = len(generations) * len(metrics) * len(configs)
    offset = 0
    judges = []
    for cfg in configs:
        probe = _run_probe(run_dir, cfg)
        path = judgements_path(run_dir, cfg.model)
        summaries = []
        for key, rows in by_prompts.items():
            report = None
            if progress is not None:

                def report(done: int, _total: int, base: int = offset) -> None:
                    progress(base + done, total)

            summaries.append(
                judge_answers(rows, cfg, path, metrics=metrics, prompts=templates[key], progress=report, reading=probe)
            )
            offset += len(rows) * len(metrics)
        judges.append(
            {
                "model": cfg.model,
                "base_url": cfg.base_url,
                "reading": probe.reading,
                "probe_reply": probe.reply,
                "file": str(path.relative_to(run_dir)),
                "judged": sum(len(s.judgements) for s in summaries),
                "requested": sum(s.n_requested for s in summaries),
                "resumed": sum(s.n_resumed for s in summaries),
                "failed": sum(s.n_failed for s in summaries),
                "prompt_tokens": sum(s.prompt_tokens for s in summaries),
                "completion_tokens": sum(s.completion_tokens for s in summaries),
            }
        )
    totals = {
        name: sum(j[name] for j in judges)
        for name in ("judged", "requested", "resumed", "failed", "prompt_tokens", "completion_tokens")
    }
    return {**totals, "judges": judges}


def load_judges(run_dir: Path) -> dict[str, dict]:
    """Every judge's judgements in a run, ``{model: {(id, metric): judgement}}``, the run's first
    judge (judgements.jsonl) first, then judges/*.jsonl by name."""
    run_dir = Path(run_dir)
    files = [run_dir / JUDGEMENTS, *sorted((run_dir / JUDGES_DIR).glob("*.jsonl"))]
    judges: dict[str, dict] = {}
    for path in files:
        for j in read_jsonl_tolerant(path):
            if not isinstance(j, dict) or "id" not in j or "metric" not in j:
                continue
            model = j.get("model") or (path.stem if path.parent.name == JUDGES_DIR else "unknown")
            judges.setdefault(model, {})[(j["id"], j["metric"])] = j
    return judges
