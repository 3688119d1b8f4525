"""Training loops: generator pre-training and joint RAG fine-tuning.

``train_rag`` is the paper's fine-tuning (§2.4): minimise −Σ_j log p(y_j|x_j), Eq. 1 or Eq. 2,
with Adam, updating only the query encoder BERT_q and the generator; the document encoder and
the index stay frozen.

``pretrain`` is the recipe that produced the shipped tiny BART, on the passages of the built-in
corpus's *train* articles only, so that dev and test articles stay unseen by the parametric
memory. Three stages: *denoising* — text infilling and sentence permutation (Lewis et al. 2019,
BART) — then *reading*: salient-span questions (REALM, Guu et al. 2020) answered from the
passage in the input, which stands in for what BART-large brings from 160 GB of text: copying
from its input; then *focus*: the same questions with the passage often narrowed to the
sentence the question was cut from and a few of its neighbours, where a guess among the
passage's names and numbers stops paying and copying the span beside the matched words does.

Every run is resumable (:func:`resumable_loop`): the checkpoint is written atomically every
``checkpoint_every`` steps and on interrupt, and the batch of step t depends only on (seed, t),
so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts import atomic_directory, atomic_torch_save, atomic_write_bytes
from .config import autocast, bf16_supported, default_device, quiet_loading
from .data import (
    Passage,
    article_split,
    load_articles,
    load_corpus,
    reading_question,
    salient_spans,
    split_passages,
    split_sentences,
)
from .generator import encode_inputs, encode_targets, pad, shift_right, tiny_config, train_tokenizer


def sentence_permutation(sentences: list, rng: random.Random) -> list:
    """BART's sentence permutation: the same sentences (strings or token lists), shuffled."""
    shuffled = list(sentences)
    rng.shuffle(shuffled)
    return shuffled


def text_infilling(ids: list[int], mask_id: int, rng: random.Random, ratio: float = 0.3,
                   poisson_lambda: float = 3.0) -> list[int]:
    """BART's text infilling: spans with Poisson(λ=3) lengths, covering ~``ratio`` of the
    tokens, are each replaced by a single ``<mask>``; a zero-length span inserts one."""
    n = len(ids)
    masked, starts = [False] * n, [False] * (n + 1)
    budget = round(ratio * n)
    np_rng = np.random.default_rng(rng.getrandbits(32))
    while budget > 0:
        length = min(int(np_rng.poisson(poisson_lambda)), budget)
        start = rng.randrange(n)
        starts[start] = True
        for i in range(start, min(start + length, n)):
            masked[i] = True
        budget -= max(length, 1)
    out, in_span = [], False
    for i in range(n):
        if starts[i] and not in_span:
            out.append(mask_id)
        in_span = masked[i]
        if not masked[i]:
            out.append(ids[i])
    return out


@dataclass
class PretrainConfig:
    """The recipe of the shipped generator (its ``pretrain.json`` records the run)."""

    steps: int = 4_000
    batch_size: int = 32
    seq_len: int = 128  # all 128 positions trained: `ragbook finetune` inputs fill them
    lr: float = 7e-4
    warmup: int = 200
    weight_decay: float = 0.01
    vocab_size: int = 8192
    d_model: int = 256
    layers: int = 2
    seed: int = 0
    checkpoint_every: int = 250
    export_every: int = 1000
    heldout_passages: int = 256
    # the reading stage, after denoising (read_steps = 0: denoising only)
    read_steps: int = 3_000
    read_seq_len: int = 256  # positions for a 100-word passage and a question (~200 tokens)
    read_lr: float = 3e-4
    read_denoise: float = 0.25  # the share of each batch that goes on denoising
    # the focus stage, after reading (focus_steps = 0: none), the same share on denoising: each
    # question's passage is narrowed to its sentence and n neighbours on each side, n drawn
    # from 0 … focus_window − 1, or kept whole (1 in focus_window + 1)
    focus_steps: int = 4_000
    focus_lr: float = 5e-4
    focus_window: int = 3
    # the share of focus questions given another article's passage instead (:func:`distractor`):
    # the span cannot be read there, so the generator learns to hedge where a passage does not
    # answer — what lets Eq. 1 / Eq. 2 prefer the retrieved passage that does
    focus_distract: float = 0.2
    distractor_pool: int = 64
    # bf16 matrix products where the device has them (config.autocast), fp32 elsewhere
    # (~1.7× faster on AVX512-BF16 cores: benchmarks/README.md)
    bf16: bool = True


