"""Shared by the sandbox tests: which isolations this machine offers, and how a hostile sample disables the guard."""

import functools
import os
import secrets
import textwrap

import pytest

from sharelora_cli.evaluation.sandbox.session import Isolation, isolation_problem

STRONG = (Isolation.BWRAP, Isolation.KERNEL)

# What a hostile sample runs first: find the audit hook's object and make it a no-op, then prove it is off by
# loading libc through ctypes and reading /proc/self/status, both of which the guard refuses. Everything after
# this meets only what the kernel enforces.
DISABLE_GUARD = textwrap.dedent(
    """
    import ctypes, gc
    for _hook in gc.get_objects():
        if type(_hook).__name__ == "_Guard":
            type(_hook).__call__ = lambda self, event, args: None
    libc = ctypes.CDLL(None, use_errno=True)
    open("/proc/self/status").read()
    """
)


@functools.cache
def _problem(isolation: Isolation) -> str | None:
    return isolation_problem(isolation)


def require(isolation: Isolation) -> Isolation:
    """The isolation, or a skip that says why this machine cannot provide it."""
    problem = _problem(isolation)
    if problem is not None:
        pytest.skip(f"{isolation.value} isolation is not available here: {problem}")
    return isolation


@pytest.fixture(params=STRONG, ids=lambda isolation: isolation.value)
def strong(request) -> Isolation:
    """Each isolation that builds namespaces, skipped with the reason where this machine cannot."""
    return require(request.param)


def marker() -> str:
    """A name no other process or file has; short enough to be a whole process name (15 characters)."""
    return f"sl{secrets.token_hex(6)}"


def hostile(body: str, attack: str) -> str:
    """A completion: the correct function body, then top-level code that disables the guard and attacks."""
    return body + "\n\n" + DISABLE_GUARD + textwrap.dedent(attack)


def processes_named(name: str) -> list[int]:
    """Host processes whose name or command line contains name."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm", "rb") as comm, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if name.encode() in comm.read() + cmdline.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found
