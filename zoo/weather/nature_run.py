"""Nature runs for the OSSE: years of 6-hourly shallow-water states as WeatherBench2-style netCDF.

An observing-system simulation experiment (OSSE) needs a "truth" that no model under test
has seen: here the forced shallow-water model of :mod:`zoo.weather.shallow_water` (the
rotating shallow-water equations, a real dynamical system on the sphere with barotropically
unstable jets), one independent trajectory per year, all years integrated together as one
batch. After a spin-up from a random perturbation of the equilibrium state, every 6 hours
the geopotential and winds are evaluated on WeatherBench2's equiangular grid and written as
``geopotential``, ``u_component_of_wind``, ``v_component_of_wind`` at ``level`` 500 with dims
``(time, level, latitude, longitude)``.

Long runs are resumable: every ``chunk_days`` the chunk is written as a part file and the
spectral state with its multistep history is saved; a rerun picks up where it stopped. When
all parts exist they are merged into ``nature_<lat>x<lon>_<year>.nc``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from zoo.progress import get_logger, progress
from zoo.weather.io import write_netcdf
from zoo.weather.shallow_water import ShallowWaterConfig, ShallowWaterModel, wb2_latitudes, wb2_longitudes

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["OSSE_LAYOUT_VARIABLES", "generate_nature_run", "nature_run_path", "state_dataset"]

log = get_logger("zoo.weather")
OSSE_LAYOUT_VARIABLES = ("geopotential", "u_component_of_wind", "v_component_of_wind")
ATTRS = {
    "geopotential": {"units": "m**2 s**-2", "long_name": "Geopotential"},
    "u_component_of_wind": {"units": "m s**-1", "long_name": "U component of wind"},
    "v_component_of_wind": {"units": "m s**-1", "long_name": "V component of wind"},
}
STEP = np.timedelta64(6, "h")
# days integrated before the first written state: the initial transient settles in about 120 days at 64 x 128
SPINUP_DAYS = 180.0


def default_time_step(nlat: int, semi_implicit: bool = True) -> float:
    """Seconds per step dividing 6 h: Courant number ~0.5 for 160 m/s winds (semi-implicit; 460 s at T43), else for gravity waves."""
    lmax = ShallowWaterConfig(nlat=nlat).resolved_lmax()
    fastest = 160.0 if semi_implicit else math.sqrt(9.80616 * ShallowWaterConfig().mean_depth) + 80.0
    limit = 0.5 * 6.37122e6 / (lmax * fastest)
    steps = math.ceil(6 * 3600 / limit)
    return 6 * 3600 / steps


def default_config(nlat: int, nlon: int) -> ShallowWaterConfig:
    """The nature run's model settings on an ``nlat x nlon`` grid (time step from :func:`default_time_step`)."""
    return ShallowWaterConfig(nlat=nlat, nlon=nlon, dt=default_time_step(nlat))


def nature_run_path(directory: str | Path, year: int, nlat: int = 64, nlon: int = 128) -> Path:
    return Path(directory) / f"nature_{nlat}x{nlon}_{year}.nc"


def state_dataset(
    values: np.ndarray,
    times: np.ndarray,
    latitude: np.ndarray,
    longitude: np.ndarray,
    attrs: dict | None = None,
) -> xr.Dataset:
    """``(time, 3, lat, lon)`` geopotential/u/v -> WeatherBench2-style Dataset at level 500."""
    import xarray as xr

    data = {
        name: (
            ("time", "level", "latitude", "longitude"),
            values[:, i : i + 1].astype(np.float32),
            ATTRS[name],
        )
        for i, name in enumerate(OSSE_LAYOUT_VARIABLES)
    }
    coords = {
        "time": ("time", np.asarray(times, dtype="datetime64[ns]")),
        "level": ("level", np.array([500], dtype=np.int64), {"units": "hPa", "long_name": "pressure level"}),
        "latitude": ("latitude", latitude, {"units": "degrees_north"}),
        "longitude": ("longitude", longitude, {"units": "degrees_east"}),
    }
    return xr.Dataset(data, coords=coords, attrs=dict(attrs or {}))


