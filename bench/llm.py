"""Federated instruction and preference tuning of a causal LM, every method, next to centralized LoRA and a plain loop.

    python bench/llm.py [--tasks instructions agnews preference] [--rows fedit ...] [--rounds 5] [--clients 10]
                        [--sampled N] [--local-steps N] [--batch-size N] [--lr 2e-3]
                        [--gen-examples N] [--test-examples N] [--quick] [--fresh] [--redo ROW ...] [--no-plot]

The model is SmolLM2-135M-Instruct (``builtin:``, installed from PyPI), prompts rendered with its
chat template, rank-8 LoRA (α 16) on ``q_proj`` and ``v_proj``, the loss on the response tokens.
Three tasks from ``../shared/data``:

* ``instructions``: the 1,100 Alpaca records of ``instructions/instruction-data.json``; a fixed
  10 % (110, ``data.test_fraction=0.1``, seed 0) is the central test set. Clients are split by
  Dirichlet(α = 0.5) over the *instruction family*, read from the instruction's first word
  (:func:`instruction_family`: question, rewrite, convert, generate, classify, other), so one
  hospital-like client mostly converts units and another mostly answers questions. Scored by
  ROUGE-L (``eval.metric=rouge_l``) of greedy generations on the first ``--gen-examples`` test
  prompts, and by eval loss on all 110;
* ``agnews``: AG News as generation: the prompt asks for the topic (World, Sports, Business,
  Sci/Tech) of the article and the response is the topic's name. 2,000 training articles split
  by Dirichlet(α = 0.5) over the topic, the first 100 of the test split (shuffled, seed 0) as
  the central test set (``--test-examples 300``: the first 300, kept as rows ``ROW/test300``),
  scored by ``choice_accuracy`` on up to 4 generated tokens. Every client
  trains every round, 5 steps of 4 examples (instructions: 3 clients a round, 5 steps of 8; see
  :func:`setting_of` for why);
* ``preference``: federated DPO (``train.objective=dpo``, β = 0.1) on the 1,100 pairs of
  ``preference/instruction-data-with-preference.json`` (an Alpaca record with a polite ``chosen``
  and an impolite ``rejected`` response); a fixed 10 % (110 pairs) held out, clients split by
  Dirichlet(α = 0.5) over the instruction family as for ``instructions``, 3 of 10 a round, 5 steps
  of 4 pairs. Scored by the held-out preference accuracy (the share of pairs whose chosen response
  gets the larger implicit reward β·log π/π_ref) and the mean reward margin; ROUGE-L against the
  chosen response on 5 prompts keeps the generations before and after. Rows: the base model
  (round 0), centralized DPO, FedIT and FLoRA, an exact method (``TASK_ROWS``).

The derived files (the family column, the AG News prompts) are written to a temporary folder,
never into the repository.

Rows, per task, all on the same schedule (``--rounds`` rounds, ``--sampled`` of ``--clients``
clients per round, ``--local-steps`` AdamW steps of ``--batch-size`` examples each (per-task
defaults), learning rate ``--lr``, ``--threads`` torch threads (2), one client at a time):

* ``zero-shot``: the untuned model, i.e. round 0 of every curve (every LoRA starts at B = 0);
* ``centralized``: the same LoRA trained with fedtune's trainer on the pooled data, each round as
  many optimizer steps as a federated round takes in all (sampled × local steps), so the totals
  match;
* ``plain``: FedAvg of LoRA with transformers, PEFT and a torch AdamW loop, no Flower and no
  fedtune runtime, on the partitions fedtune makes, the same number of clients drawn per round
  (numpy, seeded); scored by the same generation and metric code;
* every strategy (``STRATEGY_OVERRIDES``) as a fedtune simulation. Fed-SB trains at rank 64
  (r² = 4,096 values a module: a real budget), after its initialisation rounds (counted). FedKSeed
  and FedKSeed-Pro take zeroth-order steps (two forward passes along one of K = 4,096 seeded
  directions) on the LoRA B factors; only seeds and scalars go up. Their recipe (``_ZO``) comes
  from a probe on the pooled data (see ``STRATEGY_OVERRIDES``). ``ffa-lora-lr2x`` and
  ``flora-lr2x`` run those two methods at twice ``--lr``, ``ffa-lora-r16`` FFA-LoRA at rank 16.

A run with ``--rounds`` other than 5 keeps its rows as ``TASK/ROW@ROUNDS`` beside the default ones.

The table gives, per row, the final and best score, rounds to reach 90 % of the centralized gain
over zero-shot, bytes up and down per client in a typical (median) round, all bytes moved in the
run (MB, initialisation rounds included), and the mean round seconds (the first left out: it
includes starting the simulation).

Resumable: each finished row goes into ``bench/results/llm.json`` at once (``--quick``:
``llm_quick.json``, 2 rounds of 2 clients × 2 steps of 4 examples, 8 prompts), and a rerun skips
rows already there with the same schedule; ``--fresh`` starts over. PNG curves
(``fedtune.reporting.plots.comparison_figure``) are written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import mean, median

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "bench" / "results"
TASKS = ("instructions", "agnews", "preference")
TASK_DATA = {"instructions": "instructions/instruction-data.json", "agnews": "agnews/train.csv",
             "preference": "preference/instruction-data-with-preference.json"}
# What each task's table and curves score: a generative metric, or DPO's held-out preference accuracy.
SCORE_KEY = {"instructions": "eval_rouge_l", "agnews": "eval_choice_accuracy", "preference": "eval_accuracy"}
# DPO rows: the base model (round 0), centralized DPO, FedIT and exact methods; the plain loop is SFT's.
TASK_ROWS = {"preference": ["centralized", "fedit", "flora"]}
AGNEWS_TOPICS = ["World", "Sports", "Business", "Sci/Tech"]
AGNEWS_PROMPT = ("Which topic is this news article about? Answer with one of: World, Sports, Business, "
                 "Sci/Tech.\n\n{text}")
FED_SB_INIT_ROUNDS = 2
DEFAULT_ROUNDS = 5
GAIN_TARGET = 0.9

# The first word of an instruction names what it asks for; the families group those words.
FAMILIES = {
    "question": {"what", "who", "when", "where", "which", "why", "how", "name", "identify", "define", "explain",
                 "provide", "list", "describe", "give", "find", "is", "are", "can", "does", "do", "tell", "state"},
    "rewrite": {"rewrite", "rephrase", "paraphrase", "change", "edit", "correct", "revise", "transform",
                "make", "turn", "reword", "simplify", "shorten", "expand"},
    "convert": {"convert", "translate", "calculate", "compute", "sort", "arrange", "reverse", "solve", "round",
                "add", "subtract", "multiply", "divide"},
    "generate": {"generate", "create", "write", "compose", "suggest", "come", "produce", "construct", "form",
                 "develop", "design", "complete", "use"},
    "classify": {"classify", "categorize", "determine", "evaluate", "assess", "label", "detect", "check",
                 "decide", "rate", "analyze", "analyse", "compare"},
}

COMMON = ["model.name=builtin:SmolLM2-135M-Instruct", "model.task=causal-lm", "adapter.rank=8",
          "adapter.alpha=16.0", "adapter.target_modules=[q_proj,v_proj]", "data.eval_fraction=0",
          "partition.method=dirichlet", "partition.alpha=0.5", "partition.min_partition_size=5",
          "federation.fraction_evaluate=0", "federation.client_cpus=2", "train.eval_batch_size=16",
          "eval.batch_size=20"]

_ZO = ["strategy.name=fedkseed", "strategy.options.tune=adapter", "strategy.options.k=4096",
       "strategy.options.eps=1e-3", "strategy.options.lr=3e-3", "train.batch_size=2"]
# Zeroth-order steps a client takes a round: 60 with 3 clients a round (instructions); with
# all 10 clients every round (AG News) 30 keep a round's forward passes about the same.
ZO_STEPS = {"instructions": 60, "agnews": 30}

# Per strategy, what it needs beyond the common settings.
STRATEGY_OVERRIDES: dict[str, list[str]] = {
    "fedit": [],
    "ffa-lora": ["strategy.name=ffa-lora"],
    "flora": ["strategy.name=flora"],
    "flora-ranks": ["strategy.name=flora", "adapter.client_ranks=[4,8,16]"],
    # Twice the schedule's learning rate: FFA-LoRA trains B alone and FLoRA starts every round
    # from a fresh LoRA (B = 0), so each moves less per step than FedIT at the same rate.
    "ffa-lora-lr2x": ["strategy.name=ffa-lora"],
    # Rank 16 (α 32: the same scale 2): B's update lies in the row space of the frozen random A,
    # r directions of the input; twice as many.
    "ffa-lora-r16": ["strategy.name=ffa-lora", "adapter.rank=16", "adapter.alpha=32.0"],
    "flora-lr2x": ["strategy.name=flora"],
    "lora-fair": ["strategy.name=lora-fair"],
    "fed-sb": ["strategy.name=fed-sb", "adapter.rank=64", "adapter.alpha=64.0",
               f"strategy.options.init_passes={FED_SB_INIT_ROUNDS}", "strategy.options.init_samples=64"],
    "fedsa-lora": ["strategy.name=fedsa-lora"],
    "flexlora": ["strategy.name=flexlora"],
    # Zeroth-order steps on the LoRA B factors (FedKSeed's default with tune=adapter: A is left
    # as initialised). A probe on the pooled data, 300 steps of 2 examples at eta = 3e-3: B and A
    # together diverged (eval loss 1.23 -> 20.7), B alone reached 1.16 and ROUGE-L 0.389 -> 0.466.
    "fedkseed": [*_ZO, "seed=0"],
    "fedkseed-seed1": [*_ZO, "seed=1"],
    "fedkseed-pro": [*_ZO, "strategy.options.pro=true"],
}
BASELINES = ["centralized", "plain"]
ROWS = [*BASELINES, *STRATEGY_OVERRIDES]


@dataclass(frozen=True)
class Setting:
    """The schedule every row of a task shares."""

    rounds: int
    clients: int
    sampled: int
    local_steps: int
    batch_size: int
    learning_rate: float
    gen_examples: int
    max_length: int
    max_new_tokens: int
    train_examples: int | None
    test_examples: int | None

    def overrides(self) -> list[str]:
        out = [f"federation.num_rounds={self.rounds}", f"federation.num_clients={self.clients}",
               f"federation.fraction_train={self.sampled / self.clients}",
               f"federation.min_train_clients={self.sampled}",
               f"train.local_steps={self.local_steps}", f"train.batch_size={self.batch_size}",
               f"train.learning_rate={self.learning_rate}", f"data.max_length={self.max_length}",
               f"eval.max_examples={self.gen_examples}", f"eval.max_new_tokens={self.max_new_tokens}"]
        if self.train_examples is not None:
            out.append(f"data.max_examples={self.train_examples}")
        if self.test_examples is not None:
            out.append(f"data.max_test_examples={self.test_examples}")
        return out


TASK_SETTINGS = {
    "instructions": dict(sampled=3, local_steps=5, batch_size=8, learning_rate=2e-3, gen_examples=40,
                         max_length=160, max_new_tokens=48, train_examples=None, test_examples=None),
    "preference": dict(sampled=3, local_steps=5, batch_size=4, learning_rate=2e-3, gen_examples=5,
                       max_length=128, max_new_tokens=48, train_examples=None, test_examples=None),
    "agnews": dict(sampled=10, local_steps=5, batch_size=4, learning_rate=2e-3, gen_examples=100,
                   max_length=128, max_new_tokens=4, train_examples=2000, test_examples=100)}


def row_key(task: str, label: str, setting: Setting, quick: bool) -> str:
    """Where a row is kept: ``task/ROW``, with ``@ROUNDS`` for another number of rounds and ``/testN`` for
    another test-set size, so a longer or wider run is kept beside the default schedule's."""
    if quick:
        return f"{task}/{label}"
    rounds = "" if setting.rounds == DEFAULT_ROUNDS else f"@{setting.rounds}"
    test = "" if setting.test_examples == TASK_SETTINGS[task]["test_examples"] else f"/test{setting.test_examples}"
    return f"{task}/{label}{rounds}{test}"


