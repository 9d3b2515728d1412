"""Observations: gridded masks, point observations at real stations, and gridding that counts.

FengWu-Adas (arXiv 2312.12462) feeds observations as a gridded field plus a 0/1 mask; its
simulation experiments observe a random fraction of grid points of every channel (10%, 1%,
0.1%). Here observations come in two forms:

- gridded: an ``xarray.Dataset`` on the model grid, NaN where nothing was observed;
- points: a Dataset with dim ``obs`` and coords ``latitude``, ``longitude`` (optional
  ``level``, ``time``), one variable per observed quantity, NaN = missing, optional
  ``<var>_error_std``.

:func:`grid_observations` turns either into :class:`GriddedObservations` on the model grid:
each point goes to its nearest grid cell (longitude wraps), several in one cell are
averaged, and every observation is accounted for in ``counts`` (used, NaN, off the model
levels, outside the grid, merged into a shared cell): none is dropped silently. NaN never
reaches the analysis: it is mask 0 and value 0.

:func:`station_locations` reads the 1995-03-18 surface reports of NCAR Graphics' data
(``libncarg-data``, ``950318_sao.cdf``: 2196 report rows a hour, 1443 distinct stations with
valid coordinates), the geometry of a real observing network.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from zoo.progress import get_logger
from zoo.weather.grid import SPATIAL_DIMS, StateLayout, sort_latitude

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = [
    "GriddedObservations",
    "SAO_STATIONS",
    "grid_observations",
    "observe_at_points",
    "random_grid_observations",
    "station_locations",
]

log = get_logger("zoo.weather")
SAO_STATIONS = Path("/usr/share/ncarg/data/cdf/950318_sao.cdf")


@dataclass
class GriddedObservations:
    """Observations on the model grid: ``values`` (NaN where none) and what became of each input observation."""

    values: xr.Dataset
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    error_std: dict[str, float] = field(default_factory=dict)

    def tensors(
        self, layout: StateLayout, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(observation, mask)`` as ``(T, C, lat, lon)``: observation 0 and mask 0 where missing."""
        raw = layout.to_tensor(self.values, dtype=dtype)
        mask = torch.isfinite(raw)
        return torch.where(mask, raw, torch.zeros_like(raw)), mask.to(dtype)

    @property
    def used(self) -> int:
        return sum(c.get("used", 0) for c in self.counts.values())


def _nan_like(template: xr.Dataset, layout: StateLayout) -> xr.Dataset:
    out = template[list(layout.variables)].copy(deep=True)
    for v in layout.variables:
        out[v] = out[v].astype(float) * np.nan
    return out


def grid_observations(observations: Any, template: xr.Dataset, layout: StateLayout) -> GriddedObservations:
    """Observations (gridded or points) -> :class:`GriddedObservations` on ``template``'s grid.

    ``template`` is the background (latitude ascending). Gridded observations must be on the
    same grid; point observations are binned to the nearest cell. Variables of the layout
    that are absent from the observations are simply unobserved.
    """
    import xarray as xr

    if isinstance(observations, GriddedObservations):
        return observations
    if not isinstance(observations, xr.Dataset):
        raise ValueError(f"observations: expected an xarray.Dataset, got {type(observations).__name__}")
    known = [v for v in observations.data_vars if v in layout.variables]
    extra = [v for v in observations.data_vars if v not in layout.variables and not v.endswith("_error_std")]
    if not known:
        raise ValueError(
            f"observations: expected some of the variables {list(layout.variables)}, got {list(observations.data_vars)}"
        )
    if extra:
        log.warning("observations: variables %s are not assimilated by this model; ignored", extra)
    errors = {}
    for v in known:
        if f"{v}_error_std" in observations:
            errors[v] = float(np.nanmean(np.asarray(observations[f"{v}_error_std"].values, dtype=float)))
    if "obs" in observations.dims:
        return _grid_points(observations, template, layout, known, errors)
    return _grid_fields(observations, template, layout, known, errors)


