"""Bad input through `ragbook` ends in one line that says what to do, before any long work.

Each case runs ``cli.main`` in-process: exit status 2 and one line ``ragbook: error: ...`` on
stderr, or 130 and one line for Ctrl-C, with the training checkpoint saved.
"""

import signal
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from ragbook import cli, reproduce, train


def one_line_error(capsys, argv, status=2) -> str:
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing started
    err = captured.err
    assert err.startswith("ragbook: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def no_work(monkeypatch):
    """Fail a test if a command starts its long work (training, the whole pipeline)."""
    def fail(*args, **kwargs):
        raise AssertionError("the command started working before checking its input")

    for name in ("rag_model", "run"):
        monkeypatch.setattr(reproduce, name, fail)
    monkeypatch.setattr(train, "pretrain", fail)


@pytest.mark.parametrize("argv, message", [
    (["ask", "Who?", "--preset", "huge"], "argument --preset: invalid choice: 'huge'"),
    (["index", "--corpus", "builtin", "--out", "o", "--preset", "huge"], "invalid choice"),
    (["ask", "Who?", "--beams", "0"], "argument --beams: must be at least 1, got 0"),
    (["ask", "Who?", "-k", "-3"], "argument -k: must be at least 1, got -3"),
    (["ask", "Who?", "--steps", "many"], "expected a whole number, got 'many'"),
    (["reproduce", "--rag-steps", "0"], "argument --rag-steps: must be at least 1"),
    (["search", "--index", "ix", "q", "-k", "0"], "argument -k: must be at least 1"),
    (["pretrain", "--out", "o", "--lr", "0"], "argument --lr: must be above 0"),
    (["pretrain", "--out", "o", "--seq-len", "2"], "argument --seq-len: must be at least 3"),
    (["pretrain", "--out", "o", "--device", "gpu"], "'gpu' is not a device; use cpu or cuda"),
    (["index", "--corpus", "c.jsonl", "--out", "o", "--retriever", "hybrid"],
     "invalid choice: 'hybrid' (choose from 'dense', 'bm25', 'fusion')"),
])
def test_a_bad_option_is_one_line_pointing_to_help(capsys, no_work, argv, message):
    err = one_line_error(capsys, argv)
    assert message in err and f"(see `ragbook {argv[0]} --help`)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_refused_before_pretraining(capsys, no_work):
    assert "this machine has no CUDA GPU; use cpu" in one_line_error(
        capsys, ["pretrain", "--out", "o", "--device", "cuda"])


def test_bad_values_are_refused_before_any_work(tmp_path, capsys, no_work):
    err = one_line_error(capsys, ["reproduce", "--training-prior", "bm25", "--retriever",
                                  "dense"])
    assert "cannot be read with the dense prior" in err
    assert "the question is empty" in one_line_error(capsys, ["ask", "  "])
    (tmp_path / "file").write_text("x")
    for argv in (["reproduce", "--runs-dir", f"{tmp_path}/file"],
                 ["pretrain", "--out", f"{tmp_path}/file"],
                 ["pretrain", "--out", f"{tmp_path}/o", "--work", f"{tmp_path}/file"]):
        assert "a file is in the way; give a directory path" in one_line_error(capsys, argv)
    assert "at most 128" in one_line_error(
        capsys, ["pretrain", "--out", f"{tmp_path}/o", "--seq-len", "200"])
    (tmp_path / "empty.jsonl").write_text("")
    assert "no predictions in the file" in one_line_error(capsys,
                                                          ["eval", f"{tmp_path}/empty.jsonl"])
    assert "no such file" in one_line_error(capsys, ["eval", f"{tmp_path}/missing.jsonl"])


# --------------------------------------------------------------------------- checkpoints


def fake_pretrain(interrupt_at=None):
    """`train.pretrain` with a one-weight model and the real resumable loop, so that the CLI
    meets the library's own checkpoint refusal and Ctrl-C handling in seconds."""
    def pretrain(out, cfg, work=None, device="cpu"):
        def step(i: int) -> float:
            if i == interrupt_at:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of a step
            return 1.0 / (i + 1)

        state = train.resumable_loop(step, {"model": torch.nn.Linear(1, 1)}, cfg.steps,
                                     Path(work) / "checkpoint.pt", 100, "pretrain",
                                     progress=False, settings=asdict(cfg))
        return {"step": state["step"], "heldout_loss": 1.0}
    return pretrain


def test_a_checkpoint_written_with_other_settings_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "pretrain", fake_pretrain())
    argv = ["pretrain", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert cli.main(argv + ["--steps", "2"]) == 0
    assert "step 2:" in capsys.readouterr().out
    err = one_line_error(capsys, argv + ["--steps", "3"])
    assert "written by a run with other settings (steps: 2 → 3)" in err and "--work" in err


def test_ctrl_c_saves_the_checkpoint_and_exits_130_in_one_line(tmp_path, capsys, monkeypatch):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled elsewhere (nohup, or a test runner's worker)")
    monkeypatch.setattr(train, "pretrain", fake_pretrain(interrupt_at=2))
    work = tmp_path / "work"
    argv = ["pretrain", "--out", str(tmp_path / "out"), "--work", str(work), "--steps", "5"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert err == ("ragbook: interrupted; run the same command again to resume from the "
                   "checkpoint it saved\n")
    saved = torch.load(work / "checkpoint.pt", weights_only=True)
    assert saved["state"]["step"] == 3  # the step in flight finished, then the loop stopped
    monkeypatch.setattr(train, "pretrain", fake_pretrain())
    assert cli.main(argv) == 0 and "step 5:" in capsys.readouterr().out  # resumed


def test_help_exits_0_and_lists_the_rank_fusion_index(capsys):
    assert cli.main(["index", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "{dense,bm25,fusion}" in out and "reciprocal rank fusion" in out
