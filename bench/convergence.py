"""Convergence of every LoRA strategy next to centralized LoRA and a plain FedAvg loop (#14).

    python bench/convergence.py [--datasets agnews sst2] [--strategies fedit ...] [--rounds 10]
                                [--clients 10] [--local-steps 4] [--batch-size 16] [--lr 5e-3]
                                [--max-length 48] [--train-examples 2000] [--test-examples 300]
                                [--quick] [--fresh] [--redo ROW ...] [--no-plot]

Rows, per data set (AG News 4-class, SST-2), all with all-MiniLM-L6-v2, rank-8 LoRA on query and
value (Fed-SB: rank 32), by default 10 clients split by Dirichlet(α = 0.5) over labels, every
client in every round, ``train.local_steps=4``, ``train.batch_size=16``,
``train.learning_rate=5e-3``, the same seed (the flags change the schedule for every row alike):

* one fedtune simulation per strategy (fedit, ffa-lora, flora, lora-fair, fed-sb, fedkseed);
  Fed-SB runs its initialisation rounds first (they count as rounds and bytes in its curve),
  FedKSeed runs simulations/fedkseed_agnews.yaml's recipe: zeroth-order steps on the head with
  its own step size, number of steps and batch size;
* variants, run only when named: a strategy with one setting changed (``VARIANTS``);
* ``centralized``: the same adapter trained by fedtune's own building blocks on the pooled
  training data, each "round" seeing as many examples as a federated round does
  (clients × local steps × batch), evaluated on the same test set after each round. Every round
  starts a fresh AdamW, as every client's local round does;
* ``plain``: FedAvg of LoRA with no Flower and no fedtune runtime: a PEFT model, a torch AdamW
  loop and a weighted mean of the trainable tensors, on the very partitions fedtune makes
  (:func:`fedtune.data.partition_dataset`). Its mean round time against FedIT's is the
  framework's overhead ratio; both round times include the central evaluation. Its bytes are
  counted, not measured: every trainable tensor down and up once per client and round.

Compute is the same for every row: clients train one at a time (``federation.client_cpus=2`` on
a 2-core machine) with one torch thread (``train.threads=1``), and the in-process rows use one
thread too. Mean round seconds leave out the first training round when there are others: in a
simulation it includes starting the client actors and loading the model into them.

Default sizes: 2,000 training and 300 test examples (AG News' test split, SST-2's dev split),
sequences cut at 48 tokens, clients keep no local eval split. The defaults are sized so that all
16 rows fit in about 2 hours on 2 cores (20 rounds of 10 steps of 32 examples, the schedule of
the issue, is ten times the compute per row).

A simulation runs all its rounds in one ``simulate`` call, so the plateau is not a stopping
rule: every row runs to the round cap (``--rounds``) and the plateau round is computed from the
curve afterwards, as the first trained round after which no round within the next three gains
0.5 point of accuracy over the best trained round so far (none when the cap comes first).

The table gives, per row, the final and best accuracy, the plateau round, the rounds and
cumulative bytes (up + down, all clients) to reach 90 % and 95 % of centralized LoRA's best
accuracy, the mean round seconds, and for fedit the overhead ratio against the plain loop.

Resumable: each finished row goes into ``bench/results/convergence.json`` at once (``--quick``
writes ``convergence_quick.json``: 3 clients, 2 rounds of 3 steps of 8 examples, 300/100
examples, 35-50 s a row on 2 shared cores), and a rerun skips rows already there with the same
schedule; ``--fresh`` starts over. A rerun that names only finished rows just prints the tables.
PNG curves (accuracy against round and against cumulative bytes, drawn by
:func:`fedtune.reporting.plots.comparison_figure`) are written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
STRATEGIES = ["fedit", "ffa-lora", "flora", "lora-fair", "fed-sb", "fedkseed"]
BASELINES = ["centralized", "plain"]
CONFIGS = {"agnews": "simulations/fedit_agnews.yaml", "sst2": "simulations/fedit_sst2.yaml"}
FED_SB_INIT_ROUNDS = 2
PLATEAU_WINDOW = 3
PLATEAU_GAIN = 0.005
TARGETS = (0.90, 0.95)

# Per strategy, what it needs beyond the common settings.
STRATEGY_OVERRIDES: dict[str, list[str]] = {
    "fedit": [],
    "ffa-lora": ["strategy.name=ffa-lora"],
    "flora": ["strategy.name=flora"],
    "lora-fair": ["strategy.name=lora-fair"],
    "fed-sb": ["strategy.name=fed-sb", "adapter.rank=32", "adapter.alpha=32.0",
               f"strategy.options.init_passes={FED_SB_INIT_ROUNDS}", "strategy.options.init_samples=64"],
    # Zeroth-order: simulations/fedkseed_agnews.yaml's recipe, steps on the head only (1,540 values)
    # with their own step size, number of steps and a smaller batch (two forward passes a step).
    "fedkseed": ["strategy.name=fedkseed", "strategy.options.tune=adapter", "strategy.options.trainable=[classifier]",
                 "strategy.options.k=4096", "strategy.options.eps=1e-3", "strategy.options.lr=3e-2",
                 "strategy.options.steps=40", "train.batch_size=8"],
}

# Rows that change one setting of a strategy, run only when named: what its gap to FedIT comes from.
VARIANTS: dict[str, list[str]] = {
    "ffa-lora-lr2x": ["strategy.name=ffa-lora", "train.learning_rate=1e-2"],
    "fed-sb-lr2x": [*STRATEGY_OVERRIDES["fed-sb"], "train.learning_rate=1e-2"],
    # Heterogeneous ranks 4/8/16 under FLoRA: one α for every rank (s_k = α / r_k), or α_k = 2·r_k as
    # the official code (adapter.alpha_per_rank, s_k = α / adapter.rank = 2 for every client).
    "flora-ranks": ["strategy.name=flora", "adapter.client_ranks=[4,8,16]"],
    "flora-ranks-per-rank": ["strategy.name=flora", "adapter.client_ranks=[4,8,16]", "adapter.alpha_per_rank=true"],
    # FedIT under a server optimizer (fedtune/averaging/server_optimizers.py), each at its default η.
    "fedit-fedavgm": ["strategy.server_optimizer.name=fedavgm"],
    "fedit-fedadam": ["strategy.server_optimizer.name=fedadam"],
    "fedit-fedyogi": ["strategy.server_optimizer.name=fedyogi"],
}
ROW_OVERRIDES = {**STRATEGY_OVERRIDES, **VARIANTS}


@dataclass(frozen=True)
class Setting:
    """The schedule every row shares."""

    rounds: int
    clients: int
    local_steps: int
    batch_size: int
    learning_rate: float
    max_examples: int
    max_test_examples: int | None
    max_length: int = 64

    def overrides(self, dataset: str) -> list[str]:
        """Config overrides that put a data set's YAML on this schedule."""
        out = [f"federation.num_rounds={self.rounds}", f"federation.num_clients={self.clients}",
               "federation.fraction_train=1.0", "federation.fraction_evaluate=0", "federation.client_cpus=2",
               "train.threads=1",
               f"train.local_steps={self.local_steps}", f"train.batch_size={self.batch_size}",
               f"train.learning_rate={self.learning_rate}", f"data.max_examples={self.max_examples}",
               f"data.max_length={self.max_length}", "data.eval_fraction=0",
               "partition.method=dirichlet", "partition.alpha=0.5"]
        if self.max_test_examples is not None:
            out.append(f"data.max_test_examples={self.max_test_examples}")
        return out


