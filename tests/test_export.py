"""runners.export: every compressed family materialises to the dense layer it computes; an hf export of demo_lm
loads in a fresh process with plain transformers and gives the run's perplexity; compact exports rebuild."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from core.io import read_json
from methods.geo_sharing import TwoSidedSharedLinear
from methods.hashing import hashed_from_dense
from methods.modules import (LowRankConv2d, LowRankLinear, SharedBasisLinear, SharedFactorLinear,
                             masked_from_dense)
from runners.export import EXPORT_JSON, export, load_model, main, materialise
from runners.record import METRICS_JSON
from runners.run import execute, plan

pytestmark = pytest.mark.usefixtures("one_thread")
NO_MEASURE = ("measure.latency=false", "measure.flops=false", "measure.memory=false", "measure.decode=none")


class Net(nn.Module):
    """Linears and convs replaced by one module of every compressed family."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.convs = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1))
        self.linears = nn.Sequential(*[nn.Linear(32, 32) for _ in range(7)])

    def forward(self, x):
        for conv in self.convs:
            x = torch.tanh(conv(x))
        h = x.mean((2, 3)).repeat(1, 4)
        for lin in self.linears:
            h = torch.tanh(lin(h))
        return h


def compressed_net() -> Net:
    net = Net()
    c, lin = net.convs, net.linears
    conv = c[1]
    w = conv.weight.detach().flatten(1)
    c[1] = LowRankConv2d.from_conv(conv, torch.randn(8, 3), torch.randn(3, w.shape[1]))
    c[0] = masked_from_dense(c[0])
    c[0].set_mask(torch.rand(c[0].weight.shape) > 0.5)
    array = nn.Parameter(torch.randn(500))
    c[2] = hashed_from_dense(c[2], array, 0, "roast", 3, 0.5, [4, 4], False)
    lin[0] = hashed_from_dense(lin[0], array, 600, "randomfold", 3, 0.5, [4, 4], False)
    lin[1] = LowRankLinear.from_factors(torch.randn(32, 4), torch.randn(4, 32), lin[1].bias)
    basis = nn.Parameter(torch.randn(4, 32))
    lin[2] = SharedBasisLinear.from_shared(basis, torch.randn(32, 4), lin[2].bias)
    lin[3] = SharedBasisLinear.from_shared(basis, torch.randn(32, 4), None)
    u = nn.Parameter(torch.randn(32, 6))
    for i, transposed in ((4, True), (5, False)):
        lin[i] = SharedFactorLinear.from_shared(u, torch.randn(6, 32), lin[i].bias, transposed)
        lin[i].v.set_mask(torch.rand(6, 32) > 0.75)
    lin[6] = TwoSidedSharedLinear.from_shared(nn.Parameter(torch.randn(4, 32)), nn.Parameter(torch.randn(32, 4)),
                                              torch.randn(4, 4), None)
    return net.eval()


def test_materialise_every_family_to_plain_layers():
    net = compressed_net().double()  # float64: random factors give large pre-activations, so compare exactly
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        before = net(x)
        replaced = materialise(net)
        after = net(x)
    assert set(replaced.values()) == {"MaskedConv2d", "LowRankConv2d", "HashedConv2d", "HashedLinear",
                                      "LowRankLinear", "SharedBasisLinear", "SharedFactorLinear",
                                      "TwoSidedSharedLinear"}
    assert all(type(m) in (nn.Linear, nn.Conv2d, nn.Sequential, Net) for m in net.modules())
    assert net.convs[1].stride == (2, 2) and net.convs[1].padding == (1, 1)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)
    assert net.linears[0].weight.dtype == torch.float64


