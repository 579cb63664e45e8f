"""The paper's vision models: ViT-S/B/L and Mixer-T/S/B with patch 32 (Tables 2, 3) train in every
mode and export into the plain model; torchvision's ViT is converted to nn.Linear attention with
unchanged outputs."""
import copy

import pytest
import timm
import torch
import torchvision

import lte
from helpers import DIGITS, config, final, run_command, train_command
from lte.models import create_model
from lte.models.torchvision_vit import fused_state_dict, linear_attention
from lte.runtime.config import load_config
from lte.single.trainer import train

# patch 32 kept (timm's mixer_*32 do not take another), on 64 px images: 4 patches
TINY = {"vit": {"embed_dim": 16, "depth": 1, "num_heads": 2}, "mixer": {"embed_dim": 16, "num_blocks": 1}}
SYNTHETIC = ["data.name=synthetic", "data.args={train_size: 64, test_size: 16, img_size: 64, num_classes: 5}"]

# name, parameters with 1000 classes (Tables 2 and 3: 22.9M, 88.2M, 306.5M; 8.8M, 19.1M, 60.3M)
MODELS = [("vit_small_patch32_224", 22.9e6), ("vit_base_patch32_224", 88.2e6), ("vit_large_patch32_224", 305.5e6),
          ("mixer_t32_224", 8.8e6), ("mixer_s32_224", 19.1e6), ("mixer_b32_224", 60.3e6)]


def tiny_args(name):
    return TINY["vit" if name.startswith("vit") else "mixer"]


def plain(name, **kw):
    """The model as timm builds it: its ViT constructors take other shapes; its Mixer ones fix
    them, so a Mixer of test shapes is timm's MlpMixer class itself."""
    if name.startswith("vit"):
        return timm.create_model(name, pretrained=False, **kw)
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(patch_size=32, **kw)


@pytest.mark.parametrize("name,params", MODELS)
def test_paper_shapes(name, params):
    with torch.device("meta"):
        model = create_model(name)
        ours = {k: v.shape for k, v in model.state_dict().items()}
        if timm.is_model(name):  # what timm builds under that name: the same keys and shapes
            assert ours == {k: v.shape for k, v in timm.create_model(name).state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.005)


@pytest.mark.parametrize("name", [m for m, _ in MODELS])
def test_trains_in_lte_and_full_mode_and_exports_into_the_plain_model(tmp_path, name):
    args = tiny_args(name)
    for mode in ("lte", "full"):
        cfg = load_config(DIGITS, [f"out_dir={tmp_path / mode}", f"mode={mode}", f"model.name={name}",
                                   f"model.args={args}", *SYNTHETIC, "train.steps=2", "train.batch_size=8",
                                   "lte.merge_every=1", "train.log_every=1"])
        summary = train(cfg)
        assert summary["steps"] == 2 and summary["merges"] == (2 if mode == "lte" else 0)
        weights = final(tmp_path / mode)
        model = plain(name, num_classes=5, img_size=64, **args)
        model.load_state_dict(weights, strict=True)
        before = plain(name, num_classes=5, img_size=64, **args).state_dict()
        assert any(not torch.equal(before[k], weights[k]) for k in before)  # it trained


# mode=ps with Mixer-S/32 reading image files: tests/test_vision_data.py (ps equals lte); ViT in ps: tests/test_dist.py
@pytest.mark.parametrize("mode,nproc", [("ddp", 2)])
def test_mixer_in_distributed_modes(tmp_path, mode, nproc):
    args = tiny_args("mixer_s32_224")
    code, out = run_command(train_command("--config", DIGITS, f"out_dir={tmp_path}", f"mode={mode}",
                                          "model.name=mixer_s32_224", f"model.args={args}", *SYNTHETIC,
                                          "train.steps=4", "train.batch_size=8", "lte.merge_every=2", "lte.heads=2",
                                          "worker.base_dtype=fp32", "train.log_every=2", nproc=nproc))
    assert code == 0, out[-3000:]
    model = plain("mixer_s32_224", num_classes=5, img_size=64, **args)
    model.load_state_dict(final(tmp_path), strict=True)


