"""The generator p_θ: tokenizer, input/target encoding, batched log-probs, closed-book training,
BART's noising functions, resumable pre-training and the shipped tiny BART."""

import copy
import json
import math
import random
import warnings
from collections import Counter

import pytest
import torch
from transformers import BartForConditionalGeneration
from transformers.utils import logging as hf_logging

from ragbook import cli, data, generator, train
from ragbook.config import bf16_supported
from ragbook.data import Example, Passage, load_corpus
from ragbook.generator import (
    encode_inputs,
    encode_targets,
    format_input,
    shift_right,
    tiny_config,
    token_logprobs,
    train_tokenizer,
)

ODD_TEXTS = [
    "Paris is the capital and largest city of France.",
    "Héllo wörld — 3.14 ✓ 🙂 tabs\tand  double  spaces\nand a new line.",
    "Ἀθῆναι, 東京, Москва: cities (population ≈ 1e7).",
    "trailing space ",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tok():
    texts = [p.text for p in load_corpus()[:300]]
    return train_tokenizer(texts, vocab_size=300)


@pytest.fixture(scope="module")
def tiny_bart(tok):
    torch.manual_seed(0)
    return BartForConditionalGeneration(tiny_config(tok, d_model=32, layers=1)).eval()


# ----------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_text_exactly(tok):
    for text in ODD_TEXTS:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert tok.unk_token_id not in ids  # byte-level: every byte has a piece
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_saved_tokenizer_with_a_plain_byte_level_decoder_is_fixed_on_load(tok, tmp_path):
    from tokenizers import decoders
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    old = AutoTokenizer.from_pretrained(tmp_path)
    old.backend_tokenizer.decoder = decoders.ByteLevel()  # as the first shipped tokenizer had
    ids = old(ODD_TEXTS[0])["input_ids"]
    assert old.decode(ids, skip_special_tokens=True) == " " + ODD_TEXTS[0]
    assert generator._fix_decoding(old).decode(ids, skip_special_tokens=True) == ODD_TEXTS[0]


# ----------------------------------------------------------------- inputs and targets


def test_encode_inputs_matches_format_input_when_nothing_is_cut(tok):
    p = Passage("p", "Paris", "Paris is the capital of France.")
    enc = encode_inputs(tok, [p, None], ["Which city?", "Who wrote Hamlet?"], max_length=128)
    for row, mask, text in zip(enc["input_ids"], enc["attention_mask"],
                               [format_input(p, "Which city?"), "Who wrote Hamlet?"]):
        assert row[mask.bool()].tolist() == tok(text)["input_ids"]


def test_encode_inputs_cuts_the_passage_never_the_question(tok):
    long = Passage("p", "Long", " ".join(["word"] * 400))
    question = "which article is this?"
    assert len(tok(question)["input_ids"]) < 30
    enc = encode_inputs(tok, [long, None], [question, question], max_length=40)
    assert enc["input_ids"].shape == (2, 40)
    assert enc["attention_mask"][1].sum() < 30  # closed book: the question alone, padded
    row = enc["input_ids"][0].tolist()
    assert len(row) == 40 and row[0] == tok.bos_token_id and row[-1] == tok.eos_token_id
    text = tok.decode(row, skip_special_tokens=True)
    assert text.endswith(" // " + question)  # the separator and the whole question survive
    assert text.startswith("Long / word word")
    # a question longer than the budget on its own is cut, still within max_length
    enc = encode_inputs(tok, [long], [question * 10], max_length=40)
    assert enc["input_ids"].shape == (1, 40)
    with pytest.raises(ValueError, match="one passage"):
        encode_inputs(tok, [long], [question, question], max_length=40)


def test_encode_targets_end_with_eos_and_mask_padding(tok):
    out = encode_targets(tok, ["Paris", "the capital of France and its largest city"], 6)
    labels, mask = out["labels"], out["target_mask"]
    assert labels.shape == (2, 6) and mask.dtype == torch.bool
    for row, m in zip(labels, mask):
        assert row[m][-1] == tok.eos_token_id  # the last scored token is </s>
        assert (row[~m] == tok.pad_token_id).all()
        assert m.tolist() == sorted(m.tolist(), reverse=True)  # padding only at the end
    assert mask[1].all()  # the long target was cut to 5 pieces + </s>
    assert tok.decode(labels[0][mask[0]], skip_special_tokens=True) == "Paris"


def test_shift_right():
    labels = torch.tensor([[5, 6, 2], [7, 2, -100]])
    assert shift_right(labels, 2, 1).tolist() == [[2, 5, 6], [2, 7, 2]]
    assert shift_right(torch.tensor([[5, -100, -100]]), 2, 1).tolist() == [[2, 5, 1]]


# ----------------------------------------------------------------- log-probs


def test_token_logprobs_equals_a_loop_over_documents(tok, tiny_bart):
    questions = ["Which city is the capital of France?", "Who wrote Hamlet?"]
    passages = [Passage(str(i), f"T{i}", "some text " * (i + 1)) for i in range(3)]
    k = len(passages)
    enc = encode_inputs(tok, [p for _ in questions for p in passages],
                        [q for q in questions for _ in passages], max_length=40)
    tgt = encode_targets(tok, ["Paris", "William Shakespeare"], 10)
    lp = token_logprobs(tiny_bart, enc["input_ids"], enc["attention_mask"], tgt["labels"])
    assert lp.shape == (2, k, tgt["labels"].shape[1])
    assert (lp <= 0).all()
    with torch.no_grad():
        for b in range(2):
            for j in range(k):
                row = b * k + j
                ids = enc["input_ids"][row][enc["attention_mask"][row].bool()][None]  # unpadded
                one = token_logprobs(tiny_bart, ids, torch.ones_like(ids), tgt["labels"][b:b + 1])
                m = tgt["target_mask"][b]
                torch.testing.assert_close(lp[b, j][m], one[0, 0][m], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="inputs for 2 targets"):
        token_logprobs(tiny_bart, enc["input_ids"][:5], enc["attention_mask"][:5], tgt["labels"])


# ----------------------------------------------------------------- closed book


def test_closed_book_fine_tuning_memorises_and_is_deterministic(tok):
    examples = [Example("where does the cat sit?", ["mat"]),
                Example("what is the capital of France?", ["Paris"])]

    def run(steps):
        torch.manual_seed(0)
        model = BartForConditionalGeneration(tiny_config(tok, d_model=32, layers=1))
        history = generator.finetune_closed_book(model, tok, examples, steps=steps,
                                                 batch_size=2, lr=3e-3, seed=0, progress=False)
        return model, history

    model, history = run(60)
    assert len(history) == 60 and history[-1] < 0.2 * history[0]
    assert not model.training
    answers = generator.generate_answers(model, tok, [e.question for e in examples],
                                         num_beams=2, max_length=8)
    assert answers == ["mat", "Paris"]
    assert run(5)[1] == history[:5]  # same seed, same batches and dropout
    with pytest.raises(ValueError, match="passages for"):
        generator.generate_answers(model, tok, ["q"], passages=[None, None])


def test_closed_book_answers_are_cut_as_training_targets_are(tok, tiny_bart):
    """``max_length`` tokens with the end token, the last one the end token and nothing forced
    first: what ``encode_targets(…, max_length)`` makes of the longest target, whatever the
    checkpoint's generation config says (here: no forced end, bart-large's forced ``<s>``)."""
    model = copy.deepcopy(tiny_bart)
    model.final_logits_bias[0, tok.eos_token_id] = -30.0  # never chosen: answers run to the end
    model.generation_config.forced_eos_token_id = None
    model.generation_config.forced_bos_token_id = tok.bos_token_id
    outputs, generate = [], model.generate
    model.generate = lambda **kw: outputs.append(generate(**kw)) or outputs[-1]
    longest = encode_targets(tok, ["word " * 50], 6)["labels"][0].tolist()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        generator.generate_answers(model, tok, ["where?", "who?"], num_beams=2, max_length=6)
    for row in outputs[0].tolist():  # [decoder start, y_1 … y_T]
        answer = row[1:]
        assert len(answer) == len(longest) == 6 and answer[-1] == longest[-1] == tok.eos_token_id
        assert tok.bos_token_id not in answer
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


@pytest.fixture
def progress_bars():
    """transformers' progress bars on, as a user has them by default; then as they were."""
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()


def test_load_generator_shows_no_loading_bar_and_leaves_the_setting_alone(
        tok, tiny_bart, tmp_path, capfd, progress_bars):
    tiny_bart.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    BartForConditionalGeneration.from_pretrained(tmp_path)
    assert "Loading weights" in capfd.readouterr().err  # what the user would see otherwise
    for shown in (True, False):
        (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
        model, _ = generator.load_generator(str(tmp_path))
        out = capfd.readouterr()
        assert "Loading weights" not in out.err + out.out
        assert hf_logging.is_progress_bar_enabled() == shown
    torch.testing.assert_close(model.lm_head.weight, tiny_bart.lm_head.weight)


# ----------------------------------------------------------------- BART's noise


def test_sentence_permutation_shuffles_whole_sentences_deterministically():
    text = "One is here. Two is there! Three? Four is last."
    sentences = train.split_sentences(text)
    assert sentences == ["One is here.", "Two is there!", "Three?", "Four is last."]
    out = train.sentence_permutation(sentences, random.Random(1))
    assert sorted(out) == sorted(sentences) and sentences[0] == "One is here."  # a copy
    assert train.sentence_permutation(sentences, random.Random(1)) == out
    outs = {tuple(train.sentence_permutation(sentences, random.Random(s))) for s in range(10)}
    assert len(outs) > 1
    assert train.split_sentences("No full stop here") == ["No full stop here"]


def test_denoising_target_is_the_original_text_and_the_source_its_permuted_noised_window():
    """BART corrupts, then reconstructs the original: the decoded target is a contiguous,
    in-order piece of its passage, while the source holds the same tokens, sentences shuffled
    and spans masked."""
    texts = ["Alpha beta gamma delta. Epsilon zeta eta theta! Iota kappa lambda mu? "
             "Nu xi omicron pi. Rho sigma tau upsilon.",
             "A single sentence with no end mark at all and many words to cut a window from"] * 4
    tok = generator.train_tokenizer(texts * 5, vocab_size=300)
    cfg = train.PretrainConfig(seq_len=14)
    permuted_once = False
    for seed in range(8):
        batch = train.denoising_batch(texts, tok, cfg, random.Random(seed))
        for i, text in enumerate(texts):
            target = batch["labels"][i][batch["target_mask"][i]].tolist()
            assert target[-1] == tok.eos_token_id and len(target) <= cfg.seq_len - 1
            assert tok.decode(target[:-1]) in text  # contiguous and in order
            source = [t for t in batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
                      if t not in (tok.bos_token_id, tok.eos_token_id, tok.mask_token_id)]
            assert Counter(source) <= Counter(target[:-1])  # the same tokens, some masked
            kept = [t for t in target[:-1] if t in source]
            permuted_once |= source != kept[:len(source)]
    assert permuted_once  # the sentences of a window do get shuffled


def test_text_infilling_masks_about_thirty_percent_in_spans():
    ids, mask_id = list(range(5, 1005)), 4
    for seed in range(5):
        out = train.text_infilling(ids, mask_id, random.Random(seed))
        kept = [t for t in out if t != mask_id]
        removed = 1 - len(kept) / len(ids)
        assert 0.2 <= removed <= 0.3  # overlapping and empty spans keep it a little under 0.3
        n_masks = out.count(mask_id)
        assert 0 < n_masks < len(ids) - len(kept)  # spans: fewer masks than masked tokens
        assert kept == sorted(kept)  # the rest keeps its order
        assert train.text_infilling(ids, mask_id, random.Random(seed)) == out
    assert train.text_infilling(ids, mask_id, random.Random(0)) != out


# ----------------------------------------------------------------- resumable pre-training


TINY = dict(d_model=32, layers=1, vocab_size=300, steps=4, batch_size=4, seq_len=16,
            warmup=2, checkpoint_every=3, export_every=3, heldout_passages=4, read_steps=5,
            read_seq_len=40, focus_steps=4)


class _StopAt:
    """A stand-in for tqdm whose update raises ``error`` once ``step`` steps of the loop named
    ``desc`` are done."""

    def __init__(self, desc, step, error):
        self.desc, self.step, self.error = desc, step, error

    def __call__(self, *args, initial=0, desc=None, **kwargs):
        self.n, self.armed = initial, desc == self.desc
        return self

    def update(self, k):
        self.n += k
        if self.armed and self.n == self.step:
            raise self.error

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def small_texts():
    train_texts, heldout = train.pretraining_texts(0)
    return train_texts[:300], heldout[:20]


@pytest.mark.parametrize("stop", [("denoise", "checkpoint.pt", 3, KeyboardInterrupt),
                                  ("read", "reading.pt", 4, RuntimeError),
                                  ("focus", "focus.pt", 3, KeyboardInterrupt)],
                         ids=["interrupted-denoising", "crashed-reading", "interrupted-focus"])
def test_pretraining_resumes_exactly(tmp_path, monkeypatch, small_texts, stop):
    monkeypatch.setattr(train, "pretraining_texts", lambda seed: small_texts)
    cfg = train.PretrainConfig(**TINY)
    straight = train.pretrain(tmp_path / "a", cfg, work=tmp_path / "a-work", progress=False)

    stage, checkpoint, step, error = stop
    with monkeypatch.context() as m:
        m.setattr(train, "tqdm", _StopAt(f"pretrain ({stage})", step, error))
        with pytest.raises(error):
            train.pretrain(tmp_path / "b", cfg, work=tmp_path / "b-work", progress=False)
    # Ctrl-C checkpoints where it stopped; a crash falls back to the last scheduled checkpoint
    saved = torch.load(tmp_path / "b-work" / checkpoint, weights_only=True)
    assert saved["state"]["step"] == 3
    resumed = train.pretrain(tmp_path / "b", cfg, work=tmp_path / "b-work", progress=False)

    total = cfg.steps + cfg.read_steps + cfg.focus_steps
    assert resumed["step"] == straight["step"] == total
    assert len(resumed["history"]) == total
    assert resumed["history"] == straight["history"]
    untimed = [{s: {k: v for k, v in r.items() if k != "seconds"} for s, r in run.items()}
               for run in (resumed["stages"], straight["stages"])]
    assert untimed[0] == untimed[1] and list(resumed["stages"]) == ["denoise", "read"]
    assert resumed["heldout_loss"] == straight["heldout_loss"]
    assert resumed["heldout_read_loss"] == straight["heldout_read_loss"]
    for name in ("checkpoint.pt", "reading.pt", "focus.pt"):  # each stage's weights, bit for bit
        a = torch.load(tmp_path / "a-work" / name, weights_only=True)["model"]
        b = torch.load(tmp_path / "b-work" / name, weights_only=True)["model"]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "b" / "pretrain.json").read_text())["step"] == resumed["step"]
    grown = BartForConditionalGeneration.from_pretrained(tmp_path / "b")
    assert grown.config.max_position_embeddings == cfg.read_seq_len


