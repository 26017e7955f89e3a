"""Reading a run's spool the way the tests check it."""

import contextlib
import json
from pathlib import Path


def spool_records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            out.append(json.loads(line))
    return out
