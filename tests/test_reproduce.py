"""`ragbook reproduce`'s choices that need no training: which priors one model can serve, the
results table of a run recorded before the training prior was a setting, and how each task is
decoded (on the toy world of test_pipeline, whose models stand in for trained ones)."""

import json

import pytest
import test_pipeline as tp  # the toy world: a tiny BERT, BART and index built by the tests

from ragbook import cli, rag, reproduce
from ragbook import train as T
from ragbook.data import Example
from ragbook.pipeline import RagModel
from ragbook.reproduce import ReproduceConfig, check_priors

toy = tp.toy  # its fixture, used here too


@pytest.mark.parametrize("training_prior, retriever", [
    ("dense", "hybrid"), ("hybrid", "dense"), ("dense", "dense"), ("hybrid", "hybrid"),
    ("bm25", "bm25")])
def test_one_model_serves_these_pairs_of_priors(training_prior, retriever):
    check_priors(ReproduceConfig(training_prior=training_prior, retriever=retriever,
                                 ablation_prior=None if training_prior == "bm25" else "dense"))


def test_a_model_trained_with_bm25_has_no_hybrid_ablation():
    with pytest.raises(ValueError, match="cannot be read with the hybrid prior"):
        check_priors(ReproduceConfig(training_prior="bm25", retriever="bm25"))


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
    assert cli.main(["ask", "Capital of France", "--training-prior", "bm25"]) == 2
    assert "BM25 alone uses no query encoder" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_reproduce_decodes_each_task_as_it_records(toy, monkeypatch, tmp_path):
    """Every answer `reproduce` decodes — closed-book BART's and both RAG models', reading QA
    and question generation — uses the beams, RAG-Sequence method and answer length that
    results.json records for its task (the paper's Appendix A); verification decodes nothing."""
    towns = {e.article for e in tp.EXAMPLES}
    tasks = {"reading-qa": tp.READING,
             "qgen": [Example(t, [f"a town called {t}"], t) for t in sorted(towns)],
             "verify": [Example(f"{e.article}: {e.question}", ["SUPPORTS"], e.article)
                        for e in tp.EXAMPLES]}
    calls = []

    def spy(name):
        decoder = getattr(rag, name)

        def decode(model, tokenizer, input_ids, attention_mask, doc_scores, **kwargs):
            text = tokenizer.decode(input_ids[0], skip_special_tokens=True)
            task = ("reading-qa" if "_____" in text else "verify" if ": " in text
                    else "qgen")
            calls.append({"task": task, "closed_book": " // " not in text,
                          "docs": doc_scores.shape[1], "decoder": name, **kwargs})
            return decoder(model, tokenizer, input_ids, attention_mask, doc_scores, **kwargs)
        return decode

    for name in ("rag_token_generate", "rag_sequence_generate"):
        monkeypatch.setattr(rag, name, spy(name))
    monkeypatch.setattr(reproduce, "get_preset", lambda name, seed=0, **sizes: toy.preset)
    monkeypatch.setattr(reproduce, "load_task", lambda task, split, seed=0: tasks[task])

    def from_preset(preset, retriever="dense", **parts):
        return tp._model(toy, retriever).eval()

    def trained_rag(preset, task, cfg, retriever, progress):
        model = from_preset(preset, retriever)
        model.history = [(1, 2.0), (2, 1.0)]
        return model

    monkeypatch.setattr(RagModel, "from_preset", staticmethod(from_preset))
    monkeypatch.setattr(T, "trained_rag", trained_rag)
    monkeypatch.setattr(T, "trained_closed_book",
                        lambda preset, task, steps, progress: (toy.generator, toy.tokenizer))
    labelled = []
    evaluate_labels = reproduce.ev.evaluate_labels

    def spy_labels(model, *args, **kwargs):
        labelled.append(model)
        return evaluate_labels(model, *args, **kwargs)

    monkeypatch.setattr(reproduce.ev, "evaluate_labels", spy_labels)
    cfg = ReproduceConfig(eval_questions=4, sweep_questions=2, sweep_ks=(2,), hot_swap_facts=2)
    results = reproduce.run(cfg, runs_dir=tmp_path, progress=False)

    run = tmp_path / "latest"
    recorded = results["decoding"]
    assert recorded == json.loads((run / "results.json").read_text())["decoding"]
    assert recorded["reading-qa"] == {"num_beams": 1, "method": "thorough"}  # Appendix A
    assert recorded["qgen"] == {"num_beams": 4, "method": "fast"}
    seen = {(c["task"], c["closed_book"], c["decoder"]) for c in calls}
    assert {("reading-qa", True, "rag_token_generate"), ("qgen", True, "rag_token_generate"),
            ("reading-qa", False, "rag_sequence_generate"), ("qgen", False, "rag_token_generate"),
            ("reading-qa", False, "rag_token_generate")} == seen  # nothing decodes a claim
    # Table 1's RAG models read k documents; beside them RAG-Token reads its top-1 alone
    assert {c["docs"] for c in calls if c["task"] == "reading-qa" and not c["closed_book"]} \
        == {1, 2, toy.preset.n_docs}  # 2: the k sweep
    for c in calls:
        assert c["num_beams"] == recorded[c["task"]]["num_beams"]
        if c["decoder"] == "rag_sequence_generate":
            assert c["method"] == recorded[c["task"]]["method"]
    assert len({c["max_length"] for c in calls}) == 1  # closed-book answers as long as RAG's
    assert recorded["verify"] == {"scored_labels": ["SUPPORTS", "REFUTES"]}
    assert set(results["verify"]["rag"]) == {"accuracy", "n", "predicted"}
    assert sum(results["verify"]["rag"]["predicted"].values()) == 4  # what each claim was called
    # the verifier reads with the prior it was trained with (dense), not the hybrid one
    assert [m.bm25 is None for m in labelled] == [True, True]
    assert labelled[1].index is not None  # RAG, not the closed-book model
    # per-question scores for the paired findings, one per test question of each task
    hits = json.loads((run / "results.json").read_text())["hits"]
    assert set(hits["f1"]) == {"closed_book", "rag_sequence", "rag_token", "top1_only",
                               "top1_only_sequence", "extract", "rag_token_ablation",
                               "reader_gold"}
    assert {len(v) for v in [*hits["em"].values(), *hits["f1"].values()]} == {4}
    assert len(hits["verify"]["rag"]) == 4
    assert set(hits["recall@1"]) == {"frozen", "bm25", "hybrid_frozen", "finetuned", "hybrid"}
    assert "## What this run shows" in (run / "results.md").read_text()
    assert "| | RAG (dense prior) |" in (run / "results.md").read_text()
    table = (run / "results.md").read_text()
    assert "reading QA greedy, RAG-Sequence Thorough; question generation 4 beams, " \
        "RAG-Sequence Fast" in table
    assert "| | RAG-Token read with the hybrid prior (ablation, no retraining) |" in table
    assert "| F1 by k at test time (Figure 3) | RAG-Token | k=2: " in table