def setting_of(args: argparse.Namespace, task: str) -> Setting:
    """The schedule the flags give for ``task`` (``--quick``: a small fixed one).

    AG News prompts hold a whole article (114 tokens on average against the instructions' ~70),
    and its one-word answers follow the topics of the clients drawn: with 3 of 10 clients a round
    (Dirichlet 0.5 over 4 topics) FedIT swung between rounds (lr 2e-3: 0.33, 0.36, 0.52, 0.65,
    0.24; lr 1e-3: 0.38, 0.43, 0.29, 0.56, 0.30), the global model leaning to whichever topics the
    round's clients held. So every client trains every round there (cross-silo), 5 steps of 4. With
    2 steps FedIT reached 0.62 in 5 rounds against centralized LoRA's 0.88 (10 sequential steps
    of averaged updates against 100 steps): too few steps, not a gap in aggregation.
    """
    per_task = dict(TASK_SETTINGS[task])
    given = {"sampled": args.sampled, "local_steps": args.local_steps, "batch_size": args.batch_size,
             "gen_examples": args.gen_examples, "learning_rate": args.lr, "test_examples": args.test_examples}
    if task == "agnews" and args.test_examples and not args.gen_examples:
        given["gen_examples"] = args.test_examples  # AG News scores its whole (cut) test set
    per_task.update({k: v for k, v in given.items() if v is not None})
    if args.quick:
        return Setting(rounds=args.rounds, clients=4,
                       **{**per_task, "sampled": 2, "local_steps": 2, "batch_size": 4, "gen_examples": 8,
                          "train_examples": 200, "test_examples": 40 if task == "agnews" else None})
    return Setting(rounds=args.rounds, clients=args.clients, **per_task)


