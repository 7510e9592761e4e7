"""The one adapter from fedtune strategies to Flower's ``Strategy``.

:class:`FlowerStrategy` is the only place that touches Flower messages on the server:
it samples clients, turns each :class:`~fedtune.strategy.ClientInstruction` into a
message, measures what crosses the wire, validates replies (a malformed or non-finite
reply is logged and never aggregated; a ClientApp's exception stops the run), and hands
the valid ones to the fedtune strategy. Flower's ``Strategy.start()`` owns the round loop.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlwrStrategy
from flwr.serverapp.strategy.result import Result

from fedtune import protocol
from fedtune.averaging import Averaging, averaging_in_effect, build_averaging
from fedtune.averaging.client_dp import client_dp_of
from fedtune.averaging.mean import update_norm
from fedtune.errors import AggregationError, ClientAppError, InvalidUpdateError, RunInterrupted
from fedtune.evaluation.metrics import generative_key
from fedtune.flower.codec import record_to_tensors, tensors_to_record, wire_bytes
from fedtune.reporting.progress import RoundProgress
from fedtune.schema import FedtuneConfig
from fedtune.strategy import ClientInstruction, ClientUpdate, Strategy, check_update

log = logging.getLogger("fedtune.server.run")

# A ClientApp that raised, or could not be loaded, fails the same way next round: the run
# stops with the client's reason. Other error replies (a node gone, a crashed ClientApp
# process, a message lost) only leave that client out of the round.
FATAL_CLIENT_ERRORS = (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.LOAD_CLIENT_APP_EXCEPTION)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REASON = re.compile(r"^<class '(?P<type>[^']+)'>:<'(?P<message>.*)'>$", re.DOTALL)
_SIMULATION_MARKER = "ClientAppException occurred. Message: "
_EXCEPTION_LINE = re.compile(r"^(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Interrupt|Exit)): ", re.MULTILINE)


def client_error_message(reason: str) -> str:
    """One line from the reason Flower gives for a ClientApp's exception: ``Type: message``.

    A SuperNode reports ``<class 'T'>:<'message'>``; the Simulation Runtime reports the
    Ray traceback with the message after "ClientAppException occurred. Message:". The
    type is left out for fedtune's own errors, whose messages name the value and the fix.
    """
    text = _ANSI.sub("", reason).strip()
    kind = ""
    match = _REASON.match(text)
    if match:
        kind, text = match["type"], match["message"]
    if _SIMULATION_MARKER in text:
        head, text = text.rsplit(_SIMULATION_MARKER, 1)
        kinds = [m["type"] for m in _EXCEPTION_LINE.finditer(head) if not m["type"].endswith("ClientAppException")]
        kind = kinds[0] if kinds else ""
    message = " ".join(text.split())
    if kind and not kind.startswith("fedtune."):
        message = f"{kind.rsplit('.', 1)[-1]}: {message}"
    return message


def _weighted_mean(pairs: list[tuple[float, float]]) -> float:
    pairs = [(v, w) for v, w in pairs if v == v]  # drop NaN (e.g. a client with no eval split)
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else float("nan")


def _client_resources(updates: Iterable[ClientUpdate]) -> list[dict[str, float]]:
    """Per client: bits per base weight, LoRA rank, base memory, peak process (and GPU) memory, seconds per step.

    Sorted by bits then rank, so mixed federations read the same every round.
    """
    rows = []
    for u in updates:
        m = u.metrics
        steps = m.get(protocol.TRAIN_STEPS, 0.0)
        rows.append({"base_bits": m.get(protocol.BASE_BITS), "lora_rank": m.get(protocol.LORA_RANK),
                     "base_weight_bytes": m.get(protocol.BASE_WEIGHT_BYTES),
                     "peak_rss_bytes": m.get(protocol.PEAK_RSS_BYTES),
                     "peak_gpu_bytes": m.get(protocol.PEAK_GPU_BYTES),
                     "step_seconds": m[protocol.TRAIN_SECONDS] / steps if steps and protocol.TRAIN_SECONDS in m else None})
    return sorted(rows, key=lambda r: (r["base_bits"] or 0, r["lora_rank"] or 0))


class FlowerStrategy(FlwrStrategy):
    """Runs any fedtune :class:`~fedtune.strategy.Strategy` under Flower's round loop.

    Parameters
    ----------
    strategy : Strategy
        The fedtune strategy (already initialised with the adapter spec).
    cfg : FedtuneConfig
        The run's configuration (sampling fractions, minimum clients, seed).
    on_metrics : callable
        Receives keyword metrics for the round in progress (the run log's ``add``).
    completed_rounds : int
        Rounds done before this start (a resumed run): Flower's round ``r`` is the run's
        round ``r + completed_rounds``.
    stop : threading.Event, optional
        Set to stop the run (Ctrl-C): replies that arrive afterwards are not aggregated.
    run_key : str
        The run's id, sent with every instruction (clients keep their own state under it).
    progress : RoundProgress, optional
        Told when a round's training or evaluation starts; names the clients' step files.
    """

    def __init__(self, strategy: Strategy, cfg: FedtuneConfig, on_metrics: Callable[..., None],
                 completed_rounds: int = 0, stop: threading.Event | None = None, run_key: str = "",
                 progress: RoundProgress | None = None) -> None:
        self.run_key = run_key
        self.progress = progress
        self.strategy = strategy
        self.cfg = cfg
        self.on_metrics = on_metrics
        self.completed_rounds = completed_rounds
        self.stop = stop
        self._expects: dict[int, ClientInstruction] = {}
        self._sent: list[tuple[Message, int]] = []  # (message, destination node) of the round in progress
        self.grid: Grid | None = None
        self.rejected: list[dict[str, Any]] = []
        self.averaging: Averaging = averaging_of(cfg)
        # Node id -> the partition it holds (None: it did not say), asked once per node and run.
        self._partition_of: dict[int, int | None] = {}

    # ------------------------------------------------------------------ sampling
    def _sample(self, grid: Grid, fraction: float, server_round: int, salt: int) -> list[int]:
        fed = self.cfg.federation
        wanted = max(fed.min_available_clients, fed.min_train_clients)
        deadline = time.monotonic() + fed.round_timeout
        while len(nodes := sorted(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            log.info("waiting for clients: %d connected, %d required", len(nodes), wanted)
            time.sleep(1)
        if not nodes:
            return []
        size = min(len(nodes), max(int(len(nodes) * fraction), min(fed.min_train_clients, len(nodes))))
        rng = random.Random(self.cfg.seed * 1_000_003 + server_round * 2 + salt)
        if size == len(nodes):
            return nodes
        # Draw from the nodes in partition order: Flower's node ids are random (a simulation
        # registers new ones every run), so drawing by id would train other partitions in a
        # rerun, or in the rounds of a resumed run, than the same seed did before.
        partition_of = self._partitions(grid, nodes)
        ordered = sorted(nodes, key=lambda n: (partition_of.get(n) is None, partition_of.get(n) or 0, n))
        return sorted(rng.sample(ordered, size))

    def _partitions(self, grid: Grid, nodes: list[int]) -> dict[int, int | None]:
        """Node id -> partition id, asking each node not asked before with one small query message."""
        unknown = [n for n in nodes if n not in self._partition_of]
        if unknown:
            queries = [Message(content=RecordDict({protocol.CONFIG: ConfigRecord({})}),
                               message_type=MessageType.QUERY, dst_node_id=n) for n in unknown]
            self._partition_of.update(dict.fromkeys(unknown))
            on_poll = getattr(grid, "on_poll", None)  # the progress display counts a round's replies, not these
            if on_poll is not None:
                grid.on_poll = None
            try:
                replies = list(grid.send_and_receive(queries, timeout=self.cfg.federation.round_timeout))
            finally:
                if on_poll is not None:
                    grid.on_poll = on_poll
            for reply in replies:
                metrics = None if reply.has_error() else reply.content.metric_records.get(protocol.METRICS)
                if metrics is not None and protocol.PARTITION_ID in metrics:
                    self._partition_of[reply.metadata.src_node_id] = int(metrics[protocol.PARTITION_ID])
            silent = [n for n in unknown if self._partition_of[n] is None]
            if silent:
                # Drawn after the others, by node id; a ClientApp that fails says why when it is sent work.
                log.warning("%d of %d clients did not say which partition they hold", len(silent), len(unknown))
        return self._partition_of

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.completed_rounds
        messages, down, step_files = [], [], []
        self._expects = {}
        self._sent = []
        for node_id in self._sample(grid, self.cfg.federation.fraction_train, server_round, 0):
            instruction = self.strategy.configure_client(server_round, node_id)
            self._expects[node_id] = instruction
            content = _instruction_content(server_round, instruction, self.run_key)
            content[protocol.CONFIG].update(config)  # what every training message carries
            # A node quantized by its own node config checks the strategy accepts that.
            content[protocol.CONFIG][protocol.QUANTIZED_BASE_OK] = bool(self.strategy.supports_quantized_base)
            down.append(wire_bytes(content))
            # Added after measuring: a local side channel (simulation), not part of the method's traffic.
            step_file = self.progress.step_file(server_round, node_id) if self.progress is not None else None
            if step_file is not None:
                content[protocol.CONFIG][protocol.STEP_FILE] = step_file
                step_files.append(step_file)
            messages.append(Message(content=content, message_type=MessageType.TRAIN, dst_node_id=node_id))
            self._sent.append((messages[-1], node_id))
        self.on_metrics(bytes_down=sum(down), bytes_down_per_client=sum(down) / max(len(down), 1),
                        clients_sampled=len(messages))
        if self.progress is not None:
            self.progress.start(server_round, "training", len(messages), step_files)
        return messages

    def _destinations(self) -> dict[str, int]:
        """Message id -> the node it was sent to (the grid sets ids in place when it pushes)."""
        return {m.metadata.message_id: node for m, node in self._sent if m.metadata.message_id}

    def _decode_reply(self, msg: Message, node_id: int, size: int) -> ClientUpdate:
        """Validate a reply of ``size`` bytes on the wire from ``node_id``; raise naming what is wrong."""
        if msg.has_error():
            raise InvalidUpdateError(f"client error: {msg.error.reason}")
        if node_id not in self._expects:
            raise InvalidUpdateError("reply from a client that was not sampled this round")
        content = msg.content
        limit = self.cfg.federation.max_message_bytes
        if size > limit:
            raise InvalidUpdateError(f"reply of {size:,} bytes exceeds federation.max_message_bytes={limit:,}")
        expects = self._expects[node_id].expects
        if protocol.METRICS not in content.metric_records:
            raise InvalidUpdateError(f"reply lacks the {protocol.METRICS!r} record")
        if expects and protocol.ARRAYS not in content.array_records:
            raise InvalidUpdateError(f"reply lacks the {protocol.ARRAYS!r} record")
        metrics = dict(content[protocol.METRICS])
        num_examples = metrics.pop(protocol.NUM_EXAMPLES, None)
        if not isinstance(num_examples, (int, float)) or num_examples < 0 or num_examples != num_examples:
            raise InvalidUpdateError(f"{protocol.NUM_EXAMPLES}={num_examples!r} must be a non-negative number")
        arrays = record_to_tensors(content[protocol.ARRAYS]) if protocol.ARRAYS in content.array_records else {}
        check_update(arrays, expects)
        bound = self.cfg.federation.max_update_norm
        if bound is not None and arrays:
            norm = change_norm(arrays, self._expects[node_id].arrays)
            if not norm <= bound:
                raise InvalidUpdateError(f"update norm {norm:.4g} exceeds federation.max_update_norm={bound:g}")
        # Ints (e.g. 63-bit seeds) and lists stay as they are: a float would round them.
        return ClientUpdate(node_id=node_id, arrays=arrays, num_examples=int(num_examples), metrics=metrics)

    def _check_replies(self, server_round: int, replies: list[Message], step: str) -> None:
        """Stop the run on Ctrl-C, or on the first reply of a ClientApp that raised."""
        if self.stop is not None and self.stop.is_set():
            raise RunInterrupted(f"stopped during round {server_round}")
        for msg in replies:
            if msg.has_error() and msg.error.code in FATAL_CLIENT_ERRORS:
                raise ClientAppError(f"round {server_round}: a client's {step} failed: "
                                     f"{client_error_message(msg.error.reason)}")

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.completed_rounds
        replies = list(replies)
        self._check_replies(server_round, replies, "training")
        updates, up, received, unavailable = [], [], 0, []
        destinations = self._destinations()
        for msg in replies:
            # An error reply for a node that went away comes from the SuperLink, not the node:
            # name the node the message was sent to.
            node_id = destinations.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            if msg.has_error() and msg.error.code == ErrorCode.NODE_UNAVAILABLE:
                unavailable.append(node_id)
                log.warning("round %d: client %d became unavailable during the round", server_round, node_id)
                continue
            received += 1
            size = 0 if msg.has_error() else wire_bytes(msg.content)
            if not msg.has_error():
                up.append(size)
            try:
                updates.append(self._decode_reply(msg, node_id, size))
            except InvalidUpdateError as e:
                self.rejected.append({"round": server_round, "client": node_id, "reason": str(e)})
                log.warning("round %d: rejected reply from client %d: %s", server_round, node_id, e)
        if unavailable:
            self.on_metrics(clients_unavailable=sorted(unavailable))
        missing = len(self._expects) - received
        self.on_metrics(bytes_up=sum(up), bytes_up_per_client=sum(up) / max(len(up), 1),
                        clients_aggregated=len(updates), clients_rejected=received - len(updates),
                        clients_missing=missing)
        if missing:
            log.warning("round %d: %d of %d sampled clients did not reply (unavailable, or not within "
                        "federation.round_timeout=%gs)", server_round, missing, len(self._expects),
                        self.cfg.federation.round_timeout)
        if len(updates) < self.cfg.federation.min_replies:
            log.warning("round %d: %d valid replies, fewer than federation.min_replies=%d; the global model "
                        "is unchanged", server_round, len(updates), self.cfg.federation.min_replies)
            self.on_metrics(clients_aggregated=0, round_skipped=True)
            return None, None
        # Replies arrive in any order: aggregate in partition order, so that a rerun (or a
        # resumed run, whose nodes may have new ids) sums in the same order, bit for bit.
        updates.sort(key=lambda u: (u.metrics.get(protocol.PARTITION_ID, -1), u.node_id))
        if sum(u.num_examples for u in updates) <= 0:
            log.warning("round %d: every reply has zero examples; the global adapter is unchanged", server_round)
            self.on_metrics(round_skipped=True)
            return None, None
        start = time.perf_counter()
        partitions = [int(u.metrics.get(protocol.PARTITION_ID, u.node_id)) for u in updates]
        with averaging_in_effect(self.averaging, partitions, server_round):
            strategy_metrics = self.strategy.aggregate(server_round, updates)
        strategy_metrics = {**strategy_metrics, **self.averaging.metrics}
        aggregation_seconds = time.perf_counter() - start
        global_tensors = self.strategy.global_adapter()
        bad = [k for k, v in global_tensors.items() if not torch.isfinite(v).all()]
        if bad:
            raise AggregationError(f"round {server_round}: aggregation produced non-finite values in {bad[:3]}")
        train_loss = _weighted_mean([(float(u.metrics.get(protocol.TRAIN_LOSS, float("nan"))), u.num_examples)
                                     for u in updates])
        load = max(float(u.metrics.get(protocol.MODEL_LOAD_SECONDS, 0.0)) for u in updates)
        spent = [float(u.metrics[protocol.DP_EPSILON]) for u in updates if protocol.DP_EPSILON in u.metrics]
        if spent:
            strategy_metrics = {**strategy_metrics, "dp_epsilon_max": max(spent)}
        self.on_metrics(train_loss=train_loss, aggregation_seconds=aggregation_seconds,
                        max_model_load_seconds=load, client_resources=_client_resources(updates), **strategy_metrics)
        return tensors_to_record(global_tensors), MetricRecord({"train_loss": train_loss})

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.completed_rounds
        if self.cfg.federation.fraction_evaluate == 0.0:
            return []
        messages, down = [], 0
        for node_id in self._sample(grid, self.cfg.federation.fraction_evaluate, server_round, 1):
            content = _instruction_content(server_round, self.strategy.configure_evaluation(server_round, node_id),
                                           self.run_key)
            content[protocol.CONFIG].update(config)
            down += wire_bytes(content)
            messages.append(Message(content=content, message_type=MessageType.EVALUATE, dst_node_id=node_id))
        self.on_metrics(eval_bytes_down=down)
        if self.progress is not None and messages:
            self.progress.start(server_round, "client evaluation", len(messages))
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        server_round += self.completed_rounds
        replies = list(replies)
        self._check_replies(server_round, replies, "evaluation")
        pairs_loss, pairs_acc, pairs_generative = [], [], []
        for msg in replies:
            if msg.has_error():
                log.warning("round %d: evaluation failed on client %d: %s", server_round,
                            msg.metadata.src_node_id, msg.error.reason)
                continue
            m = msg.content[protocol.METRICS]
            n = float(m.get(protocol.NUM_EXAMPLES, 0))
            pairs_loss.append((float(m.get(protocol.EVAL_LOSS, float("nan"))), n))
            pairs_acc.append((float(m.get(protocol.EVAL_ACCURACY, float("nan"))), n))
            if protocol.EVAL_GENERATIVE in m:
                pairs_generative.append((float(m[protocol.EVAL_GENERATIVE]),
                                         float(m.get(protocol.EVAL_GENERATIVE_EXAMPLES, 0))))
        if not pairs_loss:
            return None
        metrics = {"client_eval_loss": _weighted_mean(pairs_loss),
                   "client_eval_accuracy": _weighted_mean(pairs_acc)}
        key = generative_key(self.cfg.eval.metric, self.cfg.eval.options)
        if pairs_generative and key is not None:
            metrics[f"client_{key}"] = _weighted_mean(pairs_generative)
        self.on_metrics(**metrics)
        return MetricRecord({k: v for k, v in metrics.items() if v == v})

    def federated_evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """One evaluation round outside Flower's loop (the round-0 reference)."""
        assert self.grid is not None
        replies = self.grid.send_and_receive(
            self.configure_evaluate(server_round, arrays, self.shared_config(), self.grid),
            timeout=self.cfg.federation.round_timeout)
        return self.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        settings = {**self.strategy.hyperparameters(), **self.averaging.hyperparameters()}
        params = ", ".join(f"{k}={v}" for k, v in settings.items()) or "no options"
        log.info("strategy %s (%s): %s", self.strategy.name or type(self.strategy).__name__, params,
                 self.strategy.summary_line)

    def shared_config(self) -> ConfigRecord:
        """What every training and evaluation message carries besides its instruction: the run's key
        (the clients read everything else, the strategy's name included, from the run's config)."""
        return ConfigRecord({protocol.RUN_KEY: self.run_key})

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        self.grid = grid
        train_config = self.shared_config() if train_config is None else train_config
        evaluate_config = self.shared_config() if evaluate_config is None else evaluate_config
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)


