"""Flower ClientApp: decode the server's message, run the client step, encode the reply."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

# fedtune.flower (this package) has quietened the libraries and loaded the stack already.
from fedtune import protocol
from fedtune.client import state as client_state
from fedtune.client.runtime import runtime_for
from fedtune.config import FedtuneConfig, config_from_run_config
from fedtune.flower.codec import record_to_tensors, tensors_to_record, wire_bytes
from fedtune.flower.federation_size import with_federation_size
from fedtune.reporting.progress import reporting_steps
from fedtune.routine import ClientReply, ClientState

# Where a client's own state lives in Flower's context.state (it follows the client across processes).
STATE_VALUES = "fedtune.client.runtime-state"
STATE_TENSORS = "fedtune.client.runtime-tensors"


def load_state(context: Context, config: ConfigRecord, partition_id: int) -> ClientState:
    """This client's :class:`~fedtune.routine.ClientState`: from ``context.state``, or from its
    disk when this Flower run has none yet (a resumed run; :mod:`fedtune.client.state`)."""
    records = context.state
    if STATE_VALUES in records.config_records or STATE_TENSORS in records.array_records:
        values = dict(records.config_records.get(STATE_VALUES, ConfigRecord()))
        tensors = record_to_tensors(records[STATE_TENSORS]) if STATE_TENSORS in records.array_records else {}
        return ClientState(values=values, tensors=tensors)
    run_key = config.get(protocol.RUN_KEY)
    if not run_key:
        return ClientState()
    return client_state.load_state(str(run_key), partition_id, int(config[protocol.SERVER_ROUND]))


def store_state(context: Context, config: ConfigRecord, partition_id: int, state: ClientState) -> None:
    """Keep what the routine left in ``state``: in ``context.state`` and on this client's disk."""
    records = context.state
    had_state = STATE_VALUES in records.config_records or STATE_TENSORS in records.array_records
    if not (state.values or state.tensors or had_state):
        return  # a routine that keeps nothing writes nothing
    context.state[STATE_VALUES] = ConfigRecord(state.values)
    if state.tensors:
        context.state[STATE_TENSORS] = tensors_to_record(state.tensors)
    elif STATE_TENSORS in context.state.array_records:
        del context.state[STATE_TENSORS]
    if config.get(protocol.RUN_KEY):
        client_state.save_state(str(config[protocol.RUN_KEY]), partition_id, int(config[protocol.SERVER_ROUND]),
                                state)


# Checked configs by the run config they came from: a process parses and checks a run's config once,
# however many messages (rounds, virtual clients) it serves. A few runs at most share a process.
_CONFIGS: dict[str, FedtuneConfig] = {}
_CONFIGS_KEPT = 8


def _config(context: Context, fixed_run_config: Mapping[str, Any] | None) -> tuple[FedtuneConfig, str]:
    """The run's checked config, and the run config's key it is cached under."""
    run_config = {**dict(context.run_config), **dict(fixed_run_config or {})}
    if protocol.NUM_PARTITIONS in context.node_config:
        # A run config without federation.num_clients takes the federation's size, as the server does.
        run_config = with_federation_size(run_config, int(context.node_config[protocol.NUM_PARTITIONS]))
    key = repr(sorted((str(k), repr(v)) for k, v in run_config.items()))
    if key not in _CONFIGS:
        if len(_CONFIGS) >= _CONFIGS_KEPT:
            del _CONFIGS[next(iter(_CONFIGS))]
        # The strategy runs on the server only: clients need not be able to import it.
        _CONFIGS[key] = config_from_run_config(run_config, check_strategy=False)
    return _CONFIGS[key], key


