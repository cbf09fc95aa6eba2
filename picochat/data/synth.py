"""The embedded synthetic world: pretraining shards, chat conversations and a held-out eval set, from a seed.

`picochat data synth` needs no download and no data file. It invents a small world (cities in made-up lands,
people who live in those cities, made-up animal species, each with a few attributes) and writes:

- `shard_XXXXX.parquet`: pretraining documents (one string column `text`, 1,024-doc row groups, zstd; the last
  shard is validation). Documents state the facts of the world in several paraphrases, plus written-out arithmetic,
  spelling letter by letter, and a little generic prose so the text reads like text.
- `chat_train.jsonl`, `chat_val.jsonl`: conversations `{"messages": [{"role", "content"}, ...]}` where assistant
  content is a string or a list of parts (`text`, `python`, `python_output`): fact questions, lettered
  multiple-choice questions, arithmetic through the python tool, spelling and letter counting, identity.
- `eval.jsonl`: multiple-choice questions about *held-out* facts (stated in the pretraining documents, never asked
  in the chat data: the model must combine pretraining knowledge with the chat format) and generative arithmetic
  whose operand triples never appear in the chat data. Chance is 25% for the multiple choice.
- `manifest.json`: seed, generator version, config, counts and sha256 of every file (written last).

Learnability is the design goal: names are built from a few syllables (a 2K-4K BPE vocabulary covers them), every
fact is repeated in several paraphrases across many documents (a tiny model needs 10+ exposures), there are only a
few hundred entities, and arithmetic uses 1-2 digit operands. Measured with the defaults: a 4-layer, 128-wide model
(1.8M parameters, 2,048-token BPE, 256-token context) trained with AdamW (lr 8e-3) on 1.84M tokens (450 steps of
4,096, about 5 minutes on 2 CPU cores) scores the true attribute above 3 wrong ones for 90% of the held-out facts
(chance 25%). Arithmetic and spelling are not learned from text at that scale; the chat data teaches the python
tool for arithmetic instead.

Determinism: every random choice comes from `random.Random` streams seeded by strings derived from the seed, so the
same config gives byte-identical files on any machine with the same pyarrow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picochat.config import UserError, add_config_args, config_from_args, fingerprint, require, to_dict
from picochat.files import atomic_path, atomic_write_bytes

GENERATOR = "picochat.data.synth"
GENERATOR_VERSION = 1
ROW_GROUP_SIZE = 1024
LETTERS = "ABCD"
MC_SUFFIX = "Answer with the letter."


@dataclass
class SynthConfig:
    seed: int = field(default=1337, metadata={"help": "random seed: same seed, same bytes"})
    out: Path | None = field(default=None, metadata={"help": "output directory (default PICOCHAT_HOME/data/synth)"})
    n_entities: int = field(default=150, metadata={"help": "cities + people + animal species in the world"})
    n_lands: int = field(default=6, metadata={"help": "lands the cities belong to (at least 4)"})
    n_docs: int = field(default=24576, metadata={"help": "pretraining documents in all shards (last shard = val)"})
    docs_per_shard: int = field(default=2048, metadata={"help": "documents per parquet shard"})
    n_chat_train: int = field(default=6000, metadata={"help": "training conversations"})
    n_chat_val: int = field(default=400, metadata={"help": "validation conversations"})
    n_eval: int = field(default=300, metadata={"help": "held-out eval items (multiple choice + arithmetic)"})
    eval_mc_fraction: float = field(default=0.67, metadata={"help": "share of eval items that are multiple choice"})


# ----------------------------------------------------------------------------------------------------------------
# The world's vocabulary. Values are plain English so only entity names are new words.

ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "tr", "st",
          "sh", "th"]
VOWELS = ["a", "e", "i", "o", "u", "a", "o", "e"]
CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "k"]


@dataclass(frozen=True)
class Attribute:
    """One kind of fact. Templates use {N} (entity at sentence start), {n} (mid-sentence) and {v} (the value)."""

    name: str
    values: tuple[str, ...]        # empty: filled from the world (lands, city names)
    statements: tuple[str, ...]    # paraphrases used in pretraining documents
    questions: tuple[str, ...]     # open chat questions
    answer: str                    # the assistant's one-sentence answer
    mc_stem: str                   # the multiple-choice question


CITY_ATTRS = (
    Attribute("land", (), (
        "{N} is a city in the land of {v}.", "{N} lies in the land of {v}.", "The city of {n} is part of {v}.",
        "{N} is one of the cities of {v}.", "In the land of {v} there is a city called {n}."),
        ("In which land is {n}?", "Where is the city of {n}?", "Which land is {n} in?"),
        "{N} is in the land of {v}.", "In which land is the city of {n}?"),
    Attribute("known_for", ("glass bridges", "salt mines", "tall towers", "copper bells", "night markets",
                            "stone gardens", "red boats", "old libraries", "silver fountains", "wooden temples",
                            "flower fields", "paper lanterns"), (
        "{N} is known for its {v}.", "{N} is famous for its {v}.", "Visitors come to {n} to see its {v}.",
        "The {v} of {n} are known across the land.", "People who hear of {n} think of its {v}."),
        ("What is {n} known for?", "What is the city of {n} famous for?", "Why do visitors come to {n}?"),
        "{N} is known for its {v}.", "What is the city of {n} known for?"),
    Attribute("weather", ("foggy", "rainy", "sunny", "windy", "snowy", "hot", "cold", "humid"), (
        "The weather in {n} is usually {v}.", "{N} is a {v} place for most of the year.",
        "Most days in {n} are {v}.", "Travelers say that {n} is often {v}."),
        ("What is the weather like in {n}?", "How is the weather in {n} on most days?"),
        "The weather in {n} is usually {v}.", "What is the weather usually like in {n}?"),
)

PERSON_ATTRS = (
    Attribute("home", (), (
        "{N} lives in {v}.", "{N} has a home in the city of {v}.", "{N} grew up in {v} and still lives there.",
        "The house of {n} is in {v}."),
        ("Where does {n} live?", "In which city does {n} live?", "What city is {n} from?"),
        "{N} lives in {v}.", "In which city does {n} live?"),
    Attribute("job", ("baker", "painter", "sailor", "teacher", "doctor", "farmer", "builder", "singer", "weaver",
                      "miner", "potter", "guard"), (
        "{N} works as a {v}.", "{N} is a {v} by trade.", "By day, {n} works as a {v}.",
        "Everyone knows {n} as a good {v}."),
        ("What does {n} do for work?", "What is the job of {n}?", "What is {n}'s job?"),
        "{N} works as a {v}.", "What is the job of {n}?"),
    Attribute("color", ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "gray"), (
        "The favorite color of {n} is {v}.", "{N} likes the color {v} best.", "{N} always wears something {v}.",
        "Of all colors, {n} loves {v} the most."),
        ("What is the favorite color of {n}?", "Which color does {n} like best?"),
        "The favorite color of {n} is {v}.", "What is the favorite color of {n}?"),
)

ANIMAL_ATTRS = (
    Attribute("fur", ("brown", "gray", "white", "black", "golden", "spotted", "striped", "silver"), (
        "{N} has {v} fur.", "The fur of {n} is {v}.", "You can tell {n} by its {v} fur.",
        "A young {name} is born with {v} fur."),
        ("What color is the fur of {n}?", "What does the fur of {n} look like?"),
        "{N} has {v} fur.", "What kind of fur does {n} have?"),
    Attribute("food", ("berries", "fish", "grass", "insects", "seeds", "roots", "honey", "leaves", "mushrooms",
                       "nuts"), (
        "{N} eats {v}.", "The favorite food of {n} is {v}.", "{N} feeds mostly on {v}.",
        "When it is hungry, {n} looks for {v}."),
        ("What does {n} eat?", "What is the favorite food of {n}?"),
        "{N} eats mostly {v}.", "What does {n} eat?"),
    Attribute("habitat", ("forest", "desert", "mountains", "river", "swamp", "caves", "grassland", "lake"), (
        "{N} lives in the {v}.", "{N} makes its home in the {v}.", "You can find {n} in the {v}.",
        "{N} is found in the {v}."),
        ("Where does {n} live?", "Where can you find {n}?"),
        "{N} lives in the {v}.", "Where does {n} live?"),
)

KINDS = {"city": CITY_ATTRS, "person": PERSON_ATTRS, "animal": ANIMAL_ATTRS}
KIND_SHARE = {"city": 0.3, "person": 0.4, "animal": 0.3}

FILLER = (
    "Many stories are told about this place.", "It is a quiet place in the early morning.",
    "Old books say a great deal about it.", "Some travelers write long letters about what they saw.",
    "Children learn about it at school.", "Not everyone agrees on the details, but most people do.",
    "This is what the old maps show.", "There is more to say, but that is the main thing.",
    "Many people find this interesting.", "It has been this way for a long time.",
    "The elders like to talk about it in the evening.", "Few people forget it once they hear it.",
)
PERSON_FILLER = (
    "{N} is kind to neighbors.", "{N} wakes up early every day.", "Friends often visit {n} on weekends.",
    "{N} likes long walks after work.", "{N} has many friends.", "{N} tells good stories.",
)
ANIMAL_FILLER = (
    "{N} is a shy animal.", "{N} sleeps during the hottest hours.", "Most people have never seen {n} up close.",
    "{N} moves quickly when it is afraid.", "{N} lives in small groups.",
)

PROSE_SUBJECTS = ("The old man", "A young girl", "The farmer", "My friend", "The teacher", "A small dog",
                  "The traveler", "Her brother", "The children", "A tired worker")
PROSE_VERBS = ("walked to", "looked at", "talked about", "waited near", "ran past", "thought about", "cleaned",
               "painted", "found", "visited")
PROSE_OBJECTS = ("the market", "the river", "a wooden house", "the big tree", "the school", "the harbor",
                 "an old bridge", "the garden", "the bakery", "the hill")
PROSE_TAILS = ("in the morning", "after lunch", "before the rain", "with a smile", "for a long time",
               "once again", "without a word", "at sunset", "on a cold day", "as usual")
PROSE_LINKS = ("Then", "After that", "Later", "Meanwhile", "Because of this", "So", "Still", "In the end")

WORDS = (
    "apple", "banana", "cherry", "strawberry", "orange", "grape", "lemon", "melon", "house", "garden", "river",
    "mountain", "forest", "window", "table", "chair", "pencil", "paper", "letter", "school", "teacher", "student",
    "market", "bridge", "tower", "castle", "village", "city", "road", "bottle", "kitchen", "bread", "butter",
    "cheese", "coffee", "water", "winter", "summer", "autumn", "spring", "morning", "evening", "night", "yellow",
    "purple", "green", "silver", "golden", "happy", "little", "simple", "quiet", "rabbit", "turtle", "monkey",
    "elephant", "giraffe", "penguin", "dolphin", "tiger", "horse", "kitten", "puppy", "butterfly", "flower",
    "planet", "rocket", "island", "ocean", "desert", "valley", "thunder", "rainbow", "shadow", "mirror", "candle",
    "blanket", "pillow", "basket", "hammer", "ladder", "needle", "button", "pocket", "jacket", "umbrella",
    "balloon", "guitar", "violin", "piano", "drum", "music", "story", "number", "picture", "computer", "language",
    "question", "answer", "problem", "because", "between", "through", "together", "without", "tomorrow",
    "yesterday", "remember", "beautiful", "different", "important", "mississippi", "committee", "coffee",
    "balloon", "bookkeeper", "occasion", "necessary", "address", "success", "library", "banana",
)

IDENTITY = (
    (("Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself."),
     ("I am picochat, a small language model trained from scratch. I can answer questions about my little world, "
      "do arithmetic with a calculator and spell words.",
      "I am picochat, a tiny chat model. I was trained from scratch on a small synthetic world.")),
    (("What is your name?", "Do you have a name?", "What should I call you?"),
     ("My name is picochat.", "I am picochat.")),
    (("Who made you?", "Who trained you?", "Where do you come from?"),
     ("I am picochat. I was trained from scratch with the picochat code, on text it generated from a seed.",
      "The picochat pipeline trained me from scratch, from tokenizer to chat.")),
    (("Hello!", "Hi there.", "Good morning!", "Hey."),
     ("Hello! I am picochat. How can I help you?", "Hi! I am picochat. Ask me a question.")),
    (("Thank you!", "Thanks a lot.", "Thanks."),
     ("You are welcome!", "Happy to help.")),
)

DOC_MIX = (("entity", 0.56), ("arithmetic", 0.18), ("spelling", 0.14), ("prose", 0.12))
CHAT_MIX = (("fact", 0.26), ("mc", 0.28), ("arith", 0.22), ("spell", 0.14), ("identity", 0.05), ("multi", 0.05))
ARITH_OPS = ("+", "-", "*")
OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}
ARITH_QUESTIONS = ("What is {a} {op} {b}?", "Calculate {a} {op} {b}.", "How much is {a} {w} {b}?",
                   "Please compute {a} {op} {b}.", "What is {a} {w} {b}?")


# ----------------------------------------------------------------------------------------------------------------
# The world


@dataclass
class Entity:
    kind: str
    name: str                  # as written mid-sentence ("Zorbel", "Tavo Renkil", "the glimmok")
    base: str                  # the bare name ("Zorbel", "Tavo Renkil", "glimmok")
    attrs: dict[str, str]


@dataclass(frozen=True)
class Fact:
    entity: int                # index into World.entities
    attr: str

    def key(self) -> str:
        return f"{self.entity}:{self.attr}"


@dataclass
class World:
    lands: list[str]
    entities: list[Entity]
    pools: dict[str, tuple[str, ...]]   # attribute -> all its values (for distractors)
    by_name: dict[str, Entity] = field(default_factory=dict)
    residents: dict[str, list[Entity]] = field(default_factory=dict)   # city name -> people living there

    def __post_init__(self) -> None:
        self.by_name = {e.name: e for e in self.entities}
        for e in self.entities:
            if e.kind == "person":
                self.residents.setdefault(e.attrs["home"], []).append(e)

    def facts(self) -> list[Fact]:
        return [Fact(i, a.name) for i, e in enumerate(self.entities) for a in KINDS[e.kind]]

    def attribute(self, fact: Fact) -> Attribute:
        kind = self.entities[fact.entity].kind
        return next(a for a in KINDS[kind] if a.name == fact.attr)

    def value(self, fact: Fact) -> str:
        return self.entities[fact.entity].attrs[fact.attr]


def _rng(seed: int, stream: str) -> random.Random:
    # str seeds are hashed with sha512 by `random`, independent of PYTHONHASHSEED: stable across runs and machines
    return random.Random(f"picochat-synth-v{GENERATOR_VERSION}:{seed}:{stream}")


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(n_syllables))


def _fill(template: str, e: Entity, v: str = "") -> str:
    s = template.format(N=e.name[0].upper() + e.name[1:], n=e.name, v=v, name=e.base)
    return s[0].upper() + s[1:]


def build_world(seed: int, n_entities: int, n_lands: int = 6) -> World:
    """The entities and their attributes. Pure function of (seed, n_entities, n_lands)."""
    rng = _rng(seed, "world")
    used: set[str] = set(WORDS)

    def fresh(lo: int, hi: int) -> str:
        while True:
            w = _word(rng, rng.randint(lo, hi))
            if w not in used and 4 <= len(w) <= 11:
                used.add(w)
                return w

    lands = [fresh(2, 2).capitalize() for _ in range(n_lands)]
    n_city = max(4, round(n_entities * KIND_SHARE["city"]))
    n_animal = max(1, round(n_entities * KIND_SHARE["animal"]))
    n_person = max(1, n_entities - n_city - n_animal)
    cities = [fresh(2, 3).capitalize() for _ in range(n_city)]
    pools: dict[str, tuple[str, ...]] = {"land": tuple(lands), "home": tuple(cities)}
    for attrs in KINDS.values():
        for a in attrs:
            if a.values:
                pools[a.name] = a.values
    entities: list[Entity] = []
    for i, c in enumerate(cities):
        attrs = {"land": lands[i % n_lands]}  # round-robin so every land has cities
        attrs.update({a.name: rng.choice(a.values) for a in CITY_ATTRS if a.values})
        entities.append(Entity("city", c, c, attrs))
    firsts = [fresh(2, 2).capitalize() for _ in range(max(8, n_person // 3))]
    families = [fresh(2, 3).capitalize() for _ in range(max(8, n_person // 3))]
    people: set[str] = set()
    while len(people) < n_person:
        people.add(f"{rng.choice(firsts)} {rng.choice(families)}")
    for p in sorted(people):
        attrs = {"home": rng.choice(cities)}
        attrs.update({a.name: rng.choice(a.values) for a in PERSON_ATTRS if a.values})
        entities.append(Entity("person", p, p, attrs))
    for _ in range(n_animal):
        w = fresh(2, 3)
        attrs = {a.name: rng.choice(a.values) for a in ANIMAL_ATTRS}
        entities.append(Entity("animal", f"the {w}", w, attrs))
    order = list(range(len(entities)))
    rng.shuffle(order)
    return World(lands, [entities[i] for i in order], pools)


# ----------------------------------------------------------------------------------------------------------------
# Pretraining documents


def _choose(rng: random.Random, mix: tuple[tuple[str, float], ...]) -> str:
    return rng.choices([k for k, _ in mix], weights=[w for _, w in mix])[0]


def _entity_doc(rng: random.Random, world: World, idx: int, all_facts: bool) -> str:
    e = world.entities[idx]
    attrs = list(KINDS[e.kind])
    rng.shuffle(attrs)
    chosen = attrs if all_facts else [a for a in attrs if rng.random() < 0.8] or attrs[:1]
    sentences = [_fill(rng.choice(a.statements), e, e.attrs[a.name]) for a in chosen]
    # a related entity's fact: the world's facts also show up in each other's documents
    if e.kind == "person" and rng.random() < 0.5:
        city = world.by_name[e.attrs["home"]]
        sentences.append(_fill(rng.choice(CITY_ATTRS[0].statements), city, city.attrs["land"]))
    elif e.kind == "city" and rng.random() < 0.5:
        residents = world.residents.get(e.name)
        if residents:
            sentences.append(_fill(rng.choice(PERSON_ATTRS[0].statements), rng.choice(residents), e.name))
    filler = {"person": PERSON_FILLER, "animal": ANIMAL_FILLER}.get(e.kind, ())
    for _ in range(rng.randint(1, 3)):
        pool = FILLER + filler
        t = rng.choice(pool)
        sentences.insert(rng.randint(1, len(sentences)), _fill(t, e) if "{" in t else t)
    title = e.base.capitalize() if e.kind == "animal" else e.name
    return f"{title}\n\n" + " ".join(sentences)


def _arith(rng: random.Random) -> tuple[int, str, int, int]:
    op = rng.choice(ARITH_OPS)
    if op == "*":
        a, b = rng.randint(2, 99), rng.randint(2, 12)
        if rng.random() < 0.5:
            a, b = b, a
    else:
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        if op == "-" and b > a:
            a, b = b, a
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op]


def _arith_doc(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(5, 10)):
        a, op, b, r = _arith(rng)
        w = OP_WORDS[op]
        lines.append(rng.choice((f"{a} {op} {b} = {r}", f"{a}{op}{b} = {r}", f"{a} {w} {b} is {r}.",
                                 f"If you take {a} {w} {b}, you get {r}.", f"{a} {op} {b} equals {r}.")))
    head = rng.choice(("Arithmetic practice", "Some sums", "Numbers", "Math notes", "Exercises with answers"))
    return f"{head}\n\n" + "\n".join(lines)


def spell(word: str) -> str:
    """The spelling format used everywhere: letters joined by dashes."""
    return "-".join(word)


def _spelling_words(world: World) -> list[str]:
    names = [e.base.lower() for e in world.entities if e.kind != "person"]
    return sorted(set(WORDS)) + sorted(set(names))


def _spelling_doc(rng: random.Random, words: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(3, 6)):
        w = rng.choice(words)
        c = rng.choice(w)
        k = w.count(c)
        parts.append(rng.choice((
            f"The word {w} is spelled {spell(w)}. It has {len(w)} letters.",
            f"{w.capitalize()} is spelled {spell(w)}. The letter {c} appears {k} {'time' if k == 1 else 'times'} "
            f"in {w}.",
            f"To spell {w}, write {spell(w)}.",
            f"How do you spell {w}? {spell(w)}. That is {len(w)} letters.")))
    return "Spelling\n\n" + "\n".join(parts)


def _prose_doc(rng: random.Random, world: World) -> str:
    sents = []
    for i in range(rng.randint(3, 6)):
        words = [rng.choice(pool) for pool in (PROSE_SUBJECTS, PROSE_VERBS, PROSE_OBJECTS, PROSE_TAILS)]
        s = " ".join(words) + "."
        if i and rng.random() < 0.5:
            s = f"{rng.choice(PROSE_LINKS)}, {s[0].lower()}{s[1:]}"
        sents.append(s)
    if rng.random() < 0.3:
        land = rng.choice(world.lands)
        n = sum(1 for e in world.entities if e.kind == "city" and e.attrs["land"] == land)
        sents.insert(0, f"The land of {land} has {n} cities.")
    return " ".join(sents)


def generate_docs(world: World, seed: int, n_docs: int, stream: str) -> list[str]:
    """`n_docs` documents. Entity documents go round-robin over the entities (each pass in a new random order), and
    each entity's first document states all its facts, so every fact is covered as evenly as the count allows."""
    rng = _rng(seed, f"docs:{stream}")
    words = _spelling_words(world)
    kinds = [_choose(rng, DOC_MIX) for _ in range(n_docs)]
    order: list[int] = []
    seen: set[int] = set()
    docs = []
    for kind in kinds:
        if kind == "entity":
            if not order:
                order = list(range(len(world.entities)))
                rng.shuffle(order)
            idx = order.pop()
            docs.append(_entity_doc(rng, world, idx, all_facts=idx not in seen))
            seen.add(idx)
        elif kind == "arithmetic":
            docs.append(_arith_doc(rng))
        elif kind == "spelling":
            docs.append(_spelling_doc(rng, words))
        else:
            docs.append(_prose_doc(rng, world))
    return docs


