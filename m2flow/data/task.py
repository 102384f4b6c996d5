"""The run's data: train, held-out and SFT problems (files or synthetic) and eval.benchmarks, checked before
anything starts (bad rows and prompts too long for the model are reported with file:line), and the seeded
order in which training prompts are drawn."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random

from m2flow.config import Config
from m2flow.data.datasets import BadRowError, DataError, Problem, load_problems
from m2flow.data.synthetic import TaskSpec, make_splits
from m2flow.data.templates import format_prompt

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Task:
    train: list[Problem]  # RL prompts (answers only are needed)
    held_out: list[Problem]  # never trained on
    sft: list[Problem]  # worked solutions for the base model's warm start (synthetic task only)
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # split -> "file:line: reason" (data.bad_rows=skip)
    benchmarks: list = dataclasses.field(default_factory=list)  # eval.benchmarks, loaded (m2flow.eval.benchmarks)
    response_metrics: object = None  # the task's own measures of responses (the synthetic task's worked share)


def load_task(cfg: Config) -> Task:
    """The train and held-out problems (files or synthetic). A missing or empty file, or a malformed row with
    data.bad_rows=error, raises DataError naming the file (and line)."""
    d = cfg.data
    synthetic = None
    if not (d.train_path and d.eval_path and cfg.model.path):
        sizes = {"eval": d.synthetic_eval_size, "sft": cfg.base.sft_examples, "rl": d.synthetic_train_size}
        spec = TaskSpec(max_operand=d.synthetic_max_operand, max_multiplier=d.synthetic_max_multiplier)
        sft_spec = dataclasses.replace(spec, direct_fraction=cfg.base.sft_direct_fraction)
        synthetic = make_splits(sizes, seed=d.synthetic_seed, spec=spec, split_specs={"sft": sft_spec})
    skipped: dict[str, list[str]] = {"train": [], "eval": []}

    def load(path: str, split: str) -> list[Problem]:
        try:
            return load_problems(path, d.prompt_key, d.answer_key,
                                 skipped=skipped[split] if d.bad_rows == "skip" else None)
        except BadRowError as e:
            raise DataError(f"{e}; fix the row, or set data.bad_rows=skip to skip such rows (they are counted "
                            f"in summary.json)") from None

    from m2flow.data.synthetic import response_metrics
    from m2flow.eval.benchmarks import load_benchmark

    return Task(
        train=load(d.train_path, "train") if d.train_path else synthetic["rl"],
        held_out=load(d.eval_path, "eval") if d.eval_path else synthetic["eval"],
        sft=synthetic["sft"] if synthetic else [],
        skipped=skipped,
        benchmarks=[load_benchmark(n, cfg.eval.data_dir, cfg.eval.benchmark_problems) for n in cfg.eval.benchmarks],
        response_metrics=None if d.eval_path else response_metrics,
    )


def engine_max_len(model_path: str) -> int:
    """The rollout engine's cap on prompt + response tokens: the model's max_position_embeddings (what the
    engine uses when EngineConfig.max_model_len is 0, as the RolloutWorker leaves it)."""
    with open(os.path.join(model_path, "config.json")) as f:
        return int(json.load(f).get("max_position_embeddings", 4096))


def _prompt_tokens(problems: list[Problem], tokenizer, template: str, budget: int) -> list[int]:
    """Prompt tokens of each problem, as the engine counts them, where they may exceed `budget`; a prompt whose
    UTF-8 bytes plus a margin fit the budget is not tokenized (a token covers at least one byte), which keeps
    the check of 50k short prompts to a fraction of a second (0 stands for "fits")."""
    overhead = len(format_prompt("", tokenizer, template).encode()) + 8
    maybe_long = [i for i, p in enumerate(problems) if len(p.question.encode()) + overhead > budget]
    lengths = [0] * len(problems)
    if maybe_long:
        prompts = [format_prompt(problems[i].question, tokenizer, template) for i in maybe_long]
        for i, ids in zip(maybe_long, tokenizer(prompts, add_special_tokens=False)["input_ids"]):
            lengths[i] = len(ids)
    return lengths


def drop_long_prompts(task: Task, model_path: str, cfg: Config) -> Task:
    """Checks that every train (eval) prompt's tokens + rollout.max_new_tokens (eval.max_new_tokens) fit the
    engine's max length, before anything starts; a prompt that does not raises DataError naming its
    `file:line`, or with data.bad_rows=skip is dropped and counted in task.skipped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    limit = engine_max_len(model_path)
    splits = {"train": (task.train, "rollout.max_new_tokens", cfg.rollout.max_new_tokens),
              "eval": (task.held_out, "eval.max_new_tokens", cfg.eval.max_new_tokens)}
    kept = {}
    for split, (problems, key, new_tokens) in splits.items():
        lengths = _prompt_tokens(problems, tokenizer, cfg.data.template, limit - new_tokens)
        bad = [f"{p.where or f'{split} problem {i + 1}'}: {n} prompt tokens + {key}={new_tokens} > {limit} "
               f"(max_position_embeddings in {os.path.join(model_path, 'config.json')})"
               for i, (p, n) in enumerate(zip(problems, lengths)) if n + new_tokens > limit]
        if bad and cfg.data.bad_rows == "error":
            raise DataError(f"{len(bad)} {split} prompt(s) too long for the model, e.g. {bad[0]}; shorten them, "
                            f"lower {key}, or set data.bad_rows=skip to skip them (counted in summary.json)")
        kept[split] = [p for p, n in zip(problems, lengths) if n + new_tokens <= limit]
        task.skipped.setdefault(split, []).extend(bad)
        if not kept[split]:
            raise DataError(f"no {split} problem fits the model's max length {limit}, e.g. {bad[0] if bad else '-'}")
    for split, rows in task.skipped.items():
        if rows:
            log.warning("skipped %d malformed or too long %s rows (data.bad_rows=skip), e.g. %s",
                        len(rows), split, "; ".join(rows[:3]))
    return dataclasses.replace(task, train=kept["train"], held_out=kept["eval"])


class PromptSampler:
    """Epochs over the training problems in a seeded random order."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError(f"PromptSampler needs at least one problem, got n={n}")
        self.n, self.rng, self.order = n, random.Random(seed), []

    def next(self, k: int) -> list[int]:
        while len(self.order) < k:
            self.order += self.rng.sample(range(self.n), self.n)
        out, self.order = self.order[:k], self.order[k:]
        return out

    def state(self) -> dict:
        """Where the sampler is (JSON-serialisable): its RNG and the rest of the current epoch's order."""
        version, internal, gauss = self.rng.getstate()
        return {"n": self.n, "order": list(self.order), "rng": [version, list(internal), gauss]}

    def load_state(self, state: dict) -> None:
        if state["n"] != self.n:
            raise ValueError(f"the sampler was saved over {state['n']} training problems, but the data now has "
                             f"{self.n}: the run cannot resume on different training data")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.order = list(state["order"])
