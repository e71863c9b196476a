"""Offline uncased BERT WordPiece tokenizer, as the reference's text encoder expects.

The reference downloads ``bert-base-uncased`` from the Hugging Face hub at run time; only its 30522-entry
vocabulary matters, so the pack ships that file (``collab_core/data/``) and builds the same WordPiece
pipeline from it with the ``tokenizers`` library: BERT normaliser (clean text, split CJK characters,
lower-case, strip accents), BERT pre-tokeniser, WordPiece with ``##`` continuations, ``[CLS] … [SEP]``.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .errors import CheckpointError, ConditioningError

VOCAB_PATH = Path(__file__).resolve().parent / "data" / "bert-base-uncased-vocab.txt"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
VOCAB_SIZE = 30522

PAD_ID = 0
UNK_ID = 100
CLS_ID = 101
SEP_ID = 102


def _check_vocab(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(
            f"tokenizer vocabulary not found at {path}. It ships with the pack "
            "(collab_core/data/bert-base-uncased-vocab.txt); reinstall the pack to restore it."
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != VOCAB_SHA256:
        # A different vocabulary maps words to ids the text encoder never saw: refuse rather than
        # produce silently wrong conditioning.
        raise CheckpointError(
            f"tokenizer vocabulary {path} is corrupt or not bert-base-uncased's "
            f"(sha256 {digest}, expected {VOCAB_SHA256}); reinstall the pack to restore it."
        )


class TextTokenizer:
    """``tokenizer("a face")`` → LongTensor [B, max_length]: ``[CLS]`` ids ``[SEP]``, zero-padded.

    Matches ``BertTokenizerFast.from_pretrained("bert-base-uncased")(text, truncation=True,
    max_length=77, padding="max_length")`` on ``text.lower()``, as the reference scripts call it.
    """

    def __init__(self, max_length: int = 77, vocab_file: str | Path | None = None):
        if max_length < 3:
            raise ValueError(f"max_length must leave room for [CLS], a token and [SEP]; got {max_length}")
        from tokenizers import BertWordPieceTokenizer

        path = Path(vocab_file) if vocab_file is not None else VOCAB_PATH
        _check_vocab(path)
        self.max_length = int(max_length)
        self.vocab_file = path
        # strip_accents=None follows lowercase, like the hub's bert-base-uncased configuration.
        self._tok = BertWordPieceTokenizer(
            str(path), clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        if self._tok.get_vocab_size() != VOCAB_SIZE:
            raise CheckpointError(f"tokenizer vocabulary {path} has {self._tok.get_vocab_size()} entries, expected {VOCAB_SIZE}")

    @property
    def vocab_size(self) -> int:
        return VOCAB_SIZE

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            raise ConditioningError("no text given: pass a non-empty string or a list of strings")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ConditioningError(f"text #{i} is a {type(t).__name__}, not a string")
            if not t.strip():
                raise ConditioningError(
                    "empty text: the text model was trained only on captions and has no 'empty' condition; "
                    "describe the face (e.g. 'This woman has blond hair.')"
                )
        # The reference's scripts lower-case before tokenising, and Python's str.lower differs from the
        # normaliser's on a few code points, so do both.
        lowered = [t.lower() for t in texts]
        out = torch.full((len(texts), self.max_length), PAD_ID, dtype=torch.long)
        for row, (text, enc) in enumerate(zip(lowered, self._tok.encode_batch(lowered))):
            ids = enc.ids
            if len(ids) <= 2:
                raise ConditioningError(
                    f"text {texts[row]!r} has no tokens after normalisation (only control or unprintable "
                    "characters); describe the face in words"
                )
            if all(i == UNK_ID for i in ids[1:-1]):
                raise ConditioningError(
                    f"text {texts[row]!r} has no word the text model knows (every token is unknown: emoji or "
                    "symbols only); describe the face in English words"
                )
            if len(ids) > self.max_length:
                self._warn_truncated(text, enc)
                ids = ids[: self.max_length - 1] + [SEP_ID]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def _warn_truncated(self, text: str, enc) -> None:
        keep = self.max_length - 2
        first_dropped = 1 + keep  # index in enc.ids; position 0 is [CLS]
        cut = enc.offsets[first_dropped][0]
        if enc.tokens[first_dropped].startswith("##"):
            # The cut falls inside a word and loses its tail: count that word as dropped.
            while cut > 0 and not text[cut - 1].isspace():
                cut -= 1
        dropped = text[cut:].split()
        n_tokens = len(enc.ids) - 2 - keep
        snippet = " ".join(dropped)
        if len(snippet) > 60:
            snippet = snippet[:57] + "..."
        warnings.warn(
            f"text is {len(enc.ids) - 2} tokens long but the text encoder reads at most {keep} "
            f"(plus [CLS]/[SEP]); dropped {n_tokens} tokens, {len(dropped)} word(s): {snippet!r}",
            UserWarning,
            stacklevel=3,
        )


@functools.lru_cache(maxsize=4)
def default_tokenizer(max_length: int = 77) -> TextTokenizer:
    """A shared tokenizer on the shipped vocabulary (built and checksummed once per length)."""
    return TextTokenizer(max_length=max_length)
