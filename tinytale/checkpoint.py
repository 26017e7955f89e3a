"""Atomic save and safe load of the full training state.

A checkpoint is a plain dict of tensors and primitives written with `torch.save` to a
temporary file in the same folder, fsynced, then renamed over the target, so a crash at
any moment leaves either the old or the new file, never half of one. `last.pt` keeps its
predecessor as `last.prev.pt`, so `--resume auto` has a fallback if the newest one is
damaged. Loading uses `weights_only=True`: no pickled code is ever executed.
`CheckpointWriter` does the same writes on a background thread for GPU training.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from tinytale.errors import UserError

FORMAT_VERSION = 1
BEST = "best.pt"
LAST = "last.pt"
LAST_PREV = "last.prev.pt"
# best.pt without what only training reads: what a run publishes (the registered model).
MODEL = "model.pt"
TRAINING_ONLY = ("optimizer", "rng")


class CheckpointError(UserError):
    """A checkpoint that is missing, truncated or not ours; the message names the file."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: dict[str, Any], path: str | Path, keep_previous: bool = False,
                    copies: Sequence[str | Path] = ()) -> Path:
    """Write `state` to `path` atomically; with keep_previous the old file becomes `*.prev.pt`.
    Each of `copies` gets the same bytes, copied from `path` rather than serialised again
    (best.pt on an epoch that improved: serialising is most of a small model's checkpoint)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(path, lambda f: torch.save({"format": FORMAT_VERSION, **state}, f),
                        keep_previous)
    for copy in map(Path, copies):
        copy.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "rb") as src:
            _replace_atomically(copy, lambda f, src=src: shutil.copyfileobj(src, f, 1 << 20))
    return path


def save_model_copy(checkpoint: str | Path, dest: str | Path) -> dict[str, Any]:
    """`checkpoint` without its AdamW moments and RNG states, written atomically to `dest`:
    about a third of the size, and all that loading the model reads. Returns its state."""
    state = load_checkpoint(checkpoint)
    for key in TRAINING_ONLY:
        state.pop(key, None)
    save_checkpoint(state, dest)
    return state


def _replace_atomically(path: Path, write: Callable[[BinaryIO], object],
                        keep_previous: bool = False) -> None:
    """`write` fills a temporary file beside `path`, which is fsynced and renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, path.with_name(path.stem + ".prev" + path.suffix))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def snapshot(value: Any) -> Any:
    """A copy of `value` that later training steps cannot change: tensors copied to the CPU."""
    if isinstance(value, torch.Tensor):
        copy = value.detach()
        return copy.clone() if copy.device.type == "cpu" else copy.cpu()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(snapshot(v) for v in value)
    return value


class CheckpointWriter:
    """Writes checkpoints on one background thread, in the order they were submitted.

    `submit` copies the state (a few ms; a device-to-host copy on a GPU) and returns, so
    serialising, fsync and rename overlap the next epoch instead of stalling it. Each write
    is still atomic (`save_checkpoint`). At most `depth` writes are pending, so a slow disk
    slows training down rather than filling memory. A failed write is raised by the next
    `submit`, `wait` or `close`. Writes already submitted finish even if training raises:
    the pool's thread is joined when the interpreter exits. With `background=False` it
    writes in the caller's thread: right for CPU training, where the cores are busy and a
    writer thread only competes with the loop.
    """

    def __init__(self, background: bool = True, depth: int = 2):
        self.depth = depth
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="tinytale-checkpoint")
                      if background else None)
        self._pending: deque[Future[Path]] = deque()

    def submit(self, state: dict[str, Any], path: str | Path, keep_previous: bool = False,
               copies: Sequence[str | Path] = ()) -> Path:
        # Collect finished writes (raising a failure), and wait while too many are pending.
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.depth):
            self._pending.popleft().result()
        if self._pool is None:
            return save_checkpoint(state, path, keep_previous, copies)
        self._pending.append(self._pool.submit(save_checkpoint, snapshot(state), Path(path),
                                               keep_previous, tuple(copies)))
        return Path(path)

    def wait(self) -> None:
        """Block until every submitted checkpoint is on disk."""
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    mmap: bool = False) -> dict[str, Any]:
    """The whole state; `mmap=True` maps tensors from the file instead of reading them."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path.")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # truncated zip, wrong format, unsafe pickle: all user-facing
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "weights only load failed" in str(exc).lower():
            # Not torch's hint to retry with weights_only=False: that would run the file's code.
            reason = "it holds pickled objects beyond tensors and plain data, never loaded"
        raise CheckpointError(
            f"checkpoint '{path}' cannot be loaded ({reason}); it is damaged or not a tinytale "
            "checkpoint, so use another one (e.g. last.prev.pt) or retrain."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise CheckpointError(
            f"checkpoint '{path}' is not a tinytale checkpoint (format "
            f"{state.get('format') if isinstance(state, dict) else '?'}); use one written by "
            "`tinytale train`."
        )
    return state


def peek_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state for reading its small fields (`run_id`, `finished`, `epoch`).

    Tensors are memory-mapped, not read, so looking through many large checkpoints costs
    little; a truncated or foreign file still raises CheckpointError.
    """
    return load_checkpoint(path, mmap=True)


def capture_rng() -> dict[str, Any]:
    """Every RNG that affects training, in a form `weights_only` loading accepts."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def find_resumable(folder: str | Path) -> Path | None:
    """The newest loadable last checkpoint of an unfinished run under `folder`, if any.

    Looks at `last.pt` then `last.prev.pt` in `folder` and its run subfolders, newest
    first; a damaged file is skipped in favour of the previous good one.
    """
    folder = Path(folder)
    if not folder.exists():
        return None
    candidates = [p for name in (LAST, LAST_PREV) for p in folder.rglob(name)]
    candidates.sort(key=lambda p: (p.stat().st_mtime, p.name == LAST), reverse=True)
    for path in candidates:
        try:
            state = peek_checkpoint(path)
        except CheckpointError:
            continue
        if not state.get("finished", False):
            return path
        # The newest run finished: `auto` means a fresh start, not reviving an older run.
        return None
    return None
