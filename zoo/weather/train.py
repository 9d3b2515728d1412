"""OSSE recipes: nature run, forecaster training, Adas training on cycled backgrounds, evaluation.

Follows FengWu-Adas (arXiv 2312.12462) on our shallow-water OSSE:

- ``nature``: 3 training years and 1 held-out year of 6-hourly states (:mod:`zoo.weather.nature_run`);
- ``forecaster``: the FengWu-style network (arXiv 2304.02948) learns the 6-hour step from
  ``(x_{t-6h}, x_t)``, MSE on normalised states;
- ``adas``: as in the paper, the background of each step is the forecaster's 6-hour forecast
  from the previous *analyses* (``B`` parallel cycling streams walk through the training years;
  a stream restarts from the truth every cycle during the first 70% of the run, then with
  probability ``1 / restart_every`` per cycle, and at once when its background error passes
  ``max_error_growth`` times a 6-hour forecast's), observations are the truth plus Gaussian
  errors at a random 10%, 1% or 0.1% of grid values (10% first, an even mix from 70% of the run on),
  loss UnifyMAE. The OSSE Adas reads innovations and predicts increments in units of the
  innovation's standard deviation (6-hour forecast error and observation error), measured before
  training and stored in the checkpoint (:class:`zoo.weather.adas.Adas`);
- ``eval``: on the held-out year, WeatherBench2 RMSE / bias / ACC of the background, OI
  (3D-Var) and Adas at 10%, 1% and 0.1% observations, a cycling run with Adas and one with
  OI at 10% (RMSE over time, PNG; each reported as ``diverged`` when its last 30 days are no
  better than climatology) and a map of analysis increments.

Fine-tuning: ``adas --init`` (``all --adas-init``) starts Adas from given weights, e.g.
``shipped``, and ``--forecaster shipped`` (in ``all``: instead of training one) uses the shipped
forecaster; ``zoo eval weather`` takes the same names.

Every stage has a wall-clock budget (``--minutes``), saves resumable state in ``--out`` and
writes a JSON of its results there; checkpoints are ``.safetensors`` with a ``.json`` sidecar
(architecture, config, layout, normalisation, metrics) that ``zoo.weather.load_*`` read.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from zoo.progress import get_logger
from zoo.weather.grid import Normalisation
from zoo.weather.nature_run import SPINUP_DAYS
from zoo.weather.osse import OBSERVATION_ERROR_STD, TEST_YEAR, TRAIN_YEARS, load_years, osse_layout

__all__ = [
    "ReplayBuffer",
    "evaluate",
    "evaluation_minutes",
    "resolve_checkpoint",
    "run_all",
    "run_nature",
    "train_adas",
    "train_forecaster",
    "use_forecaster",
]

log = get_logger("zoo.weather.train")
FRACTIONS = (0.1, 0.01, 0.001)


def _device(name: str | None) -> torch.device:
    dev = torch.device(name) if name else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest 3D convolutions
    return dev


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=1, default=float))


def run_nature(
    data: str | Path,
    nlat: int = 64,
    nlon: int = 128,
    days: float = 365.0,
    spinup_days: float = SPINUP_DAYS,
    device: str | None = None,
    years: Sequence[int] = (*TRAIN_YEARS, TEST_YEAR),
) -> dict[str, Any]:
    from zoo.weather.nature_run import generate_nature_run

    start = time.perf_counter()
    paths = generate_nature_run(
        data, years=years, nlat=nlat, nlon=nlon, days=days, spinup_days=spinup_days, device=_device(device)
    )
    return {"files": [str(p) for p in paths], "seconds": time.perf_counter() - start}


def _year_tensors(data: Path, years: Sequence[int], nlat: int, nlon: int) -> list[torch.Tensor]:
    layout = osse_layout(nlat, nlon)
    return [layout.to_tensor(load_years(data, [y], nlat, nlon)) for y in years]


def _save_model(out: Path, name: str, model: torch.nn.Module, meta: dict, half: bool = False) -> Path:
    from zoo import checkpoints

    params = {k for k, _ in model.named_parameters()}  # buffers (e.g. increment_scale) stay fp32
    state = {
        k: (v.to(torch.bfloat16) if half and k in params and v.is_floating_point() else v)
        for k, v in model.state_dict().items()
    }
    path = checkpoints.save(state, out / f"{name}.safetensors")
    _write_json(out / f"{name}.json", meta)
    return path


def _budget_loop(minutes: float, max_steps: int, start_step: int):
    """Yield ``(step, progress)`` until ``max_steps`` or the wall-clock budget; progress in [0, 1] is whichever is nearer its end."""
    begin = time.perf_counter()
    budget = 60.0 * minutes
    step = start_step
    while step < max_steps and time.perf_counter() - begin < budget:
        yield step, max(step / max_steps, (time.perf_counter() - begin) / budget)
        step += 1


def _cosine_lr(step: int, progress: float, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * min(1.0, progress))))


class _TrainingState:
    """Model, optimizer and step in ``path``: resumed when present, saved every ``every_s`` seconds and at the end."""

    def __init__(self, path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, every_s: float = 60.0):
        self.path, self.model, self.opt, self.every_s = path, model, opt, every_s
        self.last_save = time.perf_counter()

    def resume(self, device: torch.device, name: str) -> int:
        """The step to start from (0 without a saved state)."""
        if not self.path.is_file():
            return 0
        saved = torch.load(self.path, map_location=device, weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        log.info("%s: resuming at step %d", name, int(saved["step"]))
        return int(saved["step"])

    def save(self, step: int) -> None:
        torch.save(
            {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": step}, self.path
        )
        self.last_save = time.perf_counter()

    def save_if_due(self, step: int) -> None:
        if time.perf_counter() - self.last_save > self.every_s:
            self.save(step)


class ReplayBuffer:
    """FengWu's replay buffer (arXiv 2304.02948): the forecaster's own predictions as later inputs.

    Every training prediction for time ``t + 1`` (from a true or a replayed input pair) goes
    in, paired with the state before it, as long as its lead (steps since the last true
    state) is at most ``max_lead``; a replayed sample asks the model for the truth one step
    after its pair. So the model learns to correct the errors of its own forecasts, which is
    what a free run and a cycle of forecasts feed it. A ring of ``capacity`` slots, allocated
    on the first push on the pairs' device and filled (oldest overwritten first) by one copy
    per batch.
    """

    def __init__(self, capacity: int, max_lead: int, year_lengths: Sequence[int], generator: torch.Generator):
        if capacity < 1 or max_lead < 1:
            raise ValueError(f"replay_capacity, replay_max_lead: expected >= 1, got {capacity}, {max_lead}")
        self.capacity, self.max_lead, self.generator = capacity, max_lead, generator
        self.year_lengths = list(year_lengths)
        self.pairs: torch.Tensor | None = None  # (capacity, 2, C, H, W): (state at t - 1, state at t)
        self.keys: list[tuple[int, int, int]] = []  # (year, t, lead of the state at t) per filled slot
        self.next = 0

    def __len__(self) -> int:
        return len(self.keys)

    def push(self, pairs: torch.Tensor, keys: Sequence[tuple[int, int, int]]) -> None:
        """Keep each pair ``(2, C, H, W)`` ending at time ``t`` whose lead is within bounds and whose ``t + 1`` exists."""
        keep = [
            i
            for i, (year, t, lead) in enumerate(keys)
            if lead <= self.max_lead and t + 1 < self.year_lengths[year]
        ]
        if not keep:
            return
        if self.pairs is None:
            self.pairs = pairs.new_empty((self.capacity, *pairs.shape[1:]))
        slots = []
        for i in keep:
            if len(self.keys) < self.capacity:
                slots.append(len(self.keys))
                self.keys.append(keys[i])
            else:
                slots.append(self.next)
                self.keys[self.next] = keys[i]
                self.next = (self.next + 1) % self.capacity
        index = torch.tensor(slots, device=pairs.device)
        self.pairs.index_copy_(0, index, pairs.detach()[torch.tensor(keep, device=pairs.device)])

    def sample(self, n: int) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        picks = torch.randint(len(self.keys), (n,), generator=self.generator)
        return self.pairs[picks.to(self.pairs.device)], [self.keys[i] for i in picks.tolist()]


def train_forecaster(
    data: str | Path,
    out: str | Path,
    arch: str = "fengwu_lite_osse_64x128",
    minutes: float = 3.0,
    max_steps: int = 4000,
    batch: int = 16,
    lr: float = 1e-3,
    nlat: int = 64,
    nlon: int = 128,
    device: str | None = None,
    seed: int = 0,
    overrides: dict | None = None,
    replay_fraction: float = 0.5,
    replay_start: float = 0.3,
    replay_max_lead: int = 20,
    replay_capacity: int = 1024,
) -> dict[str, Any]:
    """Train the 6-hour forecaster on the training years; resumable from ``out/forecaster_train.pt``.

    From ``replay_start`` of the budget on, ``replay_fraction`` of every batch comes from a
    :class:`ReplayBuffer` of the model's own forecasts up to ``replay_max_lead`` steps (5 days)
    ahead, as in FengWu, so that long rollouts and cycling do not drift; 0 turns it off.
    """
    if not 0.0 <= replay_fraction < 1.0 or not 0.0 <= replay_start <= 1.0:
        raise ValueError(
            f"replay_fraction, replay_start: expected [0, 1) and [0, 1], got {replay_fraction}, {replay_start}"
        )
    from zoo.weather import create_model

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    torch.manual_seed(seed)
    layout = osse_layout(nlat, nlon)
    years = [t.to(dev) for t in _year_tensors(data, TRAIN_YEARS, nlat, nlon)]
    (test,) = _year_tensors(data, [TEST_YEAR], nlat, nlon)
    norm = Normalisation.fit(torch.cat([y[::5].cpu() for y in years]), layout.channel_names())
    years = [norm.normalise(y) for y in years]
    config = {"grid": (nlat, nlon), **(overrides or {})}
    model = create_model(arch, **config).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    state = _TrainingState(out / "forecaster_train.pt", model, opt)
    step0 = state.resume(dev, "forecaster")
    gen = torch.Generator(device="cpu").manual_seed(seed + step0)
    replay = ReplayBuffer(replay_capacity, replay_max_lead, [y.shape[0] for y in years], gen)
    amp = dev.type == "cuda"
    losses = []
    model.train()
    for step, done in _budget_loop(minutes, max_steps, step0):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, done, lr)
        replayed = int(round(batch * replay_fraction)) if done >= replay_start and len(replay) >= batch else 0
        keys, x = [], []
        for w in torch.randint(len(years), (batch - replayed,), generator=gen).tolist():
            t = int(torch.randint(1, years[w].shape[0] - 1, (1,), generator=gen))
            keys.append((w, t, 0))
            x.append(years[w][t - 1 : t + 1])
        x = torch.stack(x)
        if replayed:
            pairs, replay_keys = replay.sample(replayed)
            x = torch.cat([x, pairs])
            keys.extend(replay_keys)
        y = torch.stack([years[w][t + 1] for w, t, _ in keys])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(x)
        if replay_fraction > 0:
            replay.push(
                torch.stack([x[:, 1], pred.float()], dim=1), [(w, t + 1, lead + 1) for w, t, lead in keys]
            )
        loss = torch.nn.functional.mse_loss(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("forecaster step %d loss %.4f", step, loss.item())
        state.save_if_due(step + 1)
    final_step = step0 + len(losses)
    state.save(final_step)
    metrics = _forecast_skill(model, norm, test, layout, dev)
    meta = {
        "arch": arch,
        "config": config,
        "layout": layout.to_dict(),
        "normalisation": norm.to_dict(),
        "history": 2,
        "steps": final_step,
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "replay": {"fraction": replay_fraction, "start": replay_start, "max_lead": replay_max_lead},
        "metrics": metrics,
    }
    _save_model(out, "forecaster", model, meta)
    result = {k: v for k, v in meta.items() if k not in ("normalisation", "layout")}
    _write_json(out / "forecaster_results.json", result)
    return result


def _forecast_skill(
    model, norm: Normalisation, test: torch.Tensor, layout, dev, samples: int = 64, lead: int = 20
) -> dict[str, Any]:
    """Area-weighted RMSE per variable on the held-out year: the 6-hour forecast against
    persistence, and the free forecast ``lead`` steps (5 days) ahead against climatology's
    stand-in, the held-out year's mean state."""
    from zoo.weather.metrics import latitude_weights

    lead = max(1, min(lead, test.shape[0] - 3))  # short test years (smoke runs)
    idx = np.linspace(2, test.shape[0] - 1 - lead, samples).astype(int)
    import xarray as xr

    w = torch.as_tensor(
        latitude_weights(xr.DataArray(np.asarray(layout.latitude), dims="latitude")).values,
        device=dev,
        dtype=torch.float32,
    )

    def rmse(a, truth):
        return (((a - truth) ** 2) * w[:, None]).mean((2, 3)).mean(0).sqrt().tolist()

    model.eval()
    state = norm.normalise(torch.stack([test[i - 2 : i] for i in idx]).to(dev))
    with torch.no_grad():
        for step in range(lead):
            nxt = torch.cat([model(state[i : i + 16]) for i in range(0, len(idx), 16)])
            state = torch.stack([state[:, 1], nxt], dim=1)
            if step == 0:
                six_hours = norm.denormalise(nxt)
    names = layout.channel_names()
    at = lambda k: test[idx + k].to(dev)  # noqa: E731
    return {
        "rmse_6h": dict(zip(names, rmse(six_hours, at(0)))),
        "rmse_persistence": dict(zip(names, rmse(test[idx - 1].to(dev), at(0)))),
        f"rmse_{lead}_steps": dict(zip(names, rmse(norm.denormalise(state[:, 1]), at(lead - 1)))),
        "rmse_year_mean": dict(zip(names, rmse(test.mean(0, keepdim=True).to(dev), at(lead - 1)))),
    }


