"""The fact-check workload's data: a built-in fact table, claims and an evidence corpus.

:func:`make_workload` generates claims locally from the fact table (countries
and capitals, countries and continents, elements and symbols, authors and
works, painters and paintings, inventors and inventions), in several
paraphrases, supported and refuted (FEVER's mutations: a similar entity that
appears in no passage, or a negation), and an evidence corpus that holds each
claim's supporting passage among the passages of every other fact and a few
decoys about the same entities. Used by :mod:`dask_pervasive.bench.factcheck`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

SUPPORTS, REFUTES = "SUPPORTS", "REFUTES"


# -- the fact table --------------------------------------------------------------------------
# (country, capital, continent, another city of the country: a plausible wrong capital)
COUNTRIES = [
    ("France", "Paris", "Europe", "Lyon"),
    ("Germany", "Berlin", "Europe", "Munich"),
    ("Italy", "Rome", "Europe", "Milan"),
    ("Spain", "Madrid", "Europe", "Barcelona"),
    ("Portugal", "Lisbon", "Europe", "Porto"),
    ("Norway", "Oslo", "Europe", "Bergen"),
    ("Sweden", "Stockholm", "Europe", "Gothenburg"),
    ("Finland", "Helsinki", "Europe", "Tampere"),
    ("Poland", "Warsaw", "Europe", "Kraków"),
    ("Greece", "Athens", "Europe", "Thessaloniki"),
    ("Austria", "Vienna", "Europe", "Salzburg"),
    ("Hungary", "Budapest", "Europe", "Debrecen"),
    ("Ireland", "Dublin", "Europe", "Cork"),
    ("Denmark", "Copenhagen", "Europe", "Aarhus"),
    ("Belgium", "Brussels", "Europe", "Antwerp"),
    ("Japan", "Tokyo", "Asia", "Osaka"),
    ("China", "Beijing", "Asia", "Shanghai"),
    ("India", "New Delhi", "Asia", "Mumbai"),
    ("Thailand", "Bangkok", "Asia", "Chiang Mai"),
    ("Vietnam", "Hanoi", "Asia", "Ho Chi Minh City"),
    ("South Korea", "Seoul", "Asia", "Busan"),
    ("Iran", "Tehran", "Asia", "Isfahan"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Erdenet"),
    ("Nepal", "Kathmandu", "Asia", "Pokhara"),
    ("Kenya", "Nairobi", "Africa", "Mombasa"),
    ("Nigeria", "Abuja", "Africa", "Lagos"),
    ("Morocco", "Rabat", "Africa", "Casablanca"),
    ("Ghana", "Accra", "Africa", "Kumasi"),
    ("Ethiopia", "Addis Ababa", "Africa", "Dire Dawa"),
    ("Senegal", "Dakar", "Africa", "Touba"),
    ("Canada", "Ottawa", "North America", "Toronto"),
    ("Mexico", "Mexico City", "North America", "Guadalajara"),
    ("Cuba", "Havana", "North America", "Camagüey"),
    ("Brazil", "Brasília", "South America", "São Paulo"),
    ("Argentina", "Buenos Aires", "South America", "Córdoba"),
    ("Peru", "Lima", "South America", "Cusco"),
    ("Chile", "Santiago", "South America", "Valparaíso"),
    ("Colombia", "Bogotá", "South America", "Medellín"),
    ("Australia", "Canberra", "Oceania", "Sydney"),
    ("New Zealand", "Wellington", "Oceania", "Auckland"),
]
ELEMENTS = [
    ("hydrogen", "H"),
    ("helium", "He"),
    ("lithium", "Li"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("oxygen", "O"),
    ("fluorine", "F"),
    ("neon", "Ne"),
    ("sodium", "Na"),
    ("magnesium", "Mg"),
    ("aluminium", "Al"),
    ("silicon", "Si"),
    ("phosphorus", "P"),
    ("sulfur", "S"),
    ("chlorine", "Cl"),
    ("argon", "Ar"),
    ("potassium", "K"),
    ("calcium", "Ca"),
    ("iron", "Fe"),
    ("nickel", "Ni"),
    ("copper", "Cu"),
    ("zinc", "Zn"),
    ("silver", "Ag"),
    ("tin", "Sn"),
    ("gold", "Au"),
    ("mercury", "Hg"),
    ("lead", "Pb"),
    ("uranium", "U"),
    ("tungsten", "W"),
    ("platinum", "Pt"),
]
# (work, author)
BOOKS = [
    ("Pride and Prejudice", "Jane Austen"),
    ("Nineteen Eighty-Four", "George Orwell"),
    ("Hamlet", "William Shakespeare"),
    ("War and Peace", "Leo Tolstoy"),
    ("Anna Karenina", "Leo Tolstoy"),
    ("Don Quixote", "Miguel de Cervantes"),
    ("Moby-Dick", "Herman Melville"),
    ("The Odyssey", "Homer"),
    ("Crime and Punishment", "Fyodor Dostoevsky"),
    ("One Hundred Years of Solitude", "Gabriel García Márquez"),
    ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("Ulysses", "James Joyce"),
    ("Frankenstein", "Mary Shelley"),
    ("Dracula", "Bram Stoker"),
    ("The Divine Comedy", "Dante Alighieri"),
    ("Faust", "Johann Wolfgang von Goethe"),
    ("Les Misérables", "Victor Hugo"),
    ("Madame Bovary", "Gustave Flaubert"),
    ("The Trial", "Franz Kafka"),
    ("To Kill a Mockingbird", "Harper Lee"),
    ("Beloved", "Toni Morrison"),
    ("The Old Man and the Sea", "Ernest Hemingway"),
    ("Great Expectations", "Charles Dickens"),
    ("Jane Eyre", "Charlotte Brontë"),
    ("Wuthering Heights", "Emily Brontë"),
    ("The Hobbit", "J. R. R. Tolkien"),
    ("Brave New World", "Aldous Huxley"),
    ("The Catcher in the Rye", "J. D. Salinger"),
]
# (painting, painter)
PAINTINGS = [
    ("the Mona Lisa", "Leonardo da Vinci"),
    ("The Last Supper", "Leonardo da Vinci"),
    ("The Starry Night", "Vincent van Gogh"),
    ("Guernica", "Pablo Picasso"),
    ("The Persistence of Memory", "Salvador Dalí"),
    ("The Scream", "Edvard Munch"),
    ("Girl with a Pearl Earring", "Johannes Vermeer"),
    ("The Night Watch", "Rembrandt"),
    ("The Birth of Venus", "Sandro Botticelli"),
    ("The Kiss", "Gustav Klimt"),
    ("American Gothic", "Grant Wood"),
    ("The Garden of Earthly Delights", "Hieronymus Bosch"),
]
# (invention, inventor)
INVENTIONS = [
    ("the telephone", "Alexander Graham Bell"),
    ("the phonograph", "Thomas Edison"),
    ("dynamite", "Alfred Nobel"),
    ("the World Wide Web", "Tim Berners-Lee"),
    ("Morse code", "Samuel Morse"),
    ("the diesel engine", "Rudolf Diesel"),
    ("the Braille writing system", "Louis Braille"),
    ("the ballpoint pen", "László Bíró"),
    ("the cotton gin", "Eli Whitney"),
    ("the lightning rod", "Benjamin Franklin"),
    ("the mercury thermometer", "Daniel Gabriel Fahrenheit"),
]
# Refuted claims substitute a similar entity that is in no passage (FEVER's "substitution"
# mutation): another writer, painter or inventor than any of the table's.
OTHER_WRITERS = (
    "Mark Twain",
    "Virginia Woolf",
    "Oscar Wilde",
    "Agatha Christie",
    "Jules Verne",
    "Hermann Hesse",
    "Italo Calvino",
    "Chinua Achebe",
    "Umberto Eco",
    "Thomas Mann",
    "Albert Camus",
    "John Steinbeck",
    "Rabindranath Tagore",
)
OTHER_PAINTERS = (
    "Claude Monet",
    "Frida Kahlo",
    "Paul Cézanne",
    "Caravaggio",
    "Henri Matisse",
    "Jackson Pollock",
    "Titian",
)
OTHER_INVENTORS = ("Nikola Tesla", "James Watt", "Guglielmo Marconi", "Charles Babbage", "Galileo Galilei")
#: True sentences about entities of the table that support none of the claims (hard distractors).
DECOYS = [
    "Paris hosted the Summer Olympic Games in 2024.",
    "Tokyo hosted the Summer Olympic Games in 1964.",
    "According to legend, Rome was founded by Romulus.",
    "Berlin was divided by a wall from 1961 to 1989.",
    "Lisbon was largely destroyed by an earthquake in 1755.",
    "Canberra was built as a planned city in the twentieth century.",
    "Gold is a soft, dense and highly malleable metal.",
    "Mercury is also the name of the planet closest to the Sun.",
    "Oxygen makes up about a fifth of the Earth's atmosphere.",
    "Leo Tolstoy was born at Yasnaya Polyana in 1828.",
    "William Shakespeare was born in Stratford-upon-Avon.",
    "Jane Austen published her novels anonymously during her lifetime.",
    "Vincent van Gogh was a Dutch post-impressionist painter.",
    "Pablo Picasso co-founded the Cubist movement.",
    "Alfred Nobel's will established the Nobel Prizes.",
]


def _wrong_symbols() -> tuple[str, ...]:
    """For each element a symbol-like abbreviation that is no element's symbol in the table."""
    taken = {symbol for _, symbol in ELEMENTS}
    out = []
    for name, _ in ELEMENTS:
        letters = name.replace(" ", "")
        candidates = [letters[0].upper() + c for c in letters[1:]]
        out.append(next(c for c in candidates if c not in taken))
    return tuple(out)


