"""Training-time monitor: does the prompt-stage projection move before the behaviour does?

At the start of a LoRA run (step 0, before any update) and at every saved checkpoint, two numbers
are measured on the model being trained (:class:`Monitor`, a ``train(on_checkpoint=...)`` callback):

- **projection**: the mean over a fixed probe set of the block output at the last prompt token
  (generation prompt included) projected on the unit direction, at every layer; the curve is read
  at one layer (given, or where the direction best separates its own extraction answers, cross-
  fitted). The direction is a file given up front, or (``direction=None``) the paired contrast of
  the probe file's pairs extracted through the *final* adapter once training is done: then each
  checkpoint's trainable LoRA weights are kept beside the run while it trains, and the curve is
  computed for every saved checkpoint afterwards.
- **preference shift** (the behaviour, judge-free): mean over held-out pairs of the fine-tune-at-
  the-checkpoint minus base per-token log-odds of the harmful over the sound answer
  (:func:`core.preference.log_odds`); the base log-odds are computed once.

The probe file is a paired JSONL (:func:`core.data.load_paired_jsonl`): its first ``limit`` records,
in file order whatever their split, give both the probe prompts and the held-out pairs.

The **lead**: each curve's threshold is half-way between its step-0 value (the base: LoRA starts as
the identity, so the preference shift starts at 0) and its final value; a curve crosses at the first
evaluated step where it reaches its threshold in the direction of its overall change. Lead = step at
which the preference shift crosses minus step at which the projection crosses (positive: the
projection moved first), in training steps, resolved to the checkpoint interval.

While training, the state lives in ``<out>.monitor/`` (``monitor.jsonl``, one JSON object per line,
appended as points are made, plus ``weights/step-NNNNNN.safetensors`` in the extract-afterwards
mode), so a resumed run continues the curve without recomputing finished points. At the end the
curves go into ``training_card.json`` (key ``monitor``) and ``monitor.jsonl`` beside the adapter,
and the state folder (the per-checkpoint weights included) is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import __version__
from core.cache import atomic_write, sha256_bytes
from core.errors import InputError

FORMAT = "emlens-monitor/1"
STATE = "monitor.jsonl"
EXTRACTED_DIRECTION = "monitor_direction.safetensors"
THRESHOLD_RULE = (
    "half-way between the curve's step-0 value (the base model: a fresh LoRA is the identity, "
    "so the preference shift starts at 0) and its final value; a curve crosses at the first "
    "evaluated step where it reaches its threshold in the direction of its overall change"
)
LEAD_RULE = (
    "steps at which the preference shift crosses its threshold minus steps at which the projection "
    "crosses its own (positive: the projection moved first); resolved to the checkpoint interval"
)
PROJECTION_METHOD = (
    "mean over the probe prompts of the block output at the last token of the rendered prompt "
    "(generation prompt included), projected on the direction's unit vector at each layer"
)
PREFERENCE_METHOD = (
    "mean over the held-out pairs of [fine-tune at the checkpoint minus base] per-token log-odds "
    "of the harmful over the sound answer, teacher-forced; base computed once"
)


class MonitorError(InputError):
    """The monitor cannot start or resume; the message names the problem."""


@dataclass(frozen=True)
class MonitorConfig:
    probes: Path  # paired JSONL: its prompts are the probe set, its pairs the held-out pairs
    direction: Path | None = None  # None: extracted from the probe pairs through the final adapter
    limit: int = 32  # the first N records of the probe file
    layer: int | None = None  # None: the direction's best-separating layer
    batch_size: int = 16

    def __post_init__(self):
        if self.limit < 1:
            raise MonitorError(f"--monitor-limit: must be at least 1, got {self.limit}")
        if self.batch_size < 1:
            raise MonitorError(f"monitor batch_size: must be at least 1, got {self.batch_size}")


def state_dir(out: Path | str) -> Path:
    """Where a run's monitor keeps its points (and checkpoint weights) while it trains."""
    out = Path(out)
    return out.with_name(out.name + ".monitor")


