"""Tokens per second of fedtune's local training against a plain PEFT training loop, same batches, one run.

    python bench/client_throughput.py [--steps 12] [--repeats 2] [--batch-size 8] [--max-length 160]
                                      [--threads 2]

Both sides train SmolLM2-135M-Instruct (``builtin:``, from PyPI) with rank-8 LoRA (α 16) on
``q_proj``/``v_proj``, AdamW at 2e-3, gradient clipping at 1.0, on the Alpaca instruction set in
``../shared/data/instructions`` rendered with the chat template (the loss on the response tokens):

* ``fedtune``: :func:`fedtune.client.training.train_adapter` on the model :func:`fedtune.models.loading.get_adapter`
  loads, as a client runs it for one round of ``--steps`` steps;
* ``plain``: the model built with ``AutoModelForCausalLM.from_pretrained`` and ``get_peft_model``,
  and a bare loop (forward, backward, clip, ``AdamW.step``, ``zero_grad``) over the very batches
  ``train_adapter`` draws (:func:`fedtune.client.training.batches` with the same seed).

Each repeat runs one round of each, alternating (fedtune, plain, fedtune, plain, ...), after one
warm-up round of two steps each, so that a slower period of the machine falls on both. Tokens
are the non-padding tokens of the batches (prompt and response). It prints tokens per second of
each side per repeat and the ratio fedtune / plain of their totals.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "instructions" / "instruction-data.json"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per timed round")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not DATA.is_file():
        print(f"skipped: {DATA} absent (see ../shared/data/SOURCES.md)")
        return 0
    sys.path.insert(0, str(ROOT))
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from fedtune.client.training import batches, train_adapter
    from fedtune.config import load_config
    from fedtune.data import load_splits, tokenize
    from fedtune.data.prompts import with_resolved_prompt_format
    from fedtune.models.loading import get_adapter, lora_config, resolve_model_path
    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    torch.set_num_threads(args.threads)
    cfg = load_config(None, [
        "model.name=builtin:SmolLM2-135M-Instruct", "model.task=causal-lm", "adapter.rank=8", "adapter.alpha=16.0",
        "adapter.target_modules=[q_proj,v_proj]", f"data.source={DATA}", "data.alpaca=true",
        f"data.max_length={args.max_length}", f"train.batch_size={args.batch_size}", "train.learning_rate=2e-3",
        "train.max_grad_norm=1.0", f"train.threads={args.threads}"])
    cfg = with_resolved_prompt_format(cfg)
    pool, _ = load_splits(cfg.data, cfg.model.task)
    handle = get_adapter(cfg.model, cfg.adapter, None, cfg.seed)
    handle.load({})
    handle.set_trainable([".*"])
    train = tokenize(pool, handle.tokenizer, cfg.model.task, cfg.data.max_length, cfg.data.prompt_format)
    pad = handle.tokenizer.pad_token_id

    path = resolve_model_path(cfg.model.name)
    torch.manual_seed(cfg.seed)
    plain = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           lora_config(cfg.adapter, cfg.model.task))
    plain_params = [p for p in plain.parameters() if p.requires_grad]

    def tokens(steps: int, seed: int) -> int:
        count = 0
        for step, batch in enumerate(batches(train, args.batch_size, pad, seed)):
            if step == steps:
                break
            count += int(batch["attention_mask"].sum())
        return count

    def fedtune_round(steps: int, seed: int) -> float:
        start = time.perf_counter()
        train_adapter(handle, train, replace(cfg.train, local_steps=steps), seed=seed)
        return time.perf_counter() - start

    def plain_round(steps: int, seed: int) -> float:
        start = time.perf_counter()
        optimizer = torch.optim.AdamW(plain_params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
        plain.train()
        for step, batch in enumerate(batches(train, args.batch_size, pad, seed)):
            if step == steps:
                break
            plain(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(plain_params, cfg.train.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        plain.eval()
        return time.perf_counter() - start

    fedtune_round(2, seed=99)
    plain_round(2, seed=99)
    totals = {"fedtune": [0, 0.0], "plain": [0, 0.0]}
    print(f"{'repeat':<8}{'side':<9}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}")
    for repeat in range(args.repeats):
        seed = 1000 + repeat
        n = tokens(args.steps, seed)
        for side, run in (("fedtune", fedtune_round), ("plain", plain_round)):
            seconds = run(args.steps, seed)
            totals[side][0] += n
            totals[side][1] += seconds
            print(f"{repeat:<8}{side:<9}{n:>8}{seconds:>9.1f}{n / seconds:>10.1f}", flush=True)
    rate = {side: n / s for side, (n, s) in totals.items()}
    print(f"\ntokens/s: fedtune {rate['fedtune']:.1f}, plain PEFT loop {rate['plain']:.1f}, "
          f"ratio {rate['fedtune'] / rate['plain']:.3f} ({args.repeats} × {args.steps} steps of {args.batch_size}, "
          f"{args.threads} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
