"""`python -m eval` (eval/__main__.py): results.json, table, suites and one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from eval.__main__ import main
from eval.suites import parse_suites
from mop.errors import ConfigError
from mop.results import load_results

from .conftest import REPO


@pytest.fixture()
def run_copy(trained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst)
    return dst


def test_ppl_suite_writes_results_beside_the_checkpoint(run_copy, capsys):
    assert main(["--checkpoint", str(run_copy), "--suite", "ppl", "--limit", "6"]) == 0
    doc = load_results(run_copy / "checkpoints" / "step_00000004")
    assert doc["step"] == 4 and doc["run_dir"] == str(run_copy.resolve())
    assert doc["checkpoint"].endswith("step_00000004")
    assert doc["model"]["total_params"] > doc["model"]["active_params"] > 0
    assert doc["ppl"]["num_sequences"] == 6 and doc["ppl"]["loss"] > 0
    assert doc["meta"]["ppl"]["limit"] == 6
    out = capsys.readouterr().out
    assert "ppl/perplexity" in out and "results.json" in out


def _fake_task(calls: list, fail_on: str | None = None):
    """Stands in for eval.tasks.run_suite: one task per call, as eval/__main__ runs them."""
    from eval.tasks import TASKS

    def fake(lm, task, data_dir, limit, num_fewshot=None):
        calls.append((task, data_dir, limit, num_fewshot, lm.max_length))
        if task == fail_on:
            raise KeyboardInterrupt("killed")  # the job dies in the middle of this task
        return {
            task: {
                "category": TASKS[task].category,
                "primary": "acc",
                "score": 0.25,
                "metrics": {"acc": 0.25},
                "n": limit,
                "num_fewshot": 0,
            }
        }

    return fake


def test_benchmark_and_synthetic_suites_merge_into_one_file(
    run_copy, monkeypatch, capsys, tmp_path
):
    import eval.synthetic
    import eval.tasks

    calls = []

    def fake_synthetic(model, tokenizer, data_dir, limit, device, batch_size=64):
        calls.append(("synthetic", str(data_dir), limit, tokenizer.eos_id))
        return {"phonebook": {"book_size": 10, "accuracy": 0.5, "n": limit}}

    monkeypatch.setattr(eval.tasks, "run_suite", _fake_task(calls))
    monkeypatch.setattr(eval.synthetic, "run_synthetic", fake_synthetic)
    step = run_copy / "checkpoints" / "step_00000002"
    bench = tmp_path / "bench"  # eval checks that --benchmark-dir exists before loading
    bench.mkdir()
    args = ["--checkpoint", str(step), "--limit", "3", "--benchmark-dir", str(bench)]
    # math generates 256 tokens by default: more than this 48-token model holds
    assert main([*args, "--suite", "all", "--max-gen-toks", "16"]) == 0
    assert main([*args, "--suite", "synthetic", "--num-fewshot", "2"]) == 0
    every_task = list(eval.tasks.TASKS)  # knowledge, commonsense, math: the suites' order
    assert [c[0] for c in calls] == [*every_task, "synthetic"]
    assert calls[0][1:] == (str(bench), 3, None, 48)
    doc = load_results(step)
    assert doc["step"] == 2 and set(doc["tasks"]) == set(every_task)
    assert doc["categories"] == {"knowledge": 0.25, "commonsense": 0.25, "math": 0.25}
    assert doc["tasks"]["gsm8k"]["settings"]["limit"] == 3
    assert doc["tasks"]["gsm8k"]["meta"]["suite"] == "math"
    assert doc["synthetic"]["phonebook"]["accuracy"] == 0.5 and "ppl" in doc
    assert "category/math" in capsys.readouterr().out


def test_a_killed_benchmark_run_resumes_with_the_tasks_left(run_copy, monkeypatch, capsys):
    import eval.tasks

    step = run_copy / "checkpoints" / "step_00000004"
    args = ["--checkpoint", str(step), "--suite", "knowledge", "--limit", "2"]
    knowledge = list(eval.tasks.SUITES["knowledge"])
    calls: list = []
    monkeypatch.setattr(eval.tasks, "run_suite", _fake_task(calls, fail_on=knowledge[2]))
    assert main(args) != 0  # cli_entry turns the interrupt into one line and an exit code
    assert set(load_results(step)["tasks"]) == set(knowledge[:2])  # written as they finished

    calls.clear()
    monkeypatch.setattr(eval.tasks, "run_suite", _fake_task(calls))
    assert main(args) == 0
    assert [c[0] for c in calls] == knowledge[2:]
    assert "already in results.json" in capsys.readouterr().out
    assert set(load_results(step)["tasks"]) == set(knowledge)

    calls.clear()  # other settings are other results: everything runs again
    assert main([*args[:-1], "3"]) == 0 and [c[0] for c in calls] == knowledge
    calls.clear()
    assert main([*args[:-1], "3", "--redo"]) == 0 and [c[0] for c in calls] == knowledge
    calls.clear()
    assert main([*args[:-1], "3"]) == 0 and calls == []
    assert "knowledge/" in capsys.readouterr().out  # the table of what the file holds


def test_a_generation_longer_than_the_context_stops_before_the_first_task(
    run_copy, monkeypatch, capsys
):
    """--suite knowledge,commonsense,math on a 48-token model: math's 256 generated tokens
    leave no context. One line before any task runs (nothing written), naming the tasks and
    the flag that fits them; with that flag every task runs."""
    import eval.tasks

    calls: list = []
    monkeypatch.setattr(eval.tasks, "run_suite", _fake_task(calls))
    step = run_copy / "checkpoints" / "step_00000004"
    args = ["--checkpoint", str(step), "--suite", "knowledge,commonsense,math", "--limit", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: svamp (max_gen_toks=256), gsm8k (max_gen_toks=256)"), err
    assert "max_seq_len=48, nothing evaluated: pass --max-gen-toks below 48" in err
    assert "\n" not in err and calls == [] and not (step / "results.json").exists()
    assert main([*args, "--max-gen-toks", "40"]) == 0
    assert [c[0] for c in calls] == list(eval.tasks.TASKS)
    # a task's own length (knowledge: 32) is not the flag's: say so
    calls.clear()
    assert main([*args[:3], "triviaqa", "--max-gen-toks", "16", "--redo"]) == 0
    short = ["--checkpoint", str(step), "--suite", "triviaqa", "--redo"]
    monkeypatch.setattr("eval.lm_adapter.MopLM.max_length", property(lambda self: 32))
    assert main(short) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "triviaqa (max_gen_toks=32)" in err and "triviaqa set their own length" in err


def test_parse_suites():
    assert parse_suites("all") == ["ppl", "knowledge", "commonsense", "math"]
    assert parse_suites("ppl, synthetic,ppl") == ["ppl", "synthetic"]
    assert parse_suites("gsm8k,ppl,math") == ["gsm8k", "ppl", "math"]  # single tasks too
    with pytest.raises(ConfigError, match="unknown suite"):
        parse_suites("ppl,trivia")


@pytest.mark.parametrize(
    "case, code, message",
    [
        ("missing", 3, "does not exist"),
        ("half_written", 3, "not complete"),
        ("suite", 2, "unknown suite"),
        ("tokenizer", 3, "sha256"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(run_copy, tmp_path, capsys, case, code, message):
    ckpt = run_copy
    extra: list[str] = []
    suite = "ppl"
    if case == "missing":
        ckpt = tmp_path / "nope"
    elif case == "half_written":
        ckpts = run_copy / "checkpoints"
        shutil.copytree(ckpts / "step_00000004", ckpts / "step_00000009")
        ckpt = ckpts / "step_00000009"
    elif case == "suite":
        suite = "trivia"
    else:
        from data_prep.tokenizer import train_bpe

        from .conftest import corpus

        other = tmp_path / "other"
        train_bpe(corpus(30, seed=3), vocab_size=270).save(other)
        extra = ["--data-dir", str(other)]
    assert main(["--checkpoint", str(ckpt), "--suite", suite, *extra]) == code
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_module_entry_point_runs(run_copy):
    """The real `python -m eval` process: exit code and the one-line error on stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "eval", "--checkpoint", str(run_copy / "x"), "--suite", "ppl"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3 and proc.stderr.startswith("error: checkpoint path does not")