def averaging_of(cfg: FedtuneConfig) -> Averaging:
    """The run's :class:`~fedtune.averaging.Averaging` (``strategy.robust``, ``strategy.server_optimizer``,
    client-level ``privacy``)."""
    robust, opt = cfg.strategy.robust, cfg.strategy.server_optimizer
    return build_averaging(robust.rule, robust.trim, robust.byzantine, robust.select,
                           opt.name, opt.lr, opt.momentum, opt.beta2, opt.tau, dp=client_dp_of(cfg))


def change_norm(reply: Mapping[str, torch.Tensor], sent: Mapping[str, torch.Tensor]) -> float:
    """L2 norm, in float64, of what a reply changes: ``reply - sent`` (``reply`` where nothing was sent)."""
    return update_norm({key: value.double() - sent[key].double()
                        if key in sent and sent[key].shape == value.shape else value
                        for key, value in reply.items()})


def _instruction_content(server_round: int, instruction: ClientInstruction, run_key: str = "") -> RecordDict:
    """The message content for one instruction (the arrays record only when there are arrays)."""
    content = RecordDict({protocol.CONFIG: ConfigRecord({
        protocol.SERVER_ROUND: server_round,
        protocol.RUN_KEY: run_key,
        protocol.ROUTINE: instruction.routine,
        protocol.TRAINABLE: "\n".join(instruction.trainable),
        **{protocol.STRATEGY_PREFIX + k: v for k, v in instruction.options.items()},
    })})
    if instruction.arrays:
        content[protocol.ARRAYS] = tensors_to_record(instruction.arrays)
    return content


__all__ = ["FlowerStrategy", "change_norm", "client_error_message"]
