"""Batched spectral shallow-water model on the sphere: the OSSE's nature run.

The rotating shallow-water equations in vorticity-divergence form (Williamson et al. 1992,
"A standard test set for numerical approximations to the shallow water equations in
spherical geometry"; the spectral transform method of Orszag 1970 / Eliasen et al. 1970),
as in torch-harmonics' ``ShallowWaterSolver`` (Bonev et al., "Spherical Fourier Neural
Operators", arXiv 2306.03838), but batched over independent trajectories and with no
dependency beyond PyTorch:

    d zeta/dt = -div((zeta + f) u) - zeta / tau_drag
    d delta/dt = curl((zeta + f) u) - lap(Phi + |u|^2 / 2) - delta / tau_drag
    d Phi/dt  = -div(Phi u) - ([Phi] - Phi_eq(lat, day of year)) / tau_relax   ([.]: zonal mean)

Spherical harmonics are orthonormal (``int |Y_lm|^2 dOmega = 1``, no Condon-Shortley phase)
on a Gauss-Legendre grid, triangular truncation (T42 on 64 x 128 by default). Winds come
from vorticity/divergence through the streamfunction and velocity potential; vorticity and
divergence of a vector field are computed by quadrature after integration by parts, so no
pole singularity is met. Time stepping is third-order Adams-Bashforth with an implicit
``del^8`` hyperdiffusion factor, as in torch-harmonics' example.

The forcing (relaxation of the zonal-mean ``Phi`` to a two-jet profile whose jets move with the season,
in 6 hours, and a weak linear drag) keeps the barotropically unstable jets shedding eddies for
years, so the nature run has a stationary climate and a seasonal cycle rather than decaying
turbulence: at 64 x 128, from about day 120 on, the 6-hourly geopotential changes by ~1.3e3
m^2/s^2 RMS, the eddy wind is ~16 m/s RMS and the jets peak near 60 m/s, month after month.
(A weaker forcing, 3-day relaxation with 20-day drag and 1000 m jets, lets the eddies die out
within half a year and leaves a steady flow that climatology predicts almost exactly.)
States are read out on any latitudes (WeatherBench2's equiangular grid by default) exactly,
by evaluating the spectral expansion there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ShallowWaterConfig", "ShallowWaterModel", "SphericalHarmonics", "wb2_latitudes", "wb2_longitudes"]

EARTH_RADIUS = 6.37122e6
OMEGA = 7.292e-5
GRAVITY = 9.80616


def wb2_latitudes(nlat: int) -> np.ndarray:
    """WeatherBench2's equiangular latitudes without poles, ascending (64 -> +-87.1875)."""
    step = 180.0 / nlat
    return -90.0 + step / 2 + step * np.arange(nlat)


def wb2_longitudes(nlon: int) -> np.ndarray:
    return 360.0 / nlon * np.arange(nlon)


