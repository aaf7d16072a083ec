"""Published LLM protocols: the two C4 perplexity protocols, the calibration samplers of SVD-LLM and Basis Sharing
(BOS placement, seeds, window counts) and their records, and run ids that change only when results can."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest
import torch
from torch import nn

from core.errors import ConfigError
from methods import CompressContext, create_method
from methods.calibration import capture_block_inputs, forward_block
from methods.svd_llm import SVDLLMConfig, dense_block_grams, whitened_error
from tasks.adapters import LlamaAdapter
from tasks.hf_lm import CalibConfig, EvalConfig, HfLmConfig, HfLmTask
from tasks.lm.calibration import per_sample_windows, row_blocks, row_windows, stream_windows
from tasks.lm.corpora import CORPORA
from tests.toy import tiny_llama

BOS = 0


class CharTokenizer:
    """One token per character (ids 1..63), BOS 0: token counts are character counts."""

    bos_token_id = BOS

    def __len__(self) -> int:
        return 64

    @staticmethod
    def ids(text: str) -> list[int]:
        return [1 + ord(c) % 63 for c in text]

    def __call__(self, text, add_special_tokens=False, verbose=False):
        assert not add_special_tokens  # BOS placement is the harness's, never the tokenizer's
        return {"input_ids": self.ids(text) if isinstance(text, str) else [self.ids(t) for t in text]}


class WordTokenizer(CharTokenizer):
    """One token per space-separated word: a character slice may hold fewer tokens than its length."""

    @staticmethod
    def ids(text: str) -> list[int]:
        return [1 + len(w) % 63 for w in text.split(" ") if w]


class Bigram(nn.Module):
    """Logits from the current token only; enough to run ``ppl_concat``."""

    def __init__(self, vocab: int = 64):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def docs(n: int, tag: str) -> list[str]:
    return [f"{tag} document {i} " + "word " * (i % 5) for i in range(n)]


@pytest.fixture
def fake_hub(monkeypatch):
    """``datasets.load_dataset`` answering every hub corpus with numbered documents; records the calls."""
    calls = []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append({"path": path, "split": split, **kwargs})
        n = 2500 if path == "allenai/c4" else 300
        return datasets.Dataset.from_dict({"sentence" if "ptb" in path else "text": docs(n, split)})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def make_task(**fields) -> HfLmTask:
    cfg = dict(name="toy_lm", model="embedded", seqlen=8, eval=EvalConfig(datasets=["wikitext2"]),
               calib=CalibConfig(dataset="wikitext2", n_samples=4, seqlen=8))
    cfg.update(fields)
    task = HfLmTask(HfLmConfig(**cfg), Path("unused"), torch.device("cpu"), progress=False)
    task.tokenizer = CharTokenizer()
    return task


# -- C4 ------------------------------------------------------------------------------------------------------------
def test_c4_protocols_read_their_documents_and_joins(fake_hub):
    c4, sparse = CORPORA["c4"], CORPORA["c4_sparsegpt"]
    shard = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
    assert c4.text("validation") == "\n\n".join(docs(2000, "validation"))  # SVD-LLM / Basis Sharing
    assert fake_hub[-1] == {"path": "allenai/c4", "split": "validation", "data_files": shard}
    assert sparse.text("validation") == " ".join(docs(1100, "validation"))  # SparseGPT
    assert fake_hub[-1] == {"path": "allenai/c4", "split": "validation", "data_files": shard}
    assert (c4.max_windows, sparse.max_windows) == (None, 256)
    assert len(c4.load("train")) == len(sparse.load("train")) == 2500  # the whole train shard
    assert fake_hub[-1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}
    with pytest.raises(ConfigError, match="c4_sparsegpt has splits"):
        sparse.load("test")


def test_c4_protocols_count_their_windows_and_record_their_join(fake_hub):
    task = make_task(seqlen=16, eval=EvalConfig(datasets=["c4", "c4_sparsegpt", "wikitext2"]))
    m = task.evaluate(Bigram())
    n_c4 = (1 + len("\n\n".join(docs(2000, "validation")))) // 16  # BOS + one token per character
    n_sparse = (1 + len(" ".join(docs(1100, "validation")))) // 16
    assert m["protocol/n_windows/c4"] == n_c4 > 256  # every window
    assert n_sparse > 256 == m["protocol/n_windows/c4_sparsegpt"]  # SparseGPT's 256 x seqlen tokens
    assert m["protocol/ppl/c4/join"] == m["protocol/ppl/wikitext2/join"] == "\n\n"
    assert m["protocol/ppl/c4_sparsegpt/join"] == " " and m["protocol/join"] == "per set"
    assert "first 2000 documents" in m["protocol/ppl/c4/dataset"]
    assert "first 1100 documents" in m["protocol/ppl/c4_sparsegpt/dataset"]
    alone = make_task(eval=EvalConfig(datasets=["wikitext2"])).evaluate(Bigram())
    assert alone["protocol/join"] == "\n\n"  # one join: recorded as before


# -- calibration samplers ------------------------------------------------------------------------------------------
TEXT = "\n\n".join(f"line {i} " + "abc " * (i % 7) for i in range(400))


def test_stream_windows_keep_the_legacy_draw_and_one_bos():
    ids = torch.tensor([BOS, *CharTokenizer.ids(TEXT)])
    windows = stream_windows(ids, 5, 32, seed=7)
    starts = torch.randint(0, ids.numel() - 32 + 1, (5,), generator=torch.Generator().manual_seed(7)).tolist()
    assert all(torch.equal(w, ids[s:s + 32]) for w, s in zip(windows, starts))
    assert sum(int((w == BOS).sum()) for w in windows) == sum(s == 0 for s in starts)  # BOS only at offset 0


def test_per_sample_windows_follow_svd_llm():
    """SVD-LLM's get_calib_train_data: seed, character offsets, BOS per sample, first seqlen tokens."""
    windows = per_sample_windows(CharTokenizer(), TEXT, 6, 32, seed=3, bos=True)
    rng = random.Random(3)
    for w in windows:
        i = rng.randint(0, len(TEXT) - 32 - 1)
        assert w.tolist() == [BOS, *CharTokenizer.ids(TEXT[i:i + 31])]
    assert len(windows) == 6
    no_bos = per_sample_windows(CharTokenizer(), TEXT, 6, 32, seed=3, bos=False)
    assert all(BOS not in w.tolist() for w in no_bos)
    assert not torch.equal(windows[0], per_sample_windows(CharTokenizer(), TEXT, 6, 32, seed=4, bos=True)[0])


