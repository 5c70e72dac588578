"""Ray: actor pool, scheduling, retries, sweeps and dask-on-Ray."""