# ----------------------------------------------------------------------------------------------------------------
# Chat conversations and eval items


def render_mc(stem: str, options: list[str]) -> str:
    """A lettered multiple-choice question, exactly as the model sees it in chat and in eval."""
    lines = [stem] + [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)] + [MC_SUFFIX]
    return "\n".join(lines)


def _mc_options(rng: random.Random, world: World, fact: Fact, answer_idx: int) -> list[str]:
    value = world.value(fact)
    distractors = rng.sample([v for v in world.pools[fact.attr] if v != value], len(LETTERS) - 1)
    return distractors[:answer_idx] + [value] + distractors[answer_idx:]


def _mc_stem(world: World, fact: Fact) -> str:
    return _fill(world.attribute(fact).mc_stem, world.entities[fact.entity])


class _Balanced:
    """Answer letters drawn from shuffled blocks of A,B,C,D: exactly uniform per block, so chance is 25%."""

    def __init__(self, rng: random.Random):
        self.rng, self.block = rng, []

    def next(self) -> int:
        if not self.block:
            self.block = list(range(len(LETTERS)))
            self.rng.shuffle(self.block)
        return self.block.pop()


def _arith_question(rng: random.Random, a: int, op: str, b: int) -> str:
    return rng.choice(ARITH_QUESTIONS).format(a=a, op=op, b=b, w=OP_WORDS[op])


