"""The progress display: clients' step files, their sum on the server, live bars and plain lines."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path
from types import SimpleNamespace

from rich.console import Console
from rich.progress import Progress

from fedtune.flower.server_app import StoppableGrid
from fedtune.reporting.progress import RoundProgress, StepFile, local_steps, read_steps, reporting_steps


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_step_file_is_written_at_most_once_per_interval(tmp_path: Path) -> None:
    clock = FakeClock()
    steps = StepFile(tmp_path / "a.json", interval=1.0, clock=clock)
    steps.begin(10)
    assert json.loads((tmp_path / "a.json").read_text()) == {"done": 0, "total": 10}
    for _ in range(3):
        steps.advance()
    assert json.loads((tmp_path / "a.json").read_text())["done"] == 0  # within the second: not written
    clock.now = 1.0
    steps.advance()
    assert json.loads((tmp_path / "a.json").read_text()) == {"done": 4, "total": 10}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]  # the staging file was renamed


def test_read_steps_sums_the_files_and_skips_missing_or_partial_ones(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"done": 3, "total": 10}')
    (tmp_path / "b.json").write_text('{"done": 10, "total": 10}')
    (tmp_path / "c.json").write_text('{"done": 1')  # cut short
    (tmp_path / "d.json").write_text('{"done": 1}')
    assert read_steps([tmp_path / n for n in ("a.json", "b.json", "c.json", "d.json", "absent.json")]) == (13, 20)


def test_steps_count_only_inside_reporting_steps(tmp_path: Path) -> None:
    local_steps(5).advance()  # no active file: a no-op
    with reporting_steps(str(tmp_path / "absent-folder" / "s.json")) as steps:
        assert steps is None
        local_steps(5).advance()
    assert not (tmp_path / "absent-folder").exists()  # a client never creates folders
    with reporting_steps(str(tmp_path / "s.json")) as steps:
        report = local_steps(4)
        for _ in range(4):
            report.advance()
    assert json.loads((tmp_path / "s.json").read_text()) == {"done": 4, "total": 4}  # flushed at the end


def test_training_reports_its_steps(tiny_bert: str, tmp_path: Path) -> None:
    from fedtune.client.training import steps_per_round, train_adapter
    from fedtune.config import AdapterConfig, DataConfig, ModelConfig, TrainConfig
    from fedtune.data import load_splits, tokenize
    from fedtune.models.loading import get_adapter
    from fedtune.objectives import evaluate

    handle = get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=2), 4, seed=0)
    pool, test = load_splits(DataConfig(max_examples=48, max_test_examples=20, max_length=16), "classification")
    train = tokenize(pool, handle.tokenizer, "classification", 16)
    cfg = TrainConfig(batch_size=8, local_epochs=1)
    handle.set_trainable([".*"])
    with reporting_steps(str(tmp_path / "s.json")):
        train_adapter(handle, train, cfg, seed=0)
    assert json.loads((tmp_path / "s.json").read_text()) == {"done": 6, "total": steps_per_round(cfg, 48)}
    seen: list[tuple[int, int]] = []
    evaluate(handle, tokenize(test, handle.tokenizer, "classification", 16), 8,
             on_batch=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_off_a_terminal_a_plain_line_comes_every_interval(tmp_path: Path) -> None:
    out = io.StringIO()
    clock = FakeClock()
    progress = RoundProgress(3, Console(file=out, width=200), bar=Progress(), step_dir=tmp_path / ".progress",
                             plain_every=30.0, clock=clock)
    assert not progress.live  # not a terminal: no bars even though one is given
    files = [progress.step_file(1, node) for node in (7, 8)]
    assert files[0] == str((tmp_path / ".progress" / "round-1-node-7.json").resolve())
    progress.start(1, "training", 2, files)
    Path(files[0]).write_text('{"done": 5, "total": 10}')
    clock.now = 10.0
    progress.replies(0, 2)
    assert out.getvalue() == ""
    clock.now = 31.0
    progress.replies(1, 2)
    assert out.getvalue() == "round 1/3 training, clients done 1/2, local steps 5/10, 31s\n"
    clock.now = 40.0
    progress.replies(2, 2)
    assert out.getvalue().count("\n") == 1  # the next line waits for another 30 s
    clock.now = 41.0
    progress.evaluation(1, 4)
    clock.now = 75.0
    progress.evaluation(2, 4)
    assert out.getvalue().splitlines()[-1] == "round 1/3 central evaluation, batches 2/4, 34s"
    progress.close()
    assert not (tmp_path / ".progress").exists()


def test_on_a_terminal_the_bars_follow_clients_steps_and_batches(tmp_path: Path) -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    bar = Progress(console=console)
    progress = RoundProgress(2, console, bar=bar, step_dir=tmp_path / ".progress")
    tasks = {t.description.strip(): t for t in bar.tasks}
    progress.start(2, "training", 3, [progress.step_file(2, 1)])
    Path(progress.step_file(2, 1)).write_text('{"done": 2, "total": 8}')
    progress.replies(1, 3)
    assert (tasks["clients done"].completed, tasks["clients done"].total) == (1, 3)
    assert (tasks["local steps"].completed, tasks["local steps"].total) == (2, 8)
    assert not tasks["evaluation batches"].visible
    progress.evaluation(5, 9)
    assert tasks["evaluation batches"].visible and tasks["evaluation batches"].completed == 5
    assert not tasks["clients done"].visible


def test_a_deployment_names_no_step_files() -> None:
    progress = RoundProgress(2, Console(file=io.StringIO()))
    assert progress.step_file(1, 5) is None


class _SlowGrid:
    """Two messages, answered one per poll."""

    def __init__(self) -> None:
        self.left = ["m1", "m2"]

    def push_messages(self, messages: object) -> list[str]:
        return list(self.left)

    def pull_messages(self, ids: object) -> list[object]:
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=self.left.pop(0)))] if self.left else []


def test_the_grid_reports_replies_as_they_arrive() -> None:
    grid = StoppableGrid(_SlowGrid(), threading.Event(), poll_interval=0.01)  # type: ignore[arg-type]
    seen: list[tuple[int, int]] = []
    grid.on_poll = lambda arrived, sent: seen.append((arrived, sent))
    assert len(list(grid.send_and_receive([], timeout=5))) == 2
    assert seen == [(1, 2), (2, 2)]


def test_a_step_file_in_an_unwritable_place_does_not_fail_training(tmp_path: Path) -> None:
    steps = StepFile(tmp_path / "gone" / "s.json")
    steps.begin(3)
    steps.advance()
    steps.flush()  # the folder is gone: nothing written, nothing raised
