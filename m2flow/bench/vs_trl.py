"""`m2flow bench vs-trl`: m2flow's trainer against TRL's GRPOTrainer, back to back on one machine.

Both sides start from the same HF model directory and train on the same jsonl of training problems (written to
the output directory), with the same group size, prompts per step, response cap, learning rate, steps,
temperature, KL weight (0 by default: no reference model), prompt text (m2flow's `format_prompt`) and reward
(m2flow's `math_reward`, wrapped for TRL), making one optimizer update per generation batch. Both are judged by
the same evaluator: m2flow's engine (`RolloutWorker`, as the runner builds it) and `m2flow.eval.evaluate`,
greedy, on the same held-out jsonl; TRL's weights are saved every `eval_every` steps by a callback (outside
its step clock) and evaluated after its training.

Each side runs in its own child process (`python -m m2flow.bench.vs_trl <side> settings.json result.json`), so
its peak memory is its own: `resource.getrusage` (self and children, the largest single process) and the
summed RSS of its whole process tree (driver, Ray, workers, reward workers) sampled every second; m2flow's
includes its evaluations (its engine is resident throughout), TRL's ends with its training (the engine that
evaluates its weights afterwards is m2flow's).

Reported per side: seconds per step (mean over steps after the first), generated tokens per second over the
same steps, held-out accuracy at step 0, every `eval_every` steps and at the end, against steps and against the
RL wall-clock (the sum of step times: start-up and evaluation excluded), peak memory, and the ratios m2flow/TRL.
Settings that cannot be aligned are listed in the result (`differences`).

TRL is optional (`pip install -e ".[bench]"`); only the TRL side imports it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from m2flow.io import atomic_write_text

log = logging.getLogger(__name__)

TRL_MISSING = 'm2flow bench vs-trl needs TRL, which is not installed: pip install -e ".[bench]"'
SIDES = ("m2flow", "trl")
LABELS = {"m2flow": "m2flow", "trl": "TRL GRPOTrainer"}


def trl_available() -> bool:
    return importlib.util.find_spec("trl") is not None


@dataclass
class Settings:
    """What both sides share (and what only one of them reads, named so)."""

    model_path: str  # HF model directory both start from
    train_path: str  # jsonl of training problems (question, answer)
    eval_path: str  # jsonl of held-out problems
    steps: int = 30  # RL steps = optimizer updates
    prompts_per_step: int = 64  # prompts per step, each sampled n times
    n: int = 8  # samples per prompt (m2flow rollout.n, TRL num_generations)
    max_new_tokens: int = 48  # response cap (m2flow rollout.max_new_tokens, TRL max_completion_length)
    eval_max_new_tokens: int = 48  # response cap of the held-out evaluation
    lr: float = 1e-4  # AdamW learning rate, constant
    temperature: float = 1.0  # sampling temperature
    kl_coef: float = 0.0  # KL weight (m2flow algorithm.kl_coef, TRL beta); 0 = no reference model
    eval_every: int = 10  # held-out evaluation every k steps (and at step 0 and the end)
    eval_problems: int = 500  # held-out problems (all of eval_path's)
    seed: int = 0  # both sides' seed (prompt order, sampling, init of anything random)
    threads: int = 1  # torch threads of each side (m2flow: cluster.num_cpus)
    template: str = "chat"  # prompt template (m2flow.data.templates)
    micro_batch_size: int = 128  # TRL: per_device_train_batch_size is the largest divisor of P * n up to this
    m2flow_overrides: list[str] = field(default_factory=list)  # extra m2flow config overrides (m2flow side only)
    progress: bool = True


# ---------------------------------------------------------------------------------------------------------
# The shared pieces: data files, the reward for TRL, TRL's batch layout, m2flow's overrides


def write_problems(problems, path: str) -> str:
    """The problems as jsonl (question, answer and their meta fields), as m2flow's data.*_path reads them."""
    from m2flow.data.datasets import save_problems

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_problems([dataclasses.replace(p, solution=None) for p in problems], path)
    return path