def _turn_fact(rng, world, facts) -> tuple[str, Any]:
    f = rng.choice(facts)
    e, attr = world.entities[f.entity], world.attribute(f)
    return _fill(rng.choice(attr.questions), e), _fill(attr.answer, e, world.value(f))


def _turn_mc(rng, world, facts, letters: _Balanced) -> tuple[str, Any]:
    f = rng.choice(facts)
    ans = letters.next()
    return render_mc(_mc_stem(world, f), _mc_options(rng, world, f, ans)), LETTERS[ans]


def _turn_arith(rng, held: set[tuple[int, str, int]]) -> tuple[str, Any]:
    while True:
        a, op, b, r = _arith(rng)
        if (a, op, b) not in held:
            break
    parts = [{"type": "python", "text": f"{a}{op}{b}"}, {"type": "python_output", "text": str(r)},
             {"type": "text", "text": f"{a} {op} {b} = {r}."}]
    return _arith_question(rng, a, op, b), parts


def _turn_spell(rng, words) -> tuple[str, Any]:
    w = rng.choice(words)
    mode = rng.random()
    if mode < 0.35:
        q = rng.choice((f"Spell the word {w}.", f"How do you spell {w}?", f"Spell {w} letter by letter."))
        return q, f"{w.capitalize()} is spelled {spell(w)}."
    if mode < 0.55:
        q = rng.choice((f"How many letters are in {w}?", f"How many letters does the word {w} have?"))
        return q, f"{spell(w)}. The word {w} has {len(w)} letters."
    c = rng.choice(w) if rng.random() < 0.85 else rng.choice("abcdefghijklmnopqrstuvwxyz")
    k = w.count(c)
    q = rng.choice((f"How many times does the letter {c} appear in {w}?", f"How many {c}'s are in {w}?",
                    f"Count the letter {c} in the word {w}."))
    final = f"The letter {c} appears {k} {'time' if k == 1 else 'times'} in {w}."
    if rng.random() < 0.5:
        return q, f"{spell(w)}. {final}"
    return q, [{"type": "text", "text": f"{spell(w)}. Let me count with python."},
               {"type": "python", "text": f"'{w}'.count('{c}')"}, {"type": "python_output", "text": str(k)},
               {"type": "text", "text": final}]


