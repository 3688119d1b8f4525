"""The generator p_θ(y_i | x, z, y_<i): the paper's parametric memory, a seq2seq BART.

The tiny preset uses a small BART (d_model 256, 2+2 layers) with its own byte-level BPE
vocabulary trained on the built-in corpus, pre-trained by ragbook with BART's denoising
objective (``ragbook pretrain``) and shipped in ``ragbook/weights/tiny-bart``. The paper preset
loads ``facebook/bart-large`` through the same ``from_pretrained`` path.

Each retrieved passage z is fed to the generator together with the question x as
``"title / text // question"`` (the paper concatenates z and x); the question always survives
truncation. :func:`token_logprobs` scores a target y under every retrieved document in one
batched forward pass: the (batch, k, T) tensor that both marginalizations in ``rag.py`` consume.

With no retrieval at all the generator is the paper's closed-book BART baseline:
:func:`finetune_closed_book` trains it on (question, answer) pairs and :func:`generate_answers`
answers by beam search from parametric memory alone.
"""

from __future__ import annotations

import inspect
import random
from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .config import Preset, default_device, quiet_loading, resolve_model
from .data import Example, Passage

SHIPPED = Path(__file__).parent / "weights" / "tiny-bart"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(texts, vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE vocabulary (BART's kind, ~8k pieces) on ``texts``.

    A small vocabulary matters on a CPU: the output softmax is most of the generator's cost.
    Every word starts with a space (``add_prefix_space``: "Paris" is the same piece at the start
    of a text as after a space); the decoder removes the space it added, so ``decode(encode(t))``
    gives ``t`` back exactly (for any ``t`` that does not itself start with a space).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = _exact_decoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def _exact_decoder():
    """Byte-level decoding that drops the one space ``add_prefix_space`` put in front."""
    from tokenizers import decoders

    return decoders.Sequence([decoders.ByteLevel(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])


def _fix_decoding(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer saved with a plain byte-level decoder (one that returns a leading
    space) the exact decoder of :func:`train_tokenizer`. Encoding is unchanged."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (backend is not None and getattr(backend.pre_tokenizer, "add_prefix_space", False)
            and type(backend.decoder).__name__ == "ByteLevel"):
        backend.decoder = _exact_decoder()
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerBase, d_model: int = 256, layers: int = 2,
                max_positions: int = 128) -> BartConfig:
    """The tiny preset's BART: d_model 256, ``layers`` encoder and decoder layers, ~6M weights."""
    return BartConfig(
        vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=4 * d_model, decoder_ffn_dim=4 * d_model,
        max_position_embeddings=max_positions, dropout=0.1, attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        forced_bos_token_id=None, forced_eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def load_generator(name: str = "tiny", device: str | torch.device | None = None):
    """Return ``(model, tokenizer)``: ``"tiny"`` is the shipped BART, else a path or hub id;
    on ``device`` (default :func:`~ragbook.config.default_device`)."""
    from transformers import AutoTokenizer

    path = SHIPPED if name == "tiny" else resolve_model(name)  # fails fast with no hub
    if name == "tiny" and not (SHIPPED / "config.json").exists():
        raise FileNotFoundError(
            f"{SHIPPED} holds no generator; rebuild it with `ragbook pretrain --out {SHIPPED}`")
    with quiet_loading():
        tokenizer = _fix_decoding(AutoTokenizer.from_pretrained(path))
        model = BartForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model.to(device or default_device()), tokenizer


def format_input(passage: Passage | None, question: str) -> str:
    """The generator's input for document z and question x: ``"title / text // question"``.

    Closed-book (no retrieval, the paper's BART baseline) is the question alone.
    """
    if passage is None:
        return question
    return f"{passage.title} / {passage.text} // {question}"


def special_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after one sequence (BART: ``<s>`` … ``</s>``).

    Read off the tokenizer itself, so the same code serves the tiny BART, ``facebook/bart-large``
    and any other seq2seq vocabulary.
    """
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    raise ValueError("cannot locate the text among the tokenizer's special tokens")


def encode_inputs(tokenizer: PreTrainedTokenizerBase, passages: list[Passage | None],
                  questions: list[str], max_length: int) -> dict[str, Tensor]:
    """Tokenize ``format_input`` pairs, truncating the passage (never the question) to fit.

    The passage's text is cut, not the ``" //"`` that separates it from the question, so the
    generator always sees where the question starts. Only a question longer than
    ``max_length`` on its own is cut (at its end). Returns ``input_ids`` and ``attention_mask``
    of shape (len(questions), ≤ max_length).
    """
    if len(passages) != len(questions):
        raise ValueError(f"{len(passages)} passages for {len(questions)} questions; "
                         "give one passage (or None) per question")
    prefix, suffix = special_tokens(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    sep = tokenizer(" //", add_special_tokens=False)["input_ids"]
    docs = [f"{p.title} / {p.text}" if p is not None else "" for p in passages]
    doc_ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    q_ids = tokenizer([" " + q if p is not None else q for q, p in zip(questions, passages)],
                      add_special_tokens=False)["input_ids"]
    rows = []
    for p, d, q in zip(passages, doc_ids, q_ids):
        q = q[:room]
        budget = room - len(q) - len(sep)
        body = d[:budget] + sep + q if p is not None and budget > 0 else q
        rows.append(prefix + body + suffix)
    return pad(rows, tokenizer.pad_token_id)


def encode_targets(tokenizer: PreTrainedTokenizerBase, targets: list[str],
                   max_length: int) -> dict[str, Tensor]:
    """Tokenize targets y as ``y_1 … y_T </s>``, cut to at most ``max_length`` tokens with the
    end token (the preset's ``max_target_length``; the decoders count an answer the same way);
    returns ``labels`` and ``target_mask``."""
    ids = tokenizer(targets, add_special_tokens=False)["input_ids"]
    rows = [t[: max_length - 1] + [tokenizer.eos_token_id] for t in ids]
    batch = pad(rows, tokenizer.pad_token_id)
    return {"labels": batch["input_ids"], "target_mask": batch["attention_mask"].bool()}


def pad(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Right-pad token lists into ``input_ids`` and ``attention_mask`` tensors."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def shift_right(labels: Tensor, decoder_start_token_id: int, pad_token_id: int) -> Tensor:
    """Decoder inputs for teacher forcing: ``[start, y_1 … y_{T-1}]``.

    Labels may mark ignored positions with -100 (the Hugging Face convention); they become pad.
    """
    out = labels.new_full(labels.shape, pad_token_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = decoder_start_token_id
    return out.masked_fill(out == -100, pad_token_id)


def token_logprobs(model: BartForConditionalGeneration, input_ids: Tensor,
                   attention_mask: Tensor, labels: Tensor) -> Tensor:
    """log p_θ(y_i | x, z, y_<i) for every target token under every retrieved document.

    ``input_ids``/``attention_mask``: (batch·k, S), the k inputs of each question consecutive;
    ``labels``: (batch, T). Returns (batch, k, T) in one batched forward pass. Positions past a
    target's end hold the log-probability of the pad token: mask them with ``target_mask``.
    The tensors may come from the CPU (``encode_inputs``): they are moved to the model's device.
    """
    device = model.device
    input_ids, attention_mask, labels = (t.to(device) for t in (input_ids, attention_mask, labels))
    batch, n_docs = labels.shape[0], input_ids.shape[0] // labels.shape[0]
    if batch * n_docs != input_ids.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} inputs for {batch} targets: expected k inputs "
                         "per target (batch·k rows)")
    labels_k = labels.repeat_interleave(n_docs, dim=0)
    cfg = model.config
    decoder_input_ids = shift_right(labels_k, cfg.decoder_start_token_id, cfg.pad_token_id)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   decoder_input_ids=decoder_input_ids, use_cache=False).logits
    return gold_logprobs(logits, labels_k).view(batch, n_docs, -1)


def cache_keyword(model) -> str:
    """The keyword under which the generator takes and returns its key/value cache: ``cache``
    in recent transformers, where ``past_key_values`` still works but is deprecated (a
    FutureWarning); ``past_key_values`` before. Read off ``forward``'s signature, since a
    forward with ``**kwargs`` would swallow the wrong one silently (and decode without cache)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def gold_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log p_θ(y_i | …) of each label token from the decoder's logits (…, T, vocab): (…, T)."""
    return logits.float().log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


# --------------------------------------------------------------------------- closed book


def finetune_closed_book(model: BartForConditionalGeneration,
                         tokenizer: PreTrainedTokenizerBase, examples: list[Example],
                         steps: int, batch_size: int = 32, lr: float = 3e-4,
                         max_source_length: int = 48,
                         max_target_length: int = Preset.max_target_length,
                         seed: int = 0, progress: bool = True) -> list[float]:
    """Fine-tune the generator on (x, y) pairs with no retrieval: the paper's BART baseline.

    The generator answers from its parametric memory alone, p_θ(y | x) = Π_i p_θ(y_i | x, y_<i);
    the loss is −log p_θ(y_i | x, y_<i) averaged over target tokens, the target being each
    example's first answer. AdamW at a constant ``lr``: 3e-4 works for the tiny BART, 1e-3
    collapses it to one output for every question. Batches walk through ``examples`` in an order
    shuffled with ``seed``, epoch after epoch. Returns the loss of every step; the model is left
    in eval mode.
    """
    from tqdm.auto import tqdm

    if not examples:
        raise ValueError("no examples to fine-tune on")
    rng = random.Random(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    order: list[int] = []
    history = []
    model.train()
    for _ in tqdm(range(steps), desc="closed-book fine-tuning", disable=not progress):
        while len(order) < batch_size:
            epoch = list(range(len(examples)))
            rng.shuffle(epoch)
            order += epoch
        batch, order = [examples[i] for i in order[:batch_size]], order[batch_size:]
        src = encode_inputs(tokenizer, [None] * len(batch), [e.question for e in batch],
                            max_source_length)
        tgt = encode_targets(tokenizer, [e.answers[0] for e in batch], max_target_length)
        logprobs = token_logprobs(model, src["input_ids"].to(device),
                                  src["attention_mask"].to(device),
                                  tgt["labels"].to(device))[:, 0]  # k = 1 "document": none
        mask = tgt["target_mask"].to(device)
        loss = -(logprobs * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
    model.eval()
    return history


@torch.no_grad()
def generate_answers(model: BartForConditionalGeneration, tokenizer: PreTrainedTokenizerBase,
                     questions: list[str], passages: list[Passage | None] | None = None,
                     num_beams: int = 4, max_length: int = Preset.max_target_length, *,
                     max_source_length: int = 48, batch_size: int = 32) -> list[str]:
    """Answer each question by plain seq2seq beam search, in batches.

    Closed-book when ``passages`` is None (the question alone); otherwise one passage (or None)
    per question, fed as ``"title / text // question"`` — e.g. the gold passage, to see the
    generator as a reader. An answer has at most ``max_length`` tokens and ends with the end
    token, as :func:`encode_targets` cuts a training target and as ``rag.py``'s decoders
    decode; nothing is forced at its start (the targets have no ``<s>``, though a
    ``facebook/bart-large`` config asks generate to force one). No marginalization over
    documents: that is ``rag.py``'s job.
    """
    passages = [None] * len(questions) if passages is None else list(passages)
    if len(passages) != len(questions):
        raise ValueError(f"{len(passages)} passages for {len(questions)} questions")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    answers = []
    for i in range(0, len(questions), batch_size):
        enc = encode_inputs(tokenizer, passages[i:i + batch_size], questions[i:i + batch_size],
                            max_source_length)
        out = model.generate(input_ids=enc["input_ids"].to(device),
                             attention_mask=enc["attention_mask"].to(device),
                             num_beams=num_beams, max_new_tokens=max_length, do_sample=False,
                             forced_bos_token_id=None,
                             forced_eos_token_id=model.config.eos_token_id)
        answers += [a.strip() for a in tokenizer.batch_decode(out, skip_special_tokens=True)]
    model.train(was_training)
    return answers
