"""End to end through Flower's Simulation Runtime on a tiny local model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fedtune.config import load_config
from fedtune.flower.simulation import simulate
from fedtune.reporting.plots import ACCURACY_LOSS_PNG, TRAFFIC_PNG
from fedtune.reporting.runlog import ADAPTER_DIR, CONFIG_FILE, METRICS_FILE, MODEL_DIR

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
REQUIRED_KEYS = {"round", "strategy", "train_loss", "eval_loss", "eval_accuracy", "bytes_up", "bytes_down",
                 "round_seconds"}


def tiny_overrides(model: str, out: Path, rounds: int = 2) -> list[str]:
    return [f"model.name={model}", "model.task=classification", "federation.num_clients=3",
            f"federation.num_rounds={rounds}", "federation.client_cpus=1", "data.max_examples=240",
            "data.max_test_examples=60", "data.max_length=32", "train.batch_size=16", "train.learning_rate=5e-3",
            "adapter.rank=4", "partition.method=iid", f"output.dir={out}", "output.progress=false"]


def read_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


# The shared run also logs to TensorBoard when its extra is installed (CI installs it): the
# server's tracker hooks, checked in test_the_run_logged_every_round_to_tensorboard.
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


@pytest.fixture(scope="module")
def fedit_run(tiny_bert: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fedit-run")
    trackers = ["output.trackers=[tensorboard]"] if HAS_TENSORBOARD else []
    return simulate(load_config(None, tiny_overrides(tiny_bert, out) + trackers))


def test_run_directory_has_config_metrics_adapter_and_plots(fedit_run: Path) -> None:
    assert (fedit_run / CONFIG_FILE).is_file()
    assert (fedit_run / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    for name in (ACCURACY_LOSS_PNG, TRAFFIC_PNG):  # output.plots is on by default
        assert (fedit_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = read_rows(fedit_run)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[0]["eval_accuracy"] is not None  # round 0: the untuned base model
    for row in rows[1:]:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
        assert row["strategy"] == "fedit"
        assert row["clients_aggregated"] == 3 and row["clients_rejected"] == 0
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0


@pytest.mark.skipif(not HAS_TENSORBOARD, reason="needs the tensorboard extra: pip install 'fedtune[tensorboard]'")
def test_the_run_logged_every_round_to_tensorboard(fedit_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedtune.reporting.trackers import TENSORBOARD_DIR

    events = EventAccumulator(str(fedit_run / TENSORBOARD_DIR))
    events.Reload()
    rows = read_rows(fedit_run)
    # TensorBoard stores scalars as float32.
    assert [(e.step, e.value) for e in events.Scalars("eval_accuracy")] == [
        (r["round"], pytest.approx(r["eval_accuracy"], rel=1e-6)) for r in rows]
    assert [e.step for e in events.Scalars("bytes_up")] == [r["round"] for r in rows if r.get("bytes_up") is not None]
    assert events.Tensors("adapter/text_summary")  # the finished run recorded its adapter


def test_bytes_up_match_the_adapter_size(fedit_run: Path) -> None:
    """FedIT uploads every adapter tensor in float32: 3 clients x 4 bytes x parameters, plus headers."""
    from safetensors.torch import load_file

    adapter = load_file(str(fedit_run / ADAPTER_DIR / "adapter_model.safetensors"))
    payload = 3 * 4 * sum(t.numel() for t in adapter.values())
    up = read_rows(fedit_run)[1]["bytes_up"]
    # Each tensor travels as an Array object plus an ArrayChunk object, with a NumPy header and
    # two 64-character object ids: ~550 bytes per tensor measured, 700 allowed.
    assert payload <= up <= payload + 3 * 700 * (len(adapter) + 2)


def test_saved_adapter_loads_and_reproduces_the_last_evaluation(fedit_run: Path, tiny_bert: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.data import load_splits, tokenize
    from fedtune.models.loading import AdapterHandle
    from fedtune.objectives import evaluate

    cfg = load_config(fedit_run / CONFIG_FILE)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4)
    model = PeftModel.from_pretrained(base, str(fedit_run / ADAPTER_DIR))
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    _, test = load_splits(cfg.data, cfg.model.task)
    handle = AdapterHandle(model=model, tokenizer=tokenizer, adapter_name="default", params={}, initial={},
                           task="classification")
    result = evaluate(handle, tokenize(test, tokenizer, "classification", cfg.data.max_length), 64)
    last = read_rows(fedit_run)[-1]
    assert result["accuracy"] == pytest.approx(last["eval_accuracy"], abs=1e-9)
    # float32 logits summed in a different batch order can differ in the last bits.
    assert result["loss"] == pytest.approx(last["eval_loss"], rel=1e-5)


def test_run_directory_names_the_labels_and_the_central_test_set(fedit_run: Path) -> None:
    from transformers import AutoConfig

    from fedtune.data import load_splits
    from fedtune.data.labels import read_labels
    from fedtune.data.provenance import TEST_SET_FILE, examples_sha256

    names = ["world", "sports", "business", "science"]
    assert read_labels(fedit_run) == names
    assert AutoConfig.from_pretrained(fedit_run / ADAPTER_DIR).id2label == dict(enumerate(names))
    record = json.loads((fedit_run / TEST_SET_FILE).read_text())
    _, test = load_splits(load_config(fedit_run / CONFIG_FILE).data, "classification")
    assert record["source"] == "generated:topics" and record["num_examples"] == 60
    assert record["sha256"] == examples_sha256(test)


def test_custom_strategy_from_a_file_outside_the_package(tiny_bert: str, tmp_path: Path) -> None:
    name = f"{EXAMPLES / 'median_lora.py'}:MedianLoRA"
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=1)
                                   + [f"strategy.name={name}", "strategy.options.trim=1"]))
    rows = read_rows(run_dir)
    assert rows[-1]["strategy"] == name
    assert rows[-1]["median_clients"] == 1.0  # 3 clients, one trimmed from each end
    assert torch.isfinite(torch.tensor(rows[-1]["eval_loss"]))


def test_flwr_run_gives_the_same_rounds_as_our_cli(fedit_run: Path, tiny_bert: str, tmp_path: Path) -> None:
    """`flwr run .` (Flower's CLI, a real SuperLink in simulation mode) runs the same app.

    A fresh FLWR_HOME, and a run config without federation.num_clients: the federation's
    size is Flower's num-supernodes.
    """
    from tests.test_failures import flwr_run, processes_of

    home, out = tmp_path / "flwr-home", tmp_path / "run"
    overrides = " ".join(o for o in tiny_overrides(tiny_bert, out) if not o.startswith("federation.num_clients="))
    proc = flwr_run(home, "--federation-config", "num-supernodes=3 client-resources-num-cpus=1",
                    "--run-config", f"overrides='{overrides}'")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert processes_of(home) == []
    # Flower's notices that say nothing to a fedtune user: fixed at their cause, or dropped by message.
    for notice in ("ConfigRecord (train): (empty!)", "`options.` fields", "Since flwr 1.32", "Pandas4Warning",
                   "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "gemm_4bit_forward"):
        assert notice not in proc.stdout + proc.stderr
    assert load_config(out / CONFIG_FILE).federation.num_clients == 3
    ours, theirs = read_rows(fedit_run), read_rows(out)
    assert [r["round"] for r in theirs] == [0, 1, 2]
    for a, b in zip(ours, theirs):
        # Same seeds, same partitions, same messages: only the order of summing client
        # metrics may differ, so compare to float rounding.
        assert b["eval_accuracy"] == pytest.approx(a["eval_accuracy"], rel=1e-6)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)


BAD_REPLY_STRATEGY = '''
from fedtune.strategy import ClientInstruction
from fedtune.strategies.fedit import FedIT


class ExpectsWrongShapeFromOne(FedIT):
    """FedIT, but the first sampled client's reply is expected with a shape it cannot have."""

    def configure_client(self, server_round, node_id):
        instruction = super().configure_client(server_round, node_id)
        if not hasattr(self, "victim"):
            self.victim = node_id
        if node_id != self.victim:
            return instruction
        expects = dict(instruction.expects)
        key = sorted(expects)[0]
        expects[key] = (1, 2, 3)
        return ClientInstruction(arrays=instruction.arrays, trainable=instruction.trainable, expects=expects)
'''


def test_a_malformed_reply_is_rejected_and_the_round_goes_on(tiny_bert: str, tmp_path: Path) -> None:
    module = tmp_path / "bad_reply.py"
    module.write_text(BAD_REPLY_STRATEGY)
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path / "run", rounds=1)
                                   + [f"strategy.name={module}:ExpectsWrongShapeFromOne"]))
    row = read_rows(run_dir)[-1]
    assert row["clients_sampled"] == 3 and row["clients_aggregated"] == 2 and row["clients_rejected"] == 1
    rejected = [json.loads(line) for line in (run_dir / "rejected.jsonl").read_text().splitlines()]
    assert len(rejected) == 1 and "expected (1, 2, 3)" in rejected[0]["reason"]


def test_without_a_central_test_set_round_0_is_evaluated_by_the_clients(tiny_bert: str, tmp_path: Path) -> None:
    from fedtune.data.generated import generate_topics

    rows = generate_topics(240, seed=3)
    csv = tmp_path / "topics.csv"
    csv.write_text("".join(f'"{t}",{y}\n' for t, y in zip(rows["text"], rows["label"])))
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path / "run", rounds=1)
                                   + [f"data.source={csv}", "data.column_names=[text,label]"]))
    first, last = read_rows(run_dir)
    assert first["round"] == 0 and first["client_eval_accuracy"] is not None
    assert first["eval_accuracy"] == first["client_eval_accuracy"]
    assert last["eval_loss"] == last["client_eval_loss"]


def test_flora_with_mixed_ranks_runs_exactly_and_exports_a_loadable_adapter(tiny_bert: str, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.data import load_splits, tokenize
    from fedtune.models.loading import AdapterHandle
    from fedtune.objectives import evaluate

    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=2)
                                   + ["strategy.name=flora", "adapter.client_ranks=[2,4,8]"]))
    rows = read_rows(run_dir)
    for row in rows[1:]:
        assert row["stacked_rank"] == 14.0 and row["aggregation_error"] <= 1e-6
    # Round 2's download carries round 1's stack: Σ r_k (m + n) per matrix, 32x32 query/value x 2 layers.
    stack_numbers = 14 * (32 + 32) * 4
    assert rows[2]["bytes_down_per_client"] >= 4 * stack_numbers > rows[1]["bytes_down_per_client"]

    cfg = load_config(run_dir / CONFIG_FILE)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4)
    model = PeftModel.from_pretrained(base, str(run_dir / ADAPTER_DIR))
    assert model.peft_config["default"].r == 28  # both rounds' stacks side by side
    tokenizer = AutoTokenizer.from_pretrained(tiny_bert)
    _, test = load_splits(cfg.data, cfg.model.task)
    handle = AdapterHandle(model=model, tokenizer=tokenizer, adapter_name="default", params={}, initial={},
                           task="classification")
    result = evaluate(handle, tokenize(test, tokenizer, "classification", cfg.data.max_length), 64)
    # The exported adapter is the merged model the server evaluated (float32 sums in another order).
    assert result["loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-4)


def test_ffa_lora_uploads_half_of_fedit_lora(fedit_run: Path, tiny_bert: str, tmp_path: Path) -> None:
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=1)
                                   + ["strategy.name=ffa-lora"]))
    ffa, fedit = read_rows(run_dir)[1], read_rows(fedit_run)[1]
    assert ffa["aggregation_error"] <= 1e-6 and ffa["clients_aggregated"] == 3
    # A and B have the same size here (32x4 and 4x32), the head is 4x32 + 4: A is ~40% of FedIT's upload.
    assert 0.5 * fedit["bytes_up"] < ffa["bytes_up"] < 0.7 * fedit["bytes_up"]


def test_lora_fair_runs_and_reports_its_correction(tiny_bert: str, tmp_path: Path) -> None:
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=1)
                                   + ["strategy.name=lora-fair", "partition.method=dirichlet",
                                      "partition.alpha=0.5", "partition.min_partition_size=5"]))
    row = read_rows(run_dir)[1]
    assert row["aggregation_error"] < row["fedit_aggregation_error"]
    assert 0 < row["error_removed"] < 1


def test_fedkseed_pro_sends_only_seeds_and_scalars_and_saves_a_whole_model_that_reproduces_the_evaluation(
        tiny_bert: str, tmp_path: Path) -> None:
    """Full-parameter FedKSeed-Pro (plain FedKSeed: the deployment and kill-and-resume tests)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.data import load_splits, tokenize
    from fedtune.models.loading import AdapterHandle
    from fedtune.objectives import evaluate

    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=2) + [
        "strategy.name=fedkseed-pro", "strategy.options.tune=full", "strategy.options.k=64",
        "strategy.options.steps=6", "strategy.options.lr=1e-3", "strategy.options.eps=1e-3", "adapter.dropout=0.0"]))
    rows = read_rows(run_dir)
    for row in rows[1:]:
        assert row["clients_aggregated"] == 3 and row["fedkseed_replies_rejected"] == 0
        # No tensors either way: a few hundred bytes of config, 6 (seed, scalar) pairs back.
        assert row["bytes_up_per_client"] < 2_000
        assert row["bytes_down_per_client"] < 4_000 + 64 * 8
    assert rows[2]["fedkseed_history_length"] > rows[1]["fedkseed_history_length"] > 0
    assert rows[2]["fedkseed_probability_spread"] > 1.0  # Pro: seeds seen with larger |g| are favoured
    tuned = AutoModelForSequenceClassification.from_pretrained(run_dir / MODEL_DIR)
    pretrained = dict(AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4).named_parameters())
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, pretrained[n])}
    # Every weight moved along the seeded directions: encoder, embeddings and the head alike.
    assert changed == set(pretrained), sorted(set(pretrained) - changed)[:3]
    cfg = load_config(run_dir / CONFIG_FILE)
    _, test = load_splits(cfg.data, cfg.model.task)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / MODEL_DIR)
    handle = AdapterHandle(model=tuned, tokenizer=tokenizer, adapter_name="default", params={}, initial={},
                           task="classification")
    result = evaluate(handle, tokenize(test, tokenizer, "classification", cfg.data.max_length), 64)
    assert result["accuracy"] == pytest.approx(rows[-1]["eval_accuracy"], abs=1e-9)
    assert result["loss"] == pytest.approx(rows[-1]["eval_loss"], rel=1e-5)
    assert not (run_dir / ADAPTER_DIR).exists()


def test_an_exact_strategy_refuses_embedding_lora_before_round_one(tiny_bert: str, tmp_path: Path) -> None:
    from fedtune.errors import ConfigError

    with pytest.raises(ConfigError, match="puts LoRA on an embedding.*strategy.name='flora' does not aggregate"):
        simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=1) + [
            "strategy.name=flora", "adapter.target_modules=[word_embeddings,query]"]))
    assert not (tmp_path / "checkpoint.pt").exists()


def test_fed_sb_initializes_then_averages_r_exactly(tiny_bert: str, tmp_path: Path) -> None:
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=4) + [
        "strategy.name=fed-sb", "strategy.options.init_samples=16", "adapter.alpha=4"]))
    rows = read_rows(run_dir)
    assert rows[1]["init_pass_done"] == 1.0  # range pass
    assert rows[2]["init_top_singular_value"] > 0  # corange pass: B, R, A fixed
    for row in rows[3:]:
        assert row["aggregation_error"] <= 1e-6 and row["clients_aggregated"] == 3
        # Up: four 4x4 R (2 layers x query/value) and the 4x32+4 head, ~700 bytes overhead per tensor.
        assert row["bytes_up_per_client"] < 4 * (4 * 16 + 4 * 32 + 4) + 6 * 700
    assert rows[4]["bytes_down_per_client"] < rows[3]["bytes_down_per_client"]  # B and A sent once


def test_private_fed_sb_reports_the_epsilon_spent(tiny_bert: str, tmp_path: Path) -> None:
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path, rounds=4) + [
        "strategy.name=fed-sb", "strategy.options.init_samples=16", "privacy.enabled=true",
        "privacy.target_epsilon=8", "privacy.delta=1e-4", "train.local_steps=3"]))
    rows = read_rows(run_dir)
    spent = [r["dp_epsilon_max"] for r in rows[1:]]
    assert all(a <= b for a, b in zip(spent, spent[1:])) and 0 < spent[-1] <= 8.0


@pytest.fixture
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A one-node Ray cluster on loopback, as `ray start --head` starts one; its address."""
    import shutil
    import socket
    import subprocess
    import sys
    import tempfile
    import time

    import psutil

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}", "--block"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not list(Path(temp_dir).glob("session_*/logs/raylet.out")):
            assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
            time.sleep(0.5)
        time.sleep(2)
        yield f"127.0.0.1:{port}", Path(temp_dir)
    finally:
        family = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
        for process in family:
            process.terminate()
        _, alive = psutil.wait_procs(family, timeout=10)
        for process in alive:
            process.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_simulation_attaches_to_an_existing_ray_cluster(ray_cluster, tiny_bert: str, tmp_path: Path) -> None:
    address, temp_dir = ray_cluster
    run_dir = simulate(load_config(None, tiny_overrides(tiny_bert, tmp_path / "run", rounds=1)
                                   + [f"federation.ray_address={address}"]))
    assert [row["round"] for row in read_rows(run_dir)] == [0, 1]
    # The run's driver and its ClientApp workers logged into the cluster's session, not a private one.
    assert list(temp_dir.glob("session_*/logs/python-core-driver-*.log"))


def test_exact_match_by_generation_is_logged_every_round(smollm2: str, shared_data: Path, tmp_path: Path) -> None:
    """SmolLM2 on 3 GSM8K test questions: eval_exact_match from the server and from the clients' splits."""
    from fedtune.reporting.runlog import GENERATIONS_FILE

    gsm8k = shared_data / "gsm8k"
    cfg = load_config(None, [
        "model.name=builtin:SmolLM2-135M-Instruct", "model.task=causal-lm", "adapter.target_modules=[q_proj,v_proj]",
        f"data.source={gsm8k / 'train.jsonl'}", f"data.test_source={gsm8k / 'test.jsonl'}",
        "data.prompt_column=question", "data.response_column=answer", "data.max_examples=8",
        "data.max_test_examples=3", "data.eval_fraction=0.25", "data.max_length=160", "partition.method=iid",
        "federation.num_clients=2", "federation.num_rounds=1", "federation.client_cpus=1", "train.local_steps=1",
        "train.batch_size=2", "eval.metric=exact_match", "eval.max_new_tokens=8", "eval.clients=true",
        f"output.dir={tmp_path / 'run'}", "output.progress=false"])
    run_dir = simulate(cfg)
    rows = read_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    for row in rows:
        assert 0.0 <= row["eval_exact_match"] <= 1.0
        assert row["eval_generation_seconds"] > 0
    assert 0.0 <= rows[1]["client_eval_exact_match"] <= 1.0  # each client generated on its eval split
    generations = [json.loads(line) for line in (run_dir / GENERATIONS_FILE).read_text().splitlines()]
    assert [(g["round"], g["index"]) for g in generations] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all("####" in g["reference"] for g in generations)


def test_instruction_tuning_federation_learns_and_scores_rouge_l(smollm2: str, shared_data: Path,
                                                                tmp_path: Path) -> None:
    """SmolLM2 on the Alpaca instructions, split by a record property, a held-out share as the test set."""
    records = json.loads((shared_data / "instructions" / "instruction-data.json").read_text())[:60]
    for record in records:
        record["kind"] = "with input" if record["input"] else "without input"
    source = tmp_path / "instructions.json"
    source.write_text(json.dumps(records))
    cfg = load_config(None, [
        "model.name=builtin:SmolLM2-135M-Instruct", "model.task=causal-lm", "adapter.target_modules=[q_proj,v_proj]",
        f"data.source={source}", "data.alpaca=true", "data.test_fraction=0.1", "data.group_column=kind",
        "data.eval_fraction=0", "data.max_length=128", "partition.method=pathological",
        "partition.classes_per_client=1", "federation.num_clients=2", "federation.num_rounds=1",
        "federation.client_cpus=1", "federation.fraction_evaluate=0", "train.local_steps=3", "train.batch_size=4",
        "train.learning_rate=2e-3", "eval.metric=rouge_l", "eval.max_new_tokens=16", "eval.max_examples=3",
        f"output.dir={tmp_path / 'run'}", "output.progress=false", "output.save_adapter=false"])
    run_dir = simulate(cfg)
    rows = read_rows(run_dir)
    assert [r["round"] for r in rows] == [0, 1]
    assert all(0.0 <= r["eval_rouge_l"] <= 1.0 for r in rows)
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]  # six AdamW steps on the responses lower their loss
    test_set = json.loads((run_dir / "test_set.json").read_text())
    assert test_set["num_examples"] == 6 and test_set["selection"]["held_out_fraction"] == 0.1
