"""Where a decode step's time goes: the work launched per step, the device's busy time per step, and the
ops that take it, from two profiled generations of different lengths. Their difference is pure decode
(prefill and set-up cancel), so the numbers hold for one decode step at the batch size given.

On a GPU, `kernels_per_step` counts the kernels that ran (those inside CUDA graphs included) and
`device_busy_ms_per_step` their summed time; `wall_ms_per_step` (timed without the profiler) minus that is
the time the GPU waited for the host (Python, scheduling, launches, the copy of the sampled tokens back).
On CPU the same run counts the top-level aten ops dispatched per step (what `--compile` reduces) and the
device numbers are None.
"""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from m2flow.rollout import Engine, SamplingParams


def profile_decode(engine: Engine, prompt_ids: list[list[int]], steps: tuple[int, int] = (8, 40),
                   row_limit: int = 20) -> tuple[dict, str]:
    """(per-decode-step numbers, the ops table of the longer run) for `prompt_ids` (one sequence each)."""
    cuda = engine.runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    runs = []
    for n in steps:
        params = SamplingParams(max_new_tokens=n, ignore_eos=True, seed=0)
        engine.generate_ids(prompt_ids, params)  # warm: compiled kernels, allocator, graphs
        sync()
        start = time.perf_counter()  # timed without the profiler, which slows the host side
        engine.generate_ids(prompt_ids, params)
        sync()
        wall = time.perf_counter() - start
        with profile(activities=activities) as prof:
            engine.generate_ids(prompt_ids, params)
            sync()
        runs.append((wall, *_count(prof.events(), cuda), prof))
    (wall_a, work_a, busy_a, _), (wall_b, work_b, busy_b, prof) = runs
    decode_steps = steps[1] - steps[0]
    wall_ms = (wall_b - wall_a) / decode_steps * 1e3
    stats = {"batch_size": len(prompt_ids), "wall_ms_per_step": wall_ms}
    if cuda:
        busy_ms = (busy_b - busy_a) / decode_steps / 1e3
        stats.update(kernels_per_step=(work_b - work_a) / decode_steps, device_busy_ms_per_step=busy_ms,
                     device_idle_fraction=max(0.0, 1 - busy_ms / wall_ms) if wall_ms > 0 else None)
    else:
        stats.update(aten_ops_per_step=(work_b - work_a) / decode_steps, device_busy_ms_per_step=None)
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return stats, prof.key_averages().table(sort_by=sort, row_limit=row_limit)


def _count(events, cuda: bool) -> tuple[int, float]:
    """(device kernels, their summed microseconds) on a GPU; (top-level aten ops, 0) on CPU."""
    if cuda:
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        return len(kernels), float(sum(e.time_range.elapsed_us() for e in kernels))
    top = [e for e in events if e.name.startswith("aten::")
           and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))]
    return len(top), 0.0
