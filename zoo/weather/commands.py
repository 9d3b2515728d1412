"""``zoo assimilate``, ``zoo train weather ...`` and ``zoo eval weather`` (FengWu-Adas, arXiv 2312.12462).

Only argparse is imported here; the work is imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json

# how --forecaster / --init / --adas name weights (zoo.weather.train.resolve_checkpoint)
_WEIGHTS_FORMS = "'shipped' (the shipped OSSE weights of the grid), an arch.tag, or a .safetensors checkpoint with its .json"


def _common(p: argparse.ArgumentParser, out: bool = True) -> None:
    p.add_argument("--data", required=True, help="folder of the nature run (and resumable states)")
    if out:
        p.add_argument("--out", required=True, help="folder for checkpoints and JSON results")
    p.add_argument("--nlat", type=int, default=64)
    p.add_argument("--nlon", type=int, default=128)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def cmd_nature(args: argparse.Namespace) -> int:
    from zoo.weather.train import run_nature

    result = run_nature(args.data, args.nlat, args.nlon, args.days, args.spinup_days, args.device, args.years)
    print(json.dumps(result, indent=1))
    return 0


def cmd_forecaster(args: argparse.Namespace) -> int:
    from zoo.weather.train import train_forecaster

    result = train_forecaster(
        args.data,
        args.out,
        args.arch,
        args.minutes,
        args.max_steps,
        args.batch,
        args.lr,
        args.nlat,
        args.nlon,
        args.device,
        replay_fraction=args.replay_fraction,
    )
    print(json.dumps(result.get("metrics", {}), indent=1))
    return 0


def cmd_adas(args: argparse.Namespace) -> int:
    from zoo.weather.train import train_adas

    result = train_adas(
        args.data,
        args.out,
        args.forecaster,
        args.arch,
        args.minutes,
        args.max_steps,
        args.streams,
        lr=args.lr,
        nlat=args.nlat,
        nlon=args.nlon,
        device=args.device,
        dense_until=args.dense_until,
        fresh_until=args.fresh_until,
        init=args.init,
    )
    print(json.dumps(result, indent=1))
    return 0


def cmd_all(args: argparse.Namespace) -> int:
    from zoo.weather.train import run_all

    result = run_all(
        args.data,
        args.out,
        args.budget_minutes,
        args.nlat,
        args.nlon,
        args.days,
        args.spinup_days,
        args.samples,
        args.cycles,
        args.device,
        args.forecaster_arch,
        args.adas_arch,
        args.batch,
        args.streams,
        eval_minutes=args.eval_minutes,
        forecaster=args.forecaster,
        adas_init=args.adas_init,
        adas_lr=args.adas_lr,
    )
    print(json.dumps({k: result[k] for k in ("minutes", "eval") if k in result}, indent=1)[:4000])
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from zoo.weather.train import evaluate

    result = evaluate(
        args.data,
        args.out,
        args.forecaster,
        args.adas,
        samples=args.samples,
        cycles=args.cycles,
        nlat=args.nlat,
        nlon=args.nlon,
        device=args.device,
        plots=not args.no_plots,
    )
    print(json.dumps(result, indent=1, default=float)[:4000])
    return 0


def cmd_era5(args: argparse.Namespace) -> int:
    from zoo.weather.era5 import era5_real_data_check

    result = era5_real_data_check(fraction=args.fraction, length_scale_km=args.length_scale, seed=args.seed)
    result.pop("analysis")
    print(json.dumps(result, indent=1))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def cmd_assimilate(args: argparse.Namespace) -> int:
    import xarray as xr

    from zoo.weather.api import assimilate

    background = xr.load_dataset(args.background)
    observations = xr.load_dataset(args.observations)
    if args.model == "oi":
        from zoo.weather.grid import StateLayout
        from zoo.weather.oi import OptimalInterpolation

        model = OptimalInterpolation(
            StateLayout.of(background), args.background_error, args.observation_error, args.length_scale
        )
    else:
        model = args.model
    analysis = assimilate(background, observations, model=model, device=args.device or "cpu")
    from zoo.weather.io import write_netcdf

    write_netcdf(analysis, args.out)
    print(f"analysis written to {args.out}")
    return 0


def register(top: argparse._SubParsersAction, groups: dict) -> None:
    p = top.add_parser("assimilate", help="analysis = assimilate(background, observations) on netCDF files")
    p.add_argument("--background", required=True, help="netCDF background (WeatherBench2 names and dims)")
    p.add_argument(
        "--observations",
        required=True,
        help="netCDF observations: gridded (NaN = missing) or points (dim obs)",
    )
    p.add_argument("--model", default=None, help="Adas checkpoint (.safetensors + .json), arch.tag, or 'oi'")
    p.add_argument("--out", required=True, help="netCDF analysis to write")
    p.add_argument("--device", default=None)
    p.add_argument("--background-error", type=float, default=1.0, help="OI: background error std")
    p.add_argument("--observation-error", type=float, default=0.1, help="OI: observation error std")
    p.add_argument("--length-scale", type=float, default=500.0, help="OI: correlation length (km)")
    p.set_defaults(func=cmd_assimilate)

    train = groups["train"].add_parser("weather", help="OSSE: nature run, forecaster, Adas, all in one")
    sub = train.add_subparsers(dest="stage", metavar="STAGE")
    train.set_defaults(func=lambda a: (train.print_help(), 2)[1])

    p = sub.add_parser("nature", help="generate the shallow-water nature run (resumable)")
    _common(p, out=False)
    p.add_argument("--days", type=float, default=365.0)
    p.add_argument("--spinup-days", type=float, default=180.0)
    p.add_argument("--years", type=int, nargs="+", default=[2001, 2002, 2003, 2004])
    p.set_defaults(func=cmd_nature)

    p = sub.add_parser("forecaster", help="train the FengWu-style 6-h forecaster")
    _common(p)
    p.add_argument("--arch", default="fengwu_lite_osse_64x128")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--replay-fraction",
        type=float,
        default=0.5,
        help="share of each batch from the replay buffer of the model's own forecasts, from 30%% of the "
        "budget on; 0 turns it off (default: %(default)s)",
    )
    p.set_defaults(func=cmd_forecaster)

    p = sub.add_parser("adas", help="train Adas on backgrounds from the forecaster's cycling")
    _common(p)
    p.add_argument(
        "--forecaster",
        default=None,
        help=f"forecaster: {_WEIGHTS_FORMS} (default: OUT/forecaster.safetensors)",
    )
    p.add_argument(
        "--init",
        default=None,
        help=f"start Adas from these weights instead of a fresh model: {_WEIGHTS_FORMS}; "
        "a saved training state in OUT still wins",
    )
    p.add_argument("--arch", default="adas_osse_64x128")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, default=20000)
    p.add_argument("--streams", type=int, default=8, help="parallel cycling streams (the batch)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument(
        "--dense-until",
        type=float,
        default=0.7,
        help="share of the run until which 10%% observations dominate (default: %(default)s)",
    )
    p.add_argument(
        "--fresh-until",
        type=float,
        default=0.7,
        help="share of the run during which every stream restarts from the truth each cycle (default: %(default)s)",
    )
    p.set_defaults(func=cmd_adas)

    p = sub.add_parser("all", help="nature run, forecaster, Adas and evaluation in one budget")
    _common(p)
    p.add_argument("--budget-minutes", type=float, default=8.0)
    p.add_argument("--days", type=float, default=365.0)
    p.add_argument("--spinup-days", type=float, default=180.0)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--cycles", type=int, default=240)
    p.add_argument("--forecaster-arch", default="fengwu_lite_osse_64x128")
    p.add_argument("--adas-arch", default="adas_osse_64x128")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument(
        "--forecaster",
        default=None,
        help=f"use this forecaster instead of training one: {_WEIGHTS_FORMS} (scored, copied to OUT)",
    )
    p.add_argument("--adas-init", default=None, help=f"start Adas from these weights: {_WEIGHTS_FORMS}")
    p.add_argument(
        "--adas-lr", type=float, default=2e-3, help="Adas peak learning rate (default: %(default)s)"
    )
    p.add_argument(
        "--eval-minutes",
        type=float,
        default=None,
        help="minutes kept back for the evaluation (default: an H200 estimate from --cycles)",
    )
    p.set_defaults(func=cmd_all)

    p = groups["eval"].add_parser(
        "weather", help="background vs OI vs Adas on the held-out year, and cycling"
    )
    _common(p)
    p.add_argument(
        "--forecaster", default=None, help=f"{_WEIGHTS_FORMS} (default: OUT/forecaster.safetensors)"
    )
    p.add_argument("--adas", default=None, help=f"{_WEIGHTS_FORMS} (default: OUT/adas.safetensors)")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--cycles", type=int, default=240, help="cycles of the held-out year (1460 = a year)")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = groups["eval"].add_parser(
        "era5", help="real data: assimilate one ERA5 ensemble member into another (OI)"
    )
    p.add_argument("--fraction", type=float, default=0.25, help="fraction of grid values observed")
    p.add_argument("--length-scale", type=float, default=250.0, help="OI correlation length (km)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON file for the results")
    p.set_defaults(func=cmd_era5)


def demo(args: argparse.Namespace) -> None:
    """A small OSSE case: a 32x64 nature run, 10% observations, OI analysis against the background."""
    from zoo.weather import metrics, osse
    from zoo.weather.oi import OptimalInterpolation

    case = osse.sample(obs_fraction=0.1, grid=(32, 64), days=3.0, spinup_days=20.0)
    oi = OptimalInterpolation(
        case["layout"],
        {"geopotential": 400.0, "u_component_of_wind": 4.0, "v_component_of_wind": 4.0},
        osse.OBSERVATION_ERROR_STD,
        700.0,
    )
    analysis = oi(case["background"], case["observations"])
    bg = metrics.rmse(case["background"], case["truth"])
    an = metrics.rmse(analysis, case["truth"])
    for v in case["layout"].variables:
        print(
            f"{v:22s} RMSE background {float(bg[v].values.ravel()[0]):9.3f}  OI analysis {float(an[v].values.ravel()[0]):9.3f}"
        )
