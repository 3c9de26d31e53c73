"""One training example as text with its trained tokens marked, so a user sees what the loss is computed on."""

from itertools import groupby

from sharelora_cli.data.examples import IGNORE_INDEX, Example

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


def marked_text(example: Example, tokenizer) -> str:
    """The example's tokens decoded (special tokens kept), each run of trained tokens between [[ and ]]."""
    pieces = []
    pairs = zip(example.input_ids, example.labels)
    for trained, run in groupby(pairs, key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run], skip_special_tokens=False)
        pieces.append(f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text)
    return "".join(pieces)


def example_view(example: Example, tokenizer, what: str) -> str:
    """A header naming the example (what: e.g. 'the first of step 1') and counting its trained tokens, then the text."""
    trained = sum(label != IGNORE_INDEX for label in example.labels)
    row = f"data row {example.row + 1}, " if example.row is not None else ""
    header = (
        f"example ({row}{what}): {trained} of {len(example.input_ids)} tokens trained, "
        f"marked {TRAINED_OPEN} ... {TRAINED_CLOSE}"
    )
    return f"{header}\n{marked_text(example, tokenizer)}"
