"""Take a finished run's compressed model out of the harness.

    python -m runners.export <run_dir> <folder> [--format hf|compact]

``hf`` (default) writes a folder that plain libraries load, with every compressed layer materialised as the dense
``nn.Linear`` / ``nn.Conv2d`` it computes (``CompressedModule.dense_weight``): ``hf_lm`` tasks as a transformers
``save_pretrained`` folder with the tokenizer (``AutoModelForCausalLM.from_pretrained``, no ``trust_remote_code``),
``timm_image`` tasks as a timm folder (``timm.create_model("local-dir:<folder>", pretrained=True)``), other
families as a dense ``model.safetensors`` state dict. ``compact`` copies the compact checkpoint (factors, shared
bases and arrays, sparse values and bit masks; ``runners.checkpoint``) with the run record needed to rebuild it.
Both folders hold ``README.md`` (a model card: method, ratio, protocol, metrics, what is stored and what is
materialised) and ``compbench.json`` (the run record, its metrics and the export's format), so ``runners.eval``
re-evaluates them.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

import methods
import tasks
from core.compressed import CompressedModule
from core.errors import ConfigError
from core.io import read_json, umask, write_json_atomic
from runners.checkpoint import load_compressed
from runners.plan import Plan, plan
from runners.record import METRICS_JSON, RUN_JSON
from runners.schema import RunConfig

FORMATS = ("hf", "compact")
MODEL_FILE = "model.safetensors"
EXPORT_JSON = "compbench.json"


# -- reading a run or an export ------------------------------------------------------------------------------------
def read_source(path: Path) -> tuple[dict[str, Any], dict[str, Any], str]:
    """(run.json record, metrics, source format: ``run``, ``hf`` or ``compact``) of a run folder or an export."""
    path = Path(path)
    if (path / RUN_JSON).is_file():
        record, metrics, fmt = read_json(path / RUN_JSON), read_json(path / METRICS_JSON) or {}, "run"
    elif (path / EXPORT_JSON).is_file():
        export = read_json(path / EXPORT_JSON) or {}
        record, metrics, fmt = export.get("run"), export.get("metrics", {}), export.get("format")
    else:
        raise ConfigError(f"{path}: neither a run folder ({RUN_JSON}) nor an exported model ({EXPORT_JSON})")
    if not isinstance(record, dict) or "config" not in record:
        raise ConfigError(f"{path}: its run record is unreadable")
    if record.get("status") != "done":
        raise ConfigError(f"{path}: run status is {record.get('status')!r}, not done")
    if fmt != "hf" and not (path / MODEL_FILE).is_file():
        raise ConfigError(f"{path}: no {MODEL_FILE}; the run was not saved: run it again with save_model=true "
                          f"(in a new out_dir, or after deleting this run folder)")
    return record, metrics, fmt


def run_config(record: dict[str, Any], overrides: list[str] = ()) -> DictConfig:
    """The run's resolved config (``record["config"]``) as the structured config ``plan`` takes, with ``overrides``
    (``key=value`` dotlist; a leading ``+`` is accepted) applied."""
    config = record["config"]
    schema = OmegaConf.structured(RunConfig)
    schema.task = OmegaConf.structured(tasks.TASKS.get(config["task"]["family"]).config_class)
    schema.method = OmegaConf.structured(methods.METHODS.get(config["method"]["name"]).config_class)
    try:
        return OmegaConf.merge(schema, config, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    except Exception as e:  # omegaconf: unknown key, wrong type
        raise ConfigError(str(e).splitlines()[0]) from e


def load_model(source: Path, overrides: list[str] = ()) -> tuple[Plan, nn.Module, dict[str, Any], dict[str, Any]]:
    """(plan, compressed model in eval mode, record, metrics) of a run folder or an export; nothing recompressed.

    An ``hf`` export of an ``hf_lm`` task is the task's model (``task.model`` pointed at the folder, tokenizer
    included); otherwise the task's architecture is built (untrained where the family can, so no dense training
    runs) and every tensor is loaded over it: the dense state dict of an ``hf`` export, or the compact checkpoint
    with its compressed structure rebuilt (``load_compressed``)."""
    source = Path(source)
    record, metrics, fmt = read_source(source)
    lm_folder = fmt == "hf" and record["config"]["task"]["family"] == "hf_lm"
    # where the source lies now (a run folder's out_dir may have moved, an export may be on another machine)
    fixed = [f"out_dir={source.resolve().parents[1] if fmt == 'run' else source.resolve()}"]
    if lm_folder:
        fixed.append(f"task.model={source.resolve()}")
    p = plan(run_config(record, [*fixed, *overrides]))
    if lm_folder:
        return p, p.task.build_model(p.run.seed).eval(), record, metrics
    model = p.task.fresh_model(p.run.seed) if p.task.supports_training() else p.task.build_model(p.run.seed)
    if fmt == "hf":
        from safetensors.torch import load_model as load_dense

        load_dense(model, str(source / MODEL_FILE), device=str(next(model.parameters()).device))
    else:
        model = load_compressed(model, source / MODEL_FILE)
    return p, model.eval(), record, metrics


# -- materialising -------------------------------------------------------------------------------------------------
def dense_layer(module: CompressedModule) -> nn.Module:
    """The ``nn.Linear`` (2-D weight) or ``nn.Conv2d`` (4-D) computing what ``module`` computes, same dtype/device."""
    w = module.dense_weight().detach()
    bias = getattr(module, "bias", None)
    kw = {"bias": bias is not None, "device": w.device, "dtype": w.dtype}
    if w.dim() == 2:
        layer = nn.Linear(w.shape[1], w.shape[0], **kw)
    elif w.dim() == 4:
        groups = getattr(module, "groups", 1)
        layer = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), tuple(module.stride),
                          module.padding if isinstance(module.padding, str) else tuple(module.padding),
                          tuple(module.dilation), groups, padding_mode=getattr(module, "padding_mode", "zeros"), **kw)
    else:
        raise TypeError(f"{type(module).__name__}: cannot materialise a {w.dim()}-D weight")
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def materialise(model: nn.Module) -> dict[str, str]:
    """Replace every outermost ``CompressedModule`` of ``model`` by its dense layer, in place; returns
    {module path: compressed class name}."""
    replaced: dict[str, str] = {}
    for path, module in list(model.named_modules()):
        if not isinstance(module, CompressedModule) or any(path.startswith(r + ".") for r in replaced):
            continue
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, dense_layer(module))
        replaced[path] = type(module).__name__
    return replaced


# -- writing -------------------------------------------------------------------------------------------------------
def _stored_summary(model: nn.Module) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, CompressedModule):
            counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def model_card(record: dict[str, Any], metrics: dict[str, Any], fmt: str, modules: dict[str, int],
               how_to_load: str) -> str:
    """The export's README.md: what the model is, how it was compressed and measured, what the files hold."""
    s = record.get("summary", {})
    other = ("protocol/", "dense/", "scope/", "compress/", "method/", "speedup/")
    quality = {k: (v, metrics.get(f"dense/{k}", "")) for k, v in metrics.items()
               if "/" in k and not k.startswith(other)}
    protocol = {k: v for k, v in metrics.items() if k.startswith("protocol/")}
    sizes = {k: metrics[k] for k in ("params_dense", "params_stored", "removed_fraction", "compression_x",
                                     "scope/removed_fraction", "index_overhead", "bytes_on_disk", "weight_bytes",
                                     "latency_ms", "throughput", "decode_ms_per_token") if k in metrics}
    stored = ", ".join(f"{n} x {c}" for c, n in sorted(modules.items())) or "none (dense)"
    if fmt == "hf":
        storage = (f"Every compressed layer ({stored}) is materialised here as the dense nn.Linear / nn.Conv2d it "
                   f"computes, so this folder holds {metrics.get('params_dense', 'the dense')} parameters, not the "
                   f"{metrics.get('params_stored', '?')} the method stores. `python -m runners.export <run> <dir> "
                   f"--format compact` keeps the compact storage.")
    else:
        storage = (f"{MODEL_FILE} keeps the compact storage of the run ({stored}): factors, shared bases and arrays "
                   f"once, pruned weights as non-zero values plus a one-bit mask; {metrics.get('params_stored', '?')} "
                   f"stored parameters for {metrics.get('params_dense', '?')} dense. Its metadata names every "
                   f"compressed module's class and constructor arguments.")

    def table(d: dict[str, Any]) -> str:
        return "\n".join(f"| `{k}` | {v} |" for k, v in d.items()) or "| | |"

    return f"""# {record.get('run_id')}

Compressed with compbench: task `{s.get('task')}` (model `{s.get('model')}`), method `{s.get('method')}`,
`method.ratio` {s.get('ratio')} (fraction of parameters removed in scope `{s.get('scope')}`), seed {s.get('seed')}.
Method config: `{json.dumps(record['config']['method'], sort_keys=True)}`.

## Loading

```python
{how_to_load}
```

## Storage ({fmt})

{storage}

## Quality (of the run)

| metric | compressed | dense |
|---|---|---|
{chr(10).join(f"| `{k}` | {v} | {d} |" for k, (v, d) in quality.items())}

## Size and efficiency (of the run, on its device)

| metric | value |
|---|---|
{table(sizes)}

## Protocol

| field | value |
|---|---|
{table(protocol)}
"""


