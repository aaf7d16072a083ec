"""Causal language models from transformers (family ``hf_lm``): perplexity, calibration windows, example inputs.

The model is a hub id, a local ``save_pretrained`` directory, or ``embedded``: a small LLaMA-architecture model
pretrained on first use on the prose shipped with Python (``pydoc_data.topics``), with its own byte-level BPE
tokenizer, so the whole pipeline runs offline on a CPU. The embedded model is cached under
``<cache_dir>/hf_lm/embedded-<hash>/`` (``save_pretrained`` format); the hash covers its recipe and the corpus.

Perplexity (``ppl_concat``, the SparseGPT / Wanda ``eval_ppl`` protocol): a split's documents are joined with
"\\n\\n" and tokenized as one stream (BOS prepended once, explicitly, when ``eval.add_bos``), cut into
``numel // seqlen`` non-overlapping windows (remainder dropped), and ppl = exp(mean over windows of the per-window
mean next-token NLL). Every qualifier of the number is returned as a ``protocol/...`` field.

Named text sources live in ``CORPORA``. ``demo`` is the embedded model's corpus: whole pydoc topics, split at the
document level (documents that share paragraphs stay on the same side) into ``train`` (~87 %: tokenizer,
pretraining, calibration) and ``test`` (~13 %: perplexity only). The hub corpora of the LLM compression papers are
read with ``datasets`` (downloaded once into its cache): ``wikitext2`` (wikitext-2-raw-v1, field ``text``),
``ptb`` (ptb_text_only, field ``sentence``) and ``c4`` (SparseGPT's shard: the first 1100 documents of
``en/c4-validation.00000-of-00008``, at most 256 windows; calibration from ``en/c4-train.00000-of-01024``).
``eval.text_files`` evaluates any local text file, for clusters without hub access.

Zero-shot accuracy (``zeroshot.tasks``) runs lm-eval's ``simple_evaluate`` on the in-memory model (``HFLM``), so
a compressed model is scored as it is, and reports ``zeroshot/<task>/{acc,acc_stderr,acc_norm,acc_norm_stderr}``,
their mean over tasks ``zeroshot/mean/acc`` (and ``acc_norm``), the lm-eval version and every task's version.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core.errors import ConfigError
from core.io import file_lock, stable_hash, write_json_atomic
from tasks.base import TASKS, Task, TaskConfig

log = logging.getLogger(__name__)

JOIN = "\n\n"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EMBEDDED = "embedded"
# bump when a change to the corpus split, tokenizer or pretraining recipe makes cached embedded models stale
EMBEDDED_VERSION = 1
EMBEDDED_MAX_POSITIONS = 2048
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*$")


# -- configuration -------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Perplexity sets: named corpora (``CORPORA``) and local text files, each reported as ``ppl/<name>``."""

    datasets: list[str] = field(default_factory=list)
    text_files: dict[str, str] = field(default_factory=dict)  # {name: path}; the file's text is the stream as is
    max_windows: int | None = None  # evaluate only the first windows of every set (smoke tests); None: all
    add_bos: bool = True  # prepend the tokenizer's BOS once at the start of each stream (LLaMA's default)

    def __post_init__(self) -> None:
        if self.max_windows is not None and self.max_windows < 1:
            raise ConfigError(f"task.eval.max_windows={self.max_windows} must be >= 1 (or null for all windows)")
        for name in self.text_files:
            if not _NAME.match(str(name)):
                raise ConfigError(f"task.eval.text_files name {name!r} must be a plain name (letters, digits, _.-)")
        clash = set(self.datasets) & set(self.text_files)
        if clash:
            raise ConfigError(f"task.eval: {', '.join(sorted(clash))} named both in datasets and in text_files")
        if len(set(self.datasets)) != len(self.datasets):
            raise ConfigError(f"task.eval.datasets={list(self.datasets)} lists a dataset twice")