SHIPPED = "shipped"
_ROLE_PREFIX = {"forecaster": "fengwu_lite_osse", "adas": "adas_osse"}


def _role_archs(role: str) -> list[str]:
    from zoo.weather import _ADAS_VARIANTS, _FORECASTER_VARIANTS

    return sorted(_ADAS_VARIANTS if role == "adas" else _FORECASTER_VARIANTS)


def resolve_checkpoint(
    spec: str | Path, role: str, nlat: int = 64, nlon: int = 128, argument: str | None = None
) -> tuple[Path, dict[str, Any]]:
    """The weights file and metadata of a forecaster or an Adas (``role``) named by ``spec``.

    ``spec`` is ``"shipped"`` (the shipped OSSE weights of the ``nlat x nlon`` grid), a shipped
    ``arch.tag`` (``zoo list --pretrained``), or a ``.safetensors`` checkpoint with the ``.json``
    sidecar that ``zoo train weather`` writes. Shipped weights are checked against their sha256.
    The metadata reads like a training sidecar (``arch``, ``config``, ``layout``,
    ``normalisation``, ...) plus ``source`` (the ``arch.tag`` or the path) and ``sha256``.
    Errors name ``argument`` (default: the role).
    """
    from zoo.registry import get_entry, list_models, sha256_of

    if role not in _ROLE_PREFIX:
        raise ValueError(f"role: expected one of {sorted(_ROLE_PREFIX)}, got {role!r}")
    argument = argument or role
    archs = _role_archs(role)
    shipped = [n for n in list_models(pretrained=True, family="weather") if n.split(".")[0] in archs]
    spec = str(spec)
    if spec == SHIPPED:
        arch = f"{_ROLE_PREFIX[role]}_{nlat}x{nlon}"
        match = [n for n in shipped if n.split(".")[0] == arch]
        if not match:
            raise ValueError(
                f"{argument}: expected shipped {role} weights for the {nlat}x{nlon} grid ({arch}), got none; "
                f"shipped: {shipped or 'none'}"
            )
        spec = match[0]
    path = Path(spec)
    if not path.is_file() and path.suffix != ".safetensors" and "." in spec and "/" not in spec:
        try:
            entry, tag = get_entry(spec)
        except ValueError as err:
            raise ValueError(f"{argument}: {err}") from None
        if entry.name not in archs or tag is None:
            raise ValueError(
                f"{argument}: expected a shipped {role} arch.tag (one of {shipped}), got {spec!r}"
            )
        pt = entry.tags[tag]
        path = pt.verified_path(f"{argument}: {spec}")
        meta = {
            "arch": entry.name,
            "config": dict(pt.config),
            **pt.extra,
            "source": spec,
            "sha256": pt.sha256,
        }
    else:
        if not path.is_file():
            raise ValueError(
                f"{argument}: expected 'shipped', a shipped arch.tag ({', '.join(shipped) or 'none shipped'}) "
                f"or a .safetensors checkpoint with its .json sidecar, got {spec!r} (no such file)"
            )
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise ValueError(
                f"{argument}: expected {sidecar.name} (arch, config, normalisation) next to {path}, got no such file"
            )
        meta = json.loads(sidecar.read_text())
        meta.update(source=str(path), sha256=sha256_of(path))
    if meta.get("arch") not in archs:
        raise ValueError(
            f"{argument}: expected {role} weights (one of {archs}), got {meta.get('arch')!r} in {path}"
        )
    grid = meta.get("config", {}).get("grid")
    if grid is not None and tuple(grid) != (nlat, nlon):
        raise ValueError(
            f"{argument}: expected weights for the {nlat}x{nlon} grid, got {tuple(grid)} in {path}"
        )
    if "normalisation" not in meta:
        raise ValueError(
            f"{argument}: expected a normalisation in the metadata of {path}, got keys {sorted(meta)}"
        )
    return path, meta


