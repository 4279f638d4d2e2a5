"""Tokenizers: the built-in byte-level one (`tiny` and the shape presets) and `tokenizer.json` files.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `bos_token_id`,
`eos_token_id`. Nothing is downloaded: a checkpoint's `tokenizer.json` is read from disk through
the `tokenizers` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from workers.engine.errors import CheckpointError


class Tokenizer(Protocol):
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """256 byte ids, then bos=256, eos=257, pad=258 (vocab 259). `encode` prepends bos."""

    BOS = 256
    EOS = 257
    PAD = 258

    def __init__(self) -> None:
        self.vocab_size = 259
        self.bos_token_id: int | None = self.BOS
        self.eos_token_id: int | None = self.EOS
        self.pad_token_id = self.PAD

    def encode(self, text: str) -> list[int]:
        return [self.BOS, *text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class FileTokenizer:
    """A Hugging Face `tokenizer.json` loaded with the `tokenizers` package (no network)."""

    def __init__(self, path: Path, bos_token_id: int | None, eos_token_id: int | None) -> None:
        try:
            from tokenizers import Tokenizer as _HFTokenizer

            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:  # the package raises a bare Exception on malformed JSON
            raise CheckpointError(path, f"cannot read tokenizer.json ({exc})") from exc
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=True))
