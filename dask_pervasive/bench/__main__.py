"""``python -m dask_pervasive.bench``: see ``--help``, :mod:`dask_pervasive.bench.cli` and ``docs/benchmarks.md``."""

if __name__ == "__main__":
    # Import-time side-effect free: worker processes fork from a forkserver that
    # re-imports __main__ as __mp_main__, and task functions must be pickled by
    # reference to their importable modules, not as __main__ copies.
    import sys

    from dask_pervasive.bench.cli import main

    sys.exit(main())
