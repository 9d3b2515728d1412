"""Kernel-level profile of one Adas assimilation (bf16 autocast, batch 1): ours vs the upstream-style computation.

Three assimilations of each under ``torch.profiler`` on a CUDA GPU, the same random weights as
``bench/weather.py``; writes ``--out/weather_adas_profile_{ours,upstream_style}_<size>.txt``
(operators by GPU time, then grouped by input shape).

    python bench/weather_profile.py --size large --out bench/results
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.weather import CONFIGS  # noqa: E402
from zoo.weather import create_model  # noqa: E402
from zoo.weather.adas_reference import adas_reference_forward, random_official_state  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="large", choices=sorted(CONFIGS))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/weather_profile.py: needs a CUDA GPU")
    device = torch.device("cuda")
    arch, cfg = CONFIGS[args.size]
    state = random_official_state(cfg, seed=0, std=0.02)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adas.pth"
        torch.save(state, path)
        model = create_model(arch, checkpoint=str(path)).to(device).eval()
    ref_state = {k: v.to(device) for k, v in state.items()}
    channels = 4 + 5 * cfg.levels
    background = torch.randn(1, channels, *cfg.grid, device=device)
    mask = (torch.rand(1, channels, *cfg.grid, device=device) < 0.1).float()
    observation = torch.randn(1, channels, *cfg.grid, device=device) * mask

    def ours():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return model(background, observation, mask)

    def upstream_style():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return adas_reference_forward(ref_state, background, observation, mask, cfg)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fn in (("ours", ours), ("upstream_style", upstream_style)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
        by_op = prof.key_averages().table(
            sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70
        )
        by_shape = prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cuda_time_total",
            row_limit=40,
            max_name_column_width=50,
            max_shapes_column_width=120,
        )
        target = out / f"weather_adas_profile_{name}_{args.size}.txt"
        target.write_text(
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}\n"
            + by_op
            + "\n\nby input shape\n"
            + by_shape
        )
        print("written", target)


if __name__ == "__main__":
    main()
