import hashlib
import shutil
import warnings

import pytest
import torch

from collab_core.errors import CheckpointError, ConditioningError
from collab_core.tokenizer import VOCAB_PATH, VOCAB_SHA256, TextTokenizer, default_tokenizer

EXAMPLE = "This man has beard of medium length. He is in his thirties."
# The ids the reference's BertTokenizerFast(do_lower_case=True) gives for EXAMPLE ([CLS] ... [SEP], then 0 pads).
EXAMPLE_IDS = [101, 2023, 2158, 2038, 10154, 1997, 5396, 3091, 1012, 2002, 2003, 1999, 2010, 26313, 1012, 102]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer()


def test_documented_example_ids(tok):
    ids = tok(EXAMPLE)
    assert ids.dtype == torch.long and ids.shape == (1, 77)
    assert ids[0, :16].tolist() == EXAMPLE_IDS
    assert ids[0, 16:].eq(0).all()


@pytest.mark.parity
def test_fixture_tokens(tok, ref):
    expected = ref.inputs["text_tokens"]
    assert torch.equal(tok([ref.text]), expected)
    assert torch.equal(tok(ref.manifest["inputs"]["text_lowercased"]), expected)
    # every run's own text (the reference lower-cases it) gives the same ids as the inputs' prompt when it is that prompt
    for run in ref.runs():
        if run.get("text", "").lower() == ref.text.lower():
            assert torch.equal(tok(run["text"]), expected), run["file"]


def test_lowercases_and_batches(tok):
    ids = tok(["THIS MAN HAS BEARD.", "this man has beard."])
    assert ids.shape == (2, 77)
    assert torch.equal(ids[0], ids[1])


def test_unknown_and_subwords(tok):
    ids = tok("supercalifragilistic 😀")[0].tolist()
    assert ids[0] == 101 and 100 in ids  # emoji → [UNK]
    assert len([i for i in ids if i]) > 4  # the long word splits into several pieces


def test_truncation_warns_with_dropped_words(tok):
    words = [f"w{i}" for i in range(100)]  # "w12" is one word but several word pieces
    text = " ".join(["face"] * 80 + ["red", "green", "blue"])
    with pytest.warns(UserWarning, match=r"dropped 8 tokens, 8 word\(s\)") as rec:
        ids = tok(text)
    assert "'face face face face face red green blue'" in str(rec[0].message)
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 101 and ids[0, 76] == 102 and ids[0, 1:76].ne(0).all()
    with pytest.warns(UserWarning, match="dropped"):
        tok(" ".join(words))


def test_exact_fit_does_not_warn(tok):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = tok(" ".join(["face"] * 75))
    assert ids[0, 76] == 102


@pytest.mark.parametrize("bad", ["", "   ", "\n\t ", [], ["a face", " "], [None]])
def test_empty_or_invalid_text_raises(tok, bad):
    with pytest.raises(ConditioningError):
        tok(bad)


def test_control_characters_only_raise(tok):
    with pytest.raises(ConditioningError, match="no tokens"):
        tok("\x00\x01")


def test_vocab_checksum_and_errors(tmp_path):
    assert hashlib.sha256(VOCAB_PATH.read_bytes()).hexdigest() == VOCAB_SHA256
    with pytest.raises(CheckpointError, match="not found"):
        TextTokenizer(vocab_file=tmp_path / "missing.txt")
    corrupt = tmp_path / "vocab.txt"
    shutil.copy(VOCAB_PATH, corrupt)
    with open(corrupt, "ab") as f:
        f.write(b"extra\n")
    with pytest.raises(CheckpointError, match="sha256"):
        TextTokenizer(vocab_file=corrupt)


def test_default_tokenizer_is_shared():
    assert default_tokenizer() is default_tokenizer()
    assert default_tokenizer(77).max_length == 77


TRICKY = [
    EXAMPLE,
    "Crème brûlée, naïve CAFÉ — ÀÉÎ 東京 test!!  \t x",
    "İstanbul ǅ ß ﬁ hello\u200bworld \ufffd it's a man's \"quoted\" (face)",
    "supercalifragilisticexpialidocious " * 30,
    "hello, world" * 40,
]


def test_matches_transformers_bert_tokenizer(tmp_path, monkeypatch):
    """Same ids as transformers' BertTokenizerFast (what the reference calls) built offline on the vocab."""
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shutil.copy(VOCAB_PATH, tmp_path / "vocab.txt")
    ref = transformers.BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=True)
    assert len(ref.get_vocab()) == 30522
    ours = TextTokenizer()
    for text in TRICKY:
        expected = ref([text.lower()], truncation=True, max_length=77, padding="max_length", return_tensors="pt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(ours(text), expected["input_ids"]), text