def test_per_sample_windows_skip_short_draws_as_svd_llm_does():
    """A draw with fewer than seqlen tokens is skipped and the last kept draw unused: n + 1 draws, fewer windows."""
    text = " ".join("x" * (1 + i % 40) for i in range(300))  # long words: few tokens in some 10 x seqlen slices
    seqlen, n = 12, 40
    windows = per_sample_windows(WordTokenizer(), text, n, seqlen, seed=3, bos=True)
    rng, kept = random.Random(3), []
    for _ in range(n + 1):
        i = rng.randint(0, len(text) - seqlen - 1)
        ids = [BOS, *WordTokenizer.ids(text[i:i + 10 * seqlen])]
        if len(ids) >= seqlen:
            kept.append(ids[:seqlen])
    assert [w.tolist() for w in windows] == kept[:-1] and len(windows) < n  # some draws were short


def test_row_blocks_are_datasets_map_batches():
    """Basis Sharing's group_text runs in datasets.map(num_proc=4, batch_size=1024): 4 contiguous shards."""
    assert row_blocks(36718)[:10] == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096), (4096, 5120),
                                      (5120, 6144), (6144, 7168), (7168, 8192), (8192, 9180), (9180, 10204)]
    blocks = row_blocks(36718)
    ds = datasets.Dataset.from_dict({"i": list(range(36718))})
    starts = [0]
    for k in range(4):
        starts.append(starts[-1] + len(ds.shard(num_shards=4, index=k, contiguous=True)))
    assert starts == [0, 9180, 18360, 27539, 36718]
    assert {s for s, _ in blocks} >= set(starts[:-1]) and blocks[-1][1] == 36718
    assert all(0 < e - s <= 1024 for s, e in blocks) and row_blocks(3) == [(0, 1), (1, 2), (2, 3)]


