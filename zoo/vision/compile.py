"""Regional compilation: ``torch.compile`` each repeated block of a backbone, not the whole graph.

Deep backbones (FaViT-B2 has 26 blocks) take minutes to compile as one graph. Blocks of one
class share their compiled code when their shapes agree (parameters are graph inputs), so
compiling block by block costs one compilation per distinct block shape, while the fusion
inside each block (norms, activations, residuals, the attention's reshapes) is the same.
Stems, downsampling layers and heads stay eager, and so does stochastic depth (``DropPath``):
its rate differs from block to block and would otherwise cost one compilation per block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["repeated_blocks", "compile_blocks"]


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList))


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The innermost runs of same-class modules held in ``nn.Sequential``/``nn.ModuleList`` containers.

    A container of two or more modules of one class counts when its members are composite
    (not single layers) and hold no such run themselves (else the search goes on inside
    them): stages of blocks yield the blocks.
    """

    def visit(module: nn.Module) -> list[nn.Module]:
        found: list[nn.Module] = []
        for child in module.children():
            inner = visit(child)
            if inner:
                found.extend(inner)
            elif (
                _is_container(child)
                and len(child) >= 2
                and len({type(m) for m in child}) == 1
                and not _is_container(child[0])
                and any(True for _ in child[0].children())  # blocks, not single layers
            ):
                found.extend(child)
        return found

    return visit(model)


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> nn.Module:
    """Compile every repeated block of ``model`` in place (``nn.Module.compile``) and return it.

    ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``fullgraph``...); ``dynamic`` defaults
    to ``False``: blocks of different stages differ in shape and are compiled once each, rather
    than as one graph with symbolic shapes.
    Raises ``ValueError`` when the model has no repeated blocks.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(
            f"model: expected repeated blocks in nn.Sequential/nn.ModuleList containers, found none in "
            f"{type(model).__name__}"
        )
    compile_kwargs.setdefault("dynamic", False)
    # one compiled forward serves every block of a class: a version per stage shape, batch size
    # and train/eval mode, more than dynamo's default of 8 before it falls back to eager
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    for block in blocks:
        for module in block.modules():
            # stochastic depth: each block has its own rate, a constant to the compiler, so the
            # rate stays outside the compiled code (a graph break) rather than one compilation per block
            if isinstance(getattr(module, "drop_prob", None), float):
                module.forward = torch.compiler.disable(module.forward)
        block.compile(**compile_kwargs)
    return model
