"""The embedded demo model of the ``hf_lm`` family (``model: embedded``): a small LLaMA-architecture model with its own
byte-level BPE tokenizer, both trained on first use on the ``demo`` corpus's train split (``pydoc_data.topics``), so
the whole pipeline runs offline on a CPU. It is cached under ``<cache_dir>/hf_lm/embedded-<hash>/``
(``save_pretrained`` format); the hash (``embedded_key``) covers its recipe (``EmbeddedConfig``) and the corpus.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.errors import ConfigError
from core.io import file_lock, stable_hash, umask, write_json_atomic
from core.progress import progress_bar
from tasks.lm.corpora import CORPORA, JOIN, corpus_digest, demo_split, encode_stream, pydoc_topics

log = logging.getLogger(__name__)

EMBEDDED = "embedded"  # the ``task.model`` value that selects this model
# bump when a change to the corpus split, tokenizer or pretraining recipe makes cached embedded models stale
EMBEDDED_VERSION = 1
EMBEDDED_MAX_POSITIONS = 2048
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")


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
    bar = progress_bar(range(ecfg.steps), "pretrain embedded LM", enabled=progress)
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
                        "corpus": corpus_digest(pydoc_topics())})


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
                        corpus_sha256=corpus_digest(pydoc_topics()), train_docs=train, test_docs=test)
            write_json_atomic(tmp / "embedded.json", meta)
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's folder is 0700: give it the mode a plain mkdir would
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("embedded LM: %d params, final train loss %.3f, %.1f s", meta["params"], meta["final_train_loss"],
                 meta["pretrain_s"])
    return final
