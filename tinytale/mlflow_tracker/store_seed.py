"""A new embedded store from a copy, not from MLflow's migrations.

MLflow creates an SQLite store by running every schema migration since its first version
(about 140 Alembic scripts: ~2 s of CPU on a 2-core machine, in the helper process that a
first `tinytale train` in a folder shares the cores with). The result is the same each time
for one MLflow version, so after creating one store we keep an empty copy in the user's cache
and start the next new store from it.

The copy leaves out the one row that names its folder: the Default experiment, whose
artifact location is that store's own. MLflow creates the Default experiment whenever it
opens a store that lacks it, so a seeded store gets one that names its own folder.
Everything here is best effort: anything unexpected and MLflow creates the store as usual.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

SEED_ENV = "TINYTALE_STORE_SEED"  # "0": never seed nor keep a copy


def seed_path() -> Path | None:
    """The cached empty store for this MLflow version, under $XDG_CACHE_HOME (or ~/.cache)."""
    if os.environ.get(SEED_ENV, "1") == "0":
        return None
    import mlflow  # the helper has imported it already

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tinytale" / f"mlflow-{mlflow.__version__}-empty.db"


def seed_store(db: Path) -> bool:
    """Start `db`, which must not exist yet, as a copy of the cached empty store; True if so.

    The copy is made beside `db` and linked into place, so a store another process created
    meanwhile is kept, and no reader ever sees half a file."""
    seed = seed_path()
    if seed is None or db.exists() or not _is_empty_store(seed):
        return False
    tmp = db.with_name(f".{db.name}.seed-{os.getpid()}")
    try:
        shutil.copyfile(seed, tmp)
        os.link(tmp, db)  # FileExistsError if db appeared meanwhile: that one stands
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def keep_seed(db: Path) -> None:
    """Keep an empty copy of `db`, a store MLflow has just created, for later new stores."""
    seed = seed_path()
    if seed is None or _is_empty_store(seed):  # a damaged copy is replaced
        return
    tmp = seed.with_name(f".{seed.name}.{os.getpid()}")
    try:
        seed.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(db)) as src, \
                contextlib.closing(sqlite3.connect(tmp)) as dst:
            src.backup(dst)  # a consistent copy, even if a run is writing to db already
            dst.execute("DELETE FROM experiments WHERE experiment_id = 0")
            dst.commit()
        if _is_empty_store(tmp):
            os.replace(tmp, seed)
    except (OSError, sqlite3.Error):
        pass
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _is_empty_store(path: Path) -> bool:
    """A store with its schema stamped and nothing in it: no experiment, run or model."""
    if not path.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            if db.execute("SELECT count(*) FROM alembic_version").fetchone()[0] != 1:
                return False
            return all(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0
                       for table in ("experiments", "runs", "registered_models"))
    except sqlite3.Error:
        return False
