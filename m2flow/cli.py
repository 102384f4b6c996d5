"""The `m2flow` command (also `python -m m2flow`)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from m2flow.config import ConfigError, load_config

DEMO_HELP = """Runs the embedded default experiment: builds (or reuses) a tiny warm-started Qwen2 base model,
measures its greedy held-out accuracy on synthetic math problems, trains it with GRPO on Ray, measures
again and prints the before/after table. Overrides (key=value) apply as for `train`."""

TRAIN_HELP = """Runs an RL experiment. The configuration is the defaults (the tiny demo), then --config YAML,
then key=value overrides, e.g. `m2flow train --config configs/tiny_math_grpo.yaml train.steps=20 rollout.n=4`.
Every option is documented in m2flow/config.py and docs/configuration.md."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="m2flow", description="RL post-training of LLMs for reasoning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("train", TRAIN_HELP), ("demo", DEMO_HELP)):
        p = sub.add_parser(name, help=help_text.split("\n")[0], description=help_text)
        if name == "train":
            p.add_argument("--config", help="YAML experiment file (e.g. configs/tiny_math_grpo.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=20")
        p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    args = parser.parse_args(argv)
    for key, value in {"TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(key, value)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("httpx", "urllib3", "filelock", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = load_config(getattr(args, "config", None), args.overrides)
    except ConfigError as e:
        print(f"m2flow: config error: {e}", file=sys.stderr)
        return 2

    from m2flow.report import print_summary
    from m2flow.runner import run

    summary = run(cfg, progress=not args.no_progress)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