def _legendre_tables(x: np.ndarray, lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal associated Legendre functions ``P[m, l, j]`` (l < lmax, m <= l) and ``dP/dphi`` at ``x = sin(lat)``."""
    nj = x.size
    cos = np.sqrt(1.0 - x**2)
    P = np.zeros((lmax, lmax + 1, nj))
    for m in range(lmax):
        if m == 0:
            pmm = np.full(nj, np.sqrt(1.0 / (4 * np.pi)))
        else:
            pmm = np.sqrt((2 * m + 1) / (2 * m)) * cos * P[m - 1, m - 1]
        P[m, m] = pmm
        if m + 1 <= lmax:
            P[m, m + 1] = np.sqrt(2 * m + 3) * x * pmm
        for ell in range(m + 2, lmax + 1):
            a = np.sqrt((4 * ell**2 - 1) / (ell**2 - m**2))
            b = np.sqrt(((ell - 1) ** 2 - m**2) / (4 * (ell - 1) ** 2 - 1))
            P[m, ell] = a * (x * P[m, ell - 1] - b * P[m, ell - 2])
    dP = np.zeros((lmax, lmax, nj))
    for m in range(lmax):
        for ell in range(m, lmax):
            c = np.sqrt((2 * ell + 1) * (ell**2 - m**2) / (2 * ell - 1)) if ell > m else 0.0
            prev = P[m, ell - 1] if ell >= 1 else 0.0
            dP[m, ell] = (-ell * x * P[m, ell] + c * prev) / cos
    return P[:, :lmax], dP


class SphericalHarmonics:
    """Scalar and vector spherical-harmonic transforms on a Gauss-Legendre grid (latitude ascending).

    Coefficients are complex ``(..., lmax, mmax)`` with ``mmax = lmax``; entries with ``m > l`` stay 0.
    """

    def __init__(
        self, nlat: int, nlon: int, lmax: int | None = None, device=None, dtype=torch.float64
    ) -> None:
        self.nlat, self.nlon = nlat, nlon
        self.lmax = lmax or nlat
        if self.lmax > nlon // 2:
            raise ValueError(f"lmax: expected <= nlon // 2 = {nlon // 2}, got {self.lmax}")
        x, w = np.polynomial.legendre.leggauss(nlat)
        self.latitude = np.rad2deg(np.arcsin(x))
        self.longitude = wb2_longitudes(nlon)
        self.device, self.dtype = device, dtype
        P, dP = _legendre_tables(x, self.lmax)
        cos = np.sqrt(1 - x**2)
        m = np.arange(self.lmax)[:, None, None]
        as_t = lambda a: torch.as_tensor(a, dtype=dtype, device=device)
        self.P = as_t(P)  # (m, l, j)
        self.dP = as_t(dP)
        self.mP_over_cos = as_t(m * P / cos)
        # quadrature-weighted tables for analysis, stored (m, j, l) so each transform is one bmm
        as_mjl = lambda a: as_t(np.ascontiguousarray(np.swapaxes(a, 1, 2))).transpose(1, 2)
        self.weighted_P = as_mjl(2 * np.pi * w * P)
        self.weighted_dP = as_mjl(2 * np.pi * w * dP)
        self.weighted_mP_over_cos = as_mjl(2 * np.pi * w * m * P / cos)
        ell = torch.arange(self.lmax, dtype=dtype, device=device)
        self.laplacian = (
            (-ell * (ell + 1) / EARTH_RADIUS**2)[:, None].expand(self.lmax, self.lmax).contiguous()
        )
        inv = -(EARTH_RADIUS**2) / (ell * (ell + 1)).clamp_min(1)
        inv[0] = 0
        self.inverse_laplacian = inv[:, None].expand(self.lmax, self.lmax).contiguous()
        self.sin_lat = as_t(x)

    def tables_at(self, latitude_deg: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``P``, ``dP/dphi`` and ``m P / cos`` at other latitudes (for output grids)."""
        x = np.sin(np.deg2rad(np.asarray(latitude_deg, float)))
        P, dP = _legendre_tables(x, self.lmax)
        m = np.arange(self.lmax)[:, None, None]
        as_t = lambda a: torch.as_tensor(a, dtype=self.dtype, device=self.device)
        return as_t(P), as_t(dP), as_t(m * P / np.sqrt(1 - x**2))

    # ------------------------------------------------------------ transforms

    def _fourier(self, f: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(f, dim=-1, norm="forward")[..., : self.lmax]  # (..., j, m)

    def _synth(self, F: torch.Tensor) -> torch.Tensor:
        pad = self.nlon // 2 + 1 - F.shape[-1]
        F = torch.nn.functional.pad(F, (0, pad))
        return torch.fft.irfft(F, n=self.nlon, dim=-1, norm="forward")

    @staticmethod
    def _contract(X: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``out[..., b, m] = sum_a X[..., a, m] table[m, a, b]`` for complex ``X`` and a real table, as one bmm."""
        lead, (a, m) = X.shape[:-2], X.shape[-2:]
        b = table.shape[-1]
        parts = torch.view_as_real(X).reshape(-1, a, m, 2).permute(2, 0, 3, 1).reshape(m, -1, a)
        out = torch.bmm(parts, table).reshape(m, -1, 2, b).permute(1, 3, 0, 2)
        return torch.view_as_complex(out.contiguous()).reshape(*lead, b, m)

    def _project(self, F: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``sum_j F[..., j, m] table[m, l, j]`` -> ``(..., l, m)``."""
        return self._contract(F, table.transpose(1, 2))

    def _expand(self, a: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """``sum_l a[..., l, m] table[m, l, j]`` -> ``(..., j, m)``."""
        return self._contract(a, table)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Grid ``(..., nlat, nlon)`` -> coefficients ``(..., lmax, mmax)``."""
        return self._project(self._fourier(f), self.weighted_P)

    def inverse(self, a: torch.Tensor, tables=None) -> torch.Tensor:
        P = self.P if tables is None else tables[0]
        return self._synth(self._expand(a, P))

    def vorticity_divergence(self, u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Spectral vorticity and divergence of the wind ``(u, v)`` (eastward, northward) on the grid."""
        U, V = self._fourier(u), self._fourier(v)
        iU, iV = U * 1j, V * 1j
        vort = self._project(iV, self.weighted_mP_over_cos) + self._project(U, self.weighted_dP)
        div = self._project(iU, self.weighted_mP_over_cos) - self._project(V, self.weighted_dP)
        return vort / EARTH_RADIUS, div / EARTH_RADIUS

    def wind(self, vort: torch.Tensor, div: torch.Tensor, tables=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Eastward and northward wind on the grid from spectral vorticity and divergence."""
        P, dP, mP = (self.P, self.dP, self.mP_over_cos) if tables is None else tables
        psi = vort * self.inverse_laplacian
        chi = div * self.inverse_laplacian
        u = -self._expand(psi, dP) + self._expand(chi * 1j, mP)
        v = self._expand(psi * 1j, mP) + self._expand(chi, dP)
        return self._synth(u) / EARTH_RADIUS, self._synth(v) / EARTH_RADIUS


@dataclass
class ShallowWaterConfig:
    nlat: int = 64
    nlon: int = 128
    lmax: int | None = None  # default: quadratic-grid truncation (T42 on 64 latitudes)
    dt: float = 450.0  # seconds
    mean_depth: float = 5600.0  # m: geopotential ~ 5.5e4 m^2/s^2, like 500 hPa
    jet_drop: float = 1500.0  # m of depth lost across each jet
    jet_latitude: float = 45.0
    jet_seasonal_shift: float = 6.0  # degrees poleward in summer
    jet_width: float = 5.0  # degrees
    relax_days: float = 0.25
    drag_days: float = 200.0
    hyperdiffusion_hours: float = 2.0  # e-folding time of the smallest scale
    hyperdiffuse_geopotential: bool = True
    semi_implicit: bool = True  # gravity-wave terms by Crank-Nicolson (larger dt); False: fully explicit

    def resolved_lmax(self) -> int:
        return self.lmax or (2 * self.nlat) // 3 + 1


class ShallowWaterModel:
    """Batched forced shallow water; the state is spectral ``(B, 3, lmax, mmax)``: geopotential, vorticity, divergence."""

    def __init__(self, config: ShallowWaterConfig | None = None, device=None, forcing: bool = True) -> None:
        self.config = cfg = config or ShallowWaterConfig()
        self.sh = SphericalHarmonics(cfg.nlat, cfg.nlon, cfg.resolved_lmax(), device=device)
        self.device = device
        self.forcing = forcing
        sh = self.sh
        lat = torch.as_tensor(np.deg2rad(sh.latitude), dtype=torch.float64, device=device)
        self.coriolis = (2 * OMEGA * torch.sin(lat))[:, None]
        self.latitude_deg = torch.rad2deg(lat)
        lap = sh.laplacian
        factor = (-cfg.dt / (cfg.hyperdiffusion_hours * 3600.0)) * (lap / lap[-1, 0]) ** 4
        self.hyperdiffusion = torch.exp(factor)
        self.triangular = torch.tril(torch.ones(sh.lmax, sh.lmax, dtype=torch.bool, device=device))

    # ------------------------------------------------------------ forcing and tendencies

    def equilibrium_geopotential(self, day_of_year: torch.Tensor) -> torch.Tensor:
        """``Phi_eq(lat)`` for each trajectory's day of year ``(B,)``: high between two seasonal jets."""
        cfg = self.config
        lat = self.latitude_deg[None, :]
        season = torch.sin(
            2 * math.pi * (day_of_year.double()[:, None] - 80.0) / 365.25
        )  # + in northern summer
        north = cfg.jet_latitude + cfg.jet_seasonal_shift * season
        south = cfg.jet_latitude - cfg.jet_seasonal_shift * season
        shape = 0.5 * (torch.tanh((lat + south) / cfg.jet_width) - torch.tanh((lat - north) / cfg.jet_width))
        depth = cfg.mean_depth - cfg.jet_drop / 2 + cfg.jet_drop * shape
        return (GRAVITY * depth)[..., None].expand(-1, -1, cfg.nlon)

    def tendency(self, state: torch.Tensor, phi_eq_spec: torch.Tensor | None) -> torch.Tensor:
        sh = self.sh
        phi_s, vort_s, div_s = state[:, 0], state[:, 1], state[:, 2]
        phi = sh.inverse(phi_s)
        abs_vort = sh.inverse(vort_s) + self.coriolis
        u, v = sh.wind(vort_s, div_s)
        curl_flux, div_flux = sh.vorticity_divergence(u * abs_vort, v * abs_vort)
        _, div_mass = sh.vorticity_divergence(u * phi, v * phi)
        energy = sh.forward(phi + 0.5 * (u**2 + v**2))
        d_vort = -div_flux
        d_div = curl_flux - sh.laplacian * energy
        d_phi = -div_mass
        if self.forcing and phi_eq_spec is not None:
            cfg = self.config
            # only the zonal mean (m = 0) is relaxed, so the jets' eddies grow freely
            relax = (phi_s[..., :1] - phi_eq_spec[..., :1]) / (cfg.relax_days * 86400.0)
            d_phi = d_phi - torch.nn.functional.pad(relax, (0, phi_s.shape[-1] - 1))
            d_vort = d_vort - vort_s / (cfg.drag_days * 86400.0)
            d_div = d_div - div_s / (cfg.drag_days * 86400.0)
        if self.config.semi_implicit:
            # the linear gravity-wave terms are integrated implicitly in step()
            mean_phi = GRAVITY * self.config.mean_depth
            d_phi = d_phi + mean_phi * div_s
            d_div = d_div + sh.laplacian * phi_s
        out = torch.stack([d_phi, d_vort, d_div], dim=1)
        return out * self.triangular

    def step(self, state: torch.Tensor, history: dict, day_of_year: torch.Tensor) -> torch.Tensor:
        """One Adams-Bashforth-3 step (Euler, then a two-level start, as torch-harmonics); ``history`` is updated in place."""
        cfg = self.config
        phi_eq = self.sh.forward(self.equilibrium_geopotential(day_of_year)) if self.forcing else None
        now = self.tendency(state, phi_eq)
        count = history.get("count", 0)
        if count == 0:
            prev = prev2 = now
        elif count == 1:
            prev, prev2 = history["prev"], now
        else:
            prev, prev2 = history["prev"], history["prev2"]
        explicit = cfg.dt * ((23.0 / 12.0) * now - (16.0 / 12.0) * prev + (5.0 / 12.0) * prev2)
        if cfg.semi_implicit:
            # Crank-Nicolson on d phi/dt = -Phi_mean delta, d delta/dt = -lap phi, solved per coefficient
            half = 0.5 * cfg.dt
            mean_phi = GRAVITY * cfg.mean_depth
            k = -self.sh.laplacian
            a = state[:, 0] + explicit[:, 0] - half * mean_phi * state[:, 2]
            b = state[:, 2] + explicit[:, 2] + half * k * state[:, 0]
            div_new = (b + half * k * a) / (1 + half * half * k * mean_phi)
            phi_new = a - half * mean_phi * div_new
            state = torch.stack([phi_new, state[:, 1] + explicit[:, 1], div_new], dim=1)
        else:
            state = state + explicit
        history.update(count=count + 1, prev=now, prev2=prev)
        if cfg.hyperdiffuse_geopotential:
            return state * self.hyperdiffusion
        return torch.cat([state[:, :1], state[:, 1:] * self.hyperdiffusion], dim=1)

    # ------------------------------------------------------------ states

    def random_state(
        self, batch: int, day_of_year: float = 0.0, amplitude: float = 1e-5, seed: int = 0
    ) -> torch.Tensor:
        """Equilibrium geopotential plus random large-scale vorticity (``amplitude`` 1/s) per trajectory."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sh = self.sh
        phi = sh.forward(
            self.equilibrium_geopotential(torch.full((batch,), float(day_of_year), device=self.device))
        )
        ell = torch.arange(sh.lmax, dtype=torch.float64)[:, None]
        spectrum = torch.where((ell >= 2) & (ell <= 20), 1.0, 0.0)
        noise = torch.complex(
            torch.randn(batch, sh.lmax, sh.lmax, generator=gen, dtype=torch.float64),
            torch.randn(batch, sh.lmax, sh.lmax, generator=gen, dtype=torch.float64),
        )
        vort = (noise * spectrum * amplitude).to(self.device)
        vort[..., 0] = vort[..., 0].real.to(vort.dtype)  # m = 0 coefficients of a real field are real
        state = torch.stack([phi, vort, torch.zeros_like(vort)], dim=1)
        return state * self.triangular

    def state_from_grid(self, phi: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Spectral state from grid geopotential and winds on the model's Gauss grid."""
        vort, div = self.sh.vorticity_divergence(u, v)
        return torch.stack([self.sh.forward(phi), vort, div], dim=1) * self.triangular

    def to_grid(self, state: torch.Tensor, tables=None) -> torch.Tensor:
        """``(B, 3, lat, lon)``: geopotential, eastward and northward wind (on ``tables``' latitudes if given)."""
        phi = self.sh.inverse(state[:, 0], tables)
        u, v = self.sh.wind(state[:, 1], state[:, 2], tables)
        return torch.stack([phi, u, v], dim=1)

    def run(self, state: torch.Tensor, steps: int, day_of_year: torch.Tensor) -> torch.Tensor:
        """Advance ``steps`` time steps from a cold start of the multistep history."""
        history: dict = {}
        for _ in range(steps):
            state = self.step(state, history, day_of_year)
            day_of_year = day_of_year + self.config.dt / 86400.0
        return state