@dataclass
class CalibConfig:
    """Calibration windows for post-training methods: random ``seqlen``-token windows of one token stream."""

    dataset: str | None = None  # a corpus in CORPORA (its calibration split); None: text_files
    text_files: list[str] = field(default_factory=list)  # local files, joined with "\n\n"
    n_samples: int = 256
    seqlen: int = 2048

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ConfigError(f"task.calib.n_samples={self.n_samples} must be >= 1")
        if self.seqlen < 2:
            raise ConfigError(f"task.calib.seqlen={self.seqlen} must be >= 2")
        if self.dataset and self.text_files:
            raise ConfigError("task.calib: set either dataset or text_files, not both")


@dataclass
class ZeroShotConfig:
    """lm-eval tasks scored on the in-memory model (0-shot multiple choice in the papers)."""

    tasks: list[str] = field(default_factory=list)  # e.g. openbookqa, arc_easy, arc_challenge, winogrande, ...
    batch_size: int = 32  # fixed, never "auto", so padding and results do not depend on the GPU
    num_fewshot: int = 0
    limit: int | None = None  # first examples of every task only (smoke tests); None: all
    include_path: str | None = None  # a folder of extra lm-eval task YAMLs (local or offline tasks)
    include_defaults: bool = True  # lm-eval's built-in tasks; false with include_path skips indexing them

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"task.zeroshot.batch_size={self.batch_size} must be >= 1")
        if self.num_fewshot < 0:
            raise ConfigError(f"task.zeroshot.num_fewshot={self.num_fewshot} must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"task.zeroshot.limit={self.limit} must be >= 1 (or null for all examples)")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"task.zeroshot.tasks={list(self.tasks)} lists a task twice")
        if self.tasks and not self.include_defaults and not self.include_path:
            raise ConfigError("task.zeroshot: include_defaults=false needs an include_path with the task YAMLs")


@dataclass
class EmbeddedConfig:
    """Recipe of the embedded demo model (LLaMA architecture, pretrained on the ``demo`` train split on CPU)."""

    vocab_size: int = 2000
    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    train_seqlen: int = 128
    steps: int = 400
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 30
    seed: int = 0  # pretraining seed, independent of the run seed (the dense model is a fixed checkpoint)

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ConfigError(f"task.embedded.vocab_size={self.vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} "
                              "(the byte alphabet plus special tokens)")
        for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"task.embedded.{key}={getattr(self, key)} must be >= 1")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ConfigError(f"task.embedded.hidden_size={self.hidden_size} must be num_heads={self.num_heads} "
                              "times an even head size")
        if not 2 <= self.train_seqlen <= EMBEDDED_MAX_POSITIONS:
            raise ConfigError(f"task.embedded.train_seqlen={self.train_seqlen} must be in [2, "
                              f"{EMBEDDED_MAX_POSITIONS}]")
        if not self.lr > 0 or self.warmup_steps < 0:
            raise ConfigError(f"task.embedded.lr={self.lr} must be > 0 and warmup_steps={self.warmup_steps} >= 0")


