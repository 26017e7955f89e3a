"""Folders that do not exist yet: which of them are missing, and whether they can be made.

Checked before anything is trained, fetched or logged, so a bad path fails in one sentence
instead of after the work it was meant to keep.
"""

from __future__ import annotations

import os
from pathlib import Path

from tinytale.errors import UserError


def missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def nearest_existing(path: Path) -> Path:
    """`path` if it exists, else its nearest parent that does (the root at the latest)."""
    missing = missing_folders(path)
    return missing[-1].parent if missing else path


def check_can_make_folder(folder: Path, label: str, if_file: str, if_read_only: str) -> None:
    """Refuse `folder` when it cannot become a folder: its nearest existing part is a file,
    or a folder this process cannot write to. `label` starts the message; `if_file` and
    `if_read_only` are the fix each case ends with."""
    probe = nearest_existing(folder)
    if not probe.is_dir():
        raise UserError(f"{label}: '{probe}' is a file, not a folder; {if_file}.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{label}: folder '{probe}' is not writable; {if_read_only}.")
