"""Metrics against hand-computed values; the verification runner and the closed-book
baseline on stand-in and tiny models."""

import pytest
import torch
from transformers import BartForConditionalGeneration

from ragbook import evaluate as ev
from ragbook.config import Preset
from ragbook.data import Example, Passage
from ragbook.generator import encode_targets, tiny_config, train_tokenizer


def test_squad_normalisation_and_exact_match():
    assert ev.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert ev.exact_match("the Beatles", ["Beatles"]) == 1.0
    assert ev.exact_match("Ann's", ["Anns", "x"]) == 1.0
    assert ev.exact_match("Beatle", ["Beatles"]) == 0.0


def test_hits_at_k_are_what_recall_at_k_averages():
    a, b, c = (Passage(f"{t}::0", t, "…") for t in "ABC")
    examples = [Example("q1", ["A"], article="A"), Example("q2", ["C"], article="C")]
    hits = ev.hits_at_k([[b, a, c], [a, b, c]], examples, ks=(1, 2, 3))
    assert [list(hits[k]) for k in (1, 2, 3)] == [[False, False], [True, False], [True, True]]
    assert ev.recall_at_k([[b, a, c], [a, b, c]], examples, ks=(1, 2, 3)) == \
        {1: 0.0, 2: 0.5, 3: 1.0}


def test_the_paired_standard_error_and_the_verdict_it_gives():
    a = [1, 1, 1, 0] * 25  # 100 questions
    d, se = ev.paired_difference(a, a)
    assert d == 0 and se == 0 and ev.compare(a, a) == "≈"
    b = [0, 1, 1, 0] * 25  # a wins on 25 questions, never loses: d = 0.25
    d, se = ev.paired_difference(a, b)
    expected = (0.25 * 0.75 / 99) ** 0.5  # sd of 0/1 differences with ddof=1, over √100
    assert d == pytest.approx(0.25) and se == pytest.approx(expected)
    assert ev.compare(a, b) == ">" and ev.compare(b, a) == "<"
    one_win = [1] + [0] * 99  # one question in a hundred: inside the noise
    assert ev.compare(one_win, [0] * 100) == "≈"
    assert ev.standard_error(0.5, 100) == pytest.approx(0.05)


def test_hot_swap_misses_are_told_apart_by_where_the_edited_passage_stood():
    misses = [{"edited_rank": None}, {"edited_rank": 1}, {"edited_rank": 3}, {"edited_rank": None}]
    assert ev.miss_kinds({"misses": misses}) == {"not retrieved": 2, "retrieved, outranked": 1,
                                                 "first, but the answer miscopied": 1}


def test_f1_is_max_over_answers():
    assert ev.f1_score("new york city", ["york", "new york city"]) == 1.0
    assert ev.f1_score("new york", ["new york city"]) == pytest.approx(0.8)
    assert ev.f1_score("paris", ["london"]) == 0.0


def test_recall_at_k_by_article_or_answer_string():
    a, b = Passage("a::0", "A", "about a"), Passage("b::0", "B", "mentions Zeus here")
    examples = [Example("q1", ["A"], article="A"), Example("q2", ["zeus"])]
    got = ev.recall_at_k([[b, a], [a, b]], examples, ks=(1, 2))
    assert got == {1: 0.0, 2: 1.0}
    assert ev.recall_at_k([[a, b], [b, a]], examples, ks=(1,)) == {1: 1.0}


def test_bleu1_is_unigram_precision_times_brevity_penalty():
    assert ev.bleu1(["a b c d"], [["a b c d"]]) == pytest.approx(1.0)
    assert ev.bleu1(["a b x y"], [["a b c d"]]) == pytest.approx(0.5)
    # 2 of 2 unigrams right, but half the reference length: BP = exp(1 - 4/2)
    assert ev.bleu1(["a b"], [["a b c d"]]) == pytest.approx(0.36788, abs=1e-4)


def test_accuracy_and_prediction_files(tmp_path):
    examples = [Example("c1", ["SUPPORTS"]), Example("c2", ["REFUTES"])]
    assert ev.accuracy(["supports", "SUPPORTS"], examples) == 0.5
    preds = [ev.Prediction("q", "The Beatles", ["Beatles"], [{"id": "x", "posterior": 1.0}])]
    path = tmp_path / "p.jsonl"
    ev.save_predictions(preds, path)
    assert ev.load_predictions(path) == preds
    assert ev.score_predictions(preds)["em"] == 1.0
    path.write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match=r"p\.jsonl:1: not a prediction"):
        ev.load_predictions(path)


