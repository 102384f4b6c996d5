"""`m2flow bench rollout`: m2flow's engine against transformers `generate`, same prompts, same lengths.

Both engines generate exactly `--new-tokens` tokens per sequence (EOS ignored) from the same prompts at
each batch size; the table reports generated tokens per second (prefill included) and the ratio. On a
GPU it also reports the decode step time against the memory-bandwidth bound: the bytes a decode step must
read (weights + the KV cache of every sequence) over the HBM bandwidth measured in the same run. Each
timing is the fastest of `repeats` runs, the two engines interleaved.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

from m2flow.rollout import Engine, EngineConfig, SamplingParams
from m2flow.rollout.hf_engine import left_pad
from m2flow.rollout.model_runner import kv_bytes_per_token

# Architectures with random weights (no download): the tiny default, and Qwen2.5-1.5B's.
PRESETS = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=384),
    "qwen2.5-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                         vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                         vocab_size=151936, rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True),
}


@dataclass
class Row:
    batch_size: int
    prompt_tokens: int  # per sequence (mean)
    new_tokens: int  # per sequence (mean, m2flow's run)
    ours_tokens_per_s: float
    hf_tokens_per_s: float | None
    ratio: float | None
    ours_decode_step_ms: float | None = None  # GPU: mean decode step time
    bandwidth_bound_step_ms: float | None = None  # GPU: bytes read per decode step / measured bandwidth
    bandwidth_fraction: float | None = None  # bound / measured (1.0 = at the memory-bandwidth limit)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device).replace(" ", "-").lower()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def build_model_dir(preset: str, dtype: str, seed: int = 0) -> tuple[str, object]:
    """An HF model directory with random weights of the preset architecture (and the project tokenizer)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from m2flow.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    spec = dict(PRESETS[preset])
    vocab = spec.pop("vocab_size", len(tokenizer))
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
                      num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
                      num_key_value_heads=spec["num_kv_heads"], rope_theta=spec.get("rope_theta", 10000.0),
                      max_position_embeddings=spec.get("max_position_embeddings", 4096),
                      tie_word_embeddings=spec.get("tie_word_embeddings", True),
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).to(getattr(torch, dtype))
    path = os.path.join(tempfile.mkdtemp(prefix="m2flow-bench-"), preset)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer


