"""Class names and test-set provenance: encoded by the loader, written to the run directory,
carried by an exported adapter that plain transformers + peft reload."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pytest
import torch

from fedtune.config import DataConfig, load_config
from fedtune.data import label_names, load_data, load_splits, tokenize
from fedtune.data.labels import LABELS_FILE, read_labels, write_labels
from fedtune.data.provenance import TEST_SET_FILE, examples_sha256, write_test_set
from fedtune.errors import DataError

POSITIVE = ["a wonderful, moving film", "great acting and a clever plot", "i loved every minute",
            "a delight from start to finish", "funny, warm and beautifully shot", "the best film this year"]
NEGATIVE = ["a dull, lifeless mess", "boring and far too long", "i hated every minute",
            "the plot makes no sense", "badly acted and badly written", "the worst film this year"]


def write_reviews(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text,label\n" + "".join(f"\"{t}\",{y}\n" for t, y in rows))
    return path


@pytest.fixture
def reviews(tmp_path: Path) -> tuple[Path, Path]:
    train = [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE]
    test = [("a moving and clever film", "pos"), ("dull and badly written", "neg"), ("i loved it", "pos"),
            ("far too long", "neg"), ("warm and funny", "pos")]
    return write_reviews(tmp_path / "train.csv", train), write_reviews(tmp_path / "test.csv", test)


def test_string_labels_sort_and_are_named(reviews: tuple[Path, Path]) -> None:
    train, test = load_splits(DataConfig(source=str(reviews[0]), test_source=str(reviews[1])), "classification")
    assert label_names(train) == label_names(test) == ["neg", "pos"]
    assert train[0]["label"] == 1 and train[6]["label"] == 0  # "pos" is index 1


def test_class_label_and_generated_names_are_kept(tmp_path: Path) -> None:
    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"])})
    datasets.Dataset.from_dict({"text": ["bad", "good", "fine"], "label": [0, 1, 1]},
                               features=features).save_to_disk(str(tmp_path / "saved"))
    train, _ = load_splits(DataConfig(source=str(tmp_path / "saved")), "classification")
    assert label_names(train) == ["negative", "positive"]
    generated, _ = load_splits(DataConfig(max_examples=40, max_test_examples=8), "classification")
    assert label_names(generated) == ["world", "sports", "business", "science"]


def test_int_labels_keep_their_digits_as_names(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,0\nb,2\nc,2\n")
    train, _ = load_splits(DataConfig(source=str(path)), "classification")
    assert label_names(train) == ["0", "2"] and train["label"] == [0, 1, 1]


def test_labels_that_name_alike_are_refused(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\na,0\nb,1\n")
    (tmp_path / "test.jsonl").write_text('{"text": "c", "label": "1"}\n')  # a string: not the int 1
    with pytest.raises(DataError, match="same name twice"):
        load_splits(DataConfig(source=str(tmp_path / "train.csv"), test_source=str(tmp_path / "test.jsonl")),
                    "classification")


def test_labels_file_round_trips(tmp_path: Path) -> None:
    write_labels(tmp_path, ["neg", "pos"])
    assert json.loads((tmp_path / LABELS_FILE).read_text()) == {"id2label": {"0": "neg", "1": "pos"},
                                                                 "label2id": {"neg": 0, "pos": 1}}
    assert read_labels(tmp_path) == ["neg", "pos"]


def test_test_set_record_names_source_selection_and_hash(reviews: tuple[Path, Path], tmp_path: Path) -> None:
    cfg = DataConfig(source=str(reviews[0]), test_source=str(reviews[1]), max_test_examples=3, seed=7)
    splits = load_data(cfg, "classification")
    record = write_test_set(tmp_path, splits.test_selection, splits.test)
    assert json.loads((tmp_path / TEST_SET_FILE).read_text()) == record
    assert record["source"] == str(reviews[1]) and record["format"] == "csv" and record["num_examples"] == 3
    assert record["selection"]["rows_in_source"] == 5 and record["selection"]["shuffle_seed"] == 7
    # The documented rule, recomputed by hand from the rows in order, label as its name.
    raw = datasets.Dataset.from_csv(str(reviews[1])).shuffle(seed=7).select(range(3))
    lines = "".join(json.dumps({"label": r["label"], "text": r["text"]}, sort_keys=True, ensure_ascii=False,
                               separators=(",", ":")) + "\n" for r in raw)
    assert record["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
    whole = load_data(DataConfig(source=str(reviews[0]), test_source=str(reviews[1])), "classification")
    assert whole.test_selection.shuffle_seed is None
    assert examples_sha256(whole.test) != record["sha256"]


def test_resume_with_another_test_set_warns(reviews: tuple[Path, Path], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    first = load_data(DataConfig(source=str(reviews[0]), test_source=str(reviews[1])), "classification")
    write_test_set(tmp_path, first.test_selection, first.test)
    write_test_set(tmp_path, first.test_selection, first.test)
    assert "differs" not in caplog.text
    other = load_data(DataConfig(source=str(reviews[0]), test_source=str(reviews[1]), max_test_examples=2),
                      "classification")
    write_test_set(tmp_path, other.test_selection, other.test)
    assert "central test set differs" in caplog.text


def _trained_handle(reviews: tuple[Path, Path], tmp_path: Path):
    from fedtune.client.training import train_adapter
    from fedtune.models.loading import get_adapter

    cfg = load_config(None, [f"data.source={reviews[0]}", f"data.test_source={reviews[1]}", "data.max_length=16",
                             "adapter.rank=2", "train.local_steps=4", "train.batch_size=4",
                             "train.learning_rate=0.05", f"output.dir={tmp_path / 'run'}"])
    splits = load_data(cfg.data, cfg.model.task)
    handle = get_adapter(cfg.model, cfg.adapter, 2, cfg.seed)
    handle.load({})
    handle.set_trainable([".*"])
    train_adapter(handle, tokenize(splits.pool, handle.tokenizer, "classification", 16), cfg.train, seed=0)
    return cfg, splits, handle


def _logits(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)).logits


def test_exported_adapter_reloads_with_label_names(reviews: tuple[Path, Path], tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.server.run import save_global
    from fedtune.strategy import AdapterSpec, build_strategy

    cfg, splits, handle = _trained_handle(reviews, tmp_path)
    strategy = build_strategy("fedit", {})
    strategy.initialize(AdapterSpec(initial=handle.state(), rank=cfg.adapter.rank, alpha=cfg.adapter.alpha))
    adapter_dir = tmp_path / "adapter"
    save_global(cfg, 2, handle, strategy, adapter_dir, label_names(splits.pool))
    texts = list(splits.test["text"])
    expected = _logits(handle.model, handle.tokenizer, texts)

    # Plain transformers + peft, nothing of fedtune: the base named in adapter_config.json.
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(adapter_dir)
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}
    base = AutoModelForSequenceClassification.from_pretrained(base_path, config=config)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    logits = _logits(model, AutoTokenizer.from_pretrained(base_path), texts)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)  # float32, same ops, same order
    predicted = [model.config.id2label[i] for i in logits.argmax(-1).tolist()]
    truth = [label_names(splits.pool)[y] for y in splits.test["label"]]
    assert set(predicted) <= {"neg", "pos"} and len(predicted) == len(truth)
    # The fresh head of an untrained base would not reproduce the trained logits: the check can fail.
    fresh = AutoModelForSequenceClassification.from_pretrained(base_path, config=config)
    assert not torch.allclose(_logits(fresh.eval(), AutoTokenizer.from_pretrained(base_path), texts), expected)


def test_whole_model_export_names_the_labels(reviews: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    from fedtune.server.run import save_whole_model
    from fedtune.strategy import AdapterSpec, build_strategy

    cfg, splits, handle = _trained_handle(reviews, tmp_path)
    strategy = build_strategy("fedit", {})
    strategy.initialize(AdapterSpec(initial=handle.state(), rank=cfg.adapter.rank, alpha=cfg.adapter.alpha))
    save_whole_model(handle, strategy, tmp_path / "model", ["neg", "pos"])
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    assert model.config.id2label == {0: "neg", 1: "pos"}
    texts = list(splits.test["text"])
    # Merging B @ A into the base weights rounds differently from adding the LoRA path.
    torch.testing.assert_close(_logits(model, handle.tokenizer, texts), _logits(handle.model, handle.tokenizer, texts),
                               rtol=1e-4, atol=1e-5)


def test_a_causal_lm_test_set_is_recorded_without_labels(tmp_path: Path) -> None:
    rows = [{"prompt": "2+2?", "response": "4"}, {"prompt": "capital of France?", "response": "Paris"}]
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_data(DataConfig(source=str(tmp_path / "train.jsonl"), test_source=str(tmp_path / "test.jsonl")),
                       "causal-lm")
    record = write_test_set(tmp_path, splits.test_selection, splits.test)
    assert record["columns"] == ["prompt", "response"] and record["num_examples"] == 2
    assert record["selection"]["how"] == "all 2 examples, in source order"
    lines = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows)
    assert record["sha256"] == hashlib.sha256(lines.encode()).hexdigest()
