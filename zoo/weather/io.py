"""netCDF output that works wherever xarray does.

The writers prefer netCDF4 (compressed), then h5netcdf, and fall back to SciPy's netCDF3
writer, which needs no HDF5 library (machines with xarray and SciPy but no netCDF4 still
write and read every file the weather package produces).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import xarray as xr

__all__ = ["netcdf_engine", "write_netcdf"]


def netcdf_engine() -> str:
    for module, engine in (("netCDF4", "netcdf4"), ("h5netcdf", "h5netcdf")):
        if importlib.util.find_spec(module) is not None:
            return engine
    return "scipy"


def write_netcdf(ds: xr.Dataset, path: str | Path, compress: bool = False) -> Path:
    """Write ``ds`` to ``path`` with the best available engine (compression where the engine has it)."""
    engine = netcdf_engine()
    encoding = None
    if compress and engine != "scipy":
        encoding = {v: {"zlib": True, "complevel": 1} for v in ds.data_vars}
    path = Path(path)
    ds.to_netcdf(path, engine=engine, encoding=encoding)
    return path
