"""fedtune.data.loading and fedtune.data.tokenize on small files written into tmp_path."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from fedtune.config import DataConfig, ModelConfig
from fedtune.data.generated import GENERATED_TEST_SIZE, GENERATED_TRAIN_SIZE, LABELS
from fedtune.data.loading import load_data, load_splits, num_labels
from fedtune.data.provenance import describe_test_set
from fedtune.data.tokenize import IGNORE_INDEX, collate, tokenize
from fedtune.errors import DataError

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def quiet_datasets() -> Any:
    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def label_names(ds: datasets.Dataset) -> list[str]:
    return list(ds.features["label"].names)


# --------------------------------------------------------------------------- file formats


def test_headerless_csv_like_ag_news(tmp_path: Path) -> None:
    path = tmp_path / "ag.csv"
    path.write_text('"Wall St. rallies, again",3\n"Team wins the final",2\n"New chip, faster",4\n'
                    '"Peace talks resume",1\n')
    train, test = load_splits(DataConfig(source=str(path), column_names=["text", "label"]), "classification")
    assert test is None
    assert list(train["text"]) == ["Wall St. rallies, again", "Team wins the final", "New chip, faster",
                                   "Peace talks resume"]
    # Labels 1..4 become 0..3 in numeric order; the names keep the original values.
    assert list(train["label"]) == [2, 1, 3, 0]
    assert label_names(train) == ["1", "2", "3", "4"]
    assert num_labels(train) == 4


def test_csv_with_header_and_int_labels_keeps_them(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("label,text,extra\n0,first,x\n1,second,y\n1,NA,z\n")
    train, _ = load_splits(DataConfig(source=str(path)), "classification")
    assert train.column_names == ["text", "label"]  # other columns dropped
    assert list(train["label"]) == [0, 1, 1]
    assert list(train["text"]) == ["first", "second", "NA"]  # "NA" is text, not a missing value


def test_tsv_with_header_and_a_bare_double_quote(tmp_path: Path) -> None:
    path = tmp_path / "sst.tsv"
    path.write_text('sentence\tlabel\nhe said "this is fine\t1\na "quoted" word and more\t0\nplain\t1\n')
    train, _ = load_splits(DataConfig(source=str(path), text_column="sentence"), "classification")
    assert list(train["text"]) == ['he said "this is fine', 'a "quoted" word and more', "plain"]
    assert list(train["label"]) == [1, 0, 1]


def test_jsonl_and_json_list(tmp_path: Path) -> None:
    rows = [{"text": "a", "label": 0}, {"text": "b", "label": 1}, {"text": "c", "label": 0}]
    jsonl = write_jsonl(tmp_path / "d.jsonl", rows)
    as_list = tmp_path / "d.json"
    as_list.write_text(json.dumps(rows))
    for path in (jsonl, as_list):
        train, _ = load_splits(DataConfig(source=str(path)), "classification")
        assert list(train["text"]) == ["a", "b", "c"]
        assert list(train["label"]) == [0, 1, 0]


def test_json_file_holding_json_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "lines.json", [{"text": "x", "label": 1}, {"text": "y", "label": 0}])
    train, _ = load_splits(DataConfig(source=str(path)), "classification")
    assert list(train["text"]) == ["x", "y"]


def test_declared_format_overrides_the_suffix(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("text,label\nhello,1\nworld,0\n")
    with pytest.raises(DataError, match="set data.format"):
        load_splits(DataConfig(source=str(path)), "classification")
    train, _ = load_splits(DataConfig(source=str(path), format="csv"), "classification")
    assert list(train["text"]) == ["hello", "world"]


def test_string_labels_map_consistently_between_train_and_test(tmp_path: Path) -> None:
    train_path = write_jsonl(tmp_path / "train.jsonl", [
        {"text": "t1", "label": "pos"}, {"text": "t2", "label": "neg"}, {"text": "t3", "label": "pos"}])
    test_path = write_jsonl(tmp_path / "test.jsonl", [
        {"text": "e1", "label": "neutral"}, {"text": "e2", "label": "pos"}, {"text": "e3", "label": "neg"}])
    train, test = load_splits(DataConfig(source=str(train_path), test_source=str(test_path)), "classification")
    assert test is not None
    # Names are the sorted union of both splits, so a label seen only in test still gets an id.
    assert label_names(train) == label_names(test) == ["neg", "neutral", "pos"]
    assert list(train["label"]) == [2, 0, 2]
    assert list(test["label"]) == [1, 2, 0]


def test_alpaca_records_become_prompt_and_response(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "1 2", "output": "3"},
        {"instruction": " Say hello. ", "input": "", "output": " hello "},
    ]))
    train, test = load_splits(DataConfig(source=str(path), alpaca=True), "causal-lm")
    assert test is None
    # Raw text: the prompt format (fedtune.data.prompts) wraps it when it is tokenized.
    assert sorted(train.column_names) == ["input", "prompt", "response"]
    assert train[0] == {"prompt": "Add the numbers.\n\n1 2", "input": "1 2", "response": "3"}
    assert train[1] == {"prompt": "Say hello.", "input": "", "response": "hello"}


def test_alpaca_without_its_columns_is_a_data_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"missing \['output'\]"):
        load_splits(DataConfig(source=str(path), alpaca=True), "causal-lm")


def test_causal_lm_columns_are_renamed(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"q": "Capital of France?", "a": "Paris", "id": 1}])
    train, _ = load_splits(DataConfig(source=str(path), prompt_column="q", response_column="a"), "causal-lm")
    assert train.column_names == ["prompt", "response"]
    assert train[0] == {"prompt": "Capital of France?", "response": "Paris"}


def test_numeric_looking_strings_stay_strings(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "math.jsonl", [{"prompt": "What is 2+2?", "response": "04"},
                                                 {"prompt": "Zip code?", "response": "02134"}])
    train, _ = load_splits(DataConfig(source=str(path)), "causal-lm")
    assert list(train["response"]) == ["04", "02134"]


# --------------------------------------------------------------------------- errors and limits


def test_missing_classification_column_names_it_and_the_config_key(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("sentence,label\nhi,1\n")
    with pytest.raises(DataError) as excinfo:
        load_splits(DataConfig(source=str(path)), "classification")
    message = str(excinfo.value)
    assert "['text']" in message and "['sentence', 'label']" in message
    assert "data.text_column" in message and "data.column_names" in message


def test_missing_causal_lm_column_names_it_and_the_config_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    with pytest.raises(DataError) as excinfo:
        load_splits(DataConfig(source=str(path)), "causal-lm")
    assert "['response']" in str(excinfo.value) and "data.prompt_column/response_column" in str(excinfo.value)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_splits(DataConfig(source=str(tmp_path / "absent.csv")), "classification")


def test_a_label_column_of_blanks_words_and_negatives_is_refused_with_every_record_named(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("text,label\ngood,0\nbad,1\nno label,\nwhat,x\nneg,-1\nseven,7\n")
    with pytest.raises(DataError) as excinfo:
        load_splits(DataConfig(source=str(path)), "classification")
    message = str(excinfo.value)
    assert "3 problems with the labels" in message and "column 'label'" in message
    assert "no label: '' (record 2, line 4)" in message
    assert "mixes integer labels with other values; most are integers, these are not: 'x' (record 3, line 5)" \
        in message
    assert "negative labels: '-1' (record 4, line 6)" in message and "'7'" not in message


def test_a_few_integers_among_class_names_are_the_odd_ones_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"},
                                              {"text": "c", "label": "pos"}, {"text": "d", "label": 1}])
    with pytest.raises(DataError, match=r"column 'label' mixes value types \(int, str\); most are str, these are "
                                        r"not: 1 \(record 3, line 4\)"):
        load_splits(DataConfig(source=str(path)), "classification")
    csv_path = tmp_path / "d.csv"  # a CSV column is all strings: the integer-looking one is the odd one
    csv_path.write_text("text,label\na,pos\nb,neg\nc,pos\nd,1\n")
    with pytest.raises(DataError, match=r"most are words, these are not: '1' \(record 3, line 5\)"):
        load_splits(DataConfig(source=str(csv_path)), "classification")


def test_a_null_label_in_a_json_list_is_named_by_record(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"text": "a", "label": 0}, {"text": "b", "label": None}, {"text": "c", "label": 1}]))
    with pytest.raises(DataError, match=r"1 record\(s\) have no label: .* \(record 1\);"):
        load_splits(DataConfig(source=str(path)), "classification")


def test_blank_responses_are_refused_in_the_training_and_the_test_file(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}])
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "p", "response": "r"}, {"prompt": "q", "response": " "}])
    with pytest.raises(DataError, match=r"blank.jsonl', column 'response': 1 record\(s\) have no response: "
                                        r"' ' \(record 1, line 2\)"):
        load_splits(DataConfig(source=str(blank)), "causal-lm")
    with pytest.raises(DataError, match="blank.jsonl', column 'response'"):
        load_splits(DataConfig(source=str(good), test_source=str(blank)), "causal-lm")
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": ""}]))
    with pytest.raises(DataError, match=r"column 'output': 1 record\(s\) have no response: '' \(record 0\)"):
        load_splits(DataConfig(source=str(alpaca), alpaca=True), "causal-lm")


def test_a_test_label_no_training_example_has_is_kept_with_a_warning(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    train_path, test_path = tmp_path / "train.csv", tmp_path / "test.csv"
    train_path.write_text("text,label\na,0\nb,1\nc,0\n")
    test_path.write_text("text,label\na,0\nb,2\nc,2\nd,1\n")
    with caplog.at_level("WARNING", logger="fedtune.data"):
        _, test = load_splits(DataConfig(source=str(train_path), test_source=str(test_path)), "classification")
    assert list(test["label"]) == [0, 2, 2, 1]
    warned = [r.getMessage() for r in caplog.records if "no training example has" in r.getMessage()]
    assert len(warned) == 1 and "test.csv" in warned[0] and "2 (2 examples)" in warned[0]


def test_max_examples_and_max_test_examples(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": i % 2} for i in range(50)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=str(path), test_source=str(path), max_examples=10, max_test_examples=7, seed=1)
    train, test = load_splits(cfg, "classification")
    assert test is not None and (len(train), len(test)) == (10, 7)
    assert set(train["text"]) <= {r["text"] for r in rows}
    assert len(set(train["text"])) == 10
    assert list(train["text"]) != [f"t{i}" for i in range(10)]  # a shuffled sample, not the head
    again, _ = load_splits(cfg, "classification")
    assert list(again["text"]) == list(train["text"])


def test_max_examples_larger_than_the_data_keeps_everything(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 1}])
    train, _ = load_splits(DataConfig(source=str(path), max_examples=100), "classification")
    assert list(train["text"]) == ["a", "b"]


def test_test_fraction_holds_out_a_fixed_share_of_the_source(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(100)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig(source=str(path), test_fraction=0.1, seed=3)
    splits = load_data(cfg, "causal-lm")
    train, test = splits.pool, splits.test
    assert test is not None and (len(train), len(test)) == (90, 10)
    assert not set(train["prompt"]) & set(test["prompt"])  # never trained on
    assert set(train["prompt"]) | set(test["prompt"]) == {r["prompt"] for r in rows}
    assert list(load_data(cfg, "causal-lm").test["prompt"]) == list(test["prompt"])  # fixed by the seed
    record = describe_test_set(splits.test_selection, test)
    assert "train_test_split(test_size=0.1, seed=3)" in record["selection"]["how"]
    assert record["selection"]["held_out_fraction"] == 0.1 and record["selection"]["rows_in_source"] == 100
    # max_examples cuts the training pool after the test share is held out: the test set stays.
    cut = load_data(DataConfig(source=str(path), test_fraction=0.1, seed=3, max_examples=20), "causal-lm")
    assert len(cut.pool) == 20 and list(cut.test["prompt"]) == list(test["prompt"])


def test_test_fraction_and_test_source_are_one_too_many() -> None:
    problems = DataConfig(source="generated:topics", test_source="generated:topics", test_fraction=0.1).problems()
    assert any("keep one of them" in p for p in problems)
    assert any("must be in (0, 1)" in p for p in DataConfig(test_fraction=1.5).problems())


def test_group_column_is_kept_as_group(tmp_path: Path) -> None:
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Add.", "input": "1 2", "output": "3", "kind": "math"},
                                {"instruction": "Greet.", "input": "", "output": "hi", "kind": "greeting"}]))
    train, _ = load_splits(DataConfig(source=str(path), alpaca=True, group_column="kind"), "causal-lm")
    assert list(train["group"]) == ["math", "greeting"]
    plain = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "response": "b", "lang": "fr", "x": 1}])
    train, _ = load_splits(DataConfig(source=str(plain), group_column="lang"), "causal-lm")
    assert sorted(train.column_names) == ["group", "prompt", "response"] and train[0]["group"] == "fr"
    with pytest.raises(DataError, match="data.group_column='kind'.*has no such column"):
        load_splits(DataConfig(source=str(plain), group_column="kind"), "causal-lm")


# --------------------------------------------------------------------------- generated task


def test_generated_topics_are_balanced_over_four_labels() -> None:
    train, test = load_splits(DataConfig(), "classification")
    assert test is not None
    assert (len(train), len(test)) == (GENERATED_TRAIN_SIZE, GENERATED_TEST_SIZE)
    assert label_names(train) == list(LABELS) == ["world", "sports", "business", "science"]
    assert collections.Counter(train["label"]) == {k: GENERATED_TRAIN_SIZE // 4 for k in range(4)}
    assert collections.Counter(test["label"]) == {k: GENERATED_TEST_SIZE // 4 for k in range(4)}


def test_generated_topics_are_deterministic_in_the_seed() -> None:
    a, _ = load_splits(DataConfig(seed=5, max_examples=200), "classification")
    b, _ = load_splits(DataConfig(seed=5, max_examples=200), "classification")
    c, _ = load_splits(DataConfig(seed=6, max_examples=200), "classification")
    assert a[:] == b[:]
    assert list(a["text"]) != list(c["text"])


def test_generated_task_is_classification_only() -> None:
    with pytest.raises(DataError, match="classification only"):
        load_splits(DataConfig(), "causal-lm")
    with pytest.raises(DataError, match="generated:topics"):
        load_splits(DataConfig(source="generated:nope"), "classification")


# --------------------------------------------------------------------------- tokenize and collate


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from fedtune.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig())  # MiniLM's WordPiece tokenizer, from an installed package


def test_causal_lm_labels_cover_the_response_only(tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict({"prompt": ["Question: what is the capital of france?", "Hi"],
                                     "response": ["paris is the capital", "hello there friend"]})
    rows = tokenize(ds, tokenizer, "causal-lm", max_length=32)
    assert rows.column_names == ["input_ids", "labels"]
    for row, prompt, response in zip(rows, ds["prompt"], ds["response"]):
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response + (tokenizer.eos_token or ""), add_special_tokens=False)["input_ids"]
        assert len(r) > 0 and len(p) > 0
        assert row["input_ids"] == p + r
        assert row["labels"] == [IGNORE_INDEX] * len(p) + r
        # The response labels are the very tokens at those positions.
        assert row["labels"][len(p):] == row["input_ids"][len(p):]


def test_causal_lm_truncates_the_prompt_first(tokenizer: Any) -> None:
    prompt = " ".join(["word"] * 60)
    response = "the answer is paris"
    rows = tokenize(datasets.Dataset.from_dict({"prompt": [prompt], "response": [response]}),
                    tokenizer, "causal-lm", max_length=16)
    r = tokenizer(response, add_special_tokens=False)["input_ids"]
    row = rows[0]
    assert len(row["input_ids"]) == len(row["labels"]) == 16
    assert row["input_ids"][-len(r):] == r  # the whole response survives
    assert row["labels"] == [IGNORE_INDEX] * (16 - len(r)) + r


def test_classification_tokenize_keeps_the_label_and_truncates(tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict({"text": ["short one", " ".join(["long"] * 40)], "label": [3, 1]})
    rows = tokenize(ds, tokenizer, "classification", max_length=10)
    assert list(rows["labels"]) == [3, 1]
    assert len(rows[0]["input_ids"]) < 10
    assert len(rows[1]["input_ids"]) == 10


def test_collate_pads_with_the_pad_id_and_masks_the_padding(tokenizer: Any) -> None:
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    for pad_id in (tokenizer.pad_token_id, 99):  # the tokenizer's (0 for MiniLM) and a non-zero one
        batch = collate(rows, pad_id)
        assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, pad_id, pad_id]]))
        assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
        assert torch.equal(batch["labels"], torch.tensor([[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]))
        assert all(t.dtype == torch.long for t in batch.values())


def test_collate_classification_labels_are_one_per_row(tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict({"text": ["a b c d", "hello"], "label": [1, 0]})
    rows = list(tokenize(ds, tokenizer, "classification", max_length=16))
    batch = collate(rows, tokenizer.pad_token_id)
    assert torch.equal(batch["labels"], torch.tensor([1, 0]))
    n0, n1 = len(rows[0]["input_ids"]), len(rows[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and n0 > n1
    assert batch["attention_mask"][1].tolist() == [1] * n1 + [0] * (n0 - n1)
    assert batch["input_ids"][1, n1:].tolist() == [tokenizer.pad_token_id] * (n0 - n1)
