"""A synthetic grade-school math task, generated in code (the embedded tiny Qwen3 trained on it is built
by `engine.recipes.embedded_inputs` / `engine.recipes.embedded`).

Each problem is a chain of 2-4 operations (+, -, *, exact /) told as a short story: a person starts with
some items or dollars, and each sentence changes the amount (buys more, gives some away, sells them,
a friend has three times as many, shares them among cousins...). The worked solution is GSM8K's format,
one step per line with a calculator annotation, `Mia has 12 + 5 = <<12+5=17>>17 apples now.`, and a
final `#### 17` line. Difficulty (operation count, number ranges) is set by `Difficulty`.

Three splits, the study's two difficulty levels:
- `train` and `test`: the easy problems (`Difficulty()`, 2-4 operations), the GSM8K analogue the rollouts,
  the training and the main accuracy use;
- `hard`: longer chains (`HARD`), the AIME analogue, evaluated only.
They are disjoint by construction: a problem belongs to `test` or `hard` iff a hash of its arithmetic
(start value and each operation with its operand, e.g. `12+5-3/2`) falls in the held-out fifth, whatever
the seed, names or wording; so no evaluated computation is ever seen in training.

`import engine.tasks.synthetic` registers the task "synthetic" (splits train/test/hard) with
`engine.tasks.registry`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

from engine.errors import EngineError
from engine.tasks.registry import TaskItem, register_task

TASK_NAME = "synthetic"
DEFAULT_SEED = 0
DEFAULT_SIZES = {"train": 4000, "test": 500, "hard": 500}  # what `load_task("synthetic", split)` returns
TEST_BUCKETS = 5        # 1 in TEST_BUCKETS arithmetic chains is reserved for the test split
MAX_OPS = 8


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """How hard problems are: operations per problem, and number ranges (all values stay >= 2).

    The defaults are the easy level the embedded models train on (the shipped student gets 72% of the
    test split, the teacher 90%; `embedded/BUILD.json`). Larger GSM8K-like ranges are e.g. max_start=20,
    max_operand=10, max_factor=5, max_value=100."""
    min_ops: int = 2
    max_ops: int = 4
    max_start: int = 10    # first quantity in [2, max_start]
    max_operand: int = 6   # added / subtracted amounts in [2, max_operand]
    max_factor: int = 3    # multipliers and divisors in [2, max_factor]
    max_value: int = 30    # every intermediate result stays <= max_value

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise EngineError(f"expected an integer >= 2, got {v!r}", field=f.name)
        if not self.min_ops <= self.max_ops <= MAX_OPS:
            raise EngineError(f"need 2 <= min_ops <= max_ops <= {MAX_OPS}, got {self.min_ops}..{self.max_ops}",
                              field="max_ops")
        if self.max_value < max(self.max_start, 2 * self.max_factor):
            raise EngineError("max_value must be >= max_start and 2 * max_factor", field="max_value")


# The hard split: one step longer than any training problem, over the same number ranges. Measured on a
# 6-layer model at 59% on the easy split: 5 steps 9%, 5-6 steps 6%, 4-5 steps 21% (the shipped student: 5%).
HARD = Difficulty(min_ops=5, max_ops=5)
SPLITS = ("train", "test", "hard")


# ---------------------------------------------------------------- the story world
@dataclasses.dataclass(frozen=True)
class Person:
    name: str
    he: str   # subject pronoun
    his: str  # possessive


PEOPLE = tuple(Person(n, "she", "her") for n in (
    "Mia", "Emma", "Ava", "Lily", "Zoe", "Nora", "Ruby", "Chloe", "Maya", "Sara", "Hana", "Lucia")) + tuple(
    Person(n, "he", "his") for n in (
    "Leo", "Sam", "Noah", "Omar", "Ben", "Jack", "Liam", "Ravi", "Tom", "Hugo", "Ivan", "Kenji"))
ITEMS = (  # (singular, plural, is food)
    ("apple", "apples", True), ("marble", "marbles", False), ("sticker", "stickers", False),
    ("pencil", "pencils", False), ("cookie", "cookies", True), ("book", "books", False),
    ("card", "cards", False), ("shell", "shells", False), ("stamp", "stamps", False),
    ("orange", "oranges", True), ("egg", "eggs", True), ("cupcake", "cupcakes", True),
    ("balloon", "balloons", False), ("flower", "flowers", False), ("crayon", "crayons", False),
    ("button", "buttons", False), ("muffin", "muffins", True), ("toy car", "toy cars", False))
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"), ("pack", "packs"),
              ("tray", "trays"), ("crate", "crates"))
GROUPS = (("friend", "friends"), ("classmate", "classmates"), ("cousin", "cousins"), ("neighbor", "neighbors"),
          ("teammate", "teammates"))
GAIN_VERBS = ("buys", "finds", "gets", "collects", "receives", "wins")
LOSS_VERBS = ("gives away", "sells", "loses", "trades away", "donates")
SPEND_ON = ("lunch", "a book", "a movie ticket", "a toy", "snacks", "a new hat", "a board game", "paint")
EARN_FROM = ("doing chores", "selling lemonade", "babysitting", "walking dogs", "washing cars", "a birthday card")
FRACTIONS = {2: "half", 3: "a third", 4: "a quarter", 5: "a fifth"}


@dataclasses.dataclass
class _State:
    """The quantity the story is about after the steps so far."""
    person: Person          # whose quantity it is
    noun: tuple             # (singular, plural) of the items; ignored when `money`
    money: bool
    value: int
    ask: str                # the question to end on if this is the last step
    food: bool = False


@dataclasses.dataclass
class _Problem:
    sentences: list[str]
    lines: list[str]
    chain: str              # the arithmetic, e.g. "12+5-3/2" (decides the split)
    answer: int


def _qty(st: _State, v: int | str) -> str:
    """An amount in the state's unit inside a sentence: `$5` or `5 apples`."""
    return f"${v}" if st.money else f"{v} {st.noun[1]}"


