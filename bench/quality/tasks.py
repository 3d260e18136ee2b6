"""The agent roles of the quality benchmark and their seeded data: shipment ledgers every agent reads, one question
per role about each ledger, exact answers.

A ledger is a header line and one record a line, ``R0427 | Lyon | late | 347`` (about 15 SmolLM2 tokens a record, so
65 records are about 1K tokens and 400 about 6K). Three roles ask about the same ledger, the way agents of one
workflow read one shared context:

- ``extract``: the amount of one record (a copy from far back in the context);
- ``count``: how many records are lost (0 to 5 are planted, so the answer is uniform and guessing scores 1/6);
- ``check``: whether the claim "record X is lost" is right (true or false, half each where any record is lost).

Same seed, same ledger and questions, on any machine (``random.Random`` only).
"""

from __future__ import annotations

import dataclasses
import random

ROLES = ("extract", "count", "check")
CITIES = ("Lyon", "Oslo", "Lima", "Cairo", "Delhi", "Perth", "Quito", "Riga", "Seoul", "Tunis")
STATUSES = ("ok", "late")  # "lost" is planted separately, so its count is under our control
TOKENS_PER_RECORD = 15
HEADER_TOKENS = 20
MAX_LOST = 5


@dataclasses.dataclass(frozen=True)
class Record:
    rid: str
    city: str
    status: str
    amount: int

    def line(self) -> str:
        return f"{self.rid} | {self.city} | {self.status} | {self.amount}"


@dataclasses.dataclass(frozen=True)
class Case:
    """One role's question about one ledger: the prompt is ``document + question``; ``answer`` is the exact reply."""

    role: str
    document: str
    question: str
    answer: str

    @property
    def prompt(self) -> str:
        return self.document + self.question


def records_for_tokens(tokens: int) -> int:
    return max(8, (tokens - HEADER_TOKENS) // TOKENS_PER_RECORD)


def make_ledger(rng: random.Random, num_records: int) -> list[Record]:
    ids = rng.sample(range(1000, 10000), num_records)
    lost = set(rng.sample(range(num_records), rng.randint(0, min(MAX_LOST, num_records))))
    return [
        Record(f"R{rid}", rng.choice(CITIES), "lost" if i in lost else rng.choice(STATUSES), rng.randint(10, 999))
        for i, rid in enumerate(ids)
    ]


def render(records: list[Record], index: int) -> str:
    header = f"Shipment ledger {index}. Columns: id | city | status | amount.\n"
    return header + "\n".join(r.line() for r in records) + "\n"


def question(role: str, records: list[Record], rng: random.Random) -> tuple[str, str]:
    """(question text, exact answer) for ``role`` about ``records``."""
    if role == "extract":
        r = rng.choice(records)
        return f"Q: What is the amount of record {r.rid}?\nA:", f" {r.amount}"
    if role == "count":
        return "Q: How many records are lost?\nA:", f" {sum(r.status == 'lost' for r in records)}"
    if role == "check":
        # A claim to verify: "record X is lost". (Claims naming a city, which need the looked-up value compared with
        # one in the question, stayed at chance after 250 steps of training this small model.)
        lost = [r for r in records if r.status == "lost"]
        truthful = bool(lost) and rng.random() < 0.5
        r = rng.choice(lost if truthful else [r for r in records if r.status != "lost"])
        return f"Q: Claim: record {r.rid} is lost. True or false?\nA:", " true" if truthful else " false"
    raise ValueError(f"unknown role {role!r}; roles are {ROLES}")


def ledger_cases(seed: int, index: int, tokens: int) -> list[Case]:
    """One ledger of about ``tokens`` tokens and one case per role about it (in ROLES order)."""
    rng = random.Random(f"{seed}/{index}/{tokens}")
    records = make_ledger(rng, records_for_tokens(tokens))
    document = render(records, index)
    return [Case(role, document, *question(role, records, rng)) for role in ROLES]


def split(name: str, count: int, tokens: int | tuple[int, int]) -> list[list[Case]]:
    """``count`` ledgers of the named split ("train", "test"; disjoint seeds), each with its three cases. ``tokens``
    is a length or a (low, high) range drawn per ledger."""
    seed = {"train": 1, "test": 2}[name]
    rng = random.Random(f"lengths/{seed}")
    out = []
    for index in range(count):
        length = tokens if isinstance(tokens, int) else rng.randint(*tokens)
        out.append(ledger_cases(seed, index, length))
    return out


def score(case: Case, reply: str) -> bool:
    """Whether a generated reply answers ``case`` (its first word, stripped of punctuation, case-insensitive)."""
    words = reply.strip().split()
    return bool(words) and words[0].strip(".,;:!").lower() == case.answer.strip().lower()
