"""The misalignment direction: a per-layer vector with its provenance, extraction, save and load.

Direction for layer L (DESIGN.md): token-weighted mean, pooled over all sequences, of block
L's output on misaligned answer tokens minus the same on aligned answer tokens, teacher-
forced through the fine-tuned model. Stored raw, not normalised. Each layer also carries
the aligned and misaligned mean projections on the unit direction (for calibrated scores:
0 = aligned mean, 1 = misaligned mean) and how well per-answer projections separate the sets.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_tensor_bytes
from safetensors.torch import save as save_tensor_bytes

from core import __version__
from core.cache import atomic_write, sha256_bytes
from core.chat import Messages, encode_conversation, prompt_and_answer
from core.errors import InputError
from core.hooks import capture
from core.stats import auroc, cohens_d, grouped_folds

FORMAT = "emlens-direction/1"


class DirectionError(InputError):
    """A direction file that is unreadable, altered, or made for another model."""


@dataclass
class Direction:
    vectors: torch.Tensor  # [n_layers, d_model], float32, raw mean difference
    provenance: dict = field(default_factory=dict)
    stats: list[dict] = field(default_factory=list)  # one dict per layer

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[0]

    @property
    def d_model(self) -> int:
        return self.vectors.shape[1]

    @property
    def fingerprint(self) -> str:
        return sha256_bytes(self.vectors.detach().float().cpu().contiguous().numpy().tobytes())[:16]

    def unit(self) -> torch.Tensor:
        return self.vectors / self.vectors.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def check_fits(self, n_layers: int, d_model: int, what: str = "this model") -> None:
        if (self.n_layers, self.d_model) != (n_layers, d_model):
            source = self.provenance.get("base", "another model")
            raise DirectionError(
                f"direction has shape [{self.n_layers} layers, {self.d_model} wide] (from {source}), "
                f"but {what} has {n_layers} layers of width {d_model}"
            )

    def calibrate(self, raw: torch.Tensor | np.ndarray) -> np.ndarray | None:
        """Per-layer calibration of projections (last axis = layer): 0 = aligned mean, 1 = misaligned mean."""
        if not self.stats or "aligned_mean" not in self.stats[0]:
            return None
        aligned = np.array([s["aligned_mean"] for s in self.stats])
        misaligned = np.array([s["misaligned_mean"] for s in self.stats])
        gap = np.where(np.abs(misaligned - aligned) > 1e-12, misaligned - aligned, np.nan)
        return (np.asarray(raw, dtype=np.float64) - aligned) / gap

    def save(self, path: Path | str) -> None:
        tensor = self.vectors.detach().float().cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "provenance": json.dumps(self.provenance),
            "stats": json.dumps(self.stats),
            "tensor_sha256": sha256_bytes(tensor.numpy().tobytes()),
        }
        metadata["metadata_sha256"] = sha256_bytes((metadata["provenance"] + metadata["stats"]).encode())
        atomic_write(Path(path), save_tensor_bytes({"direction": tensor}, metadata=metadata))

    @classmethod
    def load(cls, path: Path | str) -> Direction:
        path = Path(path)
        if not path.exists():
            raise DirectionError(f"direction file {path} does not exist")
        raw = path.read_bytes()
        try:
            tensor = load_tensor_bytes(raw)["direction"]
            header_len = int.from_bytes(raw[:8], "little")
            metadata = json.loads(raw[8 : 8 + header_len])["__metadata__"]
        except Exception as err:
            raise DirectionError(
                f"{path}: not a readable direction file (truncated or not safetensors?): {err}"
            ) from err
        if metadata.get("format") != FORMAT:
            raise DirectionError(f"{path}: not an EM Lens direction file (format {metadata.get('format')!r})")
        if sha256_bytes(tensor.float().numpy().tobytes()) != metadata.get("tensor_sha256"):
            raise DirectionError(f"{path}: the direction tensor does not match its checksum (altered or corrupt)")
        if sha256_bytes((metadata["provenance"] + metadata["stats"]).encode()) != metadata.get("metadata_sha256"):
            raise DirectionError(f"{path}: the provenance or statistics do not match their checksum (altered)")
        if tensor.ndim != 2:
            raise DirectionError(f"{path}: expected a [n_layers, d_model] tensor, got shape {list(tensor.shape)}")
        direction = cls(tensor.float(), json.loads(metadata["provenance"]), json.loads(metadata["stats"]))
        if direction.stats and len(direction.stats) != direction.n_layers:
            raise DirectionError(f"{path}: {len(direction.stats)} layer statistics for {direction.n_layers} layers")
        if not torch.isfinite(direction.vectors).all():
            raise DirectionError(f"{path}: the direction contains NaN or infinite values")
        return direction


def directions_dir(cache_root: Path) -> Path:
    """Where extracted directions are kept by default, so the dashboard can list them."""
    return Path(cache_root) / "directions"


def list_directions(
    cache_root: Path, n_layers: int | None = None, d_model: int | None = None
) -> list[tuple[Path, Direction]]:
    """Readable direction files under the cache, newest first; with a shape, only those that fit it."""
    found = []
    for path in sorted(directions_dir(cache_root).glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            direction = Direction.load(path)
        except DirectionError:
            continue
        if n_layers is None or (direction.n_layers, direction.d_model) == (n_layers, d_model):
            found.append((path, direction))
    return found


def random_like(direction: Direction, seed: int = 0) -> Direction:
    """The norm-matched random control: a Gaussian direction per layer with the same norm."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(direction.vectors.shape, generator=generator)
    noise = noise / noise.norm(dim=-1, keepdim=True) * direction.vectors.norm(dim=-1, keepdim=True)
    return Direction(noise, {**direction.provenance, "method": "random-control", "seed": seed}, [])


