"""Generated sections of hand-written docs: a study script rewrites only the text between its two markers."""

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def replace_section(path: Path, name: str, body: str, title: str) -> None:
    """Put body between name's markers in path, keeping the text around them; a new file gets the title."""
    begin, end = markers(name)
    text = path.read_text() if path.is_file() else f"# {title}\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{begin}\n\n{body}\n\n{end}{rest.split(end, 1)[1]}")
