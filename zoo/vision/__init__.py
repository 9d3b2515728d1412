"""Vision family: FaViT backbones (factorization self-attention) as zoo and timm models.

Paper: "Factorization Vision Transformer: Modeling Long Range Dependency with Local Window
Cost", arXiv 2312.08614. The models live in ``zoo.vision.favit`` (timm's model-file layout);
``zoo eval image`` / ``python -m zoo.vision.validate`` evaluate any zoo or timm model like
timm's validate.py; ``zoo train image`` trains with timm's factories.

Importing this package is light: it registers ``favit_b0`` .. ``favit_b3`` (and their shipped
weights) in the zoo registry with builders that import the model file on first use, and
arranges for the timm registration (``timm.create_model("favit_b2")``) to happen as soon as
timm itself is imported, so ``import zoo`` does not pay for importing timm.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import sys
import warnings
from typing import Any, Callable

import torch

from zoo.registry import PretrainedTag, register_model, register_pretrained, weights_dir

__all__ = ["ARCHS", "DEFAULT_CONFIG", "PAPER", "register_with_timm"]

PAPER = (
    "Factorization Vision Transformer: Modeling Long Range Dependency with Local Window Cost",
    "2312.08614",
)
ARCHS = ("favit_b0", "favit_b1", "favit_b2", "favit_b3")
DESCRIPTIONS = {
    "favit_b0": "FaViT-B0: dims 32-64-128-256, depths 2-2-6-2, 3.43M params (paper ImageNet top-1 71.5)",
    "favit_b1": "FaViT-B1: dims 64-128-256-512, depths 2-2-6-2, 12.96M params (paper ImageNet top-1 79.4)",
    "favit_b2": "FaViT-B2: dims 64-128-256-512, depths 2-3-18-3, 24.92M params (paper ImageNet top-1 82.3)",
    "favit_b3": "FaViT-B3: dims 96-192-384-768, depths 2-3-14-3, 48.75M params (paper ImageNet top-1 83.4)",
}
# every keyword the zoo builders accept, with its default
DEFAULT_CONFIG: dict[str, Any] = dict(
    num_classes=1000,
    in_chans=3,
    global_pool="avg",
    drop_rate=0.0,
    proj_drop_rate=0.0,
    attn_drop_rate=0.0,
    drop_path_rate=0.0,
)


def _builder(arch: str) -> Callable[..., torch.nn.Module]:
    def build(**config: Any) -> torch.nn.Module:
        from zoo.vision import favit

        return getattr(favit, arch)(pretrained=False, **config)

    build.__name__ = arch
    build.__qualname__ = arch
    return build


def _checkpoint_filter(state_dict: dict, model: torch.nn.Module) -> dict:
    from zoo.vision.favit import checkpoint_filter_fn

    return checkpoint_filter_fn(state_dict, model)


for _arch in ARCHS:
    register_model(
        _arch,
        family="vision",
        config=DEFAULT_CONFIG,
        paper=PAPER,
        checkpoint_filter_fn=_checkpoint_filter,
        eval_command="zoo eval image",
        description=DESCRIPTIONS[_arch],
    )(_builder(_arch))


def shipped_weights() -> list[dict[str, Any]]:
    """Shipped FaViT weights: one ``zoo/weights/<arch>.<tag>.json`` card beside each safetensors file.

    A card holds ``arch``, ``tag``, ``file``, ``sha256``, ``dataset``, ``metrics`` (measured by
    ``zoo eval image``), ``config`` (builder keywords, e.g. ``num_classes``), ``command`` (how
    they were trained) and ``data_config`` (the evaluation preprocessing).
    """
    cards = []
    for path in sorted(weights_dir().glob("favit_*.json")):
        card = json.loads(path.read_text())
        if (weights_dir() / card["file"]).is_file():
            cards.append(card)
    return cards


def _register_shipped() -> None:
    for card in shipped_weights():
        register_pretrained(
            card["arch"],
            PretrainedTag(
                tag=card["tag"],
                file=card["file"],
                sha256=card["sha256"],
                dataset=card["dataset"],
                metrics=dict(card.get("metrics", {})),
                config=dict(card.get("config", {})),
                command=card.get("command", ""),
                extra=dict(data_config=card.get("data_config", {})),
            ),
        )


_register_shipped()


def register_with_timm() -> None:
    """Register favit_b0..b3 (and shipped tags) with timm; imports timm."""
    importlib.import_module("zoo.vision.favit")


class _RegisterAfterTimmImport(importlib.abc.MetaPathFinder):
    """Registers the models with timm right after ``import timm`` finishes (the first time)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "timm":
            return None
        _remove_timm_hook()
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            exec_timm(module)
            try:
                register_with_timm()
            except Exception as err:  # never break `import timm` because of us
                warnings.warn(f"zoo.vision: could not register FaViT models with timm ({err})", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def _remove_timm_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterTimmImport)]


def _install_timm_hook() -> None:
    if "timm" in sys.modules:
        register_with_timm()
    elif not any(isinstance(f, _RegisterAfterTimmImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimmImport())


_install_timm_hook()
