"""Assimilation and forecast cycling on xarray: ``assimilate`` and ``cycle``, with the roles they compose.

The roles follow the separation of data, prognostic and assimilation models of NVIDIA's
earth2studio; the assimilation model is FengWu-Adas (arXiv 2312.12462), which cycles every
6 hours on backgrounds from its own forecasts:

- a :class:`Forecaster` maps the last ``history`` states (a Dataset with a ``time`` dim, oldest
  first) to the state ``step`` later; :class:`ModelForecaster` wraps a registered network (e.g.
  the FengWu-style one), and any callable with ``step``/``history`` attributes (an ONNX FengWu
  session wrapper, the nature-run solver itself) plugs in the same way;
- an :class:`Assimilator` maps ``(background, observations)`` to an analysis:
  :class:`AdasAssimilator` (a network plus its normalisation) or
  :class:`zoo.weather.oi.OptimalInterpolation`;
- :func:`assimilate` runs one analysis; :func:`cycle` runs forecast -> assimilate -> forecast
  for as many steps as asked, writing each chunk of analyses to disk as it goes (resumable,
  with a progress bar), so a year of 6-hourly cycles never has to fit in memory.

Every public function takes and returns xarray objects with the caller's coords, attributes
and latitude order; NaN observations are missing values and never reach the analysis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch

from zoo.progress import get_logger, progress
from zoo.weather.grid import Normalisation, StateLayout, check_state
from zoo.weather.io import write_netcdf
from zoo.weather.observations import grid_observations

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = [
    "AdasAssimilator",
    "Assimilator",
    "CycleResult",
    "Forecaster",
    "ModelForecaster",
    "assimilate",
    "cycle",
    "load_assimilator",
    "load_forecaster",
]

log = get_logger("zoo.weather")
SIX_HOURS = np.timedelta64(6, "h")


@runtime_checkable
class Forecaster(Protocol):
    """``forecaster(states) -> next state``; ``states`` has ``history`` times, oldest first; the result one time, ``step`` later."""

    step: np.timedelta64
    history: int

    def __call__(self, states: xr.Dataset) -> xr.Dataset: ...


@runtime_checkable
class Assimilator(Protocol):
    """``assimilator(background, observations) -> analysis`` with the background's vars, dims, coords and attrs."""

    def __call__(self, background: xr.Dataset, observations: Any) -> xr.Dataset: ...


def _restore_order(out: xr.Dataset, original: xr.Dataset) -> xr.Dataset:
    lat = original["latitude"].values
    if lat.size > 1 and lat[0] > lat[-1]:
        out = out.sortby("latitude", ascending=False)
    return out


