"""A real-data check: ERA5 ensemble members from cfgrib's source distribution.

cfgrib's sdist ships ``tests/sample-data/era5-levels-members.nc``: ERA5 ensemble analyses
(Hersbach et al. 2020, "The ERA5 global reanalysis"), 10 members, geopotential and
temperature at 500 and 850 hPa on a 3-degree 61 x 120 grid (latitude descending, poles
included), 4 times. One member serves as the background; synthetic observations are drawn
from another member (random grid points plus Gaussian errors); an analysis should move the
background towards that member. :func:`fetch_era5_sample` gets the file once through pip
(``pip download --no-deps --no-binary :all: cfgrib``) into ``$ZOO_CACHE/weather``.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from zoo.weather.osse import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["era5_members", "era5_real_data_check", "fetch_era5_sample"]

SAMPLE_NAME = "era5-levels-members.nc"


def fetch_era5_sample(directory: str | Path | None = None) -> Path:
    """Path of the ERA5 sample, fetched from cfgrib's source distribution on first use."""
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / SAMPLE_NAME
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            tmp,
            "cfgrib",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("cfgrib-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise FileNotFoundError(
                f"ERA5 sample: `{' '.join(cmd[2:])}` failed: {done.stderr.strip()[-300:]}"
            )
        with tarfile.open(archives[0]) as tar:
            member = next(
                (m for m in tar.getmembers() if m.name.endswith(f"tests/sample-data/{SAMPLE_NAME}")), None
            )
            if member is None:
                raise FileNotFoundError(
                    f"ERA5 sample: {archives[0].name} has no tests/sample-data/{SAMPLE_NAME}"
                )
            with tar.extractfile(member) as src:
                tmp_target = target.with_suffix(".part")
                tmp_target.write_bytes(src.read())
                tmp_target.replace(target)
    return target


def era5_members(path: str | Path | None = None) -> xr.Dataset:
    """The sample with WeatherBench2 names: ``geopotential``, ``temperature``; dims ``member, time, level, latitude, longitude``."""
    import xarray as xr

    ds = xr.load_dataset(path or fetch_era5_sample())
    ds = ds.rename({"z": "geopotential", "t": "temperature", "isobaricInhPa": "level", "number": "member"})
    ds = ds.drop_vars([v for v in ("valid_time", "step") if v in ds.variables])
    return ds.assign_coords(level=ds["level"].values.astype(np.int64))


def era5_real_data_check(
    fraction: float = 0.25,
    background_member: int = 0,
    truth_member: int = 1,
    time_index: int = 0,
    length_scale_km: float = 250.0,
    seed: int = 0,
    assimilator: Any = None,
    path: str | Path | None = None,
) -> dict[str, Any]:
    """Assimilate observations of one ERA5 member into another; area-weighted RMSE before and after.

    The default assimilator is OI with background errors from the members' differences at the
    other times (so the check does not see its own answer) and observation errors of 10% of
    them; pass ``assimilator`` to try another (e.g. an Adas trained for this layout).
    """
    from zoo.weather import metrics
    from zoo.weather.grid import StateLayout
    from zoo.weather.observations import random_grid_observations
    from zoo.weather.oi import OptimalInterpolation

    ds = era5_members(path)
    background = ds.isel(member=background_member, time=[time_index]).drop_vars("member")
    truth = ds.isel(member=truth_member, time=[time_index]).drop_vars("member")
    layout = StateLayout.of(background)
    if assimilator is None:
        others = [t for t in range(ds.sizes["time"]) if t != time_index]
        spread = (ds.isel(time=others) - ds.isel(time=others).mean("member")).std(
            ["member", "time", "latitude", "longitude"]
        )
        sigma_b = {
            f"{v}/{int(lev)}": float(spread[v].sel(level=lev)) * np.sqrt(2)
            for v in layout.upper
            for lev in layout.levels
        }
        sigma_o = {k: 0.1 * s for k, s in sigma_b.items()}
        assimilator = OptimalInterpolation(layout, sigma_b, sigma_o, length_scale_km)
    obs = random_grid_observations(truth, layout, fraction, seed=seed, error_std=None)
    analysis = assimilator(background, obs.values)
    before = metrics.rmse(background, truth)
    after = metrics.rmse(analysis, truth)
    out = {"fraction": fraction, "observed_values": obs.used, "rmse": {}}
    for v in layout.variables:
        for lev in layout.levels:
            b = float(before[v].sel(level=lev))
            a = float(after[v].sel(level=lev))
            out["rmse"][f"{v}/{lev}"] = {"background": b, "analysis": a, "ratio": a / b}
    out["analysis"] = analysis
    return out