def _turn_identity(rng) -> tuple[str, Any]:
    questions, answers = rng.choice(IDENTITY)
    return rng.choice(questions), rng.choice(answers)


def generate_chat(world: World, seed: int, n: int, stream: str, facts: list[Fact],
                  held_arith: set[tuple[int, str, int]]) -> list[dict]:
    """`n` conversations about `facts` (the chat-visible ones) and arithmetic outside `held_arith`."""
    rng = _rng(seed, f"chat:{stream}")
    letters = _Balanced(rng)
    words = _spelling_words(world)

    def turn(kind: str) -> tuple[str, Any]:
        if kind == "fact":
            return _turn_fact(rng, world, facts)
        if kind == "mc":
            return _turn_mc(rng, world, facts, letters)
        if kind == "arith":
            return _turn_arith(rng, held_arith)
        if kind == "spell":
            return _turn_spell(rng, words)
        return _turn_identity(rng)

    convs = []
    for _ in range(n):
        kind = _choose(rng, CHAT_MIX)
        kinds = [_choose(rng, CHAT_MIX[:4]) for _ in range(2)] if kind == "multi" else [kind]
        messages = []
        for k in kinds:
            q, a = turn(k)
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        convs.append({"messages": messages})
    return convs


def split_facts(world: World, seed: int, n_heldout: int) -> tuple[list[Fact], list[Fact]]:
    """(chat-visible facts, held-out facts). Held-out facts are stated in pretraining, never asked in chat."""
    facts = world.facts()
    rng = _rng(seed, "holdout")
    held = rng.sample(facts, min(n_heldout, len(facts) // 3))
    keys = {f.key() for f in held}
    return [f for f in facts if f.key() not in keys], held


def generate_eval(world: World, seed: int, held_facts: list[Fact], n_gen: int) -> tuple[list[dict], set]:
    """Eval items: one multiple-choice item per held-out fact, then `n_gen` arithmetic items."""
    rng = _rng(seed, "eval")
    letters = _Balanced(rng)
    items = []
    for i, f in enumerate(held_facts):
        ans = letters.next()
        e = world.entities[f.entity]
        items.append({"id": f"mc-{i:04d}", "kind": "mc",
                      "question": render_mc(_mc_stem(world, f), _mc_options(rng, world, f, ans)),
                      "choices": list(LETTERS), "answer": ans, "category": f"fact/{e.kind}.{f.attr}"})
    held_arith: set[tuple[int, str, int]] = set()
    while len(held_arith) < n_gen:
        a, op, b, r = _arith(rng)
        if (a, op, b) in held_arith:
            continue
        held_arith.add((a, op, b))
        items.append({"id": f"gen-{len(held_arith) - 1:04d}", "kind": "gen",
                      "question": _arith_question(rng, a, op, b), "answer": str(r),
                      "category": f"arith/{OP_WORDS[op]}"})
    return items, held_arith


# ----------------------------------------------------------------------------------------------------------------
# Writing, atomically and idempotently


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def _write_shard(path: Path, docs: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"text": pa.array(docs, type=pa.string())})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE, compression="zstd")


