"""Regional compilation: ``torch.compile`` each repeated block of a backbone, not the whole graph.

Deep backbones (FaViT-B2 has 26 blocks) take minutes to compile as one graph. Blocks of one
class share their compiled code when their shapes agree (parameters are graph inputs), so
compiling block by block costs one compilation per distinct block shape, while the fusion
inside each block (norms, activations, residuals, the attention's reshapes) is the same.
Stems, downsampling layers and heads stay eager.
"""

from __future__ import annotations

from typing import Any

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
    for block in blocks:
        block.compile(**compile_kwargs)
    return model
