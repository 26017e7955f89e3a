"""Where stories come from: the built-in corpora or the user's text files.

A corpus is a list of stories (strings). Files are split into stories at blank lines; a
folder contributes every `.txt` file below it, in sorted order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from tinytale.corpus import fairy, lesson
from tinytale.errors import UserError

BUILTIN = {"lesson": lesson.generate, "fairy": fairy.generate}

_STORY_BREAK = re.compile(r"\n\s*\n")


class CorpusError(UserError):
    """A corpus that cannot be read or is unusable; the message names the file and the fix."""


def corpus_files(name_or_path: str) -> list[Path] | None:
    """The text files behind a corpus, or None for a built-in one."""
    if name_or_path in BUILTIN:
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise CorpusError(
            f"data.corpus='{name_or_path}' is neither a built-in corpus "
            f"({', '.join(BUILTIN)}) nor an existing file or folder; fix the name or path."
        )
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if not files:
        raise CorpusError(
            f"data.corpus folder '{path}' holds no .txt files; add some or point to a file."
        )
    return files


def load_corpus(name_or_path: str, n_stories: int | None = None, seed: int = 0) -> list[str]:
    files = corpus_files(name_or_path)
    if files is None:
        try:
            return BUILTIN[name_or_path](n_stories, seed)
        except ValueError as exc:
            raise CorpusError(str(exc)) from None
    path = Path(name_or_path)
    stories: list[str] = []
    for file in files:
        stories.extend(_read_stories(file))
    if n_stories is not None:
        stories = stories[:n_stories]
    if not stories:
        raise CorpusError(f"data.corpus '{path}' contains no text; give a file with stories.")
    return stories


def stream_stories(files: list[Path]) -> Iterator[str]:
    """Stories one at a time, reading line by line: for corpora larger than memory."""
    for file in files:
        story: list[str] = []
        try:
            with open(file, encoding="utf-8", newline=None) as f:
                for number, line in enumerate(f, 1):
                    if "\0" in line:
                        raise CorpusError(f"data.corpus file '{file}' looks binary (NUL byte on "
                                          f"line {number}); give a text file.")
                    if line.strip():
                        story.append(line)
                    elif story:
                        yield " ".join(" ".join(story).split())
                        story = []
        except UnicodeDecodeError:
            raise CorpusError(f"data.corpus file '{file}' is not UTF-8 text; convert it to "
                              "UTF-8.") from None
        except OSError as exc:
            raise CorpusError(f"data.corpus file '{file}' cannot be read ({exc.strerror}); "
                              "check its permissions.") from None
        if story:
            yield " ".join(" ".join(story).split())


def _read_stories(file: Path) -> list[str]:
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CorpusError(
            f"data.corpus file '{file}' cannot be read ({exc.strerror}); check its permissions."
        ) from None
    if b"\x00" in data:
        raise CorpusError(
            f"data.corpus file '{file}' looks binary (it contains NUL bytes); give a text file."
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(
            f"data.corpus file '{file}' is not UTF-8 text (bad byte at offset {exc.start}); "
            "convert it to UTF-8."
        ) from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return [" ".join(s.split()) for s in _STORY_BREAK.split(text) if s.strip()]
