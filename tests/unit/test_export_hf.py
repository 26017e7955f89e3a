"""`tinytale export --format hf`: transformers loads the folder and computes what tinytale does.

For each tokenizer kind a small model is trained, exported through the real CLI and loaded
with AutoModelForCausalLM / AutoTokenizer: logits within 1e-5, the same ids on every corpus
story, and greedy generation giving `tinytale generate --temperature 0`'s text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tinytale.cli import app
from tinytale.corpus import load_corpus
from tinytale.inference import load_model
from tinytale.tokenizer import load_tokenizer_file

transformers = pytest.importorskip("transformers")

TINYTALE = str(Path(sys.executable).with_name("tinytale"))
SMALL = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
         "train.epochs=2", "train.batch_size=8", "train.warmup_steps=2", "tracking.samples=0"]
KINDS = {
    "word": ["data.corpus=lesson"],
    "char": ["data.corpus=fairy", "data.n_stories=30", "data.tokenizer=char"],
    "bpe": ["data.corpus=fairy", "data.n_stories=30", "data.tokenizer=bpe",
            "data.bpe_vocab_size=300"],
}
PROMPTS = {"word": "once upon a time", "char": "Once upon", "bpe": "Once upon a time"}


def train_and_export(tmp: Path, overrides: list[str]) -> tuple[Path, Path, str]:
    args = [a for o in [*SMALL, *overrides] for a in ("--set", o)]
    result = CliRunner().invoke(app, ["train", "--no-tracking", "--json", "--out",
                                      str(tmp / "runs"), *args])
    assert result.exit_code == 0, result.output
    checkpoint = Path(json.loads(result.stdout.strip().splitlines()[-1])["checkpoint"])
    out = tmp / "hf"
    done = subprocess.run([TINYTALE, "export", str(checkpoint), "--format", "hf", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return checkpoint, out, done.stderr


@pytest.fixture(scope="module", params=list(KINDS))
def exported(request, tmp_path_factory):
    kind = request.param
    checkpoint, out, stderr = train_and_export(tmp_path_factory.mktemp(kind), KINDS[kind])
    assert stderr == ""  # a GPT-2-shaped model exports without a warning
    return kind, checkpoint, out


def test_logits_match_within_1e_5(exported):
    kind, checkpoint, out = exported
    ours, tokenizer, state = load_model(checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "GPT2LMHeadModel"
    data = state["config"]["data"]
    stories = load_corpus(data["corpus"], data["n_stories"], data["seed"])
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(s)][:32] for s in stories[:8]])
    with torch.no_grad():
        expected, _ = ours(ids)
        got = theirs(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_tokenizer_gives_the_same_ids_on_the_corpus(exported):
    kind, checkpoint, out = exported
    _, tokenizer, state = load_model(checkpoint)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<eos>",) * 3
    assert hf.eos_token_id == tokenizer.eos_id
    assert hf.model_max_length == state["config"]["model"]["block_size"]
    data = state["config"]["data"]
    stories = load_corpus(data["corpus"], data["n_stories"], data["seed"])
    for story in stories:
        assert hf(story)["input_ids"] == tokenizer.encode(story), story
    # The exported tokenizer.json is also one tinytale reuses (data.tokenizer_file).
    again = load_tokenizer_file(out / "tokenizer.json", kind)
    assert [again.encode(s) for s in stories[:20]] == [tokenizer.encode(s) for s in stories[:20]]


def test_greedy_generation_gives_tinytale_generate_text(exported):
    kind, checkpoint, out = exported
    _, tokenizer, _ = load_model(checkpoint)
    prompt = PROMPTS[kind]
    prompt_ids = [tokenizer.eos_id, *tokenizer.encode(prompt)]
    new_tokens = 32 - len(prompt_ids)  # GPT-2 has no positions past block_size
    done = subprocess.run([TINYTALE, "generate", str(checkpoint), "--prompt", prompt,
                           "--temperature", "0", "--max-new-tokens", str(new_tokens)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf = transformers.AutoTokenizer.from_pretrained(out)
    inputs = torch.tensor([prompt_ids])
    generated = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                               max_new_tokens=new_tokens, do_sample=False)
    text = hf.decode(generated[0, 1:], skip_special_tokens=True).strip()
    assert len(generated[0]) > len(prompt_ids)
    assert text == done.stdout.strip()


def test_bias_free_model_exports_with_one_warning_and_equal_logits(tmp_path):
    checkpoint, out, stderr = train_and_export(tmp_path, ["model.bias=false"])
    assert stderr.startswith("warning: model.bias is false, which GPT-2 cannot express")
    assert len(stderr.strip().splitlines()) == 1
    ours, tokenizer, _ = load_model(checkpoint)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode("once upon a time")]])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)[0]).abs().max().item() <= 1e-5


def test_export_refuses_a_used_folder_and_an_unknown_format(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine", encoding="utf-8")
    for args, message in (
            (["missing.pt", "--format", "hf", str(tmp_path / "used")], "OUT_DIR"),
            (["missing.pt", "--format", "onnx", str(tmp_path / "new")], "--format onnx")):
        done = subprocess.run([TINYTALE, "export", *args], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert (tmp_path / "used" / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert not (tmp_path / "new").exists()



def test_missing_safetensors_is_one_sentence_before_any_work(monkeypatch):
    from tinytale.export_hf import ExportError, require_writer

    for module in ("safetensors", "safetensors.torch"):  # as if not installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ExportError, match=r"needs the safetensors package; run pip install "
                                          r"'tinytale\[hf\]'\.$"):
        require_writer()


def test_attention_dropout_is_exported_as_attn_pdrop_old_checkpoints_included():
    from tinytale.config import Config, ModelConfig
    from tinytale.export_hf import gpt2_config

    model = vars(ModelConfig(dropout=0.2, attn_dropout=0.05))
    config = gpt2_config(model, 24, 0)
    assert (config["resid_pdrop"], config["embd_pdrop"], config["attn_pdrop"]) == (0.2, 0.2, 0.05)
    # A checkpoint from before model.attn_dropout dropped attention weights at model.dropout.
    del model["attn_dropout"]
    as_trained = vars(Config.from_checkpoint({"model": model}).model)
    assert gpt2_config(as_trained, 24, 0)["attn_pdrop"] == 0.2
