"""Quantized bases (bitsandbytes 8-bit and 4-bit on CPU) and federations that mix them.

Everything runs on the tiny local BERT (``tiny_bert``); the pre-quantized copies go to a
temporary ``FEDTUNE_CACHE``.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fedtune.strategies.flora.residual import residual_of

from fedtune import protocol
from fedtune.client.runtime import ClientRuntime, client_settings
from fedtune.client.training import train_adapter
from fedtune.config import AdapterConfig, DataConfig, ModelConfig, TrainConfig, load_config
from fedtune.data import load_splits, tokenize
from fedtune.errors import ConfigError
from fedtune.models.loading import get_adapter, load_base_model, resolve_model_path
from fedtune.models.quantization import bnb_config, checkpoint_folder, weight_bytes
from fedtune.objectives import evaluate
from fedtune.strategy import AdapterSpec, ClientUpdate, build_strategy, check_update, registered_strategies

SETTINGS = ("none", "8bit", "4bit")
LORA = r"\.lora_[AB]\.weight$"


@pytest.fixture(scope="module", autouse=True)
def quantized_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Pre-quantized checkpoints go to a temporary cache (Ray workers inherit the variable)."""
    folder = tmp_path_factory.mktemp("fedtune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDTUNE_CACHE", str(folder))
        yield folder


def handle_for(tiny_bert: str, quantization: str, rank: int = 4, **model: object):
    return get_adapter(ModelConfig(name=tiny_bert, quantization=quantization, **model),  # type: ignore[arg-type]
                       AdapterConfig(rank=rank), 4, seed=0)


@pytest.fixture(scope="module")
def data(tiny_bert: str):
    handle = handle_for(tiny_bert, "none")
    pool, test = load_splits(DataConfig(max_examples=64, max_test_examples=32, max_length=24), "classification")
    return (tokenize(pool, handle.tokenizer, "classification", 24), tokenize(test, handle.tokenizer,
                                                                             "classification", 24))


# --------------------------------------------------------------------------- configuration


def test_bad_quantization_settings_name_the_key_the_value_and_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.quantization=3bit", "model.quant_type=nf3", "model.compute_dtype=float8",
                           "model.client_quantization=[4bit,2bit]", "model.server_quantization=int4"])
    text = "\n".join(err.value.problems)
    for needle in ("model.quantization='3bit' is not a quantization; use one of ('none', '8bit', '4bit')",
                   "model.quant_type='nf3' is not a 4-bit type; use one of ('nf4', 'fp4')",
                   "model.compute_dtype='float8'", "model.client_quantization=['4bit', '2bit']",
                   "model.server_quantization='int4'"):
        assert needle in text


def test_per_client_settings_in_simulation_and_per_node_in_a_deployment() -> None:
    cfg = load_config(None, ["model.client_quantization=[4bit,8bit,none]", "adapter.client_ranks=[8,16,16]",
                             "strategy.name=flora"])
    got = [(m.quantization, a.rank) for m, a in (client_settings(cfg, i) for i in range(4))]
    assert got == [("4bit", 8), ("8bit", 16), ("none", 16), ("4bit", 8)]
    # A SuperNode's --node-config overrides both lists for its own client.
    model, adapter = client_settings(cfg, 2, {"partition-id": 2, "model.quantization": "4bit",
                                              "model.double_quant": "true", "adapter.rank": "8"})
    assert (model.quantization, model.double_quant, adapter.rank) == ("4bit", True, 8)
    assert model.client_quantization is None and adapter.client_ranks is None
    with pytest.raises(ConfigError, match=r"node_config model.name='x' cannot be set per node"):
        client_settings(cfg, 0, {"model.name": "x"})
    with pytest.raises(ConfigError, match=r"node_config: model.quantization='2bit' is not a quantization"):
        client_settings(cfg, 0, {"model.quantization": "2bit"})
    with pytest.raises(ConfigError, match=r"node_config .*adapter.rank"):
        client_settings(cfg, 0, {"adapter.rank": "eight"})


def test_a_supernode_node_config_reaches_client_settings_as_flower_parses_it() -> None:
    """``flower-supernode --node-config "..."`` goes through Flower's own parser into dotted keys."""
    from flwr.common.config import parse_config_args

    node = parse_config_args(["partition-id=1 num-partitions=4 model.quantization='4bit' model.quant_type='fp4' "
                              "adapter.rank=8"])
    assert node["model.quantization"] == "4bit" and node["adapter.rank"] == 8
    model, adapter = client_settings(load_config(None, ["federation.num_clients=4"]), 1, node)
    assert (model.quantization, model.quant_type, adapter.rank) == ("4bit", "fp4", 8)


