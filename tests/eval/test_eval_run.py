"""`m2flow eval` on a micro model: results.jsonl, resuming, and agreement with the training runner's evaluation."""

from __future__ import annotations

import json
import os

import pytest
import torch

from m2flow.eval.benchmarks import load_benchmark, synthetic_mc
from m2flow.eval.run import EvalError, ModelSpec, Protocol, Results, run_eval, score

SFT_STEPS = 150  # on 16 held-out problems: the micro model then answers about 3 of them right (not 0, not all)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_micro_model, micro_config, tokenizer) -> str:
    """A micro model fitted to the bare answers of the first 16 synthetic_math problems, saved as an HF directory."""
    from m2flow.data.templates import format_prompt
    from m2flow.training.checkpoint import save_hf_checkpoint
    from m2flow.training.sft import sft_train

    model = make_micro_model(seed=0)
    pairs = [(format_prompt(p.question, tokenizer), f"\\boxed{{{p.answer}}}")
             for p in load_benchmark("synthetic_math", num_problems=16).problems]
    sft_train(model, tokenizer, pairs, steps=SFT_STEPS, batch_size=16, lr=1e-2, seed=0, warmup=10, progress=False)
    return save_hf_checkpoint(str(tmp_path_factory.mktemp("eval") / "micro"), micro_config, model.state_dict(),
                              tokenizer)


def read_rows(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "results.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_multiple_choice_scoring_of_a_formatted_problem() -> None:
    p = synthetic_mc()[0]
    wrong = next(letter for letter in "ABCD" if letter != p.answer)
    assert score("multiple_choice", f"so \\boxed{{{p.answer}}}", p.answer) == (p.answer, 1.0)
    assert score("multiple_choice", f"Answer: ({wrong.lower()})", p.answer) == (wrong, 0.0)
    assert score("multiple_choice", f"\\boxed{{{p.meta['value']}}}", p.answer) == (None, 0.0)  # a number, no letter
    assert score("math", "\\boxed{1{,}234.}", "1,234") == ("1{,}234.", 1.0)


def test_protocol_defaults_and_greedy() -> None:
    p = Protocol()
    assert (p.k, p.temperature, p.top_p, p.max_new_tokens) == (8, 0.6, 0.95, 32768)
    g = Protocol.greedy(max_new_tokens=16)
    assert (g.k, g.temperature, g.top_p, g.max_new_tokens) == (1, 0.0, 1.0, 16)
    with pytest.raises(EvalError, match="use k=1"):
        Protocol(k=4, temperature=0.0)


def test_model_names(tmp_path, model_dir) -> None:
    assert ModelSpec.parse(f"base={model_dir}") == ModelSpec("base", model_dir)
    assert ModelSpec.parse(model_dir + "/") == ModelSpec(model_dir, model_dir + "/")
    with pytest.raises(EvalError, match="is not an HF model directory"):
        ModelSpec.parse(str(tmp_path))


def test_results_are_resumed_not_redone(tmp_path, model_dir) -> None:
    torch.manual_seed(0)
    out = str(tmp_path / "out")
    models = [ModelSpec("micro", model_dir)]
    benchmarks = [load_benchmark("synthetic_math", num_problems=6), load_benchmark("synthetic_mc", num_problems=6)]
    protocol = Protocol(k=2, max_new_tokens=8, batch_size=8)  # 4 problems per generate call

    first = run_eval(models, benchmarks, protocol, out, progress=False)
    assert first.new_samples == 2 * 6 * 2 and first.counts == {"micro/synthetic_math": 12, "micro/synthetic_mc": 12}
    rows = read_rows(out)
    assert len(rows) == 24
    assert set(rows[0]) == {"model", "benchmark", "problem_id", "sample", "response", "answer", "ground_truth",
                            "score", "correct", "finish_reason", "response_tokens"}
    assert sorted((r["benchmark"], r["problem_id"], r["sample"]) for r in rows) == sorted(
        (b, str(i), j) for b in ("synthetic_math", "synthetic_mc") for i in range(6) for j in range(2))
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    mc = [r for r in rows if r["benchmark"] == "synthetic_mc"]
    assert table["table"]["avg"]["micro"]["synthetic_mc"] == pytest.approx(sum(r["correct"] for r in mc) / 12)
    for name in ("table.csv", "table.md", "table.png", "protocol.json"):
        assert os.path.isfile(os.path.join(out, name)), name

    second = run_eval(models, benchmarks, protocol, out, progress=False)
    assert second.new_samples == 0 and second.skipped_problems == 12
    assert json.loads((tmp_path / "out" / "table.json").read_text()) == table
    assert read_rows(out) == rows

    # a run killed in its last batch: that batch's rows are missing and a line was cut off mid-write
    lost = [r for r in rows if r["benchmark"] == "synthetic_mc" and r["problem_id"] in ("4", "5")]
    kept = [r for r in rows if r not in lost]
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in kept) + json.dumps(lost[0])[:30])
    third = run_eval(models, benchmarks, protocol, out, progress=False)
    assert third.counts == {"micro/synthetic_mc": 4}  # two problems, k=2 each
    assert read_rows(out)[:len(kept)] == kept
    assert sorted(read_rows(out)[len(kept):], key=str) == sorted(lost, key=str)  # the samples the first run drew
    assert json.loads((tmp_path / "out" / "table.json").read_text()) == table

    with pytest.raises(EvalError, match=r"another protocol \(k: 2 there, 4 now\)"):
        run_eval(models, benchmarks, Protocol(k=4, max_new_tokens=8), out, progress=False)


