"""Numbers derived from losses, the same wherever they are computed (training or compare)."""

from __future__ import annotations

import math

# exp(88.72) is float32's largest value: past it a perplexity, as torch computes it from a
# float32 loss, is inf. Larger finite numbers would only print as 40- to 300-digit figures.
PERPLEXITY_MAX_LOSS = 88.72


def perplexity(loss: float) -> float:
    """exp(loss); inf past PERPLEXITY_MAX_LOSS and for a NaN loss."""
    return math.exp(loss) if loss <= PERPLEXITY_MAX_LOSS else math.inf
