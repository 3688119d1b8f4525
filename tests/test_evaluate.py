"""Metrics against hand-computed values."""

import pytest

from ragbook import evaluate as ev
from ragbook.data import Example, Passage


def test_squad_normalisation_and_exact_match():
    assert ev.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert ev.exact_match("the Beatles", ["Beatles"]) == 1.0
    assert ev.exact_match("Ann's", ["Anns", "x"]) == 1.0
    assert ev.exact_match("Beatle", ["Beatles"]) == 0.0


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