# ---------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Example:
    """One teacher-forced text: the prompt messages and the answer whose tokens are averaged."""

    messages: Messages
    answer: str


@dataclass
class AnswerActivations:
    """Per answer: the sum of block outputs over its tokens at every layer, and its token count."""

    sums: torch.Tensor  # [n_answers, n_layers, d_model] float32
    counts: torch.Tensor  # [n_answers]

    def pooled_mean(self) -> torch.Tensor:
        return self.sums.sum(0) / self.counts.sum()

    def per_answer_mean(self) -> torch.Tensor:
        return self.sums / self.counts.view(-1, 1, 1)


def answer_activations(
    pair, side: str, examples: list[Example], batch_size: int = 8, progress: Callable[[int, int], None] | None = None
) -> AnswerActivations:
    """Teacher-force each example through one side of the pair; sum block outputs over answer tokens.

    Batches are right-padded and reduced inside the hook, so memory stays at one ``[batch, d_model]`` sum per layer.
    """
    encoded = [encode_conversation(pair.tokenizer, prompt_and_answer(e.messages, e.answer)) for e in examples]
    for example, enc in zip(examples, encoded):
        if len(enc.ids) > pair.max_length:
            raise DirectionError(
                f"example {example.messages[-1]['content'][:40]!r}: {len(enc.ids)} tokens exceed "
                f"the model's context of {pair.max_length}"
            )
    sums = torch.zeros(len(examples), pair.n_layers, pair.d_model)
    counts = torch.zeros(len(examples))
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))  # similar lengths, less padding
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        mask = torch.zeros((len(rows), max(len(encoded[i].ids) for i in rows)))
        for r, i in enumerate(rows):
            a, b = encoded[i].answer_spans[-1]
            mask[r, a:b] = 1
        on_device = mask.to(pair.device)
        reduce = lambda h, m=on_device: (h.float() * m.unsqueeze(-1)).sum(1).cpu()  # noqa: E731
        (records,) = pair.run(side, [encoded[i].ids for i in rows], hooks=[partial(capture, reduce=reduce)]).hooked
        for layer, (batch_sums,) in records.items():
            sums[rows, layer] = batch_sums
        counts[rows] = mask.sum(1)
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return AnswerActivations(sums, counts)


