"""The hf_lm task family: the perplexity protocol, the embedded demo model, local loading, checks, calibration."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from core.errors import ConfigError
from core.io import read_json
from tasks.adapters import LlamaAdapter, create_adapter
from tasks.hf_lm import CalibConfig, EvalConfig, HfLmConfig, HfLmTask
from tasks.lm import embedded
from tasks.lm.corpora import CORPORA, demo_split, encode_stream, pydoc_topics
from tasks.lm.embedded import EmbeddedConfig, embedded_key, embedded_llama_config, train_tokenizer
from tasks.lm.perplexity import ppl_concat

# far smaller than the demo's recipe: pretrains in a few seconds
TINY = EmbeddedConfig(vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                      train_seqlen=64, steps=120, batch_size=8, lr=5e-3, warmup_steps=10)


def make_cfg(**fields) -> HfLmConfig:
    base = dict(name="tiny_lm", model="embedded", seqlen=64, eval_batch_size=8, eval=EvalConfig(datasets=["demo"]),
                calib=CalibConfig(dataset="demo", n_samples=6, seqlen=16), embedded=TINY)
    base.update(fields)
    return HfLmConfig(**base)


def make_task(cache_dir: Path, **fields) -> HfLmTask:
    task = HfLmTask(make_cfg(**fields), cache_dir, torch.device("cpu"))
    task.progress = False
    return task


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory, one_thread):
    """(cache dir, task, model) of the tiny embedded model, pretrained once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    task = make_task(cache)
    task.check()
    return cache, task, task.build_model(seed=0)


# -- the perplexity protocol ---------------------------------------------------------------------------------------
class FixedLogits(nn.Module):
    """Logits that depend only on (current token, position): ``table[token] + bias[position]``; HF-like output."""

    def __init__(self, vocab: int, seqlen: int):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.table = torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * 2
        self.bias = torch.randn(seqlen, vocab, generator=g, dtype=torch.float64)
        self.calls = 0

    def forward(self, input_ids):
        self.calls += 1
        return SimpleNamespace(logits=(self.table[input_ids] + self.bias[: input_ids.shape[1]]).float())


def hand_ppl(model: FixedLogits, ids: list[int], seqlen: int, n_windows: int) -> float:
    """exp(sum_i loss_i * seqlen / (n * seqlen)), loss_i the mean NLL of window i's seqlen - 1 next tokens."""
    total = 0.0
    for w in range(n_windows):
        window = ids[w * seqlen:(w + 1) * seqlen]
        nll = 0.0
        for t in range(seqlen - 1):
            row = [float(model.table[window[t], v] + model.bias[t, v]) for v in range(model.table.shape[0])]
            row = [float(torch.tensor(x, dtype=torch.float32)) for x in row]  # the model emits float32 logits
            top = max(row)
            logz = top + math.log(sum(math.exp(x - top) for x in row))
            nll += logz - row[window[t + 1]]
        total += nll / (seqlen - 1) * seqlen
    return math.exp(total / (n_windows * seqlen))


def test_ppl_concat_matches_hand_computation_and_drops_remainder():
    vocab, seqlen = 7, 6
    model = FixedLogits(vocab, seqlen)
    ids = torch.randint(0, vocab, (3 * seqlen + 5,), generator=torch.Generator().manual_seed(0))
    r = ppl_concat(model, ids, seqlen, batch_size=2, device="cpu", progress=False)
    assert r["n_windows"] == 3 and r["n_tokens"] == 3 * seqlen + 5 and r["n_dropped"] == 5
    assert model.calls == 2  # windows batched 2 + 1
    expected = hand_ppl(model, ids.tolist(), seqlen, 3)
    assert r["ppl"] == pytest.approx(expected, rel=1e-6)
    assert r["loss"] == pytest.approx(math.log(expected), rel=1e-6)
    # the batch size changes nothing
    assert ppl_concat(model, ids, seqlen, 1, "cpu", progress=False)["ppl"] == pytest.approx(r["ppl"], rel=1e-9)
    assert ppl_concat(model, ids, seqlen, 8, "cpu", progress=False)["ppl"] == pytest.approx(r["ppl"], rel=1e-9)


def test_ppl_concat_max_windows_and_short_stream():
    vocab, seqlen = 5, 4
    model = FixedLogits(vocab, seqlen)
    ids = torch.randint(0, vocab, (10 * seqlen,), generator=torch.Generator().manual_seed(3))
    r = ppl_concat(model, ids, seqlen, 3, "cpu", max_windows=2, progress=False)
    assert r["n_windows"] == 2 and r["n_dropped"] == 8 * seqlen
    assert r["ppl"] == pytest.approx(hand_ppl(model, ids.tolist(), seqlen, 2), rel=1e-6)
    assert ppl_concat(model, ids, seqlen, 3, "cpu", max_windows=50, progress=False)["n_windows"] == 10
    with pytest.raises(ConfigError, match="fewer than one window"):
        ppl_concat(model, ids[: seqlen - 1], seqlen, 1, "cpu", progress=False)


