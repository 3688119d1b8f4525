"""Hidden tests of exercise 05, run by the grader (keep this file private for a graded class).

Log-probabilities, masks and doc scores are drawn from the submission's seed.
"""

import torch

from ragbook.grading import Case, draw_rag_inputs
from ragbook.rag import doc_posterior, rag_sequence_loss, rag_token_loss

FORBID = ["ragbook.rag.rag_token_loss", "ragbook.rag.doc_posterior",
          "ragbook.rag.rag_sequence_loss"]


def _token(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return -rag_token_loss(logprobs, mask, scores)


def q1(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    return [Case("rag_token_logprob", draw_rag_inputs(g), _token, grad=(0, 2)) for _ in range(5)]


def _posterior(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return doc_posterior(logprobs, mask, scores, per_token=True)


def q2(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 2)
    return [Case("token_posterior", draw_rag_inputs(g), _posterior) for _ in range(5)]


def _gap(logprobs: torch.Tensor, scores: torch.Tensor) -> float:
    mask = torch.ones(1, logprobs.shape[1], dtype=torch.bool)
    args = logprobs[None], mask, scores[None]
    return (rag_sequence_loss(*args) - rag_token_loss(*args)).item()


def q3(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 3)
    return [Case("token_minus_sequence", ((torch.rand(2, 2, generator=g) * 0.98 + 0.01).log(),
                                          torch.randn(2, generator=g)), _gap)
            for _ in range(5)]
