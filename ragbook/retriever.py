"""The retriever p_η(z|x): the paper's non-parametric memory is searched by a DPR bi-encoder.

Lewis et al. (2020, §2.2) use Dense Passage Retrieval (Karpukhin et al. 2020):

    p_η(z|x) ∝ exp(d(z)ᵀ q(x)),    d(z) = BERT_d(z),    q(x) = BERT_q(x)

Two BERT encoders map a passage z and a question x to vectors; the score of a passage is their
inner product, so the top-k passages are a maximum inner product search (``index.py``). The
document encoder d is frozen once the index is built; only the query encoder q is fine-tuned.

This chapter holds:

- :class:`Encoder`: BERT_q or BERT_d over any BERT-family checkpoint (MiniLM in the tiny preset,
  the DPR-NQ encoders in the paper preset), with [CLS] or mean pooling;
- :func:`doc_scores`: the retrieval logits ``score_scale · d(z)ᵀq(x)``, the one place they are
  computed;
- :func:`passage_embeddings`: d(z) for the whole corpus, encoded once and cached;
- :func:`dpr_loss` and :func:`train_query_encoder`: DPR's in-batch-negative training;
- :class:`BM25Retriever`, :class:`DenseRetriever` and :class:`FusionRetriever` (the two
  rankings merged by reciprocal rank fusion): three retrievers with one result type,
  :class:`ragbook.data.SearchResult`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from .artifacts import cached
from .config import Preset, autocast, bf16_supported, default_device, quiet_loading, resolve_model
from .data import Example, Passage, SearchResult, corpus_fingerprint, load_corpus, load_task

LINEAGE_FILE = "ragbook_encoder.json"
POOLINGS = ("mean", "cls")
# How a passage is shown to BERT_d; part of the cache key of every passage embedding.
PASSAGE_FORMAT = "title [SEP] text"


# --------------------------------------------------------------------------- the encoders


class Encoder(torch.nn.Module):
    """A BERT encoder x ↦ q(x) (or z ↦ d(z)): one vector per text.

    ``pooling="cls"`` takes the final hidden state of the [CLS] token, as DPR does;
    ``pooling="mean"`` averages the hidden states of the real (unpadded) tokens, as
    sentence-transformers' MiniLM was trained to. ``normalize=True`` L2-normalises the vectors,
    so that d(z)ᵀq(x) is a cosine similarity in [-1, 1].

    DPR checkpoints (``model_type == "dpr"``) load as ``DPRQuestionEncoder`` or
    ``DPRContextEncoder``; their [CLS] vector is the model's ``pooler_output`` (which includes
    DPR's optional projection). Anything else loads with ``AutoModel``. The encoder starts on
    :func:`~ragbook.config.default_device`.
    """

    def __init__(self, name: str, pooling: str = "mean", normalize: bool = False,
                 max_length: int = 128):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")
        self.name, self.pooling, self.normalize, self.max_length = (
            name, pooling, normalize, max_length)
        path = resolve_model(name)
        lineage = Path(path) / LINEAGE_FILE  # written by save_pretrained after fine-tuning
        self.trained_from: list[str] = (json.loads(lineage.read_text())["trained_from"]
                                        if lineage.is_file() else [])
        with quiet_loading():
            config = AutoConfig.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.is_dpr = config.model_type == "dpr"
            if self.is_dpr:
                from transformers import DPRContextEncoder, DPRQuestionEncoder

                is_ctx = any("Context" in a for a in (config.architectures or []))
                dpr = DPRContextEncoder if is_ctx else DPRQuestionEncoder
                self.model = dpr.from_pretrained(path)
                self.dim = config.projection_dim or config.hidden_size
            else:
                self.model = AutoModel.from_pretrained(path)
                self.dim = config.hidden_size
        self.to(default_device()).eval()  # dropout off until a training loop says otherwise

    @property
    def backbone(self) -> torch.nn.Module:
        """The network that returns the token states; for DPR, the ``DPREncoder`` inside, whose
        ``pooler_output`` is the [CLS] vector."""
        if not self.is_dpr:
            return self.model
        return getattr(self.model, "ctx_encoder", None) or self.model.question_encoder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str], max_length: int | None = None) -> dict[str, Tensor]:
        """A padded batch of token ids on the encoder's device, cut to ``max_length``."""
        batch = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt",
                               max_length=max_length or self.max_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, texts: Sequence[str]) -> Tensor:
        """q(x) for each text, shape (n, dim), differentiable (joint RAG training needs it)."""
        return self.embed(self.tokenize(texts))

    def embed(self, batch: dict[str, Tensor]) -> Tensor:
        """Pool the final hidden states of a tokenized batch into one vector per sequence."""
        out = self.backbone(**batch, return_dict=True)
        if self.pooling == "cls":
            v = out.pooler_output if self.is_dpr else out.last_hidden_state[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(out.last_hidden_state.dtype)
            v = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(v, dim=-1) if self.normalize else v

    def encode(self, texts: Sequence[str], batch_size: int = 64,
               progress: bool = True) -> np.ndarray:
        """Vectors for many texts, (n, dim) float32, without gradients.

        Texts are encoded longest first, in batches of similar length, so that little compute
        is spent on padding; the rows come back in the order of ``texts``.
        """
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        lengths = [len(ids) for ids in self.tokenizer(
            texts, truncation=True, max_length=self.max_length)["input_ids"]]
        order = np.argsort(lengths, kind="stable")[::-1]
        was_training = self.training
        self.eval()
        with torch.inference_mode():
            for start in tqdm(range(0, len(texts), batch_size), desc=f"encode {len(texts)}",
                              unit="batch", disable=not progress):
                rows = order[start:start + batch_size]
                v = self.embed(self.tokenize([texts[i] for i in rows]))
                out[rows] = v.float().cpu().numpy()
        self.train(was_training)
        return out

    def passage_texts(self, passages: Sequence[Passage]) -> list[str]:
        """How BERT_d reads a passage: ``title [SEP] text``.

        This is DPR's convention: its context encoder was trained on "[CLS] title [SEP] text
        [SEP]" with every segment id 0. The title matters: a 100-word chunk from the middle of
        an article may never name its subject, and the title is often the answer itself.
        """
        sep = self.tokenizer.sep_token or "|"
        return [f"{p.title} {sep} {p.text}" if p.title else p.text for p in passages]

    def encode_passages(self, passages: Sequence[Passage], batch_size: int = 64,
                        progress: bool = True) -> np.ndarray:
        """d(z) for each passage, (N, dim) float32.

        Where the device runs bf16 natively, BERT_d's products run in bf16
        (``config.autocast``; speed and agreement with fp32 in benchmarks/README.md, "bf16 on
        the CPU"). Questions (:meth:`encode`, :meth:`forward`) stay in fp32, so that a
        question's vector never depends on the batch it is encoded in.
        """
        with autocast(self.device):
            return self.encode(self.passage_texts(passages), batch_size=batch_size,
                               progress=progress)

    def save_pretrained(self, path: str | Path) -> None:
        """Save weights and tokenizer so that ``Encoder(str(path), ...)`` loads them back,
        with the names of the checkpoints it was fine-tuned from: a fine-tuned BERT_q still
        lives in the vector space of the index its starting point was built for."""
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (Path(path) / LINEAGE_FILE).write_text(
            json.dumps({"trained_from": [self.name, *self.trained_from]}, indent=2))


def load_encoders(preset: Preset) -> tuple[Encoder, Encoder]:
    """(BERT_q, BERT_d) of a preset, as two independent modules even when they share weights
    at the start: the query encoder is fine-tuned, the document encoder stays frozen."""
    query_encoder = Encoder(preset.query_encoder, preset.pooling, preset.normalize,
                            preset.max_query_length)
    doc_encoder = Encoder(preset.doc_encoder, preset.pooling, preset.normalize,
                          preset.max_passage_length)
    return query_encoder, doc_encoder


# --------------------------------------------------------------------------- scores


def doc_scores(q: Tensor, d: Tensor, scale: float = 1.0) -> Tensor:
    """The retrieval logits ``scale · d(z)ᵀq(x)``, so that p_η(z|x) = softmax(doc_scores).

    ``q`` is (n, dim). ``d`` is (m, dim), scoring every question against the same m passages
    (shape (n, m)), or (n, k, dim), scoring each question against its own k retrieved passages
    (shape (n, k), as RAG does). ``scale`` is the preset's ``score_scale``: 1 for DPR, whose raw
    inner products are already spread out; 20 for normalised MiniLM, i.e. a softmax temperature
    of 0.05 on cosine similarities in [-1, 1].
    """
    if d.dim() == 3:
        return scale * torch.einsum("nd,nkd->nk", q, d)
    return scale * q @ d.T


# --------------------------------------------------------------------------- the corpus, encoded


def passage_embeddings(preset: Preset, passages: Sequence[Passage] | None = None,
                       progress: bool = True, batch_size: int = 64,
                       mmap: bool = False) -> np.ndarray:
    """d(z) for every passage (default: the built-in corpus, in ``load_corpus()`` order).

    Returns (N, dim) float32. Encoding the corpus takes minutes on a CPU (benchmarks/README.md),
    so the matrix is built once per (document encoder, pooling, normalisation, max length,
    corpus) and cached under ``$RAGBOOK_CACHE/passage_embeddings`` (on ``default_device()``;
    in bf16 where the device runs it natively, :meth:`Encoder.encode_passages`). ``mmap``
    maps the file copy-on-write instead of reading it: processes on one machine share it.
    """
    passages = load_corpus() if passages is None else list(passages)
    device = default_device()
    params = {"encoder": preset.doc_encoder, "pooling": preset.pooling,
              "normalize": preset.normalize, "max_length": preset.max_passage_length,
              "format": PASSAGE_FORMAT, "corpus": corpus_fingerprint(passages),
              "n": len(passages), "bf16": bf16_supported(device)}

    def build(tmp: Path) -> None:
        encoder = Encoder(preset.doc_encoder, preset.pooling, preset.normalize,
                          preset.max_passage_length)  # on `device` (Colab: BERT-base wants a GPU)
        np.save(tmp / "embeddings.npy",
                encoder.encode_passages(passages, batch_size=batch_size, progress=progress))

    return np.load(cached("passage_embeddings", params, build) / "embeddings.npy",
                   mmap_mode="c" if mmap else None)


# --------------------------------------------------------------------------- DPR training


def dpr_loss(q: Tensor, d: Tensor, scale: float = 1.0,
             hard_negatives: Tensor | None = None) -> Tensor:
    """DPR's in-batch-negative loss (Karpukhin et al. 2020, Eq. 2).

    Row i of ``q`` is a question whose positive passage is row i of ``d``; the other questions'
    positives serve as its negatives, and so do the rows of ``hard_negatives`` (m, dim), which
    are appended as extra columns shared by the whole batch. With S = doc_scores(q, [d; h]):

        L = -1/n Σ_i log softmax(S_i)_i
    """
    candidates = d if hard_negatives is None else torch.cat([d, hard_negatives])
    scores = doc_scores(q, candidates, scale)
    return F.cross_entropy(scores, torch.arange(len(q), device=q.device))


def _positive_passages(examples: Sequence[Example],
                       passages: Sequence[Passage]) -> list[tuple[str, int]]:
    """(question, position of its positive passage): the first passage of the gold article."""
    first: dict[str, int] = {}
    for i, p in enumerate(passages):
        first.setdefault(p.title, i)
    return [(e.question, first[e.article]) for e in examples if e.article in first]


def _bm25_hard_negatives(pairs: list[tuple[str, int]], passages: Sequence[Passage],
                         depth: int = 10) -> list[int]:
    """For each question, BM25's best passage that is not from the gold article."""
    results = BM25Retriever(passages).search([q for q, _ in pairs], k=depth)
    negatives = []
    for (_, pos), idx in zip(pairs, results.indices):
        gold = passages[pos].title
        negatives.append(next((int(j) for j in idx if passages[j].title != gold),
                              (pos + 1) % len(passages)))
    return negatives


def _dense_hard_negatives(q: Tensor, positives: list[int], vectors: Tensor,
                          article_of: Tensor) -> list[int]:
    """For each question, the best-scoring passage outside its gold article."""
    with torch.no_grad():
        scores = q.detach() @ vectors.T
        gold = article_of[positives]
        scores[article_of[None, :] == gold[:, None]] = -torch.inf
        return scores.argmax(1).tolist()


def train_query_encoder(query_encoder: Encoder, examples: Sequence[Example],
                        passages: Sequence[Passage], *, steps: int = 300, batch_size: int = 32,
                        lr: float = 3e-5, scale: float = 1.0,
                        passage_vectors: np.ndarray | None = None,
                        doc_encoder: Encoder | None = None,
                        hard_negatives: bool | str = False, seed: int = 0,
                        progress: bool = True) -> list[float]:
    """Fine-tune BERT_q with :func:`dpr_loss`; return the loss of every step.

    Each example's positive is the first passage of its gold article (``Example.article``).
    By default BERT_d is frozen, as in RAG: the positives' vectors are rows of
    ``passage_vectors`` (aligned with ``passages``, e.g. :func:`passage_embeddings`). Given a
    ``doc_encoder``, both encoders are trained, as in DPR itself.

    ``hard_negatives`` adds one more negative per question, shared by the batch as an extra
    column of :func:`dpr_loss`: ``"bm25"`` (or ``True``) is BM25's best passage outside the
    gold article, as in DPR; ``"dense"`` is the best such passage for the *current* q(x) among
    ``passage_vectors`` — with BERT_d frozen, the index can be searched at every step for the
    cost of one (batch × N) product (ANCE, Xiong et al. 2021, mines the same way).

    Adam with linear warmup (10% of the steps) and decay; batches follow a seeded shuffle, so
    a run is reproducible on a CPU for a given ``seed``.
    """
    mode = "bm25" if hard_negatives is True else hard_negatives or None
    if mode not in (None, "bm25", "dense"):
        raise ValueError(f"hard_negatives={hard_negatives!r}; choose False, 'bm25' or 'dense'")
    if passage_vectors is None and (doc_encoder is None or mode == "dense"):
        raise ValueError("give passage_vectors (frozen BERT_d) or a doc_encoder to train")
    pairs = _positive_passages(examples, passages)
    if len(pairs) < batch_size:
        raise ValueError(f"{len(pairs)} examples with a gold passage; need ≥ {batch_size}")
    negatives = _bm25_hard_negatives(pairs, passages) if mode == "bm25" else None
    if mode == "dense":  # which article each passage belongs to, to skip the gold one
        article_ids = {t: i for i, t in enumerate(dict.fromkeys(p.title for p in passages))}
        article_of = torch.tensor([article_ids[p.title] for p in passages],
                                  device=query_encoder.device)
        all_vectors = torch.from_numpy(passage_vectors).to(query_encoder.device)

    def vectors(rows: list[int]) -> Tensor:
        if doc_encoder is not None:
            return doc_encoder(doc_encoder.passage_texts([passages[j] for j in rows]))
        return torch.from_numpy(passage_vectors[rows]).to(query_encoder.device)

    rng = random.Random(seed)
    torch.manual_seed(seed)
    modules = [m for m in (query_encoder, doc_encoder) if m is not None]
    params = [p for m in modules for p in m.parameters()]
    optimizer = torch.optim.Adam(params, lr=lr)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup + 1))))
    for m in modules:
        m.train()
    order: list[int] = []
    history = []
    for _ in tqdm(range(steps), desc="train BERT_q", disable=not progress):
        if len(order) < batch_size:  # a new epoch: reshuffle, drop the incomplete batch
            order = list(range(len(pairs)))
            rng.shuffle(order)
        batch, order = order[:batch_size], order[batch_size:]
        q = query_encoder([pairs[i][0] for i in batch])
        d = vectors([pairs[i][1] for i in batch])
        h = None
        if mode == "bm25":
            h = vectors([negatives[i] for i in batch])
        elif mode == "dense":
            h = vectors(_dense_hard_negatives(q, [pairs[i][1] for i in batch], all_vectors,
                                              article_of))
        loss = dpr_loss(q, d, scale, h)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
    for m in modules:
        m.eval()
    return history


