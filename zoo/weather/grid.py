"""Gridded atmospheric states as ``xarray.Dataset``s, their checks, tensors and normalisation.

The data model follows WeatherBench2 (Rasp et al., arXiv 2308.15560): dims ``time``,
``level`` (hPa), ``latitude``, ``longitude``; variable names such as ``geopotential`` or
``2m_temperature``. A model sees a state as ``(time, C, lat, lon)`` channels ordered as
FengWu / FengWu-Adas order them (arXiv 2304.02948, 2312.12462): the surface variables first,
then each upper-air variable over all its levels. :class:`StateLayout` names that order;
:func:`check_state` gives one clear ``ValueError`` for a missing variable, a wrong grid,
wrong levels or NaN; latitude may come in either order: it is sorted ascending (and said
so), and results are given back in the caller's order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from zoo.progress import get_logger

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = [
    "FENGWU_LEVELS",
    "FENGWU_SURFACE",
    "FENGWU_UPPER",
    "Normalisation",
    "StateLayout",
    "check_state",
    "sort_latitude",
]

log = get_logger("zoo.weather")

# FengWu's 69 channels: u10, v10, t2m, msl + z, q, u, v, t on 13 levels
FENGWU_SURFACE = (
    "10m_u_component_of_wind",
    "10m_v_component_of_wind",
    "2m_temperature",
    "mean_sea_level_pressure",
)
FENGWU_UPPER = (
    "geopotential",
    "specific_humidity",
    "u_component_of_wind",
    "v_component_of_wind",
    "temperature",
)
FENGWU_LEVELS = (50, 100, 150, 200, 250, 300, 400, 500, 600, 700, 850, 925, 1000)
SPATIAL_DIMS = ("latitude", "longitude")


@dataclass(frozen=True)
class StateLayout:
    """Which variables, levels and grid a model works on, and their channel order."""

    surface: tuple[str, ...] = FENGWU_SURFACE
    upper: tuple[str, ...] = FENGWU_UPPER
    levels: tuple[int, ...] = FENGWU_LEVELS
    latitude: tuple[float, ...] | None = None  # ascending; None: any grid of the right shape
    longitude: tuple[float, ...] | None = None
    grid_shape: tuple[int, int] | None = None

    @property
    def variables(self) -> tuple[str, ...]:
        return self.surface + self.upper

    @property
    def channels(self) -> int:
        return len(self.surface) + len(self.upper) * len(self.levels)

    def channel_names(self) -> list[str]:
        return list(self.surface) + [f"{v}/{lev}" for v in self.upper for lev in self.levels]

    def to_dict(self) -> dict[str, Any]:
        return {
            "surface": list(self.surface),
            "upper": list(self.upper),
            "levels": list(self.levels),
            "latitude": None if self.latitude is None else list(self.latitude),
            "longitude": None if self.longitude is None else list(self.longitude),
            "grid_shape": None if self.grid_shape is None else list(self.grid_shape),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StateLayout:
        tup = lambda v, f=float: None if v is None else tuple(f(i) for i in v)
        return cls(
            surface=tuple(d["surface"]),
            upper=tuple(d["upper"]),
            levels=tuple(int(v) for v in d["levels"]),
            latitude=tup(d.get("latitude")),
            longitude=tup(d.get("longitude")),
            grid_shape=tup(d.get("grid_shape"), int),
        )

    @classmethod
    def of(
        cls, ds: xr.Dataset, surface: Sequence[str] | None = None, upper: Sequence[str] | None = None
    ) -> StateLayout:
        """The layout of a dataset: variables with a ``level`` dim are upper-air, the rest surface."""
        names = [v for v in ds.data_vars if set(SPATIAL_DIMS) <= set(ds[v].dims)]
        if upper is None:
            upper = [v for v in names if "level" in ds[v].dims]
        if surface is None:
            surface = [v for v in names if "level" not in ds[v].dims]
        levels = tuple(int(v) for v in ds["level"].values) if upper else ()
        lat = np.sort(np.asarray(ds["latitude"].values, dtype=float))
        return cls(
            surface=tuple(surface),
            upper=tuple(upper),
            levels=levels,
            latitude=tuple(float(v) for v in lat),
            longitude=tuple(float(v) for v in ds["longitude"].values),
            grid_shape=(ds.sizes["latitude"], ds.sizes["longitude"]),
        )

    # ---------------------------------------------------------------- tensors

    def to_tensor(self, ds: xr.Dataset, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(time, C, lat, lon)`` (or ``(1, C, ...)`` without a time dim) in channel order; latitude as stored."""
        arrays = []
        lead = ("time",) if "time" in ds.dims else ()
        for v in self.surface:
            arrays.append(np.asarray(ds[v].transpose(*lead, *SPATIAL_DIMS).values)[..., None, :, :])
        for v in self.upper:
            da = ds[v].sel(level=list(self.levels)).transpose(*lead, "level", *SPATIAL_DIMS)
            arrays.append(np.asarray(da.values))
        out = np.concatenate(arrays, axis=-3) if arrays else np.zeros((0,))
        if not lead:
            out = out[None]
        return torch.as_tensor(np.ascontiguousarray(out), dtype=dtype)

    def from_tensor(self, x: torch.Tensor | np.ndarray, template: xr.Dataset) -> xr.Dataset:
        """Write ``(time, C, lat, lon)`` values back into a copy of ``template`` (its coords, attrs, dtypes)."""
        values = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        out = template.copy(deep=True)
        has_time = "time" in template.dims
        if not has_time:
            values = values[0]
        c = 0
        for v in self.surface:
            da = template[v]
            data = values[..., c, :, :]
            out[v] = da.copy(data=_reorder(data, da, ("time",) if has_time else (), ()).astype(da.dtype))
            c += 1
        for v in self.upper:
            da = template[v]
            n = len(self.levels)
            block = values[..., c : c + n, :, :]
            c += n
            sub = da.sel(level=list(self.levels))
            if sub.sizes["level"] != da.sizes["level"]:
                raise ValueError(f"{v}: the template has levels beyond the layout's {self.levels}")
            out[v] = da.copy(
                data=_reorder(block, da, ("time",) if has_time else (), ("level",)).astype(da.dtype)
            )
        return out


