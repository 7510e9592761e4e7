"""Server aggregation and FLoRA's client memory at Llama-2 7B, 13B and 70B shapes.

    .venv/bin/python bench/scale.py            # every strategy at 7B q/v, rank 16, then 13B and 70B q/v
    .venv/bin/python bench/scale.py --all      # also all linear layers and ranks 8, 64, mixed (long; resumes)
    .venv/bin/python bench/scale.py --table    # print the saved rows only

Ten synthetic clients (random factors, no model download) send their adapters to one
strategy's ``aggregate``, on one CPU thread. The adapted shapes come from a
``transformers.LlamaConfig`` built here and instantiated on the meta device. Each row runs in
a fresh process, with the libraries imported before the clock starts: its peak memory is the
growth of the process's resident set (VmHWM, reset just before ``aggregate``) over what the
clients' adapters already take. "Bytes up" is one
client's adapter; "down" is what the strategy sends a client after the round (a new client:
FLoRA's whole history, Fed-SB's frozen B and A besides R̄). Fed-SB's row is a round that
averages R, after its initialisation rounds (not timed).

FLoRA's client rows are the bytes of the merged branch (:class:`MergedDelta`, really built,
one per distinct layer shape, times the layers of that shape) after 1, 5 and 20 rounds,
against a 4-bit NF4 base whose size per weight is measured on a bitsandbytes layer.

Rows whose clients' adapters alone would not fit in this machine's memory are computed
from the formula and marked so. Results are saved to ``bench/results/scale.json`` after
each row; a rerun skips the rows already there (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.json"
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

CLIENTS = 10
MIXED = [64, 32, 16, 16, 8, 8, 4, 4, 4, 4]  # FLoRA's heterogeneous setting (Wang et al. 2024, section 5)
ALPHA = 16.0
MEMORY_LIMIT = 12 * 2**30  # inputs above this are computed, not measured (the machine has 24 GiB, shared)
STRATEGIES = ("fedit", "ffa-lora", "fedsa-lora", "lora-fair", "flexlora", "flora", "fed-sb")
MIXED_RANKS = ("flexlora", "flora")
LLAMA = {  # Llama-2 shapes (Touvron et al. 2023, table 1; the 70B uses grouped-query attention)
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}
TARGETS = {"q/v": ("q_proj", "v_proj"), "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj")}


# --------------------------------------------------------------------------- shapes


@functools.cache
def meta_llama(size: str):
    """A Llama-2 model of ``size`` on the meta device: shapes only, no memory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(vocab_size=32000, **LLAMA[size]))


