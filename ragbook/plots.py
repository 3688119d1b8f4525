"""The course's figures, in one style, each returning a matplotlib Figure (shown inline in the
notebooks, saved as PNG by ``ragbook reproduce``).

Every function draws inside :func:`style` — the course's rcParams — and labels every axis and
titles every panel. A notebook that draws a figure of its own calls :func:`use_style` once, so
that its figures look like the package's.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import matplotlib.pyplot as plt
import numpy as np
from cycler import cycler
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.ticker import NullFormatter, NullLocator

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
           "#8c8c8c")
STYLE = {
    "figure.figsize": (6.4, 3.6),
    "figure.dpi": 100,
    "figure.constrained_layout.use": True,  # labels never overlap the next panel
    "axes.prop_cycle": cycler(color=list(PALETTE)),
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "grid.alpha": 0.3,
    "lines.linewidth": 1.6,
    "image.cmap": "Blues",
}
# the ticks of a log-scaled k axis: round numbers a reader can read off
LOG_TICKS = tuple(m * 10**e for e in range(7) for m in (1, 2, 5))  # 1, 2, 5, 10, … 5,000,000


@contextmanager
def style() -> Iterator[None]:
    """The course's rcParams, for the figures drawn inside the ``with`` block."""
    with plt.rc_context(STYLE):
        yield


def use_style() -> None:
    """Make the course's style the default for every later figure (a notebook's own)."""
    plt.rcParams.update(STYLE)


def styled(fn: Callable[..., Figure]) -> Callable[..., Figure]:
    """Decorator: draw ``fn``'s figure in the course's style."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with style():
            return fn(*args, **kwargs)

    return wrapper


def log_axis(ax: Axes, values: Sequence[float], axis: str = "x") -> None:
    """A log-scaled axis whose ticks are the round numbers 1, 2, 5, 10, 20, 50 … covering the
    range of ``values``, written as plain numbers (no 10^x, no unlabelled minor ticks)."""
    lo, hi = min(values), max(values)
    # beyond an end that is not itself a round number, one more tick, so every point has a scale
    below = [t for t in LOG_TICKS if t < lo][-1:] if lo not in LOG_TICKS else []
    above = [t for t in LOG_TICKS if t > hi][:1] if hi not in LOG_TICKS else []
    ticks = below + [t for t in LOG_TICKS if lo <= t <= hi] + above
    target = ax.xaxis if axis == "x" else ax.yaxis
    (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
    target.set_minor_locator(NullLocator())
    target.set_minor_formatter(NullFormatter())
    (ax.set_xticks if axis == "x" else ax.set_yticks)(ticks, [f"{t:,g}" for t in ticks])


def set_title(ax: Axes, title: str) -> None:
    """``ax``'s title, wrapped onto several lines where it would be wider than the panel."""
    size = FontProperties(size=plt.rcParams["axes.titlesize"]).get_size_in_points()
    width = ax.get_position().width * ax.figure.get_figwidth() * 72  # points
    # pre-wrapped for the panel, and wrap=True keeps any line inside the figure at draw time
    ax.set_title("\n".join(textwrap.wrap(title, max(20, int(width / (0.6 * size))))), wrap=True)


