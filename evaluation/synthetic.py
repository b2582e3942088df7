"""A deterministic generator of counterfactual facts about fictional subjects, for runs at
100k-1M facts with no download.

Each relation has an edit template, several paraphrase templates and an object pool. Subject
i gets a unique pronounceable name built from syllables by a seeded permutation; its "true"
object and its new object are two different draws from the relation's pool. Neighbourhood
prompts put other (never edited) subjects of the same relation into the edit template, with
their own "true" objects as locality targets.

Differences from CounterFact: subjects are invented, so the model holds no prior fact about
them (pre-edit efficacy hovers near chance rather than near 0); relations are fewer (20) and
templates simpler; paraphrases are templated, not written by people."""
from __future__ import annotations

import random
from typing import Iterator

from ..engine.facts import Fact

LANGS = ["English", "French", "German", "Spanish", "Italian", "Russian", "Japanese", "Chinese", "Arabic", "Dutch",
         "Swedish", "Polish", "Greek", "Turkish", "Korean", "Hindi", "Portuguese", "Finnish"]
CITIES = ["Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Moscow", "Vienna", "Prague", "Lisbon", "Dublin",
          "Oslo", "Cairo", "Toronto", "Sydney", "Chicago", "Mumbai", "Seoul", "Athens", "Warsaw"]
COUNTRIES = ["France", "Germany", "Italy", "Spain", "Japan", "China", "Russia", "Canada", "Brazil", "India", "Egypt",
             "Sweden", "Norway", "Poland", "Greece", "Mexico", "Australia", "Ireland", "Turkey", "Chile"]
COMPANIES = ["Google", "Microsoft", "Apple", "Toyota", "Honda", "Nokia", "Sony", "IBM", "Intel", "BMW", "Fiat",
             "Samsung", "Nintendo", "Boeing", "Siemens", "Philips"]
JOBS = ["doctor", "lawyer", "teacher", "pilot", "farmer", "painter", "chemist", "banker", "journalist", "architect",
        "nurse", "carpenter", "engineer", "poet", "diplomat"]
INSTRUMENTS = ["piano", "guitar", "violin", "cello", "trumpet", "flute", "drums", "harp", "saxophone", "organ"]
SPORTS = ["football", "tennis", "cricket", "baseball", "basketball", "hockey", "golf", "rugby", "volleyball", "boxing"]
RELIGIONS = ["Christianity", "Islam", "Buddhism", "Judaism", "Hinduism", "Shinto", "Taoism", "Sikhism"]
GENRES = ["jazz", "opera", "rock", "blues", "reggae", "techno", "folk", "punk", "soul", "funk"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
FOODS = ["pizza", "sushi", "pasta", "rice", "bread", "cheese", "soup", "curry", "salad", "chocolate"]
CONTINENTS = ["Europe", "Asia", "Africa", "Antarctica", "Oceania", "South America", "North America"]

# (edit template, paraphrase templates, object pool)
RELATIONS: list[tuple[str, tuple[str, ...], list[str]]] = [
    ("The mother tongue of {} is", ("{} grew up speaking", "The first language of {} is"), LANGS),
    ("{} is a citizen of", ("{} holds a passport from", "{} has the nationality of"), COUNTRIES),
    ("{} was born in", ("The birthplace of {} is", "{} came into the world in"), CITIES),
    ("{} works as a", ("By profession, {} is a", "The occupation of {} is"), JOBS),
    ("{} plays the", ("The instrument played by {} is the", "On stage, {} performs on the"), INSTRUMENTS),
    ("{} was developed by", ("{} is a product of", "The maker of {} is"), COMPANIES),
    ("{} is headquartered in", ("The head office of {} is in", "{} has its main office in"), CITIES),
    ("{} follows the religion of", ("The faith of {} is", "{} is a believer in"), RELIGIONS),
    ("{} is a professional player of", ("The sport of {} is", "{} competes in"), SPORTS),
    ("{} is best known for playing", ("The music of {} is", "{} became famous for performing"), GENRES),
    ("The favourite colour of {} is", ("{} likes the colour", "{} always dresses in"), COLOURS),
    ("The favourite food of {} is", ("{} loves to eat", "Every day, {} eats"), FOODS),
    ("{} is located on the continent of", ("{} lies in", "You can find {} in"), CONTINENTS),
    ("{} lives in the city of", ("The home town of {} is", "{} resides in"), CITIES),
    ("The official language of {} is", ("In {}, people speak", "The language used in {} is"), LANGS),
    ("{} is owned by", ("The owner of {} is", "{} belongs to"), COMPANIES),
    ("{} studied in", ("{} went to university in", "The alma mater of {} is in"), CITIES),
    ("{} writes in", ("The books of {} are written in", "{} publishes in"), LANGS),
    ("{} is represented by the country", ("{} plays for the national team of", "{} represents"), COUNTRIES),
    ("{} was trained as a", ("{} qualified as a", "Before retiring, {} was a"), JOBS),
]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "sh"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ei"]
_CODAS = ["", "n", "r", "l", "s", "th", "x", "m"]


def _syllable(n: int) -> str:
    n, o = divmod(n, len(_ONSETS))
    n, v = divmod(n, len(_VOWELS))
    return _ONSETS[o] + _VOWELS[v] + _CODAS[n % len(_CODAS)]


def subject_name(i: int, seed: int) -> str:
    """A unique fictional two-word name for subject i (injective in i for a fixed seed)."""
    per = len(_ONSETS) * len(_VOWELS) * len(_CODAS)  # 1280 syllables
    space = per**4
    mixed = ((i + 1) * 2654435761 + seed * 97) % space  # a bijection on [0, space): the multiplier is odd, space is even
    parts = []
    for _ in range(4):
        mixed, r = divmod(mixed, per)
        parts.append(_syllable(r))
    return f"{(parts[0] + parts[1]).capitalize()} {(parts[2] + parts[3]).capitalize()}"


def synthetic_facts(n: int, seed: int = 0, neighbours: int = 2) -> Iterator[Fact]:
    """n counterfactual facts; subjects >= n are reserved for neighbourhood prompts."""
    if n * 1 >= (1280**4) // 2:
        raise ValueError("too many facts requested")
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        tmpl, paras, pool = RELATIONS[i % len(RELATIONS)]
        true, new = rng.sample(pool, 2)
        subj = subject_name(i, seed)
        neigh, loc = [], None
        for _ in range(neighbours):
            other = n + rng.randrange(10 * n + 1000)
            neigh.append(tmpl.format(subject_name(other, seed)))
            loc = loc or random.Random(f"{seed}:{other}:{i % len(RELATIONS)}").choice([o for o in pool if o != new])
        yield Fact(subject=subj, prompt=tmpl, target_new=new, target_true=true, id=f"syn-{seed}-{i}",
                   paraphrases=tuple(p.format(subj) for p in paras), neighborhood=tuple(neigh),
                   locality_target=loc, meta={"format": "synthetic", "relation": i % len(RELATIONS)})
