"""Spectral shallow-water model: exact transforms, torch-harmonics' solver as reference, resumable nature runs."""

import numpy as np
import pytest
import torch

from zoo.weather.nature_run import generate_nature_run
from zoo.weather.shallow_water import ShallowWaterConfig, ShallowWaterModel, SphericalHarmonics, wb2_latitudes


def random_coefficients(batch, lmax, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.complex(*(torch.randn(batch, lmax, lmax, generator=g, dtype=torch.float64) for _ in range(2)))
    a = a * torch.tril(torch.ones(lmax, lmax, dtype=torch.float64))
    a[..., 0] = a[..., 0].real + 0j
    return a


def test_transform_round_trip_and_orthonormality():
    sh = SphericalHarmonics(12, 24, 8)
    a = random_coefficients(3, 8)
    torch.testing.assert_close(sh.forward(sh.inverse(a)), a, rtol=0, atol=1e-12)
    # Y_00 = 1 / sqrt(4 pi): a constant field c has a_00 = c sqrt(4 pi)
    const = torch.full((12, 24), 2.0, dtype=torch.float64)
    assert sh.forward(const)[0, 0].real.item() == pytest.approx(2.0 * np.sqrt(4 * np.pi))
    # the sphere's area weights sum to 4 pi
    assert (sh.inverse(sh.forward(const)) - const).abs().max() < 1e-12


def test_winds_and_vorticity_divergence_are_inverse():
    sh = SphericalHarmonics(16, 32, 11)
    vort, div = random_coefficients(2, 11, 1), random_coefficients(2, 11, 2)
    vort[..., 0, 0] = 0
    div[..., 0, 0] = 0
    u, v = sh.wind(vort, div)
    vort2, div2 = sh.vorticity_divergence(u, v)
    torch.testing.assert_close(vort2, vort, rtol=1e-9, atol=1e-9 * vort.abs().max().item())
    torch.testing.assert_close(div2, div, rtol=1e-9, atol=1e-9 * div.abs().max().item())
    # solid-body rotation u = U cos(lat) has vorticity 2 U sin(lat) / a
    lat = torch.as_tensor(np.deg2rad(sh.latitude))[:, None].expand(16, 32)
    vort3, div3 = sh.vorticity_divergence(20 * torch.cos(lat), torch.zeros_like(lat))
    expected = sh.forward(2 * 20 * torch.sin(lat) / 6.37122e6)
    torch.testing.assert_close(vort3, expected, rtol=0, atol=1e-15)
    assert div3.abs().max() < 1e-15


def test_matches_torch_harmonics_solver():
    th = pytest.importorskip("torch_harmonics.examples")
    try:
        solver = th.ShallowWaterSolver(16, 32, 300.0, grid="legendre-gauss").double()
    except Exception as err:  # pragma: no cover - versions without this grid
        pytest.skip(f"torch-harmonics solver unavailable: {err}")
    start = solver.galewsky_initial_condition()
    cfg = ShallowWaterConfig(
        nlat=16,
        nlon=32,
        lmax=solver.lmax,
        dt=300.0,
        mean_depth=10e3,
        hyperdiffuse_geopotential=False,
        semi_implicit=False,
    )
    model = ShallowWaterModel(cfg, forcing=False)
    grids = torch.stack([solver.spec2grid(start[i]) for i in range(3)]).flip(1)  # ascending latitude
    ours = torch.stack([model.sh.forward(grids[i]) for i in range(3)])[None] * model.triangular
    ref = solver.timestep(start.clone(), 12)
    ours = model.run(ours, 12, torch.zeros(1))
    for i in range(3):
        want = solver.spec2grid(ref[i]).flip(0)
        got = model.sh.inverse(ours[0, i])
        assert ((got - want).norm() / want.norm()).item() < 1e-6


def test_semi_implicit_agrees_with_small_explicit_steps():
    base = dict(nlat=16, nlon=32, mean_depth=5600.0)
    semi = ShallowWaterModel(ShallowWaterConfig(dt=1800.0, semi_implicit=True, **base))
    expl = ShallowWaterModel(ShallowWaterConfig(dt=300.0, semi_implicit=False, **base))
    start = semi.random_state(1, amplitude=2e-5, seed=3)
    day = torch.zeros(1)
    a = semi.to_grid(semi.run(start, 12, day))  # 6 h
    b = expl.to_grid(expl.run(start, 72, day))
    first = semi.to_grid(start)
    for i in (1, 2):  # winds: the difference is far below the change over 6 h
        change = (b[:, i] - first[:, i]).norm()
        assert (a[:, i] - b[:, i]).norm() < 0.1 * change


def test_nature_run_writes_wb2_netcdf_and_resumes(tmp_path):
    import xarray as xr

    kwargs = dict(
        years=(2001, 2002), nlat=16, nlon=32, days=1.0, spinup_days=1.0, chunk_days=0.5, show_progress=False
    )
    paths = generate_nature_run(tmp_path, **kwargs)
    ds = xr.open_dataset(paths[0])
    assert dict(ds.sizes) == {"time": 4, "level": 1, "latitude": 16, "longitude": 32}
    assert list(ds.data_vars) == ["geopotential", "u_component_of_wind", "v_component_of_wind"]
    np.testing.assert_allclose(ds.latitude.values, wb2_latitudes(16))
    assert str(ds.time.values[0])[:13] == "2001-01-01T00" and int(ds.level[0]) == 500
    assert ds.geopotential.attrs["units"] == "m**2 s**-2"
    assert 4.5e4 < float(ds.geopotential.mean()) < 6.5e4
    other = xr.open_dataset(paths[1])
    assert not np.allclose(other.u_component_of_wind.values, ds.u_component_of_wind.values)
    # stop after the first chunk, then resume: the same states come out
    resumed_dir = tmp_path / "resumed"
    import zoo.weather.nature_run as nr

    calls = {"n": 0}
    original = nr.state_dataset

    def failing(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args, **kw)

    nr.state_dataset = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            generate_nature_run(resumed_dir, **kwargs)
    finally:
        nr.state_dataset = original
    assert any(resumed_dir.glob("*.state.pt"))
    again = generate_nature_run(resumed_dir, **kwargs)
    np.testing.assert_allclose(
        xr.open_dataset(again[0]).geopotential.values, ds.geopotential.values, rtol=1e-6
    )
    assert not any(resumed_dir.glob("*.state.pt"))


def test_files_are_written_without_netcdf4(tmp_path, monkeypatch):
    """Machines with xarray and SciPy only (no netCDF4/h5netcdf) still write and read nature runs."""
    import xarray as xr

    import zoo.weather.io as io

    monkeypatch.setattr(io, "netcdf_engine", lambda: "scipy")
    (path,) = generate_nature_run(
        tmp_path, years=(2004,), nlat=16, nlon=32, days=0.5, spinup_days=0.25, show_progress=False
    )
    with open(path, "rb") as f:
        assert f.read(3) == b"CDF"  # netCDF3 classic
    ds = xr.load_dataset(path)
    assert ds.sizes["time"] == 2 and int(ds.level[0]) == 500


@pytest.mark.slow
def test_forced_model_keeps_its_weather_for_months():
    """After the transient, the default forcing sustains eddies (the old weak forcing let them die out)."""
    from zoo.weather.nature_run import default_config

    cfg = default_config(32, 64)
    model = ShallowWaterModel(cfg)
    state, history = model.random_state(1, seed=1), {}
    day = torch.zeros(1, dtype=torch.float64)
    per_output = round(6 * 3600 / cfg.dt)
    grids = []
    for output in range(300 * 4):
        for _ in range(per_output):
            state = model.step(state, history, day)
            day = day + cfg.dt / 86400
        if output >= 200 * 4:
            grids.append(model.to_grid(state)[0])
    states = torch.stack(grids)  # days 200-300: (time, 3, lat, lon)
    assert bool(torch.isfinite(states).all())
    weights = torch.cos(torch.deg2rad(torch.as_tensor(model.sh.latitude)))[:, None]
    weights = weights / weights.mean()
    change_6h = (((states[1:] - states[:-1]) ** 2) * weights).mean((0, 2, 3)).sqrt()
    eddies = (((states - states.mean(-1, keepdim=True)) ** 2) * weights).mean((0, 2, 3)).sqrt()
    assert float(change_6h[0]) > 200.0, change_6h  # geopotential, m^2/s^2 (decayed flow: < 25)
    assert float(eddies[1]) > 5.0, eddies  # eddy u, m/s (decayed flow: < 0.3)


def test_existing_nature_run_from_other_settings_is_refused(tmp_path):
    from dataclasses import replace

    from zoo.weather.nature_run import default_config

    kwargs = dict(years=(2004,), nlat=16, nlon=32, days=0.5, spinup_days=0.25, show_progress=False)
    (path,) = generate_nature_run(tmp_path, **kwargs)
    assert generate_nature_run(tmp_path, **kwargs) == [path]  # same settings: reused
    other = replace(default_config(16, 32), relax_days=3.0)
    with pytest.raises(ValueError, match="relax_days differ"):
        generate_nature_run(tmp_path, config=other, **kwargs)