def test_the_example_config_mixes_quantizations_and_ranks(shared_data: Path) -> None:
    cfg = load_config(Path(__file__).resolve().parents[1] / "simulations" / "flora_quantized_clients.yaml")
    got = [(m.quantization, a.rank) for m, a in (client_settings(cfg, i) for i in range(cfg.federation.num_clients))]
    assert got[:4] == [("4bit", 8), ("8bit", 16), ("none", 16), ("4bit", 8)]


def test_the_server_keeps_an_unquantized_base_unless_told_otherwise() -> None:
    cfg = load_config(None, ["model.quantization=4bit"])
    assert cfg.model.for_server().quantization == "none"
    assert cfg.model.for_client(0).quantization == "4bit"
    assert load_config(None, ["model.server_quantization=8bit"]).model.for_server().quantization == "8bit"


# --------------------------------------------------------------------------- loading


def test_quantized_bases_coexist_in_one_process_and_are_built_once(tiny_bert: str) -> None:
    import bitsandbytes as bnb

    handles = {q: handle_for(tiny_bert, q) for q in SETTINGS}
    assert len({id(h.model) for h in handles.values()}) == 3
    assert all(handle_for(tiny_bert, q) is handles[q] for q in SETTINGS)  # reused, not rebuilt
    layer_type = {q: type(h.model.get_submodule("base_model.model.bert.encoder.layer.0.attention.self.query"
                                                ).base_layer) for q, h in handles.items()}
    assert layer_type == {"none": torch.nn.Linear, "8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}
    # The head stays a plain, trainable float32 linear layer on every base.
    for h in handles.values():
        assert type(h.model.base_model.model.classifier.original_module) is torch.nn.Linear
    sizes = {q: weight_bytes(h.model) for q, h in handles.items()}
    assert sizes["4bit"] < sizes["8bit"] < sizes["none"]


def test_weight_bytes_count_packed_weights_and_their_quantization_state(tiny_bert: str) -> None:
    """On one linear layer: 32x32 weights in 4 bits, plus one float32 absmax per block of 64, plus the code."""
    base = handle_for(tiny_bert, "4bit").model.get_submodule(
        "base_model.model.bert.encoder.layer.0.attention.self.query").base_layer
    # 1024 weights / 2 per byte = 512 B; 16 absmax x 4 B = 64 B; NF4 code: 16 float32 = 64 B; bias 32 x 4 B.
    assert weight_bytes(base) == 512 + 64 + 64 + 128
    base8 = handle_for(tiny_bert, "8bit").model.get_submodule(
        "base_model.model.bert.encoder.layer.0.attention.self.query").base_layer
    assert weight_bytes(base8) == 1024 + 32 * 4 + 128  # int8 weights, one float32 scale per row, bias


def test_a_pre_quantized_checkpoint_reloads_bitwise(tiny_bert: str) -> None:
    from transformers import AutoModelForSequenceClassification

    cfg = ModelConfig(name=tiny_bert, quantization="4bit", double_quant=True, quant_type="fp4")
    torch.manual_seed(0)
    direct = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4, dtype=torch.float32,
                                                                quantization_config=bnb_config(cfg),
                                                                device_map="cpu")
    loaded = load_base_model(cfg, 4, seed=0)
    assert (checkpoint_folder(cfg, resolve_model_path(tiny_bert), 4, 0) / "config.json").is_file()
    a, b = direct.state_dict(), loaded.state_dict()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_wire_names_dtypes_and_initial_adapter_are_the_same_on_every_base(tiny_bert: str) -> None:
    states = {q: handle_for(tiny_bert, q).state() for q in SETTINGS}
    reference = states["none"]
    for q, state in states.items():
        assert sorted(state) == sorted(reference), q
        assert all(state[k].dtype == reference[k].dtype == torch.float32 for k in state), q
        # Same seeded initialisation: FFA-LoRA's frozen-A digest and FLoRA's fresh start hold across bases.
        assert all(torch.equal(state[k], reference[k]) for k in state), q