class TRLMathReward:
    """m2flow's `math_reward` as a TRL reward function: TRL calls it with the completions and every dataset
    column as keyword arguments (here `answer`), plus `completion_ids`, `prompts`, `trainer_state` and others,
    which it ignores. It also counts the generated tokens of each call (one call per generation batch), so the
    tokens/s of TRL's side is counted from the token ids TRL generated."""

    __name__ = "math_reward"  # TRL names the reward's metrics after the function

    def __init__(self, format_penalty: float = 0.0, timeout_s: float = 2.0):
        self.format_penalty, self.timeout_s = format_penalty, timeout_s
        self.calls: list[dict] = []  # per call: completions, generated tokens, mean reward

    def __call__(self, completions: list, answer: list[str], completion_ids: list[list[int]] | None = None,
                 **_kwargs) -> list[float]:
        from m2flow.rewards import math_reward

        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # plain or conversational
        scores = [math_reward(t, str(a), format_penalty=self.format_penalty, timeout_s=self.timeout_s)
                  for t, a in zip(texts, answer)]
        tokens = sum(len(ids) for ids in completion_ids) if completion_ids is not None else 0
        self.calls.append({"completions": len(texts), "tokens": tokens,
                           "reward_mean": sum(scores) / max(len(scores), 1)})
        return scores


def trl_batch_layout(prompts_per_step: int, n: int, micro_batch_size: int) -> dict:
    """GRPOConfig's batch fields for one generation of prompts_per_step x n completions and one optimizer
    update per step.

    In TRL every batch size counts completions, not prompts. The dataloader yields a generation batch of
    generation_batch_size = per_device_train_batch_size x processes (1 here) x steps_per_generation completions
    (generation_batch_size / num_generations prompts, each repeated num_generations times); TRL generates all of
    it at once, then feeds it in steps_per_generation slices of per_device_train_batch_size. The optimizer steps
    once every gradient_accumulation_steps slices. With steps_per_generation == gradient_accumulation_steps and
    num_iterations == 1, one optimizer step consumes exactly one generation batch (P x n completions, the loss
    normalised over all of its tokens: loss_type "dapo"), and since the batch is used once and on-policy TRL
    takes its old logprobs from the same forward pass (no extra pass), as m2flow uses the engine's. The slice
    size is the micro-batch of the backward passes (memory only; m2flow packs by tokens instead)."""
    total = prompts_per_step * n
    per_device = max(d for d in range(1, min(micro_batch_size, total) + 1) if total % d == 0)
    accumulation = total // per_device
    return {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": accumulation,
            "steps_per_generation": accumulation, "num_iterations": 1}


def m2flow_overrides(s: Settings, run_root: str) -> list[str]:
    """The m2flow side's config: the user's overrides (the shared settings were resolved from them), then the
    shared settings, so both sides run the same numbers."""
    return [*s.m2flow_overrides, f"model.path={s.model_path}", f"data.train_path={s.train_path}",
            f"data.eval_path={s.eval_path}",
            f"data.template={s.template}", f"train.steps={s.steps}", f"train.prompts_per_step={s.prompts_per_step}",
            f"rollout.n={s.n}", f"rollout.max_new_tokens={s.max_new_tokens}",
            f"eval.max_new_tokens={s.eval_max_new_tokens}", f"train.lr={s.lr}", "train.warmup_steps=0",
            f"rollout.temperature={s.temperature}", f"algorithm.kl_coef={s.kl_coef}", f"eval.every={s.eval_every}",
            f"eval.num_problems={s.eval_problems}", f"seed={s.seed}", f"cluster.num_cpus={s.threads}",
            "checkpoint.every=0", f"output_dir={run_root}"]


def trl_config_kwargs(s: Settings, output_dir: str) -> dict:
    """GRPOConfig's arguments: the shared settings, and TRL defaults changed where m2flow's differ."""
    return {
        "output_dir": output_dir, "use_cpu": True, "bf16": False, "fp16": False, "report_to": "none",
        "seed": s.seed, "data_seed": s.seed, "max_steps": s.steps,
        "num_generations": s.n, "max_completion_length": s.max_new_tokens,
        "temperature": s.temperature, "top_p": 1.0, "top_k": 0,
        "beta": s.kl_coef,
        "learning_rate": s.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,  # TRL: linear decay to 0
        "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.99, "max_grad_norm": 1.0,  # m2flow's AdamW
        "gradient_checkpointing": False,  # TRL's default is True (recompute); m2flow recomputes nothing
        "loss_type": "dapo", "scale_rewards": "group", "mask_truncated_completions": False,
        "logging_steps": 1, "save_strategy": "no", "disable_tqdm": not s.progress,
        **trl_batch_layout(s.prompts_per_step, s.n, s.micro_batch_size),
    }


