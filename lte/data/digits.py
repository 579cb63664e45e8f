"""scikit-learn's bundled digits: 1,797 real 8x8 grey-scale images of handwritten digits, no download."""
from __future__ import annotations

import torch

from .base import ArrayDataset, DataBundle


def digits(seed: int, test_fraction: float = 0.2) -> DataBundle:
    from sklearn.datasets import load_digits

    raw = load_digits()
    x = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values 0..16
    y = torch.tensor(raw.target, dtype=torch.long)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std  # statistics of the training split only
    return DataBundle(
        train=ArrayDataset(x[train], y[train]), eval=ArrayDataset(x[test], y[test]),
        task="classification", model_args={"num_classes": 10, "in_chans": 1, "img_size": 8})
