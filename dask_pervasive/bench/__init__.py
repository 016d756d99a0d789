"""Benchmarks of dask_pervasive (not tests): ``python -m dask_pervasive.bench [strategies|placement|bootstrap]``.

Modules
-------
``cli``
    The one entry point: sub-commands, drivers of the three comparisons.
``presets``, ``scenarios``, ``strategies``, ``workload``
    The strategy comparison: preset sizes, what each scenario runs and
    measures, the strategies and their worker-side tasks, the fact-verification
    workload.
``placement``
    The scheduler plugin on vs off (scenarios and worker-side functions).
``bootstrap``
    A cold cohort bootstrapping a context, peer transfer on vs off.
``harness``
    What every run shares: process set-up, models, clusters, progress, events.
``targets``
    Every target of every comparison, as rows of one form.
``report``, ``plots``
    The one output path: environment record, tables, JSON, Markdown; PNGs.

The origin and the tiny models come from :mod:`dask_pervasive.testing`.
"""
