"""Flower's round loop driving a :class:`~fedtune.server.run.ServerRun`.

:func:`run_federation` wraps the run's strategy in :class:`~fedtune.flower.strategy_adapter.FlowerStrategy`
(the one strategy Flower sees) and lets its ``start()`` run the rounds on the Grid; after every
round Flower's ``evaluate_fn`` hands the round to :meth:`ServerRun.end_round
<fedtune.server.run.ServerRun.end_round>`. Everything that is not Flower's lives in the
:class:`~fedtune.server.run.ServerRun`.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedtune.flower.codec import tensors_to_record
from fedtune.flower.federation_size import is_simulation
from fedtune.flower.strategy_adapter import FlowerStrategy
from fedtune.schema import FedtuneConfig
from fedtune.server.run import RunControl, ServerRun


def run_federation(grid: Grid, cfg: FedtuneConfig, control: RunControl | None = None) -> Path:
    """Run every round of ``cfg`` on ``grid`` (after the checkpoint's, when resuming); return the run directory.

    The adapter (or model) is written only when every round ran and at least one of them
    aggregated something; otherwise this raises and the run directory keeps its last
    checkpoint, for ``fedtune resume``.
    """
    control = control or RunControl()
    run = ServerRun(cfg, control, step_files=is_simulation(grid))
    counts_replies = run.progress is not None and hasattr(grid, "on_poll")  # a StoppableGrid
    if counts_replies:
        grid.on_poll = run.progress.replies  # type: ignore[attr-defined]
    glue = FlowerStrategy(run.strategy, run.cfg, on_metrics=run.log.add, completed_rounds=run.done,
                          stop=control.stop, run_key=run.run_key, progress=run.progress)
    glue.rejected = run.rejected
    if run.checkpoint:
        glue.averaging.load_state_dict(run.checkpoint.averaging_state)
    run.averaging_state = glue.averaging.state_dict

    def end_of_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        row = run.end_round(flower_round + run.done, lambda: glue.federated_evaluate(0, arrays))
        return None if row is None else MetricRecord(row)

    try:
        glue.start(grid, tensors_to_record(run.initial_tensors()), num_rounds=run.rounds_left,
                   timeout=run.cfg.federation.round_timeout, evaluate_fn=end_of_round)
        run.check_progress()
    except BaseException:
        run.close(success=False)
        raise
    finally:
        if counts_replies:
            grid.on_poll = None  # type: ignore[attr-defined]
    run.close(success=True)
    return run.finish()


__all__ = ["run_federation"]
