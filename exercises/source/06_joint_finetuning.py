"""Hidden tests of exercise 06, run by the grader (keep this file private for a graded class).

Query vectors, document vectors, log-probabilities and masks are drawn from the submission's
seed. The loss is checked with its gradient on the query vectors; the gradient on the doc
scores against autograd's.
"""

import torch

from ragbook.grading import Case, draw_rag_inputs
from ragbook.rag import rag_sequence_loss, rag_token_loss
from ragbook.retriever import doc_scores

FORBID = ["ragbook.rag.doc_posterior", "ragbook.rag.rag_sequence_loss"]


def _joint(q: torch.Tensor, d: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:
    return rag_token_loss(logprobs, mask, doc_scores(q, d, scale)).mean()


def q1(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    cases = []
    for _ in range(4):
        n, k, dim = (int(torch.randint(2, 9, (1,), generator=g)) for _ in range(3))
        q = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=-1)
        d = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=-1)
        scale = [1.0, 20.0][int(torch.randint(2, (1,), generator=g))]
        logprobs, mask, _ = draw_rag_inputs(g, n, k)
        cases.append(Case("joint_loss", (q, d, logprobs, mask, scale), _joint, grad=(0,)))
    return cases


def _gradient(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    scores = scores.detach().clone().requires_grad_(True)
    rag_sequence_loss(logprobs, mask, scores).sum().backward()
    return scores.grad


def q2(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 2)
    cases = []
    for _ in range(5):
        n = int(torch.randint(1, 5, (1,), generator=g))
        k = int(torch.randint(2, 7, (1,), generator=g))
        logprobs, mask, scores = draw_rag_inputs(g, n, k)
        cases.append(Case("doc_score_gradient", (logprobs, mask, scores), _gradient))
    return cases
