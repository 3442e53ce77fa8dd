"""A deterministic Alpaca-format instruction set whose answers are exact.

Five task families (arithmetic, unit conversion, strings, lists, dates) with
several phrasings each, so that held-out accuracy can be scored by exact match.
All wording here is this project's own.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable

Example = dict[str, str]

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "rocket",
    "pencil",
    "forest",
    "candle",
    "bridge",
    "silver",
    "ocean",
    "market",
    "planet",
    "yellow",
    "castle",
    "winter",
    "summer",
    "thunder",
    "basket",
    "dragon",
    "mirror",
    "violin",
    "coffee",
    "anchor",
    "shadow",
    "meadow",
    "island",
    "harbor",
    "lantern",
    "puzzle",
    "falcon",
    "copper",
    "marble",
    "orchid",
    "pepper",
    "saddle",
    "tunnel",
    "velvet",
    "whistle",
    "zebra",
    "cactus",
    "dolphin",
    "engine",
    "feather",
    "glacier",
    "hammer",
    "jungle",
    "kettle",
    "ladder",
    "magnet",
    "needle",
    "orbit",
    "parrot",
    "quartz",
    "ribbon",
    "spider",
    "tiger",
    "umbrella",
    "valley",
    "walnut",
    "yogurt",
    "button",
    "carpet",
    "desert",
    "elbow",
    "fabric",
    "goblet",
    "helmet",
    "iceberg",
    "jacket",
    "kitten",
    "lemon",
    "mango",
    "napkin",
    "otter",
    "pillow",
    "rabbit",
    "sandal",
    "teapot",
    "unicorn",
    "vessel",
    "wagon",
    "blossom",
    "comet",
    "dune",
    "ember",
    "fossil",
    "grove",
]

MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]

# (instruction, unit from, unit to, factor)
CONVERSIONS = (
    ("kilometres", "metres", 1000),
    ("metres", "centimetres", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("litres", "millilitres", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
)


def _arithmetic(rng: random.Random) -> Example:
    # Small operands: a 135M-parameter model can learn these in a few dozen steps.
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    kind = rng.choice(("add", "sub", "mul", "add_in"))
    if kind == "add":
        return _ex(f"What is {a} plus {b}? Reply with the number only.", "", str(a + b))
    if kind == "sub":
        big, small = max(a, b), min(a, b)
        return _ex(f"Subtract {small} from {big}. Give just the result.", "", str(big - small))
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return _ex(f"Multiply {a} by {b}. Answer with the product only.", "", str(a * b))
    return _ex("Add the two numbers and give only the sum.", f"{a}, {b}", str(a + b))


def _units(rng: random.Random) -> Example:
    source, target, factor = rng.choice(CONVERSIONS)
    amount = rng.randint(1, 30)
    if rng.random() < 0.5:
        return _ex(
            f"Convert {amount} {source} to {target}. Reply with the number only.",
            "",
            str(amount * factor),
        )
    return _ex(
        f"How many {target} are in the given amount? Answer with a number.",
        f"{amount} {source}",
        str(amount * factor),
    )


def _strings(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    kind = rng.choice(("reverse", "upper", "count", "initials", "last"))
    if kind == "reverse":
        return _ex("Write the given word backwards.", word, word[::-1])
    if kind == "upper":
        phrase = " ".join(rng.sample(WORDS, 2))
        return _ex("Rewrite the phrase in capital letters.", phrase, phrase.upper())
    if kind == "count":
        return _ex(f"How many letters are in the word '{word}'? Answer with a number.", "", str(len(word)))
    if kind == "initials":
        phrase = rng.sample(WORDS, 3)
        return _ex(
            "Give the first letter of each word, joined together.",
            " ".join(phrase),
            "".join(w[0] for w in phrase),
        )
    return _ex(f"What is the last letter of '{word}'? Reply with the letter only.", "", word[-1])


def _lists(rng: random.Random) -> Example:
    numbers = [rng.randint(1, 50) for _ in range(rng.randint(3, 5))]
    shown = ", ".join(map(str, numbers))
    kind = rng.choice(("sort", "max", "min", "sum", "reverse"))
    if kind == "sort":
        return _ex("Sort the numbers from smallest to largest.", shown, ", ".join(map(str, sorted(numbers))))
    if kind == "max":
        return _ex("Which number in the list is the largest?", shown, str(max(numbers)))
    if kind == "min":
        return _ex("Name the smallest number in the list.", shown, str(min(numbers)))
    if kind == "sum":
        return _ex("Add up all the numbers in the list.", shown, str(sum(numbers)))
    return _ex("List the numbers in reverse order.", shown, ", ".join(map(str, reversed(numbers))))


def _dates(rng: random.Random) -> Example:
    day = dt.date(1990, 1, 1) + dt.timedelta(days=rng.randint(0, 15000))
    iso = day.isoformat()
    kind = rng.choice(("dmy", "month", "weekday", "long"))
    if kind == "dmy":
        return _ex("Rewrite the date in DD/MM/YYYY form.", iso, day.strftime("%d/%m/%Y"))
    if kind == "month":
        return _ex(f"In which month does the date {iso} fall?", "", MONTHS[day.month - 1])
    if kind == "weekday":
        return _ex(f"What day of the week was {iso}?", "", WEEKDAYS[day.weekday()])
    long_form = f"{day.day} {MONTHS[day.month - 1]} {day.year}"
    return _ex("Write this date as day, month name and year.", iso, long_form)


def _ex(instruction: str, input_text: str, output: str) -> Example:
    return {"instruction": instruction, "input": input_text, "output": output}


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    "arithmetic": _arithmetic,
    "units": _units,
    "strings": _strings,
    "lists": _lists,
    "dates": _dates,
}


def generate_examples(count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct examples, families in rotation, identical for a given seed."""
    rng = random.Random(seed)
    seen: set[tuple[str, str]] = set()
    examples: list[dict[str, str]] = []
    families = list(FAMILIES.items())
    attempts = 0
    while len(examples) < count:
        attempts += 1
        if attempts > count * 50:
            raise RuntimeError(f"could only make {len(examples)} distinct examples of {count}")
        family, make = families[len(examples) % len(families)]
        example = make(rng)
        key = (example["instruction"], example["input"])
        if key in seen:
            continue
        seen.add(key)
        examples.append({**example, "family": family})
    return examples
