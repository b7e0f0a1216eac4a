"""Character tokenizer for English ASR (LibriSpeech-style transcripts).

Vocabulary (29 ids)::

    0 = " " (space), 1 = "'" (apostrophe), 2..27 = "a".."z", 28 = <blank>

The blank is deliberately the **last** id: ``torchaudio.models.RNNTBeamSearch`` treats
the last vocabulary entry as blank whatever its ``blank=`` argument says, and
``torchaudio.functional.rnnt_loss`` defaults to ``blank=-1``.  The blank is also used as
the start-of-sequence symbol fed to the RNN-T prediction network.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

__all__ = ["CharTokenizer", "normalize_text"]

_SPACE_RE = re.compile(r"\s+")
# characters mapped before filtering: typographic apostrophes -> "'", separators -> " "
_TRANSLATE = str.maketrans({"\u2019": "'", "\u2018": "'", "`": "'", "-": " ", "_": " "})


def normalize_text(text: str, alphabet: Iterable[str] = "abcdefghijklmnopqrstuvwxyz' ") -> str:
    """Lower-case, map hyphens/underscores to spaces, drop characters outside ``alphabet``
    (whitespace counts as a space), collapse runs of spaces and strip."""
    allowed = set(alphabet)
    text = _SPACE_RE.sub(" ", text.lower().translate(_TRANSLATE))
    text = "".join(ch for ch in text if ch in allowed)
    return _SPACE_RE.sub(" ", text).strip()


class CharTokenizer:
    """Characters ``a-z``, apostrophe and space, plus a final blank id.

    >>> tok = CharTokenizer()
    >>> tok.decode(tok.encode("Hello,  World!"))
    'hello world'
    >>> tok.blank_id == tok.vocab_size - 1
    True
    """

    BLANK = "<blank>"

    def __init__(self) -> None:
        self.symbols: list[str] = [" ", "'"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
        self._to_id = {s: i for i, s in enumerate(self.symbols)}
        self.blank_id: int = len(self.symbols)
        self.vocab_size: int = len(self.symbols) + 1  # + blank (last)
        self.space_id: int = self._to_id[" "]

    def normalize(self, text: str) -> str:
        return normalize_text(text, self.symbols)

    def encode(self, text: str) -> list[int]:
        """Normalise ``text`` and map it to ids (never produces the blank)."""
        return [self._to_id[ch] for ch in self.normalize(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Map ids back to text; blanks and out-of-range ids are skipped, spaces collapsed."""
        chars = []
        for i in ids:
            i = int(i)
            if 0 <= i < self.blank_id:
                chars.append(self.symbols[i])
        return _SPACE_RE.sub(" ", "".join(chars)).strip()

    def id_to_symbol(self, i: int) -> str:
        return self.BLANK if i == self.blank_id else self.symbols[i]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, blank_id={self.blank_id})"