# ---------------------------------------------------------------- data
def instruction_family(instruction: str) -> str:
    """The family of an instruction by its first word (``FAMILIES``), ``other`` when none claims it."""
    words = instruction.strip().split()
    first = words[0].lower().strip(".,:;!?\"'") if words else ""
    return next((family for family, starts in FAMILIES.items() if first in starts), "other")


def agnews_records(rows: list[list[str]]) -> list[dict]:
    """AG News CSV rows (``text``, label 0-3) as prompt/response records with the topic kept."""
    out = []
    for text, label in rows:
        topic = AGNEWS_TOPICS[int(label)]
        out.append({"prompt": AGNEWS_PROMPT.format(text=text.strip()), "response": topic, "topic": topic})
    return out


def prepare_data(task: str, folder: Path) -> list[str]:
    """Write the task's derived files into ``folder``; the config overrides that read them."""
    import csv

    if task in ("instructions", "preference"):
        records = json.loads((SHARED / TASK_DATA[task]).read_text())
        for record in records:
            record["family"] = instruction_family(record["instruction"])
        path = folder / f"{task}.json"
        path.write_text(json.dumps(records))
        # For preference pairs ROUGE-L is against the chosen response, on a few prompts: the generations
        # before and after.
        objective = ["train.objective=dpo", "train.dpo.beta=0.1"] if task == "preference" else []
        return [f"data.source={path}", "data.alpaca=true", "data.test_fraction=0.1", "data.group_column=family",
                "eval.metric=rouge_l", *objective]
    paths = {}
    for split in ("train", "test"):
        with open(SHARED / "agnews" / f"{split}.csv", newline="") as f:
            records = agnews_records([row for row in csv.reader(f) if row])
        paths[split] = folder / f"agnews_{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in records))
    return [f"data.source={paths['train']}", f"data.test_source={paths['test']}", "data.group_column=topic",
            "eval.metric=choice_accuracy", f"eval.options.choices=[{','.join(AGNEWS_TOPICS)}]"]


