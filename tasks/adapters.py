"""Per-architecture adapters: where a model keeps its blocks, linears and prunable weights.

Methods ask an adapter for a *scope* (an ordered ``{qualified_name: module}``) or for the roles of
each block's linears, and replace modules through it; they never hard-code attribute paths.

Scopes every adapter answers:
  ``linear``    every ``nn.Linear`` inside the repeated blocks (decoder / encoder linears)
  ``attention`` the attention linears of the blocks
  ``mlp``       the MLP linears of the blocks
  ``prunable``  every conv and linear weight of the model, stem and classifier included (as Synaptic-Flow,
                arXiv 2006.05467)
  ``auto``      the architecture's default: ``linear`` for transformers, ``prunable`` otherwise
"""
from __future__ import annotations

from typing import ClassVar

from torch import nn

from core.compressed import CompressedModule
from core.errors import ConfigError

ADAPTERS: list[type["ModelAdapter"]] = []


def _is_weight_layer(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, CompressedModule))


class ModelAdapter:
    """Generic adapter. Subclasses name the block list and the role of each linear in a block."""

    # role -> attribute path inside one block; roles sharing an input are listed in ``input_groups``
    roles: ClassVar[dict[str, str]] = {}
    attention_roles: ClassVar[tuple[str, ...]] = ()
    mlp_roles: ClassVar[tuple[str, ...]] = ()
    input_groups: ClassVar[tuple[tuple[str, ...], ...]] = ()
    default_scope: ClassVar[str] = "prunable"
    #: the model kind when the model carries none (``model_kind``), e.g. "vit"; transformers models name their own
    kind: ClassVar[str | None] = None
    #: whether blocks fall into stages with transitions between them (Swin); see ``stage_of``
    has_stages: ClassVar[bool] = False
    #: whether the model is a causal language model (block outputs are token states; FiPS reconstructs its MLPs)
    causal_lm: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        ADAPTERS.append(cls)

    # -- structure ---------------------------------------------------------------------------------------------
    def block_paths(self) -> list[str]:
        """Qualified names of the repeated blocks, in forward order."""
        return []

    def blocks(self) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in self.block_paths()]

    def transition(self, index: int) -> nn.Module | None:
        """What the model applies between block ``index - 1``'s output and block ``index``'s input (None: nothing,
        the output is the input). Block-wise calibration applies it to the cached hidden states."""
        return None

    def role_paths(self, role: str) -> list[str]:
        """Qualified names of the ``role`` linear in every block, in block order."""
        return [f"{b}.{self.roles[role]}" for b in self.block_paths()]

    def role_path(self, role: str, layer: int) -> str:
        """Qualified name of the ``role`` linear of block ``layer``."""
        return f"{self.block_paths()[layer]}.{self.roles[role]}"

    def model_kind(self) -> str | None:
        """transformers' ``config.model_type`` (e.g. "llama", "mistral"), else the adapter's ``kind``."""
        kind = getattr(getattr(self.model, "config", None), "model_type", None)
        return kind if kind is not None else self.kind

    def stage_of(self, block_path: str) -> int:
        """The stage a block belongs to (0 for models without stages)."""
        return 0

    def mlp_path(self) -> str:
        """The path, inside a block, of the module holding all MLP roles (e.g. ``mlp``); ``ConfigError`` when the
        MLP roles do not sit under one submodule."""
        parents = {self.roles[r].rpartition(".")[0] for r in self.mlp_roles}
        if len(parents) != 1 or "" in parents:
            raise ConfigError(f"{type(self).__name__}: the MLP roles are not under one submodule ({sorted(parents)})")
        return parents.pop()

    def scope_roles(self, scope: str) -> dict[int, list[str]]:
        """{block index: the roles of that block that ``scope`` holds}, roles in adapter order; ``ConfigError``
        when the scope holds a module that is not a named role of a block."""
        index = {f"{b}.{self.roles[r]}": (i, r) for i, b in enumerate(self.block_paths()) for r in self.roles}
        out: dict[int, list[str]] = {}
        for p in self.scope(scope):
            if p not in index:
                raise ConfigError(f"scope {scope!r} holds layers outside the blocks' linear roles ({p}); "
                                  "use scope linear, attention or mlp")
            i, r = index[p]
            out.setdefault(i, []).append(r)
        return out

    def check_block_linears(self, method: str, scope: str) -> None:
        """Refuse, for block-wise calibration methods, a model without named roles, a scope with layers outside the
        blocks' linear roles, layers that are not ``nn.Linear``, and weights offloaded to disk (``meta``)."""
        if not self.roles or not self.block_paths():
            raise ConfigError(f"{method} needs a transformer adapter with named linear roles; "
                              f"{type(self.model).__name__} has none")
        try:
            self.scope_roles(scope)
        except ConfigError as e:
            raise ConfigError(f"{method}: {e}") from None
        for path, layer in self.scope(scope).items():
            if not isinstance(layer, nn.Linear):
                raise ConfigError(f"{method} compresses nn.Linear layers; {path} is {type(layer).__name__}")
            if layer.weight.device.type == "meta" and not self.is_skeleton():
                raise ConfigError(f"{method}: {path} is offloaded to disk (meta weights); block-wise calibration "
                                  "needs every weight in GPU or CPU memory")

    def is_skeleton(self) -> bool:
        """Whether the model is a skeleton without weights (every parameter on ``meta``: ``Task.structure_model``),
        which the checks before any compute use; a model offloaded in part also has ``meta`` weights."""
        return all(p.device.type == "meta" for p in self.model.parameters())

    def scope_names(self) -> list[str]:
        return ["auto", "linear", "attention", "mlp", "prunable"]

    def resolve_scope(self, name: str) -> str:
        return self.default_scope if name == "auto" else name

    def scope(self, name: str) -> dict[str, nn.Module]:
        name = self.resolve_scope(name)
        if name == "prunable":
            return {n: m for n, m in self.model.named_modules() if _is_weight_layer(m)}
        if name not in ("linear", "attention", "mlp"):
            raise ConfigError(f"unknown scope {name!r}; valid: {', '.join(self.scope_names())}")
        if self.roles:
            wanted = {"linear": tuple(self.roles), "attention": self.attention_roles, "mlp": self.mlp_roles}[name]
            paths = [f"{b}.{self.roles[r]}" for b in self.block_paths() for r in self.roles if r in wanted]
            return {p: self.model.get_submodule(p) for p in paths}
        blocks = self.block_paths() or [""]
        out = {}
        for b in blocks:
            root = self.model.get_submodule(b) if b else self.model
            for n, m in root.named_modules():
                if isinstance(m, nn.Linear) or (_is_weight_layer(m) and not isinstance(m, (nn.Conv1d, nn.Conv2d))):
                    if name == "linear" or name in n.split("."):
                        out[f"{b}.{n}" if b else n] = m
        return out

    def replace(self, path: str, new: nn.Module) -> None:
        parent_path, _, attr = path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, new)


