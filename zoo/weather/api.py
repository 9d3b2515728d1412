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
  with a progress bar), so a year of 6-hourly cycles never has to fit in memory. With a
  :class:`ModelForecaster` and an :class:`AdasAssimilator`, OI or no assimilator it cycles on
  tensors on the model's device and builds Datasets once per chunk (the Python and xarray
  work of a Dataset per cycle costs far more than the small OSSE models); any other pair
  cycles on Datasets, the reference the tensor loop is tested against value for value.

Every public function takes and returns xarray objects with the caller's coords, attributes
and latitude order; NaN observations are missing values and never reach the analysis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from zoo.graphs import GraphedCall
from zoo.progress import get_logger, progress
from zoo.weather.grid import SPATIAL_DIMS, Normalisation, StateLayout, check_state
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
    # on CUDA, replay each batch shape's forward from a CUDA graph (``zoo.graphs.GraphedCall``):
    # for long cycles on one grid, where the model's kernel launches bound a small model
    cuda_graph: bool = False
    _graphed: GraphedCall | None = field(default=None, init=False, repr=False, compare=False)

    def _forward(self, bg: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The network on one normalised batch, under the configured autocast."""
        with torch.autocast(bg.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return self.model(bg, obs, mask)

    def analyse_tensor(
        self, background: torch.Tensor, observation: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Data-unit ``(T, C, H, W)`` background, observations (any value where mask is 0) and 0/1 mask -> analysis."""
        self.model.eval()
        return self._analyse(background, observation, mask, self.normalisation).cpu()

    def _analyse(
        self, background: torch.Tensor, observation: torch.Tensor, mask: torch.Tensor, normalisation: Any
    ) -> torch.Tensor:
        """:meth:`analyse_tensor` left on the model's device (eval mode already set), with ``normalisation``."""
        device = _device_of(self.model)
        mask = mask.to(device=device, dtype=torch.float32)
        bg = normalisation.normalise(background.to(device=device, dtype=torch.float32))
        obs = normalisation.normalise(observation.to(device=device, dtype=torch.float32))
        obs = torch.where(mask > 0, obs, torch.zeros_like(obs))  # NaN or anything unobserved never enters
        forward = self._forward
        if self.cuda_graph and device.type == "cuda":
            if self._graphed is None:
                self._graphed = GraphedCall(self._forward)
            forward = self._graphed
        outs = []
        with torch.no_grad():
            for i in range(0, bg.shape[0], self.batch_size):
                sl = slice(i, i + self.batch_size)
                outs.append(forward(bg[sl], obs[sl], mask[sl]).float())
        return normalisation.denormalise(torch.cat(outs))

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
        self.model.eval()
        return self._forecast(states, self.normalisation).cpu()

    def _forecast(self, states: torch.Tensor, normalisation: Any) -> torch.Tensor:
        """:meth:`forecast_tensor` left on the model's device (eval mode already set), with ``normalisation``."""
        x = normalisation.normalise(states.to(device=_device_of(self.model), dtype=torch.float32))
        with torch.no_grad():
            y = self.model(x.unsqueeze(0))[0]
        return normalisation.denormalise(y.unsqueeze(0))[0]

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


def load_assimilator(
    name_or_checkpoint: str | Path, device: str | torch.device = "cpu", cuda_graph: bool = False
) -> AdasAssimilator:
    """An :class:`AdasAssimilator` from a trained checkpoint (``.safetensors`` + ``.json``) or a shipped ``arch.tag``.

    ``cuda_graph``: on a CUDA device, replay the network from CUDA graphs (see :class:`AdasAssimilator`).
    """
    model, meta = _model_and_meta(name_or_checkpoint, " (`zoo train weather adas ...`)")
    return AdasAssimilator(
        model.to(device),
        StateLayout.from_dict(meta["layout"]),
        Normalisation.from_dict(meta["normalisation"]),
        cuda_graph=cuda_graph,
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


def _write_chunk(directory: Path, first: int, analyses: xr.Dataset, backgrounds: xr.Dataset | None) -> Path:
    path = directory / f"analysis_{first:06d}.nc"
    write_netcdf(analyses, path)
    if backgrounds is not None:
        write_netcdf(backgrounds, directory / f"background_{first:06d}.nc")
    return path


def _non_finite(time: np.datetime64, index: int) -> FloatingPointError:
    return FloatingPointError(
        f"cycle: non-finite analysis at {np.datetime_as_string(time, unit='h')} (cycle {index + 1})"
    )


def _dataset_cycles(
    window: xr.Dataset,
    observations: Any,
    forecaster: Forecaster | Callable,
    assimilator: Assimilator | Callable | None,
    cycles: range,
    steps: int,
    chunk: int,
    keep_backgrounds: bool,
    records: list[dict[str, Any]],
    bar: Any,
) -> Iterator[tuple[int, xr.Dataset, xr.Dataset | None]]:
    """The plain loop on Datasets, for any forecaster and assimilator: ``(first cycle, analyses, backgrounds)`` per chunk."""
    import xarray as xr

    history = int(getattr(forecaster, "history", 1))
    step = np.timedelta64(getattr(forecaster, "step", SIX_HOURS), "ns")
    analyses: list[xr.Dataset] = []
    backgrounds: list[xr.Dataset] = []
    for i in cycles:
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
            raise _non_finite(time, i)
        records.append(
            {"cycle": i + 1, "time": str(time), "assimilated": obs is not None and assimilator is not None}
        )
        window = xr.concat([window, analysis], dim="time").isel(time=slice(-history, None))
        analyses.append(analysis)
        if keep_backgrounds:
            backgrounds.append(background)
        bar.update(1)
        if len(analyses) == chunk or i + 1 == steps:
            yield (
                i + 1 - len(analyses),
                xr.concat(analyses, dim="time"),
                xr.concat(backgrounds, dim="time") if backgrounds else None,
            )
            analyses, backgrounds = [], []


class _DeviceNormalisation:
    """A :class:`Normalisation` with its float32 statistics kept on one device (no host copy per call)."""

    def __init__(self, normalisation: Normalisation, device: torch.device) -> None:
        self.mean = torch.tensor(normalisation.mean, dtype=torch.float32, device=device).view(-1, 1, 1)
        self.std = torch.tensor(normalisation.std, dtype=torch.float32, device=device).view(-1, 1, 1)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def _on_device(normalisation: Any, device: torch.device) -> Any:
    return (
        _DeviceNormalisation(normalisation, device) if type(normalisation) is Normalisation else normalisation
    )


def _unmodified(obj: Any, cls: type, methods: tuple[str, ...]) -> bool:
    """``obj`` is a ``cls`` whose ``methods`` are ``cls``'s own (so its tensor path is what its ``__call__`` does)."""
    return isinstance(obj, cls) and all(getattr(type(obj), m) is getattr(cls, m) for m in methods)


_HOST_TRANSFER_BYTES = 256 * 2**20  # analyses (and observations) held per host transfer


@dataclass
class _TensorCycles:
    """The cycle loop on tensors for a :class:`ModelForecaster` and an :class:`AdasAssimilator`, OI or none.

    The state stays a ``(history, C, H, W)`` tensor on the forecaster's device in the
    Dataset's own dtype (so every value is what the Dataset loop would store); observations
    are gridded to a ``(C, H, W)`` array each, moved to the device a group at a time;
    analyses come back to the host a group at a time and become Datasets once per chunk.
    Checks for NaN backgrounds and non-finite analyses run on those host copies, in cycle
    order, with the Dataset loop's errors.
    """

    forecaster: ModelForecaster
    assimilator: Any
    kind: str  # "adas", "oi" or "none"
    layout: StateLayout
    ascending: xr.Dataset  # the window, latitude ascending
    template: xr.Dataset  # the last state, as given (caller's latitude order)
    flipped: bool
    dtype: torch.dtype

    @classmethod
    def plan(cls, window: xr.Dataset, forecaster: Any, assimilator: Any) -> _TensorCycles | None:
        """The tensor loop when it gives exactly the Dataset loop's results, else ``None``."""
        from zoo.weather.oi import OptimalInterpolation

        if not _unmodified(forecaster, ModelForecaster, ("__call__", "forecast_tensor", "_forecast")):
            return None
        layout = forecaster.layout
        if assimilator is None:
            kind = "none"
        elif _unmodified(assimilator, AdasAssimilator, ("__call__", "analyse_tensor", "_analyse")):
            kind = "adas"
        elif _unmodified(assimilator, OptimalInterpolation, ("__call__", "analyse_tensor")):
            kind = "oi"
        else:
            return None
        if kind != "none" and assimilator.layout != layout:
            return None
        if set(window.data_vars) != set(layout.variables) or not layout.variables:
            return None
        if any("time" in c.dims for name, c in window.coords.items() if name != "time"):
            return None
        if any("time" not in window[v].dims for v in layout.variables):
            return None
        if layout.upper and not np.array_equal(np.asarray(window["level"].values), np.asarray(layout.levels)):
            return None
        dtypes = {window[v].dtype for v in layout.variables}
        if len(dtypes) != 1 or dtypes.pop() not in (np.dtype(np.float32), np.dtype(np.float64)):
            return None
        ascending = check_state(window, layout, "states")  # what the forecaster's first call checks
        return cls(
            forecaster,
            assimilator,
            kind,
            layout,
            ascending,
            window.isel(time=[-1]),
            not np.array_equal(window["latitude"].values, ascending["latitude"].values),
            torch.float32 if window[layout.variables[0]].dtype == np.float32 else torch.float64,
        )

    # ---------------------------------------------------------------- observations

    def _gridded_fast(self, obs: Any) -> np.ndarray | None:
        """``(1, C, H, W)`` float64 (NaN unobserved) for gridded observations on the model grid; ``None``: use the general gridding."""
        import xarray as xr

        layout = self.layout
        if not isinstance(obs, xr.Dataset) or "obs" in obs.dims:
            return None
        known = [v for v in obs.data_vars if v in layout.variables]
        if not known or any(
            v not in layout.variables and not v.endswith("_error_std") for v in obs.data_vars
        ):
            return None
        if "latitude" not in obs.dims or "longitude" not in obs.dims:
            return None
        lat = np.asarray(obs["latitude"].values, float)
        want_lat = np.asarray(self.ascending["latitude"].values, float)
        want_lon = np.asarray(self.ascending["longitude"].values, float)
        lon = np.asarray(obs["longitude"].values, float)
        descending = lat.size > 1 and bool(np.all(np.diff(lat) < 0))
        if lat.size > 1 and not descending and not np.all(np.diff(lat) > 0):
            return None
        if descending:
            lat = lat[::-1]
        if lat.shape != want_lat.shape or lon.shape != want_lon.shape:
            return None
        if not (np.allclose(lat, want_lat, atol=1e-3) and np.allclose(lon, want_lon, atol=1e-3)):
            return None
        out = np.full((1, layout.channels, lat.size, lon.size), np.nan)
        c = 0
        for v in layout.variables:
            upper = v in layout.upper
            width = len(layout.levels) if upper else 1
            if v in known:
                da = obs[v]
                spatial = ("level", *SPATIAL_DIMS) if upper else SPATIAL_DIMS
                if set(da.dims) - {"time"} != set(spatial) or da.sizes.get("time", 1) != 1:
                    return None
                order = [da.dims.index(d) for d in (("time",) if "time" in da.dims else ()) + spatial]
                values = (
                    np.transpose(np.asarray(da.values), order).astype(float).reshape(-1, lat.size, lon.size)
                )
                if descending:
                    values = values[:, ::-1]
                if upper:
                    have = np.asarray(da["level"].values).tolist()
                    if len(set(have)) != len(have):
                        return None
                    for j, lev in enumerate(layout.levels):
                        if lev in have:
                            out[0, c + j] = values[have.index(lev)]
                else:
                    out[0, c] = values[0]
            c += width
        return out

    def _gridded(self, obs: Any, time: np.datetime64) -> np.ndarray:
        """``(T, C, H, W)`` float64, NaN where unobserved, as the assimilators grid ``obs`` for a background at ``time``."""
        fast = self._gridded_fast(obs)
        if fast is not None:
            return fast
        template = self.ascending.isel(time=[-1]).assign_coords(time=[time])
        gridded = grid_observations(obs, template, self.layout)
        return self.layout.to_tensor(gridded.values, dtype=torch.float64).numpy()

    def _observation_group(
        self, observed: list[tuple[Any, np.datetime64]], device: torch.device | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(observation, mask)``, ``(n, C, H, W)`` as the assimilator's ``__call__`` makes them, in one transfer.

        Adas (``device`` given): float32 on its device, one time per background; OI: float64 on the CPU.
        """
        if not observed:
            return None
        arrays = [self._gridded(obs, t) for obs, t in observed]
        if device is not None:
            for a in arrays:
                if a.shape[0] != 1:
                    raise ValueError(f"observations: {a.shape[0]} times for a background of 1")
            raw = torch.from_numpy(np.concatenate(arrays)).to(torch.float32).to(device)
        else:
            raw = torch.from_numpy(np.stack([a[0] for a in arrays]))
        mask = torch.isfinite(raw)
        return torch.where(mask, raw, torch.zeros_like(raw)), mask.to(raw.dtype)

    # ---------------------------------------------------------------- datasets

    def dataset(self, values: np.ndarray, times: list[np.datetime64]) -> xr.Dataset:
        """``(n, C, H, W)`` (latitude ascending) at ``times`` -> a Dataset like the Dataset loop's states."""
        if self.flipped:
            values = values[..., ::-1, :]
        template = self.template.isel(time=np.zeros(len(times), dtype=int)).assign_coords(
            time=np.array(times)
        )
        return self.layout.from_tensor(values, template)

    # ---------------------------------------------------------------- the loop

    def run(
        self,
        observations: Any,
        cycles: range,
        steps: int,
        chunk: int,
        keep_backgrounds: bool,
        records: list[dict[str, Any]],
        bar: Any,
    ) -> Iterator[tuple[int, xr.Dataset, xr.Dataset | None]]:
        forecaster, layout = self.forecaster, self.layout
        device = _device_of(forecaster.model)
        fc_norm = _on_device(forecaster.normalisation, device)
        forecaster.model.eval()
        adas_device = None
        if self.kind == "adas":
            adas_device = _device_of(self.assimilator.model)
            adas_norm = _on_device(self.assimilator.normalisation, adas_device)
            self.assimilator.model.eval()
        if self.kind == "oi":
            lat = self.ascending["latitude"].values
            lon = self.ascending["longitude"].values
        history = forecaster.history
        state = layout.to_tensor(self.ascending.isel(time=slice(-history, None)), dtype=self.dtype).to(device)
        time = self.ascending["time"].values[-1]
        bytes_per_state = layout.channels * state.shape[-2] * state.shape[-1] * 8
        group = max(1, min(chunk, _HOST_TRANSFER_BYTES // bytes_per_state))
        chunk_first = cycles.start
        chunk_analyses: list[np.ndarray] = []
        chunk_backgrounds: list[np.ndarray] = []
        chunk_times: list[np.datetime64] = []
        i = cycles.start
        while i < cycles.stop:
            n = min(group, chunk - (i - chunk_first), cycles.stop - i)
            times = []
            for _ in range(n):
                time = time + forecaster.step
                times.append(time)
            fetched = [_observations_at(observations, t) for t in times]
            use = [obs is not None and self.kind != "none" for obs in fetched]
            gridded = self._observation_group(
                [(obs, t) for obs, t, u in zip(fetched, times, use) if u],
                adas_device if self.kind == "adas" else None,
            )
            analyses, backgrounds, background_nan = [], [], []
            observed = 0
            with torch.no_grad():
                for k in range(n):
                    background = forecaster._forecast(state, fc_norm).to(self.dtype)
                    if use[k]:
                        obs, mask = gridded[0][observed], gridded[1][observed]
                        observed += 1
                        if self.kind == "adas":
                            analysis = self.assimilator._analyse(
                                background[None], obs[None], mask[None], adas_norm
                            )
                            analysis = analysis[0].to(device=device, dtype=self.dtype)
                        else:
                            analysis = self.assimilator.analyse_tensor(
                                background.to(torch.float64), obs, mask, lat, lon
                            )
                            analysis = analysis.to(device=device, dtype=self.dtype)
                        background_nan.append(torch.isnan(background).any())
                    else:
                        analysis = background
                    state = torch.cat([state[1:], analysis[None]])
                    analyses.append(analysis)
                    if keep_backgrounds or use[k]:
                        backgrounds.append(background)
            host = torch.stack(analyses).cpu().numpy()
            nan_flags = torch.stack(background_nan).cpu().tolist() if background_nan else []
            finite = np.isfinite(host.reshape(n, -1)).all(1)
            flagged = iter(nan_flags)
            kept = iter(backgrounds)
            host_backgrounds = []
            for k in range(n):
                bg = next(kept) if (keep_backgrounds or use[k]) else None
                if use[k] and next(flagged):
                    state_k = self.dataset(bg[None].cpu().numpy(), [times[k]])
                    check_state(state_k, layout, "background")  # raises the assimilator's error
                if not finite[k]:
                    raise _non_finite(times[k], i + k)
                records.append({"cycle": i + k + 1, "time": str(times[k]), "assimilated": use[k]})
                if keep_backgrounds:
                    host_backgrounds.append(bg)
            chunk_analyses.append(host)
            if keep_backgrounds:
                chunk_backgrounds.append(torch.stack(host_backgrounds).cpu().numpy())
            chunk_times += times
            i += n
            bar.update(n)
            if i - chunk_first == chunk or i == steps:
                yield (
                    chunk_first,
                    self.dataset(np.concatenate(chunk_analyses), chunk_times),
                    self.dataset(np.concatenate(chunk_backgrounds), chunk_times)
                    if keep_backgrounds
                    else None,
                )
                chunk_first, chunk_analyses, chunk_backgrounds, chunk_times = i, [], [], []


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
    chunk: cycles per file (below 1: one file).

    A :class:`ModelForecaster` with an :class:`AdasAssimilator`, ``OptimalInterpolation`` or
    none, on a state of just the layout's variables, cycles on tensors on the model's device
    (observations are asked for a group of cycles ahead); anything else cycles on Datasets.
    Both give the same analyses.

    Raises ``FloatingPointError`` with the time of the first non-finite analysis.
    """
    import xarray as xr

    history = int(getattr(forecaster, "history", 1))
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
    records: list[dict[str, Any]] = []
    memory: list[xr.Dataset] = []
    bar = progress(
        None, desc="cycle", total=max(steps - done, 0), unit="cycle", disable=None if show_progress else True
    )
    if chunk < 1:
        chunk = max(steps - done, 1)  # one file
    fast = _TensorCycles.plan(window, forecaster, assimilator) if done < steps else None
    if fast is not None:
        chunks = fast.run(observations, range(done, steps), steps, chunk, keep_backgrounds, records, bar)
    else:
        chunks = _dataset_cycles(
            window,
            observations,
            forecaster,
            assimilator,
            range(done, steps),
            steps,
            chunk,
            keep_backgrounds,
            records,
            bar,
        )
    try:
        for first, analyses, backgrounds in chunks:
            if directory is not None:
                paths.append(_write_chunk(directory, first, analyses, backgrounds))
            else:
                memory.append(analyses)
    finally:
        bar.close()
    if directory is not None:
        (directory / "cycle_log.json").write_text(json.dumps(records, indent=1))
        return CycleResult(directory, paths, None, records)
    return CycleResult(None, [], xr.concat(memory, dim="time") if memory else None, records)