class _Scorer(torch.nn.Module):
    """A stand-in model whose −log p(label | claim) is a fixed table."""

    def __init__(self, nll: dict[tuple[str, str], float]):
        super().__init__()
        self.nll, self.calls = nll, []

    def loss(self, examples, marginalization="token", train_retriever=True):
        self.calls.append((len(examples), marginalization, train_retriever, self.training))
        return torch.tensor([self.nll[e.question, e.answers[0]] for e in examples])


def test_evaluate_labels_chooses_the_likelier_label_and_scores_that_choice():
    labels = ("SUPPORTS", "REFUTES")
    claims = [Example("c1", ["SUPPORTS"]), Example("c2", ["REFUTES"]),
              Example("c3", ["REFUTES"])]
    model = _Scorer({("c1", "SUPPORTS"): 0.1, ("c1", "REFUTES"): 2.0,
                     ("c2", "SUPPORTS"): 0.5, ("c2", "REFUTES"): 0.7,   # wrong, narrowly
                     ("c3", "SUPPORTS"): 3.0, ("c3", "REFUTES"): 1.0})
    scores, predictions = ev.evaluate_labels(model, claims, labels, "sequence", batch_size=2)
    assert [p.prediction for p in predictions] == ["SUPPORTS", "SUPPORTS", "REFUTES"]
    assert [p.answers for p in predictions] == [e.answers for e in claims]
    # c2 is wrong at the threshold 0 (argmax) yet ranked below the one SUPPORTS claim: AUC 1
    assert scores == {"accuracy": pytest.approx(2 / 3), "n": 3, "auc": 1.0}
    # every label of every claim scored in batches, in eval mode, the retriever not trained
    assert sorted(model.calls) == [(1, "sequence", False, False)] * 2 + \
        [(2, "sequence", False, False)] * 2
    assert model.training  # given back in the mode it came in


@pytest.fixture(scope="module")
def closed_book():
    texts = ["Paris is the capital of France.", "Rome is the capital of Italy.",
             "capital of France", "capital of Italy", "Paris", "Rome"]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    config = tiny_config(tokenizer, d_model=32, layers=1)
    config.init_std = 0.3  # a random generator that still depends on its input
    torch.manual_seed(0)
    preset = Preset(name="toy", query_encoder="-", doc_encoder="-", generator="-",
                    pooling="mean", max_source_length=16, max_target_length=6)
    return ev.ClosedBook(preset, BartForConditionalGeneration(config).eval(), tokenizer)


def test_closed_book_scores_p_theta_of_y_given_the_question_alone(closed_book):
    examples = [Example("capital of France", ["Paris"]), Example("capital of Italy", ["Rome"])]
    nll = closed_book.loss(examples, train_retriever=False)
    tok = closed_book.tokenizer
    for e, value in zip(examples, nll):  # transformers' own cross-entropy, summed over y
        src = tok(e.question, return_tensors="pt")  # <s> x </s>: the question alone
        labels = encode_targets(tok, e.answers, 6)["labels"]
        mean = closed_book.generator(**src, labels=labels).loss
        assert value.item() == pytest.approx(mean.item() * labels.shape[1], rel=1e-5)
    assert torch.equal(nll, closed_book.loss(examples, "sequence"))  # k = 1: Eq. 1 = Eq. 2


def test_closed_book_answers_by_greedy_search_on_the_question_alone(closed_book):
    prediction = closed_book.answer(["capital of France"], [["Paris"]], num_beams=1)[0]
    assert prediction.provenance == [{"id": "closed-book", "title": "", "posterior": 1.0}]
    tok = closed_book.tokenizer
    out = closed_book.generator.generate(**tok("capital of France", return_tensors="pt"),
                                         num_beams=1, do_sample=False, max_new_tokens=12,
                                         forced_eos_token_id=None)
    greedy = tok.decode(out[0], skip_special_tokens=True).strip()
    assert prediction.prediction and greedy.startswith(prediction.prediction)