# ---------------------------------------------------------------- the three kinds of row
def load(task: str, setting: Setting, extra: list[str], data: list[str], out_dir: Path):
    from fedtune.config import load_config

    overrides = [f"output.dir={out_dir}", "output.progress=false", "output.save_adapter=false", "output.plots=false",
                 *COMMON, *data, *setting.overrides(), *extra]
    return load_config(None, overrides), overrides


def strategy_overrides(task: str, name: str, setting: Setting, quick: bool) -> list[str]:
    extra = list(STRATEGY_OVERRIDES[name])
    if "strategy.name=fed-sb" in extra:
        extra.append(f"federation.num_rounds={setting.rounds + FED_SB_INIT_ROUNDS}")
    if name.startswith("fedkseed"):
        extra.append(f"strategy.options.steps={2 if quick else ZO_STEPS[task]}")
    if name.endswith("-lr2x"):
        extra.append(f"train.learning_rate={2 * setting.learning_rate}")
    return extra


def run_strategy(task: str, name: str, setting: Setting, quick: bool, data: list[str], tmp: Path,
                 final_examples: int | None = None) -> dict:
    """One fedtune simulation; its curve from metrics.jsonl (and its final adapter scored on
    ``final_examples`` test records, when given)."""
    from fedtune.flower.simulation import simulate

    extra = strategy_overrides(task, name, setting, quick) + (["output.save_adapter=true"] if final_examples else [])
    cfg, overrides = load(task, setting, extra, data, tmp / f"{task}-{name}")
    run_dir = simulate(cfg)
    final = {}
    if final_examples:
        from safetensors.torch import load_file

        tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
        final = {"final_test": score_adapter(task, setting, data, tensors, final_examples, tmp)}
    key = SCORE_KEY[task]
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        curve.append({"round": r["round"], "score": r.get(key), "loss": r.get("eval_loss"),
                      "margin": r.get("eval_reward_margin"), "rouge_l": r.get("eval_rouge_l"),
                      "likelihood": r.get("eval_likelihood_accuracy"),
                      "bytes_up": r.get("bytes_up") or 0, "bytes_down": r.get("bytes_down") or 0,
                      "clients": r.get("clients_aggregated") or 0,
                      "seconds": r["round_seconds"]})
    samples = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    return {"overrides": overrides, "curve": curve, "samples": first_and_last_samples(samples), **final}