def test_ppl_concat_agrees_with_the_models_own_loss(built):
    _, task, model = built
    ids, bos, _ = task.eval_stream("demo")
    assert bos and ids[0].item() == task.tokenizer.bos_token_id
    r = ppl_concat(model, ids, 32, 5, "cpu", max_windows=7, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in ids[: 7 * 32].view(7, 32)]
    assert r["loss"] == pytest.approx(sum(losses) / 7, rel=1e-5)


# -- the embedded model --------------------------------------------------------------------------------------------
def test_embedded_model_is_a_real_lm_and_reports_its_protocol(built):
    _, task, model = built
    m = task.evaluate(model)
    assert task.main_metric() == ("ppl/demo", False)
    assert task.summary() == {"model": "tiny_lm", "dataset": "demo"}
    vocab = model.config.vocab_size
    assert vocab == TINY.vocab_size
    assert m["ppl/demo"] < vocab / 4, m["ppl/demo"]  # uniform guessing scores ppl = vocab
    assert m["loss/demo"] == pytest.approx(math.log(m["ppl/demo"]))
    assert m["protocol/ppl_method"] == "ppl_concat" and m["protocol/seqlen"] == 64 and m["protocol/join"] == "\n\n"
    assert m["protocol/bos"] is True and m["protocol/dtype"] == "float32"
    assert m["protocol/ppl/demo/split"] == "test" and "pydoc_data.topics" in m["protocol/ppl/demo/dataset"]
    assert str(vocab) in m["protocol/tokenizer"]
    ids, _, _ = task.eval_stream("demo")
    assert m["protocol/n_windows/demo"] == ids.numel() // 64 and m["protocol/n_tokens/demo"] == ids.numel()
    assert not model.training and model.config.use_cache is False


def test_embedded_build_is_cached(built, monkeypatch):
    cache, _, model = built
    calls = []
    monkeypatch.setattr(embedded, "_pretrain", lambda *a, **k: calls.append(1))
    again = make_task(cache).build_model(seed=1)  # loads; the run seed does not change the dense model
    assert calls == []
    assert [d.name for d in (cache / "hf_lm").iterdir() if d.is_dir()] == [f"embedded-{embedded_key(TINY)}"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())
    # another recipe is another cache entry
    assert embedded_key(dataclasses.replace(TINY, steps=121)) != embedded_key(TINY)


def test_embedded_pretraining_is_deterministic(tmp_path):
    short = dataclasses.replace(TINY, steps=10)
    a, b = (make_task(tmp_path / d, embedded=short).build_model(seed=0) for d in ("a", "b"))
    sa = a.state_dict()
    assert all(torch.equal(sa[k], v) for k, v in b.state_dict().items())
    assert not any(p.name.startswith(".") for p in (tmp_path / "a" / "hf_lm").iterdir())  # no temporary folder left


def test_demo_split_is_disjoint_and_held_out(built):
    cache, _, _ = built
    train, test = demo_split()
    docs = pydoc_topics()
    assert set(train).isdisjoint(test) and set(train) | set(test) == set(docs)
    share = sum(len(docs[k]) for k in test) / sum(map(len, docs.values()))
    assert 0.08 < share < 0.2
    train_text = "\n\n".join(docs[k] for k in train)
    for k in test:  # no held-out paragraph appears in the training text
        for para in docs[k].split("\n\n"):
            if len(para.strip()) >= 40:
                assert para.strip() not in train_text, (k, para[:60])
    meta = read_json(next((cache / "hf_lm").glob("embedded-*/embedded.json")))
    assert meta["train_docs"] == list(train) and meta["test_docs"] == list(test)
    assert CORPORA["demo"].load("train") == [docs[k] for k in train]


# -- loading from a local directory --------------------------------------------------------------------------------
def test_local_directory_loads_the_same_model(built, tmp_path):
    from transformers import LlamaForCausalLM

    tokenizer = train_tokenizer(CORPORA["demo"].load("train")[:20], 300)
    torch.manual_seed(0)
    ref = LlamaForCausalLM(embedded_llama_config(dataclasses.replace(TINY, num_layers=1), tokenizer)).eval()
    path = tmp_path / "tiny-llama"
    ref.save_pretrained(path)
    tokenizer.save_pretrained(path)
    text = tmp_path / "eval.txt"
    text.write_text("def f(x):\n    return x + 1\n\n" * 40)
    task = make_task(tmp_path / "cache", model=str(path), eval=EvalConfig(text_files={"mine": str(text)}))
    task.check()
    model = task.build_model(seed=0)
    assert not (tmp_path / "cache").exists()  # nothing pretrained
    assert task.tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = task.example_inputs()[0]
    assert ids.shape == (1, 128) and task.items_per_forward() == 128
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    m = task.evaluate(model)
    assert task.main_metric() == ("ppl/mine", False)
    assert m["ppl/mine"] > 1 and m["protocol/ppl/mine/dataset"].startswith("file eval.txt sha256:")
    assert m["protocol/tokenizer"].startswith(str(path))