def test_row_windows_follow_basis_sharing():
    """prepare_data + torch.manual_seed(2023): BOS on every row, fixed windows per map batch, permuted."""
    rows = [f"row {i}" + " z" * (i % 9) for i in range(5000)]  # > 4 x 1024 rows: several map batches
    seqlen = 64
    windows = row_windows(CharTokenizer(), rows, 10, seqlen, seed=2023, bos=True)
    ds = datasets.Dataset.from_dict({"input_ids": [[BOS, *CharTokenizer.ids(r)] for r in rows]})

    def group_text(batch):  # the grouping Basis Sharing maps over its tokenized rows
        flat = sum(batch["input_ids"], [])
        return {"input_ids": [flat[j:j + seqlen] for j in range(0, len(flat) // seqlen * seqlen, seqlen)]}

    expected = []
    for k in range(4):
        shard = ds.shard(num_shards=4, index=k, contiguous=True)
        expected += shard.map(group_text, batched=True, batch_size=1024)["input_ids"]
    torch.manual_seed(2023)
    index = torch.randperm(len(expected))[:10].tolist()
    assert [w.tolist() for w in windows] == [expected[i] for i in index]
    assert all(w[0] == BOS or BOS in w.tolist() for w in windows)  # rows are a few tokens: BOS in every window


def test_task_sampling_seed_and_records(fake_hub):
    legacy = make_task()
    a, b = (list(legacy.calibration_batches(s)) for s in (0, 1))
    assert len(a) == 4 and not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    svd_llm = make_task(calib=CalibConfig(dataset="wikitext2", n_samples=4, seqlen=8, sampling="per_sample", seed=3))
    a, b = (list(svd_llm.calibration_batches(s)) for s in (0, 1))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))  # its own seed, not the run's
    text = "\n\n".join(docs(300, "train"))
    assert [x["input_ids"][0] .tolist() for x in a] == \
        [w.tolist() for w in per_sample_windows(CharTokenizer(), text, 4, 8, seed=3, bos=True)]
    m = svd_llm.evaluate(Bigram())
    assert m["protocol/calib_sampling"] == "per_sample" and m["protocol/calib_seed"] == 3
    assert m["protocol/calib_bos"] == "every sample" and m["protocol/calib_n_samples"] == 4
    assert m["protocol/calib_seqlen"] == 8 and m["protocol/calib_dataset"].startswith("wikitext2: ")
    m = legacy.evaluate(Bigram())
    assert (m["protocol/calib_sampling"], m["protocol/calib_bos"], m["protocol/calib_seed"]) == \
        ("stream", "stream start", "run seed")
    rows = make_task(calib=CalibConfig(dataset="wikitext2", n_samples=4, seqlen=8, sampling="rows", seed=2023),
                     eval=EvalConfig(datasets=["wikitext2"], add_bos=False))
    m = rows.evaluate(Bigram())
    assert m["protocol/calib_bos"] == "none" and all(BOS not in x["input_ids"][0] for x in rows.calibration_batches(0))


def test_calib_config_is_checked():
    with pytest.raises(ConfigError, match="task.calib.sampling='chunks'"):
        CalibConfig(dataset="wikitext2", sampling="chunks")
    with pytest.raises(ConfigError, match="task.calib.seed=-1"):
        CalibConfig(dataset="wikitext2", seed=-1)


# -- run ids -------------------------------------------------------------------------------------------------------
def test_run_ids_change_only_with_the_protocol():
    base = make_task()
    legacy = dataclasses.asdict(base.cfg)
    legacy.pop("device_map")
    for key in ("sampling", "seed"):
        legacy["calib"].pop(key)
    assert base.semantic_config() == legacy  # defaults hash as before the fields existed
    assert make_task(calib=CalibConfig(dataset="wikitext2", n_samples=4, seqlen=8, sampling="rows")) \
        .semantic_config()["calib"]["sampling"] == "rows"
    assert make_task(calib=CalibConfig(dataset="wikitext2", n_samples=4, seqlen=8, seed=3)) \
        .semantic_config()["calib"]["seed"] == 3
    # the c4 protocol changed (SparseGPT's shard prefix -> SVD-LLM's): tasks evaluating it get new run ids
    assert make_task(eval=EvalConfig(datasets=["wikitext2", "c4"])).semantic_config()["eval"]["corpus_versions"] \
        == {"c4": 2}
    assert "corpus_versions" not in make_task(eval=EvalConfig(datasets=["c4_sparsegpt"])).semantic_config()["eval"]


def test_presets_compose_on_the_llama_configs(compose_cfg):
    from runners.schema import validate

    svd_llm = validate(compose_cfg("task=llama_7b", "method=svd_llm", "task.calib.sampling=per_sample",
                                   "task.calib.seed=3")).task.calib
    assert (svd_llm.dataset, svd_llm.n_samples, svd_llm.seqlen, svd_llm.sampling, svd_llm.seed) == \
        ("wikitext2", 256, 2048, "per_sample", 3)
    default = validate(compose_cfg("task=llama_7b", "method=basis_sharing")).task
    assert (default.calib.sampling, default.calib.seed) == ("stream", None) and "c4" in default.eval.datasets
    with pytest.raises(ConfigError, match="task.calib.sampling"):
        validate(compose_cfg("task=llama_7b", "task.calib.sampling=chunks"))


# -- SVD-LLM's parameter update ------------------------------------------------------------------------------------
class WindowsCtx(CompressContext):
    """Fixed random calibration windows (3 batches of 2 x 24 tokens)."""

    def calibration_batches(self):
        gen = torch.Generator().manual_seed(0)
        for _ in range(3):
            yield {"input_ids": torch.randint(0, 64, (2, 24), generator=gen)}


def compress_svd_llm(update: bool, monkeypatch=None, full_rank: bool = False):
    if full_rank:
        monkeypatch.setattr("methods.svd_llm.rank_for_ratio", lambda out_f, in_f, ratio: min(out_f, in_f))
    model = tiny_llama()
    method = create_method(SVDLLMConfig(ratio=0.5, update=update))
    out = method.apply(model, LlamaAdapter(model), WindowsCtx(task=None, device=torch.device("cpu"), seed=0,
                                                             progress=False))
    return model, out, method


def test_update_refits_u_on_the_compressed_models_inputs():
    """For every block, U is the least-squares fit of the dense layer's outputs on the update's inputs: the dense
    block fed the updated model's own input to that block. V stays the truncation's; the error on those inputs is
    never above the truncation's and falls for most layers."""
    plain, out_plain, _ = compress_svd_llm(update=False)
    updated, out, method = compress_svd_llm(update=True)
    dense = tiny_llama()
    assert "method/update_error_ratio" not in out_plain and 0 < out["method/update_error_ratio"] < 1
    roles = ("q", "k", "v", "o", "gate", "up", "down")
    a_dense, a_upd, a_plain = LlamaAdapter(dense), LlamaAdapter(updated), LlamaAdapter(plain)
    batches = WindowsCtx(task=None, device=torch.device("cpu"), seed=0, progress=False).calibration_batches
    stream = capture_block_inputs(a_upd, batches(), progress=False)
    lower = 0
    for i in range(3):
        grams = dense_block_grams(a_dense, stream, i, roles)
        for role in roles:
            w = dense.get_submodule(a_dense.role_path(role, i)).weight
            upd, pl = updated.get_submodule(a_upd.role_path(role, i)), plain.get_submodule(a_plain.role_path(role, i))
            torch.testing.assert_close(upd.v, pl.v)
            m = grams[role].xtx
            residual = (w.double() - upd.dense_weight().double()) @ m @ upd.v.double().T  # normal equations
            assert residual.abs().max() <= 1e-3 * (w.double() @ m @ upd.v.double().T).abs().max()
            e_upd, e_plain = whitened_error(w, upd.dense_weight(), m), whitened_error(w, pl.dense_weight(), m)
            assert e_upd <= e_plain * (1 + 1e-6) + 1e-9
            lower += e_upd < e_plain * 0.999
        forward_block(a_upd, stream, i, torch.device("cpu"))
    assert lower >= 10  # block 0's inputs are the dense model's: the update changes the later blocks most
    assert method.semantic_config()["update"] is True
    assert "update" not in compress_svd_llm(update=False)[2].semantic_config()  # run ids of update=false unchanged


def test_update_is_exact_at_full_rank(monkeypatch):
    model, out, _ = compress_svd_llm(update=True, monkeypatch=monkeypatch, full_rank=True)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
