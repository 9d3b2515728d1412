"""How much of the shipped Adas's error reduction comes without any observation.

FengWu-Adas (arXiv 2312.12462) analyses a background with observations. Trained on its own
forecaster's backgrounds, it can also learn to correct that forecaster's systematic errors; this
script separates the two on cases of the held-out OSSE year (``zoo.weather.osse.sample``: the
shipped forecaster's 6-h background, observations with Gaussian errors): for each case the
analysis with the sampled observations and with every observation missing (NaN), as
area-weighted RMSE over the background's (z, u, v at 500 hPa).

    python bench/weather_no_obs.py --out bench/results          # ~5 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIABLES = ("geopotential", "u_component_of_wind", "v_component_of_wind")


def rmse_by_variable(state, truth) -> dict[str, float]:
    from zoo.weather.metrics import rmse

    out = rmse(state[list(VARIABLES)], truth[list(VARIABLES)])
    return {v: float(out[v].values.squeeze()) for v in VARIABLES}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--time-indices", type=int, nargs="+", default=[3, 6, 8, 11, 14])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.001])
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)

    import zoo.weather as zw
    from zoo.weather import osse

    started = time.perf_counter()
    rows, no_obs = [], {}
    for time_index in args.time_indices:
        for fraction in args.fractions:
            for seed in args.seeds:
                case = osse.sample(obs_fraction=fraction, seed=seed, time_index=time_index)
                truth, background, observations = case["truth"], case["background"], case["observations"]
                background_rmse = rmse_by_variable(background, truth)
                analysis_rmse = rmse_by_variable(zw.assimilate(background, observations), truth)
                row = dict(
                    time_index=time_index,
                    obs_fraction=fraction,
                    seed=seed,
                    observed={v: int(np.isfinite(observations[v].values).sum()) for v in VARIABLES},
                    ratio={v: analysis_rmse[v] / background_rmse[v] for v in VARIABLES},
                )
                if time_index not in no_obs:  # one case per time: the background does not depend on the seed
                    missing = observations.copy(deep=True)
                    for v in missing.data_vars:
                        missing[v] = missing[v] * np.nan
                    blind = rmse_by_variable(zw.assimilate(background, missing), truth)
                    no_obs[time_index] = {v: blind[v] / background_rmse[v] for v in VARIABLES}
                rows.append(row)
                print(json.dumps(row), flush=True)

    def pooled(ratios: list[dict[str, float]]) -> dict[str, float]:
        return {v: round(float(np.mean([r[v] for r in ratios])), 4) for v in VARIABLES}

    summary = {
        f"{f * 100:g}% obs": pooled([r["ratio"] for r in rows if r["obs_fraction"] == f])
        for f in args.fractions
    }
    summary["no obs"] = pooled(list(no_obs.values()))
    result = dict(
        benchmark="weather_no_obs",
        command="python bench/weather_no_obs.py " + " ".join(sys.argv[1:] if argv is None else argv),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device="cpu",
        model="adas_osse_64x128.osse (zoo.weather.assimilate's default)",
        cases="zoo.weather.osse.sample: held-out year, shipped forecaster's 6-h background",
        metric="area-weighted RMSE of the analysis over the background's, 500 hPa",
        summary=summary,
        no_obs_by_time={str(k): v for k, v in no_obs.items()},
        rows=rows,
        seconds=round(time.perf_counter() - started, 1),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "weather_adas_no_obs_cpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
