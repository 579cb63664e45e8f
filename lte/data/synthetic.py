"""Random images with random labels, made on demand: for speed and communication benchmarks only
(nothing can be learned from them). Sample i is drawn from a generator seeded by (seed, i)."""
from __future__ import annotations

import torch

from ..core.init import head_seed
from .base import DataBundle


class SyntheticImages:
    def __init__(self, n: int, seed: int, shape: tuple[int, int, int], num_classes: int, split: str):
        self.n, self.seed, self.shape, self.num_classes, self.split = n, seed, shape, num_classes, split

    def __len__(self) -> int:
        return self.n

    def gather(self, idx, keys=None) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for i in torch.as_tensor(idx).tolist():
            gen = torch.Generator().manual_seed(head_seed(self.seed, f"synthetic-{self.split}", i))
            xs.append(torch.randn(self.shape, generator=gen))
            ys.append(torch.randint(0, self.num_classes, (), generator=gen))
        return torch.stack(xs), torch.stack(ys)


def synthetic(seed: int, train_size: int = 1024, test_size: int = 64, img_size: int = 224, in_chans: int = 3,
              num_classes: int = 1000) -> DataBundle:
    shape = (in_chans, img_size, img_size)
    return DataBundle(train=SyntheticImages(train_size, seed, shape, num_classes, "train"),
                      eval=SyntheticImages(test_size, seed, shape, num_classes, "test"), task="classification",
                      model_args={"num_classes": num_classes, "in_chans": in_chans, "img_size": img_size})