def test_results_file_cuts_a_truncated_line(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    row = {"model": "m", "benchmark": "b", "problem_id": "0", "sample": 0, "correct": True}
    path.write_text(json.dumps(row) + "\n" + '{"model": "m", "bench')
    results = Results(str(path))
    assert results.done("m", "b", "0", 1) and not results.done("m", "b", "0", 2)
    assert path.read_text() == json.dumps(row) + "\n"



def test_eval_greedy_gives_the_accuracy_of_the_runners_evaluation(tmp_path, model_dir) -> None:
    """`m2flow eval --greedy` on synthetic_math == m2flow.eval.evaluate as the training runner calls it (its
    held-out problems, prompts, rollout worker and greedy sampling), response by response."""
    from m2flow.cli import main
    from m2flow.config import load_config
    from m2flow.data.templates import format_prompt
    from m2flow.eval import evaluate
    from m2flow.rollout import SamplingParams
    from m2flow.data.task import load_task
    from m2flow.scheduler.workers import RolloutWorker, Start

    cfg = load_config(None, ["eval.num_problems=16", "eval.max_new_tokens=16"])
    held_out = load_task(cfg).held_out[: cfg.eval.num_problems]
    worker = RolloutWorker(Start.of(model_dir, cfg), cfg.rollout, threads=1)
    prompts = [format_prompt(p.question, worker.engine.tokenizer, cfg.data.template) for p in held_out]
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens)
    expected = evaluate(worker.generate, held_out, prompts, greedy, num_examples=len(held_out))
    assert 0 < expected.accuracy < 1  # the micro model gets some right, so the comparison means something

    out = tmp_path / "out"
    assert main(["eval", "--models", f"micro={model_dir}", "--benchmarks", "synthetic_math", "--greedy",
                 "--num-problems", "16", "--max-new-tokens", "16", "--out-dir", str(out), "--no-progress"]) == 0
    table = json.loads((out / "table.json").read_text())
    assert table["table"]["avg"]["micro"]["synthetic_math"] == expected.accuracy
    assert table["cells"]["micro"]["synthetic_math"]["problems"] == 16
    rows = sorted(read_rows(out), key=lambda r: int(r["problem_id"]))
    assert [r["response"] for r in rows] == [e["response"] for e in expected.examples]
    assert [r["correct"] for r in rows] == [e["correct"] for e in expected.examples]
    assert (out / "table.csv").read_text().splitlines()[1] == f"micro,{100 * expected.accuracy:.2f},{100 * expected.accuracy:.2f}"


def test_cli_errors(tmp_path, model_dir, capsys) -> None:
    from m2flow.cli import main

    assert main(["eval", "--models", model_dir, "--benchmarks", "aime24", "--out-dir", str(tmp_path)]) == 2
    assert "m2flow eval: benchmark 'aime24' is read from a file: give --data-dir" in capsys.readouterr().err
    assert main(["eval", "--models", model_dir, "--benchmarks", "aime2", "--out-dir", str(tmp_path)]) == 2
    assert "unknown benchmark 'aime2'; valid names: aime24" in capsys.readouterr().err
    assert main(["eval", "--models", str(tmp_path), "--out-dir", str(tmp_path)]) == 2
    assert "not an HF model directory" in capsys.readouterr().err


def test_help_names_every_benchmark(capsys) -> None:
    from m2flow.cli import main
    from m2flow.eval.benchmarks import BENCHMARKS

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in BENCHMARKS:
        assert name in text
    for option in ("--models", "--benchmarks", "--k", "--data-dir", "--greedy", "--temperature", "--top-p",
                   "--max-new-tokens", "--num-problems", "--out-dir"):
        assert option in text