@dataclass
class HfLmConfig(TaskConfig):
    family: str = "hf_lm"
    model: str = EMBEDDED  # a hub id, a local save_pretrained directory, or "embedded"
    revision: str | None = None  # hub revision (branch, tag or commit) to pin
    dtype: str = "float32"  # float32 | bfloat16 | float16: the dtype the model is loaded and evaluated in
    device_map: str | None = None  # transformers device_map (e.g. auto); None: the whole model on the run's device
    trust_remote_code: bool = False
    seqlen: int = 2048  # perplexity window, always taken from here, never from the model config
    eval_batch_size: int = 1  # windows per forward during evaluation
    eval: EvalConfig = field(default_factory=EvalConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model:
            raise ConfigError("task.model is empty: give a hub id, a local directory or 'embedded'")
        if self.dtype not in DTYPES:
            raise ConfigError(f"task.dtype={self.dtype!r}; valid: {', '.join(DTYPES)}")
        if self.seqlen < 2:
            raise ConfigError(f"task.seqlen={self.seqlen} must be >= 2 (one predicted token per window at least)")
        if self.eval_batch_size < 1:
            raise ConfigError(f"task.eval_batch_size={self.eval_batch_size} must be >= 1")
        if self.measure.seqlen < 1:
            raise ConfigError(f"task.measure.seqlen={self.measure.seqlen} must be >= 1")
        if not self.eval.datasets and not self.eval.text_files:
            raise ConfigError("task.eval has no evaluation set: list eval.datasets or eval.text_files")


# -- text sources --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Corpus:
    """A named text source. ``load(split)`` returns its documents in a fixed order; they are joined with "\\n\\n"."""

    name: str
    description: str  # recorded as protocol/ppl/<name>/dataset: what exactly was read
    eval_split: str
    calib_split: str
    load: Callable[[str], list[str]]
    max_windows: int | None = None  # the protocol evaluates at most this many windows (C4: 256); None: all


CORPORA: dict[str, Corpus] = {}


def register_corpus(corpus: Corpus) -> Corpus:
    if corpus.name in CORPORA:
        raise KeyError(f"corpus {corpus.name!r} is registered twice")
    CORPORA[corpus.name] = corpus
    return corpus


def _topics() -> dict[str, str]:
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
    docs = _topics()
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
    docs = _topics()
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
C4_EVAL_DOCS, C4_EVAL_WINDOWS = 1100, 256


def _load_c4(split: str) -> list[str]:
    if split not in C4[1]:
        raise ConfigError(f"corpus c4 has splits {', '.join(C4[1])}, not {split!r}")
    first = C4_EVAL_DOCS if split == "validation" else None
    return hub_texts(C4[0], split, "text", data_files={split: C4[1][split]}, first=first)


register_corpus(Corpus(
    name="wikitext2", description=f"{WIKITEXT[0]} {WIKITEXT[1]}, field text (datasets {_datasets_version()})",
    eval_split="test", calib_split="train",
    load=lambda split: hub_texts(WIKITEXT[0], split, "text", name=WIKITEXT[1])))
register_corpus(Corpus(
    name="ptb", description=f"{PTB[0]} {PTB[1]} ({PTB[2]}), field sentence (datasets {_datasets_version()})",
    eval_split="test", calib_split="train",
    load=lambda split: hub_texts(PTB[0], split, "sentence", data_dir=PTB[1], revision=PTB[2])))
register_corpus(Corpus(
    name="c4", description=f"{C4[0]} {C4[1]['validation']}, first {C4_EVAL_DOCS} documents, field text "
                           f"(datasets {_datasets_version()})",
    eval_split="validation", calib_split="train", load=_load_c4, max_windows=C4_EVAL_WINDOWS))


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


def _looks_like_path(model: str) -> bool:
    """Whether ``model`` names a local directory rather than a hub id (``org/name`` or ``name``)."""
    return (model.startswith(("/", "./", "../", "~")) or os.path.isabs(model) or not _HUB_ID.match(model)
            or Path(model).expanduser().exists())


# -- perplexity ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def ppl_concat(model: nn.Module, token_ids: torch.Tensor, seqlen: int, batch_size: int, device: torch.device | str,
               max_windows: int | None = None, progress: bool = True, desc: str = "ppl") -> dict[str, Any]:
    """Perplexity of one token stream, the SparseGPT / Wanda ``eval_ppl`` protocol.

    ``token_ids`` (1-D) is cut into ``n = numel // seqlen`` non-overlapping windows ``ids[i*seqlen:(i+1)*seqlen]``;
    the remainder is dropped and, with ``max_windows``, only the first ``max_windows`` windows are kept. For every
    window, loss_i is the mean next-token NLL of its ``seqlen - 1`` shifted targets; then
    ``ppl = exp(sum_i(loss_i * seqlen) / (n * seqlen)) = exp(mean_i loss_i)``.

    Logits are cast to float32 before the log-softmax and the per-window losses are summed in float64, whatever
    the model's dtype. Windows go through the model ``batch_size`` at a time, so at most one batch of logits is
    held. Returns ``ppl``, ``loss`` (mean_i loss_i), ``n_windows``, ``n_tokens`` (stream length) and ``n_dropped``
    (tokens in no evaluated window).
    """
    ids = token_ids.reshape(-1).long()
    if seqlen < 2:
        raise ConfigError(f"seqlen={seqlen} must be >= 2")
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ConfigError(f"{desc}: the stream has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    kwargs = {"use_cache": False} if getattr(model, "config", None) is not None else {}
    losses = torch.empty(n, dtype=torch.float64)
    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=desc, total=len(starts), disable=not progress, leave=False, dynamic_ncols=True):
        batch = windows[start:start + batch_size].to(device)
        out = model(input_ids=batch, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        shifted = logits[:, :-1, :].float()
        nll = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), batch[:, 1:].reshape(-1).to(shifted.device),
                              reduction="none")
        losses[start:start + batch.shape[0]] = nll.view(batch.shape[0], seqlen - 1).double().mean(dim=1).cpu()
        del out, logits, shifted, nll
    loss = float(losses.sum() * seqlen / (n * seqlen))
    try:
        ppl = math.exp(loss)
    except OverflowError:
        ppl = math.inf
    return {"ppl": ppl, "loss": loss, "n_windows": n,
            "n_tokens": ids.numel(), "n_dropped": ids.numel() - n * seqlen}


