"""FengWu's replay buffer and the forecaster training that uses it."""

from __future__ import annotations

import json

import pytest
import torch

from zoo.weather.nature_run import generate_nature_run
from zoo.weather.train import ReplayBuffer, train_forecaster


def pair(value: float) -> torch.Tensor:
    return torch.full((1, 2, 3, 4, 8), float(value))


def test_replay_buffer_keeps_leads_in_bounds_and_overwrites_oldest_first():
    buffer = ReplayBuffer(
        capacity=3, max_lead=2, year_lengths=[10, 10, 10], generator=torch.Generator().manual_seed(0)
    )
    # one push of four: beyond max_lead and without a truth after t = 9 are dropped
    buffer.push(torch.cat([pair(1), pair(2), pair(3), pair(4)]), [(0, 5, 1), (0, 6, 2), (1, 7, 3), (1, 9, 1)])
    assert len(buffer) == 2 and buffer.keys == [(0, 5, 1), (0, 6, 2)]
    buffer.push(torch.cat([pair(5), pair(6)]), [(2, 3, 1), (2, 4, 1)])  # full: the second replaces the oldest
    assert buffer.keys == [(2, 4, 1), (0, 6, 2), (2, 3, 1)]
    assert [float(buffer.pairs[i, 0, 0, 0, 0]) for i in range(3)] == [6.0, 2.0, 5.0]
    pairs, keys = buffer.sample(5)
    assert pairs.shape == (5, 2, 3, 4, 8)
    for p, key in zip(pairs, keys):  # each sampled pair travels with its own key
        assert float(p[0, 0, 0, 0]) == {(2, 4, 1): 6.0, (0, 6, 2): 2.0, (2, 3, 1): 5.0}[key]
    stored = pair(7).requires_grad_()
    buffer.push(stored * 2, [(0, 1, 1)])
    assert not buffer.pairs.requires_grad  # no graph kept alive between steps
    with pytest.raises(ValueError, match="replay_capacity"):
        ReplayBuffer(0, 2, [10], torch.Generator())


def test_forecaster_trains_on_its_own_forecasts(tmp_path, monkeypatch):
    generate_nature_run(
        tmp_path,
        years=(2001, 2002, 2003, 2004),
        nlat=16,
        nlon=32,
        days=3.0,
        spinup_days=1.0,
        show_progress=False,
    )
    pushed, sampled = [], []
    original_push, original_sample = ReplayBuffer.push, ReplayBuffer.sample

    def push(self, pairs, keys):
        pushed.extend(keys)
        return original_push(self, pairs, keys)

    def sample(self, n):
        out = original_sample(self, n)
        sampled.append(out[1])
        return out

    monkeypatch.setattr(ReplayBuffer, "push", push)
    monkeypatch.setattr(ReplayBuffer, "sample", sample)
    result = train_forecaster(
        tmp_path, tmp_path / "out", "fengwu_lite_tiny", minutes=5, max_steps=8, batch=4, nlat=16, nlon=32,
        device="cpu", replay_fraction=0.5, replay_start=0.0, replay_max_lead=3,
    )  # fmt: skip
    assert result["steps"] == 8 and result["replay"]["fraction"] == 0.5
    assert sampled and all(len(keys) == 2 for keys in sampled)  # half of each batch once the buffer fills
    assert max(lead for _, _, lead in pushed) >= 2  # forecasts of forecasts went back in
    metrics = json.loads((tmp_path / "out" / "forecaster.json").read_text())["metrics"]
    assert set(metrics) >= {"rmse_6h", "rmse_persistence", "rmse_year_mean"}
    with pytest.raises(ValueError, match="replay_fraction"):
        train_forecaster(
            tmp_path, tmp_path / "bad", "fengwu_lite_tiny", nlat=16, nlon=32, replay_fraction=1.0
        )
