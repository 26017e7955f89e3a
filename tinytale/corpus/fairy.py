"""The fairy corpus: original fairy tales told by a grammar of our own, for char and BPE training.

Each story follows the shape of a folk tale (a hero, a lack, a journey, three trials, a
helper, a return) with choices drawn from the word lists below. The same seed always
tells the same stories; the default 200 stories come to roughly 250 KB of text.
"""

from __future__ import annotations

import random

DEFAULT_STORIES = 200

# The hero is a she or a he, and the name, the role and every pronoun of the tale follow
# from that one choice: a model should not learn that "princess Mabel" is a "he".
# subject, object, possessive
_PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}
_NAMES = {
    "she": ("Mira", "Elsa", "Ilsa", "Wren", "Lina", "Greta", "Nell", "Tilda", "Ysolde", "Mabel"),
    "he": ("Tobin", "Rowan", "Bram", "Odo", "Pell", "Finn", "Arno", "Hob", "Corin", "Jory"),
}  # fmt: skip
_ANYONES_ROLES = ("young tailor", "shepherd", "little baker", "weaver's apprentice",
                  "poor cobbler")  # fmt: skip
_ROLES = {
    "she": ("miller's daughter", "goose girl", "youngest princess", *_ANYONES_ROLES),
    "he": ("woodcutter's son", "fisher boy", "youngest prince", *_ANYONES_ROLES),
}  # fmt: skip
_HOMES = (
    "a village at the edge of the dark wood", "a cottage by the silver river",
    "a tall tower with one window", "a mill beside the singing brook",
    "a hut on the windy hill", "a town of crooked roofs",
)  # fmt: skip
_LACKS = (
    ("the well had run dry", "water for the village", "the well filled to the brim"),
    ("the sun had not risen for seven days", "the lost key of the morning",
     "the sun rose the very next day"),
    ("the old king had fallen into a sleep no one could break", "the flower that wakes",
     "the old king woke and called for breakfast"),  # no "his": every he/she is the hero
    ("a frost had eaten every apple in the orchard", "the warm seed of summer",
     "the orchard bloomed again"),
    ("the bells of the town had lost their voices", "the song under the mountain",
     "the bells rang out over the roofs"),
    ("the sheep had wandered into the fog", "the shepherd's silver whistle",
     "every sheep came trotting home"),
)  # fmt: skip
_PLACES = (
    "the glass mountain", "the kingdom under the lake", "the forest of whispering pines",
    "the castle of the east wind", "the marsh where the lanterns float",
    "the garden at the end of the world",
)  # fmt: skip
_HELPERS = (
    ("an old woman", "a crust of bread"), ("a lame fox", "a drink of water"),
    ("a talking crow", "the last of {their} cheese"), ("a tiny mouse", "a kind word"),
    ("a lost bear cub", "a warm place by the fire"), ("a white hare", "a song"),
)  # fmt: skip
_GIFTS = (
    "a thread that never breaks", "a shoe that walks by itself", "a feather that points home",
    "a cloak that makes the wearer small", "a nut with a storm inside",
    "a ring that hears lies",
)  # fmt: skip
_FOES = (
    ("a troll", "under the bridge", "riddles"), ("a witch", "in a house of bones", "spells"),
    ("a giant", "on the high road", "stones"), ("a dragon", "in a cave of red gold", "fire"),
    ("a grey wolf", "among the birches", "teeth"), ("an ogre", "at the crossroads", "hunger"),
)  # fmt: skip
_TRIALS = (
    "to count every star before dawn", "to carry water in a sieve",
    "to spin straw into rope", "to find a single grain of rice in a barn of barley",
    "to cross the river without getting wet", "to make the proud princess laugh",
    "to sort a hundred feathers by colour", "to guess the name of the wind",
)  # fmt: skip
_OPENINGS = (
    "Once upon a time", "Long ago, when wishing still helped", "In a land beyond the seven hills",
    "Once, before there were clocks", "Not so long ago and not so far away",
)  # fmt: skip
_ENDINGS = (
    "and they lived happily ever after.",
    "and if they have not died, they are living still.",
    "and the whole village danced until morning.",
    "and from that day on, nobody in {home} was ever cold again.",
)  # fmt: skip


def _the(someone: str) -> str:
    """'a lame fox' -> 'the lame fox': how a tale names a character it has met before."""
    return "the " + someone.split(" ", 1)[1]


def _tell(rng: random.Random) -> str:
    pronoun = rng.choice(tuple(_PRONOUNS))
    _, them, their = _PRONOUNS[pronoun]
    cap = pronoun.capitalize()
    name = rng.choice(_NAMES[pronoun])
    role = rng.choice(_ROLES[pronoun])
    home = rng.choice(_HOMES)
    trouble, cure, mended = rng.choice(_LACKS)
    place = rng.choice(_PLACES)
    helper, kindness = rng.choice(_HELPERS)
    kindness = kindness.format(their=their)
    gift = rng.choice(_GIFTS)
    foe, lair, weapon = rng.choice(_FOES)
    trials = rng.sample(_TRIALS, 3)
    opening = rng.choice(_OPENINGS)

    parts = [
        f"{opening}, there lived a {role} named {name} in {home}.",
        f"One year {trouble}, and nobody knew what to do.",
        f'"I will go and find {cure}," said {name}, and {pronoun} set out for {place}.',
        f"On the road {pronoun} met {helper}, who was hungry and tired.",
        f"{name} gave {_the(helper)} {kindness}, though {pronoun} had little enough.",
        f'"For your kindness, take {gift}," said {_the(helper)}. "It will help you when all '
        'is lost."',
        f"At {place} {pronoun} met {foe} {lair}, who set {them} three tasks.",
    ]
    for i, trial in enumerate(trials):
        count = ("first", "second", "third")[i]
        parts.append(f"The {count} task was {trial}.")
        if i < 2:
            parts.append(
                rng.choice(
                    (
                        f"{cap} worked all night, and by morning it was done.",
                        f"{cap} thought for a long while, and then {pronoun} laughed, "
                        "for the answer was simple.",
                        f"{cap} wept a little, then dried {their} eyes and began.",
                    )
                )
            )
        else:
            parts.append(
                f"This task was too hard, and {_the(foe)} came at {name} with {weapon}. "
                f"Then {name} remembered {gift}, and with it {pronoun} won the day."
            )
    parts.append(f"{_the(foe).capitalize()} fled, and {name} found {cure} at last.")
    parts.append(
        f"{cap} went home to {home}, {mended}, "
        + rng.choice(_ENDINGS).format(home=home)
    )
    return " ".join(parts)


def generate(n_stories: int | None = None, seed: int = 0) -> list[str]:
    """`n_stories` tales (default 200), the same for the same seed on every machine."""
    rng = random.Random(f"tinytale-fairy-{seed}")
    return [_tell(rng) for _ in range(n_stories or DEFAULT_STORIES)]
