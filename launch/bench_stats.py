"""Interleaved benchmark rounds reduced to what BENCHMARKS.md records: every figure as the
median and range [min–max] of its rounds, every ratio taken within each round (that round's
figure ÷ that round's baseline) and summarised the same way. A target is met only when the
lowest round reaches it, missed when the highest does not, otherwise inside the noise.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread(values: Sequence[float], digits: int, signed: bool = False) -> str:
    """``median [min–max]``; ``signed`` for differences, whose range may cross zero."""
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{statistics.median(values):{spec}} [{min(values):{spec}}–{max(values):{spec}}]"


def round_ratios(tops: Sequence[float], bottoms: Sequence[float]) -> list[float]:
    """``top ÷ bottom`` of each round: never a median divided by a median."""
    return [top / bottom for top, bottom in zip(tops, bottoms, strict=True)]


def verdict(ratios: Sequence[float], target: float) -> str:
    if min(ratios) >= target:
        return "met"
    if max(ratios) < target:
        return "missed"
    return "inside the noise"


def ratio_spread(ratios: Sequence[float], digits: int, target: float | None = None) -> str:
    """``spread`` of per-round ratios, followed by the verdict when there is a ``target``."""
    goal = "" if target is None else f"   target ≥ {target:g}: {verdict(ratios, target)}"
    return spread(ratios, digits) + goal
