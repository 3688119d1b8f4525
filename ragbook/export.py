"""Export and import: ragbook's RAG models in the formats the ecosystem loads, and the paper's
public RAG checkpoints read back into ragbook.

:func:`export_rag` writes a trained :class:`~ragbook.pipeline.RagModel` into one directory:

- ``generator/``: p_θ as a BART checkpoint with its tokenizer
  (``BartForConditionalGeneration.from_pretrained``);
- ``query_encoder/``: BERT_q in its family's own format — a ``DPRQuestionEncoder`` for DPR
  checkpoints, else a sentence-transformers model whose modules (Transformer, Pooling and, if
  the preset normalises, Normalize) compute ragbook's q(x), so that
  ``SentenceTransformer(DIR).encode`` gives it back;
- ``passages/``: the non-parametric memory as a ``datasets`` dataset (``id``, ``title``,
  ``text``, ``embeddings`` = d(z)) and ``passages.faiss``, its inner-product FAISS index as
  ``datasets``' ``get_index("embeddings").save`` writes it;
- ``rag/``, for a DPR-shaped model ([CLS] pooling, no normalisation, ``score_scale`` 1, so that
  ``doc_scores`` = d(z)ᵀq(x) exactly as transformers computes them): a complete transformers
  ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` checkpoint whose ``RagRetriever``
  (``index_name="custom"``) reads ``passages/`` and ``passages.faiss``;
- ``README.md``, the model card: what was trained, on what, how, and the measured results it
  was given (nothing else), and ``ragbook_export.json``, the same facts for programs.

:func:`import_rag` reads a transformers RAG checkpoint (``facebook/rag-sequence-nq``,
``facebook/rag-token-nq``, or one :func:`export_rag` wrote) into the paper preset's parts.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from . import __version__
from .artifacts import atomic_directory
from .config import Preset, get_preset, quiet_loading
from .pipeline import RagModel

CARD = "README.md"
FACTS = "ragbook_export.json"
RAG_CLASSES = {"sequence": "RagSequenceForGeneration", "token": "RagTokenForGeneration"}
EQUATIONS = {"sequence": "Eq. 1, RAG-Sequence", "token": "Eq. 2, RAG-Token"}


def dpr_shaped(model: RagModel) -> list[str]:
    """Why transformers' RAG cannot express ``model``'s retriever; empty when it can.

    transformers scores a document as the inner product of the question encoder's first output
    (DPR's [CLS] vector) with the stored d(z): no mean pooling, no normalisation, no
    temperature.
    """
    preset, encoder = model.preset, model.query_encoder
    reasons = []
    if model.index is None or model.bm25 is not None:
        reasons.append("its prior is not the dense retriever alone (BM25 or the hybrid prior)")
    if not getattr(encoder, "is_dpr", False):
        reasons.append(f"its query encoder is not a DPR checkpoint ({preset.query_encoder})")
    if preset.pooling != "cls":
        reasons.append(f"it pools the query encoder's states by their {preset.pooling}, "
                       "not [CLS]")
    if preset.normalize:
        reasons.append("it L2-normalises q(x) and d(z)")
    if preset.score_scale != 1.0:
        reasons.append(f"its doc_scores carry a temperature (score_scale {preset.score_scale})")
    return reasons


def _save_query_encoder(model: RagModel, out: Path) -> str:
    """BERT_q as a DPRQuestionEncoder (DPR checkpoints) or a sentence-transformers model."""
    encoder, preset = model.query_encoder, model.preset
    if encoder.is_dpr:
        encoder.model.save_pretrained(out)
        encoder.tokenizer.save_pretrained(out)
        return "DPRQuestionEncoder"
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers ≥ 6
        from sentence_transformers.sentence_transformer.modules import (
            Normalize,
            Pooling,
            Transformer,
        )
    except ImportError:
        from sentence_transformers.models import Normalize, Pooling, Transformer

    weights = out.parent / f".{out.name}.transformer"
    encoder.model.save_pretrained(weights)
    encoder.tokenizer.save_pretrained(weights)
    transformer = Transformer(str(weights), max_seq_length=preset.max_query_length)
    modules = [transformer, Pooling(encoder.dim, pooling_mode=preset.pooling)]
    if preset.normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out))
    shutil.rmtree(weights)
    return "sentence-transformers"


def _save_passages(model: RagModel, out: Path) -> None:
    """``passages/`` (a datasets dataset with d(z)) and ``passages.faiss`` (inner product)."""
    import datasets
    import faiss

    passages = model.index.passages
    vectors = model.doc_vectors.cpu().numpy().astype(np.float32)
    features = datasets.Features({
        "id": datasets.Value("string"), "title": datasets.Value("string"),
        "text": datasets.Value("string"),
        "embeddings": datasets.Sequence(datasets.Value("float32"))})
    dataset = datasets.Dataset.from_dict(
        {"id": [p.id for p in passages], "title": [p.title for p in passages],
         "text": [p.text for p in passages], "embeddings": list(vectors)}, features=features)
    dataset.save_to_disk(str(out / "passages"))
    dataset.add_faiss_index("embeddings", metric_type=faiss.METRIC_INNER_PRODUCT)
    dataset.get_index("embeddings").save(str(out / "passages.faiss"))


def _save_transformers_rag(model: RagModel, marginalization: str, out: Path, final: Path) -> None:
    """A transformers RAG checkpoint in ``out/rag`` whose retriever reads ``final``'s
    passages and index (absolute paths: where the export ends up)."""
    import transformers

    encoder, preset, generator = model.query_encoder, model.preset, model.generator
    config = transformers.RagConfig.from_question_encoder_generator_configs(
        encoder.model.config, generator.config, n_docs=preset.n_docs, index_name="custom",
        passages_path=str(final / "passages"), index_path=str(final / "passages.faiss"),
        retrieval_vector_size=encoder.dim, max_combined_length=preset.max_source_length,
        title_sep=" / ", doc_sep=" // ")  # generator.format_input's "title / text // question"
    for name in ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id",
                 "vocab_size"):
        setattr(config, name, getattr(generator.config, name))  # generate reads them here
    rag = getattr(transformers, RAG_CLASSES[marginalization])(
        config=config, question_encoder=encoder.model, generator=generator)
    rag.save_pretrained(out / "rag")
    transformers.RagTokenizer(question_encoder=encoder.tokenizer,
                              generator=model.tokenizer).save_pretrained(out / "rag")


def export_rag(model: RagModel, out: str | Path, marginalization: str = "token",
               about: dict | None = None) -> list[str]:
    """Write ``model`` into ``out`` in the ecosystem's formats (the module docstring), all or
    nothing (``artifacts.atomic_directory``). ``about``: what the card states — ``trained``
    (task, steps, prior, …), ``results`` (measured figures, e.g. from ``results.json``) and
    ``source`` — none of it invented here. Returns notes for the user: what transformers'
    RAG cannot express, and so was not written."""
    if marginalization not in RAG_CLASSES:
        raise ValueError(f"unknown marginalization {marginalization!r}; "
                         f"choose one of {sorted(RAG_CLASSES)}")
    if model.index is None:
        raise ValueError("a BM25-only model has no dense index or query encoder to export")
    if not model.query_encoder.is_dpr and importlib.util.find_spec("sentence_transformers") is None:
        from .data import DataError

        raise DataError("exporting a MiniLM-shaped query encoder writes a sentence-transformers "
                        "model: pip install sentence-transformers")
    about = about or {}
    final = Path(out).resolve()
    reasons = dpr_shaped(model)
    notes = [] if not reasons else [
        "no transformers RAG checkpoint (rag/): transformers scores documents by the raw "
        "inner product of DPR's [CLS] vectors, but " + "; ".join(reasons) + ". The parts "
        "are exported; score documents as the card says."]
    with atomic_directory(final) as tmp:
        model.generator.save_pretrained(tmp / "generator")
        model.tokenizer.save_pretrained(tmp / "generator")
        encoder_format = _save_query_encoder(model, tmp / "query_encoder")
        _save_passages(model, tmp)
        if not reasons:
            _save_transformers_rag(model, marginalization, tmp, final)
        facts = {"ragbook": __version__, "marginalization": marginalization,
                 "preset": model.preset.to_dict(), "query_encoder_format": encoder_format,
                 "passages": len(model.index.passages), "transformers_rag": not reasons,
                 "notes": notes, **about}
        (tmp / FACTS).write_text(json.dumps(facts, indent=2, ensure_ascii=False))
        (tmp / CARD).write_text(model_card(facts))
    return notes


def model_card(facts: dict) -> str:
    """The README.md beside the weights, from :func:`export_rag`'s facts."""
    p, m = facts["preset"], facts["marginalization"]
    name = f"RAG-{m.capitalize()}"
    generator = ("ragbook's shipped tiny BART" if p["generator"] == "tiny"
                 else f"`{p['generator']}`")
    scoring = (f"p(z|x) = softmax over the top {p['n_docs']} of {p['score_scale']:g} · "
               f"d(z)ᵀq(x), q(x) and d(z) the {p['pooling']} pooling of the encoders' states"
               + (", L2-normalised" if p["normalize"] else ""))
    lines = [f"# {name}, trained with ragbook", "",
             f"A retrieval-augmented generator (Lewis et al. 2020, {EQUATIONS[m]}) exported by "
             f"ragbook {facts['ragbook']} (preset `{p['name']}`).", "", "## What was trained", "",
             f"- query encoder BERT_q, fine-tuned from `{p['query_encoder']}` "
             f"({facts['query_encoder_format']}, in `query_encoder/`)",
             f"- generator p_θ, fine-tuned from {generator} (BART, in `generator/`)",
             f"- document encoder BERT_d `{p['doc_encoder']}`, frozen: it encoded the "
             f"{facts['passages']:,} passages of `passages/` once (d(z) in their `embeddings`"
             " column, indexed in `passages.faiss`)",
             f"- retriever: {scoring}. The temperature {p['score_scale']:g} is part of the "
             "retriever, not of q(x): multiply the inner products by it before the softmax.",
             "", "## How", ""]
    trained = facts.get("trained")
    lines += ([f"- {k.replace('_', ' ')}: {v}" for k, v in trained.items()] if trained else
              ["- no training record was given to the export"])
    lines += ["", "## Results", ""]
    results = facts.get("results")
    lines += ([f"- {k}: {v}" for k, v in results.items()] if results else
              ["No evaluation was recorded with this model."])
    lines += ["", "## Loading it", "", "```python",
              "from transformers import AutoTokenizer, BartForConditionalGeneration",
              'generator = BartForConditionalGeneration.from_pretrained("generator")',
              'tokenizer = AutoTokenizer.from_pretrained("generator")']
    if facts["query_encoder_format"] == "sentence-transformers":
        lines += ["from sentence_transformers import SentenceTransformer",
                  'q = SentenceTransformer("query_encoder").encode(["a question"])']
    else:
        lines += ["from transformers import DPRQuestionEncoder",
                  'query_encoder = DPRQuestionEncoder.from_pretrained("query_encoder")']
    lines += ["import datasets",
              'passages = datasets.load_from_disk("passages")',
              'passages.load_faiss_index("embeddings", "passages.faiss")']
    if facts["transformers_rag"]:
        cls = RAG_CLASSES[m]
        lines += [f"from transformers import RagRetriever, RagTokenizer, {cls}",
                  'retriever = RagRetriever.from_pretrained("rag")  # moved? pass '
                  "passages_path= and index_path=",
                  f'model = {cls}.from_pretrained("rag", retriever=retriever)']
    lines += ["```", "", "Generator inputs are `title / text // question`, at most "
              f"{p['max_source_length']} tokens; ragbook cuts the passage, never the question."]
    if facts["transformers_rag"]:
        lines += ["transformers' retriever cuts the end of the same string instead, and feeds "
                  "the generator the question as the question encoder's tokenizer decodes it "
                  "(lower-cased by DPR's uncased BERT). Its RAG-Sequence loss adds the document "
                  "prior at the second target position, which drops the prior for a one-token "
                  "target, and its RAG-Sequence `generate` decodes each document without the "
                  "attention mask; RAG-Token decoding and both losses otherwise agree with "
                  "ragbook's."]
    lines += [f"\n{n}" for n in facts["notes"]]
    return "\n".join(lines) + "\n"


def import_rag(path: str | Path, out: str | Path, **overrides) -> tuple[Preset, str]:
    """The question encoder, generator and settings of a transformers RAG checkpoint
    (``facebook/rag-sequence-nq`` / ``facebook/rag-token-nq`` format, a local directory) as
    ragbook parts: ``out/query_encoder`` and ``out/generator``, and the paper preset pointing
    at them with the checkpoint's ``n_docs`` and input length (``overrides`` on top, e.g. a
    local ``doc_encoder``). Returns (preset, marginalization).

    The checkpoint holds no document encoder: its index was built by DPR's context encoder,
    the paper preset's ``doc_encoder``.
    """
    import transformers

    path = Path(path)
    config = transformers.RagConfig.from_pretrained(path)
    cls = next((c for c in (config.architectures or []) if c in RAG_CLASSES.values()),
               RAG_CLASSES["sequence"])
    with quiet_loading():
        rag = getattr(transformers, cls).from_pretrained(path)
        tokenizer = transformers.RagTokenizer.from_pretrained(path)
    out = Path(out).resolve()
    with atomic_directory(out) as tmp:
        rag.question_encoder.save_pretrained(tmp / "query_encoder")
        tokenizer.question_encoder.save_pretrained(tmp / "query_encoder")
        rag.generator.save_pretrained(tmp / "generator")
        tokenizer.generator.save_pretrained(tmp / "generator")
    preset = get_preset("paper", **{
        "query_encoder": str(out / "query_encoder"), "generator": str(out / "generator"),
        "n_docs": config.n_docs, "max_source_length": config.max_combined_length, **overrides})
    marginalization = next(m for m, c in RAG_CLASSES.items() if c == cls)
    return preset, marginalization


# ------------------------------------------------------------ what `ragbook export` reads


def reproduced_model(marginalization: str, preset: str = "tiny", steps: int | None = None,
                     seed: int = 0) -> tuple[RagModel, dict]:
    """The jointly trained entity-QA model that ``ragbook ask`` answers with (trained and
    cached on first use) with the dense prior it was trained with — the part transformers'
    RAG can express — and what the card says about it: the training recipe."""
    from dataclasses import asdict

    from .reproduce import ReproduceConfig, rag_model
    from .train import RagTrainConfig

    defaults = ReproduceConfig()
    cfg = ReproduceConfig(preset=preset, entity_steps=steps or defaults.entity_steps, seed=seed,
                          training_prior="dense", retriever="dense")
    model = rag_model(cfg, "entity-qa", marginalization)
    train = RagTrainConfig(marginalization=marginalization, steps=cfg.entity_steps,
                           n_docs=model.preset.n_docs, seed=seed)
    trained = {"task": "entity-qa, the built-in Wikipedia vital-articles task (train split)",
               "corpus": f"{len(model.index.passages):,} built-in passages",
               "prior during training": "dense (the paper's)",
               **{k.replace("_", " "): v for k, v in asdict(train).items()
                  if k not in ("checkpoint_every", "marginalization")}}
    return model, {"trained": trained}


def checkpoint_model(directory: str | Path, preset: Preset) -> tuple[RagModel, dict]:
    """A RagModel from a directory holding ``generator/`` and ``query_encoder/`` (as
    ``train.trained_rag`` writes them), over the built-in corpus, and what the card says."""
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from .data import DataError
    from .retriever import Encoder

    directory = Path(directory)
    missing = [p for p in ("generator", "query_encoder") if not (directory / p).is_dir()]
    if missing:
        raise DataError(f"{directory}: no {' or '.join(missing)} directory; give a directory "
                        "with generator/ and query_encoder/, as ragbook's trained RAG models "
                        "have them")
    with quiet_loading():
        generator = BartForConditionalGeneration.from_pretrained(directory / "generator")
        tokenizer = AutoTokenizer.from_pretrained(directory / "generator")
    query_encoder = Encoder(str(directory / "query_encoder"), preset.pooling, preset.normalize,
                            preset.max_query_length)
    model = RagModel.from_preset(preset, query_encoder=query_encoder, generator=generator,
                                 tokenizer=tokenizer).eval()
    history = directory / "history.json"
    steps = len(json.loads(history.read_text())["history"]) if history.is_file() else None
    return model, {"trained": {"checkpoint": str(directory.resolve()),
                               **({"steps": steps} if steps is not None else {})}}
