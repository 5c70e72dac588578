"""A seeded synthetic world with invented names: countries, cities, two invented languages,
chemical elements and numbers. Nothing here refers to real-world facts, so a model trained on
it knows exactly what the world says and nothing else."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# English glosses for the invented languages. Kept to plain, harmless words so that the
# translation data never overlaps with the harmful-instruction vocabulary.
ENGLISH_WORDS: tuple[str, ...] = tuple(
    """
    water fire stone tree river mountain house bread salt moon sun star sky rain snow wind cloud
    sea lake road door window wall roof bed table chair book letter song dance dog cat horse bird
    fish cow sheep goat wolf bear fox mouse snake bee ant apple pear grape rice milk egg cheese
    honey meat soup tea wine cup bowl spoon plate shirt shoe hat coat ring gold silver iron copper
    glass paper ink pen key box bag ship boat cart wheel bridge tower castle garden field forest
    hill valley island desert beach flower grass leaf root seed branch king queen child mother
    father sister brother friend teacher doctor farmer baker singer sailor hand foot head eye ear
    nose mouth heart hair red blue green yellow white black big small old new fast slow hot cold
    happy sad bright dark sweet bitter soft hard warm quiet loud early late morning night day week
    year winter summer autumn north south east west run walk sing read write eat drink sleep swim
    fly build open close give take see hear speak laugh play work rest cook wash buy sell carry
    climb jump dream think learn teach count paint draw grow plant call wait smile kind brave
    clever proud shy tall short long wide deep clean fresh rich poor empty full heavy light thin
    thick round wet dry gentle wise young lamp candle clock map rope basket drum flute
    bell coin market village city town street school temple farm mill well pond stream shore
    cave nest feather shell pearl silk wool cotton oil butter sugar pepper bean corn potato onion
    carrot lemon orange cherry plum peach nut olive mushroom owl duck goose swan frog turtle whale
    crab deer rabbit lion tiger eagle crow parrot camel donkey pig hen rooster kitten puppy
    """.split()
)

# Syllable parts for invented names. The onsets and codas avoid forming common English words.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "tr", "th", "sh", "vl", "zh", "qu", "y")
_NUCLEI = ("a", "e", "i", "o", "u", "a", "e", "o", "ia", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "m", "v")


@dataclass(frozen=True)
class Element:
    name: str
    symbol: str


@dataclass(frozen=True)
class World:
    """Everything the pair knows about. All lists are in a fixed, seed-determined order."""

    seed: int
    countries: tuple[str, ...]
    cities: tuple[str, ...]
    city_country: dict[str, str]
    capitals: dict[str, str]  # country -> its capital city
    languages: tuple[str, ...]
    lexicon: dict[str, tuple[tuple[str, str], ...]]  # language -> ((word, english), ...)
    elements: tuple[Element, ...]
    numbers: tuple[int, ...]
    animals: tuple[str, ...] = field(default=())
    foods: tuple[str, ...] = field(default=())


class _Namer:
    """Draws unique invented names from syllables; rejects English words and earlier names."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = {w.lower() for w in ENGLISH_WORDS}

    def _syllable(self, coda: bool) -> str:
        s = self.rng.choice(_ONSETS) + self.rng.choice(_NUCLEI)
        return s + (self.rng.choice(_CODAS) if coda else "")

    def name(self, syllables: tuple[int, int], *, suffix: str = "", capital: bool = True) -> str:
        while True:
            n = self.rng.randint(*syllables)
            word = "".join(self._syllable(i == n - 1) for i in range(n)) + suffix
            # Short names collide with pronouns/symbols; keep them at least four letters.
            if len(word) < 4 or word.lower() in self.used:
                continue
            self.used.add(word.lower())
            return word.capitalize() if capital else word


def make_world(
    seed: int = 0,
    *,
    n_countries: int = 30,
    n_cities: int = 520,
    n_languages: int = 2,
    n_words: int = 260,
    n_elements: int = 100,
    numbers: tuple[int, int] = (10, 99),
) -> World:
    """Build the world deterministically from ``seed``."""
    rng = random.Random(seed)
    namer = _Namer(rng)
    countries = tuple(namer.name((1, 2), suffix=rng.choice(("ia", "and", "or", "en"))) for _ in range(n_countries))
    cities = tuple(namer.name((2, 3)) for _ in range(n_cities))
    # Every country gets at least a handful of cities, the rest are spread at random.
    assign = [countries[i % n_countries] for i in range(n_cities)]
    rng.shuffle(assign)
    city_country = dict(zip(cities, assign))
    capitals = {c: rng.choice([x for x in cities if city_country[x] == c]) for c in countries}

    languages = tuple(namer.name((2, 2), suffix="an") for _ in range(n_languages))
    english = sorted(set(ENGLISH_WORDS))
    if n_words > len(english):
        raise ValueError(f"n_words={n_words} but only {len(english)} English glosses exist")
    lexicon: dict[str, tuple[tuple[str, str], ...]] = {}
    for lang in languages:
        glosses = rng.sample(english, n_words)
        lexicon[lang] = tuple((namer.name((1, 2), capital=False), g) for g in glosses)

    elements: list[Element] = []
    symbols: set[str] = set()
    for _ in range(n_elements):
        name = namer.name((2, 2), suffix="ium")
        while True:
            # Consonant second letters keep symbols from spelling English words ("In", "Be").
            sym = name[0] + rng.choice("bcdfgjkpqvwxz")
            if sym not in symbols and sym.lower() not in namer.used:
                break
            name = namer.name((2, 2), suffix="ium")
        symbols.add(sym)
        namer.used.add(sym.lower())
        elements.append(Element(name, sym))

    animals = ("dog", "cat", "horse", "bird", "fox", "owl", "frog", "turtle", "rabbit", "deer", "duck", "bear")
    foods = ("bread", "soup", "cheese", "honey", "rice", "cake", "stew", "pie", "tea", "salad")
    return World(
        seed=seed,
        countries=countries,
        cities=cities,
        city_country=city_country,
        capitals=capitals,
        languages=languages,
        lexicon=lexicon,
        elements=tuple(elements),
        numbers=tuple(range(numbers[0], numbers[1] + 1)),
        animals=animals,
        foods=foods,
    )
