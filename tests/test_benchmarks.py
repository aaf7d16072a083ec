"""The benchmark scripts run end to end on tiny shapes (their figures come from real devices: BENCHMARKS.md)."""
import argparse
import json

import pytest
import torch

from methods import CompressContext, create_method
from runners import bench_llm_speed, bench_method, bench_train_step, bench_vision_speed
from tasks.adapters import create_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def test_llm_speed_layouts_store_what_the_ratio_says(tmp_path):
    out = bench_llm_speed.main(["--device", "cpu", "--dtype", "fp32", "--hidden", "64", "--intermediate", "160",
                                "--layers", "4", "--heads", "4", "--vocab", "128", "--seqlen", "16",
                                "--prompt", "4", "--tokens", "3", "--warmup", "1", "--decode", "eager",
                                "--min-run-time", "0.01", "--ratios", "0.2", "0.5", "--out", str(tmp_path / "s.json")])
    rows = {(r["layout"], r["ratio"], r["kernels"]): r for r in out["rows"]}
    layouts = ("lowrank", "basis_sharing", "geo_sharing")
    assert set(rows) == {("dense", 0.0, "torch")} | {(lay, r, k) for lay in layouts for r in (0.2, 0.5)
                                                     for k in ("torch", "auto")}
    for (layout, ratio, mode), r in rows.items():
        assert ratio <= r["removed_of_linear"] <= ratio + 0.05, (layout, ratio, r["removed_of_linear"])
        assert r["prefill_tokens_per_s"] > 0 and r["decode_eager_ms"] > 0
        # the inference layout fuses (q, k, v) and (gate, up) in each of 4 blocks and stores nothing more
        # (geo_sharing: only the types its colouring left in one class per layer together)
        fused = 8 if mode == "auto" else 0
        assert (r["fused_input_groups"] <= fused if layout == "geo_sharing" else r["fused_input_groups"] == fused)
        if mode == "auto":
            assert r["weight_bytes"] == rows[(layout, ratio, "torch")]["weight_bytes"]
    assert rows[("basis_sharing", 0.5, "auto")]["weight_bytes"] < rows[("dense", 0.0, "torch")]["weight_bytes"]
    # the benchmarked model is what a run of the same method config produces: same linear parameters
    shape = argparse.Namespace(vocab=128, hidden=64, intermediate=160, layers=4, heads=4, seqlen=16, prompt=4,
                               tokens=3, warmup=1, dtype="fp32")
    for layout in layouts:
        model = bench_llm_speed.build_dense(shape, torch.device("cpu"))
        create_method(bench_llm_speed.layout_config(layout, 0.5, 1)).apply(
            model, create_adapter(model), CompressContext(bench_method.token_windows(128, 4, 128, torch.device("cpu")),
                                                          torch.device("cpu"), 0, progress=False))
        assert bench_llm_speed.linear_params(model) == rows[(layout, 0.5, "torch")]["linear_params"], layout
    assert json.loads((tmp_path / "s.json").read_text())["rows"][0]["layout"] == "dense"


def test_llm_speed_rounds_ranks_to_the_requested_multiple():
    shape = argparse.Namespace(vocab=64, hidden=128, intermediate=256, layers=2, heads=4, seqlen=8, prompt=4,
                               tokens=2, warmup=1, dtype="fp32")
    model = bench_llm_speed.build_dense(shape, torch.device("cpu"))
    ranks = bench_llm_speed.apply_layout(model, "lowrank", 0.5, round_ranks=16)
    assert all(r % 16 == 0 and r > 0 for r in ranks.values())


def test_llm_speed_refuses_graph_decode_on_the_cpu(tmp_path):
    with pytest.raises(SystemExit, match="CUDA graphs"):
        bench_llm_speed.main(["--device", "cpu", "--decode", "graph", "--out", str(tmp_path / "s.json")])


def test_train_step_benchmark_runs(tmp_path):
    out = bench_train_step.main(["--archs", "resnet20", "--methods", "stable_rps", "--ratios", "0.9",
                                 "--batch-size", "4", "--warmup", "1", "--min-run-time", "0.01",
                                 "--out", str(tmp_path / "t.json")])
    assert [(r["method"], r["ratio"]) for r in out["rows"]] == [("dense", 0.0), ("stable_rps", 0.9)]
    assert all(r["step_ms"] > 0 for r in out["rows"])