def trl_grpo_config(s: Settings, output_dir: str):
    """TRL's GRPOConfig for `s` (checked: one generation batch of P x n completions per optimizer update)."""
    from trl import GRPOConfig

    kwargs = trl_config_kwargs(s, output_dir)
    if "activation_checkpointing" in GRPOConfig.__dataclass_fields__:  # transformers 5.x renamed it
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    config = GRPOConfig(**kwargs)
    if (config.generation_batch_size != s.prompts_per_step * s.n or config.gradient_checkpointing
            or config.steps_per_generation != config.gradient_accumulation_steps or config.num_iterations != 1):
        raise RuntimeError(f"TRL's GRPOConfig did not take the batch layout: generation_batch_size "
                           f"{config.generation_batch_size} (want {s.prompts_per_step * s.n}), steps_per_generation "
                           f"{config.steps_per_generation}, gradient_accumulation_steps "
                           f"{config.gradient_accumulation_steps}, gradient checkpointing "
                           f"{config.gradient_checkpointing}")
    return config


def differences(s: Settings, m2flow_cfg=None) -> list[str]:
    """What is not the same on both sides (the result lists it)."""
    out = [
        "generation: m2flow's engine (paged KV cache, continuous batching, the n samples of a prompt share its "
        "prefill) vs transformers generate (one padded batch of P x n sequences); different samplers, so the "
        "samples differ even with the same seed",
        "prompt order: each side shuffles the same training problems with its own seeded sampler",
        "advantage: both (reward - group mean) / group std; m2flow divides by the population std + 1e-6, TRL by "
        "the sample std (Bessel) + 1e-4",
        f"micro-batches: m2flow packs whole sequences by tokens (train.max_tokens_per_microbatch); TRL pads "
        f"slices of {trl_batch_layout(s.prompts_per_step, s.n, s.micro_batch_size)['per_device_train_batch_size']}"
        f" completions",
        "reward scoring: m2flow scores in reward.workers processes with a hard time limit; TRL calls the same "
        "math_reward in its process (SIGALRM limit)",
    ]
    if m2flow_cfg is not None:
        if m2flow_cfg.algorithm.filter_groups:
            out.append("m2flow drops groups whose samples all got the same reward before the update "
                       "(algorithm.filter_groups=true, its default; their advantage is 0 on both sides, but TRL "
                       "computes them and counts their tokens in the loss's normaliser); "
                       "algorithm.filter_groups=false aligns it")
        if m2flow_cfg.train.max_tokens_per_microbatch == 0:
            out[3] = "micro-batches: both pad (m2flow train.micro_batch_size rows)"
    return out


# ---------------------------------------------------------------------------------------------------------
# Measurements: memory, step clock, summaries, ratios, table, plot


class MemorySampler(threading.Thread):
    """Peak summed RSS of this process and its descendants (m2flow.bench.soak.sample_tree), sampled every
    `interval_s`, with the per-process-name split at the peak."""

    def __init__(self, interval_s: float = 1.0):
        super().__init__(daemon=True)
        self.interval_s, self.peak_mb, self.peak_by_name = interval_s, 0.0, {}
        self._done = threading.Event()

    def sample(self) -> None:
        from m2flow.bench.soak import sample_tree

        tree = sample_tree(os.getpid())
        if tree["rss_mb"] > self.peak_mb:
            self.peak_mb, self.peak_by_name = tree["rss_mb"], tree["rss_mb_by_name"]

    def run(self) -> None:
        while not self._done.wait(self.interval_s):
            self.sample()

    def stop(self) -> dict:
        self._done.set()
        self.join()
        self.sample()
        usage = {who: resource.getrusage(r).ru_maxrss / 1024  # KiB on Linux
                 for who, r in (("self", resource.RUSAGE_SELF), ("children", resource.RUSAGE_CHILDREN))}
        return {"tree_peak_rss_mb": self.peak_mb,
                "tree_peak_rss_mb_by_name": {k: round(v, 1) for k, v in sorted(self.peak_by_name.items())},
                "maxrss_self_mb": usage["self"], "maxrss_children_mb": usage["children"]}


