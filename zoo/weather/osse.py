"""The offline OSSE: shallow-water nature-run years, observations drawn from them, and a quick sample.

An observing-system simulation experiment after FengWu-Adas's simulated-observation setting
(arXiv 2312.12462): the truth is a nature run (:mod:`zoo.weather.nature_run`), observations
are random grid points at 10%, 1% or 0.1% (or real station locations) with Gaussian errors,
and backgrounds come from a forecaster. Years 2001-2003 train, 2004 is held out.

``sample(obs_fraction=0.1, seed=0)`` returns ``{"truth", "background", "observations"}`` for one
held-out time: a quick way to try ``zoo.weather.assimilate``. Its nature run is generated on
first use into ``$ZOO_CACHE/weather`` (a few days after the nature run's spin-up; three to four
minutes on a CPU at 64x128); the background comes from a trained forecaster when one is given or
shipped for the grid, else from persistence (the truth 6 hours earlier), and says which in its
attributes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from zoo import datasets
from zoo.weather.grid import StateLayout
from zoo.weather.nature_run import (
    OSSE_LAYOUT_VARIABLES,
    SPINUP_DAYS,
    default_config,
    generate_nature_run,
    nature_run_path,
)
from zoo.weather.shallow_water import wb2_latitudes, wb2_longitudes

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = [
    "OBSERVATION_ERROR_STD",
    "TEST_YEAR",
    "TRAIN_YEARS",
    "cache_dir",
    "load_years",
    "osse_layout",
    "sample",
]

TRAIN_YEARS = (2001, 2002, 2003)
TEST_YEAR = 2004
# observation errors of the OSSE (data units): about 40 m of height and 2 m/s of wind, 0.3x the
# nature run's RMS 6-hourly change at 64 x 128 for every variable (~1.3e3 m^2/s^2, ~7 m/s), as
# radiosonde errors are against real 500 hPa weather
OBSERVATION_ERROR_STD = {"geopotential": 400.0, "u_component_of_wind": 2.0, "v_component_of_wind": 2.0}


def cache_dir() -> Path:
    """``$ZOO_CACHE/weather`` (default ``~/.cache/attnzoo/weather``), created on demand."""
    return datasets.cache_dir("weather")


def osse_layout(nlat: int = 64, nlon: int = 128) -> StateLayout:
    return StateLayout(
        surface=(),
        upper=OSSE_LAYOUT_VARIABLES,
        levels=(500,),
        latitude=tuple(float(v) for v in wb2_latitudes(nlat)),
        longitude=tuple(float(v) for v in wb2_longitudes(nlon)),
        grid_shape=(nlat, nlon),
    )


def load_years(directory: str | Path, years: Sequence[int], nlat: int = 64, nlon: int = 128) -> xr.Dataset:
    import xarray as xr

    paths = [nature_run_path(directory, y, nlat, nlon) for y in years]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"nature run: missing {missing} in {directory}; generate it (`zoo train weather nature`)"
        )
    return xr.concat([xr.load_dataset(p) for p in paths], dim="time")


def sample(
    obs_fraction: float = 0.1,
    seed: int = 0,
    time_index: int = 8,
    grid: tuple[int, int] = (64, 128),
    forecaster: Any = None,
    directory: str | Path | None = None,
    days: float = 4.0,
    spinup_days: float | None = None,
) -> dict[str, Any]:
    """One held-out OSSE case: ``{"truth", "background", "observations"}`` (and ``"layout"``).

    ``forecaster``: a callable forecaster, a shipped ``arch.tag`` / checkpoint, or "persistence";
    by default the shipped OSSE forecaster of this grid when there is one, else persistence. ``spinup_days``
    defaults to the nature run's (the flow the shipped models were trained on).
    """
    from zoo.weather.api import load_forecaster
    from zoo.weather.observations import random_grid_observations

    nlat, nlon = grid
    if spinup_days is None:
        spinup_days = SPINUP_DAYS
    if forecaster is None:
        forecaster = shipped_forecaster(nlat, nlon) or "persistence"
    if directory is None:
        # the folder name carries the model settings, so a cache from other settings is never reused
        settings = json.dumps(asdict(default_config(nlat, nlon)))
        tag = hashlib.sha256(f"{settings} {days} {spinup_days}".encode()).hexdigest()[:8]
        directory = cache_dir() / f"sample_{nlat}x{nlon}_{tag}"
    directory = Path(directory)
    if not 2 <= time_index < int(days * 4):
        raise ValueError(f"time_index: expected 2 <= time_index < {int(days * 4)}, got {time_index}")
    (path,) = generate_nature_run(
        directory,
        years=(TEST_YEAR,),
        nlat=nlat,
        nlon=nlon,
        days=days,
        spinup_days=spinup_days,
        seed=TEST_YEAR,
    )
    import xarray as xr

    run = xr.load_dataset(path)
    layout = osse_layout(nlat, nlon)
    truth = run.isel(time=[time_index])
    if forecaster != "persistence":
        model = forecaster if callable(forecaster) else load_forecaster(forecaster)
        background = model(run.isel(time=slice(time_index - model.history, time_index)))
        background.attrs["background_source"] = "forecaster"
    else:
        background = run.isel(time=[time_index - 1]).assign_coords(time=truth["time"].values)
        background.attrs["background_source"] = "persistence (truth 6 h earlier)"
    observations = random_grid_observations(
        truth, layout, obs_fraction, seed=seed, error_std=OBSERVATION_ERROR_STD
    )
    return {"truth": truth, "background": background, "observations": observations.values, "layout": layout}


def shipped_forecaster(nlat: int, nlon: int) -> str | None:
    """The registered ``arch.tag`` of the shipped OSSE forecaster for this grid, or None."""
    from zoo.registry import get_entry

    try:
        entry, _ = get_entry(f"fengwu_lite_osse_{nlat}x{nlon}")
    except ValueError:
        return None
    return f"{entry.name}.{entry.default_tag}" if entry.default_tag else None


def climatology_of(truth: xr.Dataset, window_days: int = 15) -> xr.Dataset:
    """Day-of-year/hour climatology of nature-run years (smoothed), for ACC."""
    from zoo.weather.metrics import climatology

    return climatology(truth, window_days=window_days)


def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def as_array(ds: xr.Dataset, layout: StateLayout) -> np.ndarray:
    return layout.to_tensor(ds).numpy()
