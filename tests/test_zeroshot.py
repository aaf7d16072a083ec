"""The hf_lm paper protocol beyond the demo corpus: zero-shot accuracy through lm-eval on the in-memory model (a
local task written here, offline) and the hub corpora wikitext2 / ptb / c4 (``datasets.load_dataset`` replaced by
a local stand-in: no download)."""
from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from core.errors import ConfigError
from methods import CompressContext, create_method
from methods.svd import SVDConfig
from tasks.adapters import create_adapter
from tasks.hf_lm import CalibConfig, EvalConfig, HfLmConfig, HfLmTask
from tasks.lm.corpora import CORPORA
from tasks.lm.embedded import EmbeddedConfig
from tasks.lm.perplexity import ppl_concat
from tasks.lm.zeroshot import ZeroShotConfig

# the demo_lm overrides of tests/conftest.py: the same cached model as the other demo_lm tests
DEMO_TINY = EmbeddedConfig(steps=30, num_layers=2, hidden_size=64, intermediate_size=128)
QUESTIONS = [(f"What is {a} plus {b}?", [str(a + b + d) for d in (-1, 0, 2, 1)], 1)
             for a, b in [(1, 2), (3, 4), (2, 5), (6, 1), (4, 4), (7, 2), (5, 3), (8, 1), (2, 2), (9, 0)]]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 3.0
