"""The four studies: pure functions over xarray/dask, plus engine calls where a model must run."""