def trained_query_encoder(preset: Preset, steps: int = 300, batch_size: int = 32,
                          lr: float = 3e-5, hard_negatives: bool | str = False,
                          task: str = "entity-qa", progress: bool = True) -> Encoder:
    """BERT_q fine-tuned on ``task``'s train split against the frozen, cached corpus vectors.

    A cached recipe: the first call trains, later calls load the saved checkpoint.
    ``loss.json`` in the checkpoint holds the loss curve.
    """
    corpus = load_corpus()
    params = {**{k: v for k, v in preset.to_dict().items() if k not in (
        "generator", "max_source_length", "max_target_length", "n_docs")},
        "steps": steps, "batch_size": batch_size, "lr": lr, "hard_negatives": hard_negatives,
        "task": task, "format": PASSAGE_FORMAT, "corpus": corpus_fingerprint(corpus)}

    def build(tmp: Path) -> None:
        query_encoder = Encoder(preset.query_encoder, preset.pooling, preset.normalize,
                                preset.max_query_length)
        history = train_query_encoder(
            query_encoder, load_task(task, "train", seed=preset.seed), corpus, steps=steps,
            batch_size=batch_size, lr=lr, scale=preset.score_scale,
            passage_vectors=passage_embeddings(preset, corpus, progress=progress),
            hard_negatives=hard_negatives, seed=preset.seed, progress=progress)
        query_encoder.save_pretrained(tmp)
        (tmp / "loss.json").write_text(json.dumps(history))

    path = cached("query_encoder", params, build)
    return Encoder(str(path), preset.pooling, preset.normalize, preset.max_query_length)


