"""Training data: one seeded global order of fixed-length token windows.

A text file is one document, a ``.jsonl`` file one document per line (its ``"text"``
field). Documents are tokenized with the model's tokenizer, joined with the end-of-text
token between them, and cut into windows of ``seq_len + 1`` tokens (inputs and their
next-token targets). Epoch ``e`` visits the windows in the order of a permutation seeded
by ``(seed, e)``; global batch ``b`` is the next ``size`` windows of that endless order.
Every rank computes the same order, so pipeline ``p`` takes its own contiguous slice of
each global batch without asking anyone, and the slices together are exactly the batch
one process would see.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from p2pserve.errors import ConfigError


def read_documents(path: Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--data {path} is not a file: give a text file or a .jsonl file with a \"text\" field")
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() != ".jsonl":
        return [text]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--data {path}:{n} is not JSON ({e.msg}): one {{\"text\": ...}} object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ConfigError(f"--data {path}:{n} has no string \"text\" field")
        docs.append(record["text"])
    return docs


class TokenWindows:
    """``windows``: [N, seq_len + 1] token ids."""

    def __init__(self, windows: torch.Tensor, seed: int):
        self.windows, self.seed = windows, seed
        self._epoch, self._perm = None, None  # the permutation of the epoch last visited

    @classmethod
    def from_ids(cls, ids: list[int], seq_len: int, seed: int) -> "TokenWindows":
        n = len(ids) // (seq_len + 1)
        if n == 0:
            raise ConfigError(f"the data has {len(ids)} tokens, fewer than one window of --seq-len {seq_len} "
                              f"plus its target: give more text or a shorter --seq-len")
        return cls(torch.tensor(ids[: n * (seq_len + 1)], dtype=torch.long).view(n, seq_len + 1), seed)

    @classmethod
    def from_file(cls, path, tokenizer, seq_len: int, seed: int) -> "TokenWindows":
        ids: list[int] = []
        separator = list(tokenizer.eos_token_ids[:1])
        for doc in read_documents(path):
            ids += tokenizer.encode(doc) + separator
        return cls.from_ids(ids, seq_len, seed)

    def global_batch(self, index: int, size: int) -> torch.Tensor:
        """Global batch ``index`` of ``size`` windows: [size, seq_len + 1]."""
        n = len(self.windows)
        positions = range(index * size, (index + 1) * size)
        rows = [self._order(pos // n)[pos % n] for pos in positions]
        return self.windows[torch.stack(rows)]

    def _order(self, epoch: int) -> torch.Tensor:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.windows), generator=g)
        return self._perm