def setup_model(task: str, setting: Setting, data: list[str], out_dir: Path):
    """fedtune's own pieces, as the server uses them: config, adapter handle, raw and tokenized splits."""
    import torch

    from fedtune.data import load_splits
    from fedtune.data.prompts import with_resolved_prompt_format
    from fedtune.models.loading import get_adapter
    from fedtune.objectives import objective_of

    cfg, overrides = load(task, setting, [], data, out_dir)
    cfg = with_resolved_prompt_format(cfg)
    torch.set_num_threads(cfg.train.threads)
    objective = objective_of(cfg.train)
    pool, test = load_splits(cfg.data, cfg.model.task, cfg.train.objective)
    handle = get_adapter(cfg.model, cfg.adapter, None, cfg.seed)
    handle.load({})
    tok = lambda ds: objective.tokenize(ds, handle.tokenizer, cfg.model.task, cfg.data.max_length,
                                        cfg.data.prompt_format)
    return cfg, overrides, objective, handle, pool, test, tok


def score_adapter(task: str, setting: Setting, data: list[str], tensors: dict, examples: int, tmp: Path) -> dict:
    """Score and eval loss of an adapter on the first ``examples`` test records (all of them generated for)."""
    wider = replace(setting, test_examples=examples, gen_examples=examples)
    cfg, _, _, handle, _, test, tok = setup_model(task, wider, data, tmp / f"{task}-final")
    handle.load(tensors)
    point = evaluation(handle, tok(test), test, cfg)
    print(f"  final adapter on {len(test)} test records: score {point['score']:.4f}, loss {point['loss']:.4f}",
          flush=True)
    return {"examples": len(test), **point}


def first_and_last_samples(samples: list[dict], n: int = 3) -> list[dict]:
    """The first ``n`` generations of round 0 and of the last round (shown in the README)."""
    if not samples:
        return []
    last = max(s["round"] for s in samples)
    return [s for s in samples if s["round"] == 0 and s["index"] < n] + \
           [s for s in samples if s["round"] == last and s["index"] < n and last != 0]


def evaluation(handle, test_tok, test_raw, cfg) -> dict:
    """Score, eval loss (and DPO's margin) of the model in ``handle`` on the central test set, as the server
    computes them: DPO's preference accuracy, or the generative metric."""
    from fedtune.evaluation.generation import evaluate_generation_on
    from fedtune.objectives import evaluate, objective_of

    scores = evaluate(handle, test_tok, cfg.train.eval_batch_size, objective=objective_of(cfg.train))
    generated = evaluate_generation_on(handle, test_raw, cfg.eval, cfg.data).score
    if cfg.train.objective == "dpo":
        return {"score": scores["accuracy"], "loss": scores["loss"], "margin": scores["reward_margin"],
                "likelihood": scores["likelihood_accuracy"], "rouge_l": generated}
    return {"score": generated, "loss": scores["loss"]}


def run_centralized(task: str, setting: Setting, data: list[str], tmp: Path) -> dict:
    """LoRA on the pooled data with fedtune's trainer; per round as many steps as a federated round in all."""
    from fedtune.client.training import train_adapter

    cfg, overrides, objective, handle, pool, test, tok = setup_model(task, setting, data, tmp / f"{task}-centralized")
    handle.set_trainable([".*"])
    train, test_tok = tok(pool), tok(test)
    round_cfg = replace(cfg.train, local_steps=setting.sampled * setting.local_steps)
    curve = [{"round": 0, **evaluation(handle, test_tok, test, cfg), "bytes_up": 0, "bytes_down": 0, "seconds": 0.0}]
    for rnd in range(1, setting.rounds + 1):
        start = time.perf_counter()
        train_adapter(handle, train, round_cfg, seed=cfg.train.seed + 1000 * rnd, objective=objective)
        point = evaluation(handle, test_tok, test, cfg)
        curve.append({"round": rnd, **point, "bytes_up": 0, "bytes_down": 0, "seconds": time.perf_counter() - start})
        print(f"  centralized round {rnd}: score {point['score']:.4f}, loss {point['loss']:.4f}", flush=True)
    return {"overrides": overrides, "curve": curve}


