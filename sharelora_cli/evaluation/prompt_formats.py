"""GSM8K questions put to a model in the prompt format it was trained in (eval.prompt_format: train).

A model fine-tuned on alpaca or chat data answers in that format; lm-evaluation-harness's "Question: ...\\nAnswer:"
prompt scores it on one it never saw. Here the question becomes a training example's prompt, rendered as
data/examples.py renders it (ALPACA_PROMPT with the question as the instruction; the tokenizer's chat template
with the question as the user turn), and the shots become earlier examples with their worked solutions: whole
examples separated by a blank line for alpaca, earlier turns of the conversation for chat (lm-evaluation-harness's
fewshot_as_multiturn). A model trained on the gsm8k format was trained on the harness's prompt itself.
"""

from functools import partial

from sharelora_cli.core.errors import UserError
from sharelora_cli.data.examples import alpaca_prompt as instruction  # one training example's prompt
from sharelora_cli.evaluation.gsm8k import HARNESS, STOP_SEQUENCES, PromptFormat

# A model that runs on past its answer starts the next example's instruction.
ALPACA_STOP = "### Instruction:"


def chosen(prompt_format: str, data_format: str | None, tokenizer) -> PromptFormat:
    """eval.prompt_format's prompts; data_format: the data.format the model was trained on, if known."""
    if prompt_format == "harness":
        return HARNESS
    if data_format is None:
        raise UserError(
            "eval.prompt_format=train needs the data format the model was trained on: give --adapter DIR "
            "(or the RECIPE that trained it), or use eval.prompt_format=harness"
        )
    return in_data_format(data_format, tokenizer)


def in_data_format(data_format: str, tokenizer) -> PromptFormat:
    if data_format == "gsm8k":
        return HARNESS
    if data_format == "alpaca":
        return PromptFormat(alpaca_prompt, [*STOP_SEQUENCES, ALPACA_STOP])
    if data_format == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(
                "eval.prompt_format=train: the model was trained on chat data but its tokenizer has no chat template"
            )
        return PromptFormat(partial(chat_prompt, tokenizer), STOP_SEQUENCES, special_tokens=False)
    raise UserError(
        f"eval.prompt_format=train: the model was trained on data.format={data_format}, which has no prompt "
        "format; use eval.prompt_format=harness"
    )


def alpaca_prompt(question: str, shots: list[dict]) -> str:
    examples = "".join(f"{instruction(shot['question'])}{shot['answer']}\n\n" for shot in shots)
    return examples + instruction(question)


def chat_prompt(tokenizer, question: str, shots: list[dict]) -> str:
    turns = [
        turn
        for shot in shots
        for turn in ({"role": "user", "content": shot["question"]}, {"role": "assistant", "content": shot["answer"]})
    ]
    messages = [*turns, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
