"""Weather: Adas data assimilation and a FengWu-style forecaster on xarray grids.

- FengWu-Adas (arXiv 2312.12462): :class:`zoo.weather.adas.Adas`, registered as
  ``adas_fengwu69_0p25``, ``adas_fengwu69_1p40625`` and small OSSE configs;
- a FengWu-style forecaster (arXiv 2304.02948): :class:`zoo.weather.forecaster.FengWuLite`;
- ``assimilate``, ``cycle``, observations, OI / 3D-Var, WeatherBench2 metrics, and an OSSE
  on a shallow-water nature run (``zoo.weather.osse``).

Importing this package registers the models and stays light: xarray and the rest are
imported by the functions that need them.
"""

from __future__ import annotations

from typing import Any

from zoo.lazy import lazy_exports
from zoo.registry import register_model

ADAS_PAPER = (
    "Towards an end-to-end artificial intelligence driven global weather forecasting system",
    "2312.12462",
)
FENGWU_PAPER = (
    "FengWu: Pushing the Skillful Global Medium-range Weather Forecast beyond 10 Days Lead",
    "2304.02948",
)


def _adas_filter(state: dict, model: Any) -> dict:
    from zoo.weather.adas import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


def _adas_config(**kw: Any) -> dict[str, Any]:
    cfg = dict(
        grid=(721, 1440),
        levels=13,
        surface_variables=4,
        upper_variables=5,
        dim=192,
        patch_size=(1, 6, 6),
        window_size=(2, 5, 10),
        depth=8,
        num_heads=8,
        drop_path_rate=0.1,
        pos_embed=True,
        grad_checkpointing=False,
        fused_attention=True,
        residual=False,
        innovation=False,
    )
    cfg.update(kw)
    return cfg


def _build_adas(**cfg: Any):
    from zoo.weather.adas import Adas

    return Adas(**cfg)


# shared by the OSSE configs: geopotential, u, v at one level; the model reads innovations and
# predicts the increment, both in units of the background error (see zoo.weather.adas.Adas)
_OSSE_ADAS = dict(
    levels=1,
    surface_variables=0,
    upper_variables=3,
    patch_size=(1, 2, 2),
    num_heads=2,
    drop_path_rate=0.0,
    residual=True,
    innovation=True,
)

_ADAS_VARIANTS = {
    "adas_fengwu69_0p25": (_adas_config(), "FengWu-Adas at 0.25 deg (721x1440), 69 channels, d 192"),
    "adas_fengwu69_1p40625": (
        _adas_config(grid=(128, 256), dim=96, patch_size=(1, 2, 2), window_size=(2, 4, 8)),
        "FengWu-Adas at 1.40625 deg (128x256), 69 channels, d 96",
    ),
    "adas_osse_64x128": (
        _adas_config(grid=(64, 128), dim=32, window_size=(1, 4, 8), depth=4, **_OSSE_ADAS),
        "Adas for the shallow-water OSSE: geopotential, u, v at 500 hPa on 64x128 (predicts the increment)",
    ),
    "adas_osse_tiny": (
        _adas_config(grid=(16, 32), dim=16, window_size=(1, 2, 4), depth=2, **_OSSE_ADAS),
        "a tiny Adas (16x32) for tests and smoke runs (predicts the increment)",
    ),
}

for _name, (_cfg, _desc) in _ADAS_VARIANTS.items():
    register_model(
        _name,
        family="weather",
        config=_cfg,
        paper=ADAS_PAPER,
        checkpoint_filter_fn=_adas_filter,
        eval_command="zoo eval weather",
        description=_desc,
    )(_build_adas)


def _forecaster_config(**kw: Any) -> dict[str, Any]:
    cfg = dict(
        grid=(64, 128),
        group_channels=(1, 1, 1),
        dim=96,
        patch_size=(2, 2),
        window_size=(4, 8),
        encoder_depth=2,
        fusion_depth=4,
        decoder_depth=2,
        num_heads=4,
        history=2,
    )
    cfg.update(kw)
    return cfg


def _build_forecaster(**cfg: Any):
    from zoo.weather.forecaster import FengWuLite

    return FengWuLite(**cfg)


_FORECASTER_VARIANTS = {
    "fengwu_lite_osse_64x128": (
        _forecaster_config(),
        "FengWu-style 6-h forecaster for the shallow-water OSSE: z, u, v at 500 hPa on 64x128",
    ),
    "fengwu_lite_tiny": (
        _forecaster_config(
            grid=(16, 32),
            dim=16,
            window_size=(2, 4),
            encoder_depth=1,
            fusion_depth=2,
            decoder_depth=1,
            num_heads=2,
        ),
        "a tiny FengWu-style forecaster (16x32) for tests",
    ),
}

for _name, (_cfg, _desc) in _FORECASTER_VARIANTS.items():
    register_model(
        _name,
        family="weather",
        config=_cfg,
        paper=FENGWU_PAPER,
        eval_command="zoo eval weather",
        description=_desc,
    )(_build_forecaster)


def create_model(name: str, checkpoint: Any = None, **overrides: Any):
    """Build a weather model from this family's own table (no other family is imported).

    Same configs and checkpoint handling as ``zoo.create`` (official Adas keys mapped, strict).
    """
    from zoo import checkpoints

    variants = {**_ADAS_VARIANTS, **_FORECASTER_VARIANTS}
    if name not in variants:
        raise ValueError(f"model: expected one of {sorted(variants)}, got {name!r}")
    config = dict(variants[name][0])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(f"{name}: unknown config override(s) {unknown}; valid keys: {sorted(config)}")
    config.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    is_adas = name in _ADAS_VARIANTS
    model = (_build_adas if is_adas else _build_forecaster)(**config)
    model.zoo_name, model.zoo_config = name, config
    if checkpoint is not None:
        checkpoints.load_into(
            model, checkpoints.load(checkpoint), filter_fn=_adas_filter if is_adas else None, strict=True
        )
    return model


def _register_shipped(directory: Any = None) -> None:
    """Register ``zoo/weights/<arch>.<tag>.json`` manifests written by ``zoo.weather.shipping``."""
    import json
    from pathlib import Path

    from zoo.registry import PretrainedTag, register_pretrained, weights_dir

    for manifest in sorted(Path(directory or weights_dir()).glob("*.osse.json")):
        meta = json.loads(manifest.read_text())
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("config", {}).items()}
        tag = PretrainedTag(
            tag=meta["tag"],
            file=meta["file"],
            sha256=meta["sha256"],
            dataset=meta["dataset"],
            metrics=meta.get("metrics", {}),
            config=config,
            command=meta.get("command", ""),
            extra=meta.get("extra", {}),
        )
        register_pretrained(meta["arch"], tag)


_register_shipped()

_EXPORTS = {
    "assimilate": "api",
    "cycle": "api",
    "Assimilator": "api",
    "AdasAssimilator": "api",
    "load_assimilator": "api",
    "load_forecaster": "api",
    "Forecaster": "api",
    "ModelForecaster": "api",
    "StateLayout": "grid",
    "Normalisation": "grid",
    "check_state": "grid",
    "grid_observations": "observations",
    "GriddedObservations": "observations",
    "OptimalInterpolation": "oi",
    "rmse": "metrics",
    "bias": "metrics",
    "acc": "metrics",
}
__all__ = sorted(_EXPORTS)
_getattr, __dir__ = lazy_exports(__name__, _EXPORTS)


def __getattr__(name: str) -> Any:
    if name == "osse":
        import importlib

        return importlib.import_module("zoo.weather.osse")
    return _getattr(name)
