"""A toy task family for fast tests of the run loop: a two-layer MLP on fixed random data, built in milliseconds."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tasks.base import TASKS, Task, TaskConfig

TRAIN_STEPS = 6


@dataclass
class ToyConfig(TaskConfig):
    name: str = "toy"
    family: str = "toy"
    width: int = 32
    produce_nan: bool = False  # evaluate() returns NaN after compression (tests the ``nan`` failure path)
    tie_weights: bool = False  # fc1 and fc3 share one weight tensor


class ToyMLP(nn.Module):
    def __init__(self, width: int, tie: bool):
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.fc3 = nn.Linear(width, width)
        if tie:
            self.fc3.weight = self.fc1.weight

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@TASKS.register("toy")
class Toy(Task):
    config_class = ToyConfig
    evaluations = 0

    def structure_model(self):
        with torch.device("meta"):
            return ToyMLP(self.cfg.width, self.cfg.tie_weights)

    def build_model(self, seed):
        torch.manual_seed(seed)
        return ToyMLP(self.cfg.width, self.cfg.tie_weights).eval()

    def _data(self):
        g = torch.Generator().manual_seed(123)
        return torch.randn(64, self.cfg.width, generator=g)

    def evaluate(self, model):
        type(self).evaluations += 1
        with torch.no_grad():
            out = model(self._data())
        value = float("nan") if self.cfg.produce_nan and any(
            type(m).__name__ != "Linear" for m in model.modules() if m is not model and not isinstance(m, ToyMLP)) \
            else float(out.pow(2).mean())
        return {"mse/toy": value, "protocol/dataset": "toy-random"}

    def main_metric(self):
        return "mse/toy", False

    def calibration_batches(self, seed):
        yield self._data()[:16]

    def _labels(self):
        return torch.randint(0, self.cfg.width, (64,), generator=torch.Generator().manual_seed(321))

    def labelled_calibration_batches(self, seed):
        """(x, y): the toy's outputs are read as ``width``-class logits (for data-driven pruning scores)."""
        yield self._data()[:16], self._labels()[:16]

    def fresh_model(self, seed):
        torch.manual_seed(seed + 1)
        return ToyMLP(self.cfg.width, self.cfg.tie_weights).eval()

    def train(self, model, seed, after_step=None, log=None, ckpt_path=None):
        """TRAIN_STEPS steps of SGD (momentum 0.9, weight decay 1e-4) on cross-entropy, batches of 16."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
        x, y = self._data(), self._labels()
        model.train()
        for step in range(TRAIN_STEPS):
            rows = slice(16 * (step % 4), 16 * (step % 4) + 16)
            loss = torch.nn.functional.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if after_step is not None:
                after_step(model)
        if log is not None:
            log({"epoch": 1, "loss/train": loss.item()})
        model.eval()
        return {"train/epochs": 1, "loss/train_final": loss.item()}

    def example_inputs(self):
        return (self._data()[: self.cfg.measure.batch_size],)


def tiny_llama(layers: int = 3, hidden: int = 32, inter: int = 48, heads: int = 4, seed: int = 0):
    """A random ``LlamaForCausalLM`` (vocabulary 64, no grouped-query attention) whose blocks matter: the default
    0.02 init makes every block nearly the identity, so block weights are drawn with std 0.2. An odd layer count
    leaves Basis Sharing a remainder class."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
                      use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model


def tiny_vit(depth: int = 4, seed: int = 0):
    """A random timm ViT on 16x16 RGB images: patch 4, width 32, 2 heads, 10 classes, in eval mode."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=32, depth=depth,
                             num_heads=2, num_classes=10).eval()
