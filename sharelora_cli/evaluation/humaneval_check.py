"""Check one HumanEval sample: the problem's tests run here, the candidate function runs in the sandbox.

human-eval and lm-eval run prompt + completion + test + check(entry_point) as one program, so the completion
shares an interpreter with the tests that judge it: it can exit with status 0 before they run, redefine a
helper they use (poly, encode_cyclic), patch `check` or builtins, read expected values from their frames, or
return an object whose __eq__ is always true. Here the sandbox runs only prompt + completion. The tests and
the prompt's helpers run in this process, from the problem file, against a stand-in for the candidate that
sends the arguments in and receives plain values back (sandbox_wire.py). A pass therefore means that every
call the tests made returned a value the tests accepted; docs/sandbox.md says what that still leaves open.
"""

from collections.abc import Mapping

from sharelora_cli.evaluation.sandbox.session import (
    RESULT_CHARS,
    Isolation,
    Limits,
    Outcome,
    SampleRaised,
    Sandbox,
    SandboxStopped,
    printable,
)
from sharelora_cli.evaluation.sandbox.wire import describe


def check_sample(problem: Mapping[str, str], completion: str, limits: Limits, isolation: Isolation) -> Outcome:
    """Passed, timed out, or failed with a reason; never raises, so one sample cannot cost the others."""
    try:
        with Sandbox(problem["prompt"] + completion, limits, isolation) as sandbox:
            return _run_tests(problem, sandbox)
    except SandboxStopped as stop:
        return Outcome(False, str(stop))
    except Exception as err:  # the evaluator's own trouble (no processes left, a broken problem): this sample alone
        return Outcome(False, printable(f"failed: evaluator error: {describe(err)}"[:RESULT_CHARS]))


def _run_tests(problem: Mapping[str, str], sandbox: Sandbox) -> Outcome:
    tests: dict = {"__name__": "__humaneval_tests__"}
    exec(compile(f"{problem['prompt']}\n\n{problem['test']}\n", f"<{problem['task_id']} tests>", "exec"), tests)
    candidate = sandbox.function(problem["entry_point"])
    tests[problem["entry_point"]] = candidate  # some tests call the function by its name (HumanEval/33)
    try:
        tests["check"](candidate)
        failure = None
    except SampleRaised as err:
        failure = f"failed: {err}"
    except SandboxStopped:
        failure = None  # stop_reason says it
    except Exception as err:
        failure = printable(f"failed: {describe(err)}"[:RESULT_CHARS])
    if sandbox.stop_reason is not None:  # also when a test caught the stand-in's exception and went on
        return Outcome(False, sandbox.stop_reason)
    return Outcome(False, failure) if failure else Outcome(True, "passed")
