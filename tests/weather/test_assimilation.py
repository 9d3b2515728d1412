"""Observations, OI / 3D-Var, assimilate() with Adas, cycle(), and the commands end to end at tiny size."""

import json

import numpy as np
import pytest
import torch
import xarray as xr

import zoo
import zoo.weather
from zoo.weather.api import AdasAssimilator, assimilate, cycle
from zoo.weather.grid import Normalisation, StateLayout
from zoo.weather.observations import (
    SAO_STATIONS,
    grid_observations,
    observe_at_points,
    random_grid_observations,
    station_locations,
)
from zoo.weather.oi import OptimalInterpolation, gaussian_correlation, great_circle_km
from zoo.weather.osse import OBSERVATION_ERROR_STD
from zoo.weather.train import evaluation_minutes

from .helpers import LAT, LON, make_state

OSSE_VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")


def osse_state(times=1, seed=0):
    return make_state(times=times, seed=seed, levels=(500,), surface=(), upper=OSSE_VARS)


def test_point_observations_are_counted_not_dropped():
    bg = make_state()
    layout = StateLayout.of(bg)
    obs = xr.Dataset(
        {
            "geopotential": ("obs", [10.0, 20.0, np.nan, 5.0, 7.0, 9.0]),
            "2m_temperature": ("obs", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        },
        coords={
            "latitude": ("obs", [LAT[3], LAT[3] + 1.0, LAT[5], LAT[6], 95.0, LAT[7]]),
            "longitude": ("obs", [LON[4], LON[4] - 2.0, LON[1], LON[2], 0.0, LON[9] + 360.0]),
            "level": ("obs", [500, 500, 500, 300, 500, 850]),
        },
    )
    g = grid_observations(obs, bg, layout)
    c = g.counts["geopotential"]
    assert c == {"given": 6, "used": 3, "nan": 1, "off_levels": 1, "outside_grid": 1, "merged": 1}
    z = g.values.geopotential.isel(time=0)
    assert float(z.sel(level=500).isel(latitude=3, longitude=4)) == pytest.approx(15.0)  # two averaged
    assert float(z.sel(level=850).isel(latitude=7, longitude=9)) == pytest.approx(9.0)  # longitude wraps
    assert int(np.isfinite(z.values).sum()) == 2
    assert g.counts["2m_temperature"]["used"] == 5  # surface values need no level
    values, mask = g.tensors(layout)
    assert (
        torch.isfinite(values).all() and int(mask.sum()) == 2 + 5 - 1
    )  # two surface obs share the merged cell


def test_gridded_observations_must_match_grid():
    bg = make_state()
    layout = StateLayout.of(bg)
    obs = random_grid_observations(bg, layout, 0.3, seed=1).values
    g = grid_observations(obs.isel(latitude=slice(None, None, -1)), bg, layout)  # either latitude order
    xr.testing.assert_equal(g.values.geopotential, obs.geopotential)
    with pytest.raises(ValueError, match="does not match"):
        grid_observations(obs.isel(longitude=slice(0, 16)), bg, layout)
    with pytest.raises(ValueError, match="expected some of the variables"):
        grid_observations(
            obs.rename(geopotential="z", temperature="t", **{"2m_temperature": "t2"}), bg, layout
        )


@pytest.mark.skipif(not SAO_STATIONS.is_file(), reason="libncarg-data is not installed")
def test_real_station_locations():
    lat, lon = station_locations()
    assert lat.size == 1443
    assert -15 < lat.min() and lat.max() < 83 and -180 <= lon.min() and lon.max() <= 180
    truth = osse_state()
    obs = observe_at_points(truth, lat, lon, {"geopotential": 0.0}, level=500)
    g = grid_observations(obs, truth, StateLayout.of(truth))
    c = g.counts["geopotential"]
    assert c["used"] == 1443 and c["merged"] > 1000  # dense North American network on a coarse grid
    assert "geopotential_error_std" in obs


def test_point_sampling_is_exact_at_grid_nodes():
    truth = osse_state()
    obs = observe_at_points(truth, LAT[[2, 9]], LON[[3, 31]], {"u_component_of_wind": 0.0}, level=500)
    want = truth.u_component_of_wind.isel(time=0, level=0).values[[2, 9], [3, 31]]
    np.testing.assert_allclose(obs.u_component_of_wind.values, want)


def test_oi_equals_3dvar_minimiser_and_limits():
    torch.manual_seed(0)
    H, W = 6, 8
    lat = np.linspace(-75, 75, H)
    lon = np.arange(W) * 45.0
    layout = StateLayout(surface=("x",), upper=(), levels=())
    oi = OptimalInterpolation(
        layout, background_error_std=2.0, observation_error_std=0.5, length_scale_km=1500.0
    )
    bg = torch.randn(1, H, W, dtype=torch.float64)
    y = torch.randn(1, H, W, dtype=torch.float64)
    mask = (torch.rand(1, H, W) < 0.4).double()
    ana = oi.analyse_tensor(bg, y, mask, lat, lon)
    # 3D-Var in information form: (B^-1 + H^T R^-1 H) dx = H^T R^-1 (y - H x_b)
    glat = torch.tensor(lat)[:, None].expand(H, W).reshape(-1)
    glon = torch.tensor(lon)[None, :].expand(H, W).reshape(-1)
    B = 4.0 * gaussian_correlation(great_circle_km(glat, glon, glat, glon), 1500.0)
    Hm = torch.eye(H * W, dtype=torch.float64)[mask.reshape(-1) > 0]
    Rinv = torch.eye(Hm.shape[0], dtype=torch.float64) / 0.25
    lhs = torch.linalg.inv(B) + Hm.T @ Rinv @ Hm
    rhs = Hm.T @ Rinv @ (Hm @ y.reshape(-1) - Hm @ bg.reshape(-1))
    expected = bg.reshape(-1) + torch.linalg.solve(lhs, rhs)
    torch.testing.assert_close(ana.reshape(-1), expected, rtol=1e-6, atol=1e-6)
    exact = OptimalInterpolation(layout, 2.0, 0.0, 1500.0).analyse_tensor(bg, y, mask, lat, lon)
    where = mask[0] > 0
    torch.testing.assert_close(exact[0][where], y[0][where], rtol=1e-5, atol=1e-5)
    ignore = OptimalInterpolation(layout, 2.0, 1e6, 1500.0).analyse_tensor(bg, y, mask, lat, lon)
    torch.testing.assert_close(ignore, bg, rtol=0, atol=1e-5)


def test_assimilate_with_oi_keeps_the_background_form():
    truth = make_state(seed=1)
    bg = make_state(seed=2)
    layout = StateLayout.of(bg)
    obs = random_grid_observations(truth, layout, 0.3, seed=0).values
    oi = OptimalInterpolation(
        layout,
        {"2m_temperature": 5.0, "geopotential": 500.0, "temperature": 5.0},
        {"2m_temperature": 0.5, "geopotential": 50.0, "temperature": 0.5},
        1500.0,
    )
    flipped = bg.isel(latitude=slice(None, None, -1))
    out = assimilate(flipped, obs, model=oi)
    assert list(out.data_vars) == list(bg.data_vars) and out.attrs == bg.attrs
    np.testing.assert_array_equal(out.latitude.values, flipped.latitude.values)
    assert out.geopotential.attrs == bg.geopotential.attrs
    err_bg = float(np.sqrt(((bg - truth) ** 2).geopotential.mean()))
    err_an = float(np.sqrt(((out.sortby("latitude") - truth) ** 2).geopotential.mean()))
    assert err_an < 0.7 * err_bg
    bad = bg.copy(deep=True)
    bad["geopotential"][0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        assimilate(bad, obs, model=oi)
    with pytest.raises(ValueError, match="missing"):
        assimilate(bg.drop_vars("temperature"), obs, model=oi)


def tiny_adas_assimilator():
    truth = osse_state(times=3)
    layout = StateLayout.of(truth)
    norm = Normalisation.fit(layout.to_tensor(truth), layout.channel_names())
    model = zoo.create("adas_osse_tiny", residual=False)  # not the zero-initialised increment head
    return AdasAssimilator(model, layout, norm), truth, layout


def test_nan_observations_never_reach_adas():
    assim, truth, layout = tiny_adas_assimilator()
    seen = {}

    def hook(module, args):
        seen["args"] = [a.detach().clone() for a in args]

    assim.model.register_forward_pre_hook(hook)
    obs = random_grid_observations(truth.isel(time=[0]), layout, 0.2, seed=3).values
    bg = truth.isel(time=[1])
    out = assim(bg, obs.assign_coords(time=bg.time))
    background, observation, mask = seen["args"]
    assert all(torch.isfinite(t).all() for t in (background, observation, mask))
    finite = torch.isfinite(layout.to_tensor(obs))
    assert torch.equal(mask.bool(), finite)
    assert (observation[~finite] == 0).all()
    assert set(out.data_vars) == set(bg.data_vars) and out.time.values[0] == bg.time.values[0]
    assert all(np.isfinite(out[v].values).all() for v in out.data_vars)
    # observed values change the analysis; the values under NaN do not exist for the model
    other = obs.copy(deep=True)
    other["geopotential"] = other.geopotential + 1000.0
    out2 = assim(bg, other.assign_coords(time=bg.time))
    assert not np.allclose(out2.geopotential.values, out.geopotential.values)


class Shift:
    """A toy forecaster: the state advected one grid column east per 6 h."""

    step = np.timedelta64(6, "h")
    history = 1

    def __call__(self, states):
        last = states.isel(time=[-1])
        nxt = last.roll(longitude=1, roll_coords=False)
        return nxt.assign_coords(time=last.time.values + self.step)


def test_cycle_streams_to_disk_and_resumes(tmp_path):
    truth = make_state(times=8, seed=4)
    layout = StateLayout.of(truth)
    oi = OptimalInterpolation(
        layout,
        {"2m_temperature": 5.0, "geopotential": 500.0, "temperature": 5.0},
        {"2m_temperature": 0.5, "geopotential": 50.0, "temperature": 0.5},
        1500.0,
    )

    def observe(time):
        sel = truth.sel(time=[time])
        return random_grid_observations(
            sel, layout, 0.3, seed=int(time.astype("datetime64[h]").astype(int)) % 1000
        ).values

    straight = cycle(
        truth.isel(time=[0]), observe, Shift(), oi, 5, out=tmp_path / "a", chunk=2, show_progress=False
    )
    assert [p.name for p in straight.paths] == [
        "analysis_000000.nc",
        "analysis_000002.nc",
        "analysis_000004.nc",
    ]
    full = straight.open()
    assert full.sizes["time"] == 5 and (full.time.values == truth.time.values[1:6]).all()
    cycle(truth.isel(time=[0]), observe, Shift(), oi, 3, out=tmp_path / "b", chunk=2, show_progress=False)
    resumed = cycle(
        truth.isel(time=[0]), observe, Shift(), oi, 5, out=tmp_path / "b", chunk=2, show_progress=False
    )
    xr.testing.assert_allclose(resumed.open(), full)
    log = json.loads((tmp_path / "a" / "cycle_log.json").read_text())
    assert len(log) == 5 and all(r["assimilated"] for r in log)
    # the analyses track the truth better than a free run of the toy model
    free = cycle(truth.isel(time=[0]), None, Shift(), None, 5, show_progress=False).open()
    err = lambda ds: float(((ds - truth.sel(time=ds.time)) ** 2).geopotential.mean())
    assert err(full) < err(free)


def test_cycle_stops_on_divergence():
    class Exploding(Shift):
        def __call__(self, states):
            out = super().__call__(states)
            return out * np.nan

    with pytest.raises(FloatingPointError, match="non-finite analysis at 2004-01-01T06"):
        cycle(make_state(), None, Exploding(), None, 2, show_progress=False)


def test_commands_end_to_end(tmp_path, capsys):
    from zoo.cli import main

    data, out = tmp_path / "data", tmp_path / "out"
    args = [
        "train",
        "weather",
        "all",
        "--data",
        str(data),
        "--out",
        str(out),
        "--nlat",
        "16",
        "--nlon",
        "32",
        "--days",
        "3",
    ]
    args += [
        "--spinup-days",
        "1",
        "--budget-minutes",
        "0.05",
        "--samples",
        "3",
        "--cycles",
        "3",
        "--batch",
        "2",
        "--streams",
        "2",
    ]
    args += ["--forecaster-arch", "fengwu_lite_tiny", "--adas-arch", "adas_osse_tiny", "--device", "cpu"]
    assert main(["-q", *args]) == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["eval"]["by_fraction"]) == {"0.1", "0.01", "0.001"}
    cycling = results["eval"]["cycling"]
    assert cycling["cycles"] == 3 and cycling["adas"]["finite"] and cycling["oi"]["finite"]
    # both cycles are scored against the same climatology bound
    assert set(cycling["adas"]["rmse_last_30_days"]) == set(cycling["climatology_rmse_last_30_days"])
    assert isinstance(cycling["oi"]["diverged"], bool)
    assert results["eval_reserve_minutes"] == pytest.approx(evaluation_minutes(3))
    # the Adas increment scale is the innovation's standard deviation, sqrt(sigma_b^2 + sigma_o^2)
    adas_meta = json.loads((out / "adas.json").read_text())
    sigma_o = [
        OBSERVATION_ERROR_STD[name] / std for name, std in zip(OSSE_VARS, adas_meta["normalisation"]["std"])
    ]
    expected = [(b * b + o * o) ** 0.5 for b, o in zip(adas_meta["background_error_scale"], sigma_o)]
    assert adas_meta["increment_scale"] == pytest.approx(expected, rel=1e-5)
    assert adas_meta["schedule"]["scale"] == "innovation"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "adas.json",
            "adas.safetensors",
            "cycle_rmse.png",
            "forecaster.json",
            "forecaster.safetensors",
            "increments.png",
            "results.json",
        ]
    )
    # the trained Adas assimilates through `zoo assimilate`
    from zoo.weather.osse import load_years

    truth = load_years(data, [2004], 16, 32).isel(time=[4])
    bg = load_years(data, [2004], 16, 32).isel(time=[3]).assign_coords(time=truth.time)
    bg.to_netcdf(tmp_path / "bg.nc")
    random_grid_observations(truth, StateLayout.of(truth), 0.1).values.to_netcdf(tmp_path / "obs.nc")
    code = main(
        [
            "assimilate",
            "--background",
            str(tmp_path / "bg.nc"),
            "--observations",
            str(tmp_path / "obs.nc"),
            "--model",
            str(out / "adas.safetensors"),
            "--out",
            str(tmp_path / "an.nc"),
        ]
    )
    assert code == 0
    analysis = xr.load_dataset(tmp_path / "an.nc")
    assert set(analysis.data_vars) == set(OSSE_VARS) and analysis.sizes == bg.sizes
    assert (
        main(
            [
                "eval",
                "weather",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "ev"),
                "--nlat",
                "16",
                "--nlon",
                "32",
                "--forecaster",
                str(out / "forecaster.safetensors"),
                "--adas",
                str(out / "adas.safetensors"),
                "--samples",
                "3",
                "--cycles",
                "0",
                "--no-plots",
                "--device",
                "cpu",
            ]
        )
        == 0
    )