def _cycle(pool: Sequence[str], n: int) -> tuple[str, ...]:
    return tuple(pool[k % len(pool)] for k in range(n))


@dataclass(frozen=True)
class Relation:
    """One kind of fact: how its evidence passage and its claims are worded.

    Templates are ``str.format`` strings over ``s`` (subject), ``o``
    (object) and, in ``refuted``, ``w``: the fact's entry in ``wrong`` (a
    plausible object that is no passage's).
    """

    name: str
    facts: tuple[tuple[str, str], ...]
    passage: str
    supported: tuple[str, ...]
    refuted: tuple[str, ...]
    wrong: tuple[str, ...]


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


RELATIONS = (
    Relation(
        "capital",
        tuple((country, capital) for country, capital, _, _ in COUNTRIES),
        "The capital of {s} is {o}.",
        ("{o} is the capital city of {s}.", "{s} has {o} as its capital.", "{s}'s seat of government is in {o}."),
        ("The capital of {s} is {w}.", "{w} is the capital city of {s}."),
        tuple(city for *_, city in COUNTRIES),
    ),
    Relation(
        "continent",
        tuple((country, continent) for country, _, continent, _ in COUNTRIES),
        "{s} is a country in {o}.",
        ("{s} is located in {o}.", "{s} lies on the continent of {o}.", "{o} is where {s} is."),
        ("{s} is not a country in {o}.", "{s} is not located in {o}."),  # negation: FEVER's other mutation
        tuple(continent for _, _, continent, _ in COUNTRIES),
    ),
    Relation(
        "symbol",
        tuple(ELEMENTS),
        "The chemical symbol of {s} is {o}.",
        (
            "{o} is the symbol of the element {s}.",
            "In the periodic table, {s} is written as {o}.",
            "Chemists abbreviate {s} as {o}.",
        ),
        ("The chemical symbol of {s} is {w}.", "{w} is the symbol of the element {s}."),
        _wrong_symbols(),
    ),
    Relation(
        "author",
        tuple(BOOKS),
        "{s} was written by {o}.",
        ("{o} is the author of {s}.", "{o} wrote {s}.", "The work {s} is by {o}."),
        ("{s} was written by {w}.", "{w} wrote {s}."),
        _cycle(OTHER_WRITERS, len(BOOKS)),
    ),
    Relation(
        "painter",
        tuple(PAINTINGS),
        "{s} is a painting by {o}.",
        ("{o} painted {s}.", "{s} was painted by {o}.", "The artist who made {s} is {o}."),
        ("{w} painted {s}.", "{s} is a painting by {w}."),
        _cycle(OTHER_PAINTERS, len(PAINTINGS)),
    ),
    Relation(
        "inventor",
        tuple(INVENTIONS),
        "{s} was invented by {o}.",
        ("{o} invented {s}.", "{s} is an invention of {o}.", "The inventor of {s} was {o}."),
        ("{w} invented {s}.", "{s} was invented by {w}."),
        _cycle(OTHER_INVENTORS, len(INVENTIONS)),
    ),
)