def llama_shapes(size: str, targets: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every adapted linear layer."""
    import torch

    return {name: (module.out_features, module.in_features) for name, module in meta_llama(size).named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS[targets]}


def base_parameters(size: str) -> tuple[int, int]:
    """(linear weights quantized to 4 bit, other weights kept in 16 bit) of the whole model."""
    import torch

    model = meta_llama(size)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head")
    return linear, sum(p.numel() for p in model.parameters()) - linear


def nf4_bytes_per_weight() -> float:
    """Bytes per weight of a bitsandbytes NF4 layer (packed weights + absmax per block), measured."""
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes as bnb
    # fedtune's default: NF4 without double quantization (quantization.double_quant: false)
    weight = bnb.nn.Params4bit(torch.randn(512, 1024), requires_grad=False, quant_type="nf4", compress_statistics=False)
    layer = bnb.nn.Linear4bit(1024, 512, bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=False)
    layer.weight = weight
    layer = layer.to("cpu")  # quantizes
    state = layer.weight.quant_state
    held = layer.weight.numel() * layer.weight.element_size() + state.absmax.numel() * state.absmax.element_size()
    return held / (512 * 1024)


def ranks_for(label: str) -> list[int]:
    return MIXED if label == "mixed" else [int(label)] * CLIENTS


def adapter_bytes(shapes: dict[str, tuple[int, int]], rank: int, with_a: bool = True) -> int:
    """float32 bytes of one client's factors: B (m×r) and, unless FFA-LoRA's, A (r×n) per layer."""
    return sum(4 * rank * (m + (n if with_a else 0)) for m, n in shapes.values())


# --------------------------------------------------------------------------- one row (fresh process)


def synthetic_updates(shapes, ranks, strategy_name):
    import torch

    from fedtune.strategy import ClientUpdate

    updates = []
    for k, rank in enumerate(ranks):
        gen = torch.Generator().manual_seed(k)
        arrays = {}
        for name, (m, n) in shapes.items():
            if strategy_name != "ffa-lora":
                arrays[f"{name}.lora_A.weight"] = torch.randn(rank, n, generator=gen) / n ** 0.5
            arrays[f"{name}.lora_B.weight"] = torch.randn(m, rank, generator=gen) * 1e-2
        updates.append(ClientUpdate(client_id=k, arrays=arrays, num_examples=100 + 10 * k,
                                    metrics={"lora_scaling": ALPHA / rank}))
    return updates


def replies_to(strategy, server_round: int, clients: int):
    """Random replies of the shapes each client is told to send (Fed-SB's sketches and R), echoing the round."""
    import torch

    from fedtune.strategy import ClientUpdate

    updates = []
    for k in range(clients):
        expects = strategy.configure_client(server_round, k).expects
        gen = torch.Generator().manual_seed(1000 * server_round + k)
        arrays = {key: torch.randn(shape, generator=gen) * 1e-2 for key, shape in expects.items()}
        updates.append(ClientUpdate(client_id=k, arrays=arrays, num_examples=100 + 10 * k,
                                    metrics={"lora_sb_round": server_round}))
    return updates


def fed_sb_round(strategy, clients: int):
    """Fed-SB after its initialisation rounds (aggregated here, untimed): the round that averages R."""
    server_round = 1
    while not strategy.initialized:
        strategy.aggregate(server_round, replies_to(strategy, server_round, clients))
        server_round += 1
    return server_round, replies_to(strategy, server_round, clients)


def spec_for(shapes, rank):
    import torch

    from fedtune.strategy import AdapterSpec

    gen = torch.Generator().manual_seed(1234)
    initial = {}
    for name, (m, n) in shapes.items():
        initial[f"{name}.lora_A.weight"] = torch.randn(rank, n, generator=gen) / n ** 0.5
        initial[f"{name}.lora_B.weight"] = torch.zeros(m, rank)
    return AdapterSpec(initial=initial, rank=rank, alpha=ALPHA, seed=0)


def resident_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set (Linux ≥ 4.0)


def measure_row(row: dict) -> dict:
    import gc

    import torch
    from fedtune.strategies import import_all

    from fedtune.strategy import resolve_strategy

    torch.set_num_threads(1)
    import_all()
    import torch._dynamo
    shapes = llama_shapes(row["model"], row["targets"])
    ranks = ranks_for(row["ranks"])
    strategy = resolve_strategy(row["strategy"])()
    strategy.initialize(spec_for(shapes, max(ranks)))
    if row["strategy"] == "fed-sb":
        server_round, updates = fed_sb_round(strategy, len(ranks))
    else:
        server_round, updates = 1, synthetic_updates(shapes, ranks, row["strategy"])
    gc.collect()
    reset_peak()
    before = resident_bytes("VmRSS")
    start = time.perf_counter()
    strategy.aggregate(server_round, updates)
    seconds = time.perf_counter() - start
    peak = resident_bytes("VmHWM")
    down = strategy.configure_client(server_round + 1, client_id=CLIENTS + 1).arrays
    up = [sum(t.numel() * t.element_size() for t in u.arrays.values()) for u in updates]
    return {**row, "seconds": round(seconds, 3), "extra_bytes": peak - before, "inputs_bytes": sum(up),
            "up_bytes": max(up), "down_bytes": sum(t.numel() * t.element_size() for t in down.values()),
            "how": "measured"}


# --------------------------------------------------------------------------- FLoRA clients


def flora_client_row(size: str, targets: str, ranks_label: str, nf4: float) -> dict:
    """Bytes of FLoRA's merged branch after 1, 5 and 20 rounds, one real MergedDelta per layer shape."""
    import torch
    from fedtune.strategies.flora.residual import MergedDelta

    shapes = llama_shapes(size, targets)
    per_round = sum(ranks_for(ranks_label))
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes.values():
        counts[shape] = counts.get(shape, 0) + 1
    held = {1: 0, 5: 0, 20: 0}
    gen = torch.Generator().manual_seed(0)
    for (m, n), count in counts.items():
        delta = MergedDelta((m, n))
        for t in range(1, 21):
            if delta.dense is None:  # once dense, further rounds add in place: the size stays
                delta.add(torch.randn(per_round, n, generator=gen), torch.randn(m, per_round, generator=gen))
            if t in held:
                held[t] += count * delta.nbytes
    linear, other = base_parameters(size)
    base = linear * nf4 + other * 2
    return {"model": size, "targets": targets, "ranks": ranks_label, "base_bytes": int(base),
            **{f"round{t}_bytes": b for t, b in held.items()}}


# --------------------------------------------------------------------------- the table


def grid(everything: bool) -> list[dict]:
    rows = []
    sizes_targets = [(s, "q/v") for s in LLAMA] + ([(s, "all") for s in LLAMA] if everything else [])
    for size, targets in sizes_targets:
        for ranks in (["16"] if not everything else ["8", "16", "64", "mixed"]):
            for name in STRATEGIES:
                if ranks == "mixed" and name not in MIXED_RANKS:
                    continue
                rows.append({"model": size, "targets": targets, "ranks": ranks, "strategy": name})
    return rows


def key(row: dict) -> str:
    return "|".join(str(row[k]) for k in ("model", "targets", "ranks", "strategy"))


def formula_row(row: dict) -> dict:
    """Bytes from the shapes alone, for rows whose inputs would not fit this machine."""
    shapes = llama_shapes(row["model"], row["targets"])
    ranks = ranks_for(row["ranks"])
    if row["strategy"] == "fed-sb":  # R (r×r) per layer
        up = [4 * r * r * len(shapes) for r in ranks]
    else:
        up = [adapter_bytes(shapes, r, with_a=row["strategy"] != "ffa-lora") for r in ranks]
    return {**row, "seconds": None, "extra_bytes": None, "inputs_bytes": sum(up), "up_bytes": max(up),
            "down_bytes": None, "how": "formula"}


def run_row(row: dict) -> dict:
    shapes = llama_shapes(row["model"], row["targets"])
    inputs = sum(adapter_bytes(shapes, r) for r in ranks_for(row["ranks"]))
    if inputs * 4 > MEMORY_LIMIT:  # inputs + up to 3× extra
        return formula_row(row)
    done = subprocess.run([sys.executable, __file__, "--row", json.dumps(row)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"row {key(row)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def gib(value) -> str:
    return "—" if value is None else f"{value / 2**30:.2f}"


def mib(value) -> str:
    return "—" if value is None else f"{value / 2**20:,.1f}"


def print_table(results: dict) -> None:
    print(f"{'model':5} {'targets':7} {'ranks':5} {'strategy':10} {'agg s':>7} {'extra MiB':>10} "
          f"{'÷ inputs':>8} {'up MiB':>8} {'down MiB':>9}  how (inputs: all clients' adapters)")
    order = {key(row): i for i, row in enumerate(grid(True))}  # the grid's order, whatever order rows ran in
    for row in sorted(results["server"].values(), key=lambda row: order.get(key(row), len(order))):
        ratio = "—" if row["extra_bytes"] is None else f"{row['extra_bytes'] / row['inputs_bytes']:.2f}"
        seconds = "—" if row["seconds"] is None else f"{row['seconds']:.2f}"
        print(f"{row['model']:5} {row['targets']:7} {row['ranks']:5} {row['strategy']:10} {seconds:>7} "
              f"{mib(row['extra_bytes']):>10} {ratio:>8} {mib(row['up_bytes']):>8} {mib(row['down_bytes']):>9}  "
              f"{row['how']}" + (f" (inputs {gib(row['inputs_bytes'])} GiB, not run)" if row["how"] == "formula" else ""))
    print()
    print(f"FLoRA client, merged branch beside a 4-bit NF4 base ({results.get('nf4_bytes_per_weight', 0):.4f} "
          "bytes per quantized weight, measured), GiB (× the base)")
    print(f"{'model':5} {'targets':7} {'ranks':5} {'base GiB':>8} {'+1 round':>14} {'+5 rounds':>14} {'+20 rounds':>14}")
    for row in results["flora_client"].values():
        cells = [f"{gib(row[f'round{t}_bytes'])} ({1 + row[f'round{t}_bytes'] / row['base_bytes']:.2f}×)"
                 for t in (1, 5, 20)]
        print(f"{row['model']:5} {row['targets']:7} {row['ranks']:5} {gib(row['base_bytes']):>8} "
              + " ".join(f"{c:>14}" for c in cells))


def load_results(fresh: bool) -> dict:
    if RESULTS.exists() and not fresh:
        return json.loads(RESULTS.read_text())
    return {"server": {}, "flora_client": {}}


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="all linear layers and ranks 8/16/64/mixed too")
    parser.add_argument("--table", action="store_true", help="print the saved results only")
    parser.add_argument("--fresh", action="store_true", help="forget saved results")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one row in this (fresh) process
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure_row(json.loads(args.row))))
        return
    results = load_results(args.fresh)
    if not args.table:
        results.setdefault("nf4_bytes_per_weight", nf4_bytes_per_weight())
        for row in grid(args.all):
            if key(row) in results["server"]:
                continue
            results["server"][key(row)] = run_row(row)
            save(results)
            print(f"{key(row)}: {results['server'][key(row)]['seconds']} s", file=sys.stderr, flush=True)
        for size in LLAMA:  # q/v only: all linear layers would multiply out GB-sized dense branches
            for targets in ["q/v"]:
                for ranks in (["8", "16", "64", "mixed"] if args.all else ["16"]):
                    name = f"{size}|{targets}|{ranks}"
                    if name not in results["flora_client"]:
                        results["flora_client"][name] = flora_client_row(size, targets, ranks,
                                                                         results["nf4_bytes_per_weight"])
                        save(results)
    print_table(results)


if __name__ == "__main__":
    main()
