"""Language-model pre-training end to end: configs/shakespeare_char.yaml (shrunk) in both
single-process modes, its evaluation recomputed independently, sampling and the report plot."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import config, final, metrics
from lte.data.text import embedded_shakespeare
from lte.models import create_model
from lte.sample import main as sample_main
from lte.runtime.config import load_config
from lte.train.report import main as report_main
from lte.single.trainer import train

SHAKESPEARE = config("shakespeare_char")
ARCH = {"n_layer": 2, "n_head": 2, "n_embd": 48, "block_size": 32}
SMALL = [f"model.args={json.dumps(ARCH)}", "data.args.block_size=32", "train.batch_size=32", "train.steps=120",
         "train.warmup_steps=10", "lte.heads=4", "lte.rank=16", "lte.alpha=128", "lte.merge_every=10",
         "eval.every=4", "eval.batch_size=64", "eval.batches=4", "train.log_every=40"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("lm")
    return {mode: (base / mode, train(load_config(SHAKESPEARE, [*SMALL, f"mode={mode}", f"out_dir={base / mode}"])))
            for mode in ("lte", "full")}


def independent_eval_loss(state_dict):
    """Mean next-character cross-entropy over the 256 validation windows eval.batches=4 x 64 picks:
    non-overlapping windows of the last 10% of the text, spread evenly, computed from scratch."""
    text = embedded_shakespeare()
    chars = sorted(set(text))
    val = torch.tensor([chars.index(c) for c in text[len(text) - round(len(text) * 0.1):]])
    n = (len(val) - 1) // 32
    starts = torch.linspace(0, n - 1, 256).round().long() * 32
    windows = torch.stack([val[s:s + 33] for s in starts])
    model = create_model("gpt_tiny", vocab_size=65, **ARCH)
    model.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        logits = model.eval()(windows[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()


@pytest.mark.parametrize("mode", ["lte", "full"])
def test_shakespeare_char_learns_and_reports_perplexity(runs, mode):
    out_dir, summary = runs[mode]
    ev = summary["eval"]
    assert set(ev) == {"loss", "perplexity"} and ev["perplexity"] == pytest.approx(math.exp(ev["loss"]))
    # from ln 65 = 4.17 to below 3.31, the entropy of Shakespeare's characters taken one at a time
    assert ev["loss"] < 3.0, ev
    assert ev["loss"] == pytest.approx(independent_eval_loss(final(out_dir)), rel=1e-5)
    rows = metrics(out_dir)
    assert [r["step"] for r in rows if "eval_perplexity" in r] == [40, 80, 120]
    assert all(r["train_s"] > 0 for r in rows) and rows[-1]["train_s"] >= rows[0]["train_s"]


def test_sample_continues_a_prompt_from_the_runs_weights(runs, capsys):
    out_dir, _ = runs["lte"]
    assert sample_main(["--run", str(out_dir), "--prompt", "ROMEO:", "--tokens", "120", "--seed", "1"]) == 0
    text = capsys.readouterr().out[:-1]  # print's newline
    assert text.startswith("ROMEO:") and len(text) == len("ROMEO:") + 120
    assert set(text) <= set(embedded_shakespeare())
    assert sample_main(["--run", str(out_dir), "--prompt", "ROMEO:", "--tokens", "120", "--seed", "1"]) == 0
    assert capsys.readouterr().out[:-1] == text  # the seed fixes the draw
    assert sample_main(["--run", str(out_dir), "--prompt", "{}"]) == 2
    assert "--prompt: characters '{}' are not in the vocabulary" in capsys.readouterr().err


def test_report_plots_the_eval_curves(runs, tmp_path, capsys):
    dirs = [str(runs[m][0]) for m in ("lte", "full")]
    assert report_main([*dirs, "--plot", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr().out
    assert "eval ppl" in out and "lte" in out and "full" in out
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