def test_era5_members_real_data_error_reduction(tmp_path, monkeypatch):
    from zoo.weather import era5, osse

    cached = osse.cache_dir() / era5.SAMPLE_NAME
    if not cached.is_file():
        try:
            era5.fetch_era5_sample()
        except FileNotFoundError as err:
            pytest.skip(f"cfgrib source distribution not reachable: {err}")
    ds = era5.era5_members()
    assert ds.sizes["member"] == 10 and list(ds.level.values) == [850, 500] and ds.latitude.values[0] == 90.0
    result = era5.era5_real_data_check(fraction=0.1)
    for name, r in result["rmse"].items():
        assert r["ratio"] < 0.97, name
    analysis = result["analysis"]
    assert analysis.latitude.values[0] == 90.0  # the caller's (descending) order is kept
    assert analysis.geopotential.attrs["units"] == "m**2 s**-2"


def test_osse_sample_is_a_ready_case(tmp_path):
    from zoo.weather import osse

    case = osse.sample(
        obs_fraction=0.1, seed=1, time_index=4, grid=(16, 32), directory=tmp_path, days=2.0, spinup_days=2.0
    )
    truth, bg, obs = case["truth"], case["background"], case["observations"]
    assert set(case) >= {"truth", "background", "observations"}
    assert bg.time.values[0] == truth.time.values[0] and "persistence" in bg.attrs["background_source"]
    observed = np.isfinite(obs.geopotential.values)
    assert 0.05 < observed.mean() < 0.15
    # observations are the truth plus errors of the stated size
    diff = (obs.geopotential.values - truth.geopotential.values)[observed]
    stated = osse.OBSERVATION_ERROR_STD["geopotential"]
    assert 0.8 * stated < diff.std() < 1.2 * stated
    layout = case["layout"]
    oi = OptimalInterpolation(
        layout,
        {"geopotential": 300.0, "u_component_of_wind": 3.0, "v_component_of_wind": 3.0},
        osse.OBSERVATION_ERROR_STD,
        1000.0,
    )
    analysis = zoo.weather.assimilate(bg, obs, model=oi)
    from zoo.weather import metrics

    assert float(metrics.rmse(analysis, truth).geopotential.squeeze()) < float(
        metrics.rmse(bg, truth).geopotential.squeeze()
    )