"""


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def offline(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)


def make_task(cache, **fields) -> HfLmTask:
    base = dict(name="tiny_lm", model="embedded", seqlen=64, eval_batch_size=4, eval=EvalConfig(datasets=["demo"]),
                calib=CalibConfig(dataset="demo", n_samples=4, seqlen=32), embedded=DEMO_TINY)
    base.update(fields)
    task = HfLmTask(HfLmConfig(**base), cache, torch.device("cpu"), progress=False)
    task.check()
    return task


def local_task(folder) -> None:
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data))


@torch.no_grad()
def hand_accuracy(model, tokenizer) -> float:
    """lm-eval's rule computed directly: the choice with the highest sum of next-token log-probabilities of its
    tokens (" " + choice, split off the tokenized context + continuation) given the context."""
    right = 0
    for question, choices, answer in QUESTIONS:
        context = f"Question: {question}\nAnswer:"
        scores = []
        for choice in choices:
            ctx_ids = tokenizer.encode(context)
            whole = tokenizer.encode(context + " " + choice)
            cont = whole[len(ctx_ids):]
            logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
            scores.append(sum(float(logp[len(ctx_ids) - 1 + j, t]) for j, t in enumerate(cont)))
        right += max(range(len(choices)), key=scores.__getitem__) == answer
    return right / len(QUESTIONS)


def test_zeroshot_runs_offline_on_the_in_memory_model(tmp_path, shared_cache, offline):
    local_task(tmp_path)
    zs = ZeroShotConfig(tasks=["tiny_mc"], batch_size=4, include_path=str(tmp_path), include_defaults=False)
    task = make_task(shared_cache, zeroshot=zs, eval=EvalConfig(datasets=["demo"], max_windows=2))
    model = task.build_model(0)
    m = task.evaluate(model)
    acc = m["zeroshot/tiny_mc/acc"]
    assert acc == pytest.approx(hand_accuracy(model, task.tokenizer), abs=1e-9)
    assert m["zeroshot/tiny_mc/acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (len(QUESTIONS) - 1)))
    assert 0 <= m["zeroshot/tiny_mc/acc_norm"] <= 1 and "zeroshot/tiny_mc/acc_norm_stderr" in m
    assert m["zeroshot/mean/acc"] == acc and m["protocol/zeroshot/tiny_mc/version"] == "3.0"
    assert m["protocol/zeroshot/tiny_mc/n"] == len(QUESTIONS) and m["protocol/zeroshot/lm_eval"].startswith("0.4")
    assert m["protocol/zeroshot/num_fewshot"] == 0 and m["protocol/zeroshot/batch_size"] == 4
    assert "ppl/demo" in m  # perplexity is still reported beside it
    # a compressed model is scored as it is in memory
    create_method(SVDConfig(ratio=0.8)).apply(model, create_adapter(model),
                                             CompressContext(task, torch.device("cpu"), 0, progress=False))
    assert task.zeroshot(model)["zeroshot/tiny_mc/acc"] == pytest.approx(hand_accuracy(model, task.tokenizer))


def test_zeroshot_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="batch_size"):
        ZeroShotConfig(tasks=["x"], batch_size=0)
    with pytest.raises(ConfigError, match="include_path"):
        ZeroShotConfig(tasks=["x"], include_defaults=False)
    with pytest.raises(ConfigError, match="twice"):
        ZeroShotConfig(tasks=["piqa", "piqa"])
    with pytest.raises(ConfigError, match="no such directory"):
        make_task(tmp_path, zeroshot=ZeroShotConfig(tasks=["x"], include_path=str(tmp_path / "absent")))


# -- hub corpora, loaded through a local stand-in of datasets.load_dataset -------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch):
    """Replace ``datasets.load_dataset`` with local data; record every call's arguments."""
    calls = []
    words = "the cat sat on a mat while some dogs ran far away".split()

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append({"path": path, "name": name, "split": split, **kwargs})
        n = 1300 if path == "allenai/c4" else 40
        texts = [" ".join(words[(i + j) % len(words)] for j in range(3 + i % 7)) + f" {path} {split} {i}"
                 for i in range(n)]
        column = "sentence" if "ptb" in path else "text"
        return datasets.Dataset.from_dict({column: texts})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_corpora_read_the_papers_splits_and_fields(fake_hub):
    wiki = CORPORA["wikitext2"].load("test")
    assert fake_hub[-1] == {"path": "Salesforce/wikitext", "name": "wikitext-2-raw-v1", "split": "test"}
    assert len(wiki) == 40 and wiki[0].endswith("Salesforce/wikitext test 0")
    ptb = CORPORA["ptb"].load("train")
    assert fake_hub[-1] == {"path": "ptb-text-only/ptb_text_only", "name": None, "split": "train",
                            "data_dir": "penn_treebank", "revision": "refs/convert/parquet"}
    assert ptb[0].endswith("train 0")
    c4 = CORPORA["c4"].load("validation")
    assert fake_hub[-1] == {"path": "allenai/c4", "name": None, "split": "validation",
                            "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}}
    assert len(c4) == 1300 and c4[-1].endswith("validation 1299")  # the first 2000 documents (all 1300 here)
    assert len(CORPORA["c4_sparsegpt"].load("validation")) == 1100  # SparseGPT's first 1100 documents
    assert len(CORPORA["c4"].load("train")) == 1300
    with pytest.raises(ConfigError, match="splits"):
        CORPORA["c4"].load("test")


def test_hub_corpora_go_through_ppl_concat_with_the_c4_window_cap(fake_hub, shared_cache):
    task = make_task(shared_cache, seqlen=8, eval=EvalConfig(datasets=["wikitext2", "c4_sparsegpt"]),
                     calib=CalibConfig(dataset="wikitext2", n_samples=3, seqlen=8))
    model = task.build_model(0)
    m = task.evaluate(model)
    assert m["protocol/n_windows/c4_sparsegpt"] == 256 < m["protocol/n_tokens/c4_sparsegpt"] // 8  # SparseGPT's cap
    assert m["protocol/n_windows/wikitext2"] == m["protocol/n_tokens/wikitext2"] // 8  # every window
    assert "wikitext-2-raw-v1" in m["protocol/ppl/wikitext2/dataset"]
    assert m["protocol/ppl/c4_sparsegpt/split"] == "validation"
    text = " ".join(CORPORA["c4_sparsegpt"].load("validation"))
    ids = torch.tensor([task.tokenizer.bos_token_id, *task.tokenizer(text, add_special_tokens=False)["input_ids"]])
    expected = ppl_concat(model, ids, 8, 4, "cpu", max_windows=256, progress=False)["ppl"]
    assert m["ppl/c4_sparsegpt"] == pytest.approx(expected, rel=1e-9)
    batches = list(task.calibration_batches(0))
    assert len(batches) == 3 and fake_hub[-1]["split"] == "train" and fake_hub[-1]["path"] == "Salesforce/wikitext"
