"""The lesson corpus: tiny fairy tales over a word vocabulary of exactly 24 tokens.

Stories are drawn from a small grammar of our own. Every story is distinct, so splitting by
story really keeps validation text out of training. Tokens are separated by single spaces
(punctuation included) so the word tokenizer needs no rules of its own.
"""

from __future__ import annotations

import itertools
import random

EOS = "<eos>"

# The whole vocabulary. Tests check that generated stories use exactly these tokens.
VOCAB: tuple[str, ...] = (
    EOS, ".", ",",
    "once", "upon", "a", "time", "there", "was", "the", "in", "and",
    "princess", "dragon", "king", "castle", "forest", "gold",
    "brave", "kind", "lived", "found", "happily", "they",
)  # fmt: skip

_HEROES = ("princess", "dragon", "king")
_ADJECTIVES = ("brave", "kind")
_PLACES = ("castle", "forest")
_THINGS = ("gold", "princess", "dragon", "king")


def _story(hero: str, adj: str, place: str, thing: str, thing_adj: str, ending: int) -> str:
    lines = [
        f"once upon a time , there was a {adj} {hero} .",
        f"the {hero} lived in a {place} .",
        f"in the {place} , the {hero} found a {thing_adj} {thing} .",
    ]
    if ending == 0:
        lines.append(f"the {hero} and the {thing} lived happily .")
    elif ending == 1:
        lines.append(f"they lived happily in the {place} .")
    else:
        lines.append(f"the {adj} {hero} lived happily and the {thing} was {thing_adj} .")
    return " ".join(lines).replace("  ", " ")


def all_stories() -> list[str]:
    """Every story the grammar can tell, in a fixed order."""
    stories = []
    for hero, adj, place, thing, thing_adj, ending in itertools.product(
        _HEROES, _ADJECTIVES, _PLACES, _THINGS, _ADJECTIVES, range(3)
    ):
        if thing == hero:
            continue
        stories.append(_story(hero, adj, place, thing, thing_adj, ending))
    return stories


def generate(n_stories: int | None = None, seed: int = 0) -> list[str]:
    """`n_stories` distinct stories (default: all of them), shuffled by `seed`."""
    stories = all_stories()
    random.Random(seed).shuffle(stories)
    if n_stories is not None:
        if n_stories > len(stories):
            raise ValueError(
                f"data.n_stories={n_stories} is more than the {len(stories)} distinct lesson "
                f"stories; use at most {len(stories)}."
            )
        stories = stories[:n_stories]
    return stories