def test_a_bfloat16_run_sends_the_same_dtypes_from_quantized_clients(tiny_bert: str) -> None:
    full = handle_for(tiny_bert, "none", dtype="bfloat16").state()
    four = handle_for(tiny_bert, "4bit", dtype="bfloat16")
    assert {k: v.dtype for k, v in four.state().items()} == {k: v.dtype for k, v in full.items()}
    assert full["base_model.model.classifier.weight"].dtype == torch.bfloat16
    # On the quantized client itself the head trains in float32 (PEFT's k-bit preparation).
    assert four.params["base_model.model.classifier.weight"].dtype == torch.float32


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_client_trains_evaluates_and_trains_again(tiny_bert: str, data, quantization: str) -> None:
    train, test = data
    handle = handle_for(tiny_bert, quantization)
    packed = {n: t.clone() for n, t in handle.model.state_dict().items() if t.dtype in (torch.uint8, torch.int8)}
    assert packed
    handle.load({})
    handle.set_trainable([".*"])
    cfg = TrainConfig(local_steps=4, batch_size=8, learning_rate=1e-2)
    first = train_adapter(handle, train, cfg, seed=0)
    assert first.steps == 4 and first.loss == first.loss
    assert any(not torch.equal(v, handle.initial[k]) for k, v in handle.state().items())
    # Evaluation (no gradients) must not switch the 4-bit layers to bitsandbytes' inference-only
    # CPU layout: the gradients of the next training step must be those of a never-evaluated model.
    start = handle.state()
    before = _gradients(handle, train)
    assert evaluate(handle, test, 16)["loss"] == evaluate(handle, test, 16)["loss"]
    handle.load(start)
    after = _gradients(handle, train)
    assert all(torch.equal(before[k], after[k]) for k in before)
    now = {n: t for n, t in handle.model.state_dict().items() if n in packed}
    assert all(torch.equal(packed[n], now[n]) for n in packed)  # the base never moves


def _gradients(handle, train) -> dict[str, torch.Tensor]:
    from fedtune.data.tokenize import collate

    batch = collate([train[i] for i in range(8)], handle.tokenizer.pad_token_id)
    handle.model.train()
    handle.model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # dropout
    handle.model(**batch).loss.backward()
    handle.model.eval()
    return {k: p.grad.clone() for k, p in handle.params.items() if p.grad is not None}


def test_a_merged_update_sits_beside_a_quantized_base_exactly(tiny_bert: str) -> None:
    """FLoRA's merge on a 4-bit layer: y = layer(x) + (x @ Aᵀ) @ Bᵀ, the packed weights untouched."""
    handle = handle_for(tiny_bert, "4bit")
    handle.load({})
    name = "base_model.model.bert.encoder.layer.1.attention.self.value"
    layer = handle.model.get_submodule(name)
    packed = layer.base_layer.weight.data.clone()
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    a = 1e-2 * torch.randn(4, 32, generator=torch.Generator().manual_seed(1))  # B·A far below the 4-bit step
    b = 1e-2 * torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    residual = residual_of(handle.model)
    residual.claim("test-merge")
    with torch.no_grad():
        plain = layer(x)
        residual.add(name, a, b)
        merged = layer(x)
    residual.clear()
    assert torch.equal(layer.base_layer.weight.data, packed)
    # float32 rounding of short dot products, relative to outputs of size ~1.
    torch.testing.assert_close(merged - plain, x @ (b @ a).T, rtol=0, atol=1e-6)


def test_a_base_that_fell_behind_catches_up_from_another_base_of_the_run() -> None:
    """A process holding a 4-bit and an unquantized base merges each round once, whichever base trains.

    The server sends the history since the oldest round any client has seen, assuming one
    merged state per process; the second base starts from the first one's merges.
    """
    from fedtune.strategies.flora.residual import Residual, residual_of

    gen = torch.Generator().manual_seed(0)
    first, second, other_run = (torch.nn.ModuleDict({"lin": torch.nn.Linear(6, 4)}) for _ in range(3))
    rounds = {r: {"lin": (torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen))} for r in (1, 2, 3)}
    ahead = residual_of(first)
    ahead.claim("run-a")
    ahead.merge_rounds({1: rounds[1], 2: rounds[2]})
    behind = residual_of(second)
    behind.claim("run-a")
    assert behind.catch_up() == 2
    assert behind.merge_rounds({3: rounds[3]}) == [3] and ahead.merge_rounds({3: rounds[3]}) == [3]
    assert torch.equal(behind.deltas["lin"].to_dense(), ahead.deltas["lin"].to_dense())  # bitwise: same factors, same order
    stranger = residual_of(other_run)
    stranger.claim("run-b")
    assert stranger.catch_up() == 0 and not stranger.deltas
    assert isinstance(ahead, Residual)