def tiny_torchvision_vit(dropout=0.0):
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                hidden_dim=16, mlp_dim=32, num_classes=5,
                                                attention_dropout=dropout)


def test_torchvision_vit_is_refused_until_converted():
    with pytest.raises(lte.ModelError, match="linear_attention"):
        lte.prepare(tiny_torchvision_vit(), lte.LTEConfig(heads=2, rank=2))


@pytest.mark.parametrize("training", [False, True])
def test_linear_attention_gives_the_original_outputs(training):
    original = tiny_torchvision_vit().train(training)
    converted = linear_attention(copy.deepcopy(original))
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in converted.modules())
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-5, atol=1e-6)
    # and the same function of the weights: gradients agree too
    original(x).square().sum().backward()
    converted(x).square().sum().backward()
    mha = original.encoder.layers[0].self_attention
    lin = converted.encoder.layers[0].self_attention
    grads = torch.cat([lin.q_proj.weight.grad, lin.k_proj.weight.grad, lin.v_proj.weight.grad])
    torch.testing.assert_close(grads, mha.in_proj_weight.grad, rtol=1e-4, atol=1e-6)


def test_converted_vit_trains_with_lte_and_exports_to_torchvision():
    model = lte.prepare(linear_attention(tiny_torchvision_vit()), lte.LTEConfig(heads=2, rank=2, alpha=4))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        lte.merge(model, opt)
    reference = torchvision.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2,
                                                     hidden_dim=16, mlp_dim=32, num_classes=5)
    reference.load_state_dict(fused_state_dict(lte.export(model)), strict=True)
    model.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(reference(x), model(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(reference(x), tiny_torchvision_vit().eval()(x))  # it trained


def test_torchvision_vit_by_name_in_a_run(tmp_path):
    cfg = load_config(DIGITS, [f"out_dir={tmp_path}", "model.name=tv_vit_s_32",
                               "model.args={num_layers: 1, num_heads: 2, hidden_dim: 16, mlp_dim: 32}",
                               *SYNTHETIC, "train.steps=2", "train.batch_size=8", "lte.merge_every=1"])
    assert train(cfg)["merges"] == 2
    weights = fused_state_dict(final(tmp_path))
    torchvision.models.VisionTransformer(image_size=64, patch_size=32, num_layers=1, num_heads=2, hidden_dim=16,
                                         mlp_dim=32, num_classes=5).load_state_dict(weights, strict=True)


# Table 5 (and its note for the Mixer): global batch, full-rank lr, LTE lr; 32 heads of rank 64,
# alpha 4096, merge every 10 throughout (sections 4.3, A.1, D.1-D.3).
PAPER_CONFIGS = {
    "vit_s32_imagenet100": ("vit_small_patch32_224", "imagefolder", 4096, 3e-3, 3e-5),
    "vit_s32_imagenet1k": ("vit_small_patch32_224", "imagefolder", 8192, 3e-3, 3e-5),
    "vit_b32_imagenet100": ("vit_base_patch32_224", "imagefolder", 4096, 3e-3, 3e-5),
    "mixer_s32_imagenet100": ("mixer_s32_224", "imagefolder", 4096, 1e-3, 1e-4),
    "vit_s32_cifar10": ("vit_small_patch32_224", "cifar10", 1024, 3e-4, 2e-5),
    "vit_s32_cifar100": ("vit_small_patch32_224", "cifar100", 1024, 3e-4, 2e-5),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_hold_table_5(name):
    cfg = load_config(config(name))
    model, data, batch, lr, lte_lr = PAPER_CONFIGS[name]
    assert (cfg.model.name, cfg.data.name, cfg.train.batch_size) == (model, data, batch)
    assert cfg.train.lr == pytest.approx(lr) and cfg.lte.lr == pytest.approx(lte_lr)
    assert (cfg.lte.heads, cfg.lte.rank, cfg.lte.alpha, cfg.lte.merge_every) == (32, 64, 4096, 10)
    assert cfg.data.args.get("classes") == ("imagenet100" if "imagenet100" in name else None)