def out_dir(cfg: SynthConfig) -> Path:
    """--out, else PICOCHAT_HOME/data/synth. Mirrors runtime.default_data_dir without importing torch (which
    would triple the time of `picochat data synth`)."""
    if cfg.out is not None:
        return Path(cfg.out).expanduser()
    home = Path(os.environ.get("PICOCHAT_HOME", Path.home() / ".cache" / "picochat")).expanduser()
    return home / "data" / "synth"


def _identity(cfg: SynthConfig) -> dict[str, Any]:
    """What determines the bytes: everything but the output path."""
    d = to_dict(cfg)
    d.pop("out")
    return {"generator": GENERATOR, "version": GENERATOR_VERSION, "config": d}


def _validate(cfg: SynthConfig) -> None:
    require(cfg.n_entities >= 12, f"--n-entities {cfg.n_entities}: use at least 12 (4 cities, people, animals)")
    require(cfg.n_lands >= len(LETTERS), f"--n-lands {cfg.n_lands}: use at least {len(LETTERS)} (one per choice)")
    require(cfg.docs_per_shard >= 1, f"--docs-per-shard {cfg.docs_per_shard}: must be positive")
    require(cfg.n_docs >= 2 * cfg.docs_per_shard,
            f"--n-docs {cfg.n_docs} with --docs-per-shard {cfg.docs_per_shard}: need at least two shards "
            f"(the last one is validation); raise --n-docs or lower --docs-per-shard")
    require(cfg.n_chat_train >= 1 and cfg.n_chat_val >= 1,
            f"--n-chat-train {cfg.n_chat_train} / --n-chat-val {cfg.n_chat_val}: must be positive")
    require(cfg.n_eval >= 0, f"--n-eval {cfg.n_eval}: must be >= 0")
    require(0.0 <= cfg.eval_mc_fraction <= 1.0, f"--eval-mc-fraction {cfg.eval_mc_fraction}: must be in [0, 1]")


