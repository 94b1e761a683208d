"""Byte-level tokenizer: UTF-8 bytes plus three special tokens.

Ids 0..255 are the raw bytes, then ``BOS`` (256), ``EOS`` (257) and ``PAD`` (258), so the
vocabulary has 259 entries and the built-in model needs no vocabulary file. Any Unicode text
round-trips exactly through ``encode``/``decode``.
"""

from __future__ import annotations

from collections.abc import Sequence


class ByteTokenizer:
    """UTF-8 byte tokenizer with BOS/EOS/PAD specials."""

    name = "byte-utf8-v1"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``: its UTF-8 bytes, optionally framed by BOS/EOS."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped (or rendered as ``<bos>`` etc.)."""
        out = bytearray()
        specials = {self.bos_id: b"<bos>", self.eos_id: b"<eos>", self.pad_id: b"<pad>"}
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            elif i in specials:
                if not skip_special:
                    out.extend(specials[i])
            else:
                raise ValueError(
                    f"token id {i} is outside the byte vocabulary (0..{self.vocab_size - 1})"
                )
        return out.decode("utf-8", errors="replace")

    def identity(self) -> dict[str, object]:
        """What a checkpoint records to prove it was trained with this tokenizer."""
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }
