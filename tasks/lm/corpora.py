"""Named text sources of the ``hf_lm`` family (``CORPORA``) and their token streams.

``demo`` is the embedded model's corpus: whole pydoc topics, split at the document level (documents that share
paragraphs stay on the same side) into ``train`` (~87 %: tokenizer, pretraining, calibration) and ``test`` (~13 %:
perplexity only). The hub corpora of the LLM compression papers are read with ``datasets`` (downloaded once into its
cache): ``wikitext2`` (wikitext-2-raw-v1, field ``text``), ``ptb`` (ptb_text_only, field ``sentence``) and two C4
protocols on the validation shard SparseGPT (arXiv 2301.00774) chose, ``en/c4-validation.00000-of-00008`` (the file
SVD-LLM and Basis Sharing read as ``c4-validation.json``):

- ``c4``: the published LLaMA tables of SVD-LLM (arXiv 2403.07378, ``get_test_data``) and Basis Sharing (arXiv
  2410.03765, ``prep_c4``): the first 2000 documents joined with "\\n\\n", every window (Basis Sharing's
  ``compute_ppl`` also scores the last, shorter window, which ``ppl_concat`` drops as SVD-LLM does);
- ``c4_sparsegpt``: SparseGPT's ``get_c4``: the first 1100 documents joined with " ", the first 256 windows.

Both calibrate on ``en/c4-train.00000-of-01024``. Local text files are read with ``read_text_file``.

A source's documents are joined with its ``join`` (``JOIN``, "\\n\\n", unless named otherwise) into one stream;
``encode_stream`` tokenizes it.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from core.errors import ConfigError

JOIN = "\n\n"


@dataclass(frozen=True)
class Corpus:
    """A named text source. ``load(split)`` returns its documents in a fixed order; ``text(split)`` joins them."""

    name: str
    description: str  # recorded as protocol/ppl/<name>/dataset: what exactly was read
    eval_split: str
    calib_split: str
    load: Callable[[str], list[str]]
    max_windows: int | None = None  # the protocol evaluates at most this many windows (SparseGPT's C4: 256)
    join: str = JOIN  # the string between documents
    # bumped whenever the protocol behind the name changes; hashed into the run id of tasks evaluating it (1: not)
    version: int = 1

    def text(self, split: str) -> str:
        """The documents of ``split`` joined with ``join``: one stream."""
        return self.join.join(self.load(split))


CORPORA: dict[str, Corpus] = {}


def register_corpus(corpus: Corpus) -> Corpus:
    if corpus.name in CORPORA:
        raise KeyError(f"corpus {corpus.name!r} is registered twice")
    CORPORA[corpus.name] = corpus
    return corpus


def pydoc_topics() -> dict[str, str]:
    """``pydoc_data.topics``: the prose shipped with Python, {topic key: text}."""
    import pydoc_data.topics

    return dict(pydoc_data.topics.topics)


def corpus_digest(docs: dict[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(docs.items())).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def demo_split(heldout_fraction: float = 0.1) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train keys, test keys) of ``pydoc_data.topics``: a fixed document-level split.

    Topics repeat one another (``compound`` contains ``if``, ``for``...), so documents that share a paragraph or
    a long line are grouped first and every group goes to one side. Groups are taken in the order of the sha256 of
    their first key, into the test split until it holds ``heldout_fraction`` of the characters (groups above 15 %
    are skipped); everything else is train.
    """
    docs = pydoc_topics()
    parent = {k: k for k in docs}

    def root(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[str, str] = {}
    for key in sorted(docs):
        text = docs[key]
        units = {p.strip() for p in text.split(JOIN) if len(p.strip()) >= 40}
        units |= {line.strip() for line in text.splitlines() if len(line.strip()) >= 60}
        for unit in units:
            if unit in owner:
                parent[root(key)] = root(owner[unit])
            else:
                owner[unit] = key
    groups: dict[str, list[str]] = {}
    for key in sorted(docs):
        groups.setdefault(root(key), []).append(key)
    total = sum(len(v) for v in docs.values())
    held: list[str] = []
    size = 0
    for group in sorted(groups.values(), key=lambda g: hashlib.sha256(g[0].encode()).hexdigest()):
        if size >= heldout_fraction * total:
            break
        chars = sum(len(docs[k]) for k in group)
        if size + chars > 0.15 * total:
            continue
        held += group
        size += chars
    test = sorted(held)
    train = sorted(k for k in docs if k not in set(held))
    return tuple(train), tuple(test)


def _load_demo(split: str) -> list[str]:
    train, test = demo_split()
    keys = {"train": train, "test": test}.get(split)
    if keys is None:
        raise ConfigError(f"corpus demo has splits train and test, not {split!r}")
    docs = pydoc_topics()
    return [docs[k] for k in keys]


def _python_version() -> str:
    import platform

    return platform.python_version()


register_corpus(Corpus(
    name="demo", description=f"pydoc_data.topics (Python {_python_version()}), whole topics sorted by key",
    eval_split="test", calib_split="train", load=_load_demo))


def hub_texts(path: str, split: str, column: str, name: str | None = None, first: int | None = None,
              **kwargs: Any) -> list[str]:
    """Column ``column`` of split ``split`` of hub dataset ``path`` (config ``name``; other keyword arguments go
    to ``datasets.load_dataset``), in the dataset's order, only the ``first`` rows when given."""
    import datasets

    ds = datasets.load_dataset(path, name, split=split, **kwargs)
    if first is not None:
        ds = ds.select(range(min(first, len(ds))))
    return list(ds[column])


def _datasets_version() -> str:
    from importlib.metadata import version

    return version("datasets")


WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
PTB = ("ptb-text-only/ptb_text_only", "penn_treebank", "refs/convert/parquet")  # the hub's parquet export
C4 = ("allenai/c4", {"validation": "en/c4-validation.00000-of-00008.json.gz",
                     "train": "en/c4-train.00000-of-01024.json.gz"})
C4_DOCS = 2000  # c4: SVD-LLM get_test_data / Basis Sharing prep_c4, every window
C4_SPARSEGPT_DOCS, C4_SPARSEGPT_WINDOWS = 1100, 256  # c4_sparsegpt: SparseGPT get_c4


def _c4_loader(name: str, eval_docs: int) -> Callable[[str], list[str]]:
    """Documents of a C4 split: the first ``eval_docs`` of the validation shard, or the whole train shard."""
    def load(split: str) -> list[str]:
        if split not in C4[1]:
            raise ConfigError(f"corpus {name} has splits {', '.join(C4[1])}, not {split!r}")
        first = eval_docs if split == "validation" else None
        return hub_texts(C4[0], split, "text", data_files={split: C4[1][split]}, first=first)
    return load


register_corpus(Corpus(
    name="wikitext2", description=f"{WIKITEXT[0]} {WIKITEXT[1]}, field text (datasets {_datasets_version()})",
    eval_split="test", calib_split="train",
    load=lambda split: hub_texts(WIKITEXT[0], split, "text", name=WIKITEXT[1])))
register_corpus(Corpus(
    name="ptb", description=f"{PTB[0]} {PTB[1]} ({PTB[2]}), field sentence (datasets {_datasets_version()})",
    eval_split="test", calib_split="train",
    load=lambda split: hub_texts(PTB[0], split, "sentence", data_dir=PTB[1], revision=PTB[2])))
register_corpus(Corpus(
    name="c4", description=f"{C4[0]} {C4[1]['validation']}, first {C4_DOCS} documents joined with '\\n\\n', every "
                           f"window (SVD-LLM / Basis Sharing), field text (datasets {_datasets_version()})",
    eval_split="validation", calib_split="train", load=_c4_loader("c4", C4_DOCS), version=2))
register_corpus(Corpus(
    name="c4_sparsegpt",
    description=f"{C4[0]} {C4[1]['validation']}, first {C4_SPARSEGPT_DOCS} documents joined with ' ', first "
                f"{C4_SPARSEGPT_WINDOWS} windows (SparseGPT), field text (datasets {_datasets_version()})",
    eval_split="validation", calib_split="train", load=_c4_loader("c4_sparsegpt", C4_SPARSEGPT_DOCS),
    max_windows=C4_SPARSEGPT_WINDOWS, join=" "))


def read_text_file(path: str | Path) -> str:
    p = Path(path).expanduser()
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"text file {p} cannot be read as UTF-8 text: {e}") from e


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def encode_stream(tokenizer, text: str, add_bos: bool) -> tuple[torch.Tensor, bool]:
    """``text`` as one 1-D token stream without the tokenizer's own special tokens, BOS prepended when ``add_bos``
    and the tokenizer has one; returns (ids, whether a BOS was prepended)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = add_bos and tokenizer.bos_token_id is not None
    if bos:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long), bos
