"""Word, char and byte-level BPE tokenizers behind one small interface.

Every tokenizer has an end-of-story token (`eos_id`), round-trips through a JSON-able dict
(`to_dict` / `tokenizer_from_dict`) so a checkpoint carries its own tokenizer, and raises
`TokenizerError` naming the offending text for input it cannot encode.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from tinytale.errors import UserError

EOS = "<eos>"


class TokenizerError(UserError):
    """Text the tokenizer cannot encode (out-of-vocabulary words or characters)."""


class Tokenizer(Protocol):
    kind: str
    eos_id: int

    @property
    def vocab_size(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...
    def encode_many(self, stories: Sequence[str]) -> np.ndarray: ...


class _VocabTokenizer:
    """Shared machinery for tokenizers with an explicit symbol list."""

    kind = "vocab"
    _unit = "symbol"

    def __init__(self, symbols: Sequence[str]):
        self.symbols = list(symbols)
        self._index = {s: i for i, s in enumerate(self.symbols)}
        self.eos_id = self._index[EOS]

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def _split(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        pieces = self._split(text)
        missing = [p for p in pieces if p not in self._index]
        if missing:
            raise self._unknown(missing)
        return [self._index[p] for p in pieces]

    def _unknown(self, missing: Sequence[str]) -> TokenizerError:
        """One sentence naming the unknown symbols (first 8, in order) and, for a vocabulary
        small enough to read (the lesson's 24 words), every symbol that would work."""
        missing = list(dict.fromkeys(missing))
        unit = self._unit if len(missing) == 1 else f"{self._unit}s"
        shown = ", ".join(repr(m) for m in missing[:8])
        if len(missing) > 8:
            shown += f" and {len(missing) - 8} more"
        known = [s for s in self.symbols if s != EOS]
        hint = f" (it has {len(known)}: {' '.join(known)})" if len(known) <= 40 else ""
        return TokenizerError(f"the {self.kind} tokenizer does not know the {unit} {shown}; "
                              f"use only {self._unit}s from the training corpus{hint}.")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "symbols": self.symbols}

    def encode_many(self, stories: Sequence[str]) -> np.ndarray:
        """Every story's ids followed by the end-of-story id, as one array."""
        ids: list[int] = []
        for story in stories:
            ids.extend(self.encode(story))
            ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int64)


# A word with its inner apostrophes and hyphens ("miller's", "well-known"), or any other
# single non-space character: how a typed prompt falls apart into corpus-style tokens.
_PROMPT_PIECE = re.compile(r"\w+(?:['\u2019-]\w+)*|[^\w\s]")


def _fold(word: str) -> str:
    """Case and apostrophe style do not matter in a prompt: 'Once' is 'once', 'don’t' 'don't'."""
    return word.casefold().replace("\u2019", "'")


class WordTokenizer(_VocabTokenizer):
    """Whitespace-separated words, exactly as the corpus spells them (the lesson corpus is
    lowercase with punctuation standing apart).

    Training text is split on whitespace only, so corpus ids never depend on the rules below.
    A prompt word the vocabulary lacks is matched ignoring case, and else split into words and
    punctuation ("Time," -> "time" ","), so what a person types works over known words.
    """

    kind = "word"
    _unit = "word"

    def __init__(self, symbols: Sequence[str]):
        super().__init__(symbols)
        # Several spellings can fold alike ("The", "the"): the one already folded wins, else
        # the first in vocabulary order, so a prompt always means the same ids.
        self._folded: dict[str, int] = {}
        for i, symbol in enumerate(self.symbols):
            key = _fold(symbol)
            if key not in self._folded or symbol == key:
                self._folded[key] = i

    @classmethod
    def train(cls, stories: Iterable[str]) -> WordTokenizer:
        words = sorted({w for story in stories for w in story.split()} - {EOS})
        return cls([EOS, *words])

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        missing: list[str] = []
        for word in text.split():
            exact = self._index.get(word)
            if exact is not None:  # every corpus word: training takes this path only
                ids.append(exact)
                continue
            folded = self._folded.get(_fold(word))
            if folded is not None:
                ids.append(folded)
                continue
            for piece in _PROMPT_PIECE.findall(word):
                found = self._index.get(piece, self._folded.get(_fold(piece)))
                if found is None:
                    missing.append(piece)
                else:
                    ids.append(found)
        if missing:
            raise self._unknown(missing)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        words = [self.symbols[i] for i in ids]
        return " ".join("\n" if w == EOS else w for w in words).replace(" \n ", "\n")