# -- checks --------------------------------------------------------------------------------------------------------
def test_check_errors_name_the_key_and_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"task.model={missing}"):
        make_task(tmp_path, model=str(missing)).check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        make_task(tmp_path, model=str(tmp_path / "empty")).check()
    make_task(tmp_path, model="some-org/some-model").check()  # a hub id: nothing to check offline
    with pytest.raises(ConfigError, match=f"task.eval.text_files.wiki={tmp_path}/wiki.txt"):
        make_task(tmp_path, eval=EvalConfig(datasets=["demo"], text_files={"wiki": str(tmp_path / "wiki.txt")})).check()
    with pytest.raises(ConfigError, match=f"task.calib.text_files: {tmp_path}/c.txt"):
        make_task(tmp_path, calib=CalibConfig(text_files=[str(tmp_path / "c.txt")])).check()
    with pytest.raises(ConfigError, match=r"task.eval.datasets: unknown wikitext9; valid: .*demo"):
        make_task(tmp_path, eval=EvalConfig(datasets=["wikitext9"])).check()
    with pytest.raises(ConfigError, match="task.calib.dataset='nope'"):
        make_task(tmp_path, calib=CalibConfig(dataset="nope")).check()


def test_config_ranges():
    for fields, msg in [(dict(dtype="float64"), "task.dtype"), (dict(seqlen=1), "task.seqlen"),
                        (dict(eval_batch_size=0), "task.eval_batch_size"),
                        (dict(eval=EvalConfig()), "no evaluation set")]:
        with pytest.raises(ConfigError, match=msg):
            make_cfg(**fields)
    with pytest.raises(ConfigError, match="max_windows"):
        EvalConfig(datasets=["demo"], max_windows=0)
    with pytest.raises(ConfigError, match="both"):
        EvalConfig(datasets=["demo"], text_files={"demo": "x"})
    with pytest.raises(ConfigError, match="not both"):
        CalibConfig(dataset="demo", text_files=["x"])
    with pytest.raises(ConfigError, match="head size"):
        EmbeddedConfig(hidden_size=30, num_heads=4)


# -- calibration, measurement inputs, adapter ----------------------------------------------------------------------
def test_calibration_batches_are_seeded_windows_of_the_train_split(built):
    _, task, _ = built
    a = list(task.calibration_batches(seed=0))
    b = list(task.calibration_batches(seed=0))
    c = list(task.calibration_batches(seed=1))
    assert len(a) == 6
    assert all(x["input_ids"].shape == (1, 16) and x["input_ids"].dtype == torch.long for x in a)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))
    train, _ = encode_stream(task.tokenizer, "\n\n".join(CORPORA["demo"].load("train")), True)
    slices = train.unfold(0, 16, 1)
    for x in a:
        assert (slices == x["input_ids"][0]).all(dim=1).any()
    no_data = make_task(Path("."), calib=CalibConfig())
    no_data.tokenizer = task.tokenizer
    with pytest.raises(ConfigError, match="task.calib has no data"):
        next(iter(no_data.calibration_batches(0)))


def test_llama_adapter_matches_and_example_inputs_run(built):
    _, task, model = built
    adapter = create_adapter(model)
    assert isinstance(adapter, LlamaAdapter)
    linears = adapter.scope("linear")
    assert len(linears) == 7 * TINY.num_layers and all(isinstance(m, nn.Linear) for m in linears.values())
    (ids,) = task.example_inputs()
    assert ids.shape == (1, 128) and torch.equal(ids, task.example_inputs()[0])
    assert int(ids.max()) < model.config.vocab_size
    with torch.no_grad():
        assert model(ids).logits.shape == (1, 128, model.config.vocab_size)


def test_demo_lm_yaml_composes(compose_cfg):
    from runners.schema import validate

    run = validate(compose_cfg("task=demo_lm", "logger=none"))
    t = run.task
    assert isinstance(t, HfLmConfig) and t.model == "embedded" and t.embedded.num_layers >= 4
    assert t.eval.datasets == ["demo"] and t.calib.dataset == "demo" and t.measure.seqlen == 128
    assert HfLmTask(t, Path("."), torch.device("cpu")).main_metric() == ("ppl/demo", False)
