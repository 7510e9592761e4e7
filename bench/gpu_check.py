"""A QLoRA federation on the GPU beside the same federation on the CPU: speed, memory, agreement.

    .venv/bin/python bench/gpu_check.py                 # CUDA bf16, CUDA 4-bit and CPU 4-bit runs, compared
    .venv/bin/python bench/gpu_check.py --cpu-only      # the CPU half alone (on a machine without a GPU)

Three runs, each a fedtune simulation: ``cuda-bf16`` (the base and LoRA in bfloat16 on the GPU,
no quantization; the update crosses the wire as float32, which ``ArrayRecord`` accepts),
``cuda`` (4-bit NF4 base on the GPU) and ``cpu`` (the same 4-bit federation on the CPU).

Two clients fine-tune SmolLM2-135M-Instruct (installed from PyPI) on a 4-bit NF4 base for two
rounds of FedIT on the Alpaca instructions in ``../shared/data/instructions``, once with
``model.device=cuda`` (both clients share the GPU, ``federation.client_gpus=0.5``) and once
with ``model.device=cpu``, from the same seeds and partitions. It prints the seconds per local
step and the peak memory of each run (the GPU's as torch allocated it), the evaluation loss,
and how far apart the two global adapters end: the largest relative Frobenius difference of a
LoRA factor. The runs agree within ``--tolerance`` (default 5e-2), not bitwise: the CUDA and CPU
kernels of bitsandbytes' 4-bit matmuls and of the attention accumulate in different orders, and
two rounds of AdamW carry those last-bit differences into the factors.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from fedtune.config import load_config
from fedtune.flower.simulation import simulate
from fedtune.reporting.runlog import ADAPTER_DIR, METRICS_FILE

DATA = ROOT.parent / "shared" / "data" / "instructions" / "instruction-data.json"


def overrides(run_name: str, out: Path, data: Path) -> list[str]:
    device = run_name.split("-")[0]
    base = (["model.dtype=bfloat16", "model.quantization=none"] if run_name.endswith("bf16")
            else ["model.quantization=4bit", "model.compute_dtype=float32"])
    return ["model.name=builtin:SmolLM2-135M-Instruct", "model.task=causal-lm", *base,
            f"model.device={device}", "adapter.rank=8", "adapter.alpha=16",
            "adapter.target_modules=[q_proj,v_proj]", f"data.source={data}", "data.alpaca=true",
            "data.max_examples=96", "data.max_test_examples=32", "data.max_length=128", "partition.method=iid",
            "train.local_steps=5", "train.batch_size=4", "train.learning_rate=5e-4",
            "federation.num_clients=2", "federation.num_rounds=2", "federation.client_cpus=1",
            f"federation.client_gpus={0.5 if device == 'cuda' else 0}", f"output.dir={out}", "output.progress=false"]


def run(device: str, out: Path, data: Path) -> dict:
    began = time.perf_counter()
    run_dir = simulate(load_config(None, overrides(device, out, data)))
    rows = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    clients = [c for row in rows for c in row.get("client_resources") or []]
    steps = [c["step_seconds"] for c in clients if c.get("step_seconds")]
    from safetensors.torch import load_file

    return {"device": device, "seconds": time.perf_counter() - began,
            "step_seconds": sum(steps) / len(steps) if steps else float("nan"),
            "peak_gpu_bytes": max((c.get("peak_gpu_bytes") or 0 for c in clients), default=0),
            "peak_rss_bytes": max((c.get("peak_rss_bytes") or 0 for c in clients), default=0),
            "eval_loss": rows[-1].get("eval_loss"),
            "adapter": load_file(str(run_dir / ADAPTER_DIR / "adapter_model.safetensors"))}


def largest_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    worst = 0.0
    for key in a:
        reference = float(a[key].double().norm())
        if reference > 0:
            worst = max(worst, float((a[key].double() - b[key].double()).norm()) / reference)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-only", action="store_true", help="run the CPU half only")
    parser.add_argument("--tolerance", type=float, default=5e-2, help="largest relative difference accepted")
    parser.add_argument("--data", type=Path, default=DATA)
    args = parser.parse_args()
    if not args.data.is_file():
        print(f"skipped: {args.data} is absent (see ../shared/data/SOURCES.md)")
        return 0
    if not args.cpu_only and not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False; rerun with --cpu-only for the CPU half")
        return 1
    with tempfile.TemporaryDirectory() as scratch:
        devices = ["cpu"] if args.cpu_only else ["cuda-bf16", "cuda", "cpu"]
        results = [run(device, Path(scratch) / device, args.data) for device in devices]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"torch {torch.__version__}, GPU: {gpu}")
    print(f"{'run':9} {'run s':>7} {'s/step':>8} {'peak GPU MiB':>13} {'peak RSS MiB':>13} {'eval loss':>10}")
    for r in results:
        print(f"{r['device']:9} {r['seconds']:7.1f} {r['step_seconds']:8.3f} {r['peak_gpu_bytes'] / 2**20:13.1f} "
              f"{r['peak_rss_bytes'] / 2**20:13.1f} {r['eval_loss']:10.4f}")
    if len(results) > 1:
        results = results[1:]  # 4-bit on CUDA against 4-bit on the CPU
        difference = largest_relative_difference(results[1]["adapter"], results[0]["adapter"])
        agree = difference <= args.tolerance
        print(f"largest relative difference of a LoRA factor, CUDA vs CPU: {difference:.3g} "
              f"({'within' if agree else 'OUTSIDE'} the tolerance {args.tolerance:g})")
        print(f"speed-up per local step: {results[1]['step_seconds'] / results[0]['step_seconds']:.1f}x")
        return 0 if agree else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
