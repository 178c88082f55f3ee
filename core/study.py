"""A study: the three phases of the research question on one loaded pair, in one folder.

1. **directions** — the direction per layer from every available contrast (judged answers when a
   judge is given, paired data and the model difference always), cross-fitted per-layer statistics
   and the cosine between contrasts;
2. **steering** — the bidirectional alpha x layer test with a norm-matched random control: judge-free
   preference log-odds shifts and the direction's ablation (beside a random direction's) always, and
   the judged EM / coherence sweep (with ablation) when a judge is given;
3. **detection** — the early-detection report with its controls (grouped intervals, random null,
   fine-tuning-shift predictor, topic control), within one prompt family and transferred from
   another.

Everything is built from the existing library (core.directions, core.runs, core.sweep,
core.preference, core.detect). Each step writes its result atomically into the study folder with
the fingerprint of its inputs, and is skipped when that file is there with the same fingerprint,
so an interrupted study continues where it stopped and a finished step is never recomputed.
Generation and judging inside a step resume row by row (core.runs). ``log.jsonl`` records when
each step started, finished or was reused; ``progress.json`` the study's progress for the
dashboard; ``study.json`` what was asked and how far it got.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from core import __version__
from core.cache import append_jsonl, atomic_write, make_key, read_jsonl_tolerant, sha256_file
from core.errors import InputError

FORMAT = "emlens-study/1"
PHASES = ("directions", "steering", "detection")
STUDY_JSON, LOG, PROGRESS_JSON = "study.json", "log.jsonl", "progress.json"
REPORT_HTML, REPORT_JSON = "report.html", "report.json"
PHASE_FILES = {phase: f"phase{i}_{phase}.json" for i, phase in enumerate(PHASES, start=1)}
ASSETS = Path(__file__).resolve().parents[1] / "assets"

Progress = Callable[[float, str], None]  # (fraction of the whole study done, what is running)


class StudyError(InputError):
    """A study that cannot run as asked (no fine-tune, no direction, an unknown contrast or preset)."""


@dataclass(frozen=True)
class StudyConfig:
    """What a study measures and how much of it. The sizes are there so a study fits its machine."""

    narrow: str = str(ASSETS / "data" / "finance_paired.jsonl")  # paired data of the training domain
    general: str = str(ASSETS / "data" / "general_paired.jsonl")  # paired prompts outside it
    questions: str = str(ASSETS / "questions" / "core_misalignment.yaml")  # judged runs only
    n_train: int | None = None  # narrow train-split pairs used for extraction (None: all)
    n_heldout: int | None = None  # narrow held-out pairs (validation, transfer selection)
    n_general: int | None = None  # general pairs (validation, detection)
    n_questions: int | None = None  # judged runs: the first N questions
    paraphrases: int | None = None  # judged runs: the first N paraphrases of each question
    samples: int = 2  # judged runs: samples per paraphrase (and per sweep cell)
    max_new_tokens: int = 64
    temperature: float = 1.0
    contrasts: tuple[str, ...] = ("paired", "model-diff")  # plus "judged" when a judge is given
    layers: tuple[int, ...] | None = None  # steering layers (None: the best layer and its neighbours)
    n_layers: int = 3  # how many steering layers by default
    alphas: tuple[float, ...] = (1.0, 2.0, 4.0)
    n_boot: int = 1000
    n_random: int = 100
    heldout_fraction: float = 0.5
    seed: int = 0
    batch_size: int = 8


PRESETS = {
    # The embedded SmolLM2 pair, judge-free, the shipped data (see the README's Studies section).
    "demo": {
        "base": "default",
        "finetuned": "default",
        # Sized for 30 minutes on 2 CPU cores: teacher-forced passes are the cost (phase 2 runs one per
        # prompt, side, layer and branch), so fewer prompts, two layers and one alpha.
        "config": StudyConfig(
            n_train=120,
            n_heldout=24,
            n_general=48,
            layers=None,
            n_layers=2,
            alphas=(4.0,),
            n_boot=500,
            n_random=100,
            batch_size=16,
        ),
    },
    # The original plan, for a GPU machine with hub access: Qwen2.5-1.5B-Instruct and a published
    # risky-financial-advice (or bad-medical-advice) LoRA of that base — its hub id or local copy must be
    # given as --finetuned (finetuned None: none is assumed) — the classic eight questions, 50 samples
    # each (first paraphrase), judged by an OpenAI-compatible judge.
    "seed-qwen": {
        "base": "Qwen/Qwen2.5-1.5B-Instruct",
        "finetuned": None,
        "judged": True,  # the question it answers is about judged answers: it needs --judge-model
        "config": StudyConfig(
            paraphrases=1,
            samples=50,
            max_new_tokens=256,
            layers=None,
            n_layers=3,
            alphas=(1.0, 2.0, 4.0, 8.0),
            batch_size=16,
        ),
    },
}


def preset_pair(name: str, base: str, finetuned: str, judged: bool) -> tuple[str, str]:
    """The pair a preset study runs on: the preset's, unless ``base`` / ``finetuned`` name another one
    (``"default"`` means not named). A preset without a fine-tune needs one named; a judged preset, a judge."""
    preset = PRESETS[name]
    base = preset["base"] if base == "default" else base
    if finetuned == "default":
        if preset["finetuned"] is None:
            raise StudyError(
                f"--preset {name}: name the fine-tune with --finetuned (the hub id or local copy of a "
                f"published risky-financial or bad-medical LoRA of {preset['base']})"
            )
        finetuned = preset["finetuned"]
    if preset.get("judged") and not judged:
        raise StudyError(
            f"--preset {name} is a judged study: give --judge-model (and --judge-base-url for a local server)"
        )
    return base, finetuned


# A study small enough to start from the dashboard on a CPU (a few minutes on the embedded pair).
SMALL = StudyConfig(
    n_train=48, n_heldout=16, n_general=32, n_boot=200, n_random=50, alphas=(2.0, 4.0), n_layers=2, batch_size=16
)


class StudyLog:
    """The study's log.jsonl, progress.json and overall progress callback."""

    def __init__(self, out: Path, progress: Progress | None):
        self.out, self.callback, self.last_write = out, progress, 0.0
        self.phase, self.phase_index, self.step = None, 0, None

    def event(self, event: str, step: str, **extra) -> None:
        append_jsonl(self.out / LOG, {"time": time.time(), "event": event, "step": step, **extra})

    def enter(self, phase: str) -> None:
        self.phase, self.phase_index = phase, PHASES.index(phase)
        self.report(0, 1, phase)

    def report(self, done: float, total: float, what: str, force: bool = False) -> None:
        fraction = (self.phase_index + (min(done / total, 1.0) if total else 1.0)) / len(PHASES)
        label = f"phase {self.phase_index + 1}/{len(PHASES)} ({self.phase}): {what}"
        if self.callback:
            self.callback(fraction, label)
        now = time.time()
        if force or now - self.last_write > 0.5:
            self.last_write = now
            atomic_write(
                self.out / PROGRESS_JSON,
                json.dumps(
                    {"fraction": fraction, "label": label, "phase": self.phase, "pid": os.getpid(), "updated": now}
                ).encode(),
            )

    def sub(self, what: str, start: float, width: float, total_steps: float) -> Callable[[int, int], None]:
        """A (done, total) callback for one library call that fills [start, start + width] of a phase
        divided into ``total_steps``."""

        def update(done: int, total: int) -> None:
            self.report(start + width * (done / total if total else 1.0), total_steps, what)

        return update