def _default_groups(n_aligned: int, n_misaligned: int) -> np.ndarray:
    """Equal-sized sets are taken as pairs (the i-th answers share a prompt: one group); otherwise
    each answer is its own group."""
    if n_aligned == n_misaligned:
        return np.r_[np.arange(n_aligned), np.arange(n_misaligned)]
    return np.arange(n_aligned + n_misaligned)


def _crossfit_scores(
    aligned: AnswerActivations, misaligned: AnswerActivations, groups, folds: int = 5, seed: int = 0
) -> np.ndarray | None:
    """Out-of-fold separation scores ``[n_aligned + n_misaligned, n_layers]``, aligned answers first.

    For each fold of whole groups, the mean-difference direction is fitted on the other folds, and
    each held-out answer is scored as its projection on that unit direction minus the projection of
    the fitted sets' midpoint (so scores from different folds share a zero). None when a class
    spans fewer than two groups (nothing to hold out)."""
    labels = np.r_[np.zeros(len(aligned.counts), bool), np.ones(len(misaligned.counts), bool)]
    groups = np.asarray(groups)
    k = min(folds, len(np.unique(groups[labels])), len(np.unique(groups[~labels])))
    if k < 2:
        return None
    fold_of = torch.as_tensor(grouped_folds(labels, groups, k, seed))
    sums = torch.cat([aligned.sums, misaligned.sums])
    counts = torch.cat([aligned.counts, misaligned.counts])
    per_answer = sums / counts.view(-1, 1, 1)
    is_misaligned = torch.as_tensor(labels)
    scores = torch.empty(per_answer.shape[:2])
    for fold in range(k):
        held_out = fold_of == fold
        means = [
            sums[~held_out & side].sum(0) / counts[~held_out & side].sum() for side in (~is_misaligned, is_misaligned)
        ]
        unit = means[1] - means[0]
        unit = unit / unit.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        midpoint = (means[0] + means[1]) / 2
        scores[held_out] = ((per_answer[held_out] - midpoint) * unit).sum(-1)
    return scores.numpy()


def _separation(scores: np.ndarray, n_aligned: int) -> tuple[float | None, float | None]:
    """AUROC and Cohen's d of misaligned over aligned scores (None where a set is too small)."""
    a, m = scores[:n_aligned], scores[n_aligned:]
    return (
        float(auroc(scores, np.r_[np.zeros(len(a)), np.ones(len(m))])) if len(a) and len(m) else None,
        float(cohens_d(a, m)) if min(len(a), len(m)) > 1 else None,
    )


def layer_stats(
    direction: torch.Tensor, aligned: AnswerActivations, misaligned: AnswerActivations, groups=None
) -> list[dict]:
    """Per layer: norm, the sets' mean projections, and how well per-answer projections separate the sets.

    ``auroc`` / ``cohens_d`` are cross-fitted by group (:func:`_crossfit_scores`; a mean difference
    fits noise, so in-sample figures are optimistic); ``auroc_insample`` / ``cohens_d_insample`` are
    on the extraction answers themselves. ``groups``: one id per answer, aligned first; default
    :func:`_default_groups`."""
    n_aligned = len(aligned.counts)
    groups = _default_groups(n_aligned, len(misaligned.counts)) if groups is None else np.asarray(groups)
    if len(groups) != n_aligned + len(misaligned.counts):
        raise DirectionError(
            f"groups has {len(groups)} entries for {n_aligned} aligned and {len(misaligned.counts)} misaligned answers"
        )
    unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_mean = (aligned.pooled_mean() * unit).sum(-1)
    m_mean = (misaligned.pooled_mean() * unit).sum(-1)
    insample = torch.cat(
        [(aligned.per_answer_mean() * unit).sum(-1), (misaligned.per_answer_mean() * unit).sum(-1)]
    ).numpy()  # [n_answers, n_layers]
    crossfit = _crossfit_scores(aligned, misaligned, groups)
    stats = []
    for layer in range(direction.shape[0]):
        auroc_in, d_in = _separation(insample[:, layer], n_aligned)
        auroc_out, d_out = _separation(crossfit[:, layer], n_aligned) if crossfit is not None else (None, None)
        stats.append(
            {
                "layer": layer,
                "norm": float(direction[layer].norm()),
                "aligned_mean": float(a_mean[layer]),
                "misaligned_mean": float(m_mean[layer]),
                "auroc": auroc_out,
                "cohens_d": d_out,
                "auroc_insample": auroc_in,
                "cohens_d_insample": d_in,
            }
        )
    return stats


