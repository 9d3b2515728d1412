"""cycle() on tensors (ModelForecaster with Adas, OI or none) against step-by-step loops of the public functions.

FengWu-Adas (arXiv 2312.12462) cycles forecast -> assimilate -> forecast every 6 hours. The
tensor loop in ``zoo.weather.api.cycle`` keeps the state on the model's device and builds
Datasets once per chunk; these tests hold it to the plain loop ``analysis = assimilate(
forecaster(window), observations(time))`` value for value, and to the Dataset loop (the same
models behind a wrapper that hides their type) file for file, errors included.
"""

import contextlib
import json

import numpy as np
import pytest
import torch
import xarray as xr

from zoo.weather import api, create_model
from zoo.weather.api import AdasAssimilator, ModelForecaster, _TensorCycles, assimilate, cycle
from zoo.weather.grid import Normalisation, StateLayout
from zoo.weather.observations import random_grid_observations
from zoo.weather.oi import OptimalInterpolation

from .helpers import LAT, LON, make_state

OSSE_VARS = ("geopotential", "u_component_of_wind", "v_component_of_wind")
ERRORS = {"geopotential": 20.0, "u_component_of_wind": 1.0, "v_component_of_wind": 1.0}


def truth_run(times, dtype=np.float64, descending=False, seed=3):
    ds = make_state(times=times, seed=seed, levels=(500,), surface=(), upper=OSSE_VARS)
    for v in OSSE_VARS:
        ds[v] = ds[v].astype(dtype)
    return ds.isel(latitude=slice(None, None, -1)) if descending else ds