def _partition_id(context: Context, cfg: FedtuneConfig) -> int:
    node = context.node_config
    if protocol.PARTITION_ID not in node:
        raise ValueError(f"node_config has no {protocol.PARTITION_ID!r}; start the SuperNode with "
                         f"--node-config \"{protocol.PARTITION_ID}=0 {protocol.NUM_PARTITIONS}=N\"")
    if protocol.NUM_PARTITIONS in node and int(node[protocol.NUM_PARTITIONS]) != cfg.federation.num_clients:
        raise ValueError(f"the federation has {node[protocol.NUM_PARTITIONS]} nodes but "
                         f"federation.num_clients={cfg.federation.num_clients}; make them equal")
    return int(node[protocol.PARTITION_ID])


def _arrays(msg: Message) -> dict:
    """The message's tensors (none for strategies that send only scalars)."""
    return record_to_tensors(msg.content[protocol.ARRAYS]) if protocol.ARRAYS in msg.content.array_records else {}


def _reply(msg: Message, reply: ClientReply, cfg: FedtuneConfig, partition_id: int) -> Message:
    return Message(content=reply_content(reply, cfg, partition_id), reply_to=msg)


def reply_content(reply: ClientReply, cfg: FedtuneConfig, partition_id: int) -> RecordDict:
    """The reply's records; raises if they exceed ``federation.max_message_bytes``."""
    metrics = MetricRecord({**reply.metrics, protocol.NUM_EXAMPLES: reply.num_examples,
                            protocol.PARTITION_ID: partition_id})
    content = RecordDict({protocol.METRICS: metrics})
    if reply.arrays:
        content[protocol.ARRAYS] = tensors_to_record(reply.arrays)
    size, limit = wire_bytes(content), cfg.federation.max_message_bytes
    if size > limit:
        # Fails this message instead of sending what the server would reject; the server then
        # stops the run with this reason (the reply would be as large next round).
        raise ValueError(f"the reply would be {size:,} bytes, more than federation.max_message_bytes={limit:,}; "
                         f"raise the limit or send a smaller adapter (lower adapter.rank or target_modules)")
    return content


def make_client_app(fixed_run_config: Mapping[str, Any] | None = None) -> ClientApp:
    """A ClientApp; ``fixed_run_config`` (our CLI's config) takes precedence over Flower's run_config."""
    app = ClientApp()

    @app.query()
    def partition(msg: Message, context: Context) -> Message:
        """Which partition this node holds: the server draws clients by partition, not by node id."""
        cfg, _ = _config(context, fixed_run_config)
        metrics = MetricRecord({protocol.PARTITION_ID: _partition_id(context, cfg)})
        return Message(content=RecordDict({protocol.METRICS: metrics}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, key = _config(context, fixed_run_config)
        config: ConfigRecord = msg.content[protocol.CONFIG]
        partition_id = _partition_id(context, cfg)
        state = load_state(context, config, partition_id)
        with reporting_steps(str(config.get(protocol.STEP_FILE, ""))):
            reply = runtime_for(cfg, context.run_id, context.node_config, config_key=key).train(
                partition_id=partition_id,
                server_round=int(config[protocol.SERVER_ROUND]),
                arrays=_arrays(msg),
                trainable=str(config[protocol.TRAINABLE]).splitlines(),
                routine=str(config[protocol.ROUTINE]),
                config=dict(config),
                state=state,
            )
        store_state(context, config, partition_id, state)
        return _reply(msg, reply, cfg, partition_id)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, key = _config(context, fixed_run_config)
        config: ConfigRecord = msg.content[protocol.CONFIG]
        partition_id = _partition_id(context, cfg)
        reply = runtime_for(cfg, context.run_id, context.node_config, config_key=key).evaluate(
            partition_id, _arrays(msg), routine=str(config.get(protocol.ROUTINE, protocol.DEFAULT_ROUTINE)),
            config=dict(config), trainable=str(config.get(protocol.TRAINABLE, "")).splitlines(),
            server_round=int(config[protocol.SERVER_ROUND]), state=load_state(context, config, partition_id))
        return _reply(msg, reply, cfg, partition_id)

    return app


app = make_client_app()
