"""`ragbook reproduce`'s choices that need no training: which priors one model can serve, and
the results table of a run recorded before the training prior was a setting."""

import json
from pathlib import Path

import pytest

from ragbook import cli
from ragbook.reproduce import ReproduceConfig, check_priors, results_table

RECORDED = Path(__file__).parents[1] / "benchmarks" / "results" / "reproduce_tinybart10k.json"


@pytest.mark.parametrize("training_prior, retriever", [
    ("dense", "hybrid"), ("hybrid", "dense"), ("dense", "dense"), ("hybrid", "hybrid"),
    ("bm25", "bm25")])
def test_one_model_serves_these_pairs_of_priors(training_prior, retriever):
    check_priors(ReproduceConfig(training_prior=training_prior, retriever=retriever))


@pytest.mark.parametrize("training_prior, retriever", [("bm25", "hybrid"), ("dense", "bm25")])
def test_bm25_alone_cannot_swap_priors_with_a_query_encoder(training_prior, retriever):
    with pytest.raises(ValueError, match="BM25 alone uses no query encoder"):
        check_priors(ReproduceConfig(training_prior=training_prior, retriever=retriever))


def test_an_unknown_prior_is_named_in_the_error():
    with pytest.raises(ValueError, match="unknown retriever 'colbert'"):
        check_priors(ReproduceConfig(retriever="colbert"))
    with pytest.raises(ValueError, match="unknown training_prior 'colbert'"):
        check_priors(ReproduceConfig(training_prior="colbert"))


def test_the_cli_refuses_an_impossible_pair_of_priors_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["ask", "Capital of France", "--training-prior", "bm25"])
    assert exit_.value.code == 2
    assert "BM25 alone uses no query encoder" in capsys.readouterr().err


def test_a_run_recorded_before_the_training_prior_existed_still_renders():
    table = results_table(json.loads(RECORDED.read_text()))  # trained and read with hybrid
    assert "| | RAG-Token (hybrid prior) | 58.0 |" in table
    assert "BERT_q trained jointly with the hybrid prior | 38.5 / 63.7 / 81.0" in table