def _running_mean(values: Sequence[float], window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def rank_labels(titles: Sequence[str], width: int = 28) -> list[str]:
    """Passages labelled by rank, "1. Qing dynasty", so that repeated titles stay apart."""
    return [f"{r}. {t[:width] + ('…' if len(t) > width else '')}"
            for r, t in enumerate(titles, start=1)]


@styled
def plot_training(histories: Mapping[str, Sequence[tuple[int, float]]], smooth: int = 10,
                  title: str = "training loss", ylabel: str = "loss (nats)", raw: bool = False,
                  hlines: Mapping[str, float] | None = None) -> Figure:
    """Loss curves, one per run, smoothed with a running mean over ``smooth`` steps; ``raw``
    adds each step's loss faintly, ``hlines`` labelled reference levels (e.g. a dev loss)."""
    fig, ax = plt.subplots()
    for (name, history), colour in zip(histories.items(), PALETTE * 4):
        steps, losses = zip(*history) if history else ((), ())
        if raw and losses:
            ax.plot(steps, losses, color=colour, alpha=0.25, lw=0.8)
        if losses:
            window = max(1, min(smooth, len(losses)))
            label = name if window == 1 else f"{name} ({window}-step mean)"
            ax.plot(steps[window - 1:], _running_mean(losses, window), color=colour,
                    label=label)
    for (name, y), colour in zip((hlines or {}).items(), ("black", "0.4", "0.6")):
        ax.axhline(y, color=colour, ls="--", lw=1, label=name)
    ax.set(xlabel="step", ylabel=ylabel)
    set_title(ax, title)
    ax.legend()
    ax.grid(True)
    return fig


@styled
def plot_pretraining(shipped: Sequence[tuple[int, float]],
                     live: Sequence[tuple[int, float]] | None = None,
                     heldout: tuple[int, float] | None = None, uniform: float | None = None,
                     smooth: int = 25, live_label: str = "the live run",
                     title: str = "denoising pre-training") -> Figure:
    """The shipped generator's recorded loss curve and a live run's, on one log-step axis so
    that a run of a few dozen steps shows beside one of thousands; ``heldout`` marks the
    held-out loss at export and ``uniform`` the loss of a uniform guess, ln |V|."""
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    steps, losses = (np.asarray(v, float) for v in zip(*shipped))
    ax.plot(steps, losses, color="0.8", lw=0.6, label="shipped run, each step")
    window = max(1, min(smooth, len(losses)))
    ax.plot(steps[window - 1:], _running_mean(losses, window), color=PALETTE[0],
            label=f"shipped run, {window}-step mean")
    every = [steps]
    if live:
        live_steps, live_losses = zip(*live)
        ax.plot(live_steps, live_losses, color=PALETTE[1], marker=".", ms=4, label=live_label)
        every.append(np.asarray(live_steps, float))
    if heldout is not None:
        ax.scatter([heldout[0]], [heldout[1]], color=PALETTE[3], zorder=3,
                   label=f"held-out loss at export ({heldout[1]:.2f})")
    if uniform is not None:
        ax.axhline(uniform, color="0.5", ls=":", lw=1,
                   label=f"uniform guess, ln |V| = {uniform:.2f}")
    log_axis(ax, np.concatenate(every))
    ax.set(xlabel="step (log scale)", ylabel="denoising loss (nats / token)", ylim=(0, None))
    set_title(ax, title)
    ax.legend(loc="lower left")
    ax.grid(True)
    return fig


@styled
def plot_recall_curves(curves: Mapping[str, Mapping[int, float]],
                       title: str = "retrieval recall@k", ylim: tuple[float, float] = (0, 1),
                       markers: bool = True) -> Figure:
    """recall@k against k (log scale, ticks 1, 2, 5, 10 …), one line per retriever."""
    fig, ax = plt.subplots()
    ks: list[int] = []
    for name, recall in curves.items():
        k = sorted(recall)
        ks += k
        ax.plot(k, [recall[i] for i in k], marker="." if markers else None, label=name)
    log_axis(ax, ks)
    ax.set(xlabel="k, passages retrieved", ylabel="recall@k", ylim=ylim)
    set_title(ax, title)
    ax.legend()
    ax.grid(True)
    return fig


@styled
def plot_k_sweep(sweep: Mapping[str, Sequence[float]],
                 em: Mapping[str, Sequence[float]] | None = None,
                 title: str = "more documents: recall rises, EM need not",
                 errors: Mapping[str, Sequence[float]] | None = None,
                 ylabel: str = "recall@k / exact match") -> Figure:
    """The paper's Figure 3 (left and centre): exact match and retrieval recall as the number
    of documents k retrieved at test time grows. ``em`` names the score curves to draw (default:
    ``sweep["em"]`` as "exact match"); ``errors`` gives a curve its error bars, by name."""
    fig, ax = plt.subplots()
    ax.plot(sweep["k"], sweep["recall"], marker="o", color="0.35",
            label="recall@k (a passage of the answer's article retrieved)")
    for (name, values), marker in zip((em or {"exact match": sweep["em"]}).items(), "s^vD"):
        ax.errorbar(sweep["k"], values, yerr=(errors or {}).get(name), marker=marker,
                    capsize=3, label=name)
    log_axis(ax, sweep["k"])
    ax.set(xlabel="k, documents retrieved at test time", ylabel=ylabel, ylim=(0, 1))
    set_title(ax, title)
    ax.legend()
    ax.grid(True)
    return fig


@styled
def plot_heatmap(values, xlabels: Sequence[str], ylabels: Sequence[str], title: str = "",
                 xlabel: str = "", ylabel: str = "", colorbar_label: str = "",
                 vmin: float | None = None, vmax: float | None = None, cmap: str = "Blues",
                 ax: Axes | None = None) -> Figure:
    """A labelled matrix: one row per ``ylabels``, one column per ``xlabels``."""
    values = np.asarray(values)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(xlabels) + 3),
                                      max(2.4, 0.45 * len(ylabels) + 1.5)))
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(ylabels)), ylabels, fontsize=8)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    set_title(ax, title)
    ax.figure.colorbar(image, ax=ax, label=colorbar_label)
    return ax.figure