def test_zeroth_order_steps_tune_the_adapter_of_a_quantized_base(tiny_bert: str, data) -> None:
    """FedKSeed's mode (forward passes only, on adapter tensors): replaying the steps gives the same adapter."""
    from fedtune.strategies.fedkseed.zeroth_order import replay, seed_pool, zo_train

    from fedtune.data.tokenize import collate

    train, _ = data
    handle = handle_for(tiny_bert, "4bit")
    handle.load({})
    params = {k: p for k, p in handle.params.items() if "lora_B" in k}
    batches = [collate([train[i] for i in range(j, j + 8)], handle.tokenizer.pad_token_id) for j in (0, 8)]

    @torch.no_grad()
    def loss(batch: dict) -> float:
        return float(handle.model(**batch).loss)

    result = zo_train(params, batches, loss, seed_pool(0, 16), None, steps=4, eps=1e-2, lr=1e-2, rng_seed=0)
    assert len(result.history) == 4
    rebuilt = {k: handle.initial[k].clone() for k in params}
    replay(rebuilt, result.history, 1e-2)
    assert all(torch.equal(rebuilt[k], params[k].detach()) for k in params)
    assert any(not torch.equal(rebuilt[k], handle.initial[k]) for k in params)


def test_an_adapter_saved_on_a_quantized_base_loads_on_the_unquantized_base(tiny_bert: str, data,
                                                                              tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    handle = handle_for(tiny_bert, "4bit", double_quant=True)
    handle.load({})
    handle.set_trainable([".*"])
    train_adapter(handle, data[0], TrainConfig(local_steps=2, batch_size=8, learning_rate=1e-2), seed=0)
    handle.save(tmp_path / "adapter")
    assert "quantization" not in (tmp_path / "adapter" / "adapter_config.json").read_text()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4)
    model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    loaded = {k: v for k, v in model.named_parameters() if ".lora_" in k or "modules_to_save" in k}
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(loaded) == len(saved) == len(handle.params)
    state = handle.state()
    for key, value in saved.items():
        assert torch.equal(value, state[key]), key


# --------------------------------------------------------------------------- strategies


def _runtime(tiny_bert: str, *extra: str) -> ClientRuntime:
    cfg = load_config(None, [f"model.name={tiny_bert}", "model.client_quantization=[4bit,8bit]",
                             "federation.num_clients=2", "data.max_examples=64", "data.max_test_examples=32",
                             "data.max_length=24", "train.local_steps=2", "train.batch_size=8",
                             "train.learning_rate=5e-3", "adapter.rank=4", "partition.method=iid", *extra])
    return ClientRuntime(cfg, run_id=hash(extra))


def _gradient_strategies() -> list[str]:
    return sorted(registered_strategies())


@pytest.mark.parametrize("name", _gradient_strategies())
def test_every_registered_strategy_runs_on_quantized_clients(tiny_bert: str, name: str) -> None:
    """Two rounds with a 4-bit and an 8-bit client and the server on the unquantized base, without Flower;
    a strategy that cannot train on a quantized base is refused at start-up, naming the combination.

    The real client path (residual merges, frozen-tensor digests, wire dtypes) and the real
    strategy; only the messages are skipped.
    """
    if not registered_strategies()[name].supports_quantized_base:
        with pytest.raises(ConfigError) as excinfo:
            _runtime(tiny_bert, f"strategy.name={name}")
        assert f"strategy.name={name!r}" in str(excinfo.value) and "4bit/8bit" in str(excinfo.value)
        return
    # FedKSeed tunes the base weights by default (refused on a quantized base); its adapter mode is for these.
    extra = ["strategy.options.tune=adapter"] if name.startswith("fedkseed") else []
    runtime = _runtime(tiny_bert, f"strategy.name={name}", *extra)
    cfg = runtime.cfg
    strategy = build_strategy(name, cfg.strategy.options)
    server = get_adapter(cfg.model.for_server(), cfg.adapter, 4, cfg.seed)
    strategy.initialize(AdapterSpec(initial=dict(server.initial), rank=cfg.adapter.rank, alpha=cfg.adapter.alpha))
    for server_round in (1, 2):
        updates = []
        for client in (0, 1):
            instruction = strategy.configure_client(server_round, client)
            config = {protocol.STRATEGY_PREFIX + k: v for k, v in instruction.options.items()}
            reply = runtime.train(client, server_round, instruction.arrays, instruction.trainable, instruction.routine,
                                  {**config, protocol.QUANTIZED_BASE_OK: strategy.supports_quantized_base})
            check_update(reply.arrays, instruction.expects)
            assert reply.metrics[protocol.BASE_BITS] == (4.0, 8.0)[client]
            updates.append(ClientUpdate(client, reply.arrays, reply.num_examples, reply.metrics))
        strategy.aggregate(server_round, updates)
    strategy.load_global(server)
    _, test = load_splits(cfg.data, cfg.model.task)
    result = evaluate(server, tokenize(test, server.tokenizer, "classification", 24), 32)
    assert torch.isfinite(torch.tensor(result["loss"]))
    residual_of(server.model).clear()


