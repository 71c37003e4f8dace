"""A1111 "Original" emphasis on encoded prompt chunks, with a guard for a near-zero mean.

A1111 multiplies each token's conditioning by its weight and rescales the chunk so its mean is
unchanged: ``z * old_mean / new_mean``. When either mean is ~0 (a final layer norm without bias,
e.g. a random-weight or oddly fine-tuned text encoder) that ratio is float noise and gives inf, NaN
or all zeros. Here the rescale is skipped for such a chunk (the weights are still applied): a mean
counts as ~0 when its magnitude is below :data:`MEAN_TOLERANCE` times the chunk's mean absolute value.
"""

from __future__ import annotations

import torch

#: a chunk's mean counts as zero below this fraction of its mean absolute value
MEAN_TOLERANCE = 1e-3


def apply_emphasis(z: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """Weighted conditioning ``(chunks, tokens, width)`` with each chunk's mean restored where defined."""
    rows = []
    for row in range(z.shape[0]):
        original = z[row]
        weighted = original * multipliers[row][:, None].to(original)
        old_mean, new_mean = original.mean(), weighted.mean()
        scale_old = original.abs().mean() * MEAN_TOLERANCE
        scale_new = weighted.abs().mean() * MEAN_TOLERANCE
        if bool(old_mean.abs() > scale_old) and bool(new_mean.abs() > scale_new):
            weighted = weighted * (old_mean / new_mean)
        rows.append(weighted)
    return torch.stack(rows)