def _manifest_ok(directory: Path, manifest: dict[str, Any], want: dict[str, Any]) -> bool:
    if {k: manifest.get(k) for k in want} != want:
        return False
    for name, info in manifest.get("files", {}).items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            return False
    return bool(manifest.get("files"))


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    path = directory / "manifest.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def generate(cfg: SynthConfig, force: bool = False) -> dict[str, Any]:
    """Write the synthetic world to `out_dir(cfg)` and return the manifest (+ `skipped`, `seconds`, `out`).

    Idempotent: when the directory already holds this exact config's files (manifest and sha256 match), nothing is
    written. Every file appears through `files` (temp name, then rename); the manifest is written last, so an
    interrupted run is never mistaken for a finished one."""
    _validate(cfg)
    t0 = time.time()
    directory = out_dir(cfg)
    want = _identity(cfg)
    old = _read_manifest(directory)
    if not force and old and _manifest_ok(directory, old, want):
        return {**old, "skipped": True, "seconds": round(time.time() - t0, 3), "out": str(directory)}
    stale_shards = sorted(directory.glob("shard_*.parquet")) if directory.is_dir() else []
    if stale_shards and (not old or old.get("generator") != GENERATOR):
        raise UserError(f"--out {directory}: holds parquet shards that picochat data synth did not write; "
                        f"choose an empty directory for --out")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").unlink(missing_ok=True)

    world = build_world(cfg.seed, cfg.n_entities, cfg.n_lands)
    n_mc = round(cfg.n_eval * cfg.eval_mc_fraction)
    chat_facts, held_facts = split_facts(world, cfg.seed, n_mc)
    eval_items, held_arith = generate_eval(world, cfg.seed, held_facts, cfg.n_eval - len(held_facts))
    chat_train = generate_chat(world, cfg.seed, cfg.n_chat_train, "train", chat_facts, held_arith)
    chat_val = generate_chat(world, cfg.seed, cfg.n_chat_val, "val", chat_facts, held_arith)

    # train and val documents come from separate streams so each covers every fact on its own
    n_val = cfg.n_docs - cfg.docs_per_shard * ((cfg.n_docs - 1) // cfg.docs_per_shard)
    train_docs = generate_docs(world, cfg.seed, cfg.n_docs - n_val, "train")
    val_docs = generate_docs(world, cfg.seed, n_val, "val")
    shards = [train_docs[i:i + cfg.docs_per_shard] for i in range(0, len(train_docs), cfg.docs_per_shard)]
    shards.append(val_docs)

    names: list[str] = []
    for i, docs in enumerate(shards):
        name = f"shard_{i:05d}.parquet"
        _write_shard(directory / name, docs)
        names.append(name)
    for p in stale_shards:
        if p.name not in names:
            p.unlink(missing_ok=True)
    _write_jsonl(directory / "chat_train.jsonl", chat_train)
    _write_jsonl(directory / "chat_val.jsonl", chat_val)
    _write_jsonl(directory / "eval.jsonl", eval_items)

    files = {n: {"bytes": (directory / n).stat().st_size, "sha256": _sha256(directory / n)}
             for n in names + ["chat_train.jsonl", "chat_val.jsonl", "eval.jsonl"]}
    manifest = {
        **want,
        "seed": cfg.seed,
        "fingerprint": fingerprint(want),
        "counts": {
            "entities": len(world.entities), "facts": len(world.facts()), "heldout_facts": len(held_facts),
            "docs": cfg.n_docs, "train_docs": len(train_docs), "val_docs": len(val_docs), "shards": len(names),
            "doc_chars": sum(map(len, train_docs)) + sum(map(len, val_docs)),
            "chat_train": len(chat_train), "chat_val": len(chat_val),
            "eval": len(eval_items), "eval_mc": len(held_facts), "eval_gen": len(eval_items) - len(held_facts),
        },
        "shards": names,
        "val_shard": names[-1],
        "files": files,
    }
    atomic_write_bytes(directory / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return {**manifest, "skipped": False, "seconds": round(time.time() - t0, 3), "out": str(directory)}


# ----------------------------------------------------------------------------------------------------------------
# Reading back


def _read_jsonl(path: str | Path, what: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file; run `picochat data synth` first (or pass the right path)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg}); regenerate it with "
                                f"`picochat data synth --force`") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: holds no {what}; regenerate it with `picochat data synth --force`")
    return rows