def _reorder(data: np.ndarray, da: xr.DataArray, lead: tuple, mid: tuple) -> np.ndarray:
    """Transpose ``data`` laid out as ``lead + mid + (lat, lon)`` into ``da``'s own dim order."""
    have = list(lead + mid + SPATIAL_DIMS)
    order = [have.index(d) for d in da.dims]
    return np.transpose(data, order)


def sort_latitude(ds: xr.Dataset, name: str = "state") -> tuple[xr.Dataset, bool]:
    """Latitude ascending (WeatherBench2 order); says so when it had to flip it."""
    lat = np.asarray(ds["latitude"].values)
    if lat.size > 1 and np.all(np.diff(lat) > 0):
        return ds, False
    if lat.size > 1 and not np.all(np.diff(lat) < 0):
        raise ValueError(f"{name}: latitude must be strictly monotonic, got {lat[:5]}...")
    log.info("%s: latitude is descending; sorted ascending (results keep your order)", name)
    return ds.sortby("latitude"), lat.size > 1


def check_state(
    ds: Any,
    layout: StateLayout,
    name: str = "background",
    allow_nan: bool = False,
) -> xr.Dataset:
    """Check a gridded state against ``layout``; return it with latitude ascending.

    Raises ``ValueError`` naming ``name`` for: not a Dataset, a missing variable, missing
    dims, wrong levels, a wrong grid, NaN values (unless ``allow_nan``).
    """
    import xarray as xr

    if not isinstance(ds, xr.Dataset):
        raise ValueError(f"{name}: expected an xarray.Dataset, got {type(ds).__name__}")
    missing = [v for v in layout.variables if v not in ds.data_vars]
    if missing:
        raise ValueError(f"{name}: expected variables {list(layout.variables)}, missing {missing}")
    for dim in SPATIAL_DIMS:
        if dim not in ds.coords:
            raise ValueError(f"{name}: expected a {dim!r} coordinate, got coords {list(ds.coords)}")
    for v in layout.variables:
        need = set(SPATIAL_DIMS) | ({"level"} if v in layout.upper else set())
        allowed = need | {"time"}
        dims = set(ds[v].dims)
        if not need <= dims or not dims <= allowed:
            raise ValueError(
                f"{name}: variable {v!r} expected dims {sorted(need)} (+ optional time), got {ds[v].dims}"
            )
    if layout.upper:
        have = [int(v) for v in np.asarray(ds["level"].values)]
        absent = [lev for lev in layout.levels if lev not in have]
        if absent:
            raise ValueError(
                f"{name}: expected levels {list(layout.levels)} hPa, got {have} (missing {absent})"
            )
    ds, _ = sort_latitude(ds, name)
    shape = (ds.sizes["latitude"], ds.sizes["longitude"])
    if layout.grid_shape is not None and shape != tuple(layout.grid_shape):
        raise ValueError(
            f"{name}: expected a {layout.grid_shape[0]}x{layout.grid_shape[1]} grid, got {shape[0]}x{shape[1]}"
        )
    if layout.latitude is not None and not np.allclose(ds["latitude"].values, layout.latitude, atol=1e-3):
        raise ValueError(
            f"{name}: latitude does not match the model's grid ({shape[0]} points from {layout.latitude[0]:.4g})"
        )
    if layout.longitude is not None and not np.allclose(ds["longitude"].values, layout.longitude, atol=1e-3):
        raise ValueError(
            f"{name}: longitude does not match the model's grid ({shape[1]} points from {layout.longitude[0]:.4g})"
        )
    if not allow_nan:
        for v in layout.variables:
            sub = ds[v].sel(level=list(layout.levels)) if v in layout.upper else ds[v]
            bad = int(np.isnan(np.asarray(sub.values, dtype=float)).sum())
            if bad:
                raise ValueError(
                    f"{name}: variable {v!r} has {bad} NaN values; a background must be complete"
                )
    return ds


