"""Where stories come from: the built-in corpora or the user's files.

A corpus is a list (or, for large ones, a stream) of stories. A path is a file or a folder;
a folder contributes every corpus file below it (.txt, .jsonl, .json, .parquet, and .gz /
.zst of the text ones), in sorted order. How each format is read is `corpus.files`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tinytale.corpus import fairy, lesson
from tinytale.corpus.files import CorpusError, StoryFormat, is_corpus_file, stream_file

__all__ = ["BUILTIN", "CorpusError", "StoryFormat", "corpus_files", "load_corpus",
           "stream_stories"]

BUILTIN = {"lesson": lesson.generate, "fairy": fairy.generate}


def corpus_files(name_or_path: str) -> list[Path] | None:
    """The files behind a corpus, or None for a built-in one."""
    if name_or_path in BUILTIN:
        return None
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise CorpusError(
            f"data.corpus='{name_or_path}' is neither a built-in corpus "
            f"({', '.join(BUILTIN)}) nor an existing file or folder; fix the name or path."
        )
    if not path.is_dir():
        return [path]
    files = sorted(f for f in path.rglob("*") if f.is_file() and is_corpus_file(f))
    if not files:
        raise CorpusError(
            f"data.corpus folder '{path}' holds no corpus files (.txt, .jsonl, .json, "
            ".parquet, or .gz/.zst of the text ones); add some or point to a file."
        )
    return files


def load_corpus(name_or_path: str, n_stories: int | None = None, seed: int = 0,
                fmt: StoryFormat | None = None) -> list[str]:
    files = corpus_files(name_or_path)
    if files is None:
        try:
            return BUILTIN[name_or_path](n_stories, seed)
        except ValueError as exc:
            raise CorpusError(str(exc)) from None
    stories: list[str] = []
    for story in stream_stories(files, fmt):
        stories.append(story)
        if n_stories is not None and len(stories) == n_stories:
            break
    return stories


def stream_stories(files: list[Path], fmt: StoryFormat | None = None) -> Iterator[str]:
    """Stories one at a time, file after file: for corpora larger than memory."""
    for file in files:
        yield from stream_file(file, fmt or StoryFormat())