FRESH_PROCESS_PPL = r"""
import json, math, sys
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

folder, text_file, seqlen, max_windows = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
ids = torch.tensor([tok.bos_token_id] + tok(open(text_file).read(), add_special_tokens=False)["input_ids"])
n = min(ids.numel() // seqlen, max_windows)
with torch.no_grad():
    losses = [F.cross_entropy(model(input_ids=w[None]).logits[0, :-1].float(), w[1:]).double()
              for w in ids[: n * seqlen].view(n, seqlen)]
ours = sorted({m.split(".")[0] for m in sys.modules} & {"core", "methods", "runners", "tasks", "tests"})
print(json.dumps({"ppl": math.exp(float(sum(losses)) / n), "n": n, "project_modules": ours}))
"""


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, shared_cache):
    """(config, run folder) of a finished tiny demo_lm svd run saved with save_model=true."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from tests.conftest import ROOT, TINY

    out = tmp_path_factory.mktemp("lm")
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("run", overrides=["task=demo_lm", *TINY["demo_lm"], "logger=none", f"out_dir={out}",
                                        f"cache_dir={shared_cache}", "progress=false", *NO_MEASURE, "method=svd",
                                        "method.ratio=0.5", "save_model=true"])
    GlobalHydra.instance().clear()
    assert execute(cfg, []) == "done"
    return cfg, plan(cfg).run_dir


def test_hf_export_of_demo_lm_gives_the_runs_perplexity_in_plain_transformers(lm_run, tmp_path):
    from tasks.lm.corpora import CORPORA, JOIN

    cfg, run_dir = lm_run
    metrics = read_json(run_dir / METRICS_JSON)
    folder = tmp_path / "hf"
    assert main([str(run_dir), str(folder)]) == 0
    card = (folder / "README.md").read_text()
    assert "svd" in card and "ppl/demo" in card and "materialised" in card
    exported = read_json(folder / EXPORT_JSON)
    assert exported["format"] == "hf" and set(exported["materialised"].values()) == {"LowRankLinear"}
    corpus = CORPORA["demo"]
    text_file = tmp_path / "demo.txt"
    text_file.write_text(JOIN.join(corpus.load(corpus.eval_split)))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                         "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS_PPL, str(folder), str(text_file),
                          str(cfg.task.seqlen), str(cfg.task.eval.max_windows)],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    fresh = json.loads(out.stdout.strip().splitlines()[-1])
    assert fresh["project_modules"] == [] and fresh["n"] == metrics["protocol/n_windows/demo"]
    assert fresh["ppl"] == pytest.approx(metrics["ppl/demo"], rel=1e-5)


def test_compact_export_rebuilds_the_compressed_model(toy_cfg, tmp_path):
    cfg = toy_cfg("method=stable_rps", "method.ratio=0.75", "save_model=true")
    assert execute(cfg, []) == "done"
    run_dir = plan(cfg).run_dir
    folder = tmp_path / "compact"
    out = export(run_dir, folder, "compact")
    assert out["materialised"] == {} and out["compressed_modules"]
    assert (folder / "model.safetensors").read_bytes() == (run_dir / "model.safetensors").read_bytes()
    p, model, _, metrics = load_model(folder)
    assert any(type(m).__name__ == "HashedLinear" for m in model.modules())
    assert p.task.evaluate(model)["mse/toy"] == pytest.approx(metrics["mse/toy"], rel=1e-6)
    dense = tmp_path / "dense"
    export(run_dir, dense, "hf")  # the toy family: a dense state dict
    _, reloaded, _, _ = load_model(dense)
    assert all(type(m) is nn.Linear for m in reloaded.modules() if not list(m.children()))
    assert p.task.evaluate(reloaded)["mse/toy"] == pytest.approx(metrics["mse/toy"], rel=1e-5)


def test_export_without_a_saved_model_is_one_line_exit_2(toy_cfg, tmp_path, capsys):
    cfg = toy_cfg("method=magnitude", "method.ratio=0.5")
    assert execute(cfg, []) == "done"
    assert main([str(plan(cfg).run_dir), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "save_model=true" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "y")]) == 2


def test_eval_adds_a_perplexity_set_to_the_run_and_to_an_export(lm_run, tmp_path, capsys):
    from runners import eval as reeval
    from runners.report import collect_runs

    cfg, run_dir = lm_run
    before = read_json(run_dir / METRICS_JSON)
    text = tmp_path / "extra.txt"
    text.write_text("\n".join(f"def f{i}(x):\n    return x * {i} + len(str(x))" for i in range(400)))
    assert reeval.main([str(run_dir), f"+task.eval.text_files.extra={text}"]) == 0
    after = read_json(run_dir / METRICS_JSON)
    assert {k: after[k] for k in before} == before
    assert after["ppl/extra"] > 1 and after["protocol/ppl/extra/dataset"].startswith("file extra.txt")
    entry = read_json(run_dir / "run.json")["reevaluations"][-1]
    assert "ppl/extra" in entry["metrics"] and entry["overrides"] == [f"+task.eval.text_files.extra={text}"]
    assert collect_runs(cfg.out_dir).set_index("run_id").loc[run_dir.name, "ppl/extra"] == after["ppl/extra"]
    folder = tmp_path / "hf"
    export(run_dir, folder, "hf")
    assert reeval.main([str(folder), f"+task.eval.text_files.extra={text}"]) == 0
    assert read_json(folder / EXPORT_JSON)["metrics"]["ppl/extra"] == pytest.approx(after["ppl/extra"], rel=1e-5)
    capsys.readouterr()
    assert reeval.main([str(run_dir), "method.ratio=0.3"]) == 2
    assert "only key=value overrides" in capsys.readouterr().err
    assert read_json(run_dir / METRICS_JSON) == after


FRESH_PROCESS_TIMM = r"""
import json, sys
import timm
import torch

folder, inputs = sys.argv[1], sys.argv[2]
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
with torch.no_grad():
    logits = model(torch.load(inputs))
ours = sorted({m.split(".")[0] for m in sys.modules} & {"core", "methods", "runners", "tasks", "tests"})
torch.save(logits, inputs + ".out")
print(json.dumps({"project_modules": ours}))
"""


def test_hf_export_of_a_timm_model_loads_with_plain_timm(task_cfg, tmp_path):
    cfg = task_cfg("demo_vit", "method=svd", "method.ratio=0.5", "save_model=true", *NO_MEASURE)
    assert execute(cfg, []) == "done"
    run_dir = plan(cfg).run_dir
    folder = tmp_path / "timm"
    out = export(run_dir, folder, "hf")
    assert set(out["materialised"].values()) == {"LowRankLinear"}
    _, model, _, _ = load_model(run_dir)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                         "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", FRESH_PROCESS_TIMM, str(folder), str(tmp_path / "x.pt")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["project_modules"] == []
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "x.pt.out"), model(x), rtol=1e-5, atol=1e-5)


def test_eval_adds_zero_shot_accuracy_through_lm_eval(lm_run, tmp_path, monkeypatch):
    import datasets

    from runners import eval as reeval
    from tests.test_zeroshot import local_task

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    local_task(tmp_path)
    _, run_dir = lm_run
    assert reeval.main([str(run_dir), "task.zeroshot.tasks=[tiny_mc]", f"task.zeroshot.include_path={tmp_path}",
                        "task.zeroshot.include_defaults=false", "task.zeroshot.batch_size=4"]) == 0
    metrics = read_json(run_dir / METRICS_JSON)
    assert 0 <= metrics["zeroshot/tiny_mc/acc"] <= 1 and metrics["protocol/zeroshot/tiny_mc/n"] == 10
    assert metrics["protocol/zeroshot/lm_eval"].startswith("0.4")
