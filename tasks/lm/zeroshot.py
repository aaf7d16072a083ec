"""Zero-shot accuracy of the ``hf_lm`` family: lm-eval's ``simple_evaluate`` on the in-memory model (``HFLM``), so a
compressed model is scored as it is. Reports ``zeroshot/<task>/{acc,acc_stderr,acc_norm,acc_norm_stderr}``, their
mean over tasks ``zeroshot/mean/acc`` (and ``acc_norm``), the lm-eval version and every task's version.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from core.errors import ConfigError


@dataclass
class ZeroShotConfig:
    """lm-eval tasks scored on the in-memory model (0-shot multiple choice in the papers)."""

    tasks: list[str] = field(default_factory=list)  # e.g. openbookqa, arc_easy, arc_challenge, winogrande, ...
    batch_size: int = 32  # fixed, never "auto", so padding and results do not depend on the GPU
    num_fewshot: int = 0
    limit: int | None = None  # first examples of every task only (smoke tests); None: all
    include_path: str | None = None  # a folder of extra lm-eval task YAMLs (local or offline tasks)
    include_defaults: bool = True  # lm-eval's built-in tasks; false with include_path skips indexing them

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"task.zeroshot.batch_size={self.batch_size} must be >= 1")
        if self.num_fewshot < 0:
            raise ConfigError(f"task.zeroshot.num_fewshot={self.num_fewshot} must be >= 0")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"task.zeroshot.limit={self.limit} must be >= 1 (or null for all examples)")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"task.zeroshot.tasks={list(self.tasks)} lists a task twice")
        if self.tasks and not self.include_defaults and not self.include_path:
            raise ConfigError("task.zeroshot: include_defaults=false needs an include_path with the task YAMLs")


def zeroshot_scores(model: nn.Module, tokenizer, z: ZeroShotConfig, max_length: int) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` of ``z.tasks`` on ``model`` as it is in memory (seeds 0; contexts truncated to
    ``max_length`` tokens): ``zeroshot/<task>/<metric>`` for acc, acc_norm and their standard errors where the task
    reports them, ``zeroshot/mean/<metric>`` over the tasks, and ``protocol/zeroshot/...`` (lm-eval version, task
    versions, examples per task, shots, batch size, limit)."""
    import copy
    from importlib.metadata import version

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=z.batch_size, max_length=max_length)
    manager = TaskManager(include_path=z.include_path, include_defaults=z.include_defaults)
    res = lm_eval.simple_evaluate(model=lm, tasks=list(z.tasks), task_manager=manager, num_fewshot=z.num_fewshot,
                                  limit=z.limit, log_samples=False, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    out: dict[str, Any] = {"protocol/zeroshot/lm_eval": version("lm_eval"),
                           "protocol/zeroshot/num_fewshot": z.num_fewshot,
                           "protocol/zeroshot/batch_size": z.batch_size, "protocol/zeroshot/limit": z.limit}
    means: dict[str, list[float]] = {}
    for name in z.tasks:
        scores = res["results"].get(name)
        if scores is None:
            raise ConfigError(f"task.zeroshot: lm-eval returned no result for {name!r}")
        for metric in ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr"):
            value = scores.get(f"{metric},none")
            if isinstance(value, (int, float)):
                out[f"zeroshot/{name}/{metric}"] = float(value)
                if not metric.endswith("stderr"):
                    means.setdefault(metric, []).append(float(value))
        out[f"protocol/zeroshot/{name}/version"] = str(res["versions"].get(name))
        out[f"protocol/zeroshot/{name}/n"] = int(res["n-samples"][name]["effective"])
    for metric, values in means.items():
        if len(values) == len(z.tasks):
            out[f"zeroshot/mean/{metric}"] = sum(values) / len(values)
    return out
