"""What every rollout engine takes and returns."""

from __future__ import annotations

from dataclasses import astuple, dataclass, field


@dataclass
class SamplingParams:
    n: int = 1  # samples per prompt
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling threshold (1.0 = off)
    top_k: int = 0  # top-k sampling (0 = off)
    max_new_tokens: int = 64  # response length cap
    stop_token_ids: list[int] = field(default_factory=list)  # generation stops after any of these (EOS is added)
    stop_strings: list[str] = field(default_factory=list)  # ... or once the response text contains any of these
    ignore_eos: bool = False  # keep generating after EOS / stop tokens (benchmarks: fixed lengths)
    seed: int | None = None  # same seed, same prompts -> same samples


@dataclass
class Sample:
    """One generated response.

    `logprobs[i]` is the log-probability of `token_ids[i]` under the distribution the trainer optimises:
    the model's softmax after temperature scaling and before top-p / top-k truncation (raw logits when
    greedy). `finish_reason` is "stop" (a stop token was generated, and is the last of `token_ids`) or
    "length" (max_new_tokens reached).
    """

    prompt_index: int  # index of the prompt in the `generate` call
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str = ""  # decoded response (special tokens dropped)
    policy_version: int = 0  # weight version that generated it


@dataclass
class GenerateStats:
    """What m2flow's engine did in one `generate` call (calls add up with +); the RL runner logs
    `metrics()` each step."""

    prompt_tokens: int = 0  # of all sequences (each of a prompt's n samples counts it)
    prefill_tokens: int = 0  # tokens the model computed in prefill steps (preempted sequences count again)
    forks: int = 0  # sequences that copied the prompt's KV of another sample instead of computing it
    preemptions: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # sequences decoded, summed over the decode steps
    seconds: float = 0.0  # inside the engine (summed over engine replicas); time/rollout adds transfers and batching

    def __add__(self, other: "GenerateStats") -> "GenerateStats":
        return GenerateStats(*(a + b for a, b in zip(astuple(self), astuple(other))))

    def metrics(self) -> dict[str, float]:
        return {
            # below 1: prefixes shared (the n samples of a prompt compute it once); above 1: recomputation
            "rollout/prefill_compute_frac": self.prefill_tokens / max(self.prompt_tokens, 1),
            "rollout/preemptions": float(self.preemptions),  # > 0: the KV cache is too small for the batch
            "rollout/decode_steps": float(self.decode_steps),
            "rollout/decode_batch_mean": self.decode_rows / max(self.decode_steps, 1),
            "rollout/engine_seconds": self.seconds,
        }
