"""The task data contract: every registered family says which data kinds it provides, and an unprovided kind is a
``ConfigError`` naming the family and the kind, also through ``CompressContext``."""
from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from methods.base import CompressContext
from tasks import TASKS, Task

# the data kinds every family provides; a new family must be added here
PROVIDED = {
    "cifar_cnn": {"calibration_batches", "labelled_calibration_batches", "training_batches"},
    "timm_image": {"calibration_batches", "labelled_calibration_batches", "stratified_batches", "training_batches"},
    "hf_lm": {"calibration_batches"},
    "toy": {"calibration_batches", "labelled_calibration_batches"},
}
ARGS = {"calibration_batches": (0,), "labelled_calibration_batches": (0,), "stratified_batches": (0, 8, 4),
        "training_batches": (0, 4)}
WORDS = {"calibration_batches": "calibration", "labelled_calibration_batches": "labelled calibration",
         "stratified_batches": "class-stratified", "training_batches": "training"}


def test_every_family_answers_provides():
    assert set(ARGS) == set(WORDS) == set(Task.DATA_KINDS)
    assert set(TASKS.names()) == set(PROVIDED)
    for name in TASKS.names():
        cls = TASKS.get(name)
        assert {k for k in Task.DATA_KINDS if cls.provides(k)} == PROVIDED[name], name
    with pytest.raises(ValueError, match="unknown data kind 'images'; valid: calibration_batches"):
        TASKS.get("cifar_cnn").provides("images")


@pytest.mark.parametrize("name", sorted(PROVIDED))
def test_unprovided_kind_is_a_config_error(name):
    cls = TASKS.get(name)
    task = cls.__new__(cls)  # the refusal needs no config, data or model
    for kind in sorted(set(Task.DATA_KINDS) - PROVIDED[name]):
        with pytest.raises(ConfigError, match=f"task family {name} provides no {WORDS[kind]} batches"):
            getattr(task, kind)(*ARGS[kind])


def test_compress_context_is_the_door():
    task = TASKS.get("hf_lm").__new__(TASKS.get("hf_lm"))
    ctx = CompressContext(task=task, device=torch.device("cpu"), seed=0)
    assert ctx.provides("calibration_batches") and not ctx.provides("stratified_batches")
    with pytest.raises(ConfigError, match="hf_lm provides no class-stratified batches"):
        ctx.stratified_batches(8, 4)
    with pytest.raises(ConfigError, match="hf_lm provides no training batches"):
        ctx.training_batches(4)
    with pytest.raises(ConfigError, match="hf_lm provides no labelled calibration batches"):
        ctx.labelled_calibration_batches()
