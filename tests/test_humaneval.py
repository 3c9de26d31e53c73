"""HumanEval scoring on the real problems: canonical solutions pass, wrong ones fail, pass@k is exact."""

import gzip
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from sandbox_support import strong  # noqa: F401 (a fixture)

from sharelora_cli.core.errors import UserError
from sharelora_cli.evaluation.humaneval import (
    STOP_SEQUENCES,
    load_problems,
    pass_at_k,
    read_samples,
    score_samples,
    truncate_completion,
)
from sharelora_cli.evaluation.humaneval_check import check_sample
from sharelora_cli.evaluation.sandbox.session import RESULT_CHARS, Limits, choose_isolation

SHARELORA = Path(sys.executable).parent / "sharelora"


@pytest.fixture(scope="module")
def problems(shared_data):
    return load_problems()


def test_all_164_canonical_solutions_pass_through_the_cli(problems, tmp_path):
    samples = tmp_path / "samples.jsonl"
    samples.write_text(
        "".join(json.dumps({"task_id": t, "completion": p["canonical_solution"]}) + "\n" for t, p in problems.items())
    )
    # A generous timeout: a correct solution must not fail because other jobs share the CPU. A recipe names its
    # model (never loaded here: the samples are given).
    recipe = tmp_path / "recipe.yaml"
    settings = {"humaneval": {"timeout": 10.0}}
    recipe.write_text(
        json.dumps({"model": {"name_or_path": "llama-7b"}, "output_dir": str(tmp_path / "run"), "eval": settings})
    )
    results = tmp_path / "results.json"
    args = [
        "eval",
        str(recipe),
        "--tasks",
        "humaneval",
        "--samples",
        str(samples),
        "--allow-code-execution",
        "--json",
        str(results),
    ]
    done = subprocess.run([str(SHARELORA), *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    document = json.loads(results.read_text())
    assert [(r["task_id"], r["result"]) for r in document["records"]["humaneval"] if not r["passed"]] == []
    assert document["humaneval"] == {
        "pass@1": 1.0,
        "num_tasks": 164,
        "num_samples": 164,
    }  # pass@10 undefined: not reported
    assert not Path(f"{results}.humaneval-progress.jsonl").exists()  # the results file holds every record now


def test_all_164_canonical_solutions_pass_in_each_strong_isolation(problems, strong):
    samples = [{"task_id": task, "completion": problem["canonical_solution"]} for task, problem in problems.items()]
    scores = score_samples(problems, samples, ks=(1,), timeout=10.0, allow_code_execution=True, isolation=strong)
    assert [(r["task_id"], r["result"]) for r in scores["records"] if not r["passed"]] == []


def _problem(test: str, prompt: str = 'def f(x):\n    """The function under test."""\n') -> dict:
    return {"task_id": "Custom/0", "prompt": prompt, "test": test, "entry_point": "f"}


def test_the_tests_run_outside_against_plain_values_from_the_sample(strong):
    # The test reaches the candidate by name too (as HumanEval/33 does), and uses a prompt helper the sample overrides.
    prompt = 'def helper(x):\n    return x + 1\n\ndef f(x):\n    """x + 1"""\n'
    test = "def check(candidate):\n    assert candidate(2) == helper(2) == f(2) == 3\n    assert type(candidate(2)) is int\n"
    limits = Limits(timeout=30)
    assert check_sample(_problem(test, prompt), "    return helper(x)\n", limits, strong) == (True, "passed")
    cheat = "    return 0\ndef helper(x):\n    return -1\n"  # in one shared interpreter, this would pass
    assert check_sample(_problem(test, prompt), cheat, limits, strong) == (False, "failed: AssertionError")
    float_result = "    return 3.0\n"  # equal to 3, but the test insists on the type
    assert check_sample(_problem(test, prompt), float_result, limits, strong) == (False, "failed: AssertionError")


def test_the_candidates_exception_is_the_result_and_a_swallowed_timeout_still_fails(strong):
    limits = Limits(timeout=2)
    raising = check_sample(
        _problem("def check(candidate):\n    candidate(0)\n"), "    raise KeyError('k')\n", limits, strong
    )
    assert raising == (False, "failed: KeyError: 'k'")
    swallowing = "def check(candidate):\n    for _ in range(3):\n        try:\n            candidate(0)\n"
    swallowing += "        except Exception:\n            pass\n"
    assert check_sample(_problem(swallowing), "    while True:\n        pass\n", limits, strong) == (False, "timed out")


def test_wrong_solutions_fail_and_pass_at_k_averages_over_tasks(problems):
    canonical = problems["HumanEval/0"]["canonical_solution"]
    samples = [
        {"task_id": "HumanEval/0", "completion": canonical},
        {"task_id": "HumanEval/0", "completion": "    return False\n"},
        {"task_id": "HumanEval/2", "completion": "    return number\n"},
        {"task_id": "HumanEval/2", "completion": "    return 0.5\n"},
    ]
    scores = score_samples(problems, samples, ks=(1, 2, 10), allow_code_execution=True)
    assert [r["passed"] for r in scores["records"]] == [True, False, False, False]
    assert all(r["result"].startswith("failed: AssertionError") for r in scores["records"][1:])
    assert scores["pass@1"] == pytest.approx((1 / 2 + 0) / 2)
    assert scores["pass@2"] == pytest.approx((1 + 0) / 2)
    assert "pass@10" not in scores
    assert (scores["num_tasks"], scores["num_samples"]) == (2, 4)


def test_scoring_refuses_without_explicit_consent(problems):
    samples = [{"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]}]
    with pytest.raises(UserError, match="without --allow-code-execution"):
        score_samples(problems, samples)


def test_scoring_rejects_unknown_tasks_and_bad_settings(problems):
    with pytest.raises(UserError, match="HumanEval/999"):
        score_samples(problems, [{"task_id": "HumanEval/999", "completion": ""}], allow_code_execution=True)
    sample = [{"task_id": "HumanEval/0", "completion": ""}]
    with pytest.raises(UserError, match="positive integers"):
        score_samples(problems, sample, ks=(0,), allow_code_execution=True)
    with pytest.raises(UserError, match="timeout > 0"):
        score_samples(problems, sample, timeout=0, allow_code_execution=True)


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_the_closed_form(n):
    for c in range(n + 1):
        assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_stays_accurate_for_many_samples():
    exact = 1 - Fraction(math.comb(995, 100), math.comb(1000, 100))
    assert pass_at_k(1000, 5, 100) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(200, 0, 100) == 0.0
    assert pass_at_k(200, 101, 100) == 1.0


def test_pass_at_k_rejects_impossible_counts():
    for n, c, k in [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_truncate_completion_stops_at_the_first_top_level_statement():
    body = "    if x:\n        return 1\n    # keep\n    return 2\n"
    assert truncate_completion(body) == body  # indented if/# belong to the body
    assert truncate_completion(body + "\n\ndef helper():\n    pass\n") == body + "\n"
    assert truncate_completion(body + "\nprint(f(1))\n# note\n") == body
    assert truncate_completion("\nclass A: pass") == ""
    assert STOP_SEQUENCES == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def test_load_problems_reads_plain_jsonl_too(problems, tmp_path):
    plain = tmp_path / "HumanEval.jsonl"
    plain.write_text("".join(json.dumps(problems[t]) + "\n" for t in ("HumanEval/0", "HumanEval/163")))
    assert list(load_problems(plain)) == ["HumanEval/0", "HumanEval/163"]


def test_load_problems_names_a_missing_or_corrupt_file(tmp_path):
    missing = tmp_path / "nowhere.jsonl.gz"
    with pytest.raises(UserError, match="nowhere.jsonl.gz"):
        load_problems(missing)
    corrupt = tmp_path / "corrupt.jsonl.gz"
    corrupt.write_bytes(gzip.compress(b'{"task_id": "HumanEval/0"}\n')[:20])
    with pytest.raises(UserError, match="corrupt.jsonl.gz"):
        load_problems(corrupt)
    incomplete = tmp_path / "incomplete.jsonl.gz"
    incomplete.write_bytes(gzip.compress(b'{"task_id": "HumanEval/0"}\n'))
    with pytest.raises(UserError, match="entry_point"):
        load_problems(incomplete)


def test_read_samples_keeps_several_per_task(problems, tmp_path):
    path = tmp_path / "samples.jsonl"
    rows = [{"task_id": "HumanEval/3", "completion": "    return True\n"}, {"task_id": "HumanEval/3", "completion": ""}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert read_samples(path, problems) == rows


@pytest.mark.parametrize(
    "second_line, message",
    [
        ("{not json", r"samples.jsonl:2: not valid JSON"),
        ('{"task_id": "HumanEval/0"}', r"samples.jsonl:2: .*string completion"),
        ('{"task_id": "HumanEval/400", "completion": ""}', r"samples.jsonl:2: unknown task_id 'HumanEval/400'"),
        ("[1, 2]", r"samples.jsonl:2: .*task_id"),
    ],
)
def test_read_samples_names_file_and_line_of_a_bad_sample(problems, tmp_path, second_line, message):
    path = tmp_path / "samples.jsonl"
    path.write_text(json.dumps({"task_id": "HumanEval/0", "completion": ""}) + "\n" + second_line + "\n")
    with pytest.raises(UserError, match=message):
        read_samples(path, problems)


def test_read_samples_rejects_an_empty_or_missing_file(problems, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl has no samples"):
        read_samples(empty, problems)
    with pytest.raises(UserError, match="absent.jsonl"):
        read_samples(tmp_path / "absent.jsonl", problems)


# Completions whose text would break a file or a terminal: a lone surrogate (from the samples file's "\ud800" and
# in an exception), NUL, terminal escapes, invalid UTF-8 on stdout, and a huge line.
UNRULY = {
    "lone surrogate raised": "    return True\nraise ValueError(chr(0xD800) + 'tail')\n",
    "lone surrogate in the source": "    return True  # \ud800 \x9b[2J \u202e\n",  # and a C1 CSI, a bidi override
    "escapes printed": (
        "    return True\nimport os, sys\nsys.stdout.buffer.write(b'\\x1b]0;owned\\x07\\x1b[2J\\x00\\xff\\xfe' * 50)\n"
        "sys.stdout.flush()\nos._exit(3)\n"
    ),
    "escapes raised": "    return True\nraise RuntimeError('\\x1b[31m\\x00\\u202e' + 'x' * 10**6)\n",
}


def _strict_json_lines(raw: bytes) -> list:
    """JSON values, one per line, from bytes that must be valid UTF-8 and hold no lone surrogate."""
    values = [json.loads(line) for line in raw.decode("utf-8").splitlines()]
    json.dumps(values, ensure_ascii=False).encode("utf-8")  # UnicodeEncodeError on a lone surrogate
    return values


def _control_free(text: str) -> bool:
    return not any((ord(char) < 32 and char not in "\n\t") or 0x7F <= ord(char) <= 0x9F for char in text)


def test_text_from_a_sample_never_breaks_the_progress_file_and_the_run_goes_on(problems, tmp_path):
    canonical = {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]}
    samples = [{"task_id": "HumanEval/0", "completion": text} for text in UNRULY.values()] + [canonical]
    progress = tmp_path / "progress.jsonl"
    scores = score_samples(problems, samples, ks=(1,), timeout=10.0, allow_code_execution=True, progress_file=progress)
    logged = _strict_json_lines(progress.read_bytes())
    assert "\x9b".encode() not in progress.read_bytes() and "\u202e".encode() not in progress.read_bytes()
    assert sorted(record["result"] for record in logged) == sorted(record["result"] for record in scores["records"])
    results = dict(zip([*UNRULY, "canonical"], (record["result"] for record in scores["records"])))
    assert results["canonical"] == "passed"
    assert results["lone surrogate raised"] == "failed: ValueError: \ufffdtail"
    assert results["escapes printed"].startswith("failed: exited with code 3 before finishing (\ufffd]0;owned\ufffd")
    assert results["escapes raised"] == "failed: RuntimeError: \ufffd[31m\ufffd\ufffd" + "x" * 279
    longest = len("failed: exited with code 3 before finishing ()") + RESULT_CHARS
    assert all(_control_free(result) and len(result) <= longest for result in results.values()), results


def test_text_from_a_sample_never_breaks_the_results_json_or_the_console(problems, tmp_path):
    canonical = {"task_id": "HumanEval/0", "completion": problems["HumanEval/0"]["canonical_solution"]}
    samples = tmp_path / "samples.jsonl"
    lines = [json.dumps({"task_id": "HumanEval/0", "completion": text}) for text in UNRULY.values()]
    samples.write_text("\n".join([*lines, json.dumps(canonical)]) + "\n")
    results = tmp_path / "results.json"
    args = ["eval", "--tasks", "humaneval", "--samples", str(samples), "--allow-code-execution", "--json", str(results)]
    done = subprocess.run([str(SHARELORA), *args], capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert _control_free(done.stdout.decode("utf-8")) and b"\x1b" not in done.stderr and b"\x00" not in done.stderr
    (document,) = _strict_json_lines(results.read_bytes().replace(b"\n", b""))
    sandbox = choose_isolation(allow_weak=False).value
    assert f"humaneval sandbox: {sandbox}" in done.stdout.decode().splitlines()  # said even with no progress bar
    assert document["config"]["settings"] == {"humaneval": {"sandbox": sandbox}} and "sandbox" not in document
    assert document["humaneval"]["pass@1"] == pytest.approx(1 / 5)
    records = document["records"]["humaneval"]
    assert records[1]["completion"] == "    return True  # \ufffd \x9b[2J \u202e\n"  # the file's lone "\ud800"
    assert "\x9b".encode() not in results.read_bytes() and "\u202e".encode() not in results.read_bytes()  # escaped
    assert [record["passed"] for record in records] == [False, False, False, False, True]