class CudaGraphStep:
    """One steady-state Adams-Bashforth step of a :class:`ShallowWaterModel` replayed as a CUDA graph.

    Hundreds of small kernels per step make the eager loop launch-bound on a GPU; a graph
    replays them at once. Capture is checked against the eager step and abandoned (eager
    stepping goes on) if anything differs.
    """

    def __init__(
        self, model: ShallowWaterModel, state: torch.Tensor, history: dict, day: torch.Tensor
    ) -> None:
        self.model = model
        self.state = state.clone()
        self.prev = history["prev"].clone()
        self.prev2 = history["prev2"].clone()
        self.day = day.clone()
        self.graph = None

    def _body(self) -> None:
        hist = {"count": 2, "prev": self.prev, "prev2": self.prev2}
        new = self.model.step(self.state, hist, self.day)
        self.prev2.copy_(self.prev)
        self.prev.copy_(hist["prev"])
        self.state.copy_(new)
        self.day.add_(self.model.config.dt / 86400.0)

    def _buffers(self) -> list[torch.Tensor]:
        return [self.state, self.prev, self.prev2, self.day]

    @classmethod
    def try_capture(
        cls, model: ShallowWaterModel, state: torch.Tensor, history: dict, day: torch.Tensor
    ) -> CudaGraphStep | None:
        try:
            self = cls(model, state, history, day)
            saved = [b.clone() for b in self._buffers()]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._body()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._body()
            for b, v in zip(self._buffers(), saved):
                b.copy_(v)
            self.graph = graph
            # the replayed step must equal the eager one
            eager_hist = {"count": 2, "prev": saved[1].clone(), "prev2": saved[2].clone()}
            eager = model.step(saved[0].clone(), eager_hist, saved[3].clone())
            graph.replay()
            torch.cuda.synchronize()
            scale = eager.abs().max().clamp_min(1e-30)
            if not torch.allclose(self.state, eager, rtol=1e-9, atol=1e-12 * float(scale)):
                raise RuntimeError("graph replay differs from the eager step")
            for b, v in zip(self._buffers(), saved):
                b.copy_(v)
            return self
        except Exception as err:  # any capture problem: stay eager
            log.warning("nature run: CUDA graph capture not used (%s); stepping eagerly", err)
            return None

    def step(self) -> torch.Tensor:
        self.graph.replay()
        return self.state

    def history(self) -> dict:
        return {"count": 2, "prev": self.prev, "prev2": self.prev2}


def _check_existing_config(paths: Sequence[Path], config: dict) -> None:
    """Refuse nature-run files that this module wrote with other model settings (e.g. an older forcing)."""
    import xarray as xr

    for path in paths:
        with xr.open_dataset(path) as ds:
            written = ds.attrs.get("config")
        if written is None:  # not written by this module: taken as it is
            continue
        found = json.loads(written).get("config")
        if found is not None and found != json.loads(json.dumps(config)):
            changed = sorted(k for k in set(found) | set(config) if found.get(k) != config.get(k))
            raise ValueError(
                f"nature run: {path} was generated with other settings ({', '.join(changed)} differ: "
                f"{ {k: found.get(k) for k in changed} } there, { {k: config.get(k) for k in changed} } now); "
                "delete it or choose another directory"
            )


