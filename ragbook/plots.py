"""The course's figures, each returning a matplotlib Figure (shown inline in notebooks, saved
as PNG by ``ragbook reproduce``)."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def plot_training(histories: dict[str, Sequence[tuple[int, float]]], smooth: int = 10,
                  title: str = "training loss") -> Figure:
    """Loss curves, one per run, smoothed with a running mean over ``smooth`` steps."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, history in histories.items():
        steps, losses = zip(*history) if history else ((), ())
        window = max(1, min(smooth, len(losses)))
        running = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], running, label=name)
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_recall_curves(curves: dict[str, dict[int, float]],
                       title: str = "retrieval recall@k") -> Figure:
    """recall@k against k (log scale), one line per retriever."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, recall in curves.items():
        ks = sorted(recall)
        ax.plot(ks, [recall[k] for k in ks], marker=".", label=name)
    ax.set(xscale="log", xlabel="k", ylabel="recall@k", ylim=(0, 1), title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_k_sweep(sweep: dict[str, list[float]]) -> Figure:
    """The paper's Figure 3: EM and retrieval recall as the number of documents k grows."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(sweep["k"], sweep["recall"], marker="o", label="recall@k (answer retrieved)")
    ax.plot(sweep["k"], sweep["em"], marker="s", label="exact match")
    ax.set(xscale="log", xlabel="k documents retrieved at test time", ylim=(0, 1),
           title="more documents: recall rises, EM saturates")
    ax.set_xticks(sweep["k"], [str(k) for k in sweep["k"]])
    ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_doc_posterior(posterior: np.ndarray, tokens: Sequence[str], titles: Sequence[str],
                       question: str = "") -> Figure:
    """The paper's Figure 2: p(z | x, y_i) for each generated token (columns) and each
    retrieved document (rows)."""
    posterior = np.asarray(posterior)
    fig, ax = plt.subplots(figsize=(0.6 * len(tokens) + 3, 0.45 * len(titles) + 1.5))
    image = ax.imshow(posterior, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tokens)), tokens, rotation=45, ha="right")
    ax.set_yticks(range(len(titles)), titles)
    ax.set_title(question)
    fig.colorbar(image, ax=ax, label="p(z | x, y_i)")
    return fig