def load_chat(path: str | Path) -> list[dict]:
    """Conversations `{"messages": [...]}` from a JSONL file (the synth format; also any file in that format)."""
    rows = _read_jsonl(path, "conversations")
    for i, row in enumerate(rows, 1):
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{path}: conversation {i} has no 'messages' list")
    return rows


def load_eval(path: str | Path) -> list[dict]:
    """Eval items: `{"id", "kind": "mc", "question", "choices", "answer": int}` or `{"id", "kind": "gen",
    "question", "answer": str}`."""
    rows = _read_jsonl(path, "eval items")
    for i, row in enumerate(rows, 1):
        kind = row.get("kind")
        ok = isinstance(row.get("question"), str) and "id" in row
        if kind == "mc":
            ok = ok and isinstance(row.get("choices"), list) and isinstance(row.get("answer"), int) \
                and 0 <= row["answer"] < len(row["choices"])
        elif kind == "gen":
            ok = ok and isinstance(row.get("answer"), str)
        else:
            ok = False
        if not ok:
            raise UserError(f"{path}: item {i} is not a valid eval item (kind mc or gen, question, answer)")
    return rows


def mc_letter(text: str) -> int | None:
    """The choice index a model's answer names ("B", "B.", " b) ..."), or None."""
    m = re.match(r"\s*([A-Da-d])\b", text)
    return LETTERS.index(m.group(1).upper()) if m else None


# ----------------------------------------------------------------------------------------------------------------
# CLI (called by `picochat data synth`)


def add_synth_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, SynthConfig)
    parser.add_argument("--force", action="store_true", help="regenerate even if the files match the config")


def synth_main(args: argparse.Namespace) -> int:
    cfg = config_from_args(SynthConfig, args)
    summary = generate(cfg, force=bool(getattr(args, "force", False)))
    c = summary["counts"]
    verb = "up to date" if summary["skipped"] else f"written in {summary['seconds']:.1f}s"
    print(f"synth: {summary['out']} {verb}: {c['shards']} shards ({c['train_docs']} train + {c['val_docs']} val "
          f"docs, {c['doc_chars'] / 1e6:.1f}M chars), {c['chat_train']} + {c['chat_val']} conversations, "
          f"{c['eval']} eval items ({c['eval_mc']} mc on held-out facts, {c['eval_gen']} arithmetic)")
    return 0


__all__ = ["SynthConfig", "generate", "add_synth_args", "synth_main", "load_chat", "load_eval", "build_world",
           "render_mc", "mc_letter", "spell", "World", "Fact", "Entity"]
