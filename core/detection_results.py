"""The early-detection report (built by :func:`core.detect.detection_report`): its fields, its JSON
file (format ``emlens-detect/3``, whose keys the README lists) and where the cache keeps it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import InputError
from core.typed_json import JsonRecord, absent_when_none, read_json, write_json

if TYPE_CHECKING:
    from core.directions import Direction

FORMAT = "emlens-detect/3"


class DetectionError(InputError):
    """A detection run cannot be made from what was given (too few classes, draws or pairs; an old report)."""


@dataclass(frozen=True)
class GroupCounts(JsonRecord):
    selection: int
    report: int


@dataclass(frozen=True)
class LayerAuroc(JsonRecord):
    """One layer of the selection set's curve."""

    layer: int
    auroc: float
    ci95: list[float]  # grouped bootstrap, unadjusted for the number of layers
    spearman: float | None  # with the labels' continuous score; None without one


@dataclass(frozen=True)
class ChosenLayer(JsonRecord):
    """The last-token projection's layer, chosen on the selection set and reported on the report set."""

    layer: int
    selection_auroc: float
    report_auroc: float
    report_ci: list[float]
    n_select: int
    n_report: int


@dataclass(frozen=True, kw_only=True)
class Predictor(JsonRecord):
    """One predictor's AUROC on the report set; ``what`` says what it is."""

    auroc: float
    ci95: list[float]
    layer: int | None = absent_when_none()  # a per-layer predictor's layer, chosen on the selection set
    selection_auroc: float | None = absent_when_none()  # where a choice was made on the selection set
    orientation: str
    what: str


@dataclass(frozen=True)
class RandomNull(JsonRecord):
    """Where the direction's report-set AUROC falls among random directions at its layer."""

    n: int
    percentile: float
    quantiles: dict[str, float]  # "2.5", "50", "97.5"
    method: str


@dataclass(frozen=True)
class Roc(JsonRecord):
    fpr: list[float]
    tpr: list[float]
    layer: int


@dataclass(frozen=True)
class PromptRisk(JsonRecord):
    """One prompt: its label and what it came from, its risk at the chosen layer, and its set."""

    id: str
    group: str
    prompt: str
    misaligned: bool  # the binary label
    score: float | None  # what the label was derived from, when continuous
    risk: float  # projection on the unit direction at the chosen layer, last prompt token
    risk_calibrated: float | None  # 0 = aligned mean, 1 = misaligned mean of the direction's sets
    split: str  # "selection" or "report"
    answers: list[dict]  # the answers behind the label


@dataclass(kw_only=True)
class DetectionReport(JsonRecord):
    """Does a prompt-stage score predict misalignment? Groups never split; every figure out of sample."""

    split_unit: str
    n_prompts: int
    n_misaligned: int
    n_groups: GroupCounts
    warnings: list[str]
    per_layer: list[LayerAuroc]
    per_layer_set: str
    per_layer_ci: str
    chosen: ChosenLayer
    predictors: dict[str, Predictor]  # "last_token" first
    random_null: RandomNull
    roc: Roc
    prompts: list[PromptRisk]  # riskiest first
    direction: dict  # the direction's provenance
    protocol: str
    control: dict | None = absent_when_none()  # the topic-control direction's provenance
    transfer: dict | None = absent_when_none()  # set sizes and families when chosen on another family
    labels: dict  # how the prompts were labelled (core.detect.labelled_prompts)

    def to_json(self) -> dict:
        return {"format": FORMAT, **super().to_json()}

    @classmethod
    def from_json(cls, value, where: str | None = None) -> DetectionReport:
        where = where or "detection report"
        if isinstance(value, dict) and value.get("format") != FORMAT:
            written = value.get("format") or "an unversioned format, with in-sample and ungrouped statistics"
            raise DetectionError(
                f"{where}: written by an older EM Lens ({written}; this one reads {FORMAT}); "
                "rerun `python -m core detect` (or Run detection below) to replace it"
            )
        return super().from_json(value, where)


def reports_dir(cache_root) -> Path:
    """Where `python -m core detect` and the dashboard keep detection reports."""
    return Path(cache_root) / "detect"


def report_path(cache_root, source, direction: Direction) -> Path:
    """``<cache>/detect/<source stem>-<direction fingerprint>.json``, the CLI's default name."""
    return reports_dir(cache_root) / f"{Path(source).stem}-{direction.fingerprint}.json"


def list_reports(cache_root) -> list[Path]:
    """Detection report files under the cache, newest first (unreadable ones included: loading says why)."""
    found = [p for p in reports_dir(cache_root).glob("*.json") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def load_report(path) -> DetectionReport:
    """A detection report; ValueError naming the file and the problem when it is missing, unreadable,
    incomplete or written by an older version (in-sample, ungrouped statistics)."""
    return DetectionReport.from_json(read_json(path, "detection report"), f"detection report {path}")


def save_report(report: DetectionReport, path) -> Path:
    """Write a report atomically (a reader never sees half a file)."""
    return write_json(path, report.to_json())
