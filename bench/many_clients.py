"""1,000 virtual clients in one simulation: memory, disk and a round's overhead beyond training.

    python bench/many_clients.py [--clients 1000] [--sampled 10] [--rounds 20] [--strategy fedsa-lora] [--quick]

One ``fedtune simulate`` run on AG News with all-MiniLM-L6-v2 (rank-8 LoRA): the 5,000 training
articles split IID over ``--clients`` clients (5 each at 1,000), ``--sampled`` drawn a round, 2
local steps of 4, the central test set (300 articles) evaluated every round. The default method
is FedSA-LoRA, whose clients keep their personal B on their own disk between rounds, so the
per-client state is there to measure.

While it runs, a thread samples every 0.5 s the resident memory of this process (the driver:
server, strategy, Flower's simulation engine) and of the client actors (Ray's
``ClientAppActor`` processes), and after each round the bytes under the client-state folder.
Per round it prints the peak driver and actor memory since the previous round, the state on
disk, the round's seconds, the clients' summed training seconds (their step seconds times their
steps; clients train one at a time) and the rest: a round's overhead beyond training, sampling,
messaging, aggregation, evaluation and checkpointing included, with the central evaluation's
share beside. Results go to ``bench/results/many_clients.json`` (``--quick``: 50 clients, 4 rounds,
``many_clients_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
LOCAL_STEPS, BATCH = 2, 4


def actor_processes() -> list:
    import psutil

    return [p for p in psutil.Process().children(recursive=True) if "ClientAppActor" in " ".join(_cmd(p))]


def _cmd(process) -> list[str]:
    try:
        return process.cmdline()
    except Exception:  # noqa: BLE001 - a process that just ended
        return []


def rss(processes: list) -> int:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except Exception:  # noqa: BLE001 - a process that just ended
            pass
    return total


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.exists() else 0


class Sampler(threading.Thread):
    """Peak driver and actor memory since the last :meth:`take`."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.me = psutil.Process()
        self.peak_driver = self.peak_actors = 0
        self.stopped = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            driver, actors = self.me.memory_info().rss, rss(actor_processes())
            with self.lock:
                self.peak_driver, self.peak_actors = max(self.peak_driver, driver), max(self.peak_actors, actors)

    def take(self) -> tuple[int, int]:
        with self.lock:
            out = (self.peak_driver, self.peak_actors)
            self.peak_driver = self.peak_actors = 0
        return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--sampled", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--strategy", default="fedsa-lora")
    parser.add_argument("--quick", action="store_true", help="50 clients, 4 rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rounds = 50, 4
    if not (SHARED / "agnews").is_dir():
        print(f"skipped: {SHARED / 'agnews'} absent (see ../shared/data/SOURCES.md)")
        return 0
    sys.path.insert(0, str(ROOT))
    from fedtune.config import load_config
    from fedtune.flower.simulation import simulate
    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FEDTUNE_CACHE"] = str(Path(tmp) / "cache")  # the clients' state, measured below
        run_dir = Path(tmp) / "run"
        cfg = load_config(ROOT / "simulations/fedit_agnews.yaml", [
            f"strategy.name={args.strategy}", f"federation.num_clients={args.clients}",
            f"federation.fraction_train={args.sampled / args.clients}", f"federation.min_train_clients={args.sampled}",
            "federation.fraction_evaluate=0", f"federation.num_rounds={args.rounds}", "federation.client_cpus=2",
            "train.threads=1", f"train.local_steps={LOCAL_STEPS}", f"train.batch_size={BATCH}",
            "data.max_examples=5000", "data.max_test_examples=300", "data.max_length=48", "data.eval_fraction=0",
            "partition.method=iid", f"output.dir={run_dir}", "output.progress=false", "output.save_adapter=false",
            "output.plots=false"])
        sampler = Sampler()
        sampler.start()
        rows: list[dict] = []
        done = threading.Event()

        def watch() -> None:
            metrics = run_dir / "metrics.jsonl"
            seen = 0
            while not done.is_set() or seen < len(_lines(metrics)):
                lines = _lines(metrics)
                for line in lines[seen:]:
                    r = json.loads(line)
                    driver, actors = sampler.take()
                    train = sum((c.get("step_seconds") or 0) * LOCAL_STEPS for c in r.get("client_resources") or [])
                    rows.append({"round": r["round"], "seconds": r["round_seconds"], "train_seconds": train,
                                 "eval_seconds": r.get("eval_seconds"), "driver_mb": driver / 2**20,
                                 "actors_mb": actors / 2**20,
                                 "state_bytes": folder_bytes(Path(tmp) / "cache" / "client-state"),
                                 "clients": r.get("clients_aggregated"), "accuracy": r.get("eval_accuracy")})
                seen = len(lines)
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.perf_counter()
        try:
            simulate(cfg)
        finally:
            done.set()
            watcher.join(timeout=30)
            sampler.stopped.set()
        wall = time.perf_counter() - start
    print(f"\n{args.clients} clients, {args.sampled} a round, {args.strategy}, {wall:.0f} s in all")
    print(f"{'round':>5}{'seconds':>9}{'training':>10}{'overhead':>10}{'driver MB':>11}{'actors MB':>11}"
          f"{'state KB':>10}{'accuracy':>10}")
    for r in rows:
        overhead = r["seconds"] - r["train_seconds"]
        print(f"{r['round']:>5}{r['seconds']:>9.1f}{r['train_seconds']:>10.1f}{overhead:>10.1f}{r['driver_mb']:>11.0f}"
              f"{r['actors_mb']:>11.0f}{r['state_bytes'] / 1024:>10.0f}{(r['accuracy'] or 0):>10.3f}")
    path = RESULTS / ("many_clients_quick.json" if args.quick else "many_clients.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"clients": args.clients, "sampled": args.sampled, "strategy": args.strategy,
                                "rounds": rows, "wall_seconds": round(wall, 1),
                                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1) + "\n")
    print(f"saved to {path}")
    return 0


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