# -- the embedded model --------------------------------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) trained on ``texts``; BOS <s>, EOS </s>, PAD <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=EMBEDDED_MAX_POSITIONS)


def embedded_llama_config(ecfg: EmbeddedConfig, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=ecfg.hidden_size, intermediate_size=ecfg.intermediate_size,
        num_hidden_layers=ecfg.num_layers, num_attention_heads=ecfg.num_heads, num_key_value_heads=ecfg.num_heads,
        max_position_embeddings=EMBEDDED_MAX_POSITIONS, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def encode_stream(tokenizer, text: str, add_bos: bool) -> tuple[torch.Tensor, bool]:
    """``text`` as one 1-D token stream without the tokenizer's own special tokens, BOS prepended when ``add_bos``
    and the tokenizer has one; returns (ids, whether a BOS was prepended)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = add_bos and tokenizer.bos_token_id is not None
    if bos:
        ids = [tokenizer.bos_token_id, *ids]
    return torch.tensor(ids, dtype=torch.long), bos


def _pretrain(ecfg: EmbeddedConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train the tokenizer and the model on the demo train split (on CPU) and ``save_pretrained`` both to
    ``out_dir``. AdamW (betas 0.9/0.95, weight decay 0.1), linear warm-up then cosine decay to 10 %, gradient
    clipping at 1, random ``train_seqlen`` windows of the BOS-prefixed "\\n\\n"-joined stream."""
    from transformers import LlamaForCausalLM

    t0 = time.perf_counter()
    train_docs = CORPORA["demo"].load("train")
    tokenizer = train_tokenizer(train_docs, ecfg.vocab_size)
    stream, _ = encode_stream(tokenizer, JOIN.join(train_docs), add_bos=True)
    if stream.numel() <= ecfg.train_seqlen:
        raise ConfigError(f"task.embedded.train_seqlen={ecfg.train_seqlen} exceeds the {stream.numel()}-token corpus")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ecfg.seed)
        model = LlamaForCausalLM(embedded_llama_config(ecfg, tokenizer))
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=ecfg.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / ecfg.warmup_steps) if ecfg.warmup_steps else 1.0
        return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / ecfg.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(ecfg.seed)
    offsets = torch.arange(ecfg.train_seqlen)
    losses = []
    bar = tqdm(range(ecfg.steps), desc="pretrain embedded LM", disable=not progress, leave=False, dynamic_ncols=True)
    for _ in bar:
        starts = torch.randint(0, stream.numel() - ecfg.train_seqlen + 1, (ecfg.batch_size, 1), generator=gen)
        batch = stream[starts + offsets]
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    model.config.use_cache = False
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_tokens": stream.numel(), "tokens_seen": ecfg.steps * ecfg.batch_size * ecfg.train_seqlen,
            "final_train_loss": sum(tail) / len(tail), "pretrain_s": time.perf_counter() - t0,
            "params": sum(p.numel() for p in model.parameters()), "torch_threads": torch.get_num_threads()}


def embedded_key(ecfg: EmbeddedConfig) -> str:
    return stable_hash({"version": EMBEDDED_VERSION, "embedded": dataclasses.asdict(ecfg),
                        "corpus": corpus_digest(_topics())})


