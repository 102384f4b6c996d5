"""`m2flow eval`: HF model directories x benchmarks, k samples per problem, through m2flow's engine.

    report = run_eval([ModelSpec("base", "path/to/hf_model")], [load_benchmark("synthetic_math")],
                      Protocol(k=8), out_dir="runs/eval")

Each model is loaded once (`Engine.from_pretrained`, in this process, no Ray) and generates for one benchmark
at a time, `protocol.batch_size` sequences per `generate` call (batch_size // k problems). Every sample is
scored by its benchmark's reward (`math` or `multiple_choice` in the reward registry) and appended to
`<out_dir>/results.jsonl` as soon as its batch is done, so an interrupted run loses at most one batch:
on a rerun with the same out_dir, problems that already have their k samples there are skipped (and the
protocol must be the one the directory was started with, protocol.json). The table is computed from
results.jsonl (m2flow.eval.table) and written beside it.

Sampling is deterministic given the seed: problems are cut into batches on a fixed grid over the benchmark's
problem list, and each batch's sampling seed is derived from the seed, the benchmark and the batch's place, so
a resumed run draws what the uninterrupted one would have (with the same batch_size).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from m2flow.data.datasets import DataError
from m2flow.data.templates import format_prompt
from m2flow.eval.benchmarks import MATH, Benchmark
from m2flow.eval.table import ResultTable, summarize, write_table
from m2flow.rewards import extract_answer, extract_choice, get_reward
from m2flow.rollout.types import SamplingParams

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
PROTOCOL = "protocol.json"


class EvalError(ValueError):
    """Bad arguments, or an out_dir holding results of another protocol."""


@dataclass
class Protocol:
    """How the samples are drawn (the defaults: the common published protocol for reasoning models)."""

    k: int = 8  # samples per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768  # response cap; prompt + response are also capped by max_position_embeddings
    seed: int = 0  # sampling seed (batches derive theirs from it)
    template: str = "chat"  # prompt template: chat (the tokenizer's chat template) | plain
    batch_size: int = 512  # sequences per generate call (not part of what protocol.json pins)

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise EvalError(f"k, max_new_tokens and batch_size must be >= 1, got {self}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise EvalError(f"temperature must be >= 0 and top_p in (0, 1], got {self}")
        if self.temperature == 0 and self.k > 1:
            raise EvalError("greedy decoding (temperature 0) gives k identical samples: use k=1")

    @classmethod
    def greedy(cls, **kwargs) -> "Protocol":
        return cls(**{**kwargs, "k": 1, "temperature": 0.0, "top_p": 1.0})

    def pinned(self) -> dict:
        """What results in one out_dir must share."""
        return {k: v for k, v in asdict(self).items() if k != "batch_size"}

    def sampling(self, seed: int) -> SamplingParams:
        return SamplingParams(n=self.k, temperature=self.temperature, top_p=self.top_p,
                              max_new_tokens=self.max_new_tokens, seed=seed)


@dataclass
class ModelSpec:
    name: str  # the table's row label; results.jsonl rows are keyed by it
    path: str  # an HF model directory (config.json, *.safetensors, tokenizer)

    @classmethod
    def parse(cls, text: str) -> "ModelSpec":
        """``NAME=PATH`` or ``PATH`` (then the name is the path as given, without a trailing slash)."""
        name, sep, path = text.partition("=")
        if not sep:
            name, path = text.rstrip("/") or text, text
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise EvalError(f"model {text!r}: {path} is not an HF model directory (no config.json)")
        return cls(name, path)


@dataclass
class EvalReport:
    table: ResultTable
    out_dir: str
    paths: list[str]  # the files written besides results.jsonl
    new_samples: int  # samples generated and scored by this run (0: everything was in results.jsonl)
    skipped_problems: int = 0  # (model, benchmark) problems found already scored
    counts: dict = field(default_factory=dict)  # "model/benchmark" -> samples generated now


class Results:
    """results.jsonl: every sample, appended batch by batch; a truncated last line (a killed run) is cut off."""

    def __init__(self, path: str):
        self.path = path
        self.rows: dict[tuple[str, str, str], dict[int, dict]] = defaultdict(dict)  # (model, bench, id) -> sample
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            if len(complete) != len(data):
                log.warning("%s: dropping a truncated last line (an interrupted write)", path)
                with open(path, "r+b") as f:
                    f.truncate(len(complete))
            for line in complete.splitlines():
                if line.strip():
                    self._add(json.loads(line))

    def _add(self, row: dict) -> None:
        self.rows[(row["model"], row["benchmark"], str(row["problem_id"]))][int(row["sample"])] = row

    def samples(self, model: str, benchmark: str, problem_id: str) -> list[dict]:
        return list(self.rows.get((model, benchmark, problem_id), {}).values())

    def done(self, model: str, benchmark: str, problem_id: str, k: int) -> bool:
        return set(self.rows.get((model, benchmark, problem_id), {})) >= set(range(k))

    def append(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
        for r in rows:
            self._add(r)


def score(kind: str, response: str, truth: str) -> tuple[str | None, float]:
    """The extracted answer (math: the final answer; multiple choice: the letter) and the reward's score."""
    answer = extract_answer(response) if kind == MATH else extract_choice(response)
    return answer, float(get_reward(kind)(response, truth))