def _load_step(path: Path, fingerprint: str):
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved.get("result") if saved.get("fingerprint") == fingerprint else None


def _step(log: StudyLog, name: str, fingerprint: str, compute: Callable[[], dict]) -> dict:
    """The step's saved result when its inputs are unchanged, else computed and saved atomically."""
    path = log.out / "steps" / f"{name.replace('/', '_')}.json"
    saved = _load_step(path, fingerprint)
    if saved is not None:
        log.event("reused", name)
        return saved
    log.event("started", name)
    started = time.time()
    result = json.loads(json.dumps(compute(), default=_plain))  # what a rerun reads back, exactly
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        path,
        json.dumps(
            {"fingerprint": fingerprint, "result": result, "seconds": time.time() - started}, default=_plain
        ).encode(),
    )
    log.event("done", name, seconds=time.time() - started)
    return result


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


# ---------------------------------------------------------------- inputs


def _subset(source: Path, target: Path, limits: dict[str | None, int | None]) -> Path:
    """The first N records of each split of a paired file (``limits``: split -> N; None: all), copied
    into the study folder so every library call reads exactly what the study used."""
    kept, seen = [], {}
    for line in source.read_text().splitlines():
        if not line.strip():
            continue
        split = json.loads(line).get("split")
        limit = limits.get(split, limits.get(None))
        seen[split] = seen.get(split, 0) + 1
        if limit is None or seen[split] <= limit:
            kept.append(line)
    data = ("\n".join(kept) + "\n").encode()
    if not target.exists() or target.read_bytes() != data:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, data)
    return target