@dataclass
class Normalisation:
    """Per-channel mean and standard deviation: ``(x - mean) / std`` in, the inverse out."""

    channels: list[str]
    mean: list[float]
    std: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (len(self.channels) == len(self.mean) == len(self.std)):
            raise ValueError("Normalisation: channels, mean and std must have equal lengths")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"Normalisation: std must be positive, got {self.std}")

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std shaped ``(C, 1, 1)``: channels are the third axis from the end, ``(..., C, lat, lon)``."""
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return mean, std

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 3 or x.shape[-3] != len(self.mean):
            raise ValueError(f"normalise: expected (..., {len(self.mean)}, lat, lon), got {tuple(x.shape)}")
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._stats(x)
        return x * std + mean

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Divide by std only (for increments and errors)."""
        return x / self._stats(x)[1]

    @classmethod
    def fit(cls, data: torch.Tensor, channels: Sequence[str]) -> Normalisation:
        """Statistics of ``(N, C, H, W)`` data, channel by channel."""
        flat = data.transpose(0, 1).reshape(data.shape[1], -1).double()
        std = flat.std(1).clamp_min(1e-12)
        return cls(list(channels), flat.mean(1).tolist(), std.tolist())

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "mean": self.mean, "std": self.std, "extra": self.extra}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalisation:
        return cls(list(d["channels"]), list(d["mean"]), list(d["std"]), dict(d.get("extra", {})))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Normalisation:
        return cls.from_dict(json.loads(Path(path).read_text()))
