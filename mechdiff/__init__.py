"""mechdiff: compare base LLMs with their post-trained versions from the inside."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("mechdiff")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"


def open_store(path_or_url: str, group: str | None = None, **kwargs):
    """Open an activation store as a lazy, dask-backed ``xarray.Dataset``."""
    from mechdiff.engine.store import open_store as _open

    return _open(path_or_url, group=group, **kwargs)


__all__ = ["__version__", "open_store"]