def _load_checkpoint_model(
    spec: str | Path, device: torch.device, role: str, nlat: int, nlon: int, argument: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model (float32 on ``device``) and metadata of :func:`resolve_checkpoint`'s ``spec``."""
    path, meta = resolve_checkpoint(spec, role, nlat, nlon, argument)
    return _model_from(path, meta, device), meta


def _model_from(path: Path, meta: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from zoo.weather import create_model

    return create_model(meta["arch"], checkpoint=path, **meta.get("config", {})).float().to(device)


def _background_error_scale(
    fmodel: torch.nn.Module, years: list[torch.Tensor], gen: torch.Generator, amp: bool, samples: int = 64
) -> torch.Tensor:
    """Per-channel RMS of ``truth - forecast`` (normalised units) for 6-hour forecasts from the truth."""
    dev = years[0].device
    sq, n = 0.0, 0
    for _ in range(0, samples, 16):
        windows, truths = [], []
        for _ in range(16):
            w = int(torch.randint(len(years), (1,), generator=gen))
            t = int(torch.randint(2, years[w].shape[0], (1,), generator=gen))
            windows.append(years[w][t - 2 : t])
            truths.append(years[w][t])
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            background = fmodel(torch.stack(windows)).float()
        sq = sq + (torch.stack(truths) - background).pow(2).mean((0, 2, 3))
        n += 1
    return (sq / n).sqrt().clamp_min(1e-6)


def _fraction_weights(n: int, progress: float, dense_until: float) -> torch.Tensor:
    """Draw weights of ``n`` observation fractions: all on the first (densest) at the start, an even mix from ``dense_until`` on."""
    even = torch.full((n,), 1.0 / n)
    if dense_until <= 0.0 or progress >= dense_until:
        return even
    dense = torch.zeros(n)
    dense[0] = 1.0
    share = 1.0 - progress / dense_until
    return share * dense + (1.0 - share) * even


def _adas_init_meta(
    init: str | Path, arch: str, config: dict, norm: Normalisation, nlat: int, nlon: int
) -> dict[str, Any]:
    """Metadata of the ``init`` weights, checked against the Adas being trained (``arch``, ``config``)."""
    path, meta = resolve_checkpoint(init, "adas", nlat, nlon, argument="init")
    if meta["arch"] != arch:
        raise ValueError(
            f"init: expected {arch} weights (the arch being trained), got {meta['arch']} in {path}"
        )
    want = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    have = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.get("config", {}).items()}
    differ = {k: (have.get(k), want.get(k)) for k in set(want) | set(have) if have.get(k) != want.get(k)}
    if differ:
        raise ValueError(
            f"init: config of {path.name} differs from the model being trained (theirs, ours): {differ}"
        )
    theirs = Normalisation.from_dict(meta["normalisation"])
    if not (np.allclose(theirs.mean, norm.mean, rtol=1e-4) and np.allclose(theirs.std, norm.std, rtol=1e-4)):
        log.warning(
            "init: %s was trained with another normalisation (std %s) than the forecaster's (std %s)",
            path.name,
            list(theirs.std),
            list(norm.std),
        )
    return {**meta, "path": path}


def _load_adas_init(model: torch.nn.Module, meta: dict[str, Any], increment_scale: torch.Tensor) -> None:
    """Load the ``init`` weights into ``model`` (strict), keeping their ``increment_scale``."""
    from zoo import checkpoints
    from zoo.weather import _adas_filter

    try:
        checkpoints.load_into(model, checkpoints.load(meta["path"]), filter_fn=_adas_filter, strict=True)
    except checkpoints.CheckpointError as err:
        raise ValueError(f"init: {meta['path'].name} does not fit {meta['arch']}: {err}") from None
    if hasattr(model, "increment_scale"):
        kept = model.increment_scale.detach().cpu()
        measured = increment_scale.detach().float().cpu().flatten()
        log.info(
            "adas: starting from %s (increment_scale %s; this forecaster's errors give %s)",
            meta["source"],
            [round(v, 4) for v in kept.tolist()],
            [round(v, 4) for v in measured.tolist()],
        )
    else:
        log.info("adas: starting from %s", meta["source"])


def train_adas(
    data: str | Path,
    out: str | Path,
    forecaster: str | Path | None = None,
    arch: str = "adas_osse_64x128",
    minutes: float = 3.0,
    max_steps: int = 4000,
    streams: int = 16,
    restart_every: int = 20,
    max_error_growth: float = 3.0,
    lr: float = 2e-3,
    warmup: int = 50,
    fractions: Sequence[float] = FRACTIONS,
    nlat: int = 64,
    nlon: int = 128,
    device: str | None = None,
    seed: int = 0,
    overrides: dict | None = None,
    scale: str = "innovation",
    dense_until: float = 0.7,
    reuse: int = 1,
    fresh_until: float = 0.7,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Train Adas on backgrounds from the forecaster's own cycling; resumable from ``out/adas_train.pt``.

    ``forecaster``: ``"shipped"``, a shipped ``arch.tag`` or a checkpoint (default
    ``out/forecaster.safetensors``). ``init``: start from these Adas weights (same forms; e.g.
    ``"shipped"`` to fine-tune the shipped Adas) instead of a fresh model; the weights keep
    their own ``increment_scale``. A saved training state in ``out`` still takes precedence.

    ``streams`` cycling streams form the batch. Each step forecasts the next background from
    each stream's last two analyses, draws observations (a random fraction of ``fractions``)
    from the truth, and trains on ``unify_mae(analysis, truth)``. A stream restarts from the
    truth with probability ``1 / restart_every`` per cycle (every cycle for the first
    ``fresh_until`` of the run, so the model first meets plain 6-hour backgrounds: cycled
    backgrounds of an Adas that does not yet use the observations drift, and their errors are
    then largely the forecaster's own drift, which the network learns to undo from the
    background alone, never turning to the observations), and at once when its
    background error exceeds ``max_error_growth`` times that of a 6-hour forecast from the
    truth: a poor early Adas would otherwise feed the training with free-forecast errors far
    outside what a working cycle produces.

    Before training, the model's ``increment_scale`` (when it has one) is set per channel to
    the RMS 6-hour forecast error ``sigma_b`` (``scale="background"``) or to the standard
    deviation of an innovation, ``sqrt(sigma_b^2 + sigma_o^2)`` (``scale="innovation"``, the
    default): with observation errors several times the background error (the OSSE winds),
    background-error units make the observed wind departures mostly noise of size 2-4 that
    swamps the geopotential departures in the embedding's layer norm; in innovation units every
    observed value has unit variance. ``dense_until``: the densest fraction (``fractions[0]``)
    is drawn for every stream at the start, its share falling linearly to an even mix at that
    point of the run (0 draws evenly throughout): sparse observations carry little signal to
    learn the spreading of departures from. ``reuse``: each cycled background serves that many
    steps, with fresh observations each time, before its stream moves on (one forecast per
    ``reuse`` steps).
    """
    if scale not in ("innovation", "background"):
        raise ValueError(f"scale: expected 'innovation' or 'background', got {scale!r}")
    if not 0.0 <= dense_until <= 1.0:
        raise ValueError(f"dense_until: expected a value in [0, 1], got {dense_until}")
    if reuse < 1:
        raise ValueError(f"reuse: expected an integer >= 1, got {reuse}")
    if not 0.0 <= fresh_until <= 1.0:
        raise ValueError(f"fresh_until: expected a value in [0, 1], got {fresh_until}")
    from zoo.weather import create_model
    from zoo.weather.adas import unify_mae

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    torch.manual_seed(seed)
    fspec = forecaster if forecaster else out / "forecaster.safetensors"
    fmodel, fmeta = _load_checkpoint_model(fspec, dev, "forecaster", nlat, nlon)
    fmodel.eval().requires_grad_(False)
    norm = Normalisation.from_dict(fmeta["normalisation"])
    layout = osse_layout(nlat, nlon)
    config = {"grid": (nlat, nlon), **(overrides or {})}
    init_meta = _adas_init_meta(init, arch, config, norm, nlat, nlon) if init is not None else None
    years = [norm.normalise(t.to(dev)) for t in _year_tensors(data, TRAIN_YEARS, nlat, nlon)]
    model = create_model(arch, **config).to(dev)
    amp = dev.type == "cuda"
    gen = torch.Generator(device="cpu").manual_seed(seed)
    error_scale = _background_error_scale(fmodel, years, gen, amp)
    noise_std = torch.tensor(
        [OBSERVATION_ERROR_STD[n.split("/")[0]] for n in layout.channel_names()], device=dev
    )
    noise_std = (noise_std / torch.tensor(norm.std, device=dev, dtype=torch.float32)).view(1, -1, 1, 1)
    increment_scale = (
        (error_scale.pow(2) + noise_std.flatten().pow(2)).sqrt() if scale == "innovation" else error_scale
    )
    if hasattr(model, "set_increment_scale"):
        try:
            model.set_increment_scale(increment_scale)
        except ValueError:
            pass  # a model without residual/innovation has no scale to set
    if init_meta is not None:
        _load_adas_init(model, init_meta, increment_scale)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    state = _TrainingState(out / "adas_train.pt", model, opt)
    step0 = state.resume(dev, "adas")
    gen = torch.Generator(device="cpu").manual_seed(seed + 1 + step0)
    # a stream whose background RMS error (in units of a 6-hour forecast's) passes this restarts
    fresh_error = error_scale.view(1, -1)

    def restart() -> tuple[int, int]:
        w = int(torch.randint(len(years), (1,), generator=gen))
        return w, int(torch.randint(2, years[w].shape[0] - 1, (1,), generator=gen))

    where = [restart() for _ in range(streams)]
    window = torch.stack([years[w][t - 2 : t] for w, t in where])  # B, 2, C, H, W (normalised)
    losses, ratios, growth = [], [], []
    model.train()
    background = truth = None
    for step, done in _budget_loop(minutes, max_steps, step0):
        for group in opt.param_groups:
            group["lr"] = _cosine_lr(step, done, lr, warmup)
        fresh = background is None or step % reuse == 0
        if fresh:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                background = fmodel(window).float()
            truth = torch.stack([years[w][t] for w, t in where])
        pick = torch.multinomial(
            _fraction_weights(len(fractions), done, dense_until), streams, replacement=True, generator=gen
        )
        frac = torch.tensor([fractions[int(i)] for i in pick], device=dev)
        mask = (torch.rand(truth.shape, device=dev) < frac.view(-1, 1, 1, 1)).float()
        obs = (truth + noise_std * torch.randn_like(truth)) * mask
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            analysis = model(background, obs, mask)
        loss = unify_mae(analysis.float(), truth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            analysis = analysis.detach().float()
            ratio = (analysis - truth).abs().mean() / (background - truth).abs().mean()
            # per stream: background RMS error over that of a 6-hour forecast from the truth, worst channel
            bg_growth = ((background - truth).pow(2).mean((2, 3)).sqrt() / fresh_error).amax(1)
            stats = torch.stack([loss.detach(), ratio, bg_growth.mean()]).tolist()
            losses.append(stats[0])
            ratios.append(stats[1])
            growth.append(stats[2])
            if (step + 1) % reuse == 0:  # else the same backgrounds serve the next step
                too_far = (bg_growth > max_error_growth).tolist()
                window = torch.stack([window[:, 1], analysis], dim=1)
                every = 1.0 if done < fresh_until else float(restart_every)
                for b in range(streams):
                    w, t = where[b]
                    t += 1
                    if (
                        too_far[b]
                        or t >= years[w].shape[0]
                        or float(torch.rand(1, generator=gen)) < 1.0 / every
                    ):
                        w, t = restart()
                        window[b] = years[w][t - 2 : t]
                    where[b] = (w, t)
        if step % 100 == 0:
            log.info(
                "adas step %d loss %.4f analysis/background MAE %.3f background error growth %.2f",
                step,
                losses[-1],
                ratios[-1],
                growth[-1],
            )
        state.save_if_due(step + 1)
    final_step = step0 + len(losses)
    state.save(final_step)
    meta = {
        "arch": arch,
        "config": config,
        "layout": layout.to_dict(),
        "normalisation": norm.to_dict(),
        "forecaster": Path(fmeta["source"]).name,  # the file name or the shipped arch.tag
        "init": {k: init_meta[k] for k in ("source", "sha256")} if init_meta is not None else None,
        "steps": final_step,
        "background_error_scale": error_scale.tolist(),
        "increment_scale": (
            model.increment_scale.tolist() if hasattr(model, "increment_scale") else increment_scale.tolist()
        ),
        "schedule": {
            "scale": scale,
            "dense_until": dense_until,
            "reuse": reuse,
            "lr": lr,
            "streams": streams,
        },
        "final_loss": float(np.mean(losses[-50:])) if losses else None,
        "train_mae_ratio": float(np.mean(ratios[-50:])) if ratios else None,
        "train_background_error_growth": float(np.mean(growth[-50:])) if growth else None,
    }
    _save_model(out, "adas", model, meta, half=True)
    result = {k: v for k, v in meta.items() if k not in ("normalisation", "layout")}
    _write_json(out / "adas_results.json", result)
    return result


def evaluate(
    data: str | Path,
    out: str | Path,
    forecaster: str | Path | None = None,
    adas: str | Path | None = None,
    fractions: Sequence[float] = FRACTIONS,
    samples: int = 16,
    cycles: int = 240,
    nlat: int = 64,
    nlon: int = 128,
    device: str | None = None,
    seed: int = 0,
    plots: bool = True,
    work: str | Path | None = None,
) -> dict[str, Any]:
    """Background vs OI (3D-Var) vs Adas on the held-out year, plus a cycling run; writes ``eval_results.json``.

    ``forecaster`` and ``adas``: ``"shipped"``, a shipped ``arch.tag`` or a checkpoint (default:
    ``forecaster.safetensors`` and ``adas.safetensors`` in ``out``).
    """
    import xarray as xr

    from zoo.weather import metrics
    from zoo.weather.api import AdasAssimilator, ModelForecaster, cycle
    from zoo.weather.observations import random_grid_observations
    from zoo.weather.oi import OptimalInterpolation

    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    layout = osse_layout(nlat, nlon)
    fmodel, fmeta = _load_checkpoint_model(
        forecaster if forecaster else out / "forecaster.safetensors", dev, "forecaster", nlat, nlon
    )
    amodel, ameta = _load_checkpoint_model(
        adas if adas else out / "adas.safetensors", dev, "adas", nlat, nlon
    )
    norm_f = Normalisation.from_dict(fmeta["normalisation"])
    norm_a = Normalisation.from_dict(ameta["normalisation"])
    fc = ModelForecaster(fmodel, layout, norm_f)
    assim = AdasAssimilator(amodel, layout, norm_a, batch_size=16)
    truth_year = load_years(data, [TEST_YEAR], nlat, nlon)
    train = load_years(data, TRAIN_YEARS, nlat, nlon)
    # climatology from the training years, indexed by day of year and hour
    clim = metrics.climatology(train, window_days=15)
    truth_t = layout.to_tensor(truth_year)
    idx = np.linspace(2, truth_t.shape[0] - 1, samples).astype(int)
    with torch.no_grad():
        bg_t = torch.stack([fc.forecast_tensor(truth_t[i - 2 : i]) for i in idx])
    truth_sel = truth_year.isel(time=idx)
    background = layout.from_tensor(bg_t, truth_sel)
    oi = OptimalInterpolation(layout, observation_error_std=OBSERVATION_ERROR_STD)
    fit = oi.fit(
        bg_t[:8].double(), truth_t[idx[:8]].double(), layout.latitude, layout.longitude, fraction=0.01
    )
    results: dict[str, Any] = {
        "samples": int(samples),
        "models": {"forecaster": Path(fmeta["source"]).name, "adas": Path(ameta["source"]).name},
        "oi_fit": fit,
        "by_fraction": {},
    }

    def scores(ds: xr.Dataset) -> dict[str, Any]:
        r = metrics.rmse(ds, truth_sel)
        b = metrics.bias(ds, truth_sel)
        a = metrics.acc(ds, truth_sel, clim)
        return {
            v: {
                "rmse": float(r[v].values.ravel()[0]),
                "bias": float(b[v].values.ravel()[0]),
                "acc": float(a[v].values.ravel()[0]),
            }
            for v in layout.variables
        }

    bg_scores = scores(background)
    results["background"] = bg_scores
    first_case = None
    for frac in fractions:
        obs = random_grid_observations(truth_sel, layout, frac, seed=seed, error_std=OBSERVATION_ERROR_STD)
        adas_ana = assim(background, obs)
        oi_ana = oi(background, obs)
        entry = {"adas": scores(adas_ana), "oi": scores(oi_ana), "observed_values": obs.used}
        entry["adas_over_background"] = {
            v: entry["adas"][v]["rmse"] / bg_scores[v]["rmse"] for v in layout.variables
        }
        entry["oi_over_background"] = {
            v: entry["oi"][v]["rmse"] / bg_scores[v]["rmse"] for v in layout.variables
        }
        results["by_fraction"][str(frac)] = entry
        if first_case is None:
            first_case = (
                background.isel(time=0),
                adas_ana.isel(time=0),
                oi_ana.isel(time=0),
                truth_sel.isel(time=0),
                frac,
            )
    # cycling on the held-out year with 10% observations
    rng_seed = seed

    def observe(time):
        sel = truth_year.sel(time=[time])
        return random_grid_observations(
            sel,
            layout,
            fractions[0],
            seed=rng_seed + int(time.astype("datetime64[h]").astype(int)) % 100000,
            error_std=OBSERVATION_ERROR_STD,
        ).values

    cyc_results: dict[str, Any] = {}
    if cycles > 0:
        steps = min(cycles, truth_year.sizes["time"] - 2)
        initial = truth_year.isel(time=slice(0, 2))
        # a year's climatology bounds a useful analysis: a cycle no better than it over its last 30 days diverged
        recent_truth = truth_year.isel(time=slice(2, 2 + steps)).isel(time=slice(-120, None))
        clim_recent = metrics._climatology_at(clim, recent_truth["time"]).drop_vars(
            ["dayofyear", "hour"], errors="ignore"
        )
        clim_rmse = metrics.rmse(clim_recent.assign_coords(time=recent_truth["time"]), recent_truth)
        climatology_rmse = {v: float(clim_rmse[v].values.ravel()[0]) for v in layout.variables}
        free = cycle(initial, None, fc, None, min(steps, 40), out=None, keep_backgrounds=False).open()
        free_rmse = metrics.rmse(free, truth_year.sel(time=free["time"]), per_time=True)
        per_time = {}
        # analyses stream to the data folder (not to ``out``, which holds only results); a fresh run each time
        for name, assimilator in (("adas", assim), ("oi", oi)):
            per_time[name], cyc_results[name] = _cycling_scores(
                initial,
                observe,
                fc,
                assimilator,
                steps,
                (Path(work) if work else data / "runs") / f"cycle_{name}",
                truth_year,
                climatology_rmse,
                layout.variables,
            )
        cyc_results["cycles"] = int(steps)
        cyc_results["climatology_rmse_last_30_days"] = climatology_rmse
        cyc_results["free_forecast_rmse_at_10_days"] = {
            v: float(free_rmse[v].isel(time=-1).values.ravel()[0]) for v in layout.variables
        }
        if plots:
            _plot_cycle(out / "cycle_rmse.png", per_time, free_rmse, bg_scores)
    results["cycling"] = cyc_results
    if plots and first_case is not None:
        _plot_increments(out / "increments.png", *first_case)
    _write_json(out / "eval_results.json", results)
    return results


def _cycling_scores(
    initial, observe, forecaster, assimilator, steps, directory, truth_year, climatology_rmse, variables
):
    """Cycle ``steps`` times (forecast, then ``assimilator`` at the observed times) and score it.

    No clamping anywhere: a cycle whose last 30 days are no better than climatology, or that
    leaves the finite numbers, is reported as diverged.
    """
    from zoo.weather import metrics
    from zoo.weather.api import cycle

    shutil.rmtree(directory, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        run = cycle(
            initial, observe, forecaster, assimilator, steps, out=directory, chunk=120, keep_backgrounds=False
        )
    except FloatingPointError as err:
        log.warning("cycling with %s stopped: %s", type(assimilator).__name__, err)
        return None, {"finite": False, "diverged": True, "error": str(err)}
    seconds = time.perf_counter() - t0
    analyses = run.open()
    per_time = metrics.rmse(analyses, truth_year.sel(time=analyses["time"]), per_time=True)
    last = {v: float(np.sqrt((per_time[v].isel(time=slice(-120, None)) ** 2).mean())) for v in variables}
    finite = bool(all(np.isfinite(analyses[v].values).all() for v in variables))
    result = {
        "seconds": seconds,
        "finite": finite,
        "rmse_mean": {v: float(np.sqrt((per_time[v] ** 2).mean())) for v in variables},
        "rmse_last_30_days": last,
        "diverged": bool(not finite or any(not last[v] < climatology_rmse[v] for v in variables)),
    }
    if result["diverged"]:
        log.warning(
            "cycling with %s diverged: RMSE over the last 30 days %s, climatology %s",
            type(assimilator).__name__,
            last,
            climatology_rmse,
        )
    return per_time, result


def _plot_cycle(path: Path, per_time, free_rmse, bg_scores) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"adas": "Adas cycling, 10% obs", "oi": "OI cycling, 10% obs"}
    runs = {name: rmse for name, rmse in per_time.items() if rmse is not None}
    names = list(bg_scores)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)), sharex=True)
    for ax, v in zip(np.atleast_1d(axes), names):
        for name, rmse in runs.items():
            ax.plot(rmse["time"].values, rmse[v].values.ravel(), label=labels[name])
        ax.plot(free_rmse["time"].values, free_rmse[v].values.ravel(), label="free forecast", alpha=0.7)
        ax.axhline(bg_scores[v]["rmse"], color="k", ls="--", lw=0.8, label="6-h background from truth")
        ax.set_ylabel(f"RMSE {v}")
        ax.set_yscale("log")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_increments(path: Path, background, adas, oi, truth, frac) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = "geopotential"
    pick = lambda ds: np.asarray(ds[v].squeeze().values)
    panels = [
        ("truth - background", pick(truth) - pick(background)),
        ("Adas increment", pick(adas) - pick(background)),
        ("OI increment", pick(oi) - pick(background)),
    ]
    lim = max(np.abs(p).max() for _, p in panels)
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.4))
    lon, lat = background["longitude"].values, background["latitude"].values
    for ax, (title, field) in zip(axes, panels):
        im = ax.pcolormesh(lon, lat, field, cmap="RdBu_r", vmin=-lim, vmax=lim, shading="auto")
        ax.set_title(f"{title} ({v}, {100 * frac:g}% obs)", fontsize=9)
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluation_minutes(cycles: int, per_cycle_s: float = 0.1, fixed_s: float = 70.0) -> float:
    """Wall-clock minutes :func:`evaluate` needs on one H200 at 64x128: the scores, OI fit and
    climatology, free forecast and plots (about ``fixed_s``) plus ``cycles`` cycles of forecast
    + Adas + writing (1458 cycles took 75 s with the tensor cycle loop) and of forecast + OI
    (float64 on the GPU; not yet timed there, 0.19 s per cycle on 2 CPU cores at 32x64), about
    ``per_cycle_s`` each in all."""
    return (fixed_s + per_cycle_s * max(0, int(cycles))) / 60.0


def use_forecaster(
    data: str | Path,
    out: str | Path,
    forecaster: str | Path,
    nlat: int = 64,
    nlon: int = 128,
    device: str | None = None,
) -> dict[str, Any]:
    """Put a given forecaster (``"shipped"``, an ``arch.tag`` or a checkpoint) in ``out`` as
    ``forecaster.safetensors`` with a training sidecar, scored on the held-out year as
    :func:`train_forecaster` scores the one it trains; returns the same result (plus ``source`` and
    ``sha256``; ``steps`` only when its sidecar has them)."""
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = _device(device)
    path, meta = resolve_checkpoint(forecaster, "forecaster", nlat, nlon)
    model = _model_from(path, meta, dev)
    layout = osse_layout(nlat, nlon)
    (test,) = _year_tensors(data, [TEST_YEAR], nlat, nlon)
    norm = Normalisation.from_dict(meta["normalisation"])
    meta = {
        **meta,
        "layout": meta.get("layout", layout.to_dict()),
        "metrics": _forecast_skill(model, norm, test, layout, dev),
    }
    target = out / "forecaster.safetensors"
    if path.resolve() != target.resolve():
        shutil.copy(path, target)
        _write_json(out / "forecaster.json", meta)
    result = {k: v for k, v in meta.items() if k not in ("normalisation", "layout")}
    _write_json(out / "forecaster_results.json", result)
    return result


def run_all(
    data: str | Path,
    out: str | Path,
    budget_minutes: float = 8.0,
    nlat: int = 64,
    nlon: int = 128,
    days: float = 365.0,
    spinup_days: float = SPINUP_DAYS,
    samples: int = 16,
    cycles: int = 240,
    device: str | None = None,
    forecaster_arch: str = "fengwu_lite_osse_64x128",
    adas_arch: str = "adas_osse_64x128",
    batch: int = 16,
    streams: int = 8,
    eval_minutes: float | None = None,
    adas_share: float = 0.6,
    adas_reuse: int = 1,
    forecaster: str | Path | None = None,
    adas_init: str | Path | None = None,
    adas_lr: float = 2e-3,
) -> dict[str, Any]:
    """Every stage in one call within ``budget_minutes``: nature run, forecaster, Adas, evaluation.

    Data and resumable states live in ``data``; ``out`` receives only the deliverables (two
    checkpoints with their sidecars, ``results.json``, two PNGs), so it stays under 8 files.
    ``eval_minutes`` is kept back for the evaluation (default :func:`evaluation_minutes` of
    ``cycles``); of the training time left, Adas gets ``adas_share`` and the forecaster the rest.
    ``forecaster`` (``"shipped"``, an ``arch.tag`` or a checkpoint) replaces the forecaster's
    training: it is scored like a trained one and Adas gets all the training time;
    ``adas_init`` (same forms) is where Adas starts (see :func:`train_adas`).
    """
    if not 0.0 < adas_share < 1.0:
        raise ValueError(f"adas_share: expected a value in (0, 1), got {adas_share}")
    if forecaster is not None:  # fail before the nature run on a bad name
        resolve_checkpoint(forecaster, "forecaster", nlat, nlon, argument="forecaster")
    if adas_init is not None:
        resolve_checkpoint(adas_init, "adas", nlat, nlon, argument="adas_init")
    start = time.perf_counter()
    data, out = Path(data), Path(out)
    work = data / "runs"
    out.mkdir(parents=True, exist_ok=True)
    left = lambda: budget_minutes - (time.perf_counter() - start) / 60.0
    results: dict[str, Any] = {"budget_minutes": budget_minutes, "device": str(_device(device))}
    if torch.cuda.is_available():
        results["gpu"] = torch.cuda.get_device_name()
    results["nature"] = run_nature(data, nlat, nlon, days, spinup_days, device)
    reserve = evaluation_minutes(cycles) if eval_minutes is None else eval_minutes
    results["eval_reserve_minutes"] = reserve
    if forecaster is None:
        share = max(0.02, (left() - reserve) * (1.0 - adas_share))
        results["forecaster"] = train_forecaster(
            data,
            work,
            forecaster_arch,
            minutes=share,
            max_steps=20000,
            batch=batch,
            nlat=nlat,
            nlon=nlon,
            device=device,
        )
    else:
        results["forecaster"] = use_forecaster(data, work, forecaster, nlat, nlon, device)
    share = max(0.02, left() - reserve)
    results["adas"] = train_adas(
        data,
        work,
        arch=adas_arch,
        minutes=share,
        max_steps=20000,
        streams=streams,
        lr=adas_lr,
        nlat=nlat,
        nlon=nlon,
        device=device,
        reuse=adas_reuse,
        init=adas_init,
    )
    eval_start = time.perf_counter()
    results["eval"] = evaluate(
        data, work, samples=samples, cycles=cycles, nlat=nlat, nlon=nlon, device=device, work=work
    )
    for name in (
        "forecaster.safetensors",
        "forecaster.json",
        "adas.safetensors",
        "adas.json",
        "cycle_rmse.png",
        "increments.png",
    ):
        if (work / name).is_file():
            shutil.copy(work / name, out / name)
    results["eval_minutes"] = (time.perf_counter() - eval_start) / 60.0
    results["minutes"] = (time.perf_counter() - start) / 60.0
    _write_json(out / "results.json", results)
    return results