def plot_doc_posterior(posterior, tokens: Sequence[str], titles: Sequence[str],
                       question: str = "", ax: Axes | None = None) -> Figure:
    """The paper's Figure 2: p(z | x, y_i, y_<i) for each generated token (columns) and each
    retrieved document (rows, labelled by rank)."""
    return plot_heatmap(posterior, tokens, rank_labels(titles, 22), title=question,
                        xlabel="generated token y_i", ylabel="retrieved passage z",
                        colorbar_label="p(z | x, y_i, y_<i)", vmin=0, vmax=1, ax=ax)


@styled
def plot_doc_distributions(titles: Sequence[str], distributions: Mapping[str, Sequence[float]],
                           title: str = "", ax: Axes | None = None) -> Figure:
    """Distributions over the k retrieved passages — the prior p_η(z|x), a posterior —
    as horizontal bars, one row per passage in rank order (all k, even where titles repeat)."""
    if ax is None:
        _, ax = plt.subplots(figsize=(6.4, 0.4 * len(titles) + 1.4))
    y = np.arange(len(titles))
    height = 0.8 / max(1, len(distributions))
    for n, (name, values) in enumerate(distributions.items()):
        ax.barh(y + (n - (len(distributions) - 1) / 2) * height, list(values), height,
                label=name)
    ax.set_yticks(y, rank_labels(titles), fontsize=8)
    ax.invert_yaxis()  # rank 1 on top
    ax.set(xlabel="probability", ylabel="retrieved passage (rank)", xlim=(0, 1))
    set_title(ax, title)
    if len(distributions) > 1:
        ax.legend()
    return ax.figure


@styled
def plot_scores(values: Mapping[str, float], xlabel: str = "Exact Match", title: str = "",
                errors: Mapping[str, float] | None = None, xlim: tuple[float, float] = (0, 1),
                colors: Sequence[str] | None = None, ylabel: str = "model") -> Figure:
    """One horizontal bar per system, its value written beside it; ``errors`` draws ± one
    standard error, so that a reader sees which differences are inside the noise."""
    names = list(values)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(names) + 1.3))
    err = [errors.get(n, np.nan) for n in names] if errors else None  # nan: no bar
    bars = ax.barh(range(len(names)), [values[n] for n in names], xerr=err,
                   color=list(colors) if colors else [PALETTE[i % len(PALETTE)]
                                                      for i in range(len(names))],
                   error_kw={"ecolor": "0.3", "capsize": 3, "lw": 1})
    ax.bar_label(bars, fmt="%.2f", padding=4, fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set(xlabel=xlabel + (" (± one standard error)" if errors else ""), ylabel=ylabel,
           xlim=xlim)
    set_title(ax, title)
    return fig


@styled
def plot_paired(x: Sequence[float], y: Sequence[float], xlabel: str, ylabel: str,
                title: str = "", highlight: Sequence[bool] | None = None,
                labels: tuple[str, str] = ("same", "different")) -> Figure:
    """One point per example, two measurements of it against each other, with the diagonal
    y = x; ``highlight`` colours the examples where it is True (``labels``: the legend)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if highlight is None:
        ax.scatter(x, y, s=14)
    else:
        mark = np.asarray(highlight, bool)
        ax.scatter(x[~mark], y[~mark], s=14, label=labels[0])
        ax.scatter(x[mark], y[mark], s=14, color=PALETTE[3], label=labels[1])
        ax.legend()
    lim = [min(x.min(), y.min()) - 0.5, max(x.max(), y.max()) + 0.5]
    ax.plot(lim, lim, "k--", lw=1)
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=lim, ylim=lim)
    set_title(ax, title)
    ax.grid(True)
    return fig