def test_each_stage_starts_from_the_finished_stage_before_it(tmp_path, monkeypatch,
                                                              small_texts):
    """A new focus stage reuses the read generator, a new reading stage the denoised one;
    another denoising recipe reuses nothing."""
    monkeypatch.setattr(train, "pretraining_texts", lambda seed: small_texts)
    first = train.pretrain(tmp_path / "g", train.PretrainConfig(**TINY), progress=False)
    n_read = TINY["steps"] + TINY["read_steps"]

    other_focus = train.PretrainConfig(**{**TINY, "focus_steps": 2, "focus_lr": 1e-3})
    with pytest.raises(ValueError, match="other settings"):  # the focus checkpoint refuses
        train.pretrain(tmp_path / "g", other_focus, progress=False)
    (tmp_path / "g-work" / "focus.pt").unlink()  # a new focus recipe starts afresh
    again = train.pretrain(tmp_path / "g", other_focus, progress=False)
    assert again["stages"] == first["stages"]
    assert again["history"][:n_read] == first["history"][:n_read]
    assert len(again["history"]) == n_read + 2

    other_reading = train.PretrainConfig(**{**TINY, "read_steps": 2, "read_lr": 1e-3})
    with pytest.raises(ValueError, match="other settings"):  # the reading checkpoint refuses
        train.pretrain(tmp_path / "g", other_reading, progress=False)
    for name in ("reading.pt", "focus.pt"):  # a new reading recipe starts both afresh
        (tmp_path / "g-work" / name).unlink()
    again = train.pretrain(tmp_path / "g", other_reading, progress=False)
    assert again["stages"]["denoise"] == first["stages"]["denoise"]
    assert again["history"][:TINY["steps"]] == first["history"][:TINY["steps"]]
    assert len(again["history"]) == TINY["steps"] + 2 + TINY["focus_steps"]
    other_denoising = train.PretrainConfig(**{**TINY, "lr": 1e-3})
    with pytest.raises(ValueError, match="other settings"):  # its checkpoint refuses it
        train.pretrain(tmp_path / "g", other_denoising, progress=False)


