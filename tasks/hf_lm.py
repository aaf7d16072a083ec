"""Causal language models from transformers (family ``hf_lm``): perplexity, calibration windows, example inputs.

The model is a hub id, a local ``save_pretrained`` directory, or ``embedded``: a small LLaMA-architecture model
pretrained on first use on the prose shipped with Python (tasks/lm/embedded.py), so the whole pipeline runs offline
on a CPU. Perplexity follows ``ppl_concat`` (tasks/lm/perplexity.py) on named corpora (``CORPORA``,
tasks/lm/corpora.py) or local text files (``eval.text_files``, for clusters without hub access); every qualifier of
the number is returned as a ``protocol/...`` field. ``zeroshot.tasks`` adds lm-eval zero-shot accuracy
(tasks/lm/zeroshot.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from core.errors import ConfigError
from tasks.base import TASKS, Task, TaskConfig
from tasks.lm.calibration import BOS_PLACEMENT, SAMPLINGS, per_sample_windows, row_windows, stream_windows
from tasks.lm.corpora import CORPORA, JOIN, encode_stream, file_sha256, read_text_file
from tasks.lm.embedded import EMBEDDED, EmbeddedConfig, embedded_key, embedded_llama_config, ensure_embedded
from tasks.lm.perplexity import ppl_concat
from tasks.lm.zeroshot import ZeroShotConfig, zeroshot_scores

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    """Calibration windows for post-training methods: ``n_samples`` windows of ``seqlen`` tokens drawn by one of the
    published samplers (``sampling``, tasks/lm/calibration.py): ``stream`` (random windows of one token stream, BOS
    once), ``per_sample`` (SVD-LLM: each sample tokenized on its own, BOS each; its seed 3), ``rows`` (Basis Sharing:
    every document tokenized with a BOS, permuted fixed windows; its seed 2023)."""

    dataset: str | None = None  # a corpus in CORPORA (its calibration split); None: text_files
    text_files: list[str] = field(default_factory=list)  # local files (each one document), joined with "\n\n"
    n_samples: int = 256
    seqlen: int = 2048
    sampling: str = "stream"  # stream | per_sample | rows
    seed: int | None = None  # the sampler's seed; None: the run's seed

    def __post_init__(self) -> None:
        if self.n_samples < 1:
            raise ConfigError(f"task.calib.n_samples={self.n_samples} must be >= 1")
        if self.seqlen < 2:
            raise ConfigError(f"task.calib.seqlen={self.seqlen} must be >= 2")
        if self.dataset and self.text_files:
            raise ConfigError("task.calib: set either dataset or text_files, not both")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"task.calib.sampling={self.sampling!r}; valid: {', '.join(SAMPLINGS)}")
        if self.seed is not None and self.seed < 0:
            raise ConfigError(f"task.calib.seed={self.seed} must be >= 0 (or null: the run's seed)")


# fields added after run ids existed: hashed only when they differ from these values, the behaviour before them
CALIB_LEGACY = {"sampling": "stream", "seed": None}


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


def _looks_like_path(model: str) -> bool:
    """Whether ``model`` names a local directory rather than a hub id (``org/name`` or ``name``)."""
    return (model.startswith(("/", "./", "../", "~")) or os.path.isabs(model) or not _HUB_ID.match(model)
            or Path(model).expanduser().exists())


class _RecipeTokenizer:
    """What ``embedded_llama_config`` reads of a tokenizer, from the recipe: the skeleton of an embedded model that
    is not pretrained yet (its BPE vocabulary has ``vocab_size`` entries)."""

    bos_token_id = eos_token_id = pad_token_id = None

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


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
        self._calib: dict[int, list[torch.Tensor]] = {}  # calibration windows per sampler seed
        self._input_device: torch.device = torch.device(device)

    # -- configuration ---------------------------------------------------------------------------------------------
    @property
    def eval_sets(self) -> list[str]:
        return [*self.cfg.eval.datasets, *self.cfg.eval.text_files]

    def semantic_config(self) -> dict[str, Any]:
        """The config minus placement, with the calibration fields at their legacy values left out and the version
        of every evaluated corpus whose protocol changed since run ids existed (``Corpus.version``) added, so the
        run id changes exactly when the numbers can."""
        d = dataclasses.asdict(self.cfg)
        d.pop("device_map")  # placement does not change results
        if self.cfg.model != EMBEDDED:
            d.pop("embedded")
        for key, legacy in CALIB_LEGACY.items():
            if d["calib"][key] == legacy:
                d["calib"].pop(key)
        versions = {n: CORPORA[n].version for n in self.cfg.eval.datasets if n in CORPORA and CORPORA[n].version != 1}
        if versions:
            d["eval"]["corpus_versions"] = versions
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
        self._calib.clear()
        return model.eval()

    # -- structure checks before any weights load (runners.plan) ----------------------------------------------------
    def _source(self) -> str | None:
        """The folder or hub id the config and tokenizer load from; None for an embedded model not pretrained yet."""
        if self.cfg.model == EMBEDDED:
            folder = self.cache_dir / "hf_lm" / f"embedded-{embedded_key(self.cfg.embedded)}"
            return str(folder) if (folder / "embedded.json").is_file() else None
        return str(Path(self.cfg.model).expanduser()) if _looks_like_path(self.cfg.model) else self.cfg.model

    def _hub_kwargs(self) -> dict[str, Any]:
        """Loading arguments of the config and tokenizer; a hub model is read from the local cache only (the
        plan never waits on the network)."""
        if self.cfg.model == EMBEDDED:
            return {}
        kwargs = {"trust_remote_code": self.cfg.trust_remote_code, "revision": self.cfg.revision}
        return kwargs if _looks_like_path(self.cfg.model) else {**kwargs, "local_files_only": True}

    def structure_model(self) -> nn.Module | None:
        """The model on the ``meta`` device from its config alone (``config.json``; the embedded model's recipe
        before its first pretraining); None for a hub model not in the local cache yet (checked once loaded)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        source = self._source()
        try:
            config = embedded_llama_config(self.cfg.embedded, _RecipeTokenizer(self.cfg.embedded.vocab_size)) \
                if source is None else AutoConfig.from_pretrained(source, **self._hub_kwargs())
        except OSError as e:
            if self._hub_kwargs().get("local_files_only"):
                log.info("%s is not in the local hub cache: its structure is checked once it is loaded", source)
                return None
            raise ConfigError(f"task.model={self.cfg.model}: cannot read its config: {e}") from e
        except (ValueError, KeyError) as e:
            raise ConfigError(f"task.model={self.cfg.model}: cannot read its config: {e}") from e
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=self.cfg.trust_remote_code)

    def check_model(self, skeleton: nn.Module) -> None:
        """Window lengths within the model's positions; every local text file UTF-8 and at least one window long in
        tokens (counted with the model's tokenizer; for an embedded model not pretrained yet, bounded by its bytes:
        its byte-level BPE makes at most one token per byte)."""
        from transformers import AutoTokenizer

        cfg = self.cfg
        positions = getattr(skeleton.config, "max_position_embeddings", None)
        for key, n in (("task.seqlen", cfg.seqlen), ("task.calib.seqlen", cfg.calib.seqlen),
                       ("task.measure.seqlen", cfg.measure.seqlen)):
            if positions is not None and n > positions:
                raise ConfigError(f"{key}={n} exceeds the model's {positions} positions (max_position_embeddings)")
        source = self._source()
        try:
            tokenizer = None if source is None else AutoTokenizer.from_pretrained(source, **self._hub_kwargs())
        except OSError as e:
            raise ConfigError(f"task.model={cfg.model}: cannot read its tokenizer: {e}") from e
        texts = [(f"task.eval.text_files.{name}", read_text_file(path), cfg.seqlen, "task.seqlen")
                 for name, path in cfg.eval.text_files.items()]
        if cfg.calib.text_files:
            texts.append(("task.calib.text_files", JOIN.join(read_text_file(p) for p in cfg.calib.text_files),
                          cfg.calib.seqlen, "task.calib.seqlen"))
        for key, text, seqlen, seqlen_key in texts:
            if not text.strip():
                raise ConfigError(f"{key}: the text is empty")
            n = len(encode_stream(tokenizer, text, cfg.eval.add_bos)[0]) if tokenizer is not None \
                else len(text.encode()) + 1
            if n < seqlen:
                raise ConfigError(f"{key}: {'at most ' if tokenizer is None else ''}{n} tokens, fewer than one "
                                  f"window of {seqlen_key}={seqlen}")

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
        return corpus.text(corpus.eval_split), {"dataset": corpus.description, "split": corpus.eval_split,
                                                "join": corpus.join}

    def eval_stream(self, name: str) -> tuple[torch.Tensor, bool, dict[str, str]]:
        """(token ids, whether BOS was prepended, protocol fields) of eval set ``name``, tokenized once."""
        if name not in self._streams:
            text, info = self._eval_text(name)
            self._streams[name] = (*encode_stream(self._require_tokenizer(), text, self.cfg.eval.add_bos), info)
        return self._streams[name]

    def calib_docs(self) -> tuple[list[str], str]:
        """(documents, join) of the calibration data: the corpus's calibration split, or one document per file."""
        c = self.cfg.calib
        if c.dataset:
            corpus = CORPORA[c.dataset]
            return corpus.load(corpus.calib_split), corpus.join
        if c.text_files:
            return [read_text_file(p) for p in c.text_files], JOIN
        raise ConfigError("task.calib has no data: set task.calib.dataset or task.calib.text_files")

    def calib_protocol(self) -> dict[str, Any]:
        """``protocol/calib_*``: what calibration windows this task gives a method (whether or not it used them)."""
        c = self.cfg.calib
        dataset = (f"{c.dataset}: {CORPORA[c.dataset].description}, split {CORPORA[c.dataset].calib_split}"
                   if c.dataset else "files " + ", ".join(f"{Path(p).name} sha256:{file_sha256(p)}"
                                                         for p in c.text_files))
        bos = self.cfg.eval.add_bos and (self.tokenizer is None or self.tokenizer.bos_token_id is not None)
        return {"protocol/calib_dataset": dataset, "protocol/calib_n_samples": c.n_samples,
                "protocol/calib_seqlen": c.seqlen, "protocol/calib_sampling": c.sampling,
                "protocol/calib_bos": BOS_PLACEMENT[c.sampling] if bos else "none",
                "protocol/calib_seed": "run seed" if c.seed is None else c.seed}

    # -- evaluation ------------------------------------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        cfg = self.cfg
        out: dict[str, Any] = {"protocol/ppl_method": "ppl_concat", "protocol/seqlen": cfg.seqlen,
                               "protocol/dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
                               "protocol/tokenizer": self.tokenizer_name(),
                               "protocol/max_windows": cfg.eval.max_windows}
        bos_flags, joins = [], set()
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
                if "join" in info:
                    out[f"protocol/ppl/{name}/join"] = info["join"]
                    joins.add(info["join"])
                out[f"protocol/n_windows/{name}"] = r["n_windows"]
                out[f"protocol/n_tokens/{name}"] = r["n_tokens"]
            if cfg.zeroshot.tasks:
                out.update(self.zeroshot(model))
        finally:
            model.train(was_training)
        out["protocol/bos"] = all(bos_flags)
        out["protocol/join"] = joins.pop() if len(joins) == 1 else ("per set" if joins else JOIN)
        if cfg.calib.dataset or cfg.calib.text_files:
            out.update(self.calib_protocol())
        return out

    def _window_limit(self, name: str) -> int | None:
        """The most windows eval set ``name`` evaluates: its protocol's cap (C4: 256) and ``eval.max_windows``."""
        caps = [self.cfg.eval.max_windows]
        if name in CORPORA and name not in self.cfg.eval.text_files:
            caps.append(CORPORA[name].max_windows)
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    def zeroshot(self, model: nn.Module) -> dict[str, Any]:
        """lm-eval zero-shot scores of ``model`` as it is in memory (``tasks.lm.zeroshot.zeroshot_scores``)."""
        return zeroshot_scores(model, self._require_tokenizer(), self.cfg.zeroshot, self.cfg.seqlen)

    # -- calibration and measurement inputs ------------------------------------------------------------------------
    def calibration_batches(self, seed: int) -> Iterator[dict[str, torch.Tensor]]:
        """At most ``calib.n_samples`` windows of ``calib.seqlen`` tokens drawn by ``calib.sampling`` with
        ``calib.seed`` (or ``seed``, the run's), each ``{"input_ids": LongTensor[1, seqlen]}``; drawn once per seed."""
        c = self.cfg.calib
        seed = seed if c.seed is None else c.seed
        if seed not in self._calib:
            tok = self._require_tokenizer()
            docs, join = self.calib_docs()
            bos = self.cfg.eval.add_bos and tok.bos_token_id is not None
            if c.sampling == "stream":
                windows = stream_windows(encode_stream(tok, join.join(docs), bos)[0], c.n_samples, c.seqlen, seed)
            elif c.sampling == "per_sample":
                windows = per_sample_windows(tok, join.join(docs), c.n_samples, c.seqlen, seed, bos)
            else:
                windows = row_windows(tok, docs, c.n_samples, c.seqlen, seed, bos)
            if len(windows) < c.n_samples:
                log.warning("calibration: %d of %d windows (%s sampling skips draws shorter than seqlen)",
                            len(windows), c.n_samples, c.sampling)
            self._calib[seed] = windows
        for w in self._calib[seed]:
            yield {"input_ids": w.unsqueeze(0).to(self._input_device)}

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