def setting_of(args: argparse.Namespace, dataset: str) -> Setting:
    """The schedule the flags give (``--quick``: a small fixed one)."""
    if args.quick:
        return Setting(rounds=args.rounds, clients=3, local_steps=3, batch_size=8, learning_rate=5e-3,
                       max_examples=300, max_test_examples=100, max_length=48)
    return Setting(rounds=args.rounds, clients=args.clients, local_steps=args.local_steps,
                   batch_size=args.batch_size, learning_rate=args.lr, max_examples=args.train_examples,
                   max_test_examples=args.test_examples, max_length=args.max_length)


# ---------------------------------------------------------------- the three kinds of row
def strategy_overrides(name: str, setting: Setting, quick: bool) -> list[str]:
    """The strategy's own overrides, with Fed-SB's init rounds added and FedKSeed shortened in quick mode."""
    extra = list(ROW_OVERRIDES[name])
    if "strategy.name=fed-sb" in extra:
        extra.append(f"federation.num_rounds={setting.rounds + FED_SB_INIT_ROUNDS}")
    if name == "fedkseed" and quick:
        extra = [e for e in extra if "options.steps" not in e] + ["strategy.options.steps=5"]
    return extra


def load(dataset: str, setting: Setting, extra: list[str], out_dir: Path):
    """The fedtune config of one row."""
    from fedtune.config import load_config

    overrides = [f"output.dir={out_dir}", "output.progress=false", "output.save_adapter=false",
                 *setting.overrides(dataset), *extra]
    return load_config(ROOT / CONFIGS[dataset], overrides), overrides