def _how_to_load(family: str, fmt: str) -> str:
    if fmt == "compact":
        return ("from runners.export import load_model  # this project's code rebuilds the compact form\n"
                "plan, model, record, metrics = load_model('<this folder>')")
    if family == "hf_lm":
        return ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                "model = AutoModelForCausalLM.from_pretrained('<this folder>')\n"
                "tokenizer = AutoTokenizer.from_pretrained('<this folder>')")
    if family == "timm_image":
        return "import timm\nmodel = timm.create_model('local-dir:<this folder>', pretrained=True)"
    return ("from safetensors.torch import load_file  # a dense state dict of the task's architecture\n"
            f"state_dict = load_file('<this folder>/{MODEL_FILE}')")


def export(source: Path, folder: Path, fmt: str = "hf") -> dict[str, Any]:
    """Write the model of run folder ``source`` to ``folder`` (new or empty; written in a temporary folder beside
    it and renamed, so an interrupted export leaves nothing half-written) in ``fmt``; returns the ``compbench.json``
    written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}; valid: {', '.join(FORMATS)}")
    source, folder = Path(source), Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ConfigError(f"{folder} exists and is not empty")
    record, metrics, src_fmt = read_source(source)
    if src_fmt != "run":
        raise ConfigError(f"{source} is already an export ({src_fmt}); export from the run folder")
    family = record["config"]["task"]["family"]
    p, model, _, _ = load_model(source)  # a compact checkpoint is copied only once it is proven to rebuild
    modules = _stored_summary(model)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))  # renamed to ``folder`` when complete
    try:
        materialised: dict[str, str] = {}
        if fmt == "compact":
            shutil.copyfile(source / MODEL_FILE, tmp / MODEL_FILE)
        else:
            materialised = materialise(model)
            _write_dense(p, model, tmp)
        out = {"format": fmt, "family": family, "run": record, "metrics": metrics, "materialised": materialised,
               "compressed_modules": modules}
        write_json_atomic(tmp / EXPORT_JSON, out)
        (tmp / "README.md").write_text(model_card(record, metrics, fmt, modules, _how_to_load(family, fmt)))
        for f in [tmp, *tmp.iterdir()]:  # the modes a plain mkdir / open gives, not the temporary ones (0o700/0o600)
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask())
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_dense(p: Plan, model: nn.Module, folder: Path) -> None:
    family = p.run.task.family
    if family == "hf_lm":
        model.config.use_cache = True  # the harness turns the KV cache off for its prefill-only forwards
        model.save_pretrained(folder, safe_serialization=True)
        p.task.tokenizer.save_pretrained(folder)
    elif family == "timm_image":
        from timm.models import save_for_hf

        save_for_hf(model, str(folder), safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(model, str(folder / MODEL_FILE))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's folder (<out_dir>/runs/<run_id>)")
    parser.add_argument("folder", type=Path, help="the folder to write (new or empty)")
    parser.add_argument("--format", default="hf", choices=FORMATS,
                        help="hf: dense, loadable by transformers / timm; compact: the harness's compact storage")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.folder, args.format)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {out['run']['run_id']} ({args.format}, {len(out['materialised'])} layers materialised) "
          f"to {args.folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