# ---------------------------------------------------------------- curves, thresholds and the lead


def threshold(start: float, end: float) -> float | None:
    """Half-way between the step-0 value and the final value; None when the curve did not move."""
    if not (np.isfinite(start) and np.isfinite(end)) or abs(end - start) <= 1e-9 * max(1.0, abs(start), abs(end)):
        return None
    return (start + end) / 2


def crossing(steps: Sequence[int], values: Sequence[float], start: float, end: float) -> int | None:
    """The first step whose value reaches the half-way threshold in the direction from ``start`` to ``end``."""
    level = threshold(start, end)
    if level is None:
        return None
    rising = end > start
    for step, value in zip(steps, values):
        if value is not None and (value >= level if rising else value <= level):
            return int(step)
    return None


def _lead_in_words(lead: dict) -> str:
    p, b, n = lead.get("projection_crossed_at"), lead.get("behaviour_crossed_at"), lead.get("steps")
    if p is None or b is None:
        missing = " and ".join(name for name, at in (("the projection", p), ("the preference shift", b)) if at is None)
        return f"No lead: {missing} never crossed its threshold (it did not move from its step-0 value)."
    if n > 0:
        return (
            f"The projection crossed its threshold at step {p}, {n} steps before the preference shift crossed "
            f"its own (step {b}): the projection led by {n} steps."
        )
    if n < 0:
        return (
            f"The preference shift crossed its threshold at step {b}, {-n} steps before the projection "
            f"(step {p}): the projection lagged by {-n} steps."
        )
    return f"Both curves crossed their thresholds at the same checkpoint (step {p}): no lead at this resolution."


def lead(
    steps: Sequence[int],
    projection: Sequence[float],
    shift: Sequence[float],
    projection_start: float,
    shift_start: float = 0.0,
) -> dict:
    """Thresholds, crossing steps and the lead of the projection over the behaviour (see the module docstring)."""
    p_at = crossing(steps, projection, projection_start, projection[-1])
    b_at = crossing(steps, shift, shift_start, shift[-1])
    result = {
        "steps": None if p_at is None or b_at is None else b_at - p_at,
        "projection_crossed_at": p_at,
        "behaviour_crossed_at": b_at,
        "projection_threshold": threshold(projection_start, projection[-1]),
        "behaviour_threshold": threshold(shift_start, shift[-1]),
        "threshold_rule": THRESHOLD_RULE,
        "lead_rule": LEAD_RULE,
        "resolution_steps": int(np.max(np.diff(steps))) if len(steps) > 1 else None,
    }
    result["summary"] = _lead_in_words(result)
    return result