def test_extended_positions_keep_the_trained_ones_and_copy_them_onwards():
    texts = ["Some words for a tokenizer to learn from."] * 20
    tok = generator.train_tokenizer(texts, vocab_size=300)
    model = BartForConditionalGeneration(generator.tiny_config(tok, 16, 1, max_positions=8))
    grown = train.extend_positions(model, 20).eval()
    model.eval()
    old = model.model.encoder.embed_positions.weight
    new = grown.model.encoder.embed_positions.weight
    assert new.shape == (20 + 2, 16)
    assert torch.equal(new[:10], old) and torch.equal(new[10:18], old[2:])
    ids = torch.tensor([tok("Some words for a")["input_ids"]])  # fits the old 8 positions
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, grown(input_ids=ids).logits)


def test_reading_batches_read_their_span_from_the_passage_in_the_input():
    tok = generator.load_generator("tiny")[1]
    pairs, heldout = train.reading_pairs(0)
    assert {p.title for p, _ in pairs}.isdisjoint(p.title for p, _ in heldout)
    cfg = train.PretrainConfig()
    batch = train.reading_batch(pairs, 16, tok, cfg, random.Random(0))
    assert batch["input_ids"].shape[0] == 16 and batch["input_ids"].shape[1] <= cfg.read_seq_len
    for source, target, mask in zip(batch["input_ids"], batch["labels"], batch["target_mask"]):
        text = tok.decode(source, skip_special_tokens=True)
        passage, question = text.split(" // ")
        span = tok.decode(target[mask], skip_special_tokens=True)
        assert span in passage and data.BLANK in question


