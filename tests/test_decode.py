"""Batch-1 decode measurement with a static KV cache (``measure.decode``)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from core.errors import ConfigError
from methods.modules import LowRankLinear
from methods.svd import truncated_svd
from runners import measure
from runners.run import plan
from runners.schema import MeasureConfig


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def full_recompute_greedy(model, prompt, n_new):
    ids = prompt
    with torch.inference_mode():
        for _ in range(n_new):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[:, prompt.shape[1]:]


def test_static_cache_decode_equals_greedy_decode_without_a_cache():
    model = tiny_llama()
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    tokens, times = measure.greedy_static_decode(model, prompt, n_steps=12)
    assert tokens.shape == (1, 13) and len(times) == 12 and all(t > 0 for t in times)
    assert torch.equal(tokens, full_recompute_greedy(model, prompt, 13))


def test_decode_works_through_compressed_modules():
    model = tiny_llama()
    layer = model.model.layers[0].mlp
    u, v = truncated_svd(layer.up_proj.weight.detach(), 8)
    layer.up_proj = LowRankLinear.from_factors(u, v, None)
    prompt = torch.arange(5).unsqueeze(0)
    tokens, _ = measure.greedy_static_decode(model, prompt, n_steps=6)
    assert torch.equal(tokens, full_recompute_greedy(model, prompt, 7))


def test_decode_latency_record():
    out = measure.decode_latency(tiny_llama(), torch.arange(4).unsqueeze(0), n_tokens=5, mode="eager", warmup=1)
    assert out["decode_ms_per_token"] > 0 and out["decode_iqr_ms"] >= 0
    assert out["protocol/decode_mode"] == "eager" and out["protocol/decode_tokens"] == 5
    assert out["protocol/decode_prompt"] == 4 and out["protocol/decode_batch"] == 1
    assert isinstance(out["decode_noisy"], bool)


def test_decode_noisy_flags_a_spread_above_the_threshold(monkeypatch):
    steps = iter([0.01] * 3 + [0.01, 0.01, 0.03, 0.01, 0.05, 0.01])   # 3 warm-up steps, then 6 timed ones
    monkeypatch.setattr(measure, "greedy_static_decode", lambda model, prompt, n, step: (None, [next(steps)
                                                                                           for _ in range(n)]))
    out = measure.decode_latency(None, torch.arange(4).unsqueeze(0), n_tokens=6, warmup=3, noisy_rel_iqr=0.5)
    assert out["decode_ms_per_token"] == pytest.approx(10.0) and out["decode_noisy"] is True
    steps = iter([0.01] * 9)
    out = measure.decode_latency(None, torch.arange(4).unsqueeze(0), n_tokens=6, warmup=3, noisy_rel_iqr=0.5)
    assert out["decode_noisy"] is False


def test_bad_decode_settings_are_config_errors(compose_cfg):
    with pytest.raises(ConfigError, match="measure.decode='fast'"):
        MeasureConfig(decode="fast")
    with pytest.raises(ConfigError, match="decode_tokens=0"):
        MeasureConfig(decode_tokens=0)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        plan(compose_cfg("task=demo_lm", "measure.decode=graph", "device=cpu", "logger=none"))
    plan(compose_cfg("task=demo_resnet", "measure.decode=graph", "device=cpu", "logger=none"))  # nothing to decode
