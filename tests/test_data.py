"""The data contract: per-head streams, the loaders that feed the trainer, evaluation batches."""
import torch

from lte.data import ArrayDataset, DataBundle, EvalBatches, HeadBatches, TrainBatches
from lte.data.streams import IndexStream


class Augmented:
    """A set whose samples depend on their augmentation key: the key is the input."""

    def __len__(self):
        return 50

    def gather(self, idx, keys=None):
        idx = torch.as_tensor(idx)
        return torch.stack([torch.tensor([float(i), float(k % 1000)]) for i, k in zip(idx, keys)]), idx


def test_epoch_streams_cover_the_set_once_per_epoch_and_differ_per_head():
    a, b = IndexStream(10, 4, seed=0, stream=0), IndexStream(10, 4, seed=0, stream=1)
    first_epoch = torch.cat([a.indices(0), a.indices(1), a.indices(2)])[:10]
    assert sorted(first_epoch.tolist()) == list(range(10))
    assert not torch.equal(a.indices(0), b.indices(0))
    assert torch.equal(IndexStream(10, 4, seed=0, stream=0).indices(7), a.indices(7))  # a function of the step


def test_random_streams_depend_only_on_seed_head_and_step():
    s = IndexStream(1000, 8, seed=3, stream=2, sampling="random")
    later = s.indices(5)
    fresh = IndexStream(1000, 8, seed=3, stream=2, sampling="random")
    assert torch.equal(fresh.indices(5), later)
    assert not torch.equal(s.indices(4), s.indices(5))
    assert later.min() >= 0 and later.max() < 1000


def test_augmentation_keys_are_per_head_and_position():
    batches = HeadBatches(50, 3, seed=0, heads=range(4))
    keys = batches.keys(2)
    assert keys.shape == (12,) and len(set(keys.tolist())) == 12 and keys.min() >= 0
    # head 2 alone (a worker holding heads 2..3) sees the same keys as head 2 of the four
    assert torch.equal(HeadBatches(50, 3, seed=0, heads=range(2, 4)).keys(2), keys[6:])


def test_worker_processes_deliver_the_same_batches_as_in_process():
    batches = HeadBatches(50, 3, seed=0, heads=range(2))
    here = TrainBatches(Augmented(), batches, steps=6, workers=0)
    there = TrainBatches(Augmented(), batches, steps=6, workers=2)
    for step in [0, 1, 2, 4, 5]:  # 3 is skipped: a jump restarts the loader at the new step
        x0, y0 = here.get(step)
        x1, y1 = there.get(step)
        assert torch.equal(x0, x1) and torch.equal(y0, y1), step
    there.close()


def test_eval_batches_spread_a_fixed_subset_over_the_set():
    data = ArrayDataset(torch.arange(100).float().unsqueeze(1), torch.arange(100))
    whole = [y for _, y in EvalBatches(data, 32)]
    assert [len(y) for y in whole] == [32, 32, 32, 4] and torch.equal(torch.cat(whole), torch.arange(100))
    part = torch.cat([y for _, y in EvalBatches(data, 4, limit=10)])
    assert part.tolist() == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert torch.equal(part, torch.cat([y for _, y in EvalBatches(data, 4, limit=10)]))


def test_map_style_datasets_are_adapted():
    pairs = [(torch.full((2,), float(i)), i) for i in range(6)]
    bundle = DataBundle(train=pairs, eval=pairs[:2])
    x, y = bundle.train.gather(torch.tensor([4, 1]))
    assert torch.equal(x, torch.tensor([[4.0, 4.0], [1.0, 1.0]])) and y.tolist() == [4, 1]
