"""The server side of a run, without Flower: set up, finish each round, save.

A :class:`ServerRun` is the coordinator's part of one run, in named steps that Flower's round
loop (:mod:`fedtune.flower.server_loop`) calls:

* building it sets the run up: the same model and adapter as the clients (same seed, so the
  same initial adapter), the strategy (or its checkpointed state when resuming), the central
  test set, the run directory, trackers and the progress display;
* :meth:`ServerRun.initial_tensors` is what the first round sends;
* :meth:`ServerRun.end_round` evaluates the global adapter on the central test set (when there
  is one; before the first round too), logs the round and writes its checkpoint
  (``output.resume`` continues from there); with a generative ``eval.metric`` the central
  evaluation also generates answers for the test prompts and logs ``eval_<metric>``;
* :meth:`ServerRun.finish` writes the adapter (only when every round ran and one of them
  aggregated something), the trackers' last words and the plots; :meth:`ServerRun.close` ends
  the run log either way.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedtune.data import label_names, load_data, num_labels
from fedtune.data.labels import name_labels, write_labels
from fedtune.data.prompts import with_resolved_prompt_format
from fedtune.data.provenance import write_test_set
from fedtune.errors import ConfigError, NothingAggregatedError, RunInterrupted
from fedtune.evaluation.generation import evaluate_generation_on
from fedtune.evaluation.metrics import generative_key
from fedtune.models.loading import AdapterHandle, clear_extensions, get_adapter
from fedtune.objectives import evaluate, objective_of
from fedtune.reporting.plots import plot_run
from fedtune.reporting.progress import PROGRESS_DIR, RoundProgress
from fedtune.reporting.runlog import ADAPTER_DIR, MODEL_DIR, RunLog, default_run_dir
from fedtune.reporting.trackers import open_trackers
from fedtune.schema import FedtuneConfig, to_yaml
from fedtune.server.checkpoint import Checkpoint, checkpoint_to_resume, rng_state, save_checkpoint, set_rng_state
from fedtune.strategy import AdapterSpec, Strategy, strategies_where, strategy_for

log = logging.getLogger("fedtune.server.run")


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


class ServerRun:
    """The coordinator's side of one run (resumed from its checkpoint when ``output.resume``).

    Parameters
    ----------
    cfg : FedtuneConfig
        The run's configuration, checked.
    control : RunControl, optional
        Shared with the process that started the run (Ctrl-C, progress).
    step_files : bool
        Whether clients write their local steps to the run directory for the progress display
        (they share this disk in a simulation).

    Attributes
    ----------
    strategy : Strategy
        The method's server half, initialised or restored.
    done : int
        Rounds completed before this process started (a resumed run's checkpoint).
    log : RunLog
        ``metrics.jsonl``, ``config.yaml`` and the round table.
    progress : RoundProgress or None
        The live display, with ``output.progress``.
    run_key : str
        The run's identity across resumes (clients key their state by it).
    rejected : list of dict
        Every rejected reply so far (``rejected.jsonl``); the round loop appends to it.
    averaging_state : callable
        Returns the averaging layer's state for the checkpoint (the round loop sets it).
    """

    def __init__(self, cfg: FedtuneConfig, control: RunControl | None = None, *, step_files: bool = False) -> None:
        self.control = control or RunControl()
        self.strategy = strategy_for(cfg)  # the one the config check built, when this process checked it
        # Resolved before anything compares or records the config: config.yaml and the checkpoint
        # name the format the run used, never "auto".
        self.cfg = cfg = with_resolved_prompt_format(cfg)
        run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
        checkpoint = self.checkpoint = checkpoint_to_resume(cfg, run_dir)
        splits = load_data(cfg.data, cfg.model.task, cfg.train.objective)
        self.objective = objective_of(cfg.train)
        self.test = splits.test
        pool = splits.pool
        self.labels = num_labels(pool) if cfg.model.task == "classification" else None
        self.names = label_names(pool) if self.labels is not None else None
        # The server's own base: unquantized unless model.server_quantization says otherwise.
        self.handle = get_adapter(cfg.model.for_server(), cfg.adapter, self.labels, cfg.seed)
        clear_extensions(self.handle.model)  # the model may be cached from an earlier run in this process
        self.test_tok = (self.objective.tokenize(self.test, self.handle.tokenizer, cfg.model.task, cfg.data.max_length,
                                                 cfg.data.prompt_format) if self.test is not None else None)
        # eval_<metric> when eval.metric is generative: the raw prompt/response columns of
        # `test` (kept beside test_tok) feed generation.
        self.metric_column = generative_key(cfg.eval.metric, cfg.eval.options)
        if self.metric_column and self.test is None and not cfg.eval.clients:
            log.warning("eval.metric=%r is never computed: there is no central test set (data.test_source) and "
                        "eval.clients=false; set one of them", cfg.eval.metric)
        self._check_embedding_lora()
        self.done = checkpoint.round if checkpoint else 0
        self._start_strategy()
        self.log = RunLog(cfg, run_dir, rows=checkpoint.metrics if checkpoint else None,
                          columns=[c for c in (self.metric_column, *self.objective.table_columns) if c])
        self.control.run_dir, self.control.completed_round = self.log.run_dir, self.done
        if self.names is not None:
            write_labels(self.log.run_dir, self.names)
        if self.test is not None and splits.test_selection is not None:
            write_test_set(self.log.run_dir, splits.test_selection, self.test)
        self.trackers = open_trackers(cfg, self.log.run_dir, self.log.rows)  # the earlier rounds logged
        self.run_key = checkpoint.run_key if checkpoint and checkpoint.run_key else uuid.uuid4().hex
        self.progress = None
        if cfg.output.progress:
            self.progress = RoundProgress(cfg.federation.num_rounds, self.log.console, bar=self.log.bar,
                                          step_dir=self.log.run_dir / PROGRESS_DIR if step_files else None)
        self.rejected: list[dict[str, Any]] = list(checkpoint.rejected) if checkpoint else []
        self.averaging_state: Callable[[], dict[str, Any]] = dict
        self._config_yaml = to_yaml(cfg)

    def _check_embedding_lora(self) -> None:
        embedding_lora = sorted(k for k in self.handle.initial if ".lora_embedding_" in k)
        if embedding_lora and self.strategy.linear_lora_only:
            able = strategies_where(lambda c: not c.linear_lora_only)
            raise ConfigError([f"adapter.target_modules={self.cfg.adapter.target_modules} puts LoRA on an embedding "
                               f"({embedding_lora[0]}), which strategy.name={self.cfg.strategy.name!r} does not "
                               f"aggregate; target linear layers only, or use one of {able}"])

    def _start_strategy(self) -> None:
        if self.checkpoint:
            self.strategy.load_state_dict(self.checkpoint.strategy_state)
            set_rng_state(self.checkpoint.rng)
            return
        # The handle may be cached from an earlier run in this process: start from its initial values.
        self.strategy.initialize(AdapterSpec(
            initial=dict(self.handle.initial), rank=self.cfg.adapter.rank, alpha=self.cfg.adapter.alpha,
            seed=self.cfg.seed, base=self.handle.base_initial() if self.strategy.tunes_base_model else {}))

    @property
    def rounds_left(self) -> int:
        """Rounds this process runs: the configured number less those a resumed run did."""
        return max(self.cfg.federation.num_rounds - self.done, 0)

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        """The global tensors the first round of this process starts from."""
        return self.strategy.global_adapter()

    def end_round(self, server_round: int, federated_evaluate: Callable[[], None]) -> dict[str, float] | None:
        """Evaluate, log and checkpoint round ``server_round`` (0: before the first); its numeric metrics.

        Without a central test set the clients' evaluation stands in: ``federated_evaluate``
        runs one (round 0; later rounds' client evaluations arrive with the round). Returns None
        for a resumed run's round 0, evaluated before. Raises
        :class:`~fedtune.errors.RunInterrupted` after the checkpoint when a stop was asked.
        """
        if server_round == self.done and self.done:
            return None  # the resumed run evaluated round 0 already
        if self.test_tok is not None:
            self._evaluate_centrally(server_round)
        else:
            if server_round == 0:
                federated_evaluate()
            self.log.add(eval_loss=self.log.pending("client_eval_loss"),
                         eval_accuracy=self.log.pending("client_eval_accuracy"))
            if self.metric_column is not None and self.cfg.eval.clients:
                self.log.add(**{self.metric_column: self.log.pending(f"client_{self.metric_column}")})
        row = self.log.end_round(server_round)
        self.trackers.log_metrics(server_round, row)
        if server_round > 0:
            self._checkpoint(server_round)
        if self.control.stop.is_set():
            raise RunInterrupted(f"stopped after round {server_round}")
        return {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def _evaluate_centrally(self, server_round: int) -> None:
        self.strategy.load_global(self.handle)
        result = evaluate(self.handle, self.test_tok, self.cfg.train.eval_batch_size,
                          on_batch=self.progress.evaluation if self.progress is not None else None,
                          objective=self.objective)
        self.log.add(**{f"eval_{k}": v for k, v in result.items() if k != "num_examples"})
        if self.metric_column is not None:
            generated = evaluate_generation_on(self.handle, self.test, self.cfg.eval, self.cfg.data)
            self.log.add(**{generated.key: generated.score, "eval_generation_seconds": generated.seconds})
            self.log.add_generations(server_round, generated.predictions, generated.references)

    def _checkpoint(self, server_round: int) -> None:
        save_checkpoint(self.log.run_dir, Checkpoint(
            round=server_round, config_yaml=self._config_yaml, strategy_state=self.strategy.state_dict(),
            metrics=self.log.rows, rejected=self.rejected, rng=rng_state(), run_key=self.run_key,
            averaging_state=self.averaging_state()))
        self.control.completed_round = server_round

    def check_progress(self) -> None:
        """Raise when no round changed the global model (:func:`check_progress`)."""
        check_progress(self.log.rows, self.cfg)

    def close(self, success: bool) -> None:
        """End the progress display and the run log and write ``rejected.jsonl``; on failure, close the trackers."""
        if not success:
            self.trackers.close(success=False)
        if self.progress is not None:
            self.progress.close()
        self.log.close()
        if self.rejected:
            (self.log.run_dir / "rejected.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rejected))

    def finish(self) -> Path:
        """Write the adapter (or the whole model), the trackers' artifact and the plots; the run directory."""
        cfg, strategy, run_dir = self.cfg, self.strategy, self.log.run_dir
        try:
            if cfg.output.save_adapter and strategy.tunes_base_model:
                save_whole_model(self.handle, strategy, run_dir / MODEL_DIR, self.names)
            elif cfg.output.save_adapter:
                save_global(cfg, self.labels, self.handle, strategy, run_dir / ADAPTER_DIR, self.names)
        except BaseException:
            self.trackers.close(success=False)
            raise
        self.trackers.log_artifact(run_dir / (MODEL_DIR if strategy.tunes_base_model else ADAPTER_DIR))
        self.trackers.close(success=True)
        if cfg.output.plots:
            write_plots(run_dir)
        log.info("run finished: %s", run_dir)
        return run_dir


def write_plots(run_dir: Path) -> None:
    """The run's PNG figures (:mod:`fedtune.reporting.plots`); a failure is a warning, since the run's results are saved."""
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
