"""Hidden tests of exercise 05, run by the grader (keep this file private for a graded class).

Log-probabilities, masks and doc scores are drawn from the submission's seed.
"""

import torch

from ragbook.grading import Case
from ragbook.rag import doc_posterior, rag_sequence_loss, rag_token_loss

FORBID = ["ragbook.rag.rag_token_loss", "ragbook.rag.doc_posterior",
          "ragbook.rag.rag_sequence_loss"]


def _inputs(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, k, length = (int(torch.randint(lo, hi, (1,), generator=g))
                        for lo, hi in ((1, 5), (1, 7), (1, 12)))
    logprobs = torch.randn(batch, k, length, generator=g).log_softmax(-1) * 3
    lengths = torch.randint(1, length + 1, (batch, 1), generator=g)
    return logprobs, torch.arange(length) < lengths, torch.randn(batch, k, generator=g) * 4


def _token(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return -rag_token_loss(logprobs, mask, scores)


def q1(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    return [Case("rag_token_logprob", _inputs(g), _token, grad=(0, 2)) for _ in range(5)]


def _posterior(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return doc_posterior(logprobs, mask, scores, per_token=True)


def q2(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 2)
    return [Case("token_posterior", _inputs(g), _posterior) for _ in range(5)]


def _gap(logprobs: torch.Tensor, scores: torch.Tensor) -> float:
    mask = torch.ones(1, logprobs.shape[1], dtype=torch.bool)
    args = logprobs[None], mask, scores[None]
    return (rag_sequence_loss(*args) - rag_token_loss(*args)).item()


def q3(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 3)
    return [Case("token_minus_sequence", ((torch.rand(2, 2, generator=g) * 0.98 + 0.01).log(),
                                          torch.randn(2, generator=g)), _gap)
            for _ in range(5)]
