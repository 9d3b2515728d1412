"""Small synthetic WeatherBench2-style states for the weather tests."""

import numpy as np
import xarray as xr

from zoo.weather.grid import StateLayout

LAT = np.linspace(-84.375, 84.375, 16)
LON = np.arange(32) * 11.25


def smooth_field(rng, shape, scale=1.0):
    lat = np.deg2rad(LAT)[:, None]
    lon = np.deg2rad(LON)[None, :]
    out = np.zeros(shape)
    for _ in range(4):
        k, m = rng.integers(1, 4), rng.integers(0, 4)
        out += rng.standard_normal() * np.cos(k * lat) * np.cos(m * lon + rng.uniform(0, 6.28))
    return scale * out


def make_state(
    times=1, seed=0, levels=(500, 850), surface=("2m_temperature",), upper=("geopotential", "temperature")
):
    rng = np.random.default_rng(seed)
    time = np.datetime64("2004-01-01T00", "ns") + np.arange(times) * np.timedelta64(6, "h")
    data = {}
    for v in surface:
        data[v] = (
            ("time", "latitude", "longitude"),
            280 + np.stack([smooth_field(rng, (16, 32), 5) for _ in range(times)]),
            {"units": "K"},
        )
    for v in upper:
        base = 5e4 if v == "geopotential" else 250.0
        scale = 500.0 if v == "geopotential" else 5.0
        arr = np.stack(
            [np.stack([base + smooth_field(rng, (16, 32), scale) for _ in levels]) for _ in range(times)]
        )
        data[v] = (("time", "level", "latitude", "longitude"), arr, {"units": "x"})
    return xr.Dataset(
        data,
        coords={"time": time, "level": np.array(levels), "latitude": LAT, "longitude": LON},
        attrs={"title": "synthetic"},
    )


def layout_of(ds):
    return StateLayout.of(ds)
