"""Reporting: what a run shows and leaves behind for people.

:mod:`~fedtune.reporting.runlog` writes ``config.yaml`` and ``metrics.jsonl`` and prints the
round table, :mod:`~fedtune.reporting.progress` the live display within a round,
:mod:`~fedtune.reporting.plots` the run's figures, :mod:`~fedtune.reporting.compare` reads run
directories back for ``fedtune compare``, :mod:`~fedtune.reporting.trackers` TensorBoard and
MLflow behind one interface, :mod:`~fedtune.reporting.quiet` keeps libraries' logging down.

May import: :mod:`fedtune.schema` and :mod:`fedtune.errors` only: every side reports, so
reporting depends on no side.
"""
