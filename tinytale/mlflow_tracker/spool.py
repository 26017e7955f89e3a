"""The spool: a run's append-only JSONL log of tracking records (no mlflow here)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any

from tinytale.errors import UserError

SPOOL_NAME = "mlflow_spool.jsonl"


class Spool:
    """Append-only JSONL file plus its records in memory; safe to append from two threads."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self.next_seq = 1
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - closed in close()
        try:  # one writer at a time: a training process, or `tinytale sync`
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no advisory locks, trust the user
            pass
        except OSError:
            self._file.close()
            raise UserError(f"'{path}' is in use by another tinytale process (a training "
                            "still running?); wait for it to end, then sync.") from None
        self._file.seek(0)
        text = self._file.read()
        for line in text.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            self.records.append(rec)
            if "seq" in rec:
                self.next_seq = max(self.next_seq, rec["seq"] + 1)
        if text and not text.endswith("\n"):
            self._file.write("\n")  # end the cut line, so the next record stands alone

    def append(self, rec: dict[str, Any], data: bool = True) -> dict[str, Any]:
        with self._lock:
            if data:
                rec = {"seq": self.next_seq, **rec}
                self.next_seq += 1
            self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
            self._file.flush()
            self.records.append(rec)
        return rec

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                with contextlib.suppress(OSError):
                    os.fsync(self._file.fileno())
                self._file.close()

    def first(self, op: str) -> dict[str, Any] | None:
        return next((r for r in self.records if r.get("op") == op), None)


def _public(rec: dict[str, Any]) -> dict[str, Any]:
    """A spool bookkeeping record without its bookkeeping fields."""
    return {k: v for k, v in rec.items() if k not in ("op", "uri")}
