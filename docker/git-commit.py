"""Print the commit a Docker build context was made from, without git (docker/Dockerfile).

    python3 git-commit.py GIT_DIR [OVERRIDE]

GIT_DIR holds what .dockerignore lets through of the checkout's .git: HEAD, refs/ and
packed-refs. OVERRIDE, the TINYTALE_GIT_COMMIT build argument, wins when given (a build from
an export or a worktree, where the context has no usable .git). Prints the commit, or nothing
when it is unknown: the runs then carry no git_commit tag rather than a wrong one.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 repositories


def resolve(git_dir: Path) -> str:
    """HEAD's commit: detached, a loose ref, or a ref listed in packed-refs; else ''."""
    try:
        head = (git_dir / "HEAD").read_text(encoding="utf-8").strip()
    except OSError:  # no .git in the context, or .git is a worktree's pointer file
        return ""
    if COMMIT.fullmatch(head):
        return head
    if not head.startswith("ref: "):
        return ""
    ref = head.removeprefix("ref: ").strip()
    try:
        loose = (git_dir / ref).read_text(encoding="utf-8").strip()
        if COMMIT.fullmatch(loose):
            return loose
    except OSError:
        pass  # packed by `git gc`: only in packed-refs
    try:
        packed = (git_dir / "packed-refs").read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    for line in packed:
        commit, _, name = line.partition(" ")
        if name == ref and COMMIT.fullmatch(commit):
            return commit
    return ""


def main(argv: list[str]) -> int:
    override = argv[2].strip().lower() if len(argv) > 2 else ""
    if override:
        if not re.fullmatch(r"[0-9a-f]{7,64}", override):
            print(f"git-commit: ERROR: TINYTALE_GIT_COMMIT='{argv[2]}' is not a commit hash; "
                  "pass `git rev-parse HEAD` or leave it empty.", file=sys.stderr)
            return 2
        print(override)
        return 0
    print(resolve(Path(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