def side_summary(step_seconds: list[float], step_tokens: list[float], curve: list[tuple[int, float]],
                 memory: dict | None = None, **extra) -> dict:
    """One side's numbers from its per-step seconds and generated tokens (steps 1..S) and its held-out curve
    [(step, accuracy)], step 0 first. Seconds per step and tokens/s are over the steps after the first (the
    first includes warm-up) unless there is only one. The curve gains each point's RL wall-clock: the sum of
    the step times up to it."""
    warm = slice(1, None) if len(step_seconds) > 1 else slice(None)
    clock = [0.0]
    for sec in step_seconds:
        clock.append(clock[-1] + sec)
    points = [{"step": st, "seconds": clock[min(st, len(step_seconds))], "accuracy": acc} for st, acc in curve]
    return {
        "seconds_per_step": statistics.fmean(step_seconds[warm]),
        "tokens_per_s": sum(step_tokens[warm]) / max(sum(step_seconds[warm]), 1e-9),
        "first_step_seconds": step_seconds[0],
        "rl_seconds": clock[-1],
        "accuracy_start": curve[0][1],
        "accuracy_end": curve[-1][1],
        "curve": points,
        "step_seconds": step_seconds,
        "step_tokens": step_tokens,
        "memory": memory or {},
        **extra,
    }


def time_to_accuracy(curve: list[dict], target: float) -> float | None:
    """RL seconds at the first evaluated point whose accuracy reaches `target` (None if none does)."""
    for p in curve:
        if p["accuracy"] >= target - 1e-12:
            return p["seconds"]
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def compare(m: dict, t: dict) -> dict:
    """m2flow / TRL for each number (lower is better for seconds and memory), the step-rate speed-up (TRL's
    seconds per step over m2flow's), the accuracy gap in points and the time each takes to reach TRL's final
    accuracy."""
    mem = lambda side, k: side.get("memory", {}).get(k)  # noqa: E731
    to_trl_final = time_to_accuracy(m["curve"], t["accuracy_end"])
    return {
        "seconds_per_step": _ratio(m["seconds_per_step"], t["seconds_per_step"]),
        "speedup": _ratio(t["seconds_per_step"], m["seconds_per_step"]),
        "tokens_per_s": _ratio(m["tokens_per_s"], t["tokens_per_s"]),
        "rl_seconds": _ratio(m["rl_seconds"], t["rl_seconds"]),
        "accuracy_end_points": 100 * (m["accuracy_end"] - t["accuracy_end"]),
        "m2flow_seconds_to_trl_final_accuracy": to_trl_final,
        "time_to_trl_final_accuracy": _ratio(to_trl_final, t["rl_seconds"]),
        "tree_peak_rss": _ratio(mem(m, "tree_peak_rss_mb"), mem(t, "tree_peak_rss_mb")),
        "maxrss_self": _ratio(mem(m, "maxrss_self_mb"), mem(t, "maxrss_self_mb")),
    }


