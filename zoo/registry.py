"""The model registry: every model of every family, by name.

Names follow timm: ``arch`` or ``arch.tag``. An ``arch`` is a builder plus its default
config; a ``tag`` names shipped weights (a file under ``zoo/weights`` with its sha256, the
dataset it was trained on, the metrics our own eval command measured, and the config it
needs, e.g. ``num_classes=10``).

Families register their models when their package is imported (``zoo.vision``,
``zoo.text``, ...). The registry imports the families lazily, on the first lookup.
"""

from __future__ import annotations

import difflib
import fnmatch
import hashlib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = [
    "FAMILIES",
    "ModelEntry",
    "PretrainedTag",
    "create",
    "get_entry",
    "list_models",
    "model_info",
    "register_model",
    "register_pretrained",
    "weights_dir",
]

# Family name -> package that registers its models on import. Order is the order of `zoo list`.
FAMILIES: dict[str, str] = {
    "vision": "zoo.vision",
    "text": "zoo.text",
    "llm": "zoo.llm",
    "weather": "zoo.weather",
}

_ENTRIES: dict[str, ModelEntry] = {}
_FAMILIES_LOADED = False


@dataclass
class PretrainedTag:
    """Shipped weights of one architecture."""

    tag: str
    file: str  # file name under zoo/weights (or an absolute path)
    sha256: str
    dataset: str
    metrics: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # config the weights need (num_classes, ...)
    command: str = ""  # the command that trained them
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. tokenizer file, normalisation stats

    def path(self) -> Path:
        p = Path(self.file)
        return p if p.is_absolute() else weights_dir() / p

    def verified_path(self, name: str) -> Path:
        """The weights file, checked to exist and to match its sha256; errors start with ``name``."""
        path = self.path()
        if not path.is_file():
            raise ValueError(f"{name}: weights file {path} is missing from the installation")
        got = sha256_of(path)
        if got != self.sha256:
            raise ValueError(f"{name}: sha256 of {path.name} is {got}, expected {self.sha256}")
        return path


@dataclass
class ModelEntry:
    """One architecture: how to build it, its default config and its pretrained tags."""

    name: str
    family: str
    builder: Callable[..., torch.nn.Module]
    config: dict[str, Any]
    paper: tuple[str, str] = ("", "")  # (title, arXiv id)
    checkpoint_filter_fn: Callable[[dict, torch.nn.Module], dict] | None = None
    eval_command: str = ""
    description: str = ""
    tags: dict[str, PretrainedTag] = field(default_factory=dict)

    @property
    def default_tag(self) -> str | None:
        return next(iter(self.tags), None)


def weights_dir() -> Path:
    """Folder of the shipped weights (``zoo/weights``)."""
    return Path(__file__).resolve().parent / "weights"


def register_model(
    name: str,
    *,
    family: str,
    config: dict[str, Any],
    paper: tuple[str, str] = ("", ""),
    checkpoint_filter_fn: Callable[[dict, torch.nn.Module], dict] | None = None,
    eval_command: str = "",
    description: str = "",
) -> Callable[[Callable[..., torch.nn.Module]], Callable[..., torch.nn.Module]]:
    """Decorator registering ``builder(**config) -> nn.Module`` under ``name``.

    ``config`` lists every keyword the builder accepts with its default; ``zoo.create``
    refuses overrides that are not in it.
    """
    if "." in name:
        raise ValueError(f"register_model: name must not contain '.', got {name!r}")

    def wrap(builder: Callable[..., torch.nn.Module]) -> Callable[..., torch.nn.Module]:
        if name in _ENTRIES and _ENTRIES[name].builder is not builder:
            raise ValueError(
                f"register_model: {name!r} is already registered by family {_ENTRIES[name].family}"
            )
        _ENTRIES[name] = ModelEntry(
            name=name,
            family=family,
            builder=builder,
            config=dict(config),
            paper=paper,
            checkpoint_filter_fn=checkpoint_filter_fn,
            eval_command=eval_command,
            description=description,
        )
        return builder

    return wrap


def register_pretrained(arch: str, tag: PretrainedTag) -> None:
    """Attach shipped weights to a registered architecture."""
    if arch not in _ENTRIES:
        raise ValueError(f"register_pretrained: unknown architecture {arch!r}")
    unknown = set(tag.config) - set(_ENTRIES[arch].config)
    if unknown:
        raise ValueError(f"register_pretrained: {arch}.{tag.tag} config has unknown keys {sorted(unknown)}")
    _ENTRIES[arch].tags[tag.tag] = tag


def _load_families() -> None:
    global _FAMILIES_LOADED
    if _FAMILIES_LOADED:
        return
    _FAMILIES_LOADED = True
    for module in FAMILIES.values():
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            # a family that does not exist (yet) is simply absent; anything else it needs must be installed
            if err.name != module:
                raise


def _all_names() -> list[str]:
    names = []
    for entry in _ENTRIES.values():
        names.append(entry.name)
        names.extend(f"{entry.name}.{t}" for t in entry.tags)
    return names


