"""WeatherBench2 metrics on xarray: area-weighted RMSE, bias and anomaly correlation (ACC).

Definitions as in WeatherBench 2 (Rasp et al., arXiv 2308.15560):

- area weights: the cell area of each latitude band, ``sin(upper) - sin(lower)`` with bounds
  halfway between points and at the poles, normalised to mean 1 (latitude ascending);
- spatial mean: weighted mean over ``latitude`` and ``longitude``;
- ``rmse``: square root of the time-mean of the spatial-mean squared error (WB2's RMSE,
  the square root taken after averaging MSE over ``time``); ``per_time=True`` gives WB2's
  ``RMSESqrtBeforeTimeAvg`` per time instead;
- ``bias``: time-mean of the spatial-mean error ``forecast - truth``;
- ``acc``: per time, spatial mean of ``f' o'`` over the square root of the product of the
  spatial means of ``f'^2`` and ``o'^2``, anomalies against a climatology selected by day of
  year and hour; then averaged over time.

Other dims (``level``, ``lead_time``, ...) are kept, so results come per variable, level and
lead time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["acc", "bias", "climatology", "latitude_weights", "mse", "rmse", "spatial_mean"]


def latitude_weights(latitude: xr.DataArray) -> xr.DataArray:
    """WeatherBench2 cell-area weights of an ascending latitude coordinate, mean 1."""
    lat = np.deg2rad(np.asarray(latitude.values, dtype=float))
    bounds = np.concatenate([[-np.pi / 2], (lat[:-1] + lat[1:]) / 2, [np.pi / 2]])
    if not np.all(np.diff(bounds) > 0):
        raise ValueError(
            f"latitude: expected ascending values within [-90, 90], got {latitude.values[:4]}..."
        )
    area = np.sin(bounds[1:]) - np.sin(bounds[:-1])
    return latitude.copy(data=area / area.mean())


def _ascending(ds):
    lat = ds["latitude"].values
    return ds.sortby("latitude") if lat.size > 1 and lat[0] > lat[-1] else ds


def spatial_mean(ds: xr.Dataset | xr.DataArray, skipna: bool = False):
    """Area-weighted mean over latitude and longitude."""
    ds = _ascending(ds)
    return ds.weighted(latitude_weights(ds["latitude"])).mean(["latitude", "longitude"], skipna=skipna)


def _align(forecast, truth):
    import xarray as xr

    forecast, truth = _ascending(forecast), _ascending(truth)
    if isinstance(forecast, xr.Dataset) and isinstance(truth, xr.Dataset):
        missing = [v for v in forecast.data_vars if v not in truth.data_vars]
        if missing:
            raise ValueError(f"truth: expected the forecast's variables, missing {missing}")
        truth = truth[list(forecast.data_vars)]
    return xr.align(forecast, truth, join="exact")


def mse(forecast, truth, time_dim: str = "time"):
    """Spatial-mean squared error per time (and any other dim)."""
    forecast, truth = _align(forecast, truth)
    return spatial_mean((forecast - truth) ** 2)


def rmse(forecast, truth, time_dim: str = "time", per_time: bool = False):
    """WeatherBench2 RMSE: ``sqrt(mean_time(spatial_mean((f - o)^2)))`` (``per_time``: sqrt before the time mean, no mean)."""
    err = mse(forecast, truth)
    if per_time or time_dim not in err.dims:
        return np.sqrt(err)
    return np.sqrt(err.mean(time_dim))


def bias(forecast, truth, time_dim: str = "time"):
    """Time-mean of the spatial-mean error ``forecast - truth``."""
    forecast, truth = _align(forecast, truth)
    out = spatial_mean(forecast - truth)
    return out.mean(time_dim) if time_dim in out.dims else out


def _climatology_at(clim, times):
    sel = {"dayofyear": times.dt.dayofyear}
    if "hour" in clim.dims:
        sel["hour"] = times.dt.hour
    return clim.sel(sel)


def acc(forecast, truth, climatology, time_dim: str = "time", per_time: bool = False):
    """WeatherBench2 anomaly correlation against ``climatology`` (dims ``dayofyear`` [+ ``hour``])."""
    forecast, truth = _align(forecast, truth)
    climatology = _ascending(climatology)
    if "level" in forecast.dims and "level" in climatology.dims:
        climatology = climatology.sel(level=forecast["level"])
    if time_dim in forecast.dims:
        clim = _climatology_at(climatology, forecast[time_dim]).drop_vars(
            ["dayofyear", "hour"], errors="ignore"
        )
    else:
        clim = climatology
    fa = forecast - clim
    oa = truth - clim
    score = spatial_mean(fa * oa) / np.sqrt(spatial_mean(fa**2) * spatial_mean(oa**2))
    if per_time or time_dim not in score.dims:
        return score
    return score.mean(time_dim)


def climatology(ds: xr.Dataset, window_days: int = 1, time_dim: str = "time") -> xr.Dataset:
    """Mean by day of year and hour (dims ``dayofyear`` 1..366, ``hour``), smoothed over ``window_days`` (circular).

    Days absent from the record take the nearest present day (circularly).
    """
    import xarray as xr

    doy = ds[time_dim].dt.dayofyear.values
    hour = ds[time_dim].dt.hour.values
    hours = np.unique(hour)
    key = xr.DataArray((doy - 1) * len(hours) + np.searchsorted(hours, hour), dims=time_dim, name="slot")
    means = ds.groupby(key).mean(time_dim)
    present = np.asarray(means["slot"].values)
    days = np.arange(1, 367)
    per_hour = []
    for h in range(len(hours)):
        slots = present[present % len(hours) == h]
        have_days = slots // len(hours) + 1
        gap = np.abs(days[:, None] - have_days[None, :])
        nearest = slots[np.minimum(gap, 366 - gap).argmin(1)]
        index = np.searchsorted(present, nearest)
        per_hour.append(means.isel(slot=index).drop_vars("slot").rename(slot="dayofyear"))
    clim = xr.concat(per_hour, dim="hour").assign_coords(dayofyear=days, hour=hours)
    clim = clim.transpose("dayofyear", "hour", ...)
    if window_days > 1:
        half = window_days // 2
        padded = clim.pad(dayofyear=half, mode="wrap")
        clim = (
            padded.rolling(dayofyear=window_days, center=True).mean().isel(dayofyear=slice(half, half + 366))
        )
        clim = clim.assign_coords(dayofyear=days)
    return clim