def format_table(result: dict) -> str:
    """The side-by-side markdown table, the accuracy curves and the list of differences."""
    m, t, r = result["m2flow"], result["trl"], result["ratios"]
    steps = result["settings"]["steps"]
    x = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    sec = lambda v: "-" if v is None else f"{v:.1f} s"  # noqa: E731
    mb = lambda side, k: (lambda v: "-" if v is None else f"{v:.0f} MB")(side.get("memory", {}).get(k))  # noqa: E731
    warm = "2.." + str(steps) if steps > 1 else "1"
    lines = [
        f"| | {LABELS['m2flow']} | {LABELS['trl']} | m2flow / TRL |",
        "|---|---|---|---|",
        f"| seconds per step (mean of steps {warm}) | {m['seconds_per_step']:.2f} | {t['seconds_per_step']:.2f} | "
        f"{x(r['seconds_per_step'])} ({x(r['speedup'])}x the step rate) |",
        f"| generated tokens/s | {m['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {x(r['tokens_per_s'])} |",
        f"| first step (warm-up) | {sec(m['first_step_seconds'])} | {sec(t['first_step_seconds'])} | |",
        f"| RL wall-clock, {steps} steps | {sec(m['rl_seconds'])} | {sec(t['rl_seconds'])} | {x(r['rl_seconds'])} |",
        f"| held-out greedy accuracy, step 0 | {pct(m['accuracy_start'])} | {pct(t['accuracy_start'])} | |",
        f"| held-out greedy accuracy, step {steps} | {pct(m['accuracy_end'])} | {pct(t['accuracy_end'])} | "
        f"{r['accuracy_end_points']:+.1f} points |",
        f"| RL seconds to TRL's final accuracy | {sec(r['m2flow_seconds_to_trl_final_accuracy'])} | "
        f"{sec(t['rl_seconds'])} | {x(r['time_to_trl_final_accuracy'])} |",
        f"| peak RSS, process tree (sampled) | {mb(m, 'tree_peak_rss_mb')} | {mb(t, 'tree_peak_rss_mb')} | "
        f"{x(r['tree_peak_rss'])} |",
        f"| peak RSS, driver process (ru_maxrss) | {mb(m, 'maxrss_self_mb')} | {mb(t, 'maxrss_self_mb')} | "
        f"{x(r['maxrss_self'])} |",
        f"| peak RSS, largest child process | {mb(m, 'maxrss_children_mb')} | {mb(t, 'maxrss_children_mb')} | |",
        f"| process wall-clock (start-up and evaluations included) | {sec(m.get('process_seconds'))} | "
        f"{sec(t.get('process_seconds'))} | |",
    ]
    lines += ["", "| step | m2flow accuracy | m2flow RL s | TRL accuracy | TRL RL s |", "|---|---|---|---|---|"]
    tc = {p["step"]: p for p in t["curve"]}
    mc = {p["step"]: p for p in m["curve"]}
    for st in sorted(set(tc) | set(mc)):
        a, b = mc.get(st), tc.get(st)
        lines.append(f"| {st} | {pct(a and a['accuracy'])} | {sec(a and a['seconds'])} | {pct(b and b['accuracy'])} "
                     f"| {sec(b and b['seconds'])} |")
    lines += ["", "not aligned:"] + [f"- {d}" for d in result.get("differences", [])]
    return "\n".join(lines)


