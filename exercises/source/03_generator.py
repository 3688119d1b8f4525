"""Hidden tests of exercise 03, run by the grader (keep this file private for a graded class).

Passages, questions and answers are drawn from the built-in corpus with the submission's seed;
the reference scores come from the shipped tiny BART, on the grader's CPU.
"""

import random
from functools import cache

import torch

from ragbook.data import Passage, load_corpus
from ragbook.generator import (
    encode_inputs,
    encode_targets,
    format_input,
    load_generator,
    token_logprobs,
)
from ragbook.grading import Case

FORBID = ["ragbook.generator.format_input", "ragbook.generator.token_logprobs"]


@cache
def _generator():
    model, tokenizer = load_generator("tiny", device="cpu")
    return model.eval(), tokenizer


@cache
def _passages() -> list[Passage]:
    return load_corpus()


def _logprob(question: str, answer: str) -> float:
    model, tokenizer = _generator()
    inputs = encode_inputs(tokenizer, [None], [question], 48)
    labels = encode_targets(tokenizer, [answer], 24)["labels"]
    with torch.no_grad():
        return token_logprobs(model, inputs["input_ids"], inputs["attention_mask"],
                              labels).sum().item()


def _best(question: str, candidates: list[str]) -> str:
    return max(candidates, key=lambda y: _logprob(question, y))


def _question(p: Passage, rng: random.Random) -> str:
    words = p.text.split()
    start = rng.randrange(max(1, len(words) - 6))
    return " ".join(words[start:start + rng.randint(3, 6)])


def q1(seed: int) -> list[Case]:
    rng = random.Random(seed)
    passages = rng.sample(_passages(), 6)
    return [Case("generator_input", (p if i % 3 else None, _question(p, rng)), format_input)
            for i, p in enumerate(passages)]


def q2(seed: int) -> list[Case]:
    rng = random.Random(seed + 2)
    return [Case("closed_book_logprob", (_question(p, rng), p.title), _logprob, tol=1e-3)
            for p in rng.sample(_passages(), 4)]


def q3(seed: int) -> list[Case]:
    rng = random.Random(seed + 3)
    cases = []
    for _ in range(3):
        passages = rng.sample(_passages(), 4)
        candidates = [p.title for p in passages]
        question = _question(passages[0], rng)
        if len({round(_logprob(question, y), 3) for y in candidates}) == len(candidates):
            cases.append(Case("best_answer", (question, candidates), _best))
    return cases or [Case("best_answer", ("capital of France", ["Paris", "Rome"]), _best)]


def _sum_and_mean(token_logprobs: dict[str, list[float]]) -> tuple[str, str]:
    def mean(y: str) -> float:
        return sum(token_logprobs[y]) / len(token_logprobs[y])

    return max(token_logprobs, key=lambda y: sum(token_logprobs[y])), max(token_logprobs, key=mean)


def q4(seed: int) -> list[Case]:
    rng = random.Random(seed + 4)
    cases = []
    for _ in range(6):
        titles = [p.title for p in rng.sample(_passages(), rng.randint(2, 6))]
        scores = {t: [-rng.expovariate(rng.uniform(0.5, 3.0)) for _ in range(rng.randint(1, 8))]
                  for t in titles}
        cases.append(Case("best_by_sum_and_mean", (scores,), _sum_and_mean))
    return cases