def generate_nature_run(
    directory: str | Path,
    years: Sequence[int] = (2001,),
    nlat: int = 64,
    nlon: int = 128,
    days: float = 365.0,
    spinup_days: float = SPINUP_DAYS,
    chunk_days: float = 15.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    config: ShallowWaterConfig | None = None,
    show_progress: bool = True,
) -> list[Path]:
    """Integrate one trajectory per year (in one batch) and write 6-hourly states; resumable.

    Returns the merged netCDF paths, one per year. ``days`` shortens the run (tests, smoke runs).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    years = [int(y) for y in years]
    finals = [nature_run_path(directory, y, nlat, nlon) for y in years]
    cfg = config or default_config(nlat, nlon)
    if (cfg.nlat, cfg.nlon) != (nlat, nlon):
        raise ValueError(f"config: grid {cfg.nlat}x{cfg.nlon} differs from nlat x nlon = {nlat}x{nlon}")
    if all(p.is_file() for p in finals):
        _check_existing_config(finals, asdict(cfg))
        log.info("nature run: %s already exist", ", ".join(p.name for p in finals))
        return finals
    steps_per_output = round(6 * 3600 / cfg.dt)
    if abs(steps_per_output * cfg.dt - 6 * 3600) > 1e-6:
        raise ValueError(f"config.dt: expected a divisor of 6 h, got {cfg.dt} s")
    outputs_total = int(round(days * 4))
    outputs_per_chunk = max(1, int(round(chunk_days * 4)))
    spinup_steps = int(round(spinup_days * 86400 / cfg.dt))
    tag = f"{nlat}x{nlon}_{'-'.join(map(str, years))}_seed{seed}"
    state_file = directory / f"nature_{tag}.state.pt"
    meta = {"config": asdict(cfg), "years": years, "days": days, "spinup_days": spinup_days, "seed": seed}

    model = ShallowWaterModel(cfg, device=device)
    lat_out, lon_out = wb2_latitudes(nlat), wb2_longitudes(nlon)
    tables = model.sh.tables_at(lat_out)
    starts = np.array([np.datetime64(f"{y}-01-01T00:00", "ns") for y in years])

    def day_of_year(step: int) -> torch.Tensor:
        # days since 1 January of each trajectory's year (negative during spin-up)
        days_in = (step - spinup_steps) * cfg.dt / 86400.0
        return torch.full((len(years),), days_in, dtype=torch.float64, device=device)

    if state_file.is_file():
        saved = torch.load(state_file, map_location=device, weights_only=True)
        if json.loads(saved["meta"]) != json.loads(json.dumps(meta)):
            raise ValueError(f"{state_file}: saved for a different run; remove it to start again")
        state, step, written = saved["state"], int(saved["step"]), int(saved["written"])
        history = {"count": int(saved["count"]), "prev": saved["prev"], "prev2": saved["prev2"]}
        log.info("nature run: resuming at output %d of %d", written, outputs_total)
    else:
        state = model.random_state(len(years), day_of_year=-spinup_days % 365.25, seed=seed)
        step, written, history = 0, 0, {}

    total_steps = spinup_steps + outputs_total * steps_per_output
    bar = progress(
        range(total_steps),
        desc="nature run",
        total=total_steps,
        unit="step",
        disable=None if show_progress else True,
    )
    bar_iter = iter(bar)
    for _ in range(step):
        next(bar_iter, None)
    buffer: list[np.ndarray] = []
    graphed: CudaGraphStep | None = None
    while step < total_steps:
        if graphed is None and history.get("count", 0) >= 2 and torch.device(device).type == "cuda":
            graphed = CudaGraphStep.try_capture(model, state, history, day_of_year(step))
        if graphed is not None:
            state = graphed.step()
            history = graphed.history()
        else:
            state = model.step(state, history, day_of_year(step))
        step += 1
        next(bar_iter, None)
        if step > spinup_steps and (step - spinup_steps) % steps_per_output == 0:
            grid = model.to_grid(state, tables).float().cpu().numpy()
            if not np.isfinite(grid).all():
                raise FloatingPointError(f"nature run: non-finite state at step {step}; lower config.dt")
            buffer.append(grid)
            if len(buffer) == outputs_per_chunk or step == total_steps:
                values = np.stack(buffer, axis=1)  # B, n, 3, lat, lon
                for b, year in enumerate(years):
                    times = starts[b] + STEP * np.arange(written, written + values.shape[1])
                    ds = state_dataset(
                        values[b],
                        times,
                        lat_out,
                        lon_out,
                        {"source": "zoo.weather.nature_run", "config": json.dumps(meta)},
                    )
                    write_netcdf(ds, directory / f"nature_{nlat}x{nlon}_{year}.part{written:05d}.nc")
                written += values.shape[1]
                buffer = []
                torch.save(
                    {
                        "meta": json.dumps(meta),
                        "state": state,
                        "step": step,
                        "written": written,
                        "count": history.get("count", 0),
                        "prev": history.get("prev", state),
                        "prev2": history.get("prev2", state),
                    },
                    state_file,
                )
    import xarray as xr

    for year, final in zip(years, finals):
        parts = sorted(directory.glob(f"nature_{nlat}x{nlon}_{year}.part*.nc"))
        merged = xr.concat([xr.load_dataset(p) for p in parts], dim="time")
        write_netcdf(merged, final, compress=True)
        for p in parts:
            p.unlink()
    state_file.unlink(missing_ok=True)
    return finals
