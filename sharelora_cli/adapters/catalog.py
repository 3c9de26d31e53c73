"""`sharelora methods`: every registered method in one line: what it shares or trains and the recipe key that sizes it.

Read from the registry and the size knobs, so a method added there is listed without touching the command.
"""

from dataclasses import asdict, dataclass

from sharelora_cli.adapters.registry import METHODS
from sharelora_cli.adapters.size_knobs import knob_of


@dataclass(frozen=True)
class MethodEntry:
    method: str
    summary: str
    # The recipe key whose value sets the trainable-parameter count (adapter.rank for most methods).
    size_key: str
    # The method's own recipe section, if it has one (adapter.vera, ...).
    settings_key: str | None


def method_entries() -> list[MethodEntry]:
    return [
        MethodEntry(
            name,
            method.summary,
            f"adapter.{knob_of(name).path}",
            f"adapter.{method.settings}" if method.settings else None,
        )
        for name, method in METHODS.items()
    ]


def format_methods(entries: list[MethodEntry]) -> str:
    """One aligned line per method: its name, the key that sizes it, what it shares or trains."""
    name_width = max(len(entry.method) for entry in entries) + 2
    key_width = max(len(entry.size_key) for entry in entries) + 2
    header = f"{'method':<{name_width}}{'size key':<{key_width}}what it shares or trains"
    rows = [f"{entry.method:<{name_width}}{entry.size_key:<{key_width}}{entry.summary}" for entry in entries]
    return "\n".join([header, *rows])


def methods_json(entries: list[MethodEntry]) -> list[dict]:
    return [asdict(entry) for entry in entries]
