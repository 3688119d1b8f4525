"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def fp32():
    """Tests compare ragbook with hand computations and peers in fp32, so bf16 autocast
    (``config.autocast``, on by default where the hardware runs it) is off unless a test
    turns it back on with ``monkeypatch.setenv("RAGBOOK_BF16", "1")``. Session-wide: module
    fixtures are built before a test's own fixtures, and on a CPU with bf16 (AVX512-BF16,
    AMX) they would otherwise encode in bf16 what the test then compares in fp32."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAGBOOK_BF16", "0")
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine thread barriers
    make them many times slower: modules of tiny models run on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_paper(tmp_path_factory):
    """The paper preset's parts, tiny and local: DPR question and context encoders and a BART
    built with their real classes and ``save_pretrained``, an nq_open-shaped DatasetDict and a
    wiki_dpr-shaped passage dataset written by ``save_to_disk``. Questions are lower-case words
    of the encoders' vocabulary, so that they survive a round trip through DPR's tokenizer."""
    from types import SimpleNamespace

    import datasets
    from transformers import (
        BartForConditionalGeneration,
        BertTokenizer,
        DPRConfig,
        DPRContextEncoder,
        DPRQuestionEncoder,
    )

    from ragbook.generator import tiny_config, train_tokenizer

    towns = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    facts = [("red", "fox"), ("blue", "owl"), ("green", "frog"), ("white", "swan"),
             ("black", "bear"), ("grey", "wolf")]
    passages = {"id": [], "title": [], "text": []}
    questions = []
    for i, (town, (colour, animal)) in enumerate(zip(towns, facts)):
        for j, text in enumerate([f"{town} is the home of the {colour} {animal}",
                                  f"the {animal} of {town} is {colour}"]):
            passages["id"].append(str(2 * i + j + 1))
            passages["title"].append(town)
            passages["text"].append(text)
        questions.append({"question": f"which town is the home of the {colour} {animal}",
                          "answer": [town]})
    root = tmp_path_factory.mktemp("tiny-paper")
    datasets.Dataset.from_dict(passages).save_to_disk(str(root / "wiki_dpr"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(questions),
                          "validation": datasets.Dataset.from_list(questions[:3])}
                         ).save_to_disk(str(root / "nq_open"))

    texts = passages["text"] + [q["question"] for q in questions]
    words = sorted({w for t in texts for w in t.split()})
    paths = {}
    for kind, cls in (("question", DPRQuestionEncoder), ("ctx", DPRContextEncoder)):
        path = root / f"dpr-{kind}"
        path.mkdir()
        (path / "vocab.txt").write_text(
            "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
        BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
        torch.manual_seed(0)
        cls(DPRConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=2,
                      num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                      projection_dim=0, initializer_range=0.5,  # [CLS] states that differ
                      )).save_pretrained(path)
        paths[kind] = str(path)
    tokenizer = train_tokenizer(texts + towns, vocab_size=300)
    config = tiny_config(tokenizer, d_model=32, layers=1)
    config.init_std = 0.3  # at BART's 0.02 a random generator ignores its input document
    torch.manual_seed(0)
    bart = root / "bart"
    BartForConditionalGeneration(config).save_pretrained(bart)
    tokenizer.save_pretrained(bart)
    return SimpleNamespace(root=root, query_encoder=paths["question"], doc_encoder=paths["ctx"],
                           generator=str(bart), corpus=str(root / "wiki_dpr"),
                           nq_open=str(root / "nq_open"),
                           sizes=dict(max_query_length=16, max_passage_length=24,
                                      max_source_length=64, max_target_length=6, n_docs=3))
