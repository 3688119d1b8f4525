"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(autouse=True)
def fp32(monkeypatch):
    """Tests compare ragbook with hand computations and peers in fp32, so bf16 autocast
    (``config.autocast``, on by default where the hardware runs it) is off unless a test
    turns it back on with ``monkeypatch.setenv("RAGBOOK_BF16", "1")``."""
    monkeypatch.setenv("RAGBOOK_BF16", "0")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine thread barriers
    make them many times slower: modules of tiny models run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
