"""A toy task family for fast tests of the run loop: a two-layer MLP on fixed random data, built in milliseconds."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tasks.base import TASKS, Task, TaskConfig


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

    def example_inputs(self):
        return (self._data()[: self.cfg.measure.batch_size],)
