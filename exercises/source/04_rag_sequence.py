"""Hidden tests of exercise 04, run by the grader (keep this file private for a graded class).

Log-probabilities, masks, doc scores and beams are drawn from the submission's seed.
"""

import torch

from ragbook.grading import Case, draw_rag_inputs
from ragbook.rag import rag_sequence_loss

FORBID = ["ragbook.rag.rag_sequence_loss", "ragbook.rag.sequence_logprobs",
          "ragbook.rag.doc_posterior"]


def _sequence(logprobs: torch.Tensor, mask: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    return -rag_sequence_loss(logprobs, mask, scores)


def q1(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed)
    long = (torch.full((2, 3, 300), -6.0), torch.ones(2, 300, dtype=torch.bool),
            torch.randn(2, 3, generator=g))  # a product of probabilities underflows
    return [Case("rag_sequence_logprob", draw_rag_inputs(g), _sequence, grad=(0, 2))
            for _ in range(4)] + [Case("rag_sequence_logprob", long, _sequence)]


def _fast(beams: list[dict[str, float]], doc_scores: torch.Tensor) -> tuple[str, dict]:
    log_prior = doc_scores.log_softmax(-1).tolist()
    terms: dict[str, list[float]] = {}
    for prior, beam in zip(log_prior, beams):
        for y, logprob in beam.items():
            terms.setdefault(y, []).append(prior + logprob)
    scores = {y: torch.logsumexp(torch.tensor(t, dtype=torch.float64), 0).item()
              for y, t in terms.items()}
    return max(scores, key=scores.get), scores


WORDS = ["a b", "c", "d e f", "g", "h i", "j", "k l", "m"]


def _table(g: torch.Generator) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    k, n = int(torch.randint(2, 6, (1,), generator=g)), int(torch.randint(3, 9, (1,), generator=g))
    table = (torch.randn(k, n, generator=g) * 2).log_softmax(-1)
    return table, WORDS[:n], torch.randn(k, generator=g) * 2


def q2(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 2)
    cases = []
    for _ in range(4):
        table, words, scores = _table(g)
        beams = [{w: table[z, j].item() for j, w in enumerate(words)
                  if torch.rand(1, generator=g).item() < 0.6} or {words[0]: table[z, 0].item()}
                 for z in range(len(table))]
        cases.append(Case("fast_decode", (beams, scores), _fast))
    return cases


def _thorough_and_fast(table: torch.Tensor, words: list[str], scores: torch.Tensor,
                       beam: int) -> tuple[str, str]:
    beams = [{words[h]: table[z, h].item() for h in table[z].topk(beam).indices.tolist()}
             for z in range(len(table))]
    found = {words.index(y) for b in beams for y in b}
    prior = scores.log_softmax(-1)
    thorough = {words[h]: torch.logsumexp(prior + table[:, h], 0).item() for h in found}
    return max(thorough, key=thorough.get), _fast(beams, scores)[0]


def q3(seed: int) -> list[Case]:
    g = torch.Generator().manual_seed(seed + 3)
    cases = []
    while len(cases) < 5:
        table, words, scores = _table(g)
        beam = int(torch.randint(1, len(words), (1,), generator=g))
        thorough, fast = _thorough_and_fast(table, words, scores, beam)
        if (thorough != fast) == (len(cases) % 2 == 0):  # disagreements and agreements alike
            cases.append(Case("thorough_and_fast", (table, words, scores, beam),
                              _thorough_and_fast))
    return cases