def _calc(x: int, op: str, b: int, r: int, money: bool) -> str:
    """`x * b = $<<x*b=r>>r`: GSM8K's worked step with its calculator annotation."""
    return f"{x} {op} {b} = {'$' if money else ''}<<{x}{op}{b}={r}>>{r}"


class _Story:
    def __init__(self, rng: random.Random, d: Difficulty) -> None:
        self.rng, self.d = rng, d
        self.cast = rng.sample(PEOPLE, 4)  # main character, then others in order of appearance
        self.next_other = 1
        self.prev_subject: Person | None = None

    def other(self) -> Person:
        p = self.cast[self.next_other % len(self.cast)]
        self.next_other += 1
        return p

    def name(self, p: Person) -> str:
        """The subject of a sentence: a pronoun half the time when it continues the last subject."""
        same = p is self.prev_subject
        self.prev_subject = p
        return p.he.capitalize() if same and self.rng.random() < 0.5 else p.name

    def start(self) -> tuple[_State, str, list[str], str, list[str]]:
        """The opening: (state, sentence, solution lines, arithmetic so far, operations used)."""
        rng, d = self.rng, self.d
        p = self.cast[0]
        money = rng.random() < 0.25
        item = rng.choice(ITEMS)
        base = dict(person=p, noun=item[:2], money=money, food=item[2])
        if rng.random() < 0.3:  # a product opening: a containers of b items, or a hours at $b
            a = rng.randint(2, min(d.max_start, d.max_value // 2))
            factors = [f for f in range(2, d.max_factor + 1) if a * f <= d.max_value]
            if factors:
                b = rng.choice(factors)
                r = a * b
                if money:
                    s = f"{self.name(p)} works {a} hours and earns ${b} per hour."
                    return (_State(**base, value=r, ask=f"How much money does {p.name} earn?"), s,
                            [f"{p.name} earns {_calc(a, '*', b, r, True)}."], f"{a}*{b}", ["*"])
                c = rng.choice(CONTAINERS)
                s = f"{self.name(p)} has {a} {c[1]} of {item[1]}. Each {c[0]} holds {b} {item[1]}."
                return (_State(**base, value=r, ask=f"How many {item[1]} does {p.name} have?"), s,
                        [f"{p.name} has {_calc(a, '*', b, r, False)} {item[1]}."], f"{a}*{b}", ["*"])
        a = rng.randint(2, d.max_start)
        st = _State(**base, value=a, ask="")
        return st, f"{self.name(p)} has {_qty(st, a)}.", [], str(a), []

    def step(self, st: _State, op: str, last: bool) -> tuple[_State, str, str, int] | None:
        """One operation on the state: (new state, sentence, solution line, operand), or None if `op`
        has no valid operand here (result < 2 or > max_value, inexact division)."""
        rng, d, x, m = self.rng, self.d, st.value, st.money
        if op == "+":
            choices = range(2, min(d.max_operand, d.max_value - x) + 1)
        elif op == "-":
            choices = range(2, min(d.max_operand, x - 2) + 1)
        elif op == "*":
            choices = range(2, min(d.max_factor, d.max_value // x) + 1)
        else:
            choices = [b for b in range(2, d.max_factor + 1) if x % b == 0 and x // b >= 2]
        if not choices:
            return None
        b = rng.choice(list(choices))
        r = {"+": x + b, "-": x - b, "*": x * b, "/": x // b}[op]
        calc = _calc(x, op, b, r, m)
        p, unit = st.person, ("money" if m else st.noun[1])
        new = dataclasses.replace(st, value=r)
        form = rng.random()
        if form < 0.35 and not (op == "/" and b not in FRACTIONS):  # a comparison with another person
            o = self.other()
            new.person = o
            more = {"+": "more", "-": "less" if m else "fewer"}.get(op)
            if more:
                amount = f"${b} {more}" if m else f"{b} {more} {unit}"
                s = f"{self.name(o)} has {amount} than {p.name}."
            elif op == "*":
                times = "twice" if b == 2 and rng.random() < 0.5 else f"{b} times"
                s = f"{self.name(o)} has {times} as {'much money' if m else 'many ' + unit} as {p.name}."
            else:
                s = f"{self.name(o)} has {FRACTIONS[b]} as {'much money' if m else 'many ' + unit} as {p.name}."
            new.ask = f"How much money does {o.name} have?" if m else f"How many {unit} does {o.name} have?"
            line = f"{o.name} has {calc}." if m else f"{o.name} has {calc} {unit}."
            return new, s, line, b
        who = self.name(p)
        if op == "+":
            if m:
                s = f"{who} earns ${b} more from {rng.choice(EARN_FROM)}."
                new.ask, line = f"How much money does {p.name} have now?", f"{p.name} has {calc} now."
            else:
                s = f"{who} {rng.choice(GAIN_VERBS)} {b} more {unit}."
                new.ask, line = f"How many {unit} does {p.name} have now?", f"{p.name} has {calc} {unit} now."
        elif op == "-":
            if m:
                s = f"{who} spends ${b} on {rng.choice(SPEND_ON)}."
            elif rng.random() < 0.3:
                s = f"{who} gives {b} {unit} to {self.other().name}."
            else:
                verbs = LOSS_VERBS + (("eats",) if st.food else ())
                s = f"{who} {rng.choice(verbs)} {b} of them."
            new.ask = f"How much money does {p.name} have left?" if m else f"How many {unit} does {p.name} have left?"
            line = f"{p.name} has {calc} left." if m else f"{p.name} has {calc} {unit} left."
        elif op == "*":
            if m:
                s = f"{who} saves that much every week for {b} weeks."
                new.ask, line = f"How much money does {p.name} save?", f"{p.name} saves {calc}."
            else:  # items -> dollars
                s = f"{who} sells each {st.noun[0]} for ${b}."
                new.money, new.ask = True, f"How much money does {p.name} make?"
                line = f"{p.name} makes {_calc(x, op, b, r, True)}."
        elif last and form < 0.7:  # sharing equally: the answer is one share
            g = rng.choice(GROUPS)
            what = "the money" if m else "them"
            s = f"{who} shares {what} equally among {b} {g[1]}."
            new.ask = f"How {'much money' if m else 'many ' + unit} does each {g[0]} get?"
            line = f"Each {g[0]} gets {calc}." if m else f"Each {g[0]} gets {calc} {unit}."
        elif m:  # one division, so the sentence says what is kept (the rest is gone)
            s = f"{who} keeps {FRACTIONS.get(b, f'1/{b}')} of the money and spends the rest on {rng.choice(SPEND_ON)}."
            new.ask, line = f"How much money does {p.name} have left?", f"{p.name} has {calc} left."
        else:  # items packed into containers: the count of containers goes on
            c = rng.choice(CONTAINERS)
            s = f"{who} puts them into {c[1]} of {b}."
            new.noun, new.food = c, False
            new.ask, line = f"How many {c[1]} does {p.name} fill?", f"{p.name} fills {calc} {c[1]}."
        return new, s, line, b


def _one_problem(rng: random.Random, d: Difficulty) -> _Problem:
    story = _Story(rng, d)
    n_ops = rng.randint(d.min_ops, d.max_ops)
    while True:
        st, first, lines, chain, ops = story.start()
        sentences = [first]
        while len(ops) < n_ops:
            candidates = ["+", "-", "*", "/"]
            rng.shuffle(candidates)
            for op in candidates:
                got = story.step(st, op, last=len(ops) == n_ops - 1)
                if got is not None:
                    break
            else:
                break  # stuck (e.g. at 3 with max_value 4): start a new story
            st, s, line, b = got
            sentences.append(s)
            lines.append(line)
            chain += f"{op}{b}"
            ops.append(op)
        if len(ops) == n_ops:
            break
        story = _Story(rng, d)
    sentences.append(st.ask)
    return _Problem(sentences, lines + [f"#### {st.value}"], chain, st.value)


def split_of(chain: str) -> str:
    """"test" for one arithmetic chain in TEST_BUCKETS (by hash, independent of any seed), else "train"."""
    h = int.from_bytes(hashlib.sha256(chain.encode()).digest()[:8], "big")
    return "test" if h % TEST_BUCKETS == 0 else "train"


def generate_problems(n: int, seed: int = DEFAULT_SEED, split: str = "train",
                      difficulty: Difficulty | None = None) -> list[TaskItem]:
    """`n` distinct problems of `split` ("train" | "test" | "hard"), the same for the same arguments.
    `difficulty` defaults to `Difficulty()` for train/test and `HARD` for hard.

    TaskItem(id="synthetic-{split}-{i}", question, gold=str(answer), source="synthetic", solution)."""
    if split not in SPLITS:
        raise EngineError(f"task 'synthetic' has no split {split!r}; expected one of {', '.join(SPLITS)}",
                          field="split")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise EngineError(f"expected a non-negative integer, got {n!r}", field="n")
    d = difficulty or (HARD if split == "hard" else Difficulty())
    bucket = "train" if split == "train" else "test"  # hard chains come from the held-out fifth too
    rng = random.Random(f"synthetic:{seed}:{split}")  # str seeds hash with sha512: stable across runs
    items: list[TaskItem] = []
    seen: set[str] = set()
    attempts = 0
    while len(items) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise EngineError(f"only {len(items)} distinct {split} problems found for {d}; "
                              "raise the number ranges or ask for fewer", field="n")
        p = _one_problem(rng, d)
        question = " ".join(p.sentences)
        if split_of(p.chain) != bucket or question in seen:
            continue
        seen.add(question)
        items.append(TaskItem(f"{TASK_NAME}-{split}-{len(items)}", question, str(p.answer), TASK_NAME,
                              "\n".join(p.lines)))
    return items


def _load(split: str, data_dir: Path) -> list[TaskItem]:
    del data_dir  # generated, not read
    if split not in DEFAULT_SIZES:
        raise EngineError(f"task 'synthetic' has no split {split!r}; expected one of {', '.join(SPLITS)}",
                          field="split")
    return generate_problems(DEFAULT_SIZES[split], DEFAULT_SEED, split)


register_task(TASK_NAME, _load, style="plain")  # the embedded model learned the bare question