def _split_name(name: str) -> tuple[str, str | None]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name: expected a non-empty string like 'favit_b0', got {name!r}")
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def get_entry(name: str) -> tuple[ModelEntry, str | None]:
    """Look ``arch`` or ``arch.tag`` up; an unknown name raises ``ValueError`` with the closest names."""
    _load_families()
    arch, tag = _split_name(name)
    entry = _ENTRIES.get(arch)
    if entry is None or (tag is not None and tag not in entry.tags):
        close = difflib.get_close_matches(name, _all_names(), n=5, cutoff=0.4)
        if entry is not None:
            tags = ", ".join(entry.tags) or "none"
            raise ValueError(f"model {name!r}: {arch} has no pretrained tag {tag!r} (tags: {tags})")
        hint = f"; closest: {', '.join(close)}" if close else "; see `zoo list`"
        raise ValueError(f"unknown model {name!r}{hint}")
    return entry, tag


def list_models(pattern: str = "*", family: str | None = None, pretrained: bool = False) -> list[str]:
    """Registered names matching a shell-style ``pattern``.

    With ``pretrained=True`` the list holds ``arch.tag`` for every shipped weight.
    """
    _load_families()
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family: expected one of {sorted(FAMILIES)}, got {family!r}")
    out = []
    for entry in _ENTRIES.values():
        if family is not None and entry.family != family:
            continue
        names = [f"{entry.name}.{t}" for t in entry.tags] if pretrained else [entry.name]
        out.extend(n for n in names if fnmatch.fnmatch(n, pattern))
    return sorted(out)


def _resolve_config(entry: ModelEntry, tag: str | None, overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(entry.config))
    if unknown:
        raise ValueError(
            f"{entry.name}: unknown config override(s) {unknown}; valid keys: {', '.join(sorted(entry.config))}"
        )
    cfg = dict(entry.config)
    if tag is not None:
        cfg.update(entry.tags[tag].config)
    cfg.update(overrides)
    return cfg


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def create(
    name: str,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **overrides: Any,
) -> torch.nn.Module:
    """Build a registered model.

    Parameters
    ----------
    name:
        ``arch`` or ``arch.tag``. A tag applies the config its weights need; with
        ``pretrained=True`` the weights are loaded too (the default tag when none is named).
    pretrained:
        Load the shipped weights, checked against their sha256.
    checkpoint:
        A local checkpoint (``.safetensors``, ``.pt``, ``.pth``, ``.bin``) in our layout or the
        official upstream layout (mapped by the family's ``checkpoint_filter_fn``); strict.
    **overrides:
        Config values; each must be a key of the architecture's config.

    Raises
    ------
    ValueError
        Unknown name (with the closest names), unknown override, missing weights, or a
        checkpoint that does not match the model.
    """
    from zoo import checkpoints

    entry, tag = get_entry(name)
    if pretrained and tag is None:
        tag = entry.default_tag
        if tag is None:
            raise ValueError(f"{entry.name}: no pretrained weights are shipped (see `zoo list --pretrained`)")
    if pretrained and checkpoint is not None:
        raise ValueError("create: give either pretrained=True or checkpoint=PATH, not both")
    cfg = _resolve_config(entry, tag, overrides)
    model = entry.builder(**cfg)
    model.zoo_name = f"{entry.name}.{tag}" if tag else entry.name
    model.zoo_config = cfg

    if pretrained:
        path = entry.tags[tag].verified_path(f"{entry.name}.{tag}")
        checkpoints.load_into(model, checkpoints.load(path), strict=True)
    elif checkpoint is not None:
        state = checkpoints.load(checkpoint)
        checkpoints.load_into(model, state, filter_fn=entry.checkpoint_filter_fn, strict=True)
    return model


def _count_params(entry: ModelEntry, cfg: dict[str, Any]) -> int | None:
    try:
        with torch.device("meta"):
            model = entry.builder(**cfg)
    except Exception:  # builders that cannot run on meta tensors are counted on the CPU
        try:
            model = entry.builder(**cfg)
        except Exception:
            return None
    return sum(p.numel() for p in model.parameters())


def model_info(name: str) -> dict[str, Any]:
    """Family, paper, default config, parameter count, pretrained tags and eval entry point."""
    entry, tag = get_entry(name)
    cfg = _resolve_config(entry, tag, {})
    return {
        "name": name,
        "arch": entry.name,
        "family": entry.family,
        "paper": {"title": entry.paper[0], "arxiv": entry.paper[1]},
        "description": entry.description,
        "config": cfg,
        "params": _count_params(entry, cfg),
        "pretrained": {
            t: {
                "dataset": p.dataset,
                "metrics": dict(p.metrics),
                "file": p.file,
                "sha256": p.sha256,
                "command": p.command,
            }
            for t, p in entry.tags.items()
        },
        "eval": entry.eval_command,
    }


def entries(names: Iterable[str] | None = None) -> list[ModelEntry]:
    """Registered entries (all, or the named architectures)."""
    _load_families()
    if names is None:
        return list(_ENTRIES.values())
    return [get_entry(n)[0] for n in names]