def plot(result: dict, path: str) -> str:
    """Held-out accuracy against RL wall-clock (left) and against steps (right), both sides."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for side, color in (("m2flow", "tab:blue"), ("trl", "tab:orange")):
        curve = result[side]["curve"]
        label = f"{LABELS[side]}: {result[side]['seconds_per_step']:.2f} s/step"
        axes[0].plot([p["seconds"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", ms=4,
                     color=color, label=label)
        axes[1].plot([p["step"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", ms=4,
                     color=color, label=LABELS[side])
    axes[0].set_xlabel("RL wall-clock (s, step times summed)")
    axes[1].set_xlabel("RL step")
    for ax in axes:
        ax.set_ylabel("held-out greedy accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"m2flow vs TRL GRPOTrainer: {s['prompts_per_step']} prompts x {s['n']} samples, "
                 f"{s['max_new_tokens']} tokens, lr {s['lr']:g}; {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------------
# The two sides (each runs in its own process: `python -m m2flow.bench.vs_trl <side> settings.json out.json`)


def _held_out(s: Settings):
    from m2flow.data.datasets import load_problems

    return load_problems(s.eval_path)[: s.eval_problems]


def run_m2flow_side(s: Settings, out_dir: str) -> dict:
    """`m2flow.runner.run` on the shared settings; numbers from its metrics.jsonl and summary."""
    from m2flow.config import load_config
    from m2flow.metrics import read_metrics
    from m2flow.runner import run

    start = time.perf_counter()
    memory = MemorySampler()
    memory.start()
    cfg = load_config(None, m2flow_overrides(s, os.path.join(out_dir, "m2flow")))
    summary = run(cfg, progress=s.progress)
    mem = memory.stop()
    rows: dict[int, dict] = {}
    for row in read_metrics(os.path.join(summary["run_dir"], "metrics.jsonl")):
        rows.setdefault(row["step"], {}).update(row)
    steps = [rows[k] for k in range(1, s.steps + 1)]
    step_seconds = [r["time/step"] for r in steps]
    # samples per step (P x n, more with dynamic sampling) x mean response length = generated tokens
    step_tokens = [r["response/length_mean"] * r["throughput/samples_per_s"] * r["time/step"] for r in steps]
    curve = [(k, rows[k]["eval/accuracy"]) for k in sorted(rows) if "eval/accuracy" in rows[k]]
    return side_summary(step_seconds, step_tokens, curve, mem, run_dir=summary["run_dir"],
                        reward_mean=[r["reward/mean"] for r in steps],
                        process_seconds=time.perf_counter() - start)


def run_trl_side(s: Settings, out_dir: str) -> dict:
    """TRL's GRPOTrainer on the shared settings; its weights saved every eval_every steps (outside the step
    clock) and evaluated afterwards by m2flow's engine and evaluator, like m2flow's."""
    start = time.perf_counter()
    memory = MemorySampler()
    memory.start()
    import warnings

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from m2flow.data.datasets import load_problems
    from m2flow.data.templates import format_prompt

    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)
    root = os.path.join(out_dir, "trl")
    tokenizer = AutoTokenizer.from_pretrained(s.model_path)
    model = AutoModelForCausalLM.from_pretrained(s.model_path, dtype=torch.float32)
    train = load_problems(s.train_path)
    dataset = Dataset.from_list([{"prompt": format_prompt(p.question, tokenizer, s.template), "answer": p.answer}
                                 for p in train])
    reward = TRLMathReward()
    probe = dataset[0]["prompt"]  # TRL tokenizes text prompts with the tokenizer's special tokens, m2flow without
    special_tokens_added = tokenizer(probe)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]
    saves = {k for k in range(1, s.steps + 1) if s.eval_every and k % s.eval_every == 0} | {s.steps}

    class StepClock(TrainerCallback):
        """Step times (from the end of the previous step's callback to this step's end, so saving is outside
        the clock) and the weights at the evaluation steps."""

        def __init__(self):
            self.seconds: list[float] = []
            self.resume = 0.0
            self.logs: dict[int, dict] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.resume = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.seconds.append(time.perf_counter() - self.resume)
            if state.global_step in saves:
                model.save_pretrained(os.path.join(root, f"step-{state.global_step}"))
                tokenizer.save_pretrained(os.path.join(root, f"step-{state.global_step}"))
            self.resume = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.setdefault(state.global_step, {}).update(logs or {})

    clock = StepClock()
    config = trl_grpo_config(s, root)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    if len(clock.seconds) != s.steps or len(reward.calls) != s.steps:
        raise RuntimeError(f"TRL made {len(clock.seconds)} optimizer steps and {len(reward.calls)} generation "
                           f"batches, expected {s.steps} of each (one generation per update)")
    train_seconds = time.perf_counter() - start
    mem = memory.stop()  # before the evaluation, whose engine (m2flow's) is not part of TRL's footprint
    del trainer, model
    curve = _evaluate_trl(s, root, sorted(saves))
    return side_summary(clock.seconds, [c["tokens"] for c in reward.calls], curve, mem,
                        reward_mean=[c["reward_mean"] for c in reward.calls],
                        trl_logs={str(k): v for k, v in sorted(clock.logs.items())},
                        process_seconds=time.perf_counter() - start, process_seconds_to_end_of_training=train_seconds,
                        special_tokens_added=special_tokens_added)


def _evaluate_trl(s: Settings, root: str, steps: list[int]) -> list[tuple[int, float]]:
    """Held-out greedy accuracy of the base model (step 0) and of TRL's saved weights, by m2flow's engine as
    the runner builds it (RolloutWorker over the same config) and m2flow.eval.evaluate."""
    from m2flow.config import load_config
    from m2flow.data.templates import format_prompt
    from m2flow.eval import evaluate
    from m2flow.rollout import SamplingParams
    from m2flow.scheduler.workers import RolloutWorker, Start

    cfg = load_config(None, m2flow_overrides(s, os.path.join(root, "unused")))
    held_out = _held_out(s)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    out = []
    for step in [0, *steps]:
        path = s.model_path if step == 0 else os.path.join(root, f"step-{step}")
        worker = RolloutWorker(Start.of(path, cfg), cfg.rollout, threads=s.threads)
        prompts = [format_prompt(p.question, worker.engine.tokenizer, s.template) for p in held_out]
        out.append((step, evaluate(worker.generate, held_out, prompts, greedy).accuracy))
        log.info("TRL step %d: held-out accuracy %.3f", step, out[-1][1])
        del worker
    return out


def _side_main(argv: list[str]) -> int:
    side, settings_path, result_path = argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    with open(settings_path) as f:
        s = Settings(**json.load(f))
    out_dir = os.path.dirname(os.path.abspath(result_path))
    result = (run_m2flow_side if side == "m2flow" else run_trl_side)(s, out_dir)
    atomic_write_text(result_path, json.dumps(result, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------------------
# The benchmark


def prepare_data(train, held_out, out_dir: str) -> tuple[str, str]:
    """train.jsonl and held_out.jsonl in `out_dir` (the problems both sides read)."""
    return (write_problems(train, os.path.join(out_dir, "train.jsonl")),
            write_problems(held_out, os.path.join(out_dir, "held_out.jsonl")))


def run_side(side: str, s: Settings, out_dir: str) -> dict:
    """Runs one side in a child process; returns its summary (raises naming the side if it fails)."""
    settings_path = os.path.join(out_dir, "settings.json")
    atomic_write_text(settings_path, json.dumps(dataclasses.asdict(s), indent=1))
    result_path = os.path.join(out_dir, f"{side}.json")
    print(f"m2flow bench vs-trl: running {LABELS[side]} ({s.steps} steps)", flush=True)
    proc = subprocess.run([sys.executable, "-m", "m2flow.bench.vs_trl", side, settings_path, result_path])
    if proc.returncode != 0:
        raise RuntimeError(f"the {LABELS[side]} side failed (exit code {proc.returncode}); its output is above")
    with open(result_path) as f:
        return json.load(f)


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "trl", "accelerate", "ray", "m2flow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run_vs_trl(s: Settings, out_dir: str, sides: tuple[str, ...] = SIDES, m2flow_cfg=None) -> dict:
    """Runs the sides back to back (in this order) on settings `s` whose data files exist; writes vs_trl.json and
    vs_trl.png (and vs_trl.md) to `out_dir` and returns the result (with "table" when both sides ran)."""
    from m2flow.bench.learning import cpu_model

    os.makedirs(out_dir, exist_ok=True)
    result: dict = {"settings": dataclasses.asdict(s), "sides_run": list(sides),
                    "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": s.threads, **versions()},
                    "seeds": {"m2flow": s.seed, "trl": s.seed},
                    "trl_config": {k: v for k, v in trl_config_kwargs(s, "").items() if k != "output_dir"},
                    "differences": differences(s, m2flow_cfg)}
    for side in sides:
        result[side] = run_side(side, s, out_dir)
        if result[side].get("special_tokens_added"):
            result["differences"].append("prompt tokens: TRL tokenizes the text prompts with the tokenizer's special "
                                         "tokens (e.g. BOS), m2flow's engine without them")
        atomic_write_text(os.path.join(out_dir, "vs_trl.json"), json.dumps(result, indent=1))
    if all(side in result for side in SIDES):
        result["ratios"] = compare(result["m2flow"], result["trl"])
        result["table"] = format_table(result)
        atomic_write_text(os.path.join(out_dir, "vs_trl.md"),
                          f"{result['machine']['cpu']}, {result['machine']['cores']} cores, "
                          f"{s.threads} threads per side\n\n{result['table']}\n")
        plot(result, os.path.join(out_dir, "vs_trl.png"))
    atomic_write_text(os.path.join(out_dir, "vs_trl.json"), json.dumps(result, indent=1))
    result["path"] = out_dir
    return result


if __name__ == "__main__":
    sys.exit(_side_main(sys.argv[1:]))
