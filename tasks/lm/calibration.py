"""Calibration windows of the ``hf_lm`` family (``task.calib.sampling``), one sampler per published protocol.

- ``stream`` (this harness's default): the documents joined with the corpus's join into one token stream (BOS once
  at its start), ``n`` windows of ``seqlen`` tokens at uniformly random token offsets (``torch.Generator``).
- ``per_sample`` (SVD-LLM, arXiv 2403.07378, ``get_calib_train_data``): the documents joined into one text; per
  sample, a character offset ``i = randint(0, len(text) - seqlen - 1)`` (Python's ``random`` seeded with the seed;
  SVD-LLM's whitening uses its default seed 3), the characters ``text[i:i + 10 seqlen]`` tokenized on their own
  (BOS first) and the first ``seqlen`` tokens kept. As in that code, ``n + 1`` offsets are drawn, a draw shorter than
  ``seqlen`` tokens is skipped and the last kept draw is never used, so a skipped draw leaves one window fewer.
- ``rows`` (Basis Sharing, arXiv 2410.03765, ``prepare_data`` then ``torch.manual_seed(2023)``): every document
  (dataset row) tokenized on its own (BOS first), rows concatenated and cut into non-overlapping ``seqlen`` windows
  the way ``datasets.map(group_text, batched=True, batch_size=1024, num_proc=4)`` does it (4 contiguous shards,
  blocks of 1024 rows in each, each block's remainder dropped), then the windows of ``torch.randperm`` (seeded)
  first ``n``.

Every window is a LongTensor [seqlen]; ``bos=False`` (a tokenizer without BOS, or ``eval.add_bos=false``) drops
the BOS everywhere.
"""
from __future__ import annotations

import random
from typing import Sequence

import torch

from core.errors import ConfigError

SAMPLINGS = ("stream", "per_sample", "rows")
BOS_PLACEMENT = {"stream": "stream start", "per_sample": "every sample", "rows": "every row"}
PER_SAMPLE_CHARS = 10  # per_sample: characters read per sample, per token of seqlen (SVD-LLM: seqlen * 10)
ROW_SHARDS, ROW_BLOCK = 4, 1024  # rows: Basis Sharing's datasets.map(num_proc=4, batch_size=1024)


def _encode(tokenizer, texts: list[str], bos: bool) -> list[list[int]]:
    """Token ids of every text without the tokenizer's own special tokens, the BOS first when ``bos``."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []
    head = [tokenizer.bos_token_id] if bos else []
    return [head + list(x) for x in ids]


def stream_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int) -> list[torch.Tensor]:
    """``n`` windows of the 1-D stream ``ids`` at offsets ``torch.randint(0, numel - seqlen + 1)`` (seeded)."""
    if ids.numel() < seqlen:
        raise ConfigError(f"task.calib.seqlen={seqlen} exceeds the {ids.numel()}-token calibration text")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (n,), generator=gen).tolist()
    return [ids[s:s + seqlen] for s in starts]


def per_sample_windows(tokenizer, text: str, n: int, seqlen: int, seed: int, bos: bool) -> list[torch.Tensor]:
    """SVD-LLM's samples (module docstring): at most ``n`` windows, each tokenized on its own."""
    if len(text) < seqlen + 1:
        raise ConfigError(f"task.calib.seqlen={seqlen}: the calibration text has only {len(text)} characters")
    rng = random.Random(seed)
    kept = []
    for _ in range(n + 1):
        i = rng.randint(0, len(text) - seqlen - 1)
        ids = _encode(tokenizer, [text[i:i + PER_SAMPLE_CHARS * seqlen]], bos)[0]
        if len(ids) >= seqlen:
            kept.append(torch.tensor(ids[:seqlen], dtype=torch.long))
    if len(kept) < 2:
        raise ConfigError(f"task.calib.seqlen={seqlen}: no sample of the calibration text is that long in tokens")
    return kept[:-1]


def row_blocks(n_rows: int, shards: int = ROW_SHARDS, block: int = ROW_BLOCK) -> list[tuple[int, int]]:
    """(start, end) row ranges of ``datasets.map(batched=True, batch_size=block, num_proc=shards)``: ``shards``
    contiguous shards (the first ``n_rows % shards`` one row longer), each cut into blocks of ``block`` rows."""
    shards = max(1, min(shards, n_rows))
    div, mod = divmod(n_rows, shards)
    out = []
    for k in range(shards):
        start = div * k + min(k, mod)
        end = start + div + (1 if k < mod else 0)
        out += [(s, min(s + block, end)) for s in range(start, end, block)]
    return out


def row_windows(tokenizer, docs: Sequence[str], n: int, seqlen: int, seed: int, bos: bool) -> list[torch.Tensor]:
    """Basis Sharing's samples (module docstring): the first ``n`` of the permuted row windows."""
    windows = []
    for start, end in row_blocks(len(docs)):  # tokenized a block at a time: a C4 shard's ids never all in lists
        flat = torch.tensor([t for row in _encode(tokenizer, list(docs[start:end]), bos) for t in row],
                            dtype=torch.long)
        windows += list(flat[: flat.numel() // seqlen * seqlen].view(-1, seqlen))
    if not windows:
        raise ConfigError(f"task.calib.seqlen={seqlen} exceeds every block of calibration rows")
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [windows[i] for i in order]