def _grid_fields(
    obs: xr.Dataset, template: xr.Dataset, layout: StateLayout, known: list, errors: dict
) -> GriddedObservations:
    for dim in SPATIAL_DIMS:
        if dim not in obs.dims:
            raise ValueError(
                f"observations: expected dim 'obs' (points) or {SPATIAL_DIMS} (gridded), got {tuple(obs.dims)}"
            )
    obs, _ = sort_latitude(obs, "observations")
    for dim in SPATIAL_DIMS:
        a, b = np.asarray(obs[dim].values, float), np.asarray(template[dim].values, float)
        if a.shape != b.shape or not np.allclose(a, b, atol=1e-3):
            raise ValueError(
                f"observations: gridded {dim} ({a.size} points) does not match the background's ({b.size} points)"
            )
    out = _nan_like(template, layout)
    counts = {}
    for v in known:
        da = obs[v]
        if v in layout.upper:
            if "level" not in da.dims:
                raise ValueError(f"observations: upper-air variable {v!r} needs a 'level' dim")
            levels = [lev for lev in np.asarray(da["level"].values).tolist() if lev in layout.levels]
            off = da.sel(level=[lev for lev in da["level"].values.tolist() if lev not in layout.levels])
            da = da.sel(level=levels)
        else:
            off = None
        target = out[v]
        if v in layout.upper:
            da = da.reindex(level=target["level"].values)
        if "time" in target.dims and "time" not in da.dims:
            da = da.expand_dims(time=target["time"].values)
        if set(da.dims) != set(target.dims):
            raise ValueError(f"observations: gridded {v!r} has dims {da.dims}, expected {target.dims}")
        out[v] = (
            da.transpose(*target.dims)
            .astype(float)
            .assign_coords({d: target[d] for d in target.dims if d in target.coords})
        )
        finite = int(np.isfinite(np.asarray(da.values, float)).sum())
        counts[v] = {
            "given": int(da.size) + (int(off.size) if off is not None else 0),
            "used": finite,
            "nan": int(da.size) - finite,
            "off_levels": int(np.isfinite(np.asarray(off.values, float)).sum()) if off is not None else 0,
            "outside_grid": 0,
            "merged": 0,
        }
    return GriddedObservations(out, counts, errors)


def _grid_points(
    obs: xr.Dataset, template: xr.Dataset, layout: StateLayout, known: list, errors: dict
) -> GriddedObservations:
    lat_grid = np.asarray(template["latitude"].values, float)
    lon_grid = np.asarray(template["longitude"].values, float)
    lat = np.asarray(obs["latitude"].values, float)
    lon = np.asarray(obs["longitude"].values, float)
    n = obs.sizes["obs"]
    # nearest latitude row; points beyond the outermost rows by more than half a spacing are outside
    spacing = np.abs(np.diff(lat_grid)).mean() if lat_grid.size > 1 else 180.0
    row = np.abs(lat[:, None] - lat_grid[None, :]).argmin(1)
    outside = (
        ~np.isfinite(lat)
        | ~np.isfinite(lon)
        | (np.abs(lat - lat_grid[row]) > spacing / 2 + 1e-6)
        | (np.abs(lat) > 90)
    )
    dlon = (lon[:, None] - lon_grid[None, :] + 180.0) % 360.0 - 180.0
    col = np.abs(dlon).argmin(1)
    level = np.asarray(obs["level"].values, float) if "level" in obs.coords else None
    if level is not None and level.ndim == 0:
        level = np.full(n, float(level))
    has_time = "time" in template.dims
    time_index = np.zeros(n, dtype=int)
    if has_time:
        if "time" in obs.coords and obs["time"].size == n and obs["time"].dims == ("obs",):
            times = np.asarray(template["time"].values)
            match = np.asarray(obs["time"].values)[:, None] == times[None, :]
            time_index = np.where(match.any(1), match.argmax(1), -1)
        elif template.sizes["time"] != 1:
            raise ValueError(
                "observations: point observations need a per-obs 'time' coordinate when the background has several times"
            )
    out = _nan_like(template, layout)
    counts = {}
    for v in known:
        vals = np.asarray(obs[v].values, float)
        if vals.shape != (n,):
            raise ValueError(f"observations: point variable {v!r} must have dim ('obs',), got {obs[v].dims}")
        finite = np.isfinite(vals)
        usable = finite & ~outside & (time_index >= 0)
        lev_index = np.zeros(n, dtype=int)
        off_levels = np.zeros(n, dtype=bool)
        if v in layout.upper:
            if level is None:
                raise ValueError(
                    f"observations: upper-air variable {v!r} needs a 'level' coordinate on 'obs'"
                )
            model_levels = np.asarray(layout.levels, float)
            hit = level[:, None] == model_levels[None, :]
            off_levels = finite & ~hit.any(1)
            lev_index = hit.argmax(1)
            usable &= ~off_levels
        grid_shape = (
            max(template.sizes.get("time", 1), 1),
            len(layout.levels) if v in layout.upper else 1,
            len(lat_grid),
            len(lon_grid),
        )
        total = np.zeros(grid_shape)
        number = np.zeros(grid_shape)
        idx = (time_index[usable], lev_index[usable], row[usable], col[usable])
        np.add.at(total, idx, vals[usable])
        np.add.at(number, idx, 1)
        mean = np.where(number > 0, total / np.maximum(number, 1), np.nan)
        data = mean if v in layout.upper else mean[:, 0]
        if not has_time:
            data = data[0]
        dims = (("time",) if has_time else ()) + (("level",) if v in layout.upper else ()) + SPATIAL_DIMS
        full = out[v].transpose(*dims).copy(data=data)
        if v in layout.upper:
            full = full.assign_coords(level=list(layout.levels))
        out[v] = full.transpose(*out[v].dims)
        counts[v] = {
            "given": int(n),
            "used": int(usable.sum()),
            "nan": int((~finite).sum()),
            "off_levels": int(off_levels.sum()),
            "outside_grid": int((finite & (outside | (time_index < 0))).sum()),
            "merged": int(usable.sum() - (number > 0).sum()),
        }
    return GriddedObservations(out, counts, errors)


