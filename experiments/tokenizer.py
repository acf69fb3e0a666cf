"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then three special ids.

No vocabulary file and no network: every string round-trips exactly, which is all the offline
corpora in ``experiments.data`` need. Models may pad their vocabulary past ``VOCAB_SIZE``;
``decode`` drops those ids, as it drops the specials.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("héllo", eos=True))
    'héllo'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

NUM_BYTES = 256
BOS = 256
EOS = 257
PAD = 258
VOCAB_SIZE = 259


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus ``BOS``, ``EOS`` and ``PAD``."""

    BOS = BOS
    EOS = EOS
    PAD = PAD
    vocab_size = VOCAB_SIZE

    def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of ``text``: optional BOS, its UTF-8 bytes, optional EOS."""
        ids = list(text.encode("utf-8"))
        if bos:
            ids.insert(0, BOS)
        if eos:
            ids.append(EOS)
        return ids

    def encode_batch(
        self, texts: Sequence[str], *, bos: bool = True, eos: bool = False
    ) -> list[list[int]]:
        """``encode`` applied to each text."""
        return [self.encode(text, bos=bos, eos=eos) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the byte ids in ``ids``; specials and ids >= ``vocab_size`` are skipped.

        Invalid UTF-8 (e.g. a sampled sequence cut mid-character) becomes U+FFFD.
        """
        data = bytes(i for i in map(int, ids) if 0 <= i < NUM_BYTES)
        return data.decode("utf-8", errors="replace")