class LlamaAdapter(ModelAdapter):
    """transformers decoder-only models with LLaMA naming (LLaMA 1-3, Mistral, Qwen2, Gemma 1-2)."""

    default_scope = "linear"
    causal_lm = True
    roles = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
             "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
    attention_roles = ("q", "k", "v", "o")
    mlp_roles = ("gate", "up", "down")
    input_groups = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        return (layers is not None and len(layers) > 0 and hasattr(layers[0], "self_attn")
                and hasattr(layers[0].self_attn, "q_proj") and hasattr(layers[0], "mlp"))

    def block_paths(self) -> list[str]:
        return [f"model.layers.{i}" for i in range(len(self.model.model.layers))]


class TimmViTAdapter(ModelAdapter):
    """timm VisionTransformer / DeiT: ``blocks[i].attn.{qkv,proj}``, ``blocks[i].mlp.{fc1,fc2}``."""

    default_scope = "linear"
    kind = "vit"
    roles = {"qkv": "attn.qkv", "proj": "attn.proj", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
    attention_roles = ("qkv", "proj")
    mlp_roles = ("fc1", "fc2")
    input_groups = (("qkv",), ("proj",), ("fc1",), ("fc2",))

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        blocks = getattr(model, "blocks", None)
        return isinstance(blocks, nn.Sequential) and len(blocks) > 0 and hasattr(blocks[0], "attn") \
            and hasattr(blocks[0].attn, "qkv") and hasattr(blocks[0], "mlp")

    def block_paths(self) -> list[str]:
        return [f"blocks.{i}" for i in range(len(self.model.blocks))]


class TimmSwinAdapter(ModelAdapter):
    """timm SwinTransformer: ``layers[s].blocks[j]`` with the ViT block naming; stages stay distinct."""

    default_scope = "linear"
    kind = "swin"
    has_stages = True
    roles = TimmViTAdapter.roles
    attention_roles = TimmViTAdapter.attention_roles
    mlp_roles = TimmViTAdapter.mlp_roles
    input_groups = TimmViTAdapter.input_groups

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        layers = getattr(model, "layers", None)
        return isinstance(layers, nn.Sequential) and len(layers) > 0 and hasattr(layers[0], "blocks") \
            and hasattr(layers[0].blocks[0], "attn") and hasattr(layers[0].blocks[0].attn, "qkv")

    def block_paths(self) -> list[str]:
        return [f"layers.{s}.blocks.{j}" for s, stage in enumerate(self.model.layers) for j in range(len(stage.blocks))]

    def stage_of(self, block_path: str) -> int:
        return int(block_path.split(".")[1])

    def transition(self, index: int) -> nn.Module | None:
        """A stage's patch merging (``layers[s].downsample``, run before its first block)."""
        path = self.block_paths()[index]
        stage = self.model.layers[self.stage_of(path)]
        if index == 0 or not path.endswith(".blocks.0") or isinstance(stage.downsample, nn.Identity):
            return None
        return stage.downsample


class CnnAdapter(ModelAdapter):
    """Convolutional networks: blocks are the residual blocks / conv stages the model lists in ``block_names``."""

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        return hasattr(model, "block_names") and any(isinstance(m, nn.Conv2d) for m in model.modules())

    def block_paths(self) -> list[str]:
        return list(self.model.block_names())


def create_adapter(model: nn.Module) -> ModelAdapter:
    """The most specific adapter whose ``matches`` accepts ``model`` (the generic one otherwise)."""
    for cls in ADAPTERS:
        if cls.matches(model):
            return cls(model)
    return ModelAdapter(model)