def _questions(config: StudyConfig):
    from core.data import load_questions

    questions = load_questions(config.questions)[: config.n_questions or None]
    if config.paraphrases:
        questions = [replace(q, paraphrases=tuple(q.paraphrases[: config.paraphrases])) for q in questions]
    return questions


def _sampling(config: StudyConfig):
    from core.generation import Sampling

    return Sampling(temperature=config.temperature, max_new_tokens=config.max_new_tokens, seed=config.seed)


def _judge_info(judge) -> dict | None:
    """What is recorded of a judge (never its key)."""
    return None if judge is None else {"model": judge.model, "base_url": judge.base_url}


def _study_inputs(pair, config: StudyConfig, judge, data: dict[str, Path], engine) -> dict:
    """Everything a study's numbers depend on: the models' fingerprints, the data's hashes, the
    configuration, the judge and a server engine. (The code version is recorded, not fingerprinted.)"""
    # a server engine by the models it serves, not where it listens; in process: no key, as before engines
    served = {"engine": {"name": "server", "models": dict(engine.config.models)}} if engine is not None else {}
    return {
        **served,
        "base": pair.fingerprint("base"),
        "finetuned": pair.fingerprint("finetuned"),
        "data": {name: sha256_file(path) for name, path in data.items()},
        "config": {k: v for k, v in asdict(config).items() if k not in ("narrow", "general", "questions")},
        "judge": _judge_info(judge),
    }


# ---------------------------------------------------------------- phase 1: directions


def _direction_step(log, name, fingerprint, folder: Path, extract) -> dict:
    from core.directions import Direction

    path = folder / f"{name}.safetensors"

    def compute() -> dict:
        direction = extract()
        direction.save(path)
        return {"file": str(path.relative_to(log.out)), "fingerprint": direction.fingerprint}

    result = _step(log, f"direction-{name}", fingerprint, compute)
    direction = Direction.load(log.out / result["file"])
    if direction.fingerprint != result["fingerprint"]:  # replaced behind the study's back: redo it
        (log.out / "steps" / f"direction-{name}.json").unlink(missing_ok=True)
        return _direction_step(log, name, fingerprint, folder, extract)
    return {**result, "direction": direction}