class CharTokenizer(_VocabTokenizer):
    """One token per character; the end-of-story token decodes to a blank line."""

    kind = "char"
    _unit = "character"

    @classmethod
    def train(cls, stories: Iterable[str]) -> CharTokenizer:
        return cls([EOS, *sorted({c for story in stories for c in story})])

    def _split(self, text: str) -> list[str]:
        return list(text)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join("\n\n" if i == self.eos_id else self.symbols[i] for i in ids)

    def encode_many(self, stories: Sequence[str]) -> np.ndarray:
        """Vectorised: code points -> ids through a lookup table (GB/s instead of MB/s)."""
        if not hasattr(self, "_lut"):
            lut = np.full(max(ord(s) for s in self.symbols if s != EOS) + 2, -1, np.int64)
            for i, s in enumerate(self.symbols):
                if s != EOS:
                    lut[ord(s)] = i
            self._lut = lut
        # NUL never occurs in a corpus (binary files are refused): it marks story ends.
        points = np.frombuffer(("\0".join(stories) + "\0").encode("utf-32-le"), np.uint32)
        inside = points < len(self._lut) - 1
        ids = np.where(inside, self._lut[np.minimum(points, len(self._lut) - 1)], -1)
        ids[points == 0] = self.eos_id
        if (ids < 0).any():
            bad = sorted({chr(p) for p in points[ids < 0][:50]})
            raise TokenizerError(f"the char tokenizer does not know the characters "
                                 f"{', '.join(repr(b) for b in bad[:8])}; use only characters "
                                 "from the training corpus.")
        return ids


class BPETokenizer:
    """Byte-level BPE trained on the corpus with Hugging Face `tokenizers` (Rust, fast)."""

    kind = "bpe"

    def __init__(self, serialized: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._serialized = serialized
        self._tok = HFTokenizer.from_str(serialized)
        eos = self._tok.token_to_id(EOS)
        if eos is None:
            raise TokenizerError("the bpe tokenizer has no end-of-story token; retrain it.")
        self.eos_id = eos

    @classmethod
    def train(cls, stories: Iterable[str], vocab_size: int = 512) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(stories, trainer=trainer)  # streams: no list of the corpus
        return cls(tok.to_str())

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids  # byte-level: every string is encodable

    def encode_many(self, stories: Sequence[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in self._tok.encode_batch(list(stories)):  # parallel, in Rust
            ids.extend(enc.ids)
            ids.append(self.eos_id)
        return np.asarray(ids, dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        out, chunk = [], []
        for i in ids:
            if i == self.eos_id:
                out.append(self._tok.decode(chunk) + "\n\n")
                chunk = []
            else:
                chunk.append(i)
        out.append(self._tok.decode(chunk))
        return "".join(out)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "serialized": self._serialized}


def train_tokenizer(kind: str, stories: Iterable[str], bpe_vocab_size: int = 512) -> Tokenizer:
    if kind == "word":
        return WordTokenizer.train(stories)
    if kind == "char":
        return CharTokenizer.train(stories)
    if kind == "bpe":
        return BPETokenizer.train(stories, bpe_vocab_size)
    raise TokenizerError(f"data.tokenizer={kind!r} is unknown; use word, char or bpe.")


def tokenizer_from_dict(state: dict[str, Any]) -> Tokenizer:
    kind = state.get("kind")
    if kind == "word":
        return WordTokenizer(state["symbols"])
    if kind == "char":
        return CharTokenizer(state["symbols"])
    if kind == "bpe":
        return BPETokenizer(state["serialized"])
    raise TokenizerError(f"saved tokenizer kind {kind!r} is unknown; the file may be damaged.")


def load_tokenizer_file(path: str | Path, expected_kind: str,
                        field: str = "data.tokenizer_file") -> Tokenizer:
    """A tokenizer to reuse: an earlier run's checkpoint (.pt), tinytale's own JSON, or a
    Hugging Face `tokenizer.json` (BPE, or the word/char ones `tinytale export` writes)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TokenizerError(f"{field}='{path}' is not a file; give a tokenizer.json or a "
                             "checkpoint (.pt) of an earlier run.")
    if file.suffix == ".pt":
        from tinytale.checkpoint import load_checkpoint  # torch: only for checkpoints

        tokenizer = tokenizer_from_dict(load_checkpoint(file)["tokenizer"])
    else:
        try:
            state = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise TokenizerError(f"{field}='{path}' is not a JSON tokenizer file; give a "
                                 "tokenizer.json or a checkpoint (.pt).") from None
        tokenizer = _tokenizer_from_json(state, f"{field}='{path}'")
    if tokenizer.kind != expected_kind:
        raise TokenizerError(f"{field}='{path}' holds a {tokenizer.kind} tokenizer but "
                             f"data.tokenizer is {expected_kind!r}; set "
                             f"data.tokenizer={tokenizer.kind}.")
    return tokenizer


def _tokenizer_from_json(state: Any, where: str) -> Tokenizer:
    if isinstance(state, dict) and state.get("kind") in ("word", "char", "bpe"):
        return tokenizer_from_dict(state)
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict) or model.get("type") not in ("BPE", "WordLevel"):
        raise TokenizerError(f"{where} is neither a tinytale tokenizer nor a Hugging Face BPE "
                             "or word-level tokenizer.json; give one of those.")
    vocab = model.get("vocab") or {}
    if EOS not in vocab:
        raise TokenizerError(f"{where} has no {EOS} token to end stories with; add it as a "
                             "special token or train a tokenizer instead.")
    if model["type"] == "BPE":
        return BPETokenizer(json.dumps(state))
    symbols = [s for s, _ in sorted(vocab.items(), key=lambda item: item[1])]
    # `tinytale export` joins char tokens with a Fuse decoder, word tokens with spaces.
    decoder = state.get("decoder") or {}
    return (CharTokenizer if decoder.get("type") == "Fuse" else WordTokenizer)(symbols)
