"""What Flower 1.42's SecAgg+ needs, checked against the installed Flower (README: "Secure aggregation").

fedtune's ServerApp runs a Message-API strategy (``Strategy.start``) with a plain ``Context``, and
its replies carry fedtune's own records. Flower's SecAgg+ server workflow accepts only the legacy
workflow's ``LegacyContext``, and its client mod reads the legacy ``fitres`` records, so neither
half carries a fedtune update. If a Flower release lifts either, these tests fail: time to wire it.
"""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, MetricRecord, RecordDict
from flwr.compat.common import recorddict_compat
from flwr.server.workflow import SecAggPlusWorkflow

from fedtune.flower.codec import tensors_to_record


def test_the_secagg_plus_server_workflow_needs_the_legacy_context() -> None:
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(TypeError, match="Expect a LegacyContext, but get Context"):
        SecAggPlusWorkflow(num_shares=3, reconstruction_threshold=2)(None, context)


def test_the_secagg_plus_client_mod_reads_legacy_fit_results_not_a_fedtune_reply() -> None:
    reply = RecordDict({"arrays": tensors_to_record({"w": torch.ones(2)}), "metrics": MetricRecord({"n": 3})})
    with pytest.raises(KeyError, match="fitres.parameters"):
        recorddict_compat.recorddict_to_fitres(reply, keep_input=True)