# ---------------------------------------------------------------- the state file


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(row) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_state(path: Path) -> list[dict]:
    """The rows of a monitor.jsonl; a last line cut off by a kill is dropped (and cut from the file)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    rows, kept = [], []
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        try:
            if not line.endswith("\n"):
                raise ValueError("cut off")
            rows.append(json.loads(line))
            kept.append(line)
        except ValueError:
            if number != len(text.splitlines()):
                raise MonitorError(
                    f"{path}:{number}: not a JSON line (the monitor state is corrupt; delete "
                    f"{path.parent} and train without --resume)"
                ) from None
            atomic_write(path, "".join(kept).encode())
    return rows


# ---------------------------------------------------------------- the callback


def _choose_layer(direction, layer: int | None) -> tuple[int, str]:
    from core.preference import best_layer

    if layer is not None:
        if not 0 <= layer < direction.n_layers:
            raise MonitorError(
                f"--monitor-layer {layer}: out of range; the model has layers 0..{direction.n_layers - 1}"
            )
        return layer, "given"
    try:
        return best_layer(direction), "max cross-fitted Cohen's d on the direction's own extraction answers"
    except ValueError:
        pass
    scores = [s.get("cohens_d_insample") for s in direction.stats] if direction.stats else []
    if any(d is not None for d in scores):
        return (
            int(np.nanargmax([np.nan if d is None else d for d in scores])),
            "max in-sample Cohen's d (too few groups to cross-fit)",
        )
    return direction.n_layers // 2, "the middle layer (the direction carries no statistics)"


class Monitor:
    """The ``on_checkpoint`` callback of :func:`core.training.train` that measures the two curves.

    ``computed`` lists the ``(kind, step)`` points this process computed (``"point"`` during training,
    ``"projection"`` after it, in the extract-afterwards mode): a resumed run recomputes none of the
    points its first session finished."""

    def __init__(self, config: MonitorConfig, out: Path | str):
        from core.data import dataset_hash, load_paired_jsonl
        from core.directions import Direction

        self.config = config
        self.out = Path(out)
        self.dir = state_dir(self.out)
        self.path = self.dir / STATE
        self.records = load_paired_jsonl(config.probes)[: config.limit]
        self.probes_hash = dataset_hash(config.probes)
        self.direction = Direction.load(config.direction) if config.direction is not None else None
        self.settings = sha256_bytes(
            json.dumps(
                [
                    FORMAT,
                    self.probes_hash,
                    len(self.records),
                    config.batch_size,
                    config.layer,
                    self.direction.fingerprint if self.direction is not None else None,
                ]
            ).encode()
        )[:16]
        self.computed: list[tuple[str, int]] = []
        self.rows: list[dict] = []
        self.layer: int | None = None
        self.layer_choice: str | None = None

    # -------------------------------------------------------- during training

    @property
    def extract_afterwards(self) -> bool:
        return self.config.direction is None

    def _pair(self, event):
        from core.models import ModelPair, Source

        adapter = Source(str(self.out), "adapter", str(self.out), f"training-step-{event.step}")
        return ModelPair(event.model, event.tokenizer, event.base_source, adapter)

    def _open(self, event) -> None:
        config = event.model.config
        if self.direction is not None:
            from core.directions import DirectionError

            try:
                self.direction.check_fits(config.num_hidden_layers, config.hidden_size, "the model being trained")
            except DirectionError as err:
                raise MonitorError(f"--monitor-direction {self.config.direction}: {err}") from None
            self.layer, self.layer_choice = _choose_layer(self.direction, self.config.layer)
        elif self.config.layer is not None and not 0 <= self.config.layer < config.num_hidden_layers:
            raise MonitorError(
                f"--monitor-layer {self.config.layer}: out of range; the model has layers "
                f"0..{config.num_hidden_layers - 1}"
            )
        header = {
            "kind": "header",
            "format": FORMAT,
            "run": event.run,
            "settings": self.settings,
            "probes": str(self.config.probes),
            "probes_sha256": self.probes_hash,
            "n": len(self.records),
            "direction": str(self.config.direction) if self.direction is not None else None,
            "started_at_step": event.step,
        }
        if event.step == 0:  # a fresh run: whatever an earlier run left is stale
            shutil.rmtree(self.dir, ignore_errors=True)
        rows = read_state(self.path)
        if rows:
            first = rows[0]
            if first.get("run") != event.run or first.get("settings") != self.settings:
                what = "another run" if first.get("run") != event.run else "other probes or monitor settings"
                raise MonitorError(
                    f"{self.path}: the monitor state belongs to {what}; delete {self.dir} or train without --resume"
                )
            # Points past the restored checkpoint cannot exist in order, but would be redone anyway.
            stale = [r for r in rows if r.get("kind") == "point" and r["step"] > event.step]
            if stale:
                rows = [r for r in rows if not (r.get("kind") == "point" and r["step"] > event.step)]
                atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in rows).encode())
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            _append(self.path, header)
            rows = [header]
        self.rows = rows

    def _base_log_odds(self, pair) -> np.ndarray:
        from core.preference import log_odds

        for row in self.rows:
            if row.get("kind") == "base":
                return np.asarray(row["log_odds"])
        started = time.perf_counter()
        values = log_odds(pair, "base", self.records, self.config.batch_size)
        row = {"kind": "base", "log_odds": values.tolist(), "seconds": round(time.perf_counter() - started, 4)}
        _append(self.path, row)
        self.rows.append(row)
        return values

    def _projection(self, pair) -> list[float]:
        from core.projections import last_token_activations, project

        activations = last_token_activations(
            pair, "finetuned", [r.messages for r in self.records], self.config.batch_size
        )
        return project(activations, self.direction).mean(0).tolist()

    def done(self, kind: str = "point") -> set[int]:
        return {r["step"] for r in self.rows if r.get("kind") == kind}

    def __call__(self, event) -> None:
        from core.preference import log_odds

        if event.starting:
            self._open(event)
        if event.step in self.done():
            return
        pair = self._pair(event)
        base = self._base_log_odds(pair)
        started = time.perf_counter()
        shift = log_odds(pair, "finetuned", self.records, self.config.batch_size) - base
        row = {
            "kind": "point",
            "step": event.step,
            "preference_shift": float(shift.mean()),
            "shift_sem": float(shift.std(ddof=1) / np.sqrt(len(shift))) if len(shift) > 1 else None,
            "shift_per_pair": shift.tolist(),
            "projection": None,
        }
        if self.extract_afterwards:
            from safetensors.torch import save_file

            weights = self.dir / "weights"
            weights.mkdir(exist_ok=True)
            state = {
                n: p.detach().float().cpu().contiguous() for n, p in event.model.named_parameters() if p.requires_grad
            }
            target = weights / f"step-{event.step:06d}.safetensors"
            save_file(state, weights / (target.name + ".partial"))
            os.replace(weights / (target.name + ".partial"), target)
            row["weights"] = str(target.relative_to(self.dir))
        else:
            row["projection"] = self._projection(pair)
        row["seconds"] = round(time.perf_counter() - started, 4)
        _append(self.path, row)
        self.rows.append(row)
        self.computed.append(("point", event.step))

    # -------------------------------------------------------- after training

    def _extract_and_project(self, base: str, options, progress) -> None:
        """The paired direction through the final adapter, then the projection of every saved checkpoint."""
        from safetensors.torch import load_file

        from core.directions import Direction, Example, extract_contrast
        from core.models import load_pair

        pair = load_pair(base, str(self.out), options)
        saved = self.out / EXTRACTED_DIRECTION
        if saved.exists():  # a finish that was cut short already extracted it
            direction = Direction.load(saved)
        else:
            started = time.perf_counter()
            direction = extract_contrast(
                pair,
                [Example(r.messages, r.aligned) for r in self.records],
                [Example(r.messages, r.misaligned) for r in self.records],
                "paired",
                self.probes_hash,
                side="finetuned",
                batch_size=self.config.batch_size,
            )
            direction.provenance.update(
                {
                    "dataset": str(self.config.probes),
                    "split": "all",
                    "records": f"the first {len(self.records)} of the file",
                    "made_by": "training monitor, after training",
                    "seconds": round(time.perf_counter() - started, 3),
                }
            )
            direction.save(saved)
        self.direction = direction
        self.layer, self.layer_choice = _choose_layer(direction, self.config.layer)
        parameters = dict(pair.model.named_parameters())
        done = {
            r["step"] for r in self.rows if r.get("kind") == "projection" and r["direction"] == direction.fingerprint
        }
        todo = [r for r in self.rows if r.get("kind") == "point" and r["step"] not in done]
        for i, point in enumerate(todo):
            started = time.perf_counter()
            state = load_file(self.dir / point["weights"])
            missing = [n for n in state if n not in parameters]
            if missing:
                raise MonitorError(
                    f"{self.dir / point['weights']}: {missing[0]} is not a parameter of the final "
                    "adapter (the checkpoint weights belong to another run?)"
                )
            with torch.no_grad():
                for name, value in state.items():
                    parameters[name].copy_(value)
            row = {
                "kind": "projection",
                "step": point["step"],
                "direction": direction.fingerprint,
                "projection": self._projection(pair),
                "seconds": round(time.perf_counter() - started, 4),
            }
            _append(self.path, row)
            self.rows.append(row)
            self.computed.append(("projection", point["step"]))
            if progress:
                progress(i + 1, len(todo))

    def finish(self, result, base: str, options=None, progress: Callable[[int, int], None] | None = None) -> dict:
        """After :func:`core.training.train` returned ``result``: complete the curves (extracting the direction
        first in that mode), write the card's ``monitor`` section and ``monitor.jsonl`` beside the adapter,
        and remove the state folder. Returns the section."""
        if not self.rows:
            self.rows = read_state(self.path)
        if not self.rows:
            raise MonitorError(f"{self.path}: no monitor points; pass the monitor to train(on_checkpoint=...)")
        started = time.perf_counter()
        if self.extract_afterwards:
            self._extract_and_project(base, options, progress)
        section = self.section(after_seconds=time.perf_counter() - started if self.extract_afterwards else None)
        shutil.copyfile(self.path, self.out / STATE)
        card_path = Path(result.out) / "training_card.json"
        card = json.loads(card_path.read_text(encoding="utf-8"))
        card["monitor"] = section
        atomic_write(card_path, json.dumps(card, indent=2).encode())
        result.card["monitor"] = section
        shutil.rmtree(self.dir, ignore_errors=True)
        return section

    def section(self, after_seconds: float | None = None) -> dict:
        """The training card's ``monitor`` section from the points made so far."""
        points = sorted((r for r in self.rows if r.get("kind") == "point"), key=lambda r: r["step"])
        if self.extract_afterwards:
            by_step = {
                r["step"]: r["projection"]
                for r in self.rows
                if r.get("kind") == "projection" and r["direction"] == self.direction.fingerprint
            }
        else:
            by_step = {r["step"]: r["projection"] for r in points}
        steps = [r["step"] for r in points]
        per_layer = [by_step[s] for s in steps]
        values = [layer_values[self.layer] for layer_values in per_layer]
        calibrated = self.direction.calibrate(np.asarray(per_layer))
        shift = [r["preference_shift"] for r in points]
        base = next(r for r in self.rows if r.get("kind") == "base")
        header = self.rows[0]
        if self.extract_afterwards:
            direction_info = {
                "mode": "extracted after training",
                "file": EXTRACTED_DIRECTION,
                "how": "paired contrast (misaligned minus aligned answer-token means) of the probe "
                "file's pairs, teacher-forced through the final adapter; applied to the "
                "trainable weights saved at every checkpoint",
            }
        else:
            direction_info = {"mode": "given", "file": str(self.config.direction)}
        direction_info.update({"fingerprint": self.direction.fingerprint, "provenance": self.direction.provenance})
        projection_start = values[0]
        section = {
            "format": FORMAT,
            "steps": steps,
            "first_step_note": None
            if steps and steps[0] == 0
            else f"the curve starts at step {steps[0] if steps else None}: the run was resumed from a checkpoint "
            "made without the monitor",
            "probes": {
                "file": str(self.config.probes),
                "sha256": self.probes_hash,
                "n": len(self.records),
                "limit": self.config.limit,
                "selection": "the first records of the file, in file order, "
                "whatever their split: prompts = probe set, "
                "pairs = held-out pairs",
            },
            "projection": {
                "values": values,
                "calibrated": None
                if calibrated is None
                else [None if not np.isfinite(v) else float(v) for v in calibrated[:, self.layer]],
                "layer": self.layer,
                "layer_choice": self.layer_choice,
                "per_layer": per_layer,
                "method": PROJECTION_METHOD,
                "direction": direction_info,
                "start": projection_start,
                "threshold": threshold(projection_start, values[-1]) if values else None,
            },
            "preference_shift": {
                "values": shift,
                "sem": [r["shift_sem"] for r in points],
                "base_log_odds_mean": float(np.mean(base["log_odds"])),
                "method": PREFERENCE_METHOD,
                "start": 0.0,
                "threshold": threshold(0.0, shift[-1]) if shift else None,
            },
            "cost": {
                "seconds_per_checkpoint": [r["seconds"] for r in points],
                "mean_seconds_per_checkpoint": float(np.mean([r["seconds"] for r in points])) if points else None,
                "base_seconds": base["seconds"],
                "after_training_seconds": None if after_seconds is None else round(after_seconds, 3),
                "per_checkpoint": (
                    f"{len(self.records)} prompts to the last token + {2 * len(self.records)} "
                    "teacher-forced answers"
                    + ("" if not self.extract_afterwards else "; the trainable weights saved, projected after training")
                ),
            },
            "started_at_step": header.get("started_at_step"),
            "code_version": __version__,
        }
        section["lead"] = lead(steps, values, shift, projection_start, 0.0) if steps else None
        section["projection"]["crossed_at"] = section["lead"]["projection_crossed_at"] if steps else None
        section["preference_shift"]["crossed_at"] = section["lead"]["behaviour_crossed_at"] if steps else None
        return section