def test_osse_sample_background_from_a_given_forecaster(tmp_path):
    from zoo.weather import osse

    class LastStateTwice:
        history = 2

        def __call__(self, states):
            assert states.sizes["time"] == 2
            nxt = states.isel(time=[-1]) * 2.0
            return nxt.assign_coords(time=states.time.values[-1:] + np.timedelta64(6, "h"))

    kw = dict(
        obs_fraction=0.1, seed=1, time_index=4, grid=(16, 32), directory=tmp_path, days=2.0, spinup_days=2.0
    )
    case = osse.sample(forecaster=LastStateTwice(), **kw)
    assert case["background"].attrs["background_source"] == "forecaster"
    earlier = osse.sample(forecaster="persistence", **kw)["background"]  # the truth 6 h before
    np.testing.assert_allclose(case["background"].geopotential.values, 2.0 * earlier.geopotential.values)
    assert case["background"].time.values[0] == case["truth"].time.values[0]


def test_cuda_graph_flag_on_cpu_is_the_plain_analysis():
    assim, truth, layout = tiny_adas_assimilator()
    assim.model.eval()
    bg = layout.to_tensor(truth.isel(time=[1]))
    obs = layout.to_tensor(truth.isel(time=[2]))
    mask = (torch.rand(bg.shape, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    plain = assim.analyse_tensor(bg, obs, mask)
    assim.cuda_graph = True
    assert torch.equal(assim.analyse_tensor(bg, obs, mask), plain) and assim._graphed is None


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_cuda_graph_replay_equals_the_plain_analysis(autocast):
    assim, truth, layout = tiny_adas_assimilator()
    assim.model.cuda().eval()
    assim.autocast = autocast
    gen = torch.Generator().manual_seed(1)
    cases = []
    for t in (1, 2, 1):  # a replay with new values after the capture
        bg = layout.to_tensor(truth.isel(time=[t]))
        obs = layout.to_tensor(truth.isel(time=[t - 1]))
        cases.append((bg, obs, (torch.rand(bg.shape, generator=gen) < 0.2).float()))
    plain = [assim.analyse_tensor(*case) for case in cases]
    assim.cuda_graph = True
    graphed = [assim.analyse_tensor(*case) for case in cases]
    assert assim._graphed is not None and len(assim._graphed._graphs) == 1
    for want, got in zip(plain, graphed):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