def _device_of(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@dataclass
class AdasAssimilator:
    """An Adas network with its state layout and normalisation, applied to xarray states."""

    model: torch.nn.Module
    layout: StateLayout
    normalisation: Normalisation
    batch_size: int = 4
    autocast: torch.dtype | None = None

    def analyse_tensor(
        self, background: torch.Tensor, observation: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Data-unit ``(T, C, H, W)`` background, observations (any value where mask is 0) and 0/1 mask -> analysis."""
        device = _device_of(self.model)
        mask = mask.to(device=device, dtype=torch.float32)
        bg = self.normalisation.normalise(background.to(device=device, dtype=torch.float32))
        obs = self.normalisation.normalise(observation.to(device=device, dtype=torch.float32))
        obs = torch.where(mask > 0, obs, torch.zeros_like(obs))  # NaN or anything unobserved never enters
        self.model.eval()
        outs = []
        with torch.no_grad():
            for i in range(0, bg.shape[0], self.batch_size):
                sl = slice(i, i + self.batch_size)
                with torch.autocast(device.type, dtype=self.autocast, enabled=self.autocast is not None):
                    out = self.model(bg[sl], obs[sl], mask[sl])
                outs.append(out.float())
        return self.normalisation.denormalise(torch.cat(outs)).cpu()

    def __call__(self, background: xr.Dataset, observations: Any) -> xr.Dataset:
        original = background
        background = check_state(background, self.layout, "background")
        gridded = grid_observations(observations, background, self.layout)
        for var, c in gridded.counts.items():
            log.debug("observations %s: %s", var, c)
        bg = self.layout.to_tensor(background)
        obs, mask = gridded.tensors(self.layout)
        if obs.shape[0] != bg.shape[0]:
            if obs.shape[0] == 1:
                obs, mask = obs.expand_as(bg), mask.expand_as(bg)
            else:
                raise ValueError(f"observations: {obs.shape[0]} times for a background of {bg.shape[0]}")
        out = self.layout.from_tensor(self.analyse_tensor(bg, obs, mask), background)
        return _restore_order(out, original)


@dataclass
class ModelForecaster:
    """A network ``f((B, history, C, H, W)) -> (B, C, H, W)`` on normalised states, as a :class:`Forecaster`."""

    model: torch.nn.Module
    layout: StateLayout
    normalisation: Normalisation
    step: np.timedelta64 = field(default_factory=lambda: SIX_HOURS)
    history: int = 2

    def forecast_tensor(self, states: torch.Tensor) -> torch.Tensor:
        """Data-unit ``(history, C, H, W)`` -> next state ``(C, H, W)``."""
        device = _device_of(self.model)
        x = self.normalisation.normalise(states.to(device=device, dtype=torch.float32))
        self.model.eval()
        with torch.no_grad():
            y = self.model(x.unsqueeze(0))[0]
        return self.normalisation.denormalise(y.unsqueeze(0))[0].cpu()

    def __call__(self, states: xr.Dataset) -> xr.Dataset:
        original = states
        states = check_state(states, self.layout, "states")
        if "time" not in states.dims or states.sizes["time"] < self.history:
            raise ValueError(
                f"states: expected a 'time' dim with at least {self.history} states, got {dict(states.sizes)}"
            )
        states = states.isel(time=slice(-self.history, None))
        nxt = self.forecast_tensor(self.layout.to_tensor(states))
        template = states.isel(time=[-1])
        template = template.assign_coords(time=template["time"].values + self.step)
        return _restore_order(self.layout.from_tensor(nxt[None], template), original)


# ------------------------------------------------------------------ loading shipped / trained models


def _sidecar(checkpoint: str | Path) -> dict[str, Any]:
    path = Path(checkpoint).with_suffix(".json")
    if not path.is_file():
        raise ValueError(
            f"checkpoint: {path.name} (layout and normalisation) must sit next to {Path(checkpoint).name}"
        )
    return json.loads(path.read_text())


def _model_and_meta(
    name_or_checkpoint: str | Path, train_hint: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and its metadata (layout, normalisation) from a checkpoint with its ``.json`` or a shipped ``arch.tag``."""
    import zoo

    path = Path(str(name_or_checkpoint))
    if path.suffix == ".safetensors" or path.is_file():
        from zoo.weather import create_model

        meta = _sidecar(path)
        return create_model(meta["arch"], checkpoint=path, **meta.get("config", {})), meta
    from zoo.registry import get_entry

    entry, tag = get_entry(str(name_or_checkpoint))
    tag = tag or entry.default_tag
    if tag is None:
        raise ValueError(
            f"model: {entry.name} has no shipped weights yet; train one{train_hint} and pass its checkpoint path"
        )
    return zoo.create(f"{entry.name}.{tag}", pretrained=True), entry.tags[tag].extra


def load_assimilator(name_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> AdasAssimilator:
    """An :class:`AdasAssimilator` from a trained checkpoint (``.safetensors`` + ``.json``) or a shipped ``arch.tag``."""
    model, meta = _model_and_meta(name_or_checkpoint, " (`zoo train weather adas ...`)")
    return AdasAssimilator(
        model.to(device),
        StateLayout.from_dict(meta["layout"]),
        Normalisation.from_dict(meta["normalisation"]),
    )


def load_forecaster(name_or_checkpoint: str | Path, device: str | torch.device = "cpu") -> ModelForecaster:
    """A :class:`ModelForecaster` from a trained checkpoint (``.safetensors`` + ``.json``) or a shipped ``arch.tag``."""
    model, meta = _model_and_meta(name_or_checkpoint, "")
    return ModelForecaster(
        model.to(device),
        StateLayout.from_dict(meta["layout"]),
        Normalisation.from_dict(meta["normalisation"]),
        history=int(meta.get("history", 2)),
    )


DEFAULT_ASSIMILATOR = "adas_osse_64x128"


def assimilate(
    background: xr.Dataset,
    observations: Any,
    model: str | Path | Assimilator | None = None,
    device: str | torch.device = "cpu",
) -> xr.Dataset:
    """Analysis from a gridded ``background`` and ``observations`` (gridded with NaN, or points with dim ``obs``).

    ``model``: an :class:`Assimilator` (an :class:`AdasAssimilator`, ``OptimalInterpolation``,
    any callable), a checkpoint path, or a registered ``arch[.tag]`` with shipped weights
    (default: the shipped OSSE Adas). Returns the background's variables, dims, coords and
    attributes. Raises ``ValueError`` for a missing variable, a wrong grid or levels, NaN in
    the background, or unusable observations.
    """
    if model is None:
        model = DEFAULT_ASSIMILATOR
    if isinstance(model, (str, Path)):
        model = load_assimilator(model, device)
    if not callable(model):
        raise ValueError(
            f"model: expected an assimilator, a checkpoint path or a model name, got {type(model).__name__}"
        )
    return model(background, observations)


# ------------------------------------------------------------------ cycling


@dataclass
class CycleResult:
    """Where a cycle wrote its analyses (and backgrounds), chunk by chunk."""

    directory: Path | None
    paths: list[Path]
    in_memory: xr.Dataset | None = None
    log: list[dict[str, Any]] = field(default_factory=list)

    def open(self) -> xr.Dataset:
        """All analyses as one Dataset (dask-backed when dask is installed, else loaded)."""
        import xarray as xr

        if self.in_memory is not None:
            return self.in_memory
        try:
            import dask  # noqa: F401

            return xr.open_mfdataset(self.paths, combine="nested", concat_dim="time")
        except ImportError:
            return xr.concat([xr.load_dataset(p) for p in self.paths], dim="time")


def _observations_at(observations: Any, time: np.datetime64) -> Any:
    if observations is None:
        return None
    if callable(observations) and not hasattr(observations, "data_vars"):
        return observations(time)
    if isinstance(observations, dict):
        return observations.get(np.datetime64(time, "ns"), observations.get(time))
    if "time" in observations.dims:
        times = observations["time"].values
        hit = np.nonzero(times == np.datetime64(time, "ns"))[0]
        if not hit.size:
            return None
        return observations.isel(time=hit)
    if "time" in observations.coords and "obs" in observations.dims:
        keep = observations["time"].values == np.datetime64(time, "ns")
        return observations.isel(obs=np.nonzero(keep)[0]) if keep.any() else None
    raise ValueError(
        "observations: expected a callable time -> observations, a dict by time, or a Dataset with times"
    )


def cycle(
    initial: xr.Dataset,
    observations: Any,
    forecaster: Forecaster | Callable,
    assimilator: Assimilator | Callable | None,
    steps: int,
    out: str | Path | None = None,
    chunk: int = 40,
    keep_backgrounds: bool = True,
    show_progress: bool = True,
) -> CycleResult:
    """Forecast -> assimilate -> forecast for ``steps`` cycles.

    Parameters
    ----------
    initial: the first ``forecaster.history`` states (dim ``time``), oldest first.
    observations: ``time -> observations`` callable, a dict by time, a Dataset with ``time``
        (gridded) or per-obs ``time`` (points); a time without observations keeps the background.
    forecaster: a :class:`Forecaster` (``step``, ``history``; default 6 h and 1 for bare callables).
    assimilator: an :class:`Assimilator`; ``None`` runs a free forecast.
    out: folder for ``analysis_<first>.nc`` chunks (and ``background_<first>.nc``); reruns
        resume after the last complete chunk. ``None`` keeps everything in memory.
    chunk: cycles per file.

    Raises ``FloatingPointError`` with the time of the first non-finite analysis.
    """
    import xarray as xr

    history = int(getattr(forecaster, "history", 1))
    step = np.timedelta64(getattr(forecaster, "step", SIX_HOURS), "ns")
    if "time" not in initial.dims or initial.sizes["time"] < history:
        raise ValueError(f"initial: expected a 'time' dim with {history} states, got {dict(initial.sizes)}")
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    window = initial.isel(time=slice(-history, None)).load()
    directory = Path(out) if out is not None else None
    done = 0
    paths: list[Path] = []
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        existing = sorted(directory.glob("analysis_*.nc"))
        if existing:
            prior = xr.concat([xr.load_dataset(p) for p in existing], dim="time")
            done = prior.sizes["time"]
            paths = existing
            if done >= history:
                window = prior.isel(time=slice(-history, None))
            else:
                window = xr.concat([window, prior], dim="time").isel(time=slice(-history, None))
            log.info("cycle: resuming after %d cycles found in %s", done, directory)
    analyses: list[xr.Dataset] = []
    backgrounds: list[xr.Dataset] = []
    memory: list[xr.Dataset] = []
    records: list[dict[str, Any]] = []
    bar = progress(
        range(done, steps),
        desc="cycle",
        total=steps - done,
        unit="cycle",
        disable=None if show_progress else True,
    )
    for i in bar:
        background = forecaster(window)
        if "time" not in background.dims:
            background = background.expand_dims(time=[window["time"].values[-1] + step])
        time = background["time"].values[-1]
        obs = _observations_at(observations, time)
        if assimilator is not None and obs is not None:
            analysis = assimilator(background, obs)
        else:
            analysis = background
        if not all(np.isfinite(analysis[v].values).all() for v in analysis.data_vars):
            raise FloatingPointError(
                f"cycle: non-finite analysis at {np.datetime_as_string(time, unit='h')} (cycle {i + 1})"
            )
        records.append(
            {"cycle": i + 1, "time": str(time), "assimilated": obs is not None and assimilator is not None}
        )
        window = xr.concat([window, analysis], dim="time").isel(time=slice(-history, None))
        analyses.append(analysis)
        if keep_backgrounds:
            backgrounds.append(background)
        if directory is not None and (len(analyses) == chunk or i + 1 == steps):
            first = i + 1 - len(analyses)
            path = directory / f"analysis_{first:06d}.nc"
            write_netcdf(xr.concat(analyses, dim="time"), path)
            if backgrounds:
                write_netcdf(xr.concat(backgrounds, dim="time"), directory / f"background_{first:06d}.nc")
            paths.append(path)
            analyses, backgrounds = [], []
        elif directory is None:
            memory.append(analysis)
            analyses = []
    if directory is not None:
        (directory / "cycle_log.json").write_text(json.dumps(records, indent=1))
        return CycleResult(directory, paths, None, records)
    return CycleResult(None, [], xr.concat(memory, dim="time") if memory else None, records)