def _lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))


def denoising_batch(texts: list[str], tokenizer, cfg: PretrainConfig,
                    rng: random.Random, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    """A (noised source, original target) batch from raw passage texts.

    BART corrupts a document and learns to reconstruct the original. Each passage is
    tokenized sentence by sentence; a window of ``seq_len - 2`` tokens of the original is the
    target, and the source is the same window with its (clipped) sentences permuted and then
    text-infilled. ``seq_len`` overrides ``cfg.seq_len`` (the reading stage's longer windows).
    """
    sentences = [split_sentences(t) for t in texts]
    flat = tokenizer([s for group in sentences for s in group],
                     add_special_tokens=False)["input_ids"]
    width = (seq_len or cfg.seq_len) - 2
    sources, targets, at = [], [], 0
    for group in sentences:
        pieces, at = flat[at:at + len(group)], at + len(group)
        ids = [i for piece in pieces for i in piece]
        start = rng.randrange(max(1, len(ids) - width + 1))
        segments, pos = [], 0  # the sentences, clipped to the window [start, start + width)
        for piece in pieces:
            lo, hi = max(pos, start), min(pos + len(piece), start + width)
            if lo < hi:
                segments.append(ids[lo:hi])
            pos += len(piece)
        permuted = [i for seg in sentence_permutation(segments, rng) for i in seg]
        noised = text_infilling(permuted, tokenizer.mask_token_id, rng)
        sources.append([tokenizer.bos_token_id] + noised + [tokenizer.eos_token_id])
        targets.append(ids[start:start + width] + [tokenizer.eos_token_id])
    src = pad(sources, tokenizer.pad_token_id)
    tgt = pad(targets, tokenizer.pad_token_id)
    return {"input_ids": src["input_ids"], "attention_mask": src["attention_mask"],
            "labels": tgt["input_ids"], "target_mask": tgt["attention_mask"].bool()}


def denoising_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token cross-entropy of reconstructing the original text."""
    cfg = model.config
    dec = shift_right(batch["labels"], cfg.decoder_start_token_id, cfg.pad_token_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=dec, use_cache=False).logits
    mask = batch["target_mask"]
    return torch.nn.functional.cross_entropy(logits[mask], batch["labels"][mask])


def pretraining_texts(seed: int = 0) -> tuple[list[str], list[str]]:
    """Passages of train articles (to learn from) and of test articles (held out)."""
    split = article_split(seed)
    corpus = load_corpus()
    train = [p.text for p in corpus if split[p.title] == "train"]
    heldout = [p.text for p in corpus if split[p.title] == "test"]
    return train, heldout


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], cfg: PretrainConfig) -> float:
    """Denoising loss on held-out passages with fixed noise (comparable across runs)."""
    was_training = model.training
    model.eval()
    rng = random.Random(f"heldout/{cfg.seed}")
    losses = []
    for i in range(0, len(texts), cfg.batch_size):
        batch = denoising_batch(texts[i:i + cfg.batch_size], tokenizer, cfg, rng)
        losses.append(denoising_loss(model, batch).item())
    model.train(was_training)
    return float(np.mean(losses))


def save_generator(model, tokenizer, out: Path, meta: dict) -> None:
    """Write the generator (safetensors), its tokenizer and the recipe beside it, all or
    nothing (:func:`~ragbook.artifacts.atomic_directory`): an interrupted export leaves the
    previous generator, never a half-written one that loads."""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(meta, indent=2))


def _settings(cfg) -> dict:
    """What a run's result depends on: its config, less how often it saves."""
    return {k: v for k, v in asdict(cfg).items() if not k.endswith("_every")}


def resumable_loop(step_fn: Callable[[int], float], stateful: dict, steps: int,
                   checkpoint_path: str | Path | None, checkpoint_every: int, desc: str,
                   progress: bool = True, after_step: Callable[[dict], None] | None = None,
                   settings: dict | None = None, writer: bool = True) -> dict:
    """Run ``step_fn(step) -> loss`` until ``steps``, resumable from ``checkpoint_path``.

    ``stateful`` maps names to objects with ``state_dict``/``load_state_dict`` (models,
    optimizers, schedulers). The checkpoint holds them and the loss history; it is written
    atomically every ``checkpoint_every`` steps, at the end and on interrupt (Ctrl-C), and a
    run that finds it continues where it stopped. ``step_fn`` must draw its batch and its
    randomness from the step number alone, so that a resumed run equals an unbroken one.
    ``settings`` (the run's configuration) is stored too: a checkpoint written under other
    settings (say, another number of steps, which reshapes the learning-rate schedule) is
    refused rather than silently continued. In a data-parallel run every rank resumes from
    the checkpoint but only the main one (``writer``) writes it and shows progress.
    """
    settings = json.loads(json.dumps(settings)) if settings is not None else None
    state = {"step": 0, "history": [], "seconds": 0.0, "settings": settings}
    path = Path(checkpoint_path) if checkpoint_path else None
    if path is not None and path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        before = saved["state"].get("settings")
        if settings is not None and before is not None and before != settings:
            changed = sorted(k for k in settings.keys() | before.keys()
                             if settings.get(k) != before.get(k))
            diff = ", ".join(f"{k}: {before.get(k)!r} → {settings.get(k)!r}" for k in changed)
            raise ValueError(f"{path} was written by a run with other settings ({diff}); "
                             "resume with the same settings, or start afresh with another "
                             "checkpoint path")
        for name, obj in stateful.items():
            obj.load_state_dict(saved[name])
        state = saved["state"]

    def checkpoint():
        if path is not None and writer:
            atomic_torch_save({**{n: o.state_dict() for n, o in stateful.items()},
                               "state": state}, path)

    # Ctrl-C is held until the step in flight ends: a step cut short (weights updated, step
    # count not yet) must not be checkpointed. A second Ctrl-C stops at once, unsaved.
    interrupted = forced = False

    def on_sigint(signum, frame):
        nonlocal interrupted, forced
        forced, interrupted = interrupted, True
        if forced:
            raise KeyboardInterrupt

    main = (threading.current_thread() is threading.main_thread()  # Python's own Ctrl-C only:
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)  # not if ignored
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    bar = tqdm(total=steps, initial=state["step"], desc=desc, disable=not (progress and writer))
    try:
        while state["step"] < steps:
            t0 = time.perf_counter()
            loss = step_fn(state["step"])
            state["seconds"] += time.perf_counter() - t0
            state["step"] += 1
            state["history"].append((state["step"], round(loss, 4)))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if state["step"] % checkpoint_every == 0:
                checkpoint()
            if after_step is not None:
                after_step(state)
            if interrupted:
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        if not forced:
            checkpoint()
        raise
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
        bar.close()
    checkpoint()
    return state


READ_TARGET_TOKENS = 24  # a salient span and its end token, as the tiny preset's targets


def reading_pairs(seed: int = 0) -> tuple[list[tuple[Passage, str]], list[tuple[Passage, str]]]:
    """(passage, its article's description) for every passage with a salient span: of train
    articles (to learn from) and of test articles (held out)."""
    split = article_split(seed)
    pairs: dict[str, list] = {"train": [], "test": []}
    for a in load_articles():
        if a["description"] and split[a["title"]] in pairs:
            pairs[split[a["title"]]] += [(p, a["description"])
                                         for p in split_passages(a["title"], a["extract"])
                                         if salient_spans(p)]
    return pairs["train"], pairs["test"]


def focused(passage: Passage, question: str, span: str, neighbours: int) -> Passage:
    """``passage`` narrowed to the sentence ``question`` was cut from (of those holding ``span``,
    the one sharing most words with the question) and ``neighbours`` sentences on each side."""
    sentences = split_sentences(passage.text)
    words = set(question.split())
    i = max((i for i, s in enumerate(sentences) if span in s),
            key=lambda i: len(words & set(sentences[i].split())))
    return Passage(passage.id, passage.title,
                   " ".join(sentences[max(0, i - neighbours):i + neighbours + 1]))


def distractor(pairs: list[tuple[Passage, str]], question: str, title: str, pool: int,
               rng: random.Random) -> Passage:
    """Of ``pool`` passages drawn from ``pairs``, the one of another article than ``title``
    sharing most words of four letters or more with ``question``: a near miss, as a
    retriever's lower ranks are."""
    def content(text: str) -> set[str]:
        return {w for w in text.lower().split() if len(w) > 3}

    words, drawn = content(question), []
    while len(drawn) < pool:
        passage = pairs[rng.randrange(len(pairs))][0]
        if passage.title != title:
            drawn.append(passage)
    return max(drawn, key=lambda p: len(words & content(p.text)))


def reading_batch(pairs: list[tuple[Passage, str]], n: int, tokenizer, cfg: PretrainConfig,
                  rng: random.Random, focus: bool = False) -> dict[str, torch.Tensor]:
    """``n`` reading questions (:func:`~ragbook.data.reading_question`) with their passage in
    the input, ``"title / text // question"`` in ``read_seq_len`` tokens; the target is the
    blanked span. REALM masks a salient span and predicts it from the model's memory; here the
    passage is in the input, so the span is read, not recalled. With ``focus`` (the focus
    stage) a share ``focus_distract`` of the questions gets another article's passage
    (:func:`distractor`, the span still the target), and the rest a passage narrowed
    (:func:`focused`) unless the draw from 0 … ``focus_window`` is ``focus_window``."""
    passages, questions, spans = [], [], []
    for _ in range(n):
        passage, description = pairs[rng.randrange(len(pairs))]
        q = reading_question(passage, description, rng)  # never None: the pairs have spans
        if focus and rng.random() < cfg.focus_distract:
            passage = distractor(pairs, q.question, passage.title, cfg.distractor_pool, rng)
        elif focus and (neighbours := rng.randrange(cfg.focus_window + 1)) < cfg.focus_window:
            passage = focused(passage, q.question, q.answers[0], neighbours)
        passages.append(passage)
        questions.append(q.question)
        spans.append(q.answers[0])
    return {**encode_inputs(tokenizer, passages, questions, cfg.read_seq_len),
            **encode_targets(tokenizer, spans, READ_TARGET_TOKENS)}


@torch.no_grad()
def heldout_read_loss(model, tokenizer, pairs: list[tuple[Passage, str]],
                      cfg: PretrainConfig) -> float:
    """Reading loss on held-out passages' questions, drawn with a fixed seed (comparable across
    runs)."""
    was_training = model.training
    model.eval()
    rng = random.Random(f"heldout-read/{cfg.seed}")
    chunks = [pairs[i:i + cfg.batch_size] for i in range(0, len(pairs), cfg.batch_size)]
    losses = [denoising_loss(model, reading_batch(chunk, len(chunk), tokenizer, cfg, rng))
              for chunk in chunks]
    model.train(was_training)
    return float(np.mean([loss.item() for loss in losses]))


def extend_positions(model, n: int):
    """The same BART with ``n`` learned positions: the trained ones are copied over the new
    range, as Longformer (Beltagy et al. 2020) grew RoBERTa's 512 positions, so that the
    reading stage starts from embeddings the model already uses."""
    from transformers import BartForConditionalGeneration

    config = model.config.__class__.from_dict({**model.config.to_dict(),
                                               "max_position_embeddings": n})
    state = model.state_dict()
    for part in ("encoder", "decoder"):
        key = f"model.{part}.embed_positions.weight"
        offset = 2  # BART's position table starts two rows in (BartLearnedPositionalEmbedding)
        trained = state[key][offset:]
        copies = trained.repeat(-(-n // len(trained)), 1)[:n]
        state[key] = torch.cat([state[key][:offset], copies])
    grown = BartForConditionalGeneration(config)
    grown.load_state_dict(state)
    return grown


STAGES = ("denoise", "read", "focus")
_STAGE_FIELDS = {"read": ("read_steps", "read_seq_len", "read_lr", "read_denoise"),
                 "focus": ("focus_steps", "focus_lr", "focus_window", "focus_distract",
                           "distractor_pool")}


def _stage_settings(cfg: PretrainConfig, bf16: bool, stage: str) -> dict:
    """What a stage's result depends on: a stage ignores the fields of the stages after it (so
    its checkpoints and output outlive a change of those); bf16 is named only when on, as runs
    wrote before bf16 existed, so their checkpoints still resume."""
    settings = _settings(cfg)
    settings.pop("bf16")
    later = {f for s in STAGES[STAGES.index(stage) + 1:] for f in _STAGE_FIELDS[s]}
    settings = {k: v for k, v in settings.items() if k not in later}
    if bf16:
        settings["bf16"] = True
    return settings


def pretrain(out: str | Path, cfg: PretrainConfig | None = None, work: str | Path | None = None,
             device: str | None = None, progress: bool = True) -> dict:
    """Pre-train the tiny BART — denoising, reading, focus — and export it to ``out``;
    resumable; on ``device`` (default :func:`~ragbook.config.default_device`).

    ``work`` holds the tokenizer, each stage's checkpoint and the generator each stage before
    the last one exported (``denoised/``, ``read/``), from which the next stage starts
    (default: ``out/../<name>-work``); a stage whose export is there under the same settings is
    not run again. Returns the recipe record written to ``out/pretrain.json``.
    """
    from transformers import AutoTokenizer, BartForConditionalGeneration

    cfg = cfg or PretrainConfig()
    device = device or default_device()
    out = Path(out)
    work = Path(work) if work else out.parent / f"{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    train_texts, heldout_texts = pretraining_texts(cfg.seed)
    heldout_texts = random.Random(cfg.seed).sample(heldout_texts, cfg.heldout_passages)

    if (work / "tokenizer.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(work)
    else:
        tokenizer = train_tokenizer(train_texts, cfg.vocab_size)
        tokenizer.save_pretrained(work)
    bf16 = cfg.bf16 and bf16_supported(device)  # what this run really does
    record = {"recipe": "ragbook pretrain", "config": asdict(cfg), "device": str(device),
              "bf16": bf16, "torch": torch.__version__}
    run = [s for s, n in zip(STAGES, (cfg.steps, cfg.read_steps, cfg.read_steps and
                                      cfg.focus_steps)) if n]
    exports = {"denoise": work / "denoised", "read": work / "read", run[-1]: out}

    steps = {"denoise": cfg.steps, "read": cfg.read_steps, "focus": cfg.focus_steps}

    def finished(stage: str) -> dict:
        """The record of ``stage``'s export in ``work`` if it is its last one (not one made
        every ``export_every`` steps) under these settings."""
        path = exports[stage] / "pretrain.json"
        meta = json.loads(path.read_text()) if stage != run[-1] and path.exists() else {}
        end = sum(steps[s] for s in run[:run.index(stage) + 1])
        return (meta if meta.get("settings") == _stage_settings(cfg, bf16, stage)
                and meta.get("step") == end else {})

    train_pairs, heldout_pairs = reading_pairs(cfg.seed) if len(run) > 1 else ([], [])
    heldout_pairs = random.Random(cfg.seed).sample(heldout_pairs, min(len(heldout_pairs),
                                                                       cfg.heldout_passages))
    n_denoise = round(cfg.read_denoise * cfg.batch_size)

    def reading_step(focus: bool) -> Callable:
        def make(step: int, rng: random.Random) -> list[dict[str, torch.Tensor]]:
            texts = [train_texts[rng.randrange(len(train_texts))] for _ in range(n_denoise)]
            return [reading_batch(train_pairs, cfg.batch_size - n_denoise, tokenizer, cfg, rng,
                                  focus=focus),
                    denoising_batch(texts, tokenizer, cfg, rng, seq_len=cfg.read_seq_len)]
        return make

    def measure(stage: str) -> dict:
        if stage == "denoise":
            return {"heldout_loss": heldout_loss(model, tokenizer, heldout_texts, cfg)}
        return {"heldout_loss": heldout_loss(model, tokenizer, heldout_texts, cfg),
                "heldout_read_loss": heldout_read_loss(model, tokenizer, heldout_pairs, cfg),
                "heldout_read": f"{cfg.heldout_passages} reading questions on passages of "
                                "test-split articles, fixed draw"}

    lrs = {"denoise": cfg.lr, "read": cfg.read_lr, "focus": cfg.focus_lr}
    checkpoints = {"denoise": "checkpoint.pt", "read": "reading.pt", "focus": "focus.pt"}
    batches = {"denoise": lambda step, rng: denoising_batch(
        [train_texts[rng.randrange(len(train_texts))] for _ in range(cfg.batch_size)],
        tokenizer, cfg, rng), "read": reading_step(False), "focus": reading_step(True)}
    # the latest stage already exported under these settings, if any, is where training resumes
    start, before = next(((i, meta) for i in range(len(run) - 1, -1, -1)
                          if (meta := finished(run[i]))), (-1, None))
    if before is not None:
        with quiet_loading():
            model = BartForConditionalGeneration.from_pretrained(exports[run[start]],
                                                                 dtype=torch.float32)
    else:
        torch.manual_seed(cfg.seed)
        model = BartForConditionalGeneration(tiny_config(tokenizer, cfg.d_model, cfg.layers))
    for stage in run[start + 1:]:
        if stage == "read":
            model = extend_positions(model, cfg.read_seq_len)
        if before is not None:
            summary = {k: before[k] for k in ("step", "train_loss", "heldout_loss",
                                              "heldout_read_loss", "seconds") if k in before}
            record = {**record, "stages": {**before.get("stages", {}),
                                           STAGES[STAGES.index(stage) - 1]: summary}}
        before = _train_stage(model, tokenizer, cfg, device, bf16, stage, steps[stage],
                              lrs[stage], batches[stage], work / checkpoints[stage],
                              exports[stage], _stage_settings(cfg, bf16, stage), progress,
                              functools.partial(measure, stage), record, before=before)
    return before


def _train_stage(model, tokenizer, cfg: PretrainConfig, device, bf16: bool, stage: str,
                 steps: int, lr: float, make_batches: Callable, checkpoint: Path, out: Path,
                 settings: dict, progress: bool, measure: Callable[[], dict], record: dict,
                 before: dict | None = None) -> dict:
    """One resumable pre-training stage: AdamW with warm-up and cosine decay, the batches of
    step t from ``make_batches(t, rng)`` (one batch, or a list whose token losses are averaged
    by rows), exported to ``out`` every ``export_every`` steps and at the end. ``before`` is the
    previous stage's record: its steps, seconds and history come first in this one's."""
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, cfg.warmup, steps))
    done = before or {"step": 0, "seconds": 0.0, "history": []}

    def step_fn(step: int) -> float:
        rng = random.Random(f"{cfg.seed}/{step}" if stage == "denoise" else
                            f"{cfg.seed}/{stage}/{step}")
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        batches = make_batches(step, rng)
        batches = batches if isinstance(batches, list) else [batches]
        rows = sum(len(b["input_ids"]) for b in batches)
        with autocast(device, enabled=bf16):
            loss = sum(denoising_loss(model, {k: v.to(device) for k, v in b.items()})
                       * len(b["input_ids"]) / rows for b in batches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        return loss.item()

    def export(state: dict) -> dict:
        meta = {**record, "step": done["step"] + state["step"],
                "train_loss": float(np.mean([h[1] for h in state["history"][-100:]])),
                **measure(),
                "heldout": f"{cfg.heldout_passages} passages of test-split articles, "
                           "fixed noise", "seconds": round(done["seconds"] + state["seconds"], 1),
                "parameters": sum(p.numel() for p in model.parameters()),
                "settings": settings,
                "history": [list(h) for h in done["history"]]  # as JSON reads them back
                + [[done["step"] + s, loss] for s, loss in state["history"]]}
        save_generator(model, tokenizer, out, meta)
        return meta

    def after_step(state: dict) -> None:
        if state["step"] % cfg.export_every == 0 and state["step"] < steps:
            export(state)

    state = resumable_loop(step_fn, {"model": model, "optimizer": optimizer,
                                     "scheduler": scheduler},
                           steps, checkpoint, cfg.checkpoint_every, f"pretrain ({stage})",
                           progress, after_step, settings)
    return export(state)


@dataclass
class RagTrainConfig:
    """Joint fine-tuning settings; the two ablation switches are the paper's Table 6."""

    marginalization: str = "token"  # "token" (Eq. 2) or "sequence" (Eq. 1)
    n_docs: int = 5
    steps: int = 250
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4  # generator (DESIGN: 1e-3 collapses the tiny BART)
    query_lr: float = 3e-5  # query encoder
    warmup: int = 20
    clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    freeze_retriever: bool = False  # the "frozen BERT_q" ablation


def train_rag(model, examples: list, cfg: RagTrainConfig | None = None,
              checkpoint: str | Path | None = None, progress: bool = True,
              after_step: Callable[[dict], None] | None = None) -> dict:
    """Jointly fine-tune ``model`` (a :class:`ragbook.pipeline.RagModel`) on ``examples``.

    AdamW with warm-up and cosine decay, gradient accumulation and clipping, bf16 autocast on
    CUDA (``config.autocast``: ``RAGBOOK_BF16=0`` turns it off). Resumable from
    ``checkpoint``; the batch of step t depends only on (seed, t), so CPU runs repeat exactly.
    ``after_step(state)`` runs after every step (e.g. a dev evaluation, ``ragbook finetune``).
    Returns the loop state: ``history`` of (step, loss) and ``seconds``.

    Under ``accelerate launch`` (more than one process) the same call is data-parallel: every
    rank draws the same global batch of step t and trains on its own ``batch_size / ranks``
    slice, retrieving from its own copy of the frozen index (open it with ``mmap=True`` so
    that ranks on one machine share its pages); the gradients are averaged across ranks (one
    all-reduce per optimizer step) before clipping, so the update is the single-process one
    up to float summation order (and dropout, whose masks each rank draws for its slice). The
    loss history is gathered (``gather_for_metrics``) and the checkpoint written by the main
    rank only. Without the launcher Accelerate is not even imported.
    """
    cfg = cfg or RagTrainConfig()
    if not examples:
        raise ValueError("train_rag needs at least one training example")
    accelerator = _accelerator()
    ranks = accelerator.num_processes if accelerator else 1
    if cfg.batch_size % ranks:
        raise ValueError(f"batch_size {cfg.batch_size} does not split evenly across {ranks} "
                         "processes; choose a multiple of the number of processes")
    if accelerator:
        model.to(accelerator.device)
    local = slice(accelerator.process_index * cfg.batch_size // ranks,
                  (accelerator.process_index + 1) * cfg.batch_size // ranks) \
        if accelerator else slice(None)
    train_retriever = not cfg.freeze_retriever and model.index is not None
    model.query_encoder.requires_grad_(train_retriever)
    groups = [{"params": list(model.generator.parameters()), "lr": cfg.lr}]
    if train_retriever:
        groups.append({"params": list(model.query_encoder.parameters()), "lr": cfg.query_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, cfg.warmup, cfg.steps))
    device = model.device
    # bf16 on a GPU; on a CPU the joint step's small matrices gain little (benchmarks/README.md),
    # so CPU runs stay fp32 and repeat the shipped results
    mixed = device.type == "cuda"
    params = [p for g in groups for p in g["params"]]
    model.train()
    if not train_retriever:
        model.query_encoder.eval()

    def step_fn(step: int) -> float:
        rng = random.Random(f"{cfg.seed}/{step}")
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(cfg.grad_accum):
            batch = [examples[rng.randrange(len(examples))] for _ in range(cfg.batch_size)]
            with autocast(device, enabled=mixed):
                losses = model.loss(batch[local], cfg.marginalization, cfg.n_docs,
                                    train_retriever=train_retriever)
                loss = losses.mean() / cfg.grad_accum
            loss.backward()
            if accelerator:  # the global batch's mean loss, as one process would log it
                loss = accelerator.gather_for_metrics(losses.detach()).mean() / cfg.grad_accum
            total += loss.item()
        if accelerator:
            _average_gradients(accelerator, params)
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        optimizer.step()
        scheduler.step()
        return total

    stateful = {"generator": model.generator, "query_encoder": model.query_encoder,
                "optimizer": optimizer, "scheduler": scheduler}
    state = resumable_loop(step_fn, stateful, cfg.steps, checkpoint, cfg.checkpoint_every,
                           f"RAG-{cfg.marginalization.capitalize()}", progress,
                           after_step, settings=_settings(cfg),
                           writer=accelerator.is_main_process if accelerator else True)
    if accelerator:
        accelerator.wait_for_everyone()  # the main rank's checkpoint is complete for all
    model.eval()
    return state


def _accelerator():
    """An ``accelerate.Accelerator`` when the process is one of several started by
    ``accelerate launch`` (or torchrun), else None: single-process runs stay as they were."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator()


def _average_gradients(accelerator, params: list) -> None:
    """Replace each rank's gradients by their mean over the ranks, in one all-reduce.

    This is what DistributedDataParallel does after backward; RAG's loss calls the
    generator and the query encoder inside :meth:`RagModel.loss`, not through a ``forward``
    a DDP wrapper could hook, so the reduction is done here, once per optimizer step
    (after gradient accumulation, like DDP's ``no_sync``).
    """
    grads = [p.grad for p in params if p.grad is not None]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for g, mean in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(mean.view_as(g))


def generator_fingerprint(name: str) -> str:
    """Identify a generator's weights, so cached fine-tuned models follow a re-pretraining."""
    from .generator import SHIPPED

    if name != "tiny":
        return name
    import hashlib

    return hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest()[:16]


def encoder_fingerprint(name: str) -> str:
    """Identify a query encoder's weights: a hash of its safetensors file when ``name`` is a
    directory that holds one (a fine-tuned BERT_q), else the name (a hub checkpoint)."""
    import hashlib

    weights = Path(name) / "model.safetensors"
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16] if weights.is_file() else name


def trained_rag(preset, task: str = "entity-qa", cfg: RagTrainConfig | None = None,
                retriever: str = "dense", progress: bool = True, query_encoder=None):
    """A jointly fine-tuned :class:`~ragbook.pipeline.RagModel`, trained once and cached.

    ``query_encoder``: the BERT_q to start from (an :class:`~ragbook.retriever.Encoder` saved
    on disk, e.g. :func:`~ragbook.retriever.trained_query_encoder`'s supervised one, the
    analogue of the paper's DPR initialisation); default the preset's. It is not modified: the
    run trains a copy loaded from its path, and the cache key holds a hash of its weights.
    The run's checkpoint lives beside the cache entry, so an interrupted training resumes;
    it is deleted once the model is cached.
    """
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from .artifacts import artifact_path, cached
    from .data import load_task
    from .pipeline import RagModel
    from .retriever import Encoder

    cfg = cfg or RagTrainConfig(n_docs=preset.n_docs, seed=preset.seed)
    params = {"preset": preset.to_dict(), "task": task, "train": asdict(cfg),
              "retriever": retriever, "generator": generator_fingerprint(preset.generator)}
    if query_encoder is not None:  # absent otherwise: earlier cache entries keep their keys
        params["query_encoder"] = encoder_fingerprint(query_encoder.name)
    run_dir = artifact_path("rag-run", params)

    def build(out: Path) -> None:
        start = None if query_encoder is None else Encoder(
            query_encoder.name, pooling=preset.pooling, normalize=preset.normalize,
            max_length=preset.max_query_length)
        model = RagModel.from_preset(preset, retriever=retriever, query_encoder=start)
        run_dir.mkdir(parents=True, exist_ok=True)
        state = train_rag(model, load_task(task, "train", preset.seed), cfg,
                          checkpoint=run_dir / "checkpoint.pt", progress=progress)
        model.generator.save_pretrained(out / "generator")
        model.tokenizer.save_pretrained(out / "generator")
        model.query_encoder.save_pretrained(out / "query_encoder")
        atomic_write_bytes(out / "history.json", json.dumps(state).encode())

    path = cached("rag-model", params, build)
    shutil.rmtree(run_dir, ignore_errors=True)  # the model is cached: its checkpoint can go
    with quiet_loading():
        generator = BartForConditionalGeneration.from_pretrained(path / "generator",
                                                                 dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path / "generator")
    query_encoder = Encoder(str(path / "query_encoder"), pooling=preset.pooling,
                            normalize=preset.normalize, max_length=preset.max_query_length)
    model = RagModel.from_preset(preset, retriever=retriever, query_encoder=query_encoder,
                                 generator=generator, tokenizer=tokenizer)
    model.history = json.loads((path / "history.json").read_text())["history"]
    return model.eval()


def trained_closed_book(preset, task: str = "entity-qa", steps: int = 500,
                        progress: bool = True):
    """The paper's BART baseline: the generator fine-tuned on (x, y) with no retrieval,
    trained once and cached. Returns ``(model, tokenizer)``."""
    from transformers import AutoTokenizer, BartForConditionalGeneration

    from .artifacts import cached
    from .data import load_task
    from .generator import finetune_closed_book, load_generator

    params = {"preset": preset.to_dict(), "task": task, "steps": steps,
              "generator": generator_fingerprint(preset.generator)}

    def build(out: Path) -> None:
        model, tokenizer = load_generator(preset.generator)
        history = finetune_closed_book(
            model, tokenizer, load_task(task, "train", preset.seed), steps=steps,
            batch_size=32, max_source_length=preset.max_source_length,
            max_target_length=preset.max_target_length, seed=preset.seed, progress=progress)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        atomic_write_bytes(out / "history.json", json.dumps(history).encode())

    path = cached("closed-book", params, build)
    with quiet_loading():
        model = BartForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        return model.to(default_device()).eval(), AutoTokenizer.from_pretrained(path)
