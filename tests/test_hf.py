"""Hugging Face transformers models: prepare, merge and export for Llama, GPT-2 (whose linear layers
are transformers' Conv1D) and ViT, checked against hand computations and fresh models; the trainer's
hf: models in simulated and parameter-server mode; final.safetensors, the save_pretrained folder,
python -m lte.export; the progress bar."""
import copy
import io
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import lte  # noqa: E402
from helpers import DIGITS, config, final, run_command, summary  # noqa: E402
from lte import core  # noqa: E402
from lte.runtime.log import RunLog  # noqa: E402
from test_dist import ps_against_simulated  # noqa: E402

NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny(name):
    torch.manual_seed(0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=False,
            bos_token_id=0, eos_token_id=0, **NO_DROPOUT))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=16, tie_word_embeddings=False))
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def inputs(name, n, generator):
    if name == "vit":
        return torch.randn(n, 1, 8, 8, generator=generator)
    return torch.randint(0, 40, (n, 10), generator=generator)


def logits(model, x):
    return model(x).logits


def randomize_heads(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ["llama", "gpt2", "vit"])
def test_steps_merges_and_export_load_strictly_into_a_fresh_model(name):
    model = lte.prepare(tiny(name), lte.LTEConfig(heads=4, rank=2, alpha=4))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(4):
        logits(model, inputs(name, 8, g)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step % 2 == 1:
            lte.merge(model, opt)
    exported, untrained = lte.export(model), tiny(name).state_dict()
    fresh = tiny(name)
    fresh.load_state_dict(exported, strict=True)
    model.eval()
    x = inputs(name, 3, g)  # any batch size in eval
    torch.testing.assert_close(logits(fresh.eval(), x), logits(model, x))
    moved = [path for path, _ in core.lte_layers(model)
             if not torch.equal(exported[path + ".weight"], untrained[path + ".weight"])]
    assert len(moved) == len(core.lte_layers(model))  # the merges moved every layer


def test_gpt2_linear_layers_are_its_conv1d_projections_and_merge_transposed():
    plain = tiny("gpt2")
    conv1d = {p for p, m in plain.named_modules() if type(m).__name__ == "Conv1D"}
    model = lte.prepare(copy.deepcopy(plain), lte.LTEConfig(heads=4, rank=2, alpha=8))
    layers = dict(core.lte_layers(model))
    assert conv1d <= set(layers) and set(layers) == conv1d | {"lm_head"}
    for path in conv1d:  # per head A (rank x in) and B (out x rank), not a copy of the weight
        w = plain.get_submodule(path).weight  # in x out
        layer = layers[path]
        assert layer.lora_A.shape == (4, 2, w.shape[0]) and layer.lora_B.shape == (4, w.shape[1], 2)
    randomize_heads(model)
    path = "transformer.h.0.attn.c_attn"
    A, B = layers[path].lora_A.detach().clone(), layers[path].lora_B.detach().clone()
    lte.merge(model)
    expected = plain.get_submodule(path).weight.detach().clone()  # Conv1D: y = x W + b, W in x out
    for h in range(4):
        expected += (8 / 2 / 4) * (B[h] @ A[h]).T
    torch.testing.assert_close(lte.export(model)[path + ".weight"], expected)


def test_each_head_of_gpt2_is_its_own_model_and_position_ids_broadcast():
    """A training forward gives sample b what head b // (batch / heads) computes alone: the model
    with W + s B_h A_h in every layer and head h's copy of every replica, among them the position
    embedding, whose input (position ids) has a batch of 1."""
    plain = tiny("gpt2")
    model = lte.prepare(copy.deepcopy(plain), lte.LTEConfig(heads=4, rank=2, alpha=8))
    randomize_heads(model)
    x = inputs("gpt2", 8, torch.Generator().manual_seed(0))
    together = logits(model.train(), x)
    heads = core.head_state(model)
    for h in range(4):
        alone = copy.deepcopy(plain).eval()
        sd = alone.state_dict()
        for path, layer in core.lte_layers(model):
            delta = (layer.scale * layer.lora_B[h] @ layer.lora_A[h]).detach()  # out x in
            sd[path + ".weight"] += delta.T if path != "lm_head" else delta
        for name in core.state_of(model).spec.replicas:
            sd[name].copy_(heads[name + "_heads"][h].detach())
        alone.load_state_dict(sd)
        torch.testing.assert_close(together[2 * h:2 * h + 2], logits(alone, x[2 * h:2 * h + 2]),
                                   rtol=1e-4, atol=1e-5)


def test_a_batch_that_does_not_split_names_the_input():
    model = lte.prepare(tiny("gpt2"), lte.LTEConfig(heads=4, rank=2)).train()
    with pytest.raises(lte.BatchError, match="input argument 0 has a batch of 6 samples"):
        model(torch.randint(0, 40, (6, 10)))


class Scaled(nn.Module):
    """A linear layer of a type lte does not know."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4))

    def forward(self, x):
        return x @ self.weight.T


def test_an_unknown_2d_weight_is_refused_in_one_line_naming_module_type_and_cost():
    net = nn.Sequential(nn.Linear(4, 4), Scaled())
    with pytest.raises(lte.ModelError) as err:
        lte.prepare(net, lte.LTEConfig(heads=4))
    message = str(err.value)
    assert "\n" not in message
    assert "module '1' (Scaled) has a weight 'weight' of shape (6, 4)" in message
    assert f"{4 * 24 * 16 / 2**20:,.2f} MiB" in message and "register_linear" in message
    accepted = lte.prepare(nn.Sequential(nn.Linear(4, 4), Scaled()),
                           lte.LTEConfig(heads=4, other_params="replica_all"))
    assert accepted[1].weight_heads.shape == (4, 6, 4)


GPT2_RUN = ["--config", config("shakespeare_char"), "model.name=hf:gpt2",
            "model.args={n_embd: 16, n_layer: 1, n_head: 2, n_positions: 16, resid_pdrop: 0.0, embd_pdrop: 0.0, "
            "attn_pdrop: 0.0, bos_token_id: 0, eos_token_id: 0}",
            "data.args.block_size=16", "train.batch_size=16", "eval.batches=2", "eval.batch_size=32", "lte.rank=4",
            "lte.alpha=16", "train.warmup_steps=0", "train.log_every=10", "eval.every=0"]
LLAMA_RUN = ["--config", config("llama_shakespeare"),
             "model.args={hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1, num_attention_heads: 2, "
             "num_key_value_heads: 2, max_position_embeddings: 16}",
             "data.args.block_size=16", "train.batch_size=16", "eval.batches=2", "eval.batch_size=32", "lte.rank=4",
             "lte.alpha=16", "train.warmup_steps=0", "train.log_every=10", "eval.every=0"]
VIT_RUN = ["--config", DIGITS, "model.name=hf:vit",
           "model.args={patch_size: 2, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, "
           "intermediate_size: 32, hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}",
           "train.log_every=10", "eval.every=0"]


@pytest.mark.parametrize("run", [GPT2_RUN, LLAMA_RUN, VIT_RUN], ids=["gpt2", "llama", "vit"])
def test_trainer_hf_models_in_parameter_server_mode_equal_simulated_heads(tmp_path, run):
    """2 workers x 2 heads == 4 simulated heads, bit for bit up to float rounding, for transformers
    models built by name; the runs' hf/ folders load with from_pretrained into the final weights."""
    assert ps_against_simulated(tmp_path, run, nproc=3) < 1e-5
    for mode in ("ps", "lte"):
        weights = final(tmp_path / mode)
        auto = (transformers.AutoModelForImageClassification if run is VIT_RUN
                else transformers.AutoModelForCausalLM)
        model = auto.from_pretrained(tmp_path / mode / "hf")
        sd = model.state_dict()
        assert sd.keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(sd[key], value, rtol=0, atol=0, msg=key)


def test_final_safetensors_and_the_export_command(tmp_path):
    from safetensors.torch import load_file

    code, out = run_command([sys.executable, "-m", "lte.train", *LLAMA_RUN, "train.steps=10", "lte.merge_every=5",
                             f"out_dir={tmp_path}"])
    assert code == 0, out
    weights = final(tmp_path)
    stored = load_file(tmp_path / "final.safetensors")
    assert stored.keys() == weights.keys() and all(torch.equal(stored[k], weights[k]) for k in weights)
    (tmp_path / "final.safetensors").unlink()
    for fmt in ("safetensors", "hf"):
        code, out = run_command([sys.executable, "-m", "lte.export", "--run", str(tmp_path), "--format", fmt])
        assert code == 0, out
    assert load_file(tmp_path / "final.safetensors").keys() == weights.keys()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    code, out = run_command([sys.executable, "-m", "lte.export", "--run", str(tmp_path / "none"), "--format", "hf"])
    assert code == 2 and "not found" in out and "Traceback" not in out
    assert summary(tmp_path)["steps"] == 10
    import lte.runtime.results  # noqa: F401  (what the command uses does not rebind lte.export)
    assert lte.export is core.export


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise(tmp_path, monkeypatch):
    cfg = lte.runtime.config.load_config(DIGITS, [f"out_dir={tmp_path}", "train.steps=20"])
    rows = {10: {"loss": 1.25, "samples_per_s": 300.0}, 20: {"loss": 0.5, "eval_accuracy": 0.75}}
    for screen in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stdout", screen)
        log = RunLog.for_run(cfg, tmp_path)
        for step in range(1, 21):
            log.progress(step, rows.get(step, {}))
        log.finish({})
        text = screen.getvalue()
        if isinstance(screen, Terminal):
            assert "20/20" in text and "loss 0.5000" in text and ("step/s" in text or "s/step" in text)
            assert "eval accuracy 0.7500" in text  # evaluations stay on the screen
        else:
            assert text.splitlines() == ["step 10/20 | loss 1.2500 | 300 samples/s",
                                         "step 20/20 | loss 0.5000 | eval accuracy 0.7500"]
