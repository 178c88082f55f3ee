"""The anchors of calibrated projections: at each layer, the mean projection of the direction's own
aligned answers (0 on the calibrated scale) and of its misaligned answers (1).

They are the direction's per-layer statistics; a direction without them (a random control) has raw
projections only. ``Direction.calibrate`` maps raw projections onto the scale they anchor.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from core.directions import Direction


def has_anchors(direction: Direction) -> bool:
    """Whether the direction's projections can be calibrated."""
    return bool(direction.stats) and "aligned_mean" in direction.stats[0]


def anchors(direction: Direction, layer: int) -> tuple[float, float] | None:
    """``(aligned mean, misaligned mean)`` of the direction's own answers at ``layer``, or None without them."""
    if not has_anchors(direction):
        return None
    stats = direction.stats[layer]
    return float(stats["aligned_mean"]), float(stats["misaligned_mean"])


def colour_range(values: Sequence[float], layer_anchors: tuple[float, float] | None) -> tuple[float, float]:
    """The ends of a colour scale for raw projections at one layer: the anchors (aligned, misaligned) when
    known, else ± the largest magnitude among ``values``, so that 0 sits in the middle."""
    if layer_anchors is not None:
        return layer_anchors
    largest = float(np.max(np.abs(values))) if len(values) else 0.0
    return -largest, largest
