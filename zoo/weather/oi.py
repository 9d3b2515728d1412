"""Optimal interpolation (= 3D-Var with a linear observation operator), the classical baseline for Adas.

3D-Var minimises ``J(x) = 1/2 (x - x_b)^T B^-1 (x - x_b) + 1/2 (H x - y)^T R^-1 (H x - y)``;
for a linear ``H`` (here: picking grid values) the minimiser is the optimal-interpolation
analysis (Gandin 1963; Lorenc 1986, "Analysis methods for numerical weather prediction")

    x_a = x_b + B H^T (H B H^T + R)^-1 (y - H x_b),

computed channel by channel with ``B = sigma_b^2 C``, ``C_ij = exp(-d_ij^2 / (2 L^2))`` (great-
circle distance ``d``, length scale ``L``) and ``R = sigma_o^2 I``. Only the observed points
enter the ``n_obs x n_obs`` solve, so 10% of a 64x128 grid (819 points a channel) is cheap;
``max_obs`` guards against dense global networks that would need a localised solver.
:meth:`OptimalInterpolation.fit` sets ``sigma_b`` from background errors and picks ``L``
from candidates on training pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from zoo.weather.grid import StateLayout, check_state
from zoo.weather.observations import grid_observations

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["OptimalInterpolation", "gaussian_correlation", "great_circle_km"]

EARTH_RADIUS_KM = 6371.0


def great_circle_km(
    lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor
) -> torch.Tensor:
    """Pairwise great-circle distance (km) between two sets of points in degrees: ``(n1, n2)``."""
    p1, p2 = torch.deg2rad(lat1)[:, None], torch.deg2rad(lat2)[None, :]
    dl = torch.deg2rad(lon1)[:, None] - torch.deg2rad(lon2)[None, :]
    cos = torch.sin(p1) * torch.sin(p2) + torch.cos(p1) * torch.cos(p2) * torch.cos(dl)
    return EARTH_RADIUS_KM * torch.arccos(cos.clamp(-1.0, 1.0))


def gaussian_correlation(distance_km: torch.Tensor, length_scale_km: float) -> torch.Tensor:
    return torch.exp(-0.5 * (distance_km / length_scale_km) ** 2)


class OptimalInterpolation:
    """OI / 3D-Var analysis with a Gaussian-correlation background covariance.

    Parameters
    ----------
    layout: the state layout (variables, levels, grid).
    background_error_std: per channel (list in layout order), per variable (dict) or one number, in data units.
    observation_error_std: same forms.
    length_scale_km: correlation length ``L``.
    max_obs: largest number of observations of one channel solved densely.
    """

    def __init__(
        self,
        layout: StateLayout,
        background_error_std: float | dict[str, float] | Sequence[float] = 1.0,
        observation_error_std: float | dict[str, float] | Sequence[float] = 0.1,
        length_scale_km: float = 500.0,
        max_obs: int = 8000,
    ) -> None:
        if not length_scale_km > 0:
            raise ValueError(f"length_scale_km: expected > 0, got {length_scale_km}")
        self.layout = layout
        self.sigma_b = self._per_channel(background_error_std, "background_error_std")
        self.sigma_o = self._per_channel(observation_error_std, "observation_error_std")
        self.length_scale_km = float(length_scale_km)
        self.max_obs = int(max_obs)

    def _per_channel(self, value: Any, name: str) -> list[float]:
        names = self.layout.channel_names()
        if isinstance(value, dict):
            out = []
            for ch in names:
                var = ch.split("/")[0]
                if ch in value:
                    out.append(float(value[ch]))
                elif var in value:
                    out.append(float(value[var]))
                else:
                    raise ValueError(
                        f"{name}: no value for channel {ch!r} (give it per variable or per channel)"
                    )
        elif np.ndim(value) == 0:
            out = [float(value)] * len(names)
        else:
            out = [float(v) for v in value]
            if len(out) != len(names):
                raise ValueError(f"{name}: expected {len(names)} channel values, got {len(out)}")
        if any(not v >= 0 for v in out):
            raise ValueError(f"{name}: expected non-negative values, got {out}")
        return out

    def analyse_tensor(
        self,
        background: torch.Tensor,
        observation: torch.Tensor,
        mask: torch.Tensor,
        latitude: Sequence[float],
        longitude: Sequence[float],
    ) -> torch.Tensor:
        """``(C, H, W)`` background, observations and 0/1 mask (data units) -> analysis ``(C, H, W)``.

        Computed in float64 on the background's device.
        """
        C, H, W = background.shape
        device = background.device
        observation, mask = observation.to(device), mask.to(device)
        lat = torch.tensor(np.array(latitude, dtype=float), dtype=torch.float64, device=device)
        lon = torch.tensor(np.array(longitude, dtype=float), dtype=torch.float64, device=device)
        glat = lat[:, None].expand(H, W).reshape(-1)
        glon = lon[None, :].expand(H, W).reshape(-1)
        out = background.double().clone()
        for c in range(C):
            where = mask[c].reshape(-1) > 0
            n = int(where.sum())
            if n == 0 or self.sigma_b[c] == 0:
                continue
            if n > self.max_obs:
                raise ValueError(
                    f"observations: {n} in channel {c} exceed max_obs={self.max_obs} for a dense OI solve"
                )
            olat, olon = glat[where], glon[where]
            corr_oo = gaussian_correlation(great_circle_km(olat, olon, olat, olon), self.length_scale_km)
            corr_go = gaussian_correlation(great_circle_km(glat, glon, olat, olon), self.length_scale_km)
            ratio = (self.sigma_o[c] / self.sigma_b[c]) ** 2
            innovation = observation[c].reshape(-1)[where].double() - out[c].reshape(-1)[where]
            system = corr_oo + max(ratio, 1e-6) * torch.eye(
                n, dtype=torch.float64, device=device
            )  # floor keeps near-duplicate points solvable
            weights = torch.linalg.solve(system, innovation)
            out[c] += (corr_go @ weights).view(H, W)
        return out.to(background.dtype)

    def __call__(self, background: xr.Dataset, observations: Any) -> xr.Dataset:
        """Analysis on the background's grid (latitude order, coords and attrs kept)."""
        original = background
        background = check_state(background, self.layout, "background")
        flipped = not np.array_equal(original["latitude"].values, background["latitude"].values)
        gridded = grid_observations(observations, background, self.layout)
        bg = self.layout.to_tensor(background, dtype=torch.float64)
        obs, mask = gridded.tensors(self.layout, dtype=torch.float64)
        lat, lon = background["latitude"].values, background["longitude"].values
        analysis = torch.stack(
            [self.analyse_tensor(bg[t], obs[t], mask[t], lat, lon) for t in range(bg.shape[0])]
        )
        out = self.layout.from_tensor(analysis, background)
        if flipped:
            out = out.sortby("latitude", ascending=False)
        return out

    def fit(
        self,
        backgrounds: torch.Tensor,
        truths: torch.Tensor,
        latitude: Sequence[float],
        longitude: Sequence[float],
        fraction: float = 0.01,
        candidates_km: Sequence[float] = (250.0, 500.0, 750.0, 1000.0, 1500.0),
        samples: int = 4,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Set ``sigma_b`` per channel from ``(N, C, H, W)`` background errors; choose ``L`` by analysis error."""
        err = (backgrounds - truths).double()
        self.sigma_b = err.transpose(0, 1).reshape(err.shape[1], -1).std(1).clamp_min(1e-12).tolist()
        gen = torch.Generator().manual_seed(seed)
        scores = {}
        for length in candidates_km:
            self.length_scale_km = float(length)
            total = 0.0
            for i in range(min(samples, backgrounds.shape[0])):
                mask = (torch.rand(truths[i].shape, generator=gen) < fraction).double()
                noise = torch.randn(truths[i].shape, generator=gen, dtype=torch.float64) * torch.tensor(
                    self.sigma_o
                ).view(-1, 1, 1)
                ana = self.analyse_tensor(
                    backgrounds[i].double(), (truths[i] + noise) * mask, mask, latitude, longitude
                )
                total += float((((ana - truths[i]) / torch.tensor(self.sigma_b).view(-1, 1, 1)) ** 2).mean())
            scores[float(length)] = total
        self.length_scale_km = min(scores, key=scores.get)
        return {"sigma_b": self.sigma_b, "length_scale_km": self.length_scale_km, "scores": scores}
