"""The server side of a run, without Flower specifics: set up, run the rounds, save.

The coordinator builds the same model and adapter as the clients (same seed, so the same
initial adapter), hands the initial tensors to the strategy, runs Flower's round loop
through :class:`~fedtune.flower.strategy_adapter.FlowerStrategy`, evaluates the global adapter
on the central test set (when there is one) after every round and before the first,
checkpoints after every round (``output.resume`` continues from there), and writes the
run directory. With a generative ``eval.metric`` the central evaluation also generates
answers for the test prompts and logs ``eval_<metric>``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, MetricRecord
from flwr.serverapp import Grid

from fedtune.checkpoint import Checkpoint, checkpoint_to_resume, rng_state, save_checkpoint, set_rng_state
from fedtune.codec import tensors_to_record
from fedtune.config import FedtuneConfig, to_yaml
from fedtune.data import label_names, load_data, num_labels
from fedtune.data.labels import name_labels, write_labels
from fedtune.data.prompts import with_resolved_prompt_format
from fedtune.data.provenance import write_test_set
from fedtune.errors import ConfigError, NothingAggregatedError, RunInterrupted
from fedtune.flower.federation_size import is_simulation
from fedtune.flower.strategy_adapter import FlowerStrategy
from fedtune.generation import evaluate_generation_on
from fedtune.metrics import generative_key
from fedtune.models import AdapterHandle, clear_extensions, get_adapter
from fedtune.objectives import objective_of
from fedtune.plots import plot_run
from fedtune.progress import PROGRESS_DIR, RoundProgress
from fedtune.runlog import ADAPTER_DIR, MODEL_DIR, RunLog, default_run_dir
from fedtune.strategy import AdapterSpec, Strategy, build_strategy
from fedtune.trackers import open_trackers
from fedtune.training import evaluate

log = logging.getLogger("fedtune.server")


@dataclass
class RunControl:
    """What the process that starts a run shares with its ServerApp: a stop request and progress.

    Attributes
    ----------
    stop : threading.Event
        Set (on Ctrl-C) to end the run after the round in progress is checkpointed, or at
        once while the server waits for replies.
    run_dir : Path or None
        The run directory, once the ServerApp has chosen it.
    completed_round : int
        The last round whose checkpoint is on disk.
    finished : threading.Event
        Set when the ServerApp has returned or raised.
    """

    stop: threading.Event = field(default_factory=threading.Event)
    run_dir: Path | None = None
    completed_round: int = 0
    finished: threading.Event = field(default_factory=threading.Event)


def run_federation(grid: Grid, cfg: FedtuneConfig, control: RunControl | None = None) -> Path:
    """Run every round of ``cfg`` on ``grid`` (after the checkpoint's, when resuming); return the run directory.

    The adapter (or model) is written only when every round ran and at least one of them
    aggregated something; otherwise this raises and the run directory keeps its last
    checkpoint, for ``fedtune resume``.
    """
    control = control or RunControl()
    # Resolved before anything compares or records the config: config.yaml and the checkpoint
    # name the format the run used, never "auto".
    cfg = with_resolved_prompt_format(cfg)
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    checkpoint = checkpoint_to_resume(cfg, run_dir)
    strategy = build_strategy(cfg.strategy.name, cfg.strategy.options)
    splits = load_data(cfg.data, cfg.model.task, cfg.train.objective)
    objective = objective_of(cfg.train)
    pool, test = splits.pool, splits.test
    labels = num_labels(pool) if cfg.model.task == "classification" else None
    names = label_names(pool) if labels is not None else None
    # The server's own base: unquantized unless model.server_quantization says otherwise.
    handle = get_adapter(cfg.model.for_server(), cfg.adapter, labels, cfg.seed)
    clear_extensions(handle.model)  # the model may be cached from an earlier run in this process
    test_tok = (objective.tokenize(test, handle.tokenizer, cfg.model.task, cfg.data.max_length,
                                   cfg.data.prompt_format) if test is not None else None)
    # eval_<metric> when eval.metric is generative: the raw prompt/response columns of
    # `test` (kept beside test_tok) feed generation.
    metric_column = generative_key(cfg.eval.metric, cfg.eval.options)
    if metric_column and test is None and not cfg.eval.clients:
        log.warning("eval.metric=%r is never computed: there is no central test set (data.test_source) and "
                    "eval.clients=false; set one of them", cfg.eval.metric)
    embedding_lora = sorted(k for k in handle.initial if ".lora_embedding_" in k)
    if embedding_lora and strategy.linear_lora_only:
        raise ConfigError([f"adapter.target_modules={cfg.adapter.target_modules} puts LoRA on an embedding "
                           f"({embedding_lora[0]}), which strategy.name={cfg.strategy.name!r} does not aggregate; "
                           "target linear layers only, or use fedit"])
    done = checkpoint.round if checkpoint else 0
    if checkpoint:
        strategy.load_state_dict(checkpoint.strategy_state)
        set_rng_state(checkpoint.rng)
    else:
        # The handle may be cached from an earlier run in this process: start from its initial values.
        strategy.initialize(AdapterSpec(initial=dict(handle.initial), rank=cfg.adapter.rank,
                                        alpha=cfg.adapter.alpha, seed=cfg.seed,
                                        base=handle.base_initial() if strategy.tunes_base_model else {}))

    run_log = RunLog(cfg, run_dir, rows=checkpoint.metrics if checkpoint else None,
                     columns=[c for c in (metric_column, *objective.table_columns) if c])
    control.run_dir, control.completed_round = run_log.run_dir, done
    if names is not None:
        write_labels(run_log.run_dir, names)
    if test is not None and splits.test_selection is not None:
        write_test_set(run_log.run_dir, splits.test_selection, test)
    trackers = open_trackers(cfg, run_log.run_dir, run_log.rows)  # output.trackers; the earlier rounds logged
    run_key = checkpoint.run_key if checkpoint and checkpoint.run_key else uuid.uuid4().hex
    progress = None
    if cfg.output.progress:
        # Step files only where clients share this disk (a simulation).
        progress = RoundProgress(cfg.federation.num_rounds, run_log.console, bar=run_log.bar,
                                 step_dir=run_log.run_dir / PROGRESS_DIR if is_simulation(grid) else None)
        if hasattr(grid, "on_poll"):  # a StoppableGrid: counts replies as they arrive
            grid.on_poll = progress.replies
    glue = FlowerStrategy(strategy, cfg, on_metrics=run_log.add, completed_rounds=done, stop=control.stop,
                          run_key=run_key, progress=progress)
    glue.rejected = list(checkpoint.rejected) if checkpoint else []
    if checkpoint:
        glue.averaging.load_state_dict(checkpoint.averaging_state)
    config_yaml = to_yaml(cfg)

    def end_of_round(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0 and done:
            return None  # the resumed run evaluated round 0 already
        server_round = flower_round + done
        if test_tok is not None:
            strategy.load_global(handle)
            result = evaluate(handle, test_tok, cfg.train.eval_batch_size,
                              on_batch=progress.evaluation if progress is not None else None, objective=objective)
            run_log.add(**{f"eval_{k}": v for k, v in result.items() if k != "num_examples"})
            if metric_column is not None:
                generated = evaluate_generation_on(handle, test, cfg.eval, cfg.data)
                run_log.add(**{generated.key: generated.score, "eval_generation_seconds": generated.seconds})
                run_log.add_generations(server_round, generated.predictions, generated.references)
        else:
            if server_round == 0:
                glue.federated_evaluate(0, arrays)
            run_log.add(eval_loss=run_log.pending("client_eval_loss"),
                        eval_accuracy=run_log.pending("client_eval_accuracy"))
            if metric_column is not None and cfg.eval.clients:
                run_log.add(**{metric_column: run_log.pending(f"client_{metric_column}")})
        row = run_log.end_round(server_round)
        trackers.log_metrics(server_round, row)
        if server_round > 0:
            save_checkpoint(run_log.run_dir, Checkpoint(
                round=server_round, config_yaml=config_yaml, strategy_state=strategy.state_dict(),
                metrics=run_log.rows, rejected=glue.rejected, rng=rng_state(), run_key=run_key,
                averaging_state=glue.averaging.state_dict()))
            control.completed_round = server_round
        if control.stop.is_set():
            raise RunInterrupted(f"stopped after round {server_round}")
        return MetricRecord({k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    try:
        glue.start(grid, tensors_to_record(strategy.global_adapter()),
                   num_rounds=max(cfg.federation.num_rounds - done, 0),
                   timeout=cfg.federation.round_timeout, evaluate_fn=end_of_round)
        check_progress(run_log.rows, cfg)
    except BaseException:
        trackers.close(success=False)
        raise
    finally:
        if progress is not None:
            progress.close()
            if hasattr(grid, "on_poll"):
                grid.on_poll = None
        run_log.close()
        if glue.rejected:
            (run_log.run_dir / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in glue.rejected))
    try:
        if cfg.output.save_adapter and strategy.tunes_base_model:
            save_whole_model(handle, strategy, run_log.run_dir / MODEL_DIR, names)
        elif cfg.output.save_adapter:
            save_global(cfg, labels, handle, strategy, run_log.run_dir / ADAPTER_DIR, names)
    except BaseException:
        trackers.close(success=False)
        raise
    trackers.log_artifact(run_log.run_dir / (MODEL_DIR if strategy.tunes_base_model else ADAPTER_DIR))
    trackers.close(success=True)
    if cfg.output.plots:
        write_plots(run_log.run_dir)
    log.info("run finished: %s", run_log.run_dir)
    return run_log.run_dir


def write_plots(run_dir: Path) -> None:
    """The run's PNG figures (:mod:`fedtune.plots`); a failure is a warning, since the run's results are saved."""
    try:
        plot_run(run_dir)
    except Exception as e:  # noqa: BLE001 - the adapter and metrics.jsonl are written; only the figures are missing
        log.warning("could not write the plots of %s (%s: %s); metrics.jsonl is complete, retry with "
                    "`fedtune plot %s`", run_dir, type(e).__name__, e, run_dir)


def check_progress(rows: list[dict[str, Any]], cfg: FedtuneConfig) -> None:
    """Raise :class:`~fedtune.errors.NothingAggregatedError` when no round changed the global model.

    A skipped round (too few valid replies) is a warning; a run whose every round was
    skipped trained nothing, and saving its untouched adapter would pass for a result.
    """
    rounds = [r for r in rows if r.get("round", 0) > 0]
    if not rounds or any(r.get("clients_aggregated") and not r.get("round_skipped") for r in rounds):
        return
    last = rounds[-1]
    raise NothingAggregatedError(
        f"no round aggregated anything: all {len(rounds)} rounds were skipped (round {last['round']}: "
        f"{last.get('clients_sampled', 0)} clients sampled, {last.get('clients_rejected', 0)} replies rejected, "
        f"{last.get('clients_missing', 0)} missing, federation.min_replies={cfg.federation.min_replies}); "
        f"see the warnings above and rejected.jsonl, then fix the clients or raise federation.round_timeout "
        f"and resume with more rounds")


def save_whole_model(handle: AdapterHandle, strategy: Strategy, directory: Path,
                     names: Sequence[str] | None = None) -> None:
    """Write the global model of a full-parameter strategy as a plain transformers model folder.

    ``AutoModelFor...from_pretrained(directory)`` reads it; the adapter (whatever it holds)
    is merged in and the task head is the tuned one. With ``names`` (a classifier's class
    names by index) its config's ``id2label`` / ``label2id`` name the classes.
    """
    strategy.load_global(handle)
    merged = copy.deepcopy(handle.model).merge_and_unload()
    if names is not None:
        name_labels(merged.config, names)
    merged.save_pretrained(str(directory))
    handle.tokenizer.save_pretrained(str(directory))


def save_global(cfg: FedtuneConfig, labels: int | None, handle: AdapterHandle, strategy: Strategy,
                directory: Path, names: Sequence[str] | None = None) -> None:
    """Write the global model as a PEFT adapter (``PeftModel.from_pretrained`` reads it).

    With ``names`` (a classifier's class names by index) the folder also holds the base
    model's ``config.json`` with ``id2label`` / ``label2id`` set (see :func:`save_base_config`).
    """
    exported = strategy.export_adapter()
    if exported is None:
        handle.load(strategy.global_adapter())
        handle.save(directory)
        save_base_config(handle, directory, names)
        return
    adapter_cfg = dataclasses.replace(cfg.adapter, rank=exported.rank, alpha=exported.alpha, client_ranks=None)
    export_handle = get_adapter(cfg.model.for_server(), adapter_cfg, labels, cfg.seed)
    clear_extensions(export_handle.model)  # the exported adapter carries the whole update
    export_handle.load(exported.tensors)
    export_handle.save(directory)
    save_base_config(export_handle, directory, names)


def save_base_config(handle: AdapterHandle, directory: Path, names: Sequence[str] | None) -> None:
    """Write the base model's config, with the class names, beside an exported classification adapter.

    ``AutoConfig.from_pretrained(directory)`` then gives a config to build the base with
    (``AutoModelForSequenceClassification.from_pretrained(base, config=...)``) whose
    ``id2label`` names the adapter's outputs. A quantization setting is left out: how to
    load the base is the reader's choice. Nothing is written without ``names``.
    """
    if names is None:
        return
    config = copy.deepcopy(handle.model.get_base_model().config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    name_labels(config, names).save_pretrained(str(directory))
