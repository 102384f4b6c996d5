"""The `m2flow` command (also `python -m m2flow`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


DEMO_HELP = """Runs the embedded default experiment: builds (or reuses) a tiny warm-started Qwen2 base model,
measures its greedy held-out accuracy on synthetic math problems, trains it with GRPO on Ray, measures
again and prints the before/after table. Overrides (key=value) apply as for `train`."""

TRAIN_HELP = """Runs an RL experiment. The configuration is the defaults (the tiny demo), then --config YAML,
then key=value overrides, e.g. `m2flow train --config configs/tiny_math_grpo.yaml train.steps=20 rollout.n=4`.
Every option is documented in m2flow/config.py and docs/configuration.md."""


BENCH_ROLLOUT_HELP = """Rollout throughput: m2flow's engine vs transformers generate on the same prompts, both
generating exactly --new-tokens tokens per sequence, at each batch size. Prints tokens/s and the ratio (and
on GPU the decode step against the memory-bandwidth bound) and writes benchmarks/results/rollout-<device>-<preset>.json."""


BENCH_TRAIN_HELP = """Trainer throughput on the demo's workload: one real step's rollout batch (the base model's samples
for train.prompts_per_step prompts, scored, GRPO advantages), then the old-logprob pass and the update timed on a
fresh copy of the model with padded micro-batches and with sequence packing at each --budgets value (a prompt
computed once per sample, and once for all its samples: train.share_prompts). Prints
seconds, update tokens/s (real tokens) and speed-ups against padded micro-batches, measured in the same run.
With --devices 1,2: the trainer (the config's settings) as d ranks on d logical CPU devices for each d, on the same
batch: trainer tokens/s and the scaling ratio to the first d."""

BENCH_MEMORY_HELP = """Peak memory of one actor update with a large vocabulary: full logits against memory-lean chunked
logprobs (train.logits_chunk_tokens), each in a fresh process (peak RSS), on a small Qwen2 body with a
Qwen2-size vocabulary and random tokens."""

BENCH_SOAK_HELP = """Soak: many small RL iterations of a micro model (evaluation and periodic checkpoints on) while the
memory (RSS), open file descriptors and process count of the driver and every process it started are sampled
each second; prints them at 25%, 50% and 100% of the run and their growth per 100 steps, and writes
soak.json, soak.md and soak.png. A leak shows as growth."""

BENCH_VS_TRL_HELP = """m2flow against TRL's GRPOTrainer, back to back on this machine: the same base model (default: the
demo's), training and held-out problems (written as jsonl to the output directory), group size, prompts per step,
response length, learning rate, steps, temperature, no KL, chat template and reward (m2flow's math_reward wrapped for
TRL), one optimizer update per generation batch. Both are evaluated greedily by m2flow's engine and evaluator. Prints
seconds per step, generated tokens/s, held-out accuracy vs step and vs RL wall-clock, peak memory and the ratios
m2flow/TRL, and what could not be aligned; writes vs_trl.json, vs_trl.md and vs_trl.png. Defaults are the demo's
(m2flow/config.py); key=value overrides apply to the config they are read from (and to m2flow's side).
Needs TRL: pip install -e ".[bench]"."""


BENCH_PLACEMENT_HELP = """Placement modes against each other: the same RL experiment (CONFIG, default the demo; same seed and
data) run for --steps steps with cluster.devices=--devices and cluster.placement set to each of --modes (collocated,
disaggregated, or an RLinf spec such as '{rollout: "0", actor: "1"}'; `+key=value` after a mode adds overrides of
its own, e.g. disaggregated+algorithm.max_staleness=1 for one-step off-policy), for each workload: rollout_heavy (a long
tail of response lengths), training_heavy (the trainer dominates) or demo (the config as it is). Prints per workload
the median iteration seconds over steps 2..N, iterations/s, the ratio to collocated measured in the same bench, and
the rollout and update medians; writes benchmarks/results/placement-<machine>.json and .md. Checkpoints are off and
the held-out evaluation small (eval.num_problems=16, only before and after); key=value overrides come last."""

EVAL_HELP = """Evaluates HF model directories on benchmarks with k samples per problem through m2flow's engine and
prints the table in the published format (model rows, benchmark columns, an average column; cells avg@k in
percent), then pass@k and maj@k. Writes table.csv, table.md, table.json, table.png and results.jsonl (every
sample, its extracted answer and verdict) to --out-dir; the same command with the same --out-dir resumes,
skipping problems already scored. Benchmarks, the files they read and the metrics: docs/eval.md."""

REPORT_HELP = """Where one RL iteration's device time went, from RUN_DIR/timeline.jsonl: writes RUN_DIR/timeline.png, a
Gantt chart of the iteration (one row per rank, grouped by device, bars colored by stage, rollout groups as
ticks), and prints its window, per-device busy seconds and bubble fraction (idle device time over devices x
window). Default step: the median step, leaving out step 1 (warm-up) when there are more than 2."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2flow", description="RL post-training of LLMs for reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", TRAIN_HELP), ("demo", DEMO_HELP)):
        p = sub.add_parser(name, help=help_text.split("\n")[0], description=help_text)
        if name == "train":
            p.add_argument("--config", help="YAML experiment file (e.g. configs/tiny_math_grpo.yaml)")
            p.add_argument("--resume", metavar="RUN_DIR",
                           help="continue a killed or failed run from its last complete checkpoint, with the "
                                "config it was started with (overrides still apply, e.g. cluster settings); the "
                                "continued run's metrics and weights are those of a run that never stopped")
        else:
            p.add_argument("--seeds", default="",
                           help="comma-separated seeds, e.g. 0,1,2,3,4: run the experiment once per seed (each builds "
                                "its own base model) and report the gain's mean, std and min, a per-seed table and "
                                "one plot of every seed's accuracy curve (<output_dir>/seeds-<time>/)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
        p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    bench = sub.add_parser("bench", help="benchmarks against baselines measured in the same run",
                           description="Benchmarks that print ratios against a baseline measured in the same run.")
    bench_sub = bench.add_subparsers(dest="target", required=True)
    b = bench_sub.add_parser("rollout", help=BENCH_ROLLOUT_HELP.split("\n")[0], description=BENCH_ROLLOUT_HELP)
    b.add_argument("--preset", default="tiny", choices=["tiny", "qwen2.5-1.5b"],
                   help="model architecture, random weights (default: tiny, the demo's model)")
    b.add_argument("--batch-sizes", default="1,16,64,256", help="comma-separated batch sizes (default: 1,16,64,256)")
    b.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default: 128)")
    b.add_argument("--prompt-tokens", type=int, default=0,
                   help="random prompts of this many tokens (default 0: the synthetic math chat prompts)")
    b.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    b.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    b.add_argument("--threads", type=int, default=0, help="CPU threads (default 0: torch's default)")
    b.add_argument("--model", default="", help="benchmark this HF model directory instead of a preset")
    b.add_argument("--n", type=int, default=1, help="samples per prompt (batch sizes count sequences; default 1)")
    b.add_argument("--stop-at-eos", action="store_true",
                   help="end sequences at EOS (ragged lengths, as in RL) instead of exactly --new-tokens")
    b.add_argument("--repeats", type=int, default=3, help="time each engine this many times, keep the fastest")
    b.add_argument("--no-hf", action="store_true", help="skip the transformers generate baseline")
    b.add_argument("--hf-max-batch", type=int, default=1 << 30, help="run the HF baseline only up to this batch")
    b.add_argument("--out-dir", default="benchmarks/results", help="where the JSON result goes")
    b.add_argument("--no-cuda-graphs", action="store_true", help="GPU: decode eagerly (measures what the graphs gain)")
    b.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                   help="decode attention and sampling: auto (Triton on GPU), triton or torch (default: auto)")
    b.add_argument("--compile", action="store_true",
                   help="torch.compile the eager decode step (CPU, or a GPU with --kernels torch --no-cuda-graphs)")
    b.add_argument("--profile", action="store_true",
                   help="also profile one decode step per batch size (kernels or ops per step, device busy time, "
                        "top ops; written beside the result)")
    b.add_argument("--tag", default="", help="appended to the result file's name (keeps runs apart)")
    bt = bench_sub.add_parser("train", help=BENCH_TRAIN_HELP.split("\n")[0], description=BENCH_TRAIN_HELP)
    bt.add_argument("--budgets", default="2048,4096,8192",
                    help="packed variants: train.max_tokens_per_microbatch values (default: 2048,4096,8192)")
    bt.add_argument("--repeats", type=int, default=3, help="runs per variant, the median is reported (default: 3)")
    bt.add_argument("--devices", default="",
                    help="measure scaling instead: comma-separated device counts, e.g. 1,2 (trainer ranks = devices)")
    bt.add_argument("--model", default="", help="an HF model directory (default: the demo's base model, built if missing)")
    bt.add_argument("--out-dir", default="benchmarks/results", help="where the JSON result goes")
    bt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (e.g. train.micro_batch_size=64)")
    bm = bench_sub.add_parser("memory", help=BENCH_MEMORY_HELP.split("\n")[0], description=BENCH_MEMORY_HELP)
    bm.add_argument("--vocab", type=int, default=151936, help="vocabulary size (default: 151936, Qwen2's)")
    bm.add_argument("--sequences", type=int, default=32, help="sequences in the micro-batch (default: 32)")
    bm.add_argument("--response-tokens", type=int, default=128, help="response tokens per sequence (default: 128)")
    bm.add_argument("--chunks", default="0,1024,256", help="train.logits_chunk_tokens values, 0 = full logits")
    bm.add_argument("--out-dir", default="benchmarks/results", help="where the JSON result goes")
    soak = bench_sub.add_parser("soak", help=BENCH_SOAK_HELP.split("\n")[0], description=BENCH_SOAK_HELP)
    soak.add_argument("--steps", type=int, default=300, help="RL steps of the micro experiment (default: 300)")
    soak.add_argument("--out-dir", default="benchmarks/results", help="where soak-<time>/ goes")
    soak.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    soak.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of the micro experiment")
    vt = bench_sub.add_parser("vs-trl", help=BENCH_VS_TRL_HELP.split("\n")[0], description=BENCH_VS_TRL_HELP)
    vt.add_argument("--model", default="",
                    help="an HF model directory (default: the demo's base model, built if missing)")
    vt.add_argument("--steps", type=int, default=None, help="RL steps (default: train.steps, 30)")
    vt.add_argument("--prompts-per-step", type=int, default=None,
                    help="prompts per step (default: train.prompts_per_step, 64)")
    vt.add_argument("--n", type=int, default=None, help="samples per prompt (default: rollout.n, 8)")
    vt.add_argument("--max-new-tokens", type=int, default=None,
                    help="response cap (default: rollout.max_new_tokens, 48)")
    vt.add_argument("--lr", type=float, default=None, help="learning rate (default: train.lr, 1e-4)")
    vt.add_argument("--eval-every", type=int, default=None,
                    help="held-out evaluation every k steps, besides step 0 and the end (default: eval.every, 10; "
                         "0: only those)")
    vt.add_argument("--eval-problems", type=int, default=None,
                    help="held-out problems (default: eval.num_problems, 500)")
    vt.add_argument("--train-problems", type=int, default=0,
                    help="training problems written for both sides (default 0: steps x prompts per step, one epoch)")
    vt.add_argument("--seed", type=int, default=None, help="seed of both sides (default: seed, 0)")
    vt.add_argument("--threads", type=int, default=0, help="torch threads per side (default 0: all cores)")
    vt.add_argument("--micro-batch-size", type=int, default=None,
                    help="TRL: completions per forward/backward slice, the largest divisor of prompts x n up to this "
                         "(default: train.micro_batch_size, 128)")
    vt.add_argument("--sides", default="m2flow,trl", help="which sides to run, in this order (default: m2flow,trl)")
    vt.add_argument("--out-dir", default="", help="output directory (default: benchmarks/results/vs-trl-<time>)")
    vt.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    vt.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides (e.g. algorithm.filter_groups=false); m2flow's side runs with them")
    bp = bench_sub.add_parser("placement", help=BENCH_PLACEMENT_HELP.split("\n")[0], description=BENCH_PLACEMENT_HELP)
    bp.add_argument("--modes", default="collocated,collocated+cluster.context_switch=true,disaggregated,"
                                       "disaggregated+algorithm.max_staleness=1",
                    help="comma-separated cluster.placement values, each optionally followed by +key=value overrides "
                         "of its own; collocated is the baseline (default: collocated; collocated with context "
                         "switching, which CPU devices leave off by default, collocated+cluster.context_switch=true; "
                         "disaggregated; and disaggregated one-step off-policy, disaggregated+algorithm.max_staleness=1)")
    bp.add_argument("--workloads", default="rollout_heavy,training_heavy",
                    help="comma-separated: rollout_heavy, training_heavy, demo (default: rollout_heavy,training_heavy)")
    bp.add_argument("--steps", type=int, default=6, help="RL steps per run; steps 2..N are timed (default: 6)")
    bp.add_argument("--devices", type=int, default=2, help="cluster.devices of every run (default: 2)")
    bp.add_argument("--out-dir", "--out", dest="out_dir", default="benchmarks/results",
                    help="where placement-<machine>.json and .md go (default: benchmarks/results)")
    bp.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    bp.add_argument("args", nargs="*", metavar="[CONFIG] [key=value]",
                    help="a YAML experiment file (e.g. configs/tiny_math_grpo.yaml), then config overrides")
    e = sub.add_parser("eval", help=EVAL_HELP.split("\n")[0], description=EVAL_HELP)
    e.add_argument("--models", nargs="+", required=True, metavar="[NAME=]PATH",
                   help="HF model directories (config.json, *.safetensors, tokenizer); NAME= sets the table's row "
                        "label (default: the path as given)")
    e.add_argument("--benchmarks", default="synthetic_math,synthetic_mc",
                   help="comma-separated benchmark names: aime24, aime25, gpqa_diamond, math500, gsm8k, amc23 (read "
                        "from --data-dir), synthetic_math, synthetic_mc (built in) (default: synthetic_math,synthetic_mc)")
    e.add_argument("--k", type=int, default=8, help="samples per problem: avg@k, pass@k and maj@k over them (default: 8)")
    e.add_argument("--data-dir", default="",
                   help="directory holding the benchmark files, <name>.jsonl, .parquet or .csv (fields: docs/eval.md)")
    e.add_argument("--greedy", action="store_true",
                   help="greedy decoding, one sample per problem (k=1, temperature 0; --k, --temperature and "
                        "--top-p are ignored)")
    e.add_argument("--temperature", type=float, default=0.6, help="sampling temperature (default: 0.6)")
    e.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling threshold (default: 0.95)")
    e.add_argument("--max-new-tokens", type=int, default=32768,
                   help="response length cap; prompt + response are also capped by the model's "
                        "max_position_embeddings (default: 32768)")
    e.add_argument("--num-problems", type=int, default=0,
                   help="evaluate only the first N problems of each benchmark (default 0: all)")
    e.add_argument("--out-dir", default="",
                   help="where the table and results.jsonl go; an existing one is resumed (default: runs/eval-<time>)")
    e.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    e.add_argument("--template", default="chat", choices=["chat", "plain"],
                   help="prompt: the tokenizer's chat template around the question, or the question as is "
                        "(default: chat, as the demo trains)")
    e.add_argument("--batch-size", type=int, default=512,
                   help="sequences generated together, batch-size // k problems per batch (default: 512)")
    e.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    e.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    r = sub.add_parser("report", help=REPORT_HELP.split("\n")[0], description=REPORT_HELP)
    r.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding timeline.jsonl")
    r.add_argument("--step", type=int, default=None,
                   help="the iteration to show (default: the median step, step 1 left out when there are more than 2)")
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "target", None) == "placement" and not any(x.startswith("-") for x in extra):
        args.args += extra  # `bench placement CONFIG --steps 3 key=value`: overrides after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    for key, value in {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(key, value)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command == "bench":  # needs only torch and transformers (runs on a bare GPU machine)
        return _bench(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "report":
        return _report(args)
    from m2flow.config import ConfigError, load_config

    if getattr(args, "seeds", ""):
        return _demo_seeds(args)
    resume = getattr(args, "resume", None)
    if resume and args.config:
        print("m2flow: --resume takes the run's own config.yaml; give no --config", file=sys.stderr)
        return 2
    try:
        if resume:
            cfg = load_config(os.path.join(resume, "config.yaml") if os.path.isdir(resume) else None,
                              [*args.overrides, f"resume={resume}"])
        else:
            cfg = load_config(getattr(args, "config", None), args.overrides)
    except ConfigError as e:
        print(f"m2flow: config error: {e}", file=sys.stderr)
        return 2

    from m2flow.data.datasets import DataError
    from m2flow.models.hub import ModelPathError
    from m2flow.report import print_summary
    from m2flow.resume import ResumeError
    from m2flow.faults import NonFiniteTrainingError, StageError
    from m2flow.runner import run

    try:
        summary = run(cfg, progress=not args.no_progress)
    except DataError as e:  # a missing, empty or malformed data file, found before anything starts
        print(f"m2flow: data error: {e}", file=sys.stderr)
        return 2
    except ModelPathError as e:  # a Hub id that could not be fetched, found before anything starts
        print(f"m2flow: model error: {e}", file=sys.stderr)
        return 2
    except ResumeError as e:  # nothing to resume, found before anything starts
        print(f"m2flow: resume error: {e}", file=sys.stderr)
        return 2
    except (StageError, NonFiniteTrainingError) as e:  # one line, then the original error
        import traceback

        cause = getattr(e, "cause", None)  # a NonFiniteTrainingError has none: its line says it all
        detail = "" if cause is None else str(cause) if "Traceback" in str(cause) else "".join(
            traceback.format_exception(cause))
        print(f"m2flow: run failed: {e}" + (f"\n{detail.rstrip()}" if detail else ""), file=sys.stderr)
        if getattr(e, "run_dir", None):
            print(f"m2flow: recorded in {os.path.join(e.run_dir, 'status.json')}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def _demo_seeds(args) -> int:
    from m2flow.bench.learning import run_seeds
    from m2flow.config import ConfigError

    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        print(f"m2flow: --seeds takes comma-separated integers, e.g. 0,1,2; got {args.seeds!r}", file=sys.stderr)
        return 2
    if "seed" in {o.partition("=")[0].strip() for o in args.overrides}:
        print("m2flow: give seeds with --seeds, not seed=...", file=sys.stderr)
        return 2
    try:
        result = run_seeds(seeds, args.overrides, progress=not args.no_progress)
    except ConfigError as e:
        print(f"m2flow: config error: {e}", file=sys.stderr)
        return 2
    print(f"\n{result['cpu']}, {result['cores']} cores\n\n{result['table']}\n\nwrote {result['path']}/seeds.json, "
          f"seeds.md and seeds.png")
    return 0


def _bench_train(args) -> int:
    import torch

    from m2flow.bench.train import format_devices_table, format_table, run_devices_benchmark, run_train_benchmark
    from m2flow.config import ConfigError, load_config
    from m2flow.data.templates import format_prompt
    from m2flow.data.task import load_task
    from m2flow.runner import base_config
    from m2flow.training.warm_start import ensure_base_model
    from transformers import AutoTokenizer

    try:
        cfg = load_config(None, args.overrides)
    except ConfigError as e:
        print(f"m2flow: config error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(cfg.cluster.num_cpus or os.cpu_count())
    task = load_task(cfg)
    model_path = args.model or cfg.model.path or ensure_base_model(
        base_config(cfg), task.sft, task.held_out[: cfg.eval.num_problems], cfg.data.template,
        cfg.eval.max_new_tokens)[0]
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    problems = task.train[: cfg.train.prompts_per_step]
    prompts = [format_prompt(p.question, tokenizer, cfg.data.template) for p in problems]
    answers = [p.answer for p in problems]
    if args.devices:  # scaling over logical devices instead of the micro-batch layouts
        counts = [int(x) for x in args.devices.split(",") if x.strip()]
        result = run_devices_benchmark(cfg, model_path, prompts, answers, counts, args.repeats, args.out_dir)
        title, table = f" --devices: {result['cpu']}, {result['cores']} cores", format_devices_table(result)
    else:
        budgets = [int(x) for x in args.budgets.split(",") if x.strip()]
        result = run_train_benchmark(cfg, model_path, prompts, answers, budgets, args.repeats, args.out_dir)
        title, table = f": {result['cpu']}, {result['threads']} threads", format_table(result)
    print(f"\nm2flow bench train{title}, {model_path}\n\n{table}\n\nwrote {result['path']}")
    return 0


def _bench_vs_trl(args) -> int:
    import time

    from m2flow.bench.vs_trl import (SIDES, TRL_MISSING, Settings, m2flow_overrides, prepare_data, run_vs_trl,
                                     trl_available)
    from m2flow.config import ConfigError, load_config
    from m2flow.data.task import load_task
    from m2flow.runner import base_config
    from m2flow.training.warm_start import ensure_base_model

    sides = tuple(x.strip() for x in args.sides.split(",") if x.strip())
    if not sides or any(x not in SIDES for x in sides):
        print(f"m2flow: --sides takes m2flow and/or trl, comma-separated; got {args.sides!r}", file=sys.stderr)
        return 2
    if "trl" in sides and not trl_available():
        print(TRL_MISSING, file=sys.stderr)
        return 2
    try:
        cfg = load_config(None, args.overrides)
    except ConfigError as e:
        print(f"m2flow: config error: {e}", file=sys.stderr)
        return 2
    pick = lambda flag, default: default if flag is None else flag  # noqa: E731
    steps, prompts = pick(args.steps, cfg.train.steps), pick(args.prompts_per_step, cfg.train.prompts_per_step)
    task = load_task(cfg)
    model_path = os.path.abspath(args.model or cfg.model.path or ensure_base_model(
        base_config(cfg), task.sft, task.held_out[: cfg.eval.num_problems], cfg.data.template,
        cfg.eval.max_new_tokens, progress=not args.no_progress)[0])
    out_dir = os.path.abspath(args.out_dir or os.path.join("benchmarks", "results",
                                                           f"vs-trl-{time.strftime('%Y%m%d-%H%M%S')}"))
    os.makedirs(out_dir, exist_ok=True)
    eval_problems = pick(args.eval_problems, cfg.eval.num_problems)
    train_path, eval_path = prepare_data(task.train[: args.train_problems or steps * prompts],
                                         task.held_out[:eval_problems], out_dir)
    settings = Settings(
        model_path=model_path, train_path=train_path, eval_path=eval_path, steps=steps, prompts_per_step=prompts,
        n=pick(args.n, cfg.rollout.n), max_new_tokens=pick(args.max_new_tokens, cfg.rollout.max_new_tokens),
        eval_max_new_tokens=cfg.eval.max_new_tokens, lr=pick(args.lr, cfg.train.lr),
        temperature=cfg.rollout.temperature, kl_coef=cfg.algorithm.kl_coef,
        eval_every=pick(args.eval_every, cfg.eval.every), eval_problems=min(eval_problems, len(task.held_out)),
        seed=pick(args.seed, cfg.seed), threads=args.threads or cfg.cluster.num_cpus or os.cpu_count() or 1,
        template=cfg.data.template, micro_batch_size=pick(args.micro_batch_size, cfg.train.micro_batch_size),
        m2flow_overrides=list(args.overrides), progress=not args.no_progress)
    try:  # the m2flow side's config, checked now (and read for the list of differences)
        m2flow_cfg = load_config(None, m2flow_overrides(settings, os.path.join(out_dir, "m2flow")))
    except ConfigError as e:
        print(f"m2flow: config error: {e}", file=sys.stderr)
        return 2
    result = run_vs_trl(settings, out_dir, sides, m2flow_cfg)
    print(f"\nm2flow bench vs-trl: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"{settings.threads} threads per side, seed {settings.seed}, {model_path}\n")
    if "table" in result:
        print(result["table"])
    else:
        for side in sides:
            r = result[side]
            print(f"{side}: {r['seconds_per_step']:.2f} s/step, {r['tokens_per_s']:.0f} tokens/s, held-out "
                  f"{100 * r['accuracy_start']:.1f}% -> {100 * r['accuracy_end']:.1f}%")
    print(f"\nwrote {out_dir}/vs_trl.json" + (", vs_trl.md and vs_trl.png" if "table" in result else ""))
    return 0


def _bench_placement(args) -> int:
    from m2flow.bench.placement import WORKLOADS, run_placement_benchmark, split_modes
    from m2flow.config import ConfigError

    config = args.args[0] if args.args and "=" not in args.args[0] else None
    overrides = args.args[1:] if config else args.args
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    modes = split_modes(args.modes)
    if not workloads or any(w not in WORKLOADS for w in workloads):
        print(f"m2flow: --workloads takes {', '.join(WORKLOADS)}, comma-separated; got {args.workloads!r}",
              file=sys.stderr)
        return 2
    if not modes or args.steps < 2 or args.devices < 1:
        print("m2flow: bench placement needs --modes, --steps >= 2 (step 1 is warm-up) and --devices >= 1",
              file=sys.stderr)
        return 2
    try:
        result = run_placement_benchmark(workloads, modes, args.steps, args.devices, overrides, config, args.out_dir,
                                         progress=not args.no_progress)
    except ConfigError as e:
        print(f"m2flow: config error: {e}", file=sys.stderr)
        return 2
    m = result["machine"]
    print(f"\nm2flow bench placement: {m['cpu']}, {m['cores']} cores, cluster.devices={args.devices}, "
          f"{args.steps} steps per run\n\n{result['table']}\n\nwrote {result['path']} and {result['md_path']}")
    failed = any(not r.get("error", "not run").startswith("not run") for w in result["workloads"] for r in w["rows"])
    return 1 if failed else 0


def _bench(args) -> int:
    if args.target == "train":
        return _bench_train(args)
    if args.target == "placement":
        return _bench_placement(args)
    if args.target == "vs-trl":
        return _bench_vs_trl(args)
    if args.target == "memory":
        from m2flow.bench.memory import format_table, run_memory_benchmark, save

        result = run_memory_benchmark(args.vocab, args.sequences, 32, args.response_tokens,
                                      tuple(int(x) for x in args.chunks.split(",")))
        print(f"m2flow bench memory: {result['cpu']}\n\n{format_table(result)}\n\nwrote {save(result, args.out_dir)}")
        return 0
    if args.target == "soak":
        from m2flow.bench.soak import run_soak

        result = run_soak(args.steps, args.overrides, args.out_dir, progress=not args.no_progress)
        print(f"\n{result['cpu']}, {result['cores']} cores, {args.steps} steps in {result['rl_seconds']:.0f} s\n\n"
              f"{result['table']}\n\nwrote {result['path']}/soak.json, soak.md and soak.png")
        return 0
    import torch

    from m2flow.bench.rollout import run_benchmark

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = tuple(int(x) for x in args.batch_sizes.split(","))
    print(f"m2flow bench rollout: {args.model or 'preset ' + args.preset}, {dtype} on {device} "
          f"({torch.get_num_threads()} threads), {args.n} sample(s) per prompt, "
          f"{'up to' if args.stop_at_eos else 'exactly'} {args.new_tokens} new tokens per sequence")
    result = run_benchmark(args.preset, sizes, args.new_tokens, args.prompt_tokens, dtype, device,
                           compare_hf=not args.no_hf, hf_max_batch=args.hf_max_batch, out_dir=args.out_dir,
                           model_path=args.model, n=args.n, stop_at_eos=args.stop_at_eos, repeats=args.repeats,
                           cuda_graphs=not args.no_cuda_graphs, kernels=args.kernels, compile=args.compile,
                           profile=args.profile, tag=args.tag)
    print(f"wrote {result['path']}")
    return 0


def _eval(args) -> int:
    import time

    from m2flow.data.datasets import DataError
    from m2flow.eval.benchmarks import load_benchmark
    from m2flow.eval.run import EvalError, ModelSpec, Protocol, print_table, run_eval

    options = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, template=args.template,
                   batch_size=args.batch_size)
    out_dir = args.out_dir or os.path.join("runs", f"eval-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        protocol = (Protocol.greedy(**options) if args.greedy else
                    Protocol(k=args.k, temperature=args.temperature, top_p=args.top_p, **options))
        models = [ModelSpec.parse(m) for m in args.models]
        try:
            benchmarks = [load_benchmark(name.strip(), args.data_dir, args.num_problems)
                          for name in args.benchmarks.split(",") if name.strip()]
        except KeyError as e:  # an unknown name: the message lists the valid ones
            raise EvalError(e.args[0]) from None
        report = run_eval(models, benchmarks, protocol, out_dir, progress=not args.no_progress,
                          device=args.device, dtype=args.dtype)
    except (EvalError, DataError) as e:
        print(f"m2flow eval: {e}", file=sys.stderr)
        return 2
    print_table(report.table)
    print(f"\n{report.new_samples} samples generated now, {report.skipped_problems} problem(s) found already "
          f"scored; wrote {', '.join(os.path.basename(p) for p in report.paths)} and results.jsonl to {out_dir} "
          f"(the same command with --out-dir {out_dir} resumes)")
    return 0


def _report(args) -> int:
    from m2flow.gantt import report

    try:
        result = report(args.run_dir, args.step)
    except ValueError as e:
        print(f"m2flow report: {e}", file=sys.stderr)
        return 2
    window, busy = result["window_s"], result["busy_s"]
    print(f"m2flow report {args.run_dir}: step {result['step']}, window {window:.2f} s, bubble fraction "
          f"{result['bubble_fraction']:.1%} over {len(busy)} device(s)")
    for device, seconds in busy.items():
        print(f"  device {device}: busy {seconds:.2f} s ({seconds / window if window > 0 else 0.0:.1%})")
    print(f"wrote {result['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
