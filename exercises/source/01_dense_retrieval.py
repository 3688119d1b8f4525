"""Hidden tests of exercise 01, run by the grader (keep this file private for a graded class).

Inputs are drawn from the submission's seed; each loss is checked with its gradient.
"""

import random

import torch

from ragbook.data import Example, Passage
from ragbook.evaluate import recall_at_k
from ragbook.grading import Case
from ragbook.retriever import dpr_loss

FORBID = ["ragbook.retriever.dpr_loss", "ragbook.evaluate.recall_at_k",
          "ragbook.retriever.doc_scores"]


def _vectors(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    n, dim = (int(x) for x in torch.randint(2, 9, (2,), generator=g))
    scale = [1.0, 5.0, 20.0][int(torch.randint(3, (1,), generator=g))]
    return torch.randn(n, dim, generator=g), torch.randn(n, dim, generator=g), scale


def q1(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    return [Case("in_batch_negative_loss", _vectors(g), dpr_loss, grad=(0, 1)) for _ in range(4)]


def _recall(retrieved: list[list[str]], gold: list[str], ks: tuple) -> dict[int, float]:
    passages = [[Passage(id=t, title=t, text="") for t in r] for r in retrieved]
    examples = [Example(question="?", answers=[g], article=g) for g in gold]
    return recall_at_k(passages, examples, ks=ks)


def q2(seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases = []
    for _ in range(4):
        titles = [f"article {i}" for i in range(rng.randint(5, 15))]
        depth = rng.randint(2, len(titles))
        retrieved = [rng.sample(titles, depth) for _ in range(rng.randint(3, 30))]
        gold = [rng.choice(titles) for _ in retrieved]
        ks = tuple(sorted(rng.sample(range(1, depth + 1), min(3, depth))))
        cases.append(Case("recall_at_k", (retrieved, gold, ks), _recall))
    return cases


def _hard(q: torch.Tensor, d: torch.Tensor, hard: torch.Tensor, scale: float) -> torch.Tensor:
    return dpr_loss(q, d, scale, hard_negatives=hard)


def q3(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 3)
    cases = []
    for _ in range(4):
        q, d, scale = _vectors(g)
        hard = d + 0.3 * torch.randn(d.shape, generator=g)  # close to the positives: hard
        cases.append(Case("hard_negative_loss", (q, d, hard, scale), _hard, grad=(0,)))
    return cases
