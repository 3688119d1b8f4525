"""ragbook.plots: every figure has a title and labelled axes, in the course's style, headless."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ragbook import plots  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def labelled(ax):
    """The axis labels and title of a panel (colour bars excluded)."""
    return ax.get_xlabel(), ax.get_ylabel(), ax.get_title()


def tick_labels(ax, axis="x"):
    ticks = ax.get_xticklabels() if axis == "x" else ax.get_yticklabels()
    return [t.get_text() for t in ticks]


def test_every_function_labels_its_axes_and_titles_them():
    history = [(s, 10 / s) for s in range(1, 51)]
    sweep = {"k": [1, 2, 5, 10, 20, 50], "recall": [.4, .5, .7, .8, .9, .95],
             "em": [.3, .35, .4, .4, .38, .37]}
    figures = [
        plots.plot_training({"RAG-Token": history}, title="loss"),
        plots.plot_pretraining(history, live=history[:10], heldout=(50, 0.3), uniform=9.0,
                               title="pre-training"),
        plots.plot_recall_curves({"BM25": {1: .5, 5: .7, 20: .9}}, title="recall"),
        plots.plot_k_sweep(sweep, title="k"),
        plots.plot_heatmap(np.eye(3), ["a", "b", "c"], ["x", "y", "z"], title="t", xlabel="a",
                           ylabel="b", colorbar_label="c"),
        plots.plot_doc_posterior(np.full((2, 3), 0.5), ["The", "Sun", "</s>"], ["A", "B"],
                                 question="Hemingway"),
        plots.plot_doc_distributions(["A", "B"], {"prior": [.6, .4]}, title="prior"),
        plots.plot_scores({"closed book": .1, "RAG": .5}, title="EM", errors={"RAG": .05}),
        plots.plot_paired([1, 2], [1, 3], "Eq. 1", "Eq. 2", title="pairs",
                          highlight=[False, True]),
    ]
    for fig in figures:
        ax = fig.axes[0]
        xlabel, ylabel, title = labelled(ax)
        assert xlabel and ylabel and title, (fig, labelled(ax))


def test_log_k_ticks_are_round_numbers_written_plainly():
    fig = plots.plot_k_sweep({"k": [1, 2, 5, 10, 20, 50], "recall": [0.5] * 6, "em": [0.4] * 6})
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert tick_labels(ax) == ["1", "2", "5", "10", "20", "50"]
    assert not ax.xaxis.get_minorticklocs().size  # no unlabelled minor ticks

    fig = plots.plot_recall_curves({"dense": {k: k / 100 for k in range(1, 101)}})
    assert tick_labels(fig.axes[0]) == ["1", "2", "5", "10", "20", "50", "100"]


def test_pretraining_shows_the_live_run_beside_the_shipped_one():
    shipped = [(s, 9 * s ** -0.3) for s in range(1, 5001)]
    live = [(s, 9 - s / 10) for s in range(1, 41)]
    ax = plots.plot_pretraining(shipped, live=live, live_label="live, d_model 64").axes[0]
    labels = [line.get_label() for line in ax.get_lines()]
    assert "live, d_model 64" in labels and any(lab.startswith("shipped run") for lab in labels)
    live_line = next(line for line in ax.get_lines() if line.get_label() == "live, d_model 64")
    lo, hi = ax.get_xlim()
    assert lo <= min(live_line.get_xdata()) and max(live_line.get_xdata()) <= hi
    assert hi - lo > 1000  # the shipped run's 5,000 steps on the same axis
    assert ax.get_xscale() == "log"


def test_prior_chart_shows_every_passage_even_when_titles_repeat():
    titles = ["Qing dynasty", "Qing dynasty", "Qing dynasty", "Qin dynasty", "Ming dynasty"]
    ax = plots.plot_doc_distributions(titles, {"prior": [.6, .15, .14, .06, .05]}).axes[0]
    assert len(ax.patches) == len(titles)
    assert tick_labels(ax, "y") == ["1. Qing dynasty", "2. Qing dynasty", "3. Qing dynasty",
                                    "4. Qin dynasty", "5. Ming dynasty"]
    # two distributions: two bars per passage, and a legend to tell them apart
    ax = plots.plot_doc_distributions(titles, {"prior": [.2] * 5, "posterior": [.2] * 5}).axes[0]
    assert len(ax.patches) == 2 * len(titles) and ax.get_legend() is not None


def test_doc_posterior_rows_are_labelled_by_rank():
    ax = plots.plot_doc_posterior(np.full((3, 2), 1 / 3), ["A", "</s>"], ["X", "X", "Y"]).axes[0]
    assert tick_labels(ax, "y") == ["1. X", "2. X", "3. Y"]
    assert tick_labels(ax) == ["A", "</s>"]


def test_scores_write_each_value_and_its_error_bar():
    fig = plots.plot_scores({"a": 0.25, "b": 0.5}, errors={"a": 0.05, "b": 0.05})
    ax = fig.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert "0.25" in texts and "0.50" in texts
    assert "standard error" in ax.get_xlabel()
    assert tick_labels(ax, "y") == ["a", "b"]


def test_style_is_applied_and_does_not_leak():
    before = plt.rcParams["axes.spines.top"]
    fig = plots.plot_training({"run": [(1, 1.0), (2, 0.5)]})
    assert not fig.axes[0].spines["top"].get_visible()  # the course's style
    assert fig.get_layout_engine() is not None  # constrained layout: no overlapping labels
    assert plt.rcParams["axes.spines.top"] == before  # …only inside the plot function


def test_log_ticks_reach_past_ends_that_are_not_round():
    fig, ax = plt.subplots()
    plots.log_axis(ax, [1234, 56_000], axis="y")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["1,000", "2,000", "5,000", "10,000",
                                                            "20,000", "50,000", "100,000"]
