"""Hidden tests of exercise 07, run by the grader (keep this file private for a graded class).

Inputs are drawn from the submission's seed. Exact Match and F1 are graded on answers already in
normal form (lower case, no punctuation or article, single spaces), so that a wrong ``normalize``
costs question 1 alone.
"""

import random

from ragbook.evaluate import f1_score
from ragbook.grading import Case
from ragbook.pipeline import exact_match, normalize_answer

FORBID = ["ragbook.pipeline.normalize_answer", "ragbook.pipeline.exact_match",
          "ragbook.evaluate.f1_score"]
RAW = ["The", "a", "An", "the", "Eiffel", "TOWER", "Paris,", "rock", "'n'", "Roll!", "U.S.A.",
       "Theatre", "athena", "an-them", "New", "York", "city.", "of", "1889", "(absurd)", "A.I.",
       "Mount", "Everest's", "anthem", "then", "thea"]
NORMAL = ["eiffel", "tower", "paris", "new", "york", "city", "of", "1889", "rock", "roll",
          "mount", "everest", "theatre", "athena", "absurd"]


def q1(seed: int) -> list[Case]:
    rng = random.Random(seed)
    spaces = [" ", "  ", " \t", "\n "]
    texts = ["".join(rng.choice(spaces) + rng.choice(RAW) for _ in range(rng.randint(1, 6)))
             for _ in range(10)]
    return [Case("normalize", (text,), normalize_answer) for text in texts]


def _answer(rng: random.Random) -> str:
    return " ".join(rng.choice(NORMAL) for _ in range(rng.randint(1, 4)))


def _pairs(rng: random.Random, n: int) -> list[tuple[str, list[str]]]:
    pairs = []
    for _ in range(n):
        answers = [_answer(rng) for _ in range(rng.randint(1, 3))]
        prediction = rng.choice([rng.choice(answers), _answer(rng), " ".join(
            rng.sample(answers[0].split(), len(answers[0].split())))])
        pairs.append((prediction, answers))
    return pairs


def q2(seed: int) -> list[Case]:
    return [Case("exact_match", pair, exact_match) for pair in _pairs(random.Random(seed + 2), 10)]


def q3(seed: int) -> list[Case]:
    return [Case("f1", pair, f1_score) for pair in _pairs(random.Random(seed + 3), 10)]


def _rescued(prediction: str, answers: list[str]) -> bool:
    return prediction not in answers and exact_match(prediction, answers) == 1.0


def q4(seed: int) -> list[Case]:
    rng = random.Random(seed + 4)
    cases = []
    for _ in range(8):
        answer = _answer(rng)
        prediction = rng.choice([answer, answer.title(), f"the {answer}.", f"an {answer}!",
                                 _answer(rng), f"{answer} {rng.choice(NORMAL)}"])
        cases.append(Case("rescued_by_normalization", (prediction, [answer, _answer(rng)]),
                          _rescued))
    return cases
