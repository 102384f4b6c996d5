"""Peak memory of one actor update with a large vocabulary (`m2flow bench memory`): full logits against
memory-lean chunked logprobs (train.logits_chunk_tokens), each measured in a fresh process (peak RSS, so
the numbers are the process's real high-water mark) on a small Qwen2 body with a Qwen2-size vocabulary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, resource, sys, torch
from m2flow.algorithms import grpo_advantages
from m2flow.batch import RolloutBatch
from m2flow.config import AlgorithmConfig, TrainConfig
from m2flow.models.tiny import make_tiny_model, tiny_qwen2_config
from m2flow.rollout.types import Sample
from m2flow.training.actor import Actor

vocab, sequences, prompt, response, chunk = (int(x) for x in sys.argv[1:6])
torch.set_num_threads(2)
config = tiny_qwen2_config(vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                           eos_token_id=0, pad_token_id=0)
model = make_tiny_model(config, seed=0)
g = torch.Generator().manual_seed(0)
samples = [Sample(prompt_index=i // 4, prompt_ids=torch.randint(1, vocab, (prompt,), generator=g).tolist(),
                  token_ids=torch.randint(1, vocab, (response,), generator=g).tolist(), logprobs=[-1.0] * response,
                  text="", finish_reason="length") for i in range(sequences)]
batch = RolloutBatch.from_samples(samples, 0)
batch.scores = torch.arange(sequences, dtype=torch.float32) % 2
batch.advantages = grpo_advantages(batch.scores, batch.group_ids)
actor = Actor(model, TrainConfig(fsdp=False, logits_chunk_tokens=chunk, max_tokens_per_microbatch=0,
                                 micro_batch_size=sequences), AlgorithmConfig())
batch.old_logprobs = actor.compute_logprobs(batch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
actor.update(batch)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rss_before_update_mb": before / 1024, "peak_rss_mb": peak / 1024}))
"""


def measure(vocab: int, sequences: int, prompt: int, response: int, chunk: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *map(str, (vocab, sequences, prompt, response, chunk))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_memory_benchmark(vocab: int = 151936, sequences: int = 32, prompt: int = 32, response: int = 128,
                         chunks: tuple[int, ...] = (0, 1024, 256)) -> dict:
    """Peak RSS of one update (one micro-batch of `sequences` x (prompt + response) tokens) per chunk size
    (0 = full logits)."""
    from m2flow.bench.learning import cpu_model

    rows = []
    for chunk in chunks:
        m = measure(vocab, sequences, prompt, response, chunk)
        rows.append({"logits_chunk_tokens": chunk, **m})
    full = rows[0]["peak_rss_mb"]
    for r in rows:
        r["peak_vs_full"] = r["peak_rss_mb"] / full
    logits_gb = sequences * response * vocab * 4 / 2**30
    return {"cpu": cpu_model(), "vocab": vocab, "sequences": sequences, "prompt_tokens": prompt,
            "response_tokens": response, "full_logits_fp32_gb": logits_gb, "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"vocab {result['vocab']}, {result['sequences']} sequences x ({result['prompt_tokens']} prompt + "
             f"{result['response_tokens']} response) tokens in one micro-batch: the response logits alone are "
             f"{result['full_logits_fp32_gb']:.2f} GB in float32", "",
             "| logits_chunk_tokens | RSS before the update (MB) | peak RSS (MB) | peak vs full logits |",
             "|---|---|---|---|"]
    for r in result["rows"]:
        name = "0 (full logits)" if r["logits_chunk_tokens"] == 0 else str(r["logits_chunk_tokens"])
        lines.append(f"| {name} | {r['rss_before_update_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_vs_full']:.2f}x |")
    return "\n".join(lines)


def save(result: dict, out_dir: str) -> str:
    from m2flow.io import atomic_write_text

    path = os.path.join(out_dir, f"memory-cpu-vocab{result['vocab']}.json")
    atomic_write_text(path, json.dumps(result, indent=2))
    return path
