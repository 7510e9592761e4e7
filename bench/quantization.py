"""Full-precision, 8-bit and 4-bit clients under the same federated schedule, side by side.

    python bench/quantization.py [--rounds 3] [--local-steps 8] [--only none 4bit] [key=value ...]

SmolLM2-135M-Instruct (installed from PyPI), instruction-tuned with LoRA r = 8 on q_proj and
v_proj (loss on the response tokens), FedIT, on the Alpaca-format instruction set in
../shared/data/instructions: its first 1,000 records IID over 3 clients, the last 100 held
out as the central test set. Every setting runs the same schedule, seed and data in a
process of its own (a fresh Ray, a fresh client process), one after the other; extra
key=value pairs override every run (``model.gradient_checkpointing=true``, say).

Measured in the client (training) process, as the clients report it (``client_resources``):

* peak RSS: ``getrusage`` ``ru_maxrss`` of the Ray worker that trains every virtual client,
  after the last round (the process loads its base from the pre-quantized copy);
* base weights: bytes of every base parameter and buffer, packed 4/8-bit storage and
  quantization state included (``fedtune.models.quantization.weight_bytes``);
* s/step: mean seconds per optimizer step over every client and round.

Also measured: the peak RSS of the one-off process that quantizes the full-precision
checkpoint and writes the pre-quantized copy (a fresh cache, so it really runs), and the
eval metrics of the final global adapter (next-token accuracy and loss on the held-out
responses) on the server's unquantized base, which the run logs, and on the clients' own
base.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTIONS = ROOT.parent / "shared" / "data" / "instructions" / "instruction-data.json"
HELD_OUT = 100
SETTINGS = ("none", "8bit", "4bit")
MIB = 2**20


def overrides(args: argparse.Namespace, setting: str, work: Path) -> list[str]:
    return [
        "model.name=builtin:SmolLM2-135M-Instruct", "model.task=causal-lm", f"model.quantization={setting}",
        "adapter.rank=8", "adapter.alpha=16", "adapter.target_modules=[q_proj,v_proj]",
        f"data.source={work / 'train.json'}", f"data.test_source={work / 'test.json'}", "data.alpaca=true",
        # The figures in the README were measured with the Alpaca wrapper, before chat templates.
        "data.prompt_format=alpaca", "data.eval_fraction=0", "data.max_length=96", "partition.method=iid",
        f"federation.num_clients={args.clients}", f"federation.num_rounds={args.rounds}",
        "federation.fraction_evaluate=0", "federation.client_cpus=2",
        f"train.local_steps={args.local_steps}", "train.batch_size=4", "train.learning_rate=1e-3",
        "train.threads=1", f"output.dir={work / setting}", "output.progress=false", *args.overrides,
    ]


def build(args: argparse.Namespace, setting: str, work: Path) -> dict:
    """Quantize the full-precision checkpoint once (in this process) and report the peak RSS."""
    from fedtune.config import load_config
    from fedtune.models.loading import load_base_model
    from fedtune.models.quantization import peak_rss_bytes

    cfg = load_config(None, overrides(args, setting, work))
    load_base_model(cfg.model.for_client(0), None, cfg.seed)
    return {"build_peak_rss": peak_rss_bytes()}


def run(args: argparse.Namespace, setting: str, work: Path) -> dict:
    """The federation, then the final adapter evaluated on the clients' own base."""
    from safetensors.torch import load_file

    from fedtune.config import load_config
    from fedtune.data import load_splits, resolve_prompt_format, tokenize
    from fedtune.flower.simulation import simulate
    from fedtune.models.loading import get_adapter
    from fedtune.objectives import evaluate

    cfg = load_config(None, overrides(args, setting, work))
    run_dir = simulate(cfg)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["round"] > 0]
    resources = [c for r in trained for c in r["client_resources"]]
    _, test = load_splits(cfg.data, cfg.model.task)
    own = get_adapter(cfg.model.for_client(0), cfg.adapter, None, cfg.seed)
    own.load(load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
    fmt = resolve_prompt_format(own.tokenizer, cfg.data.prompt_format, alpaca=cfg.data.alpaca)
    own_eval = evaluate(own, tokenize(test, own.tokenizer, cfg.model.task, cfg.data.max_length, fmt),
                        cfg.train.eval_batch_size)
    return {
        "peak_rss": max(c["peak_rss_bytes"] for c in resources),
        "base_bytes": max(c["base_weight_bytes"] for c in resources),
        "step_seconds": sum(c["step_seconds"] for c in resources) / len(resources),
        "acc_round0": rows[0]["eval_accuracy"],
        "acc": rows[-1]["eval_accuracy"],
        "loss": rows[-1]["eval_loss"],
        "acc_own_base": own_eval["accuracy"],
        "loss_own_base": own_eval["loss"],
        "train_loss": trained[-1]["train_loss"],
        "run_seconds": sum(r["round_seconds"] for r in rows),
    }


def child(args: argparse.Namespace) -> int:
    """One measurement in this (fresh) process; prints one RESULT line of JSON."""
    sys.path.insert(0, str(ROOT))
    import torch

    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(1)  # the server's evaluation, like the clients' train.threads=1
    work = Path(args.work)
    result = build(args, args.setting, work) if args.child == "build" else run(args, args.setting, work)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def measure(args: argparse.Namespace, what: str, setting: str, work: Path, env: dict[str, str]) -> dict:
    command = [sys.executable, __file__, "--child", what, "--setting", setting, "--work", str(work),
               "--rounds", str(args.rounds), "--local-steps", str(args.local_steps), "--clients", str(args.clients),
               *args.overrides]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{what} {setting} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def print_table(results: dict[str, dict]) -> None:
    full = results.get("none")
    print("accuracy: next-token accuracy on the held-out responses, after the last round, on the server's "
          "unquantized base\n(round 0: before training) and on the client's own base; ratios to full precision "
          "in brackets")
    head = (f"{'client base':<12}{'base weights':>16}{'peak RSS':>19}{'quantize once':>15}{'s/step':>14}"
            f"{'acc r0':>8}{'acc':>8}{'Δ acc':>7}{'loss':>8}{'acc own':>9}{'loss own':>10}")
    print(head)
    print("-" * len(head))
    for setting, r in results.items():
        def ratio(key: str) -> str:
            return f" ({r[key] / full[key]:.2f})" if full else ""

        build = f"{r['build_peak_rss'] / MIB:,.0f} MiB" if "build_peak_rss" in r else "-"
        delta = f"{100 * (r['acc'] - full['acc']):+.2f}" if full else "-"
        print(f"{setting:<12}{r['base_bytes'] / MIB:>9,.0f} MiB{ratio('base_bytes'):>7}"
              f"{r['peak_rss'] / MIB:>12,.0f} MiB{ratio('peak_rss'):>7}{build:>15}"
              f"{r['step_seconds']:>7.2f}{ratio('step_seconds'):>7}{r['acc_round0']:>8.4f}{r['acc']:>8.4f}"
              f"{delta:>7}{r['loss']:>8.4f}{r['acc_own_base']:>9.4f}{r['loss_own_base']:>10.4f}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=SETTINGS, help="run only these settings")
    parser.add_argument("--child", choices=("build", "run"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if not INSTRUCTIONS.is_file():
        print(f"skipped: {INSTRUCTIONS} is absent (see ../shared/data/SOURCES.md)")
        return 0
    sys.path.insert(0, str(ROOT))
    from fedtune.models.cache import cache_dir
    from fedtune.models.loading import resolve_model_path

    resolve_model_path("builtin:SmolLM2-135M-Instruct")  # converts the packaged GGUF once, if needed
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # One file, two disjoint parts: training records and the held-out central test set.
        records = json.loads(INSTRUCTIONS.read_text())
        (work / "train.json").write_text(json.dumps(records[:-HELD_OUT]))
        (work / "test.json").write_text(json.dumps(records[-HELD_OUT:]))
        # A fresh cache for the pre-quantized copies, so the one-off quantizing load really runs;
        # the converted full-precision model is linked in from the usual cache.
        cache = work / "cache"
        cache.mkdir()
        (cache / "SmolLM2-135M-Instruct").symlink_to(cache_dir() / "SmolLM2-135M-Instruct")
        env = {**os.environ, "FEDTUNE_CACHE": str(cache), "FLWR_TELEMETRY_ENABLED": "0"}
        for setting in args.only or SETTINGS:
            print(f"== {setting}", flush=True)
            result = {} if setting == "none" else measure(args, "build", setting, work, env)
            result.update(measure(args, "run", setting, work, env))
            print(f"   {json.dumps(result)}", flush=True)
            results[setting] = result
    print()
    print_table(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