def _equivalent(kind: str):
    return None if kind == MATH else (lambda a, b: a == b)  # None: math-verify equivalence (maj_at_k's default)


def check_protocol(out_dir: str, protocol: Protocol) -> None:
    """Writes protocol.json in a new out_dir; in an old one, the protocol must be the same."""
    path = os.path.join(out_dir, PROTOCOL)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != protocol.pinned():
            diff = ", ".join(f"{k}: {old.get(k)} there, {v} now" for k, v in protocol.pinned().items() if old.get(k) != v)
            raise EvalError(f"{out_dir} holds results drawn with another protocol ({diff}); give another --out-dir "
                            f"(or the same options) so that one table never mixes protocols")
    else:
        from m2flow.io import atomic_write_text

        atomic_write_text(path, json.dumps(protocol.pinned(), indent=2) + "\n")


def make_engine(path: str, protocol: Protocol, device: str | None = None, dtype: str | None = None):
    import torch

    from m2flow.rollout import Engine, EngineConfig

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return Engine.from_pretrained(path, EngineConfig(max_num_seqs=protocol.batch_size), dtype=dtype, device=device)


def evaluate_benchmark(engine, model: str, benchmark: Benchmark, protocol: Protocol, results: Results,
                       progress: bool = True) -> int:
    """Generates and scores the problems of `benchmark` that `results` lacks for `model`; returns the number
    of samples generated."""
    from tqdm import tqdm

    name, kind, k = benchmark.spec.name, benchmark.spec.kind, protocol.k
    problems = benchmark.problems
    per_call = max(1, protocol.batch_size // k)
    todo = [i for i, p in enumerate(problems) if not results.done(model, name, p.meta["id"], k)]
    scored = [r for p in problems for r in results.samples(model, name, p.meta["id"])]  # running accuracy
    correct, total = sum(r["correct"] for r in scored), len(scored)
    bar = tqdm(total=len(todo), desc=f"{model} | {name}", unit="problem", disable=not progress or not todo,
               dynamic_ncols=True)
    generated = 0
    for start in range(0, len(problems), per_call):  # a fixed grid: a batch's seed depends on its place only
        batch = [i for i in todo if start <= i < start + per_call]
        if not batch:
            continue
        prompts = [format_prompt(problems[i].question, engine.tokenizer, protocol.template) for i in batch]
        _check_lengths(engine, prompts, [problems[i] for i in batch], name)
        seed = zlib.crc32(f"{protocol.seed}/{name}/{start}".encode())
        samples = engine.generate(prompts, protocol.sampling(seed))
        rows, index = [], defaultdict(int)
        for s in samples:
            problem = problems[batch[s.prompt_index]]
            answer, value = score(kind, s.text, problem.answer)
            rows.append({"model": model, "benchmark": name, "problem_id": problem.meta["id"],
                         "sample": index[s.prompt_index], "response": s.text, "answer": answer,
                         "ground_truth": problem.answer, "score": value, "correct": value >= 1.0,
                         "finish_reason": s.finish_reason, "response_tokens": len(s.token_ids)})
            index[s.prompt_index] += 1
        results.append(rows)
        generated += len(rows)
        correct += sum(r["correct"] for r in rows)
        total += len(rows)
        bar.set_postfix_str(f"acc {100 * correct / total:.1f}%", refresh=False)
        bar.update(len(batch))
    bar.close()
    return generated


def _check_lengths(engine, prompts: list[str], problems: list, benchmark: str) -> None:
    for prompt, problem in zip(prompts, problems):
        n = len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n >= engine.max_model_len:
            raise DataError(f"{benchmark} problem {problem.meta['id']} ({problem.where or 'built in'}): its prompt has "
                            f"{n} tokens, the model's max length is {engine.max_model_len}")


def build_table(results: Results, models: list[ModelSpec], benchmarks: list[Benchmark],
                protocol: Protocol) -> ResultTable:
    cells = {}
    for m in models:
        for b in benchmarks:
            by_problem = {p.meta["id"]: results.samples(m.name, b.spec.name, p.meta["id"]) for p in b.problems}
            by_problem = {i: [r for r in rows if r["sample"] < protocol.k] for i, rows in by_problem.items()}
            cells[(m.name, b.spec.name)] = summarize(by_problem, protocol.k, _equivalent(b.spec.kind))
    return ResultTable(protocol.k, [m.name for m in models], [(b.spec.name, b.spec.title) for b in benchmarks],
                       cells, protocol.pinned(), {m.name: m.path for m in models})


def run_eval(models: list[ModelSpec], benchmarks: list[Benchmark], protocol: Protocol, out_dir: str,
             progress: bool = True, device: str | None = None, dtype: str | None = None) -> EvalReport:
    """Evaluates every model on every benchmark (resuming from out_dir/results.jsonl) and writes the table."""
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise EvalError(f"two models share a name: {names}; name them with NAME=PATH")
    os.makedirs(out_dir, exist_ok=True)
    check_protocol(out_dir, protocol)
    results = Results(os.path.join(out_dir, RESULTS))
    counts, skipped = {}, 0
    for m in models:
        pending = [b for b in benchmarks
                   if not all(results.done(m.name, b.spec.name, p.meta["id"], protocol.k) for p in b.problems)]
        skipped += sum(results.done(m.name, b.spec.name, p.meta["id"], protocol.k)
                       for b in benchmarks for p in b.problems)
        if not pending:
            log.info("%s: every problem already scored in %s", m.name, results.path)
            continue
        engine = make_engine(m.path, protocol, device, dtype)
        try:
            for b in pending:
                counts[f"{m.name}/{b.spec.name}"] = evaluate_benchmark(engine, m.name, b, protocol, results, progress)
        finally:
            del engine
            gc.collect()
            _empty_cuda_cache()
    table = build_table(results, models, benchmarks, protocol)
    paths = write_table(table, out_dir)
    return EvalReport(table, out_dir, paths, sum(counts.values()), skipped, counts)


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_table(table: ResultTable) -> None:
    """The avg@k table as markdown (rendered by rich when installed), then pass@k and maj@k."""
    text = "\n\n".join(f"**{table.caption(m)}**\n\n{table.markdown(m)}" for m in ("avg", "pass", "maj"))
    try:
        from rich.console import Console
        from rich.markdown import Markdown
    except ImportError:
        print(text.replace("**", ""))
        return
    Console().print(Markdown(text))