# --------------------------------------------------------------------------- retrievers


class DenseRetriever:
    """q(x) from BERT_q, then maximum inner product search in an index of d(z).

    ``index`` is anything with ``.search(query_vectors, k) -> SearchResult``, normally a
    :class:`ragbook.index.DenseIndex`. Scores are the raw inner products d(z)ᵀq(x).
    """

    def __init__(self, query_encoder: Encoder, index):
        self.query_encoder, self.index = query_encoder, index

    def search(self, questions: Sequence[str], k: int = 5) -> SearchResult:
        q = self.query_encoder.encode(questions, progress=False)
        return self.index.search(q, k)


def bm25_terms(texts: Sequence[str]) -> list[list[str]]:
    """The words BM25 matches in each text: lower-cased, English stop words dropped."""
    import bm25s

    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class BM25Retriever:
    """The paper's sparse baseline (Table 6, "BM25"): Okapi BM25 over "title text", by bm25s.

    Words are lower-cased and English stop words dropped; no stemming. ``model``: a
    ``bm25s.BM25`` already indexed over ``passages`` (``index.load_bm25`` reads one from disk).
    """

    def __init__(self, passages: Sequence[Passage], model=None):
        import bm25s

        self.passages = list(passages)
        self.model = model
        if model is None:
            tokens = bm25s.tokenize([f"{p.title} {p.text}" for p in self.passages],
                                    stopwords="en", show_progress=False)
            self.model = bm25s.BM25()
            self.model.index(tokens, show_progress=False)

    def scores(self, questions: Sequence[str]) -> np.ndarray:
        """BM25(x, z) of every passage z for each question x: (len(questions), n_passages)."""
        tokens = bm25_terms(questions)
        n = len(self.passages)  # a question of stop words only matches nothing: all zeros
        return np.stack([self.model.get_scores(t) if t else np.zeros(n) for t in tokens]
                        ).astype(np.float32)

    def search(self, questions: Sequence[str], k: int = 5) -> SearchResult:
        import bm25s

        k = min(k, len(self.passages))
        tokens = bm25s.tokenize(list(questions), stopwords="en", show_progress=False)
        indices, scores = self.model.retrieve(tokens, k=k, show_progress=False)
        return SearchResult.from_indices(self.passages, indices, scores)