def ensure_embedded(ecfg: EmbeddedConfig, cache_dir: Path, progress: bool = True) -> Path:
    """The cached embedded model's directory, pretraining it first if needed (once, under a file lock; built in a
    temporary folder and renamed, so an interrupted build leaves no partial cache)."""
    root = Path(cache_dir) / "hf_lm"
    key = embedded_key(ecfg)
    final = root / f"embedded-{key}"
    if (final / "embedded.json").is_file():
        return final
    with file_lock(root / f"embedded-{key}.lock"):
        if (final / "embedded.json").is_file():
            return final
        for stale in root.glob(f".embedded-{key}-*"):  # left by a build that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete (no embedded.json), e.g. written by hand: rebuild it
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".embedded-{key}-", dir=root))
        try:
            log.info("pretraining the embedded LM into %s", final)
            meta = _pretrain(ecfg, tmp, progress)
            train, test = demo_split()
            meta.update(config=dataclasses.asdict(ecfg), version=EMBEDDED_VERSION, corpus=CORPORA["demo"].description,
                        corpus_sha256=corpus_digest(_topics()), train_docs=train, test_docs=test)
            write_json_atomic(tmp / "embedded.json", meta)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("embedded LM: %d params, final train loss %.3f, %.1f s", meta["params"], meta["final_train_loss"],
                 meta["pretrain_s"])
    return final