def test_console_shows_task_i_of_n_and_running_scores(run_copy, monkeypatch, capsys):
    import eval.tasks

    knowledge = list(eval.tasks.SUITES["knowledge"])
    scores = iter([0.5, 0.25, 0.0, 1.0, 0.75, 0.5, 0.25])

    def fake(lm, task, data_dir, limit, num_fewshot=None):
        entry = _fake_task([])(lm, task, data_dir, limit, num_fewshot)
        entry[task]["score"] = next(scores)
        return entry

    monkeypatch.setattr(eval.tasks, "run_suite", fake)
    step = run_copy / "checkpoints" / "step_00000004"
    assert main(["--checkpoint", str(step), "--suite", "knowledge", "--limit", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(knowledge)
    starts = [ln for ln in lines if ln.startswith("[eval] task ")]
    assert starts == [
        f"[eval] task {i}/{n} {t} (knowledge) ..." for i, t in enumerate(knowledge, 1)
    ]
    running = [ln for ln in lines if ln.startswith("[eval] running mean: ")]
    assert running[0] == "[eval] running mean: knowledge 0.5000 (1 task); ETA " + running[0][-2:]
    assert running[1].startswith("[eval] running mean: knowledge 0.3750 (2 tasks); ETA ")
    assert running[-1].endswith("ETA 0s") and len(running) == n