def run_plain(task: str, setting: Setting, data: list[str], tmp: Path) -> dict:
    """FedAvg of LoRA with transformers, PEFT and torch only, on fedtune's partitions."""
    import numpy as np
    import torch
    from convergence import plain_local_train, weighted_mean
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedtune.data import load_splits, partition_dataset, tokenize
    from fedtune.data.prompts import with_resolved_prompt_format
    from fedtune.evaluation.generation import eval_prompts, generate
    from fedtune.evaluation.metrics import build_metric
    from fedtune.models.loading import lora_config, resolve_model_path

    cfg, overrides = load(task, setting, [], data, tmp / f"{task}-plain")
    cfg = with_resolved_prompt_format(cfg)
    torch.set_num_threads(cfg.train.threads)
    pool, test = load_splits(cfg.data, cfg.model.task)
    path = resolve_model_path(cfg.model.name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(cfg.seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
                           lora_config(cfg.adapter, cfg.model.task))
    tok = lambda ds: tokenize(ds, tokenizer, cfg.model.task, cfg.data.max_length, cfg.data.prompt_format)
    parts = [tok(p) for p in partition_dataset(pool, cfg.partition, cfg.federation.num_clients)]
    test_tok = tok(test)
    gen = test.select(range(min(len(test), setting.gen_examples)))
    prompts, references = eval_prompts(gen, tokenizer, cfg.data), [str(r) for r in gen["response"]]
    metric = build_metric(cfg.eval.metric, cfg.eval.options)
    chat = cfg.data.prompt_format == "chat"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def score_and_loss() -> tuple[float, float]:
        predictions = generate(model, tokenizer, prompts, max_new_tokens=cfg.eval.max_new_tokens,
                               batch_size=cfg.eval.batch_size, max_prompt_tokens=cfg.data.max_length,
                               add_special_tokens=not chat)
        return metric.compute(predictions, references), plain_loss(model, test_tok, pad)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    global_state = {n: p.detach().clone() for n, p in trainable.items()}
    per_client_bytes = sum(t.numel() * t.element_size() for t in global_state.values())
    rng = np.random.default_rng(cfg.seed)
    score, loss = score_and_loss()
    curve = [{"round": 0, "score": score, "loss": loss, "bytes_up": 0, "bytes_down": 0, "seconds": 0.0}]
    for rnd in range(1, setting.rounds + 1):
        start = time.perf_counter()
        chosen = sorted(rng.choice(len(parts), size=setting.sampled, replace=False).tolist())
        updates = []
        for cid in chosen:
            with torch.no_grad():
                for n, p in trainable.items():
                    p.copy_(global_state[n])
            plain_local_train(model, trainable, parts[cid], cfg.train, pad, seed=cfg.train.seed + 1000 * rnd + cid)
            updates.append(({n: p.detach().clone() for n, p in trainable.items()}, len(parts[cid])))
        global_state = weighted_mean(updates)
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(global_state[n])
        score, loss = score_and_loss()
        curve.append({"round": rnd, "score": score, "loss": loss, "bytes_up": per_client_bytes * len(chosen),
                      "bytes_down": per_client_bytes * len(chosen), "clients": len(chosen),
                      "seconds": time.perf_counter() - start})
        print(f"  plain round {rnd}: score {score:.4f}, loss {loss:.4f}, {curve[-1]['seconds']:.1f} s", flush=True)
    return {"overrides": overrides, "curve": curve}


def plain_loss(model, ds, pad_id: int) -> float:
    """Mean loss per response token over ``ds`` (the loss the model computes, weighted by token count)."""
    import torch
    from torch.utils.data import DataLoader

    from fedtune.data import collate

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in DataLoader(ds, batch_size=16, collate_fn=lambda rows: collate(rows, pad_id)):
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            tokens += n
    return total / tokens


# ---------------------------------------------------------------- summaries
def gain_round(curve: list[dict], zero: float, central_best: float | None) -> int | None:
    """The first round whose score reaches zero-shot + 90 % of the centralized gain."""
    if central_best is None or central_best <= zero:
        return None
    target = zero + GAIN_TARGET * (central_best - zero)
    return next((p["round"] for p in curve if p["score"] is not None and p["score"] >= target), None)


def per_client_round(curve: list[dict], key: str) -> float | None:
    """Median ``key`` bytes per client over the rounds that moved bytes: a typical round, which
    Fed-SB's initialisation rounds and FLoRA's growing download do not skew as a mean would."""
    values = [p[key] / p["clients"] for p in curve[1:] if p.get(key) and p.get("clients")]
    return median(values) if values else None


def summarize(label: str, curve: list[dict], zero: float, central_best: float | None) -> dict:
    scores = [p["score"] for p in curve if p["score"] is not None]
    rounds = curve[2:] if len(curve) > 2 else curve[1:]
    return {"row": label, "final": scores[-1], "best": max(scores[1:] or scores), "final_loss": curve[-1]["loss"],
            "r90": gain_round(curve, zero, central_best), "up": per_client_round(curve, "bytes_up"),
            "down": per_client_round(curve, "bytes_down"),
            "total_mb": sum(p["bytes_up"] + p["bytes_down"] for p in curve) / 1e6 if len(curve) > 1 else None,
            "round_s": mean(p["seconds"] for p in rounds) if rounds else math.nan}


def _cell(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:>{width}{fmt}}"


def print_table(task: str, rows: dict[str, dict]) -> None:
    first = next(iter(rows.values()))["curve"][0]
    zero = first["score"]
    central = rows.get("centralized")
    central_best = max(p["score"] for p in central["curve"][1:]) if central else None
    summaries = [{"row": "zero-shot", "final": zero, "best": zero, "final_loss": first["loss"], "r90": None,
                  "up": None, "down": None, "total_mb": None, "round_s": None}]
    summaries += [summarize(label, rows[label]["curve"], zero, central_best) for label in ROWS if label in rows]
    gain = (central_best - zero) if central_best is not None else None
    print(f"\n{task}: zero-shot {zero:.4f}, centralized best {_cell(central_best, '.4f', 0).strip()}"
          f" (gain {'-' if gain is None else f'{gain:+.4f}'})")
    head = (f"{'row':<16}{'final':>8}{'best':>8}{'gain %':>8}{'loss':>8}{'r→90%':>7}{'up/client':>12}"
            f"{'down/client':>13}{'total MB':>10}{'round s':>9}")
    print(head)
    print("-" * len(head))
    for s in summaries:
        share = 100 * (s["best"] - zero) / gain if gain else None
        print(f"{s['row']:<16}{_cell(s['final'], '.4f', 8)}{_cell(s['best'], '.4f', 8)}{_cell(share, '.0f', 8)}"
              f"{_cell(s['final_loss'], '.4f', 8)}{_cell(s['r90'], 'd', 7)}{_cell(s['up'], ',.0f', 12)}"
              f"{_cell(s['down'], ',.0f', 13)}{_cell(s['total_mb'], ',.1f', 10)}{_cell(s['round_s'], '.1f', 9)}")


def _row_order(label: str) -> int:
    base = label.split("@")[0]
    return ROWS.index(base) if base in ROWS else len(ROWS)


def print_rounds(rows: dict[str, dict]) -> None:
    """Held-out preference accuracy, mean reward margin and likelihood accuracy of each row, round by round."""
    width = max(len(row["curve"]) for row in rows.values())
    for title, key, fmt in (("preference (reward) accuracy", "score", ".2f"), ("mean reward margin", "margin", ".2f"),
                            ("likelihood accuracy", "likelihood", ".2f")):
        print(f"\n{title} by round")
        print(f"{'row':<16}" + "".join(f"{r:>7}" for r in range(width)))
        for label, row in sorted(rows.items(), key=lambda item: (_row_order(item[0]), item[0])):
            print(f"{label:<16}" + "".join(_cell(p.get(key), fmt, 7) for p in row["curve"]))


def plot(task: str, rows: dict[str, dict], path: Path, metric: str) -> None:
    from fedtune.reporting.plots import comparison_figure

    def as_metrics(curve: list[dict]) -> list[dict]:
        return [{"round": p["round"], metric: p["score"], "eval_loss": p["loss"], "bytes_up": p["bytes_up"],
                 "bytes_down": p["bytes_down"]}
                for p in curve]

    fig = comparison_figure({label: as_metrics(row["curve"]) for label, row in rows.items()}, metric=metric)
    fig.suptitle(f"SmolLM2-135M-Instruct, {task}")
    fig.tight_layout()
    fig.savefig(path, format="png")
    print(f"wrote {path}")


# ---------------------------------------------------------------- driver
def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS,
                        help="rows to run (zero-shot is every row's round 0)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds (default 5, quick 2); other counts are kept as rows 'ROW@ROUNDS'")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--sampled", type=int, default=None, help="clients drawn per round (default 3; agnews 10)")
    parser.add_argument("--local-steps", type=int, default=None, help="per client and round (default 5)")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per step (default 8; agnews 4)")
    parser.add_argument("--lr", type=float, default=2e-3, help="learning rate")
    parser.add_argument("--gen-examples", type=int, default=None,
                        help="test prompts generated for and scored (default 40; agnews 100, its whole test set)")
    parser.add_argument("--test-examples", type=int, default=None,
                        help="cut the test set to this many records (default: agnews 100, others the held-out 10 %%);"
                             " rows with another size are kept as 'ROW/testN'")
    parser.add_argument("--final-test-examples", type=int, default=None, metavar="N",
                        help="also score each strategy row's final adapter on the first N test records "
                             "(kept in the row as final_test)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 clients, 2 rounds of 2 steps")
    parser.add_argument("--fresh", action="store_true", help="discard finished rows and start over")
    parser.add_argument("--redo", nargs="+", default=[], metavar="ROW", help="run these rows again")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads of the trainer and the evaluation")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else DEFAULT_ROUNDS)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    missing = [str(SHARED / TASK_DATA[t]) for t in args.tasks if not (SHARED / TASK_DATA[t]).is_file()]
    if missing:
        print(f"skipped: {', '.join(missing)} absent (see ../shared/data/SOURCES.md)")
        return 0
    sys.path.insert(0, str(ROOT))
    from convergence import load_results, save_results

    from fedtune.reporting.quiet import quiet_libraries

    quiet_libraries()
    path = RESULTS / ("llm_quick.json" if args.quick else "llm.json")
    results = load_results(path, args.fresh)
    settings = {task: setting_of(args, task) for task in args.tasks}
    order = [r for r in ["fedit", *ROWS] if r in args.rows]
    explicit_rows = args.rows != ROWS
    threads = [f"train.threads={args.threads}"]  # client_cpus stays 2: one client at a time either way
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            setting = settings[task]
            data = prepare_data(task, Path(tmp)) + threads
            for label in dict.fromkeys(order):
                key = row_key(task, label, setting, args.quick)
                if task in TASK_ROWS and label not in TASK_ROWS[task]:
                    if explicit_rows:
                        print(f"== {key}: not a row of this task (rows: {', '.join(TASK_ROWS[task])})")
                    continue
                done = results["rows"].get(key)
                if done and done["setting"] == asdict(setting) and label not in args.redo:
                    print(f"== {key}: done before, skipped")
                    continue
                print(f"== {key}: {setting.rounds} rounds", flush=True)
                start = time.perf_counter()
                if label == "centralized":
                    row = run_centralized(task, setting, data, Path(tmp))
                elif label == "plain":
                    row = run_plain(task, setting, data, Path(tmp))
                else:
                    row = run_strategy(task, label, setting, args.quick, data, Path(tmp), args.final_test_examples)
                results["rows"][key] = {**row, "task": task, "row": label, "setting": asdict(setting),
                                        "threads": args.threads,
                                        "wall_seconds": round(time.perf_counter() - start, 1),
                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                save_results(path, results)
                print(f"== {key}: {results['rows'][key]['wall_seconds']:.0f} s, saved to {path}", flush=True)
    for task in args.tasks:
        current = asdict(settings[task])  # rows of another schedule are not comparable
        rows = {v["row"]: v for v in results["rows"].values() if v["task"] == task and v["setting"] == current}
        # Curves of the same schedule run for more (or fewer) rounds go beside them, as ROW@ROUNDS.
        other_lengths = {f"{v['row']}@{v['setting']['rounds']}": v for v in results["rows"].values()
                         if v["task"] == task and v["setting"] != current
                         and {**v["setting"], "rounds": current["rounds"]} == current}
        if rows:
            print_table(task, rows)
            if task == "preference":
                print_rounds({**rows, **other_lengths})
            if not args.no_plot:
                plot(task, {**rows, **other_lengths}, path.with_name(f"{path.stem}_{task}.png"), SCORE_KEY[task])
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