def random_grid_observations(
    truth: xr.Dataset,
    layout: StateLayout,
    fraction: float,
    seed: int = 0,
    error_std: dict[str, float] | None = None,
) -> GriddedObservations:
    """Observe each grid value of each channel with probability ``fraction`` (the paper's random masks), plus Gaussian noise."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction: expected 0 < fraction <= 1, got {fraction}")
    rng = np.random.default_rng(seed)
    out = _nan_like(truth, layout)
    counts = {}
    for v in layout.variables:
        da = truth[v]
        if v in layout.upper:
            da = da.sel(level=list(layout.levels))
        values = np.asarray(da.values, float)
        keep = rng.random(values.shape) < fraction
        noise = rng.standard_normal(values.shape) * (error_std or {}).get(v, 0.0)
        out[v] = da.copy(data=np.where(keep, values + noise, np.nan))
        counts[v] = {
            "given": int(keep.sum()),
            "used": int(keep.sum()),
            "nan": 0,
            "off_levels": 0,
            "outside_grid": 0,
            "merged": 0,
        }
    return GriddedObservations(out, counts, dict(error_std or {}))


def station_locations(path: str | Path = SAO_STATIONS) -> tuple[np.ndarray, np.ndarray]:
    """(latitude, longitude) of the distinct stations with valid coordinates in a WXP surface file."""
    import xarray as xr

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stations: {path} is missing (Debian package libncarg-data provides it)")
    with xr.open_dataset(path, decode_times=False) as ds:
        ids = ds["id"].values.ravel()
        lat = ds["lat"].values.ravel().astype(float)
        lon = ds["lon"].values.ravel().astype(float)
    ok = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180) & (ids != b"")
    _, first = np.unique(ids[ok], return_index=True)
    return lat[ok][first], lon[ok][first]


def observe_at_points(
    truth: xr.Dataset,
    latitude: np.ndarray,
    longitude: np.ndarray,
    variables: dict[str, float],
    level: float | None = None,
    seed: int = 0,
) -> xr.Dataset:
    """Point observations of ``truth`` (one time) at the given places: bilinear values plus Gaussian errors.

    ``variables`` maps a variable to its error std; upper-air variables are taken at ``level``.
    """
    import xarray as xr

    rng = np.random.default_rng(seed)
    truth, _ = sort_latitude(truth, "truth")
    if "time" in truth.dims:
        if truth.sizes["time"] != 1:
            raise ValueError("truth: observe_at_points takes one time")
        truth = truth.isel(time=0)
    lon_grid = np.asarray(truth["longitude"].values, float)
    wrapped = truth.pad(longitude=(0, 1), mode="wrap").assign_coords(
        longitude=np.append(lon_grid, lon_grid[0] + 360.0)
    )
    lat = xr.DataArray(np.asarray(latitude, float), dims="obs")
    lon = xr.DataArray(np.mod(np.asarray(longitude, float) - lon_grid[0], 360.0) + lon_grid[0], dims="obs")
    lat_clipped = lat.clip(float(truth["latitude"].min()), float(truth["latitude"].max()))
    data = {}
    for v, err in variables.items():
        da = wrapped[v]
        if "level" in da.dims:
            if level is None:
                raise ValueError(f"level: upper-air variable {v!r} needs a level")
            da = da.sel(level=level)
        vals = da.interp(latitude=lat_clipped, longitude=lon).values
        data[v] = ("obs", vals + rng.standard_normal(vals.shape) * err)
        data[f"{v}_error_std"] = ("obs", np.full(vals.shape, float(err)))
    coords = {
        "latitude": ("obs", np.asarray(latitude, float)),
        "longitude": ("obs", np.asarray(longitude, float)),
    }
    if level is not None:
        coords["level"] = ("obs", np.full(len(lat), float(level)))
    return xr.Dataset(data, coords=coords)
