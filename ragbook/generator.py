"""The generator p_θ(y_i | x, z, y_<i): the paper's parametric memory, a seq2seq BART.

The tiny preset uses a small BART (d_model 256, 2+2 layers) with its own byte-level BPE
vocabulary trained on the built-in corpus, pre-trained by ragbook with BART's denoising
objective (``ragbook pretrain``) and shipped in ``ragbook/weights/tiny-bart``. The paper preset
loads ``facebook/bart-large`` through the same ``from_pretrained`` path.

Each retrieved passage z is fed to the generator together with the question x as
``"title / text // question"`` (the paper concatenates z and x); the question always survives
truncation. :func:`token_logprobs` scores a target y under every retrieved document in one
batched forward pass: the (batch, k, T) tensor that both marginalizations in ``rag.py`` consume.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from .data import Passage

SHIPPED = Path(__file__).parent / "weights" / "tiny-bart"
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(texts, vocab_size: int = 8192) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE vocabulary (BART's kind, ~8k pieces) on ``texts``.

    A small vocabulary matters on a CPU: the output softmax is most of the generator's cost.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


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


def load_generator(name: str = "tiny", device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)``: ``"tiny"`` is the shipped BART, else a path or hub id."""
    from transformers import AutoTokenizer

    path = SHIPPED if name == "tiny" else name
    if name == "tiny" and not (SHIPPED / "config.json").exists():
        raise FileNotFoundError(
            f"{SHIPPED} holds no generator; rebuild it with `ragbook pretrain --out {SHIPPED}`")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BartForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model.to(device), tokenizer


def format_input(passage: Passage | None, question: str) -> str:
    """The generator's input for document z and question x: ``"title / text // question"``.

    Closed-book (no retrieval, the paper's BART baseline) is the question alone.
    """
    if passage is None:
        return question
    return f"{passage.title} / {passage.text} // {question}"


def encode_inputs(tokenizer: PreTrainedTokenizerBase, passages: list[Passage | None],
                  questions: list[str], max_length: int) -> dict[str, Tensor]:
    """Tokenize ``format_input`` pairs, truncating the passage (never the question) to fit.

    Returns ``input_ids`` and ``attention_mask`` of shape (len(questions), ≤ max_length).
    """
    n_special = tokenizer.num_special_tokens_to_add()
    docs = [f"{p.title} / {p.text} //" if p is not None else "" for p in passages]
    doc_ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    q_ids = tokenizer([" " + q if d else q for q, d in zip(questions, docs)],
                      add_special_tokens=False)["input_ids"]
    rows = []
    for d, q in zip(doc_ids, q_ids):
        q = q[: max_length - n_special]
        budget = max_length - n_special - len(q)
        rows.append(tokenizer.build_inputs_with_special_tokens(d[:budget] + q))
    return pad(rows, tokenizer.pad_token_id)


def encode_targets(tokenizer: PreTrainedTokenizerBase, targets: list[str],
                   max_length: int) -> dict[str, Tensor]:
    """Tokenize targets y as ``y_1 … y_T </s>``; returns ``labels`` and ``target_mask``."""
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
    """Decoder inputs for teacher forcing: ``[start, y_1 … y_{T-1}]``."""
    out = labels.new_full(labels.shape, pad_token_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = decoder_start_token_id
    return out


def token_logprobs(model: BartForConditionalGeneration, input_ids: Tensor,
                   attention_mask: Tensor, labels: Tensor) -> Tensor:
    """log p_θ(y_i | x, z, y_<i) for every target token under every retrieved document.

    ``input_ids``/``attention_mask``: (batch·k, S), the k inputs of each question consecutive;
    ``labels``: (batch, T). Returns (batch, k, T) in one batched forward pass. Positions past a
    target's end hold the log-probability of the pad token: mask them with ``target_mask``.
    """
    batch, n_docs = labels.shape[0], input_ids.shape[0] // labels.shape[0]
    labels_k = labels.repeat_interleave(n_docs, dim=0)
    cfg = model.config
    decoder_input_ids = shift_right(labels_k, cfg.decoder_start_token_id, cfg.pad_token_id)
    logits = model(input_ids=input_ids, attention_mask=attention_mask,
                   decoder_input_ids=decoder_input_ids, use_cache=False).logits
    logprobs = logits.float().log_softmax(-1).gather(-1, labels_k.unsqueeze(-1)).squeeze(-1)
    return logprobs.view(batch, n_docs, -1)
