"""The optimizer: torch's AdamW, and for eager training the same AdamW without its compile guards.

torch.optim's public methods (step, zero_grad, add_param_group, state_dict, load_state_dict)
carry guards for torch.compile that import torch._dynamo on their first call. That import
is 0.8-1.3 s on a 2-core CPU: a fifth of the lesson's whole process, for a training that
compiles nothing. `EagerAdamW` calls the same methods' undecorated bodies (the decorators
keep them as `__wrapped__`, the functools convention), so the update, the state and the
state_dict are torch's own, bit for bit (tests/unit/test_optim.py). Where a torch version hides
a body, `make_adamw` falls back to plain torch.optim.AdamW: slower to start, same result.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

GUARDED = ("step", "zero_grad", "add_param_group", "state_dict", "load_state_dict")


def _bodies() -> dict[str, Callable[..., Any]] | None:
    """Each guarded method's body, unwrapped; None if any is not reachable that way."""
    bodies = {}
    for name in GUARDED:
        method = getattr(torch.optim.AdamW, name)
        body = inspect.unwrap(method)
        if body is method:
            return None
        bodies[name] = body
    return bodies


_BODIES = _bodies()


class EagerAdamW(torch.optim.AdamW):
    """torch.optim.AdamW for code that is never compiled: no torch._dynamo import."""

    def step(self, closure: Callable[[], float] | None = None) -> Any:
        # What the guard does in eager mode: gradients off, unless the update is differentiable.
        with torch.set_grad_enabled(self.defaults["differentiable"]):
            return _BODIES["step"](self, closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _BODIES["zero_grad"](self, set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _BODIES["add_param_group"](self, param_group)

    def state_dict(self) -> dict[str, Any]:
        return _BODIES["state_dict"](self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _BODIES["load_state_dict"](self, state_dict)


def make_adamw(groups: list[dict], compiled: bool, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW over `groups`: fused where the device has the kernel (one launch for the whole
    update); `EagerAdamW` unless the training compiles (then dynamo is loaded anyway)."""
    cls = torch.optim.AdamW if compiled or _BODIES is None else EagerAdamW
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):
        return cls(groups, **kwargs)