def run_strategy(dataset: str, name: str, setting: Setting, quick: bool, tmp: Path) -> dict:
    """One fedtune simulation; its curve from metrics.jsonl."""
    from fedtune.flower.simulation import simulate

    cfg, overrides = load(dataset, setting, strategy_overrides(name, setting, quick), tmp / f"{dataset}-{name}")
    run_dir = simulate(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve, total = [], 0
    for r in rows:
        total += (r.get("bytes_up") or 0) + (r.get("bytes_down") or 0)
        curve.append({"round": r["round"], "accuracy": r["eval_accuracy"], "bytes": total,
                      "seconds": r["round_seconds"]})
    return {"overrides": overrides, "curve": curve}


def tokenized_pool_and_test(cfg, handle):
    """The pooled training data and the central test set, tokenized as the server does."""
    from fedtune.data import load_splits, tokenize

    pool, test = load_splits(cfg.data, cfg.model.task)
    tok = lambda ds: tokenize(ds, handle.tokenizer, cfg.model.task, cfg.data.max_length,
                              cfg.data.prompt_format)
    return pool, tok(pool), tok(test)


def run_centralized(dataset: str, setting: Setting, tmp: Path) -> dict:
    """LoRA on the pooled data, as many examples per round as a federated round, fedtune's trainer."""
    import torch

    from fedtune.client.training import train_adapter
    from fedtune.data import load_splits, num_labels
    from fedtune.data.prompts import with_resolved_prompt_format
    from fedtune.models.loading import get_adapter
    from fedtune.objectives import evaluate

    cfg, overrides = load(dataset, setting, [], tmp / f"{dataset}-centralized")
    cfg = with_resolved_prompt_format(cfg)
    torch.set_num_threads(cfg.train.threads)
    pool, _ = load_splits(cfg.data, cfg.model.task)
    handle = get_adapter(cfg.model, cfg.adapter, num_labels(pool), cfg.seed)
    handle.load({})
    handle.set_trainable([".*"])
    _, train, test = tokenized_pool_and_test(cfg, handle)
    round_cfg = replace(cfg.train, local_steps=setting.clients * setting.local_steps)
    curve = [{"round": 0, "accuracy": evaluate(handle, test, cfg.train.eval_batch_size)["accuracy"],
              "bytes": 0, "seconds": 0.0}]
    for rnd in range(1, setting.rounds + 1):
        start = time.perf_counter()
        train_adapter(handle, train, round_cfg, seed=cfg.train.seed + 1000 * rnd)
        accuracy = evaluate(handle, test, cfg.train.eval_batch_size)["accuracy"]
        curve.append({"round": rnd, "accuracy": accuracy, "bytes": 0, "seconds": time.perf_counter() - start})
        print(f"  centralized round {rnd}: accuracy {accuracy:.4f}", flush=True)
    return {"overrides": overrides, "curve": curve}


def run_plain(dataset: str, setting: Setting, tmp: Path) -> dict:
    """FedAvg of LoRA with PEFT and torch only, on fedtune's partitions; rounds are timed."""
    import torch

    from fedtune.data import load_splits, num_labels, partition_dataset, tokenize
    from fedtune.data.prompts import with_resolved_prompt_format

    cfg, overrides = load(dataset, setting, [], tmp / f"{dataset}-plain")
    cfg = with_resolved_prompt_format(cfg)
    torch.set_num_threads(cfg.train.threads)
    pool, test = load_splits(cfg.data, cfg.model.task)
    model, tokenizer = plain_model(cfg, num_labels(pool))
    tok = lambda ds: tokenize(ds, tokenizer, cfg.model.task, cfg.data.max_length,
                              cfg.data.prompt_format)
    parts = [tok(p) for p in partition_dataset(pool, cfg.partition, cfg.federation.num_clients)]
    test = tok(test)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_state = {n: p.detach().clone() for n, p in trainable.items()}
    curve = [{"round": 0, "accuracy": plain_accuracy(model, test, tokenizer.pad_token_id), "bytes": 0,
              "seconds": 0.0}]
    per_round_bytes = 2 * len(parts) * sum(t.numel() * t.element_size() for t in global_state.values())
    for rnd in range(1, setting.rounds + 1):
        start = time.perf_counter()
        updates = []
        for cid, part in enumerate(parts):
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(global_state[n])
            plain_local_train(model, trainable, part, cfg.train, tokenizer.pad_token_id,
                              seed=cfg.train.seed + 1000 * rnd + cid)
            updates.append(({n: p.detach().clone() for n, p in trainable.items()}, len(part)))
        global_state = weighted_mean(updates)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(global_state[n])
        accuracy = plain_accuracy(model, test, tokenizer.pad_token_id)
        curve.append({"round": rnd, "accuracy": accuracy, "bytes": per_round_bytes * rnd,
                      "seconds": time.perf_counter() - start})
        print(f"  plain round {rnd}: accuracy {accuracy:.4f}, {curve[-1]['seconds']:.1f} s", flush=True)
    return {"overrides": overrides, "curve": curve}


def plain_model(cfg, num_labels: int):
    """A PEFT LoRA classifier built directly with transformers and peft."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedtune.models.loading import lora_config, resolve_model_path

    path = resolve_model_path(cfg.model.name)
    torch.manual_seed(cfg.seed)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    model = get_peft_model(base, lora_config(cfg.adapter, cfg.model.task))
    return model, AutoTokenizer.from_pretrained(path)


def plain_local_train(model, trainable: dict, ds, train_cfg, pad_id: int, seed: int) -> None:
    """``local_steps`` AdamW steps over shuffled batches of ``ds``."""
    import torch
    from torch.utils.data import DataLoader

    from fedtune.data import collate

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(trainable.values(), lr=train_cfg.learning_rate,
                                  weight_decay=train_cfg.weight_decay)
    loader = DataLoader(ds, batch_size=train_cfg.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), collate_fn=lambda rows: collate(rows, pad_id))
    model.train()
    steps = 0
    while steps < train_cfg.local_steps:
        for batch in loader:
            model(**batch).loss.backward()
            if train_cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(trainable.values()), train_cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps >= train_cfg.local_steps:
                break
    model.eval()


def weighted_mean(updates: list[tuple[dict, int]]) -> dict:
    """Example-weighted mean of each tensor, accumulated in fp64."""
    total = sum(n for _, n in updates)
    return {k: sum(state[k].double() * (n / total) for state, n in updates).to(updates[0][0][k].dtype)
            for k in updates[0][0]}


def plain_accuracy(model, ds, pad_id: int) -> float:
    """Label accuracy on ``ds``."""
    import torch
    from torch.utils.data import DataLoader

    from fedtune.data import collate

    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=64, collate_fn=lambda rows: collate(rows, pad_id)):
            correct += int((model(**batch).logits.argmax(-1) == batch["labels"]).sum())
    return correct / len(ds)


# ---------------------------------------------------------------- summaries
def plateau_round(accuracies: list[float]) -> int | None:
    """First trained round after which none of the next ``PLATEAU_WINDOW`` gains ``PLATEAU_GAIN`` over the best.

    ``accuracies[r]`` is round r's, round 0 the untrained model's. Round 0 takes no part: on
    SST-2 the untrained head's majority guess beats the first rounds, which would read as a
    plateau before any training.
    """
    for r in range(1, len(accuracies) - PLATEAU_WINDOW):
        best = max(accuracies[1: r + 1])
        if max(accuracies[r + 1: r + 1 + PLATEAU_WINDOW]) < best + PLATEAU_GAIN:
            return r
    return None


def mean_round_seconds(curve: list[dict]) -> float:
    """Mean seconds of the training rounds, the first left out when there are others (actor start-up)."""
    rounds = curve[2:] if len(curve) > 2 else curve[1:]
    return mean(p["seconds"] for p in rounds) if rounds else math.nan


def first_reaching(curve: list[dict], threshold: float) -> dict | None:
    """The first point of ``curve`` whose accuracy reaches ``threshold``."""
    return next((p for p in curve if p["accuracy"] is not None and p["accuracy"] >= threshold), None)


def summarize(label: str, curve: list[dict], central_best: float | None) -> dict:
    """Final and best accuracy, plateau round, rounds and bytes to the targets, mean round seconds."""
    acc = [p["accuracy"] for p in curve]
    out = {"row": label, "final": acc[-1], "best": max(acc), "plateau": plateau_round(acc),
           "round_s": mean_round_seconds(curve)}
    for frac in TARGETS:
        hit = first_reaching(curve, frac * central_best) if central_best is not None else None
        out[f"r{int(frac * 100)}"] = hit["round"] if hit else None
        out[f"b{int(frac * 100)}"] = hit["bytes"] if hit else None
    return out


def _cell(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:>{width}{fmt}}"


def print_table(dataset: str, rows: dict[str, dict]) -> None:
    """The per-data-set table of every finished row."""
    central = rows.get("centralized")
    central_best = max(p["accuracy"] for p in central["curve"]) if central else None
    summaries = [summarize(label, rows[label]["curve"], central_best)
                 for label in [*BASELINES, *STRATEGIES, *VARIANTS] if label in rows]
    seconds = {s["row"]: s["round_s"] for s in summaries}
    print(f"\n{dataset}: centralized best {_cell(central_best, '.4f', 0).strip()}")
    width = max([12, *(len(summary["row"]) + 2 for summary in summaries)])
    head = (f"{'row':<{width}}{'final':>8}{'best':>8}{'plateau':>8}{'r→90%':>7}{'bytes→90%':>14}{'r→95%':>7}"
            f"{'bytes→95%':>14}{'round s':>9}{'overhead':>9}")
    print(head)
    print("-" * len(head))
    for s in summaries:
        overhead = seconds["fedit"] / seconds["plain"] if s["row"] == "fedit" and "plain" in seconds else None
        print(f"{s['row']:<{width}}{_cell(s['final'], '.4f', 8)}{_cell(s['best'], '.4f', 8)}{_cell(s['plateau'], 'd', 8)}"
              f"{_cell(s['r90'], 'd', 7)}{_cell(s['b90'], ',', 14)}{_cell(s['r95'], 'd', 7)}{_cell(s['b95'], ',', 14)}"
              f"{_cell(s['round_s'], '.1f', 9)}{_cell(overhead, '.2f', 9)}")


def plot(dataset: str, rows: dict[str, dict], path: Path) -> None:
    """Accuracy against round and against cumulative bytes, one line per row (fedtune's comparison figure)."""
    from fedtune.reporting.plots import comparison_figure

    def as_metrics(curve: list[dict]) -> list[dict]:
        sent = [0] + [p["bytes"] for p in curve]
        return [{"round": p["round"], "eval_accuracy": p["accuracy"], "bytes_up": sent[i + 1] - sent[i]}
                for i, p in enumerate(curve)]

    fig = comparison_figure({label: as_metrics(row["curve"]) for label, row in rows.items()})
    fig.suptitle(f"{dataset}: convergence")
    fig.tight_layout()
    fig.savefig(path, format="png")
    print(f"wrote {path}")


# ---------------------------------------------------------------- driver
def load_results(path: Path, fresh: bool) -> dict:
    if fresh or not path.exists():
        return {"rows": {}}
    return json.loads(path.read_text())


def save_results(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)


def runner(label: str) -> Callable[[str, Setting, bool, Path], dict]:
    if label == "centralized":
        return lambda ds, setting, quick, tmp: run_centralized(ds, setting, tmp)
    if label == "plain":
        return lambda ds, setting, quick, tmp: run_plain(ds, setting, tmp)
    return lambda ds, setting, quick, tmp: run_strategy(ds, label, setting, quick, tmp)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(CONFIGS), default=["agnews", "sst2"])
    parser.add_argument("--strategies", nargs="+", choices=[*BASELINES, *STRATEGIES, *VARIANTS],
                        default=[*BASELINES, *STRATEGIES],
                        help="rows to run (centralized and plain are rows too; the variants, a strategy with "
                             "one setting changed, only when named); fedit, centralized and plain run first")
    parser.add_argument("--rounds", type=int, default=None, help="round cap (default 10, quick 2)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--test-examples", type=int, default=300,
                        help="test examples (AG News has 7,600, SST-2's dev split 872)")
    parser.add_argument("--quick", action="store_true", help="smoke test: AG News subset, 3 clients, 2 rounds")
    parser.add_argument("--fresh", action="store_true", help="discard finished rows and start over")
    parser.add_argument("--redo", nargs="+", default=[], metavar="ROW",
                        help="run these rows again even if finished (e.g. fedit plain: the overhead ratio on a "
                             "quiet machine)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.datasets = ["agnews"]
    args.rounds = args.rounds or (2 if args.quick else 10)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    missing = [d for d in args.datasets if not (SHARED / d).is_dir()]
    if missing:
        print(f"skipped: {', '.join(str(SHARED / d) for d in missing)} absent (see ../shared/data/SOURCES.md)")
        return 0
    sys.path.insert(0, str(ROOT))
    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    path = RESULTS / ("convergence_quick.json" if args.quick else "convergence.json")
    results = load_results(path, args.fresh)
    order = [label for label in ["fedit", *BASELINES, *STRATEGIES, *VARIANTS] if label in args.strategies]
    order = list(dict.fromkeys(order))
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            setting = setting_of(args, dataset)
            for label in order:
                key = f"{dataset}/{label}"
                done = results["rows"].get(key)
                if done and done["setting"] == asdict(setting) and label not in args.redo:
                    print(f"== {key}: done before, skipped")
                    continue
                if done:
                    why = "--redo" if label in args.redo else "done before with another setting"
                    print(f"== {key}: {why}, run again")
                print(f"== {key}: {args.rounds} rounds", flush=True)
                start = time.perf_counter()
                row = runner(label)(dataset, setting, args.quick, Path(tmp))
                results["rows"][key] = {**row, "dataset": dataset, "row": label, "setting": asdict(setting),
                                        "wall_seconds": round(time.perf_counter() - start, 1),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                save_results(path, results)
                print(f"== {key}: {results['rows'][key]['wall_seconds']:.0f} s, saved to {path}", flush=True)
    for dataset in args.datasets:
        rows = {v["row"]: v for k, v in results["rows"].items() if v["dataset"] == dataset}
        if rows:
            print_table(dataset, rows)
            if not args.no_plot:
                curves = {label: row for label, row in rows.items() if label not in VARIANTS}  # readable
                plot(dataset, curves, path.with_name(f"{path.stem}_{dataset}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