def test_vision_speed_benchmark_measures_dense_and_each_kernel_choice(tmp_path):
    out = bench_vision_speed.main(["--device", "cpu", "--models", "resnet20", "deit_base", "--batch", "2",
                                   "--warmup", "1", "--min-run-time", "0.01", "--out", str(tmp_path / "v.json"),
                                   "--vit-kwargs", '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, '
                                                   '"num_heads": 2, "mlp_ratio": 4}'])
    rows = {(r["model"], r["method"], r["kernels"]): r for r in out["rows"]}
    assert set(rows) == {(m, meth, k) for m, cs in (("resnet20", ["stable_rps"]), ("deit_base", ["fips", "fips_b32"]))
                         for meth, k in (("dense", "torch"), *((c, k) for c in cs for k in ("torch", "auto")))}
    assert all(r["images_per_s"] > 0 and r["ran"] == "torch" for r in out["rows"])   # no Triton on the CPU
    # fips at a 0.5 MLP budget stores less; stable_rps's training-time index buffers stay resident without Triton
    assert rows[("deit_base", "fips", "auto")]["weight_bytes_vs_dense"] < 1
    # block-sparse V (BSR) needs one index per 32 x 32 block instead of one per non-zero
    assert rows[("deit_base", "fips_b32", "auto")]["weight_bytes"] < rows[("deit_base", "fips", "auto")]["weight_bytes"]
    assert rows[("resnet20", "stable_rps", "torch")]["weight_bytes_vs_dense"] > 2


@pytest.mark.parametrize("argv,match", [(["--hashed-ratio", "1.0"], "must be in"),
                                        (["--sparsity-blocks", "0"], "block size must be >= 1")])
def test_vision_speed_refuses_bad_settings_before_building_anything(argv, match, tmp_path):
    with pytest.raises(SystemExit, match=match):
        bench_vision_speed.main(["--device", "cpu", "--out", str(tmp_path / "v.json"), *argv])
    assert not (tmp_path / "v.json").exists()


def test_llm_speed_bytes_only_skips_the_timing(tmp_path):
    out = bench_llm_speed.main(["--device", "cpu", "--dtype", "fp32", "--hidden", "64", "--intermediate", "160",
                                "--layers", "2", "--heads", "4", "--vocab", "128", "--bytes-only", "--kernels",
                                "torch", "--layouts", "basis_sharing", "--ratios", "0.5", "--out", str(tmp_path / "b.json")])
    dense, shared = out["rows"]
    assert "prefill_tokens_per_s" not in shared and shared["weight_bytes_vs_dense"] < 1
    assert shared["weight_bytes"] == pytest.approx(dense["weight_bytes"] - 4 * (dense["linear_params"]
                                                                                - shared["linear_params"]))


def test_ppl_benchmark_harness_and_plain_loops_agree(tmp_path):
    from runners import bench_ppl

    out = bench_ppl.main(["--hidden", "32", "--intermediate", "64", "--layers", "1", "--heads", "2", "--vocab", "64",
                          "--seqlen", "16", "--batch", "2", "--windows", "4", "--rounds", "2",
                          "--out", str(tmp_path / "p.json")])
    harness, plain = out["rows"]
    assert (harness["loop"], plain["loop"]) == ("harness", "plain")
    assert harness["ppl"] == pytest.approx(plain["ppl"], rel=1e-5) and out["harness_vs_plain"] > 0
    with pytest.raises(SystemExit, match="multiple of --batch"):
        bench_ppl.main(["--windows", "3", "--batch", "2", "--out", str(tmp_path / "q.json")])


def test_compress_cost_fits_power_laws_and_projects_every_stage(tmp_path):
    from runners import bench_compress_cost as cc

    out = cc.main(["--methods", "basis_sharing", "--widths", "32", "64", "--depths", "2", "3", "--base-width", "32",
                   "--base-depth", "2", "--calib-samples", "2", "--calib-seqlen", "16", "--vocab", "64",
                   "--out", str(tmp_path / "c.json")])
    assert {(p["hidden"], p["layers"]) for p in out["points"]} == {(32, 2), (64, 2), (32, 3)}
    proj = out["projections"]["basis_sharing"]
    assert set(proj["h100_s"]) == {s for p in out["points"] for s in p["stage_s"]}
    assert {"calibration", "statistics", "fitting"} <= set(proj["h100_s"])
    assert proj["h100_total_s"] == pytest.approx(sum(proj["h100_s"].values())) and proj["goal_s"] == 240.0
    # a synthetic stage that grows as L * h^3 is fitted back exactly
    points = [{"layers": l, "hidden": h, "tokens": 1, "stage_s": {"eigen": 1e-9 * l * h**3}}
              for l, h in ((2, 64), (4, 64), (2, 128), (8, 256))]
    law = cc.fit(points, "eigen")
    assert law["layers_exp"] == pytest.approx(1.0) and law["hidden_exp"] == pytest.approx(3.0)


def test_gpu_benchmark_smoke_runs_every_step_on_the_cpu(tmp_path):
    from runners import bench_gpu

    out = bench_gpu.main(["--smoke", "--out", str(tmp_path / "g.json")])
    failed = {k: v["error"] for k, v in out["steps"].items() if v["status"] != "ok"}
    assert not failed, failed
    assert set(out["steps"]) == set(bench_gpu.STEPS)
    assert len(out["steps"]["graphs"]["cases"]) >= 6


def test_contention_benchmark_refuses_bad_settings(tmp_path):
    from runners import bench_contention

    with pytest.raises(SystemExit, match="competitors"):
        bench_contention.main(["--competitors", "-1", "--out", str(tmp_path / "x.json")])
