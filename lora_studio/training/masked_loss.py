"""The per-sample training loss with an optional per-pixel weight (``masked_loss``).

``per_sample_mse(pred, target, weight)`` is the mean squared error of each sample; with a weight of shape
(batch, 1, h, w) in [0, 1] (the mask at the latent grid, ``data.masks``) it is the weighted mean over the pixels:
pixels with weight 0 add nothing and get no gradient, pixels with weight 1 count fully, and an all-ones weight
gives exactly the plain mean. Every family's ``compute_loss`` (and its validation loss) uses it.
"""

from __future__ import annotations

import torch


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """(batch,) mean squared errors, weighted per pixel by ``weight`` when given."""
    err = (pred.float() - target.float()) ** 2
    dims = tuple(range(1, err.ndim))
    if weight is None:
        return err.mean(dim=dims)
    weight = weight.to(err.device, err.dtype).expand_as(err)
    return (err * weight).sum(dim=dims) / weight.sum(dim=dims).clamp_min(1e-8)