def prompt_ids(tokenizer, batch_size: int, prompt_tokens: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """Synthetic chat prompts (tiny model), or random token prompts of `prompt_tokens` tokens."""
    if prompt_tokens <= 0:
        from m2flow.data.synthetic import make_splits
        from m2flow.data.templates import format_prompt

        problems = make_splits({"p": batch_size}, seed=seed)["p"]
        return [tokenizer(format_prompt(p.question, tokenizer), add_special_tokens=False)["input_ids"] for p in problems]
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(2, min(vocab, 250), (batch_size, prompt_tokens), generator=gen).tolist()


@torch.inference_mode()
def hf_generate(model, prompt_ids: list[list[int]], params: SamplingParams, tokenizer) -> list[int]:
    """transformers `generate` on the same prompts (left-padded, `params.n` samples each, one batch); returns
    the tokens generated per sequence, up to and including EOS. It keeps no logits (m2flow's engine returns
    logprobs on top of its tokens)."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    rows = [ids for ids in prompt_ids for _ in range(params.n)]
    input_ids, attention_mask = left_pad(rows, pad, next(model.parameters()).device)
    width = input_ids.shape[1]
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=True,
                         temperature=params.temperature, top_p=1.0, top_k=0, max_new_tokens=params.max_new_tokens,
                         min_new_tokens=params.max_new_tokens if params.ignore_eos else None, eos_token_id=eos,
                         pad_token_id=pad)
    new = out[:, width:].tolist()
    return [len(t) if params.ignore_eos or eos not in t else t.index(eos) + 1 for t in new]


def measure_bandwidth(device: str, gib: float = 1.0) -> float:
    """Device memory bandwidth in bytes/s: a large copy reads and writes every byte once."""
    n = int(gib * (1 << 30)) // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    dst.copy_(src)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    sync()
    return 5 * 2 * n * 4 / (time.perf_counter() - start)


def _time(fn, device: str, repeats: int = 1) -> float:
    """Fastest of `repeats` timed calls (the least disturbed by other work on a shared machine)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def run_benchmark(preset: str = "tiny", batch_sizes=(1, 16, 64, 256), new_tokens: int = 128,
                  prompt_tokens: int = 0, dtype: str = "float32", device: str = "cpu", compare_hf: bool = True,
                  hf_max_batch: int = 1 << 30, out_dir: str = "benchmarks/results", model_path: str = "",
                  n: int = 1, stop_at_eos: bool = False, repeats: int = 3, cuda_graphs: bool = True,
                  kernels: str = "auto", compile: bool = False, profile: bool = False, tag: str = "",
                  log=print) -> dict:
    """`batch_sizes` count sequences: batch // n prompts, n samples each. With `stop_at_eos` sequences end
    at EOS (the RL setting: ragged lengths); the default generates exactly `new_tokens` per sequence. With
    `profile`, each batch size also gets a per-decode-step profile (profile_step.py): numbers in the JSON,
    the ops tables in a `-profile.txt` beside it."""
    if model_path:
        from transformers import AutoTokenizer

        path, tokenizer, preset = model_path, AutoTokenizer.from_pretrained(model_path), os.path.basename(
            model_path.rstrip("/"))
    else:
        path, tokenizer = build_model_dir(preset, dtype)
    max_batch = max(batch_sizes)
    longest = (prompt_tokens or 64) + new_tokens
    config = EngineConfig(max_num_seqs=max_batch, max_model_len=longest + 16, cuda_graphs=cuda_graphs, kernels=kernels,
                          compile=compile)
    engine = Engine.from_pretrained(path, config, dtype=dtype, device=device)
    hf = None
    if compare_hf:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    params = SamplingParams(n=n, temperature=1.0, max_new_tokens=new_tokens, ignore_eos=not stop_at_eos, seed=0)
    args = engine.model.args
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    bandwidth = measure_bandwidth(device) if device.startswith("cuda") else None
    rows, profiles, tables = [], [], []
    for b in batch_sizes:
        ids = prompt_ids(tokenizer, max(b // n, 1), prompt_tokens, args.vocab_size)
        warm = SamplingParams(max_new_tokens=2, ignore_eos=True)  # at this batch size (compiles for it, if asked)
        engine.generate_ids(ids, warm)
        with_hf = hf is not None and b <= hf_max_batch
        if with_hf:
            hf_generate(hf, ids, warm, tokenizer)
        out, ref, ours_s, hf_s = [], [], float("inf"), float("inf")
        for _ in range(repeats):  # interleaved, so a disturbance or an order effect hits both engines alike
            ours_s = min(ours_s, _time(lambda: out.append(engine.generate_ids(ids, params)), device))
            if with_hf:
                hf_s = min(hf_s, _time(lambda: ref.append(hf_generate(hf, ids, params, tokenizer)), device))
        total = sum(len(s.token_ids) for s in out[0])
        row = Row(b, round(sum(map(len, ids)) / len(ids)), round(total / len(out[0])), total / ours_s, None, None)
        if with_hf:
            hf_total = sum(ref[0])  # differs from ours only with stop_at_eos
            row.hf_tokens_per_s = hf_total / hf_s
            row.ratio = row.ours_tokens_per_s / row.hf_tokens_per_s
        if bandwidth:  # decode only: time of `new_tokens` decode steps minus one prefill-only call
            prefill_s = _time(lambda: engine.generate_ids(ids, SamplingParams(max_new_tokens=1, ignore_eos=True)),
                              device, repeats)
            step_s = (ours_s - prefill_s) / max(new_tokens - 1, 1)
            mean_context = row.prompt_tokens + new_tokens / 2
            kv_read = b * mean_context * kv_bytes_per_token(engine.model, next(engine.model.parameters()).dtype)
            bound_s = (weight_bytes + kv_read) / bandwidth
            row.ours_decode_step_ms, row.bandwidth_bound_step_ms = step_s * 1e3, bound_s * 1e3
            row.bandwidth_fraction = bound_s / step_s
        rows.append(row)
        log(format_row(row))
        if profile:
            from m2flow.bench.profile_step import profile_decode

            stats, table = profile_decode(engine, [i for i in ids for _ in range(n)])
            profiles.append(stats)
            tables.append(f"batch {b}: {json.dumps(stats)}\n{table}")
            log(format_profile(stats))
    result = {
        "device": device_name(device), "preset": preset, "dtype": dtype, "threads": torch.get_num_threads(),
        "samples_per_prompt": n, "stop_at_eos": stop_at_eos, "repeats": repeats,
        "cuda_graphs": engine.runner.graphs is not None and engine.runner.cuda_graphs,
        "triton_kernels": engine.runner.triton_kernels, "compiled": compile,
        "parameters": sum(p.numel() for p in engine.model.parameters()), "weight_bytes": weight_bytes,
        "bandwidth_bytes_per_s": bandwidth, "rows": [asdict(r) for r in rows],
    }
    if profile:
        result["profile"] = profiles
    os.makedirs(out_dir, exist_ok=True)
    scenario = f"-n{n}-eos" if stop_at_eos else (f"-n{n}" if n > 1 else "")
    scenario += ("" if cuda_graphs else "-eager") + ("" if kernels == "auto" else f"-{kernels}-kernels")
    scenario += "-compiled" if compile else ""
    scenario += f"-{tag}" if tag else ""
    out = os.path.join(out_dir, f"rollout-{result['device']}-{preset}{scenario}.json")
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(out + ".tmp", out)
    result["path"] = out
    if profile:
        result["profile_path"] = out.removesuffix(".json") + "-profile.txt"
        with open(result["profile_path"], "w") as f:
            f.write("\n\n".join(tables))
    return result


def format_row(r: Row) -> str:
    hf = f"{r.hf_tokens_per_s:10.0f}" if r.hf_tokens_per_s else f"{'-':>10}"
    ratio = f"{r.ratio:6.2f}x" if r.ratio else f"{'-':>7}"
    line = f"batch {r.batch_size:4d}  m2flow {r.ours_tokens_per_s:10.0f} tok/s  hf {hf} tok/s  ratio {ratio}"
    if r.bandwidth_fraction is not None:
        line += (f"  decode step {r.ours_decode_step_ms:.2f} ms, bandwidth bound {r.bandwidth_bound_step_ms:.2f} ms "
                 f"({100 * r.bandwidth_fraction:.0f}% of the limit)")
    return line


def format_profile(p: dict) -> str:
    wall = f"{p['wall_ms_per_step']:.2f} ms"
    if p["device_busy_ms_per_step"] is None:
        return f"  profile: {p['aten_ops_per_step']:.0f} aten ops dispatched per decode step, {wall}"
    return (f"  profile: {p['kernels_per_step']:.0f} kernels per decode step, GPU busy "
            f"{p['device_busy_ms_per_step']:.2f} ms of {wall} ({100 * p['device_idle_fraction']:.0f}% idle, "
            "waiting for the host)")