def reciprocal_rank_fusion(results: Sequence[SearchResult], k: int,
                           rrf_k: float = 60.0) -> SearchResult:
    """Fuse several rankings of the same questions (Cormack et al. 2009):

        score(z) = Σ_r 1 / (rrf_k + rank_r(z)),   rank starting at 1,

    summed over the rankings r in which z appears. Ties keep the order of first appearance
    (earlier rankings first). The fused scores replace the retrievers' own.
    """
    n = len(results[0].ids)
    rows, scores, by_index = [], [], {}
    for i in range(n):
        fused: dict[int, float] = {}
        for r in results:
            for rank, (j, p) in enumerate(zip(r.indices[i], r.passages[i]), start=1):
                if j < 0:  # an index with fewer than k vectors pads with -1
                    continue
                fused[int(j)] = fused.get(int(j), 0.0) + 1.0 / (rrf_k + rank)
                by_index[int(j)] = p
        top = sorted(fused.items(), key=lambda t: -t[1])[:k]
        rows.append([j for j, _ in top])
        scores.append([s for _, s in top])
    return SearchResult.from_indices(by_index, rows, scores)


class FusionRetriever:
    """Several retrievers' rankings (dense and BM25, say) merged by
    :func:`reciprocal_rank_fusion`, as pyserini's fusion runs do; each retriever contributes
    its top ``depth`` passages. (Not RAG's "hybrid" prior, ``pipeline.RagModel``, which
    multiplies the two experts' probabilities.)"""

    def __init__(self, retrievers: Sequence, depth: int = 100, rrf_k: float = 60.0):
        self.retrievers, self.depth, self.rrf_k = list(retrievers), depth, rrf_k

    def search(self, questions: Sequence[str], k: int = 5) -> SearchResult:
        results = [r.search(questions, max(k, self.depth)) for r in self.retrievers]
        return reciprocal_rank_fusion(results, k, self.rrf_k)