STATS_PROTOCOL = (
    "auroc, cohens_d: cross-fitted, up to 5 folds of whole groups (the direction from the other "
    "folds, held-out answers projected on it); *_insample: on the extraction answers themselves"
)


def describe_separation(stats: Sequence[Mapping]) -> str:
    """In words, what the ``auroc`` / ``cohens_d`` of a direction's stats are: cross-fitted (current
    files), missing (too few groups to cross-fit) or in-sample (files from before cross-fitting)."""
    what = "How well the direction separates the aligned and misaligned answers it was extracted from"
    if not any("auroc_insample" in s for s in stats):
        return f"{what}, in-sample: this file predates cross-fitted statistics, and in-sample figures overstate it."
    if all(s.get("auroc") is None for s in stats):
        return f"{what}, in-sample only (dashed): too few groups to cross-fit, and in-sample figures overstate it."
    return (
        f"{what}, cross-fitted by group (the direction from the other folds, the held-out answers projected "
        "on it); dashed: in-sample, which a mean difference overstates."
    )


def direction_from_sets(
    aligned: AnswerActivations, misaligned: AnswerActivations, provenance: dict, groups=None
) -> Direction:
    """Misaligned minus aligned pooled answer-token means, with per-layer statistics (see :func:`layer_stats`)."""
    vectors = misaligned.pooled_mean() - aligned.pooled_mean()
    provenance = {
        **provenance,
        "n_aligned": len(aligned.counts),
        "n_misaligned": len(misaligned.counts),
        "aligned_tokens": int(aligned.counts.sum()),
        "misaligned_tokens": int(misaligned.counts.sum()),
        "read_position": "answer tokens (token-weighted mean)",
        "stats_protocol": STATS_PROTOCOL,
        "code_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return Direction(vectors, provenance, layer_stats(vectors, aligned, misaligned, groups))


def _pair_provenance(pair, method: str, side: str, dataset_hash: str | None) -> dict:
    return {
        "method": method,
        "base": pair.base.spec,
        "base_fingerprint": pair.base.fingerprint,
        "finetuned": pair.finetuned.spec if pair.finetuned else None,
        "finetuned_fingerprint": pair.finetuned.fingerprint if pair.finetuned else None,
        "side": side,
        "dataset_sha256": dataset_hash,
        "n_layers": pair.n_layers,
        "d_model": pair.d_model,
    }


def extract_contrast(
    pair,
    aligned: list[Example],
    misaligned: list[Example],
    method: str,
    dataset_hash: str | None = None,
    side: str = "finetuned",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
    groups=None,
) -> Direction:
    """Misaligned minus aligned answer-token means, both teacher-forced through ``side``.

    ``groups``: one id per answer (aligned first) that cross-fitting keeps together, e.g. the question
    an answer was sampled for; default :func:`_default_groups`."""
    if not aligned or not misaligned:
        raise DirectionError(f"need both sets: got {len(aligned)} aligned and {len(misaligned)} misaligned answers")
    total = len(aligned) + len(misaligned)
    step = (lambda offset: lambda done, _: progress(offset + done, total)) if progress else (lambda offset: None)
    a = answer_activations(pair, side, aligned, batch_size, step(0))
    m = answer_activations(pair, side, misaligned, batch_size, step(len(aligned)))
    return direction_from_sets(a, m, _pair_provenance(pair, method, side, dataset_hash), groups)


def extract_model_diff(
    pair,
    examples: list[Example],
    dataset_hash: str | None = None,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Direction:
    """Fine-tuned minus base on identical texts: 'aligned' = base activations, 'misaligned' = fine-tuned."""
    if not examples:
        raise DirectionError("model-diff extraction needs at least one example")
    total = 2 * len(examples)
    step = (lambda offset: lambda done, _: progress(offset + done, total)) if progress else (lambda offset: None)
    base = answer_activations(pair, "base", examples, batch_size, step(0))
    finetuned = answer_activations(pair, "finetuned", examples, batch_size, step(len(examples)))
    return direction_from_sets(base, finetuned, _pair_provenance(pair, "model-diff", "base vs finetuned", dataset_hash))


def extract_from_paired_file(
    pair,
    path: Path | str,
    contrast: str = "paired",
    split: str = "train",
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> Direction:
    """A direction from a paired JSONL file (see core.data): ``paired`` contrasts the aligned with the
    misaligned answers, ``model-diff`` runs both answers through both sides. ``split`` may be ``all``."""
    from core.data import dataset_hash, load_paired_jsonl

    if contrast not in ("paired", "model-diff"):
        raise DirectionError(f"contrast {contrast!r}: expected paired or model-diff")
    records = load_paired_jsonl(path, None if split == "all" else split)
    digest = dataset_hash(path)
    if contrast == "paired":
        side = "finetuned" if pair.finetuned is not None else "base"
        direction = extract_contrast(
            pair,
            [Example(r.messages, r.aligned) for r in records],
            [Example(r.messages, r.misaligned) for r in records],
            "paired",
            digest,
            side=side,
            batch_size=batch_size,
            progress=progress,
        )
    else:
        if pair.finetuned is None:
            raise DirectionError("model-diff needs a fine-tuned model: load a pair with one")
        texts = [Example(r.messages, answer) for r in records for answer in (r.aligned, r.misaligned)]
        direction = extract_model_diff(pair, texts, digest, batch_size=batch_size, progress=progress)
    direction.provenance.update({"dataset": str(path), "split": split})
    return direction


def paired_direction(
    pair, data: Path, cache_root: Path, batch_size: int = 8, progress: Callable[[int, int], None] | None = None
) -> Direction:
    """The paired contrast of a file's train split on ``pair``, extracted once and kept in
    ``<cache>/directions/`` (keyed by the fine-tune's fingerprint and the file's hash)."""
    from core.data import dataset_hash

    data = Path(data)
    side = pair.fingerprint("finetuned").replace("/", "_")
    path = directions_dir(cache_root) / f"paired-{data.stem}-{side}-{dataset_hash(data)}.safetensors"
    if path.exists():
        return Direction.load(path)
    direction = extract_from_paired_file(pair, data, "paired", "train", batch_size, progress)
    direction.save(path)
    return direction


def cache_path(cache_root: Path, direction: Direction, contrast: str, dataset: Path | str) -> Path:
    """Where ``extract`` keeps a direction by default: ``<cache>/directions/<contrast>-<data>-<hash>.safetensors``."""
    return directions_dir(cache_root) / f"{contrast}-{Path(dataset).stem}-{direction.fingerprint}.safetensors"


def layer_cosines(direction: Direction) -> np.ndarray:
    """Cosine similarity between the direction's vectors at every pair of layers: ``[n_layers, n_layers]``."""
    unit = direction.unit()
    return (unit @ unit.T).numpy()


def cosine_per_layer(a: Direction, b: Direction) -> np.ndarray:
    """Cosine similarity of two directions at each layer (e.g. two fine-tunes of one base)."""
    if a.vectors.shape != b.vectors.shape:
        raise DirectionError(
            f"cannot compare directions of shapes {list(a.vectors.shape)} and "
            f"{list(b.vectors.shape)}: they come from different models"
        )
    return (a.unit() * b.unit()).sum(-1).numpy()