UNSUPPORTED = '''
from fedtune.strategies.fedit import FedIT


class NeedsFullPrecision(FedIT):
    """A strategy whose initialisation differentiates with respect to the base weights."""

    supports_quantized_base = False
    quantized_base_reason = "its initialisation needs gradients with respect to the base weights"
'''


def test_a_strategy_that_cannot_use_a_quantized_base_is_refused_at_start_up(tiny_bert: str, tmp_path: Path) -> None:
    module = tmp_path / "needs_full.py"
    module.write_text(textwrap.dedent(UNSUPPORTED))
    name = f"{module}:NeedsFullPrecision"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"strategy.name={name}", "model.client_quantization=[4bit,none]"])
    (problem,) = err.value.problems
    assert problem.startswith(f"model.client_quantization=['4bit', 'none'] puts strategy.name={name!r} on a 4bit "
                              "base, which it does not support (its initialisation needs gradients")
    assert "use model.quantization=none or a strategy that supports quantized bases: ['fedit'" in problem
    load_config(None, [f"strategy.name={name}"])  # unquantized: fine
    # A node quantized by its own node config is not known at start-up: it refuses the round itself.
    runtime = ClientRuntime(load_config(None, [f"model.name={tiny_bert}", "data.max_examples=64", "strategy.name=fed-sb"],
                                        check_strategy=False), node_config={"model.quantization": "8bit"})
    with pytest.raises(ValueError, match=r"strategy.name='fed-sb' does not support a quantized base.*'8bit'"):
        runtime.train(0, 1, {}, (".*",), "gradient", {protocol.QUANTIZED_BASE_OK: False})


# --------------------------------------------------------------------------- a Flower federation


@pytest.mark.integration
def test_a_4bit_an_8bit_and_a_full_precision_client_federate(tiny_bert: str, tmp_path: Path) -> None:
    """FLoRA with a 4-bit rank-4 client and 8-bit and float32 rank-8 clients, through Flower.

    The merged updates sit beside each client's base, the server evaluates on the
    unquantized base, and the exported adapter loads there and reproduces the last evaluation.
    """
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedtune.flower.simulation import simulate
    from fedtune.models.loading import AdapterHandle
    from fedtune.reporting.runlog import ADAPTER_DIR, CONFIG_FILE, METRICS_FILE

    overrides = [f"model.name={tiny_bert}", "model.task=classification", "federation.num_clients=3",
                 "federation.num_rounds=2", "federation.client_cpus=1", "data.max_examples=240",
                 "data.max_test_examples=60", "data.max_length=32", "train.batch_size=16",
                 "train.learning_rate=5e-3", "partition.method=iid", f"output.dir={tmp_path}",
                 "output.progress=false", "strategy.name=flora", "adapter.client_ranks=[4,8,8]",
                 "model.client_quantization=[4bit,8bit,none]", "model.double_quant=true"]
    run_dir = simulate(load_config(None, overrides))
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    for row in rows[1:]:
        assert row["clients_aggregated"] == 3 and row["clients_rejected"] == 0
        assert row["aggregation_error"] <= 1e-6 and row["stacked_rank"] == 20.0
        resources = row["client_resources"]
        assert [(r["base_bits"], r["lora_rank"]) for r in resources] == [(4, 4), (8, 8), (32, 8)]
        sizes = [r["base_weight_bytes"] for r in resources]
        # Not 4-bit < 8-bit here: on 32x32 layers, double quantization's per-layer 256-entry
        # code table (1 KiB) outweighs the 512 bytes that 4 bits save over 8.
        assert max(sizes[:2]) < sizes[2]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]

    cfg = load_config(run_dir / CONFIG_FILE)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4)
    model = PeftModel.from_pretrained(base, str(run_dir / ADAPTER_DIR))
    assert model.peft_config["default"].r == 40  # two rounds of 4 + 8 + 8
    _, test = load_splits(cfg.data, cfg.model.task)
    handle = AdapterHandle(model=model, tokenizer=get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=4), 4,
                                                              0).tokenizer,
                           adapter_name="default", params={}, initial={}, task="classification")
    result = evaluate(handle, tokenize(test, handle.tokenizer, "classification", cfg.data.max_length), 64)
    # The exported adapter is the merged model the server evaluated (float32 sums in another order).
    assert result["loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)