def _run_with(**em) -> dict:
    """A results.json of 100 test questions whose per-question EM hits are ``em``."""
    n = 100
    rate = {name: sum(h) / n for name, h in em.items()}
    return {"entity_qa": {m: {"em": rate[m]} for m in ("closed_book", "rag_sequence",
                                                       "rag_token")},
            "baselines": {"top1_title_em": rate["top1_title"]},
            "hits": {"em": em, "recall@1": {"bm25": [1] * 60 + [0] * 40,
                                            "frozen": [1] * 40 + [0] * 60},
                     "recall@5": {"bm25": [1] * 80 + [0] * 20, "frozen": [1] * 79 + [0] * 21}}}


def test_findings_call_a_difference_only_beyond_twice_its_paired_error():
    lines = reproduce.findings(_run_with(closed_book=[0] * 100, rag_sequence=[1] * 50 + [0] * 50,
                                         rag_token=[1] * 49 + [0] * 51,
                                         top1_title=[1] * 48 + [0] * 52))
    by_topic = {line.split("**")[1]: line for line in lines}
    assert by_topic["Retrieval vs parametric memory"].startswith("✔")  # 50 vs 0
    assert by_topic["RAG-Sequence vs RAG-Token"].startswith("✔")  # within a point: as the paper
    assert by_topic["The generator against copying the top-1 title"].startswith("≈")  # 50 vs 48
    assert "at rank 1 BM25 ahead, at rank 5 within noise" in by_topic["BM25 vs dense retrieval"]
    assert not any("Fact verification" in line or "frozen BERT_q" in line for line in lines)
    reverse = reproduce.findings(_run_with(closed_book=[1] * 90 + [0] * 10,
                                           rag_sequence=[1] * 40 + [0] * 60,
                                           rag_token=[1] * 20 + [0] * 80,
                                           top1_title=[0] * 100))
    assert reverse[0].startswith("✘")  # the closed book ahead: against the paper, said so
    assert reverse[2].startswith("≈")  # RAG-Sequence and RAG-Token apart: unlike the paper


def test_the_recorded_run_is_a_run_of_the_current_defaults():
    """Notebook 07 shows the recorded run as `ragbook reproduce`'s Table 1: it must be a run of
    today's defaults, its per-question scores behind every row, rendered by results_table."""
    from dataclasses import asdict

    import numpy as np

    r = json.loads(reproduce.RECORDED.read_text())
    assert r["config"] == json.loads(json.dumps(asdict(ReproduceConfig())))
    for name, scores in r["reading_qa"].items():
        assert len(r["hits"]["f1"][name]) == scores["n"] == r["config"]["eval_questions"]
        f1 = np.mean(r["hits"]["f1"][name])  # each question's F1 kept to four decimals
        assert f1 == pytest.approx(scores["f1"], abs=1e-4), name
    assert "RAG-Sequence (dense prior)" in reproduce.results_table(r)