# ---------------------------------------------------------------- training with the monitor


def train_monitored(
    base: str,
    records,
    config,
    out: Path | str,
    monitor: MonitorConfig,
    *,
    dataset_hash: str,
    options=None,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    finish_progress: Callable[[int, int], None] | None = None,
):
    """:func:`core.training.train` with a :class:`Monitor` at every checkpoint, finished into the card."""
    from core.training import train

    watcher = Monitor(monitor, out)
    result = train(
        base,
        records,
        config,
        out,
        dataset_hash=dataset_hash,
        options=options,
        resume=resume,
        force=force,
        progress=progress,
        on_checkpoint=watcher,
    )
    watcher.finish(result, base, options, finish_progress)
    return result


# ---------------------------------------------------------------- reading cards (dashboard)


def load_training_card(path: Path | str) -> dict:
    """A training card from an adapter directory or a ``training_card.json``; ValueError naming the problem."""
    path = Path(path)
    card_path = path / "training_card.json" if path.is_dir() else path
    if not card_path.exists():
        raise MonitorError(f"{path}: no training_card.json (not an adapter trained by EM Lens?)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MonitorError(f"{card_path}: cannot be read as JSON: {err}") from None
    if not isinstance(card, dict):
        raise MonitorError(f"{card_path}: expected a JSON object")
    return card


def check_section(section) -> dict:
    """The card's monitor section, checked enough to plot; ValueError naming what is missing."""
    if not isinstance(section, dict) or section.get("format") != FORMAT:
        raise MonitorError("the card's monitor section is missing or of another format")
    for key, fields in (
        ("projection", ("values", "threshold", "layer")),
        ("preference_shift", ("values", "threshold")),
        ("lead", ("summary",)),
    ):
        if not isinstance(section.get(key), dict) or any(f not in section[key] for f in fields):
            raise MonitorError(f"the card's monitor section: {key}: expected an object with {', '.join(fields)}")
    n = len(section.get("steps") or [])
    if not n or len(section["projection"]["values"]) != n or len(section["preference_shift"]["values"]) != n:
        raise MonitorError("the card's monitor section: steps and curves differ in length")
    return section


def find_training_cards(roots: Iterable[Path | str], depth: int = 2) -> list[Path]:
    """Adapter directories holding a training card under ``roots`` (each root itself included), those
    with monitor curves first, then by name."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for level in range(depth + 1):
            for card in root.glob("/".join(["*"] * level + ["training_card.json"])):
                if ".partial" not in card.parent.name:
                    found.add(card.parent)

    def has_monitor(directory: Path) -> bool:
        try:
            return "monitor" in load_training_card(directory)
        except ValueError:
            return False

    return sorted(found, key=lambda d: (not has_monitor(d), str(d)))