@dataclass(frozen=True)
class Claim:
    """A claim, the index of its supporting (or refuting) passage, and its FEVER label."""

    text: str
    evidence: int
    label: str
    relation: str


@dataclass(frozen=True)
class Workload:
    """Claims to check and the evidence corpus they are checked against."""

    claims: tuple[Claim, ...]
    passages: tuple[str, ...]

    def batches(self, size: int) -> list[list[str]]:
        """The claim texts in order, in batches of ``size`` (one task each)."""
        texts = [c.text for c in self.claims]
        return [texts[i : i + size] for i in range(0, len(texts), size)]

    def accuracy(self, retrieved: Sequence[int]) -> float:
        """Share of claims whose top passage is their evidence (recall@1)."""
        if len(retrieved) != len(self.claims):
            raise ValueError(f"{len(retrieved)} results for {len(self.claims)} claims")
        return sum(int(r) == c.evidence for r, c in zip(retrieved, self.claims)) / len(self.claims)


def make_workload(n_claims: int = 300, refuted_share: float = 0.25, seed: int = 0) -> Workload:
    """``n_claims`` claims (``refuted_share`` of them refuted) and the evidence corpus.

    The corpus holds one passage per fact of the table and the decoys,
    shuffled; each claim is a paraphrase of one fact (a supported claim) or
    a mutation of it (a refuted claim: a similar entity substituted, or a
    negation), whose evidence is still the fact's passage. Deterministic for a given
    ``seed``; ``n_claims`` beyond the number of distinct claims repeat them.
    """
    if n_claims < 1:
        raise ValueError(f"n_claims must be at least 1, got {n_claims}")
    if not 0 <= refuted_share <= 1:
        raise ValueError(f"refuted_share must be in [0, 1], got {refuted_share}")
    rng = random.Random(seed)
    passages: list[str] = list(DECOYS)
    facts: list[tuple[Relation, str, str]] = []
    offsets: dict[str, int] = {}  # index of each relation's first fact in ``facts``
    for rel in RELATIONS:
        offsets[rel.name] = len(facts)
        for s, o in rel.facts:
            facts.append((rel, s, o))
            passages.append(_capitalize(rel.passage.format(s=s, o=o)))
    order = list(range(len(passages)))
    rng.shuffle(order)
    position = {old: new for new, old in enumerate(order)}
    corpus = tuple(passages[i] for i in order)

    supported: list[Claim] = []
    refuted: list[Claim] = []
    for k, (rel, s, o) in enumerate(facts):
        evidence = position[len(DECOYS) + k]
        for template in rel.supported:
            supported.append(Claim(_capitalize(template.format(s=s, o=o)), evidence, SUPPORTS, rel.name))
        for template in rel.refuted:
            text = _capitalize(template.format(s=s, o=o, w=rel.wrong[k - offsets[rel.name]]))
            refuted.append(Claim(text, evidence, REFUTES, rel.name))
    rng.shuffle(supported)
    rng.shuffle(refuted)
    n_refuted = round(n_claims * refuted_share)
    claims = _take(refuted, n_refuted) + _take(supported, n_claims - n_refuted)
    rng.shuffle(claims)
    return Workload(tuple(claims), corpus)


def _take(pool: list[Claim], n: int) -> list[Claim]:
    return [pool[i % len(pool)] for i in range(n)] if pool else []
