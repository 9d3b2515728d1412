"""Data model checks and WeatherBench2 metrics against hand-computed values."""

import numpy as np
import pytest
import torch
import xarray as xr

from zoo.weather import metrics
from zoo.weather.grid import Normalisation, StateLayout, check_state

from .helpers import LAT, LON, make_state


def test_tensor_round_trip_and_channel_order():
    ds = make_state(times=2)
    layout = StateLayout.of(ds)
    assert layout.channel_names() == [
        "2m_temperature",
        "geopotential/500",
        "geopotential/850",
        "temperature/500",
        "temperature/850",
    ]
    x = layout.to_tensor(ds, dtype=torch.float64)
    assert x.shape == (2, 5, 16, 32)
    np.testing.assert_array_equal(x[1, 2].numpy(), ds.geopotential.sel(level=850).isel(time=1).values)
    back = layout.from_tensor(x, ds)
    xr.testing.assert_identical(back, ds)


def test_dims_in_another_order_come_back_in_that_order():
    ds = make_state()
    ds["geopotential"] = ds.geopotential.transpose("time", "latitude", "longitude", "level")
    layout = StateLayout.of(ds)
    back = layout.from_tensor(layout.to_tensor(ds) + 1, ds)
    assert back.geopotential.dims == ("time", "latitude", "longitude", "level")
    np.testing.assert_allclose(back.geopotential.values, ds.geopotential.values + 1, rtol=1e-6)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda ds: ds.drop_vars("temperature"), r"missing \['temperature'\]"),
        (lambda ds: ds.sel(level=[500]), r"missing \[850\]"),
        (lambda ds: ds.isel(latitude=slice(0, 8)), "expected a 16x32 grid, got 8x32"),
        (lambda ds: ds.assign(geopotential=ds.geopotential.where(ds.latitude < 80)), "has 64 NaN values"),
        (lambda ds: ds.to_array(), "expected an xarray.Dataset"),
    ],
)
def test_check_state_names_the_problem(mutate, message):
    ds = make_state()
    layout = StateLayout.of(ds)
    with pytest.raises(ValueError, match=message):
        check_state(mutate(ds), layout, "background")


def test_descending_latitude_is_sorted():
    ds = make_state()
    flipped = ds.isel(latitude=slice(None, None, -1))
    out = check_state(flipped, StateLayout.of(ds))
    np.testing.assert_array_equal(out.latitude.values, LAT)


def test_normalisation_round_trip():
    x = torch.randn(10, 3, 4, 5) * torch.tensor([1.0, 10.0, 100.0]).view(1, 3, 1, 1) + 7
    norm = Normalisation.fit(x, ["a", "b", "c"])
    z = norm.normalise(x)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.denormalise(z), x, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="expected"):
        norm.normalise(torch.zeros(2, 4, 4, 5))


def test_latitude_weights_are_cell_areas():
    lat = xr.DataArray(np.array([-45.0, 45.0]), dims="latitude")
    # bounds -90, 0, 90: equal areas
    np.testing.assert_allclose(metrics.latitude_weights(lat).values, [1.0, 1.0])
    lat = xr.DataArray(np.array([-60.0, 0.0, 60.0]), dims="latitude")
    # bounds -90, -30, 30, 90: areas 1 - 0.5, 0.5 + 0.5, 0.5 -> mean 2/3
    np.testing.assert_allclose(metrics.latitude_weights(lat).values, [0.75, 1.5, 0.75])
    with pytest.raises(ValueError, match="ascending"):
        metrics.latitude_weights(lat[::-1])


def _tiny(values, times):
    lat = np.array([-60.0, 0.0, 60.0])
    return xr.Dataset(
        {"t": (("time", "latitude", "longitude"), np.asarray(values, float))},
        coords={"time": times, "latitude": lat, "longitude": [0.0, 180.0]},
    )


def test_rmse_bias_acc_hand_computed():
    times = np.array(["2004-01-01T00", "2004-01-01T06"], dtype="datetime64[ns]")
    truth = _tiny(np.zeros((2, 3, 2)), times)
    # time 0: error 1 at the middle row only; time 1: error 2 everywhere
    err = np.zeros((2, 3, 2))
    err[0, 1] = 1.0
    err[1] = 2.0
    fc = _tiny(err, times)
    # weights 0.75, 1.5, 0.75 (mean 1): MSE t0 = 1.5 / 3 = 0.5, t1 = 4
    np.testing.assert_allclose(metrics.mse(fc, truth).t.values, [0.5, 4.0])
    assert float(metrics.rmse(fc, truth).t) == pytest.approx(np.sqrt((0.5 + 4.0) / 2))
    np.testing.assert_allclose(metrics.rmse(fc, truth, per_time=True).t.values, [np.sqrt(0.5), 2.0])
    assert float(metrics.bias(fc, truth).t) == pytest.approx((0.5 + 2.0) / 2)
    # ACC: forecast anomaly equal to the truth anomaly -> 1; opposite -> -1
    clim = xr.Dataset(
        {"t": (("dayofyear", "hour", "latitude", "longitude"), np.zeros((366, 4, 3, 2)))},
        coords={
            "dayofyear": np.arange(1, 367),
            "hour": [0, 6, 12, 18],
            "latitude": [-60.0, 0.0, 60.0],
            "longitude": [0.0, 180.0],
        },
    )
    anomaly = _tiny(np.random.default_rng(0).standard_normal((2, 3, 2)), times)
    assert float(metrics.acc(anomaly, anomaly, clim).t) == pytest.approx(1.0)
    assert float(metrics.acc(-anomaly, anomaly, clim).t) == pytest.approx(-1.0)
    # hand value at one time: f = (1, 0, 0 | 0, 0, 0) rows, o = (1, 1, ...): sum w f o / sqrt(sum w f^2 sum w o^2)
    f = np.zeros((1, 3, 2))
    f[0, 0, 0] = 1.0
    o = np.ones((1, 3, 2))
    w = np.array([0.75, 1.5, 0.75])[:, None]
    expected = (w * f[0] * o[0]).mean() / np.sqrt((w * f[0] ** 2).mean() * (w * o[0] ** 2).mean())
    got = metrics.acc(_tiny(f, times[:1]), _tiny(o, times[:1]), clim)
    assert float(got.t) == pytest.approx(expected)
    # latitude order does not matter
    assert float(metrics.rmse(fc.isel(latitude=slice(None, None, -1)), truth).t) == pytest.approx(
        np.sqrt(2.25)
    )


def test_climatology_by_day_and_hour():
    times = np.array(["2001-01-01T00", "2001-01-01T06", "2002-01-01T00"], dtype="datetime64[ns]")
    ds = _tiny(np.stack([np.full((3, 2), 1.0), np.full((3, 2), 5.0), np.full((3, 2), 3.0)]), times)
    clim = metrics.climatology(ds)
    assert float(clim.t.sel(dayofyear=1, hour=0).mean()) == pytest.approx(2.0)
    assert float(clim.t.sel(dayofyear=1, hour=6).mean()) == pytest.approx(5.0)
    assert float(clim.t.sel(dayofyear=200, hour=0).mean()) == pytest.approx(2.0)  # nearest day present


def test_metrics_align_variables():
    ds = make_state()
    with pytest.raises(ValueError, match="missing"):
        metrics.rmse(ds, ds.drop_vars("temperature"))
    assert float(metrics.rmse(ds, ds).geopotential.max()) == 0.0
    assert LON.size == 32
