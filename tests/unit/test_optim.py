"""EagerAdamW is torch's AdamW bit for bit, and it never loads torch._dynamo.

The first claim is what lets the loop use it: same weights, same moments, same state_dict,
and checkpoints interchangeable with torch.optim.AdamW's in both directions. The second is
why it exists (about 1 s of the lesson's start-up); a torch release that moves the methods'
bodies would fail the subprocess test rather than silently lose the saving.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support.configs import REPO

from tinytale.model import GPT, GPTConfig, param_groups
from tinytale.optim import EagerAdamW, make_adamw


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=24, block_size=16, n_layer=2, n_head=2, n_embd=32))


def train(model: GPT, opt: torch.optim.Optimizer, steps: range) -> None:
    """Steps as the loop takes them: a new lr each step, clipping, zero_grad to None."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = (torch.randint(0, 24, (4, 16), generator=g) for _ in range(2))
        _, loss = model(x, y)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = 3e-3 * (0.9 ** step)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def assert_same(a: torch.nn.Module, b: torch.nn.Module, sa: dict, sb: dict) -> None:
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for index, moments in sa["state"].items():
        for key, value in moments.items():
            assert torch.equal(value, sb["state"][index][key]), (index, key)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_eager_adamw_is_torch_adamw_bit_for_bit(fused):
    runs = []
    for cls in (EagerAdamW, torch.optim.AdamW):
        model = tiny_model()
        opt = cls(param_groups(model, 0.1), lr=3e-3, betas=(0.9, 0.99), fused=fused)
        train(model, opt, range(12))
        runs.append((model, opt.state_dict()))
    assert_same(runs[0][0], runs[1][0], runs[0][1], runs[1][1])


@pytest.mark.parametrize("first, then", [(torch.optim.AdamW, EagerAdamW),
                                         (EagerAdamW, torch.optim.AdamW)],
                         ids=["torch-to-eager", "eager-to-torch"])
def test_checkpoints_resume_across_the_two_classes(first, then):
    """A checkpoint from either class resumes in the other exactly as in its own."""
    ends = []
    for resume_cls in (first, then):
        model = tiny_model()
        opt = first(param_groups(model, 0.1), lr=3e-3, fused=True)
        train(model, opt, range(5))
        saved = opt.state_dict()
        resumed = resume_cls(param_groups(model, 0.1), lr=3e-3, fused=True)
        resumed.load_state_dict(saved)
        train(model, resumed, range(5, 10))
        ends.append((model, resumed.state_dict()))
    assert_same(ends[0][0], ends[1][0], ends[0][1], ends[1][1])


def test_make_adamw_leaves_compiled_training_to_torch_adamw():
    model = tiny_model()
    assert type(make_adamw(param_groups(model, 0.0), compiled=False, lr=1e-3)) is EagerAdamW
    assert type(make_adamw(param_groups(model, 0.0), compiled=True, lr=1e-3)) \
        is torch.optim.AdamW


PROBE = """
import sys, tempfile, torch
from test_optim import tiny_model, train
from tinytale.model import param_groups
from tinytale.optim import make_adamw
model = tiny_model()
opt = make_adamw(param_groups(model, 0.1), compiled=False, lr=3e-3)
train(model, opt, range(3))
path = tempfile.mktemp()
torch.save({"optimizer": opt.state_dict()}, path)
opt.load_state_dict(torch.load(path, weights_only=True)["optimizer"])
train(model, opt, range(3, 5))
print("torch._dynamo" in sys.modules)
"""


def test_eager_training_never_imports_dynamo():
    """In a fresh interpreter: steps, zero_grad, a state_dict through torch.save and back."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         cwd=REPO / "tests" / "unit", timeout=120,
                         env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