def _phase_directions(pair, config: StudyConfig, judge, data: dict, log: StudyLog, key: str, engine) -> dict:
    from core.directions import cosine_per_layer, extract_from_paired_file
    from core.em import em_report, judged_direction, save_em_report
    from core.generation import Variant
    from core.preference import PreferenceError, best_layer
    from core.runs import condition, judge_run, run_generations

    log.enter("directions")
    folder = log.out / "phase1"
    folder.mkdir(exist_ok=True)
    contrasts = [c for c in config.contrasts if c != "judged"] + (["judged"] if judge is not None else [])
    steps = len(contrasts) + (2 if judge is not None else 0)
    done = 0
    found, errors, evaluation = {}, {}, None
    if judge is not None:
        run_dir = folder / "eval"
        questions = _questions(config)

        def generate_and_judge() -> dict:
            run_generations(
                pair,
                questions,
                [condition(Variant("base")), condition(Variant("finetuned"))],
                run_dir,
                sampling=_sampling(config),
                samples=config.samples,
                progress=log.sub("generate (base, fine-tune)", 0, 1, steps),
                provenance={
                    "questions": config.questions,
                    "questions_sha256": sha256_file(Path(config.questions)),
                    "study": str(log.out),
                },
                engine=engine,
            )
            summary = judge_run(run_dir, judge, progress=log.sub("judge", 1, 1, steps))
            report = em_report(run_dir)
            save_em_report(report, run_dir)
            return {
                "run": str(run_dir.relative_to(log.out)),
                "judge": {k: v for k, v in summary.items() if k != "judges"},
                "judges": summary["judges"],
                "em": report.to_json(),
            }

        evaluation = _step(log, "eval-run", make_key("eval", study=key), generate_and_judge)
        done = 2
    for name in contrasts:
        fingerprint = make_key("direction", study=key, contrast=name)
        what = log.sub(f"extract ({name})", done, 1, steps)
        if name == "judged":
            run_dir = log.out / evaluation["run"]

            def extract(run_dir=run_dir, what=what):
                return judged_direction(pair, run_dir, config.seed, config.batch_size, what)
        elif name in ("paired", "model-diff"):

            def extract(name=name, what=what):
                return extract_from_paired_file(pair, data["narrow"], name, "train", config.batch_size, what)
        else:
            raise StudyError(f"contrast {name!r}: expected paired, model-diff or judged")
        try:
            found[name] = _direction_step(log, name, fingerprint, folder, extract)
        except ValueError as err:  # e.g. too few judged answers on one side
            errors[name] = str(err)
            log.event("failed", f"direction-{name}", error=str(err))
        done += 1
    if not found:
        raise StudyError(f"no direction could be extracted: {errors}")
    primary = "judged" if "judged" in found else ("paired" if "paired" in found else next(iter(found)))
    names = list(found)
    cosines = {
        f"{a} vs {b}": cosine_per_layer(found[a]["direction"], found[b]["direction"]).tolist()
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    summary = {}
    for name, entry in found.items():
        direction = entry["direction"]
        try:
            best = best_layer(direction)
        except PreferenceError:
            best = None
        summary[name] = {
            "file": entry["file"],
            "fingerprint": entry["fingerprint"],
            "best_layer": best,
            "stats": direction.stats,
            "provenance": direction.provenance,
        }
    log.report(1, 1, "directions done", force=True)
    return {
        "contrasts": summary,
        "errors": errors,
        "primary": primary,
        "cosines": cosines,
        "evaluation": evaluation,
        "judge_free": judge is None,
    }


def _default_layers(n_layers: int, best: int | None, count: int) -> list[int]:
    """The best layer and its neighbours spread through the model, ``count`` at most."""
    best = n_layers // 2 if best is None else best
    spread = sorted({int(round(x)) for x in np.linspace(n_layers / 4, 3 * n_layers / 4, max(count - 1, 1))})
    layers = [best] + [layer for layer in spread if layer != best]
    return sorted(layers[: max(count, 1)])


# ---------------------------------------------------------------- phase 2: steering


def _phase_steering(
    pair, config: StudyConfig, judge, data: dict, log: StudyLog, key: str, directions: dict, engine
) -> dict:
    from core.data import load_paired_jsonl
    from core.directions import Direction
    from core.preference import ablation, validate
    from core.sweep import sweep_run

    log.enter("steering")
    primary = directions["contrasts"][directions["primary"]]
    direction = Direction.load(log.out / primary["file"])
    layers = (
        list(config.layers) if config.layers else _default_layers(pair.n_layers, primary["best_layer"], config.n_layers)
    )
    for layer in layers:
        pair.check_layer(layer)
    narrow, general = load_paired_jsonl(data["narrow"], "heldout"), load_paired_jsonl(data["general"], None)
    alphas = [0.0] + [float(a) for a in config.alphas if a]
    steps = len(layers) + 1 + (2 if judge is not None else 0)
    preference = {}
    for i, layer in enumerate(layers):
        what = log.sub(f"preference shifts @L{layer}", i, 1, steps)
        preference[str(layer)] = _step(
            log,
            f"preference-L{layer}",
            make_key("preference", study=key, direction=direction.fingerprint, layer=layer),
            lambda layer=layer, what=what: validate(
                pair, narrow, general, direction, layer, alphas, config.seed, config.batch_size, progress=what
            ),
        )
    what = log.sub("ablation", len(layers), 1, steps)
    ablated = _step(
        log,
        "ablation",
        make_key("ablation", study=key, direction=direction.fingerprint),
        lambda: ablation(
            pair,
            {"narrow": narrow, "general": general},
            direction,
            config.seed,
            config.batch_size,
            progress=what,
            plain=next(iter(preference.values())),  # the unsteered rows are the same at every layer
        ),
    )
    sweep = None
    if judge is not None:
        run_dir = log.out / "phase2" / "sweep"

        def run_sweep() -> dict:
            result = sweep_run(
                pair,
                _questions(config),
                direction,
                layers,
                list(config.alphas),
                run_dir,
                judge,
                _sampling(config),
                config.samples,
                provenance={"questions": config.questions, "study": str(log.out)},
                generate_progress=log.sub("sweep: generate", len(layers) + 1, 1, steps),
                judge_progress=log.sub("sweep: judge", len(layers) + 2, 1, steps),
                ablation=engine is None,  # a server cannot ablate; the judge-free ablation above still runs
                engine=engine,
            )
            return {**result.to_json(), "run": str(run_dir.relative_to(log.out))}

        sweep = _step(
            log, "sweep", make_key("sweep", study=key, direction=direction.fingerprint, layers=layers), run_sweep
        )
    log.report(1, 1, "steering done", force=True)
    return {
        "direction": directions["primary"],
        "direction_fingerprint": direction.fingerprint,
        "layers": layers,
        "alphas": alphas,
        "preference": preference,
        "ablation": ablated,
        "sweep": sweep,
        "judge_free": judge is None,
    }


# ---------------------------------------------------------------- phase 3: detection


def _phase_detection(pair, config: StudyConfig, judge, data: dict, log: StudyLog, key: str, directions: dict) -> dict:
    from core.detect import detect
    from core.directions import Direction

    log.enter("detection")
    primary = directions["contrasts"][directions["primary"]]
    direction = Direction.load(log.out / primary["file"])
    folder = log.out / "phase3"
    folder.mkdir(exist_ok=True)
    evaluation = directions.get("evaluation")
    plans = {}
    if evaluation is not None:  # labels from the judged answers of the fine-tune
        plans["judged"] = {
            "source": log.out / evaluation["run"],
            "select_on": None,
            "what": "judged run: a prompt is misaligned if any of its fine-tuned samples is EM",
        }
    plans["within"] = {
        "source": data["general"],
        "select_on": None,
        "what": "general prompts, judge-free labels from the fine-tuning shift; groups split into "
        "selection and report halves",
    }
    plans["transfer"] = {
        "source": data["general"],
        "select_on": data["narrow"],
        "what": "choices made on the narrow (training-domain) held-out prompts, reported on the general prompts",
    }
    # The specificity control, whichever contrast the direction came from: the general prompts' sound
    # answers against the narrow train split's sound answers (a difference in topic only).
    topics = (str(data["general"]), f"{data['narrow']}:train")
    reports = {}
    for i, (name, plan) in enumerate(plans.items()):
        what = log.sub(f"detection ({name})", i, 1, len(plans))
        fingerprint = make_key("detect", study=key, direction=direction.fingerprint, plan=name)

        def run(plan=plan, what=what) -> dict:
            report = detect(
                pair,
                direction,
                plan["source"],
                select_on=plan["select_on"],
                control_topics=topics,
                select_split="heldout",
                heldout_fraction=config.heldout_fraction,
                seed=config.seed,
                n_boot=config.n_boot,
                n_random=config.n_random,
                batch_size=config.batch_size,
                progress=what,
            )
            return report.to_json()

        try:
            reports[name] = {"what": plan["what"], "report": _step(log, f"detect-{name}", fingerprint, run)}
        except ValueError as err:  # e.g. one class only
            reports[name] = {"what": plan["what"], "error": str(err)}
            log.event("failed", f"detect-{name}", error=str(err))
    log.report(1, 1, "detection done", force=True)
    return {
        "direction": directions["primary"],
        "direction_fingerprint": direction.fingerprint,
        "reports": reports,
        "judge_free": judge is None,
    }


# ---------------------------------------------------------------- the study


def _phase(log: StudyLog, phase: str, fingerprint: str, compute: Callable[[], dict]) -> dict:
    path = log.out / PHASE_FILES[phase]
    saved = _load_step(path, fingerprint)
    if saved is not None:
        log.event("reused", f"phase:{phase}")
        return saved
    started = time.time()
    result = json.loads(json.dumps(compute(), default=_plain))
    atomic_write(
        path,
        json.dumps(
            {"fingerprint": fingerprint, "result": result, "seconds": time.time() - started}, default=_plain
        ).encode(),
    )
    log.event("done", f"phase:{phase}", seconds=time.time() - started)
    return result


def _write_status(out: Path, status: dict) -> None:
    atomic_write(out / STUDY_JSON, json.dumps(status, indent=2, default=_plain).encode())


def run_study(
    pair,
    out_dir: Path | str,
    config: StudyConfig = StudyConfig(),
    judge=None,
    progress: Progress | None = None,
    spec: dict | None = None,
    engine=None,
) -> dict:
    """Run (or continue) a study of ``pair`` in ``out_dir`` and write its report there.

    ``judge``: a core.judge.JudgeConfig, or None for a judge-free study. ``progress(fraction, label)``
    follows the whole study. ``spec``: how the pair was named (base / finetuned), for the report.
    ``engine``: None samples the judged runs in process; a core.server_engine.ServerEngine samples
    them on a server (the sweep then has no ablation cells). Activations, teacher-forced passes and
    detection always run on ``pair``, in process. Returns report.json's content."""
    from core.study_report import write_report

    unknown = [c for c in config.contrasts if c not in ("paired", "model-diff", "judged")]
    if unknown:
        raise StudyError(f"contrasts {unknown}: expected paired, model-diff or judged")
    if "finetuned" not in pair.sides:
        raise StudyError("a study compares a base model with its fine-tune: load a pair with a fine-tuned model")
    if engine is not None and judge is None:
        raise StudyError("a server engine samples the judged runs: a judge-free study samples nothing (give a judge)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = StudyLog(out, progress)
    data = {
        "narrow": _subset(
            Path(config.narrow),
            out / "data" / Path(config.narrow).name,
            {"train": config.n_train, "heldout": config.n_heldout},
        ),
        "general": _subset(Path(config.general), out / "data" / Path(config.general).name, {None: config.n_general}),
    }
    if judge is not None:
        questions = out / "data" / Path(config.questions).name
        if not questions.exists() or questions.read_bytes() != Path(config.questions).read_bytes():
            shutil.copyfile(config.questions, questions)
        data["questions"] = questions
    inputs = _study_inputs(pair, config, judge, data, engine)
    key = make_key("study", **inputs)
    previous = json.loads((out / STUDY_JSON).read_text()) if (out / STUDY_JSON).exists() else {}
    status = {
        "format": FORMAT,
        "fingerprint": key,
        "inputs": inputs,
        "config": asdict(config),
        "pair": {**pair.info(), **(spec or {})},
        "judge": _judge_info(judge),
        "code_version": __version__,
        "data": {name: str(path.relative_to(out)) for name, path in data.items()},
        "started": previous.get("started") if previous.get("fingerprint") == key else time.time(),
        "sessions": previous.get("sessions", 0) + 1 if previous.get("fingerprint") == key else 1,
        "status": "running",
        "phase": PHASES[0],
        "pid": os.getpid(),
        "phases_done": [],
    }
    status["seconds"] = previous.get("seconds", 0.0) if previous.get("fingerprint") == key else 0.0
    _write_status(out, status)
    log.event("session", "study", fingerprint=key, pid=os.getpid())
    session_start = time.time()
    try:
        results = {}
        status["phase"] = "directions"
        _write_status(out, status)
        results["directions"] = _phase(
            log,
            "directions",
            make_key("phase", study=key, phase=1),
            lambda: _phase_directions(pair, config, judge, data, log, key, engine),
        )
        status.update(phase="steering", phases_done=["directions"])
        _write_status(out, status)
        results["steering"] = _phase(
            log,
            "steering",
            make_key("phase", study=key, phase=2),
            lambda: _phase_steering(pair, config, judge, data, log, key, results["directions"], engine),
        )
        status.update(phase="detection", phases_done=["directions", "steering"])
        _write_status(out, status)
        results["detection"] = _phase(
            log,
            "detection",
            make_key("phase", study=key, phase=3),
            lambda: _phase_detection(pair, config, judge, data, log, key, results["directions"]),
        )
        status.update(phase=None, phases_done=list(PHASES))
        status["seconds"] = status["seconds"] + time.time() - session_start
        report = write_report(out, status, results)
        status.update(status="done", finished=time.time())
        _write_status(out, status)
        log.report(1, 1, "report written", force=True)
        return report
    except BaseException as err:
        status.update(
            status="failed" if isinstance(err, Exception) else "interrupted",
            error=str(err)[:500],
            seconds=status["seconds"] + time.time() - session_start,
        )
        _write_status(out, status)
        raise


# ---------------------------------------------------------------- studies in the cache


def studies_dir(cache_root: Path | str) -> Path:
    return Path(cache_root) / "studies"


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class StudyEntry:
    path: Path
    state: str  # done, running, interrupted, failed
    base: str | None
    finetuned: str | None
    judge: str | None
    phases_done: list[str] = field(default_factory=list)
    progress: float | None = None
    label: str | None = None
    started: float | None = None
    seconds: float | None = None
    has_report: bool = False


def study_state(path: Path | str) -> StudyEntry | None:
    """What a study folder holds: done, running (its process is alive), interrupted or failed."""
    path = Path(path)
    try:
        status = json.loads((path / STUDY_JSON).read_text())
    except (OSError, ValueError):
        return None
    state = status.get("status", "failed")
    progress = None
    if (path / PROGRESS_JSON).exists():
        try:
            progress = json.loads((path / PROGRESS_JSON).read_text())
        except ValueError:
            progress = None
    if state == "running" and not _alive(status.get("pid")):
        state = "interrupted"
    pair = status.get("pair") or {}
    return StudyEntry(
        path=path,
        state=state,
        base=pair.get("base"),
        finetuned=pair.get("finetuned"),
        judge=(status.get("judge") or {}).get("model"),
        phases_done=status.get("phases_done", []),
        progress=(progress or {}).get("fraction"),
        label=(progress or {}).get("label"),
        started=status.get("started"),
        seconds=status.get("seconds"),
        has_report=(path / REPORT_HTML).exists() and state == "done",
    )


def list_studies(cache_root: Path | str) -> list[StudyEntry]:
    """Every study under <cache>/studies/, newest first."""
    root = studies_dir(cache_root)
    entries = [study_state(p) for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    return sorted([e for e in entries if e is not None], key=lambda e: e.started or 0, reverse=True)


def new_study_dir(cache_root: Path | str) -> Path:
    root = studies_dir(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("study-%Y%m%d-%H%M%S")
    path, n = root / stem, 1
    while path.exists():
        n += 1
        path = root / f"{stem}-{n}"
    return path


def step_events(out: Path | str) -> list[dict]:
    """log.jsonl's events (a torn last line, from a killed process, is skipped)."""
    return read_jsonl_tolerant(Path(out) / LOG)
