"""Image data from disk: the image folder, its transforms and errors, torchvision sets, the resize
command, and training from files (ps equals lte; a restart resumes at the same data position)."""
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import DIGITS, config, final, run_command, summary, train_command, train_crashing_at
from lte.data import TrainBatches, build_data
from lte.data.vision import Normalize, center_box, random_resized_box
from lte.errors import ConfigError, DataError
from lte.train.cli import main
from lte.runtime.config import load_config
from lte.single.trainer import train


def digit_folder(root: Path, classes=4, per_class_train=12, per_class_val=4, size=24) -> Path:
    """scikit-learn's digits as an image folder: 8x8 images upscaled to `size`, as PNG and JPEG."""
    from sklearn.datasets import load_digits

    d = load_digits()
    counts = {}
    for img, label in zip(d.images, d.target):
        if label >= classes:
            continue
        n = counts.get(label, 0)
        if n >= per_class_train + per_class_val:
            continue
        counts[label] = n + 1
        split = "train" if n < per_class_train else "val"
        folder = root / split / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        a = (img / 16 * 255).astype(np.uint8)
        rgb = Image.fromarray(np.stack([a, 255 - a, a // 2], -1)).resize((size, size), Image.BICUBIC)
        rgb.save(folder / f"{n:03d}.{'png' if n % 2 else 'jpg'}")
    return root


def one_image_folder(root: Path, pixels: np.ndarray, name="x.png", **save) -> str:
    """An image folder of one class holding the same image in train/ and val/."""
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        Image.fromarray(pixels).save(root / split / "a" / name, **save)
    return str(root)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return digit_folder(tmp_path_factory.mktemp("digits_folder"))


def test_image_folder_classes_labels_and_model_args(folder):
    data = build_data("imagefolder", 0, {"root": str(folder), "image_size": 16, "workers": 0})
    assert data.train.classes == [f"digit{i}" for i in range(4)] and len(data.train) == 48 and len(data.eval) == 16
    assert data.model_args == {"num_classes": 4, "img_size": 16, "in_chans": 3}
    x, y = data.train.gather(torch.arange(48), torch.arange(48))
    assert x.shape == (48, 16, 16, 3) and x.dtype == torch.uint8
    assert y.tolist() == [i // 12 for i in range(48)]  # sorted folders, sorted files


def test_eval_transform_is_resize_then_center_crop(tmp_path):
    """A 256x256 source at image_size 224: resize to 256 is the identity, so the result is exactly
    the centre 224 square of the file's pixels."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (256, 320, 3), dtype=np.uint8)
    data = build_data("imagefolder", 0, {"root": one_image_folder(tmp_path, pixels), "workers": 0})
    x, _ = data.eval.gather(torch.tensor([0]))
    assert torch.equal(x[0], torch.from_numpy(pixels[16:240, 48:272]))


def test_train_transform_matches_torchvision_resized_crop_and_flip(tmp_path):
    """Each training sample is torchvision's resized_crop (PIL, bilinear) of the box drawn from its
    key, flipped when the key's next draw is < 1/2."""
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    data = build_data("imagefolder", 0, {"root": one_image_folder(tmp_path, pixels), "image_size": 32, "workers": 0})
    keys = torch.arange(24) * 1_000_003
    x, _ = data.train.gather(torch.zeros(24, dtype=torch.long), keys)
    flips = 0
    for key, got in zip(keys.tolist(), x):
        r = random.Random(key)
        left, top, right, bottom = random_resized_box(90, 60, r)
        ref = np.asarray(TF.resized_crop(Image.fromarray(pixels), top, left, bottom - top, right - left, [32, 32],
                                         interpolation=TF.InterpolationMode.BILINEAR))
        if r.random() < 0.5:
            ref, flips = ref[:, ::-1], flips + 1
        assert np.array_equal(got.numpy(), ref), key
    assert 4 <= flips <= 20
    again, _ = data.train.gather(torch.zeros(24, dtype=torch.long), keys)
    assert torch.equal(again, x)


def test_random_resized_box_follows_the_standard_distribution():
    r = random.Random(0)
    areas, ratios = [], []
    for _ in range(4000):
        left, top, right, bottom = random_resized_box(400, 300, r)
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        areas.append((right - left) * (bottom - top) / 120_000)
        ratios.append((right - left) / (bottom - top))
    assert min(areas) >= 0.079 and max(areas) <= 1.0
    assert 3 / 4 - 0.02 <= min(ratios) and max(ratios) <= 4 / 3 + 0.02
    # uniform scale on [0.08, 1] has mean 0.54; crops too big for the image are redrawn, which lowers it
    assert 0.40 < float(np.mean(areas)) < 0.56
    assert center_box(400, 300, 224, 224 / 256) == pytest.approx((68.75, 18.75, 331.25, 281.25))


def test_fast_decode_stays_close_to_a_full_decode(tmp_path):
    """A large JPEG crop decoded at a reduced DCT scale differs little from decoding it whole."""
    yy, xx = np.mgrid[0:600, 0:800]
    smooth = np.stack([(xx / 800 * 255), (yy / 600 * 255), ((xx + yy) / 1400 * 255)], -1).astype(np.uint8)
    root = one_image_folder(tmp_path, smooth, "x.jpg", quality=95)
    fast = build_data("imagefolder", 0, {"root": root, "image_size": 64, "workers": 0})
    full = build_data("imagefolder", 0, {"root": root, "image_size": 64, "workers": 0, "fast_decode": False})
    a, _ = fast.eval.gather(torch.tensor([0]))
    b, _ = full.eval.gather(torch.tensor([0]))
    assert (a.float() - b.float()).abs().mean() < 2.0


def test_normalize_is_the_standard_one():
    x = torch.randint(0, 256, (2, 5, 5, 3), dtype=torch.uint8)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    want = (x.permute(0, 3, 1, 2).float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(Normalize()(x), want)


def test_imagenet100_class_list_is_bundled(tmp_path):
    from lte.data.imagefolder import read_class_list

    names, _ = read_class_list("imagenet100")
    assert len(names) == 100 == len(set(names)) and all(n.startswith("n") and len(n) == 9 for n in names)
    assert names[0] == "n02869837" and names[-1] == "n02090622"


def bad_folder(tmp_path, kind):
    root = digit_folder(tmp_path / "d", classes=2, per_class_train=2, per_class_val=1, size=8)
    args = {"root": str(root), "image_size": 8, "workers": 0}
    if kind == "no_train":
        os.rename(root / "train", root / "elsewhere")
    elif kind == "empty_class":
        (root / "train" / "digit9").mkdir()
    elif kind == "missing_listed":
        (tmp_path / "list.txt").write_text("digit0\ndigit1\ndigit7\n")
        args["classes"] = str(tmp_path / "list.txt")
    return args


@pytest.mark.parametrize("kind,message", [
    ("no_train", "has no train/ folder"),
    ("empty_class", "digit9 holds no image"),
    ("missing_listed", "names 1 class(es) with no folder in"),
])
def test_bad_folders_are_one_line_errors(tmp_path, capsys, kind, message):
    args = bad_folder(tmp_path, kind)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_data("imagefolder", 0, args)
    code = main(["--config", DIGITS, f"out_dir={tmp_path / 'run'}", "train.steps=1", "data.name=imagefolder",
                 "data.args=" + json.dumps(args)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_is_named_in_a_one_line_error(tmp_path, capsys, workers):
    root = digit_folder(tmp_path / "d", classes=2, per_class_train=4, per_class_val=1, size=8)
    bad = root / "train" / "digit1" / "000.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    data = build_data("imagefolder", 0, {"root": str(root), "workers": workers, "image_size": 8})
    with pytest.raises(DataError, match=str(bad)):
        data.train.gather(torch.arange(8), torch.arange(8))
    if workers == 0:
        return
    code = main(["--config", DIGITS, f"out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=8",
                 "data.name=imagefolder", "data.args=" + json.dumps({"root": str(root), "workers": workers,
                                                                      "image_size": 8})])
    err = capsys.readouterr().err.strip()
    assert code == 2 and f"cannot read image {bad}" in err and len(err.splitlines()) == 1, err


def write_cifar10(root: Path, n_train=50, n_test=20):
    """Files in torchvision's CIFAR-10 python format (5 training batches, a test batch, the meta)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    images, labels = {}, {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else n_train // 5
        images[name] = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images[name], "labels": labels[name]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return images, labels


def test_cifar10_loads_torchvision_files(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    images, labels = write_cifar10(tmp_path)
    monkeypatch.setattr(tvd.cifar, "check_integrity", lambda *a, **k: True)  # our files: not the archive's md5
    data = build_data("cifar10", 0, {"root": str(tmp_path), "image_size": 32, "workers": 0})
    assert len(data.train) == 50 and len(data.eval) == 20
    assert data.model_args == {"num_classes": 10, "img_size": 32, "in_chans": 3}
    x, y = data.eval.gather(torch.tensor([3]))  # evaluation: the whole 32 px image, unchanged at 32
    want = images["test_batch"][3].reshape(3, 32, 32).transpose(1, 2, 0)
    assert torch.equal(x[0], torch.from_numpy(want)) and y.item() == labels["test_batch"][3]
    _, y = data.train.gather(torch.tensor([0, 10, 49]), torch.tensor([1, 2, 3]))
    assert y.tolist() == [labels["data_batch_1"][0], labels["data_batch_2"][0], labels["data_batch_5"][9]]


@pytest.mark.parametrize("name,folder", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                         ("stl10", "stl10_binary")])
def test_absent_torchvision_files_say_where_and_how(tmp_path, capsys, name, folder):
    code = main(["--config", DIGITS, f"out_dir={tmp_path / 'run'}", "train.steps=1", f"data.name={name}",
                 f"data.args={{root: {tmp_path}}}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(tmp_path / folder) in err and "download=true" in err


def test_resize_images_command(tmp_path):
    src = tmp_path / "src"
    for split, (w, h) in (("train", (300, 200)), ("val", (100, 150))):
        (src / split / "a").mkdir(parents=True)
        Image.new("RGB", (w, h), (200, 10, 10)).save(src / split / "a" / "x.png")
    assert main(["resize-images", str(src), str(tmp_path / "dst"), "--size", "64", "--processes", "1"]) == 0
    with Image.open(tmp_path / "dst" / "train" / "a" / "x.jpg") as im:
        assert im.size == (96, 64) and im.format == "JPEG"
    with Image.open(tmp_path / "dst" / "val" / "a" / "x.jpg") as im:
        assert im.size == (64, 96)
    data = build_data("imagefolder", 0, {"root": str(tmp_path / "dst"), "image_size": 32, "workers": 0})
    x, _ = data.eval.gather(torch.tensor([0]))
    assert abs(x[0, ..., 0].float().mean().item() - 200) < 3


# Training from files ---------------------------------------------------------------------------
TINY_VIT = ["model.name=vit_small_patch32_224",
            "model.args={patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2}"]
TINY_MIXER = ["model.name=mixer_s32_224", "model.args={embed_dim: 16, num_blocks: 1}"]  # patch 32


def image_run(folder, out_dir, *extra, workers=2, model=TINY_VIT, image_size=16):
    return [f"out_dir={out_dir}", "data.name=imagefolder",
            "data.args=" + json.dumps({"root": str(folder), "image_size": image_size, "workers": workers}), *model,
            "train.batch_size=16", "train.log_every=5", "eval.every=0", "lte.merge_every=5", *extra]


def test_ps_with_image_files_and_workers_equals_simulated_heads(folder, tmp_path):
    """Mixer-S/32 (at test width) from image files through DataLoader workers: a parameter server
    with 2 workers x 2 heads trains exactly the 4 simulated heads."""
    common = ["worker.base_dtype=fp32", "train.steps=10", "lte.heads=4"]
    shape = dict(workers=1, model=TINY_MIXER, image_size=64)
    code, out = run_command(train_command("--config", DIGITS, *image_run(folder, tmp_path / "ps", *common, "mode=ps",
                                                                         "worker.heads=2", **shape), nproc=3))
    assert code == 0, out[-3000:]
    train(load_config(DIGITS, image_run(folder, tmp_path / "lte", *common, "mode=lte", **shape)))
    a, b = final(tmp_path / "ps"), final(tmp_path / "lte")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-5
    ev = [summary(tmp_path / m)["eval"]["loss"] for m in ("ps", "lte")]
    assert ev[0] == pytest.approx(ev[1], abs=1e-5)


def test_restart_resumes_at_the_same_data_position(folder, tmp_path, monkeypatch):
    """A run cut at step 7 and resumed from its step-5 checkpoint ends with the weights of an
    uninterrupted run: the batches of steps 5..9, augmentation included, are the same."""
    def cfg(name):
        return load_config(DIGITS, image_run(folder, tmp_path / name, "train.steps=10", "checkpoint.every=1"))

    train(cfg("whole"))
    train_crashing_at(cfg("cut"), 7)
    seen = []
    real_get = TrainBatches.get

    def record(self, step):
        seen.append(step)
        return real_get(self, step)

    monkeypatch.setattr(TrainBatches, "get", record)
    resumed = train(cfg("cut"))
    assert resumed["steps"] == 10 and seen == list(range(5, 10))  # nothing before step 5 is read again
    a, b = final(tmp_path / "whole"), final(tmp_path / "cut")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_imagenet100_config_starts_with_one_command(tmp_path):
    """The shipped config on a folder holding the 100 ImageNet100 classes (and one more that the
    class list leaves out), at test shapes: it trains and evaluates on exactly those classes."""
    from lte.data.imagefolder import read_class_list

    names, _ = read_class_list("imagenet100")
    for split in ("train", "val"):
        for i, name in enumerate([*names, "n99999999"]):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (40, 30), (i, 255 - i, 7)).save(tmp_path / split / name / "a.JPEG")
    code = main(["--config", config("vit_s32_imagenet100"), f"data.args.root={tmp_path}",
                 "data.args.image_size=32", "data.args.workers=0", f"out_dir={tmp_path / 'run'}",
                 "model.args={embed_dim: 32, depth: 1, num_heads: 2}", "model.args.patch_size=16", "train.steps=1",
                 "train.batch_size=32", "train.warmup_steps=1", "train.compile=false", "lte.merge_every=1",
                 "eval.batch_size=100"])
    assert code == 0
    s = summary(tmp_path / "run")
    assert s["merges"] == 1 and s["heads"] == 32 and 0 <= s["eval"]["accuracy"] <= 1
    assert final(tmp_path / "run")["head.weight"].shape[0] == 100
