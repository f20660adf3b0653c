"""The two datasets of §7.1, generated: the paper's were not released, so they are made here,
deterministically from a seed, to the paper's sizes and length ranges.

The paper (§7.1) uses a *Synthetic QA* set (10,000 pairs, single-sentence questions of ~5-20
tokens, short factual answers of ~3-40 tokens) and an *Instruction* set (5,000 brainstorming /
explanation / short-composition pairs), split 80/10/10 (`data.split`):

- ``qa``: closed-book questions about a generated world (people and cities with
  invented names), every answer read off a fact table;
- ``qa-grounded``: the question carries its own fact plus a distractor, so the
  answer is in the prompt and attending to the right prompt tokens pays off;
- ``instruct``: templated instructions whose good responses reuse the topic's words.

Records are plain dicts ``{"prompt": str, "response": str}``, optionally with ``"group"``
(QA: the fact id). Everything else about data (split, user JSONL, tokenizer, encoding) is data.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PAPER_SIZES = {"qa": 10_000, "qa-grounded": 10_000, "instruct": 5_000}  # §7.1

# ----------------------------------------------------------------------------- world
# Names are built from syllables so they are new words: the model cannot know them
# from anywhere but the training data, and the BPE must split them into pieces.
# fmt: off
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kr", "tr", "st", "th", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ei", "ou")
_CODAS = ("", "", "", "n", "r", "l", "s", "m")
JOBS = ("baker", "nurse", "teacher", "farmer", "painter", "engineer", "doctor",
        "carpenter", "pilot", "tailor", "potter", "librarian", "chemist",
        "architect", "miner", "gardener", "musician", "judge", "sailor", "builder",
        "cook", "writer", "dentist", "fisher")
COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white",
           "grey", "pink", "brown", "silver", "gold", "teal")
PETS = ("cat", "dog", "parrot", "rabbit", "hamster", "tortoise", "goldfish",
        "horse", "goat", "owl", "ferret", "lizard")
# fmt: on


@dataclass
class Person:
    name: str  # "Varo Kelin"; siblings share the surname
    first: str
    city: int  # index into World.cities
    job: str
    born: int
    colour: str
    pet: str
    sibling: int  # index into World.people (symmetric pairs)


@dataclass
class City:
    name: str
    country: str
    river: str
    founded: int


@dataclass
class World:
    people: list[Person] = field(default_factory=list)
    cities: list[City] = field(default_factory=list)


def _name(world: World, kind: str, i: int) -> str:
    return (world.people[i] if kind == "p" else world.cities[i]).name


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def make_world(num_entities: int = 750, seed: int = 0) -> World:
    """A fact table of ``num_entities`` entities: ~5/6 people (in sibling pairs), ~1/6 cities."""
    if num_entities < 8:
        raise ValueError(f"num_entities must be at least 8, got {num_entities}")
    rng = random.Random(seed)
    used: set[str] = set()

    def word(syllables: int, suffix: str = "") -> str:
        while True:  # reject repeats so every name is a distinct word
            w = (
                "".join(
                    rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(syllables)
                ).capitalize()
                + suffix
            )
            if w not in used:
                used.add(w)
                return w

    num_cities = max(4, round(num_entities / 6))
    num_people = num_entities - num_cities
    if num_people % 2:  # people come in sibling pairs
        num_people, num_cities = num_people - 1, num_cities + 1
    countries = [
        word(2, rng.choice(("ia", "land", "ora"))) for _ in range(max(3, num_cities // 12))
    ]
    rivers = [word(2) for _ in range(max(4, num_cities // 4))]
    world = World()
    for _ in range(num_cities):
        world.cities.append(
            City(word(2), rng.choice(countries), rng.choice(rivers), rng.randint(1000, 1899))
        )
    # First names are reused across families, so the model must read the whole name.
    firsts = [word(2) for _ in range(max(8, num_people // 4))]
    for pair in range(num_people // 2):
        surname = word(2)
        for k, first in enumerate(rng.sample(firsts, 2)):
            world.people.append(
                Person(
                    name=f"{first} {surname}",
                    first=first,
                    city=rng.randrange(num_cities),
                    job=rng.choice(JOBS),
                    born=rng.randint(1930, 2005),
                    colour=rng.choice(COLOURS),
                    pet=rng.choice(PETS),
                    sibling=2 * pair + 1 - k,
                )
            )  # the other one of the pair
    return world


# Question templates: several phrasings per fact, so held-out prompts can be new
# phrasings of facts the training split states (closed-book exact match, §7.4).
# fmt: off
PERSON_QUESTIONS = {
    "city": ("Where does {e} live?", "In which city does {e} live?",
             "Which city is home to {e}?", "What is the home city of {e}?",
             "Name the city where {e} lives."),
    "job": ("What is {e}'s job?", "What does {e} do for a living?", "What work does {e} do?",
            "Which job does {e} have?", "What is the occupation of {e}?"),
    "born": ("When was {e} born?", "In which year was {e} born?",
             "What is {e}'s year of birth?", "What year was {e} born in?"),
    "colour": ("What is {e}'s favourite colour?", "Which colour does {e} like best?",
               "What colour does {e} love?", "Which colour is the favourite of {e}?"),
    "pet": ("What pet does {e} have?", "Which animal does {e} keep as a pet?",
            "What kind of pet does {e} keep?", "What animal lives with {e}?"),
    "sibling": ("Who is {e}'s sibling?", "What is the name of {e}'s sibling?",
                "Who is the sibling of {e}?", "Which person is {e}'s sibling?"),
    "family": ("Tell me about {e}'s family.", "What do you know about {e}'s family?",
               "Describe the family of {e}.", "Can you tell me about the family of {e}?"),
    "work": ("Tell me about {e}'s work.", "What do you know about {e}'s working life?",
             "Describe the work of {e}.", "Can you tell me about the work of {e}?"),
    "profile": ("Tell me about {e}.", "What do you know about {e}?",
                "Give me a short profile of {e}.", "Can you tell me who {e} is?",
                "Describe {e} in a few sentences."),
}
CITY_QUESTIONS = {
    "country": ("Which country is {e} in?", "In which country is {e}?",
                "In which country is the city of {e}?", "What country does {e} belong to?",
                "Where is the city of {e}?"),
    "river": ("Which river flows through {e}?", "What river runs through {e}?",
              "On which river does {e} lie?", "What is the name of the river in {e}?"),
    "founded": ("When was the city of {e} founded?", "In which year was {e} founded?",
                "What year was {e} founded in?", "Which year saw the founding of {e}?"),
    "about": ("Tell me about the city of {e}.", "What do you know about {e}?",
              "Describe the city of {e}.", "Give me a short description of {e}."),
}
ATOMIC_PERSON = ("city", "job", "born", "colour", "pet", "sibling")
ATOMIC_CITY = ("country", "river", "founded")
# fmt: on


def _predicate(world: World, kind: str, i: int, attr: str) -> str:
    """The verb phrase stating one atomic fact: answer = subject + predicate + '.'."""
    if kind == "p":
        p = world.people[i]
        return {
            "city": f"lives in {world.cities[p.city].name}",
            "job": f"works as {_a(p.job)}",
            "born": f"was born in {p.born}",
            "colour": f"loves the colour {p.colour}",
            "pet": f"keeps a pet {p.pet}",
            "sibling": f"has a sibling called {world.people[p.sibling].name}",
        }[attr]
    c = world.cities[i]
    return {
        "country": f"is a city in {c.country}",
        "river": f"lies on the river {c.river}",
        "founded": f"was founded in {c.founded}",
    }[attr]


def _key(world: World, kind: str, i: int, attr: str) -> str:
    """The key span of an atomic fact: the words of its predicate that answer the question (the
    city, the job, the year, ...; a sibling's first name, as the surname is the subject's own).
    evaluation.key_span_match reads it (DECISIONS.md §13)."""
    if kind == "p":
        p = world.people[i]
        return {
            "city": world.cities[p.city].name,
            "job": p.job,
            "born": str(p.born),
            "colour": p.colour,
            "pet": p.pet,
            "sibling": world.people[p.sibling].first,
        }[attr]
    c = world.cities[i]
    return {"country": c.country, "river": c.river, "founded": str(c.founded)}[attr]


def _answer(world: World, kind: str, i: int, attr: str) -> str:
    """The reference answer for fact (entity, attr): one or two short sentences."""
    if attr in ATOMIC_PERSON + ATOMIC_CITY:
        return f"{_name(world, kind, i)} {_predicate(world, kind, i, attr)}."
    if kind == "c":  # "about": three city facts in one sentence
        c = world.cities[i]
        return f"{c.name} is a city in {c.country} on the river {c.river}, founded in {c.founded}."
    p = world.people[i]
    city, sib = world.cities[p.city], world.people[p.sibling]
    if attr == "family":
        return (
            f"{p.name} has a sibling called {sib.name}, who lives in "
            f"{world.cities[sib.city].name} and works as {_a(sib.job)}."
        )
    if attr == "work":
        return (
            f"{p.name} works as {_a(p.job)} in {city.name}, a city in {city.country} "
            f"on the river {city.river}."
        )
    return (
        f"{p.name} was born in {p.born} and lives in {city.name}, a city in {city.country}. "
        f"{p.first} works as {_a(p.job)}, loves the colour {p.colour}, keeps a pet "
        f"{p.pet} and has a sibling called {sib.name}."
    )  # "profile": the longest kind


def _facts(world: World) -> list[tuple[str, int, str, tuple[str, ...]]]:
    """(kind, entity index, attribute, question templates) for every fact of the world."""
    out = [("p", i, a, q) for i in range(len(world.people)) for a, q in PERSON_QUESTIONS.items()]
    return out + [
        ("c", i, a, q) for i in range(len(world.cities)) for a, q in CITY_QUESTIONS.items()
    ]


def make_qa(n: int = 10_000, seed: int = 0, num_entities: int = 750) -> list[dict]:
    """Synthetic closed-book QA (§7.1): ``n`` pairs about a generated world.

    Facts get questions round-robin (every fact once, then a second phrasing, ...), so
    with the defaults (~6,100 facts) every fact is asked at least once and most twice:
    a held-out phrasing can then be paired with a training phrasing of the same fact.
    ``group`` is the fact id, e.g. ``"p17.job"``. Raise ``num_entities`` for a harder world.
    """
    rng = random.Random(seed)
    world = make_world(num_entities, seed)
    facts = _facts(world)
    rng.shuffle(facts)
    orders = [
        rng.sample(templates, len(templates)) for *_, templates in facts
    ]  # phrasings per fact
    rounds = [
        (fact, order[k])
        for k in range(max(map(len, orders)))
        for fact, order in zip(facts, orders)
        if k < len(order)
    ]
    if len(rounds) < n:
        raise ValueError(
            f"a world of {num_entities} entities has only {len(rounds)} distinct "
            f"questions, fewer than n={n}; raise num_entities"
        )
    records = [
        {
            "prompt": template.format(e=_name(world, kind, i)),
            "response": _answer(world, kind, i, attr),
            "group": f"{kind}{i}.{attr}",
        }
        for (kind, i, attr, _), template in rounds[:n]
    ]
    assert len({r["prompt"] for r in records}) == n  # names are unique words, so prompts are too
    rng.shuffle(records)
    return records


def make_qa_grounded(n: int = 10_000, seed: int = 0, num_entities: int = 750) -> list[dict]:
    """QA whose prompt states the answer (§7.1 variant): fact + distractor, then the question.

    The distractor is another fact about the same entity or about another entity
    (sometimes the same attribute), in random order, so the answer must be copied
    from the right clause: exactly what cross-attention coverage (§3.2) rewards.
    ``wrong`` is the plausible mistake: the distractor's predicate said of the asked entity
    (what ``--sft-noise`` puts in the SFT data, data.sft_noise). ``key`` and ``wrong_key`` are the
    key spans of the fact and of the distractor (``_key``): what a free-form answer must and must
    not say (evaluation.key_span_match).
    """
    rng = random.Random(seed)
    world = make_world(num_entities, seed)
    ents = [("p", i, ATOMIC_PERSON) for i in range(len(world.people))]
    ents += [("c", i, ATOMIC_CITY) for i in range(len(world.cities))]
    records, seen = [], set()
    for _ in range(50 * n):
        if len(records) == n:
            break
        kind, i, attrs = rng.choice(ents)
        attr = rng.choice(attrs)
        name = _name(world, kind, i)
        fact = _predicate(world, kind, i, attr)
        if rng.random() < 0.5:  # distractor about the same entity: one subject, two predicates
            attr2 = rng.choice([a for a in attrs if a != attr])
            other, wrong_key = _predicate(world, kind, i, attr2), _key(world, kind, i, attr2)
            first, second = (fact, other) if rng.random() < 0.5 else (other, fact)
            context = f"{name} {first} and {second}."
        else:
            k2, j, attrs2 = rng.choice(ents)
            if (k2, j) == (kind, i):
                continue
            attr2 = attr if k2 == kind and rng.random() < 0.5 else rng.choice(attrs2)
            other, wrong_key = _predicate(world, k2, j, attr2), _key(world, k2, j, attr2)
            clauses = [f"{name} {fact}", f"{_name(world, k2, j)} {other}"]
            rng.shuffle(clauses)
            context = rng.choice(("{}, and {}.", "{}, while {}.", "{}. {}.")).format(*clauses)
        questions = PERSON_QUESTIONS[attr] if kind == "p" else CITY_QUESTIONS[attr]
        prompt = f"{context} {rng.choice(questions).format(e=name)}"
        if prompt not in seen:
            seen.add(prompt)
            records.append(
                {
                    "prompt": prompt,
                    "response": f"{name} {fact}.",
                    "wrong": f"{name} {other}.",
                    "key": _key(world, kind, i, attr),
                    "wrong_key": wrong_key,
                }
            )
    if len(records) < n:
        raise ValueError(
            f"could only draw {len(records)} distinct grounded prompts; raise num_entities"
        )
    return records


# -------------------------------------------------------------------------- instruct
# A few dozen topics, each with related content words. A good response reuses the
# topic and these words, so a response that attends to the prompt's topic words
# is both relevant and well covered (§3.2 coverage).
# fmt: off
TOPICS = {
    "gardening": ("soil", "seeds", "compost", "sunlight", "watering", "weeds", "tools", "harvest"),
    "cooking": ("recipe", "spices", "vegetables", "knives", "flavour", "ingredients",
                "leftovers", "stove"),
    "baking": ("flour", "yeast", "dough", "butter", "sugar", "oven", "timing", "crust"),
    "cycling": ("helmet", "brakes", "tyres", "routes", "gears", "saddle", "traffic", "lights"),
    "running": ("shoes", "pace", "stretching", "breathing", "distance", "rest", "hills",
                "hydration"),
    "swimming": ("pool", "strokes", "goggles", "lanes", "kicks", "towel", "lessons", "endurance"),
    "reading": ("books", "library", "chapters", "authors", "notes", "bookmarks", "quiet",
                "reviews"),
    "photography": ("camera", "light", "lenses", "framing", "focus", "shadows", "tripod",
                    "editing"),
    "painting": ("brushes", "colours", "canvas", "palette", "sketches", "layers", "easel",
                 "texture"),
    "camping": ("tent", "firewood", "map", "sleeping bags", "lantern", "weather", "campsite",
                "stove"),
    "hiking": ("trails", "boots", "backpack", "compass", "water", "summit", "blisters", "snacks"),
    "fishing": ("rods", "bait", "hooks", "lake", "patience", "nets", "boat", "tides"),
    "saving money": ("budget", "receipts", "savings", "bills", "discounts", "goals", "spending",
                     "interest"),
    "recycling": ("bins", "plastic", "paper", "glass", "labels", "sorting", "waste", "cans"),
    "home cleaning": ("dust", "mops", "windows", "laundry", "shelves", "sponges", "schedule",
                      "floors"),
    "team meetings": ("agenda", "minutes", "deadlines", "slides", "questions", "decisions",
                      "timekeeping", "feedback"),
    "online learning": ("courses", "videos", "quizzes", "forums", "schedule", "headphones",
                        "deadlines", "certificates"),
    "job interviews": ("questions", "references", "posture", "research", "portfolio", "clothing",
                       "answers", "confidence"),
    "birdwatching": ("binoculars", "feathers", "nests", "songs", "notebook", "dawn", "migration",
                     "feeders"),
    "chess": ("openings", "pawns", "tactics", "endgames", "clocks", "puzzles", "strategy",
              "tournaments"),
    "football": ("passing", "goals", "training", "boots", "teamwork", "tactics", "referee",
                 "fitness"),
    "music practice": ("scales", "rhythm", "metronome", "chords", "posture", "songs",
                       "recordings", "patience"),
    "travel planning": ("tickets", "luggage", "maps", "hotels", "passports", "budget",
                        "itinerary", "insurance"),
    "first aid": ("bandages", "plasters", "kits", "burns", "calm", "pressure", "phone numbers",
                  "training"),
    "healthy sleep": ("bedtime", "pillows", "darkness", "routine", "screens", "naps", "caffeine",
                      "quiet"),
    "letter writing": ("paper", "stamps", "envelopes", "greetings", "handwriting", "news",
                       "memories", "postcards"),
    "woodworking": ("saws", "timber", "glue", "sanding", "clamps", "measurements", "safety",
                    "varnish"),
    "knitting": ("yarn", "needles", "patterns", "stitches", "scarves", "colours", "wool",
                 "tension"),
    "astronomy": ("telescope", "stars", "planets", "charts", "darkness", "moon", "comets",
                  "patience"),
    "beekeeping": ("hives", "honey", "queens", "smoke", "flowers", "veils", "frames", "swarms"),
    "volunteering": ("charities", "time", "shifts", "donations", "kindness", "training",
                     "community", "events"),
    "moving house": ("boxes", "labels", "furniture", "removal vans", "keys", "neighbours",
                     "packing", "cleaning"),
    "city parks": ("benches", "trees", "paths", "playgrounds", "ponds", "litter", "picnics",
                   "lawns"),
    "board games": ("dice", "rules", "cards", "turns", "strategy", "snacks", "friends", "scores"),
    "journaling": ("notebook", "pens", "habits", "thoughts", "gratitude", "prompts", "mornings",
                   "memories"),
    "language learning": ("vocabulary", "grammar", "flashcards", "accents", "conversation",
                          "podcasts", "mistakes", "practice"),
}
# fmt: on
# fmt: off
AUDIENCES = ("children", "a beginner", "my grandparents", "a busy parent", "a student",
             "a small team", "a retired neighbour", "a group of friends", "new colleagues",
             "a school class", "a tired worker", "a teenager")
# (as named in the prompt, as greeted in the note)
RECIPIENTS = (("your neighbour", "neighbour"), ("a friend", "friend"), ("your manager", "Sam"),
              ("your sister", "sis"), ("an old teacher", "teacher"), ("your team", "team"),
              ("a new colleague", "Alex"), ("your grandmother", "Grandma"),
              ("the club members", "everyone"), ("your cousin", "cousin"),
              ("a pen pal", "pen pal"), ("your landlord", "Mr Reed"))
# fmt: on
INSTRUCT_PROMPTS = {
    # kind -> templates; slots: {t} topic, {w} topic word, {a} audience, {r} recipient,
    # and verb agreement with {w}: {s} "s" or "", {is} "is"/"are", {does} "does"/"do"
    "brainstorm": (
        "List three ideas for {t} with {a}.",
        "Suggest three ways to make {t} more fun for {a}.",
        "Give me three ideas to get {a} started with {t}.",
        "Brainstorm three tips on {t} for {a}.",
        "What are three good ideas for {t} that {a} would enjoy?",
        "List three ideas for {t} that involve {w}.",
    ),
    "explain": (
        "Explain why {w} matter{s} for {t}.",
        "Explain to {a} why {w} matter{s} for {t}.",
        "Why {does} {w} matter so much for {t}?",
        "Describe how {w} affect{s} {t}.",
        "Explain the role of {w} in {t} in simple words.",
        "Help {a} understand why {w} {is} important for {t}.",
    ),
    "compose": (
        "Write a short note to {r} about {t}.",
        "Write a short message inviting {r} to try {t}.",
        "Compose a brief letter to {r} about your plans for {t}.",
        "Write a friendly note telling {r} what you learnt about {t}.",
        "Draft a short email to {r} about {t} and {w}.",
    ),
}
# fmt: off
_IDEAS = ("start with the {}", "plan time for the {}", "share tips about the {}",
          "keep notes on the {}", "ask an expert about the {}", "make a game out of the {}",
          "set a small goal for the {}", "read a short guide about the {}")
# fmt: on
INSTRUCT_RESPONSES = {
    # slots as above, plus {w2} {w3} other topic words, {i1..i3} ideas, {g} greeting
    "brainstorm": (
        "Here are three ideas for {t}: first, {i1}; second, {i2}; third, {i3}. "
        "Each one keeps {t} simple and fun.",
        "Three ideas for {t}: {i1}, {i2}, and {i3}. Start small and build on what works.",
        "Try these for {t}. One, {i1}. Two, {i2}. Three, {i3}.",
        "For {t}: {i1}, {i2}, {i3}.",
    ),
    "explain": (
        "{W} matter{s} for {t} because {w} shape{s} the {w2} and the {w3}. Without good {w}, {t} "
        "quickly becomes harder, so anyone who cares about {t} should pay attention to the {w}.",
        "In {t}, {w} {is} important because {w} connect{s} the {w2} with the {w3}. "
        "When the {w} {is} right, the rest of {t} goes more smoothly.",
        "Good {w} make{s} {t} easier: paying attention to the {w} helps with the {w2}, "
        "saves time on the {w3}, and makes the results last longer.",
    ),
    "compose": (
        "Dear {g}, I wanted to tell you about {t}. Lately I have been thinking about the {w} "
        "and the {w2}, and I would love to talk about the {w3} with you soon. Best wishes.",
        "Hi {g}, just a short note about {t}. I have been working on the {w} and the {w2}, "
        "and I think you would enjoy it too. Let me know what you think. Take care.",
        "Hello {g}, {t} has been on my mind this week. I learnt a lot about the {w} and "
        "the {w2}, and next time I want to try the {w3}. Talk soon.",
        "Dear {g}, I hope you are well. I wanted to tell you about {t}. "
        "I have been learning about the {w} and the {w2}, and next month I want to "
        "spend more time on the {w3}. If you ever want to try {t} yourself, I would be happy to "
        "show you. Warm wishes.",
    ),
}


def make_instruct(n: int = 5_000, seed: int = 0) -> list[dict]:
    """Instruction pairs (§7.1): brainstorming, explanation, short composition, ~n/3 each.

    Every distinct prompt (kind x template x topic x slot fillers) is enumerated, so
    prompts are unique by construction; the response is drawn from the kind's
    response templates and fills in the topic and other words of that topic.
    """
    rng = random.Random(seed)
    pools = {}
    for kind, templates in INSTRUCT_PROMPTS.items():
        pool = []
        for tpl in templates:
            for t, words in TOPICS.items():
                for w in words if "{w}" in tpl else (None,):
                    for a in AUDIENCES if "{a}" in tpl else (None,):
                        for r in RECIPIENTS if "{r}" in tpl else ((None, None),):
                            pool.append((kind, tpl, t, w, a, r))
        rng.shuffle(pool)
        pools[kind] = pool
    kinds = list(INSTRUCT_PROMPTS)
    most = len(kinds) * min(len(p) for p in pools.values())
    if n > most:
        raise ValueError(f"make_instruct makes at most {most} distinct prompts, asked for {n}")
    records = []
    for i in range(n):  # kinds in turn, so each is ~n/3
        kind, tpl, t, w, a, r = pools[kinds[i % len(kinds)]][i // len(kinds)]
        words = TOPICS[t]
        main = w or rng.choice(words)  # the prompt's word leads the response when there is one
        w2, w3 = rng.sample([x for x in words if x != main], 2)
        plural = main == "dice" or main.endswith("s") and not main.endswith("ss") and main != "news"
        verb = {
            "s": "" if plural else "s",
            "is": "are" if plural else "is",
            "does": "do" if plural else "does",
        }
        prompt = tpl.format(t=t, w=w, a=a, r=r[0], **verb)
        ideas = [idea.format(x) for idea, x in zip(rng.sample(_IDEAS, 3), (main, w2, w3))]
        response = rng.choice(INSTRUCT_RESPONSES[kind]).format(
            t=t,
            w=main,
            W=main.capitalize(),
            w2=w2,
            w3=w3,
            g=r[1] or "friend",
            i1=ideas[0],
            i2=ideas[1],
            i3=ideas[2],
            **verb,
        )
        records.append({"prompt": prompt, "response": response})
    rng.shuffle(records)
    return records


MAKERS = {"qa": make_qa, "qa-grounded": make_qa_grounded, "instruct": make_instruct}
DATASETS = tuple(MAKERS)
