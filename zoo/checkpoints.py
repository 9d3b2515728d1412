"""Safe loading and saving of weights.

- ``.safetensors`` is what we ship and save.
- ``.pt``, ``.pth`` and ``.bin`` are read with ``torch.load(weights_only=True)`` only, with
  the few harmless extra types that upstream training checkpoints carry
  (``argparse.Namespace``). A pickle that asks for anything else is refused before any of
  it runs.
- Wrappers are unwrapped (``model``, ``state_dict``, ``model_ema``, ``state_dict_ema``) and
  ``module.`` / ``_orig_mod.`` prefixes stripped.
- ``load_into`` applies a family's ``checkpoint_filter_fn`` (official key names -> ours) and
  loads strictly, with a readable report of missing, unexpected and mis-shaped keys.
"""

from __future__ import annotations

import argparse
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

__all__ = ["CheckpointError", "LoadReport", "load", "load_into", "save", "unwrap_state_dict"]

SAFE_GLOBALS: list[Any] = [argparse.Namespace]
WRAPPER_KEYS = ("state_dict", "model", "module")
EMA_KEYS = ("state_dict_ema", "model_ema")
PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the model."""


def _read_torch_file(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()
        detail = next(
            (ln for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else ""
        )
        raise CheckpointError(
            f"checkpoint {path}: refused to unpickle it because it asks for code, not only weights "
            f"({detail.strip()}). Convert it to .safetensors from a trusted environment."
        ) from None
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path}: not a readable PyTorch file ({err})") from None


def unwrap_state_dict(obj: Any, use_ema: bool = False, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside a training checkpoint and strip wrapper prefixes."""
    if isinstance(obj, Mapping):
        keys = EMA_KEYS if use_ema else WRAPPER_KEYS
        for key in keys:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
                obj = inner
                break
        else:
            if use_ema:
                raise CheckpointError(f"{source}: use_ema=True but it holds no {' or '.join(EMA_KEYS)}")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    state: dict[str, torch.Tensor] = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # epochs, optimiser scalars and other metadata next to the weights
        for prefix in PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix) :]
        state[key] = value
    if not state:
        raise CheckpointError(f"{source}: no tensors found (keys: {sorted(map(str, obj))[:10]})")
    return state


def load(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint {path}: not a valid safetensors file ({err})") from None
    elif path.suffix in TORCH_SUFFIXES:
        obj = _read_torch_file(path)
    else:
        raise CheckpointError(
            f"checkpoint {path}: expected a .safetensors, {', '.join(TORCH_SUFFIXES)} file, got {path.suffix!r}"
        )
    return unwrap_state_dict(obj, use_ema=use_ema, source=f"checkpoint {path}")


def save(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write a state dict as ``.safetensors`` (tensors made contiguous, shared storage copied)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"save: expected a path ending in .safetensors, got {path.name!r}")
    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    tensors = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"save: value of {key!r} is {type(value).__name__}, expected a tensor")
        ptr = value.untyped_storage().data_ptr() if value.device.type != "meta" else id(value)
        value = value.detach().cpu()
        tensors[key] = value.clone().contiguous() if ptr in seen else value.contiguous()
        seen.add(ptr)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in (metadata or {}).items()})
    return path


@dataclass
class LoadReport:
    """What a load found: keys missing from the checkpoint, keys the model lacks, shape mismatches."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (key, checkpoint, model)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        if self.ok:
            return "all keys matched"
        lines = []

        def block(title: str, items: list[str]) -> None:
            if items:
                shown = items[:20]
                more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
                lines.append(f"  {title} ({len(items)}):\n    " + "\n    ".join(shown) + more)

        block("missing from the checkpoint", self.missing)
        block("unexpected in the checkpoint", self.unexpected)
        block(
            "shape mismatch (checkpoint vs model)",
            [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched],
        )
        return "\n".join(lines)


def load_into(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor] | str | os.PathLike,
    filter_fn: Callable[[dict, torch.nn.Module], dict] | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load weights into ``model``.

    ``filter_fn(state_dict, model)`` maps another layout (official upstream key names) onto
    the model's. With ``strict=True`` any missing, unexpected or mis-shaped key raises
    ``CheckpointError`` with the full report; otherwise matching keys load and the report is
    returned.
    """
    if not isinstance(state_dict, Mapping):
        state_dict = load(state_dict)
    state = dict(state_dict)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    report = LoadReport(
        missing=sorted(k for k in own if k not in state),
        unexpected=sorted(k for k in state if k not in own),
        mismatched=sorted(
            (k, tuple(state[k].shape), tuple(own[k].shape))
            for k in state
            if k in own and tuple(state[k].shape) != tuple(own[k].shape)
        ),
    )
    if strict and not report.ok:
        raise CheckpointError(f"checkpoint does not match {type(model).__name__}:\n{report}")
    bad = {k for k, _, _ in report.mismatched}
    model.load_state_dict({k: v for k, v in state.items() if k in own and k not in bad}, strict=False)
    return report
