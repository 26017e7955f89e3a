"""A trained checkpoint as a Hugging Face `transformers` folder (GPT2LMHeadModel + tokenizer).

tinytale's GPT is GPT-2's architecture (learned positions, pre-norm blocks, erf GELU,
LayerNorm eps 1e-5, tied head), so its weights map one to one onto `GPT2LMHeadModel`; only
the fused linear layers are stored transposed there (GPT-2's `Conv1D` keeps `(in, out)`).
Writing the folder needs `safetensors` alone; `transformers` is needed only to load it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinytale.errors import UserError
from tinytale.tokenizer import EOS, Tokenizer

INSTALL_HINT = "pip install 'tinytale[hf]'"
# GPT-2's Conv1D layers hold (in, out): tinytale's nn.Linear weights (out, in) go transposed.
_TRANSPOSED = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj", "mlp.fc": "mlp.c_fc",
               "mlp.proj": "mlp.c_proj"}


class ExportError(UserError):
    """An export that cannot be written; the message names what to change."""


@dataclass
class Exported:
    folder: Path
    files: list[str]
    warnings: list[str] = field(default_factory=list)


def require_writer() -> None:
    """Fail early, in one sentence, where the safetensors package is missing."""
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        raise ExportError(f"exporting to Hugging Face format needs the safetensors package; "
                          f"run {INSTALL_HINT}.") from None


def gpt2_state_dict(model_state: dict[str, Any], n_layer: int) -> dict[str, Any]:
    """tinytale's parameter names and layouts -> GPT2LMHeadModel's (float32, contiguous).

    A model trained with `model.bias: false` gets zero biases: the same function, though a
    fine-tuning in transformers would then train them.
    """
    import torch

    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        out[f"transformer.{name}"] = tensor.detach().to(torch.float32).contiguous()

    put("wte.weight", model_state["wte.weight"])  # also the head: GPT-2 ties them too
    put("wpe.weight", model_state["wpe.weight"])
    n_embd = model_state["wte.weight"].shape[1]
    for i in range(n_layer):
        ours, theirs = f"blocks.{i}.", f"h.{i}."
        for norm in ("ln_1", "ln_2"):
            put(f"{theirs}{norm}.weight", model_state[f"{ours}{norm}.weight"])
            put(f"{theirs}{norm}.bias", model_state.get(f"{ours}{norm}.bias",
                                                        torch.zeros(n_embd)))
        for src, dst in _TRANSPOSED.items():
            weight = model_state[f"{ours}{src}.weight"]
            put(f"{theirs}{dst}.weight", weight.t())
            put(f"{theirs}{dst}.bias", model_state.get(f"{ours}{src}.bias",
                                                       torch.zeros(weight.shape[0])))
    put("ln_f.weight", model_state["ln_f.weight"])
    put("ln_f.bias", model_state.get("ln_f.bias", torch.zeros(n_embd)))
    return out


def gpt2_config(model: dict[str, Any], vocab_size: int, eos_id: int) -> dict[str, Any]:
    """config.json of a GPT2LMHeadModel with tinytale's shape (model.* of the experiment)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": model["block_size"],
        "n_embd": model["n_embd"],
        "n_layer": model["n_layer"],
        "n_head": model["n_head"],
        "n_inner": None,  # 4 x n_embd, as tinytale's MLP
        "activation_function": "gelu",  # exact (erf) GELU, as F.gelu; not GPT-2's tanh gelu_new
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": model["dropout"],
        "embd_pdrop": model["dropout"],
        "attn_pdrop": model["attn_dropout"],
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
    }


def hf_tokenizer_json(tokenizer: Tokenizer) -> str:
    """The tokenizer in Hugging Face `tokenizers` form, giving the same ids on the corpus.

    BPE is already one. Word: whitespace split over the vocabulary; char: every character
    its own piece, joined back without spaces (a Fuse decoder). Neither has an unknown token:
    text outside the vocabulary fails to encode, as it does in tinytale. tinytale's
    forgiving prompt matching (case, punctuation glued to words) is not carried over.
    """
    if tokenizer.kind == "bpe":
        return tokenizer.to_dict()["serialized"]
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    symbols: list[str] = tokenizer.symbols  # type: ignore[attr-defined]
    hf = HFTokenizer(models.WordLevel({s: i for i, s in enumerate(symbols)},
                                      unk_token="[UNK]"))
    if tokenizer.kind == "char":
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
    else:
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # decode joins with spaces
    hf.add_special_tokens([AddedToken(EOS, special=True)])
    return hf.to_str()


def _tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, Any]:
    config = {
        # The generic fast tokenizer: GPT2TokenizerFast would add GPT-2's own assumptions.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS, "eos_token": EOS, "pad_token": EOS,
        "model_max_length": block_size,
        # transformers would otherwise glue " ." and " 's" in word-level text on decode.
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": hf_tokenizer_json(tokenizer),
        "tokenizer_config.json": config,
        "special_tokens_map.json": {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS},
    }


def _warnings(model: dict[str, Any]) -> list[str]:
    if model.get("bias", True):
        return []
    return ["model.bias is false, which GPT-2 cannot express: the export holds zero biases, "
            "so it computes the same logits, but fine-tuning it in transformers trains those "
            "biases (tinytale's model has none)."]


def export_hf(checkpoint: Path, out_dir: Path) -> Exported:
    """Write `out_dir` (a new or empty folder) from a checkpoint; all files or none."""
    require_writer()
    from safetensors.torch import save_file

    from tinytale.checkpoint import load_checkpoint
    from tinytale.config import Config
    from tinytale.tokenizer import tokenizer_from_dict

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"OUT_DIR '{out_dir}' already exists and is not an empty folder; "
                          "give a new folder, or remove that one first.")
    state = load_checkpoint(checkpoint)
    # As trained: a checkpoint from before model.attn_dropout reads it as model.dropout.
    model = vars(Config.from_checkpoint(state["config"], f"checkpoint '{checkpoint}'").model)
    tokenizer = tokenizer_from_dict(state["tokenizer"])
    weights = gpt2_state_dict(state["model"], model["n_layer"])
    texts: dict[str, Any] = {
        "config.json": gpt2_config(model, tokenizer.vocab_size, tokenizer.eos_id),
        "generation_config.json": {"bos_token_id": tokenizer.eos_id,
                                   "eos_token_id": tokenizer.eos_id,
                                   "pad_token_id": tokenizer.eos_id},
        **_tokenizer_files(tokenizer, model["block_size"]),
    }
    # Written next to the target and renamed into place: a failed export leaves nothing.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, content in texts.items():
            text = content if isinstance(content, str) else json.dumps(content, indent=2)
            (tmp / name).write_text(text + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Exported(out_dir, sorted(["model.safetensors", *texts]), _warnings(model))