def test_the_focus_stage_narrows_passages_to_the_questions_sentence_and_its_neighbours():
    tok = generator.load_generator("tiny")[1]
    pairs, _ = train.reading_pairs(0)
    cfg = train.PretrainConfig(focus_distract=0.0)
    focus = train.reading_batch(pairs, 64, tok, cfg, random.Random(0), focus=True)
    widths = []
    for source, target, mask in zip(focus["input_ids"], focus["labels"], focus["target_mask"]):
        text = tok.decode(source, skip_special_tokens=True)
        passage, question = text.split(" // ")
        assert tok.decode(target[mask], skip_special_tokens=True) in passage
        widths.append(len(data.split_sentences(passage.split(" / ", 1)[1])))
    assert min(widths) == 1 and max(widths) > 2 * cfg.focus_window - 1  # narrowed, or whole

    passage = data.Passage("p", "T", "One two three. Four 1990 five. Six 1990 seven eight. Nine.")
    assert train.focused(passage, "it: Six _____ seven", "1990", 0).text == (
        "Six 1990 seven eight.")  # of the sentences holding the span, the question's
    assert train.focused(passage, "it: Four _____ five", "1990", 1).text == (
        "One two three. Four 1990 five. Six 1990 seven eight.")


def test_focus_distractors_are_near_misses_from_other_articles():
    nile = data.Passage("a", "Nile", "The Nile flows north through Egypt to the sea.")
    pairs = [(nile, "river"), (data.Passage("b", "Banana", "Bananas grow in warm lands."), "fruit"),
             (data.Passage("c", "Delta", "The Nile delta floods every summer in Egypt."), "land")]
    question = "river: The Nile flows north through _____ to the sea."
    rng = random.Random(0)
    picked = {train.distractor(pairs, question, "Nile", 8, rng).title for _ in range(20)}
    assert picked == {"Delta"}  # never the question's own article; the one sharing its words

    tok = generator.load_generator("tiny")[1]
    train_pairs, _ = train.reading_pairs(0)
    cfg = train.PretrainConfig(focus_distract=1.0)
    batch = train.reading_batch(train_pairs, 32, tok, cfg, random.Random(0), focus=True)
    sources = tok.batch_decode(batch["input_ids"], skip_special_tokens=True)
    spans = [tok.decode(t[m], skip_special_tokens=True)
             for t, m in zip(batch["labels"], batch["target_mask"])]
    # the span is still the target, but (almost always) not in the passage given
    assert sum(span in src.split(" // ")[0] for src, span in zip(sources, spans)) <= 4