def randomised(model, seed):
    """Every parameter perturbed (the tiny models start as persistence / the background)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def models(seed=0):
    layout = StateLayout.of(truth_run(1))
    norm = Normalisation(layout.channel_names(), [5e4, 250.0, 250.0], [500.0, 5.0, 5.0])
    forecaster = ModelForecaster(randomised(create_model("fengwu_lite_tiny"), seed), layout, norm)
    adas = AdasAssimilator(randomised(create_model("adas_osse_tiny"), seed + 1), layout, norm)
    oi = OptimalInterpolation(
        layout,
        {"geopotential": 300.0, "u_component_of_wind": 3.0, "v_component_of_wind": 3.0},
        ERRORS,
        1500.0,
    )
    return layout, forecaster, adas, oi


class Hidden:
    """A forecaster behind a plain wrapper: cycle() takes its Dataset loop."""

    def __init__(self, forecaster):
        self.forecaster, self.step, self.history = forecaster, forecaster.step, forecaster.history

    def __call__(self, states):
        return self.forecaster(states)


def observer(truth, layout, fraction=0.3):
    def observe(time):
        sel = truth.sel(time=[time])
        seed = int(time.astype("datetime64[h]").astype(int)) % 1000
        return random_grid_observations(sel, layout, fraction, seed=seed, error_std=ERRORS).values

    return observe


def step_by_step(initial, observe, forecaster, assimilator, steps):
    """The reference: ``assimilate(forecaster(window), observe(time))`` one cycle at a time."""
    window, analyses, backgrounds = initial, [], []
    for _ in range(steps):
        background = forecaster(window)
        obs = observe(background.time.values[-1])
        analysis = (
            background if obs is None or assimilator is None else assimilate(background, obs, assimilator)
        )
        window = xr.concat([window, analysis], dim="time").isel(time=slice(-forecaster.history, None))
        analyses.append(analysis)
        backgrounds.append(background)
    return xr.concat(analyses, dim="time"), xr.concat(backgrounds, dim="time")


@contextlib.contextmanager
def tensor_loop_only():
    """A cycle inside that falls back to the Dataset loop fails."""

    def refuse(*args, **kwargs):
        raise AssertionError("cycle() took the Dataset loop")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "_dataset_cycles", refuse)
        yield


def chunk_files(directory, kind):
    return [xr.open_dataset(p, decode_cf=False).load() for p in sorted(directory.glob(f"{kind}_*.nc"))]


def test_tensor_loop_is_taken_only_where_it_is_exact():
    layout, forecaster, adas, oi = models()
    state = truth_run(2)
    assert _TensorCycles.plan(state, forecaster, adas) is not None
    assert _TensorCycles.plan(state, forecaster, oi) is not None
    assert _TensorCycles.plan(state, forecaster, None) is not None
    assert _TensorCycles.plan(state, Hidden(forecaster), adas) is None
    assert _TensorCycles.plan(state, forecaster, lambda b, o: b) is None
    assert _TensorCycles.plan(state.assign(extra=state.geopotential * 2), forecaster, adas) is None
    mixed = state.assign(geopotential=state.geopotential.astype(np.float32))
    assert _TensorCycles.plan(mixed, forecaster, adas) is None


def test_adas_cycle_equals_step_by_step_and_dataset_loop_on_disk(tmp_path):
    layout, forecaster, adas, _ = models()
    truth = truth_run(8, dtype=np.float32)
    observe = observer(truth, layout)
    steps = 5
    initial = truth.isel(time=[0, 1])
    ref_analyses, ref_backgrounds = step_by_step(initial, observe, forecaster, adas, steps)
    with tensor_loop_only():
        fast = cycle(
            initial, observe, forecaster, adas, steps, out=tmp_path / "fast", chunk=2, show_progress=False
        )
    got = fast.open().load()
    np.testing.assert_array_equal(got.geopotential.values, ref_analyses.geopotential.values)
    xr.testing.assert_identical(got, ref_analyses)
    backgrounds = xr.concat(
        [xr.load_dataset(p) for p in sorted((tmp_path / "fast").glob("background_*"))], "time"
    )
    xr.testing.assert_identical(backgrounds, ref_backgrounds)
    assert not np.array_equal(ref_analyses.geopotential.values, ref_backgrounds.geopotential.values)

    plain = cycle(
        initial,
        observe,
        Hidden(forecaster),
        adas,
        steps,
        out=tmp_path / "plain",
        chunk=2,
        show_progress=False,
    )
    assert [p.name for p in fast.paths] == [p.name for p in plain.paths]
    for kind in ("analysis", "background"):
        for a, b in zip(
            chunk_files(tmp_path / "fast", kind), chunk_files(tmp_path / "plain", kind), strict=True
        ):
            xr.testing.assert_identical(a, b)  # raw stored values, dtypes and attributes
    assert fast.log == plain.log
    assert json.loads((tmp_path / "fast" / "cycle_log.json").read_text()) == plain.log

    # a rerun resumes after the complete chunks, on tensors, to the same analyses
    with tensor_loop_only():
        cycle(initial, observe, forecaster, adas, 3, out=tmp_path / "resumed", chunk=2, show_progress=False)
        resumed = cycle(
            initial, observe, forecaster, adas, steps, out=tmp_path / "resumed", chunk=2, show_progress=False
        )
    xr.testing.assert_identical(resumed.open().load(), got)


def test_oi_cycle_in_memory_equals_step_by_step_with_points_gaps_and_descending_latitude():
    layout, forecaster, _, oi = models(seed=5)
    truth = truth_run(8, descending=True, seed=7)
    gridded = observer(truth.sortby("latitude"), layout, 0.05)
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(LAT[0], LAT[-1], 40), rng.uniform(0, LON[-1], 40)

    def observe(time):
        index = int(np.nonzero(truth.time.values == time)[0][0])
        if index == 3:
            return None  # no observations: the background stands
        if index == 4:  # points, gridded to the nearest cell
            z = truth.geopotential.sel(time=time, level=500).interp(
                latitude=xr.DataArray(lat, dims="obs"), longitude=xr.DataArray(lon, dims="obs")
            )
            return xr.Dataset(
                {"geopotential": ("obs", z.values)},
                coords={
                    "latitude": ("obs", lat),
                    "longitude": ("obs", lon),
                    "level": ("obs", np.full(40, 500.0)),
                },
            )
        obs = gridded(time)
        return obs.isel(latitude=slice(None, None, -1)) if index % 2 else obs  # either latitude order

    initial = truth.isel(time=[0, 1])
    ref_analyses, _ = step_by_step(initial, observe, forecaster, oi, 5)
    with tensor_loop_only():
        got = cycle(initial, observe, forecaster, oi, 5, show_progress=False)
    xr.testing.assert_identical(got.open(), ref_analyses)
    assert [r["assimilated"] for r in got.log] == [True, False, True, True, True]
    assert got.open().latitude.values[0] > got.open().latitude.values[-1]


def test_free_forecast_on_tensors_equals_repeated_forecasts():
    layout, forecaster, _, _ = models(seed=2)
    initial = truth_run(2, dtype=np.float32)
    ref, _ = step_by_step(initial, lambda t: None, forecaster, None, 4)
    with tensor_loop_only():
        got = cycle(initial, None, forecaster, None, 4, chunk=3, show_progress=False)
    xr.testing.assert_identical(got.open(), ref)
    assert len(got.log) == 4 and not any(r["assimilated"] for r in got.log)


@pytest.mark.parametrize("assimilate_it", [False, True])
@pytest.mark.parametrize("bias", [float("nan"), 1e37])
def test_divergence_stops_both_loops_with_the_same_error(tmp_path, assimilate_it, bias):
    layout, forecaster, adas, _ = models()
    truth = truth_run(8, dtype=np.float32)
    with torch.no_grad():
        forecaster.model.heads[0].bias.fill_(bias)  # NaN at once, or an overflow within a few steps
    observe = observer(truth, layout) if assimilate_it else None
    errors = []
    for f in (forecaster, Hidden(forecaster)):
        with pytest.raises((FloatingPointError, ValueError)) as caught:
            cycle(
                truth.isel(time=[0, 1]),
                observe,
                f,
                adas,
                5,
                out=tmp_path / str(len(errors)),
                show_progress=False,
            )
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]
    if assimilate_it and np.isnan(bias):  # the assimilator refuses a NaN background
        assert errors[0][0] is ValueError and "background: variable 'geopotential' has" in errors[0][1]
    else:
        assert errors[0][0] is FloatingPointError and "non-finite analysis at 2004-01-01" in errors[0][1]
    assert not list(tmp_path.glob("*/analysis_*.nc"))


def test_adas_rejects_observations_of_several_times_like_assimilate():
    layout, forecaster, adas, _ = models()
    truth = truth_run(8, dtype=np.float32)

    def observe(time):  # already gridded, two times for one background
        return random_grid_observations(truth.isel(time=[2, 3]), layout, 0.3)

    for f in (forecaster, Hidden(forecaster)):
        with pytest.raises(ValueError, match="observations: 2 times for a background of 1"):
            cycle(truth.isel(time=[0, 1]), observe, f, adas, 2, show_progress=False)