# -- the task ------------------------------------------------------------------------------------------------------
@TASKS.register("hf_lm")
class HfLmTask(Task):
    """A transformers causal LM evaluated by perplexity (``ppl/<set>``, lower is better)."""

    config_class = HfLmConfig
    cfg: HfLmConfig
    generates = True

    def __init__(self, cfg: HfLmConfig, cache_dir: Path, device: torch.device, progress: bool = True):
        super().__init__(cfg, cache_dir, device, progress)
        self.tokenizer = None
        self.vocab_size: int | None = None
        self._streams: dict[str, tuple[torch.Tensor, bool, dict[str, str]]] = {}
        self._calib_ids: torch.Tensor | None = None
        self._input_device: torch.device = torch.device(device)

    # -- configuration ---------------------------------------------------------------------------------------------
    @property
    def eval_sets(self) -> list[str]:
        return [*self.cfg.eval.datasets, *self.cfg.eval.text_files]

    def semantic_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.cfg)
        d.pop("device_map")  # placement does not change results
        if self.cfg.model != EMBEDDED:
            d.pop("embedded")
        return d

    def main_metric(self) -> tuple[str, bool]:
        return (f"ppl/{self.eval_sets[0]}", False)

    def summary(self) -> dict[str, str]:
        return {"model": self.cfg.name, "dataset": self.eval_sets[0]}

    def check(self) -> None:
        cfg = self.cfg
        if cfg.model != EMBEDDED and _looks_like_path(cfg.model):
            p = Path(cfg.model).expanduser()
            if not p.is_dir():
                raise ConfigError(f"task.model={cfg.model}: no such local model directory")
            if not (p / "config.json").is_file():
                raise ConfigError(f"task.model={cfg.model}: not a save_pretrained directory (no config.json)")
        unknown = [d for d in cfg.eval.datasets if d not in CORPORA]
        if unknown:
            raise ConfigError(f"task.eval.datasets: unknown {', '.join(unknown)}; valid: {', '.join(sorted(CORPORA))}")
        if cfg.calib.dataset and cfg.calib.dataset not in CORPORA:
            raise ConfigError(f"task.calib.dataset={cfg.calib.dataset!r} is unknown; valid: "
                              f"{', '.join(sorted(CORPORA))}")
        for name, path in cfg.eval.text_files.items():
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"task.eval.text_files.{name}={path}: no such file")
        for path in cfg.calib.text_files:
            if not Path(path).expanduser().is_file():
                raise ConfigError(f"task.calib.text_files: {path}: no such file")
        if cfg.zeroshot.include_path and not Path(cfg.zeroshot.include_path).expanduser().is_dir():
            raise ConfigError(f"task.zeroshot.include_path={cfg.zeroshot.include_path}: no such directory")

    # -- the dense model -------------------------------------------------------------------------------------------
    def build_model(self, seed: int) -> nn.Module:
        """The dense model in eval mode (the run seed does not change it: it is a fixed pretrained checkpoint)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = self.cfg
        kwargs: dict[str, Any] = {"dtype": DTYPES[cfg.dtype]}
        if cfg.model == EMBEDDED:
            source = str(ensure_embedded(cfg.embedded, self.cache_dir, self.progress))
        else:
            source = str(Path(cfg.model).expanduser()) if _looks_like_path(cfg.model) else cfg.model
            kwargs.update(trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
        self.tokenizer = AutoTokenizer.from_pretrained(
            source, **{k: v for k, v in kwargs.items() if k in ("trust_remote_code", "revision")})
        if cfg.device_map is not None:
            kwargs["device_map"] = cfg.device_map
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if cfg.device_map is None:
            model.to(self.device)
        self._input_device = model.get_input_embeddings().weight.device
        model.config.use_cache = False  # prefill-only forwards everywhere (perplexity, calibration, latency)
        self.vocab_size = model.config.vocab_size
        self._streams.clear()
        self._calib_ids = None
        return model.eval()

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("hf_lm: build_model() loads the tokenizer; call it first")
        return self.tokenizer

    def tokenizer_name(self) -> str:
        tok = self._require_tokenizer()
        name = f"embedded-{embedded_key(self.cfg.embedded)}" if self.cfg.model == EMBEDDED else self.cfg.model
        return f"{name} ({type(tok).__name__}, vocab {len(tok)})"

    # -- text ------------------------------------------------------------------------------------------------------
    def _eval_text(self, name: str) -> tuple[str, dict[str, str]]:
        """The stream text of eval set ``name`` and its ``dataset``/``split`` protocol fields."""
        if name in self.cfg.eval.text_files:
            path = self.cfg.eval.text_files[name]
            return read_text_file(path), {"dataset": f"file {Path(path).name} sha256:{file_sha256(path)}",
                                          "split": "whole file"}
        corpus = CORPORA[name]
        return JOIN.join(corpus.load(corpus.eval_split)), {"dataset": corpus.description, "split": corpus.eval_split}

    def eval_stream(self, name: str) -> tuple[torch.Tensor, bool, dict[str, str]]:
        """(token ids, whether BOS was prepended, protocol fields) of eval set ``name``, tokenized once."""
        if name not in self._streams:
            text, info = self._eval_text(name)
            self._streams[name] = (*encode_stream(self._require_tokenizer(), text, self.cfg.eval.add_bos), info)
        return self._streams[name]

    def calib_text(self) -> str:
        c = self.cfg.calib
        if c.dataset:
            corpus = CORPORA[c.dataset]
            return JOIN.join(corpus.load(corpus.calib_split))
        if c.text_files:
            return JOIN.join(read_text_file(p) for p in c.text_files)
        raise ConfigError("task.calib has no data: set task.calib.dataset or task.calib.text_files")

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"protocol/ppl_method": "ppl_concat", "protocol/seqlen": cfg.seqlen, "protocol/join": JOIN,
                               "protocol/dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                               "protocol/tokenizer": self.tokenizer_name(),
                               "protocol/max_windows": cfg.eval.max_windows}
        bos_flags = []
        was_training = model.training
        model.eval()
        try:
            for name in self.eval_sets:
                ids, bos, info = self.eval_stream(name)
                bos_flags.append(bos)
                r = ppl_concat(model, ids, cfg.seqlen, cfg.eval_batch_size, self._input_device,
                               self._window_limit(name), progress=self.progress, desc=f"ppl/{name}")
                out[f"ppl/{name}"] = r["ppl"]
                out[f"loss/{name}"] = r["loss"]
                out[f"protocol/ppl/{name}/dataset"] = info["dataset"]
                out[f"protocol/ppl/{name}/split"] = info["split"]
                out[f"protocol/n_windows/{name}"] = r["n_windows"]
                out[f"protocol/n_tokens/{name}"] = r["n_tokens"]
            if cfg.zeroshot.tasks:
                out.update(self.zeroshot(model))
        finally:
            model.train(was_training)
        out["protocol/bos"] = all(bos_flags)
        return out

    def _window_limit(self, name: str) -> int | None:
        """The most windows eval set ``name`` evaluates: its protocol's cap (C4: 256) and ``eval.max_windows``."""
        caps = [self.cfg.eval.max_windows]
        if name in CORPORA and name not in self.cfg.eval.text_files:
            caps.append(CORPORA[name].max_windows)
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def zeroshot(self, model: nn.Module) -> dict[str, Any]:
        """lm-eval's ``simple_evaluate`` of ``zeroshot.tasks`` on ``model`` as it is in memory (seeds 0):
        ``zeroshot/<task>/<metric>`` for acc, acc_norm and their standard errors where the task reports them,
        ``zeroshot/mean/<metric>`` over the tasks, and ``protocol/zeroshot/...`` (lm-eval version, task
        versions, examples per task, shots, batch size, limit)."""
        import copy
        from importlib.metadata import version

        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        z = self.cfg.zeroshot
        lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(self._require_tokenizer()), batch_size=z.batch_size,
                  max_length=self.cfg.seqlen)
        manager = TaskManager(include_path=z.include_path, include_defaults=z.include_defaults)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(z.tasks), task_manager=manager, num_fewshot=z.num_fewshot,
                                      limit=z.limit, log_samples=False, random_seed=0, numpy_random_seed=0,
                                      torch_random_seed=0, fewshot_random_seed=0)
        out: dict[str, Any] = {"protocol/zeroshot/lm_eval": version("lm_eval"),
                               "protocol/zeroshot/num_fewshot": z.num_fewshot,
                               "protocol/zeroshot/batch_size": z.batch_size, "protocol/zeroshot/limit": z.limit}
        means: dict[str, list[float]] = {}
        for name in z.tasks:
            scores = res["results"].get(name)
            if scores is None:
                raise ConfigError(f"task.zeroshot: lm-eval returned no result for {name!r}")
            for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
                value = scores.get(f"{metric},none")
                if isinstance(value, (int, float)):
                    out[f"zeroshot/{name}/{metric}"] = float(value)
                    if not metric.endswith("stderr"):
                        means.setdefault(metric, []).append(float(value))
            out[f"protocol/zeroshot/{name}/version"] = str(res["versions"].get(name))
            out[f"protocol/zeroshot/{name}/n"] = int(res["n-samples"][name]["effective"])
        for metric, values in means.items():
            if len(values) == len(z.tasks):
                out[f"zeroshot/mean/{metric}"] = sum(values) / len(values)
        return out

    # -- calibration and measurement inputs ------------------------------------------------------------------------
    def calibration_batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """``calib.n_samples`` windows of ``calib.seqlen`` tokens at uniformly random offsets of the calibration
        stream (a ``torch.Generator`` seeded with ``seed``), each ``{"input_ids": LongTensor[1, seqlen]}``."""
        c = self.cfg.calib
        if self._calib_ids is None:
            self._calib_ids = encode_stream(self._require_tokenizer(), self.calib_text(), self.cfg.eval.add_bos)[0]
        ids = self._calib_ids
        if ids.numel() < c.seqlen:
            raise ConfigError(f"task.calib.seqlen={c.seqlen} exceeds the {ids.numel()}-token calibration text")
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - c.seqlen + 1, (c.n_samples,), generator=gen).tolist()
        for s in starts:
            yield {"input_ids": ids[s:s + c.seqlen].unsqueeze(0).to(self._input_device)}

    def _vocab(self) -> int:
        if self.vocab_size is not None:
            return self.vocab_size
        if self.cfg.model == EMBEDDED:
            return self.cfg.embedded.vocab_size
        raise RuntimeError("hf_lm: build_model() determines the vocabulary; call it first")

    def example_inputs(self) -> tuple[torch.Tensor]:
        """Deterministic token ids of shape [measure.batch_size, measure.seqlen]."""
        m = self.cfg.measure
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, self._vocab(), (m.batch_size, m.seqlen), generator=gen)
        return (ids.to(self._input_device),)

    def items_per_forward(self) -> int:
        return self.cfg.measure.batch_size * self.cfg.measure.seqlen

    def decode_prompt(self, n_tokens: int) -> torch.Tensor:
        """Deterministic token ids [1, n_tokens] (the first row of a seed-1 draw)."""
        gen = torch.Generator().manual_seed(1)
        return torch.randint(0, self._vocab(), (1, n_tokens), generator=gen).to(self._input_device)