def test_an_interrupted_generator_export_leaves_the_previous_one(tmp_path, monkeypatch):
    """save_generator writes all or nothing: a crash half-way through an export (here in the
    tokenizer, after the weights) keeps the generator that was there, and it still loads."""
    texts = ["Some words for a tokenizer to learn from."] * 20
    tok = generator.train_tokenizer(texts, vocab_size=300)
    model = BartForConditionalGeneration(generator.tiny_config(tok, 16, 1))
    out = tmp_path / "gen"
    train.save_generator(model, tok, out, {"step": 1})
    before = (out / "model.safetensors").read_bytes()

    torch.nn.init.ones_(model.model.shared.weight)  # new weights that must not land
    monkeypatch.setattr(type(tok), "save_pretrained",
                        lambda self, path: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        train.save_generator(model, tok, out, {"step": 2})
    assert (out / "model.safetensors").read_bytes() == before
    assert json.loads((out / "pretrain.json").read_text()) == {"step": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]  # no temporary left behind
    BartForConditionalGeneration.from_pretrained(out)


@pytest.mark.skipif(not bf16_supported("cpu"), reason="this CPU has no native bf16")
def test_pretraining_in_bf16_runs_under_autocast_and_records_it(tmp_path, monkeypatch,
                                                                 small_texts):
    monkeypatch.setattr(train, "pretraining_texts", lambda seed: small_texts)
    monkeypatch.setenv("RAGBOOK_BF16", "1")
    seen, real = [], train.denoising_loss

    def spy(model, batch):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(model, batch)

    monkeypatch.setattr(train, "denoising_loss", spy)
    for bf16 in (True, False):
        seen.clear()
        cfg = train.PretrainConfig(**{**TINY, "steps": 2, "read_steps": 0, "bf16": bf16})
        meta = train.pretrain(tmp_path / str(bf16), cfg, progress=False)
        assert meta["bf16"] is bf16 and math.isfinite(meta["heldout_loss"])
        assert seen[:2] == [bf16, bf16]  # the training steps; the held-out loss stays fp32
        assert not any(seen[2:])
    with pytest.raises(ValueError, match="other settings"):  # a run never changes precision
        train.pretrain(tmp_path / "True",
                       train.PretrainConfig(**{**TINY, "steps": 2, "read_steps": 0,
                                               "bf16": False}),
                       work=tmp_path / "True-work", progress=False)
    # an fp32 run's settings are those written before bf16 existed: old checkpoints resume
    saved = torch.load(tmp_path / "False-work" / "checkpoint.pt", weights_only=True)
    assert "bf16" not in saved["state"]["settings"]


def test_cli_pretrain_defaults_to_the_shipped_recipe(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(train, "pretrain", lambda out, cfg, work, device: seen.append(cfg) or
                        {"step": cfg.steps, "heldout_loss": 1.0})
    assert cli.main(["pretrain", "--out", str(tmp_path)]) == 0
    assert cli.main(["pretrain", "--out", str(tmp_path), "--steps", "7", "--no-bf16"]) == 0
    assert seen[0] == train.PretrainConfig()
    assert seen[1] == train.PretrainConfig(steps=7, bf16=False)


# ----------------------------------------------------------------- the shipped generator


@pytest.mark.skipif(not (generator.SHIPPED / "config.json").exists(),
                    reason="no shipped generator yet: run `ragbook pretrain`")
def test_shipped_generator_loads_and_reproduces_its_heldout_loss():
    model, tok = generator.load_generator("tiny")
    meta = json.loads((generator.SHIPPED / "pretrain.json").read_text())
    cfg = train.PretrainConfig(**meta["config"])
    assert meta["recipe"] == "ragbook pretrain"
    assert meta["step"] == cfg.steps + cfg.read_steps + cfg.focus_steps
    assert cfg == train.PretrainConfig()  # `ragbook pretrain` with no options remakes it
    assert model.config.max_position_embeddings == cfg.read_seq_len
    assert len(tok) == model.config.vocab_size == cfg.vocab_size
    assert sum(p.numel() for p in model.parameters()) == meta["parameters"]
    assert (generator.SHIPPED / "model.safetensors").stat().st_size <= 25_000_000
    for text in ODD_TEXTS:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text

    _, heldout = train.pretraining_texts(cfg.seed)  # chosen exactly as `pretrain` chose them
    heldout = random.Random(cfg.seed).sample(heldout, cfg.heldout_passages)
    loss = train.heldout_loss(model, tok, heldout, cfg)
    assert loss == pytest.approx(meta["heldout_loss"], rel=1e-3)
    _, pairs = train.reading_pairs(cfg.seed)
    pairs = random.Random(cfg.seed).sample(pairs, cfg.heldout_passages)
    loss = train.heldout_read_loss(model, tok, pairs, cfg)
    assert loss == pytest.approx(meta["heldout_read_loss"], rel=1e-3)
