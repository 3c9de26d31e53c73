"""The eval engine on the tiny model: left padding changes nothing, scores equal plain forward passes."""

import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sharelora_cli.evaluation.engine import Engine, cut_at_stop
from sharelora_cli.evaluation.perplexity import windows


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny-model ops are too small to gain from threads, and on a shared CPU extra threads stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def questions(shared_data) -> list[str]:
    rows = [json.loads(line) for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:6]]
    return [f"Question: {row['question']}\nAnswer:" for row in rows]


@pytest.fixture(params=["llama", "gpt2"])
def model(request, tiny_model, tokenizer):
    """The tiny Llama (rotary positions) and a tiny GPT-2, whose learned absolute positions break if padding shifts them."""
    if request.param == "llama":
        return tiny_model
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=512, n_embd=64, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_left_padded_batched_greedy_equals_one_by_one(model, tokenizer, questions):
    lengths = {len(tokenizer(q)["input_ids"]) for q in questions}
    assert len(lengths) >= 5  # rows really are padded by different amounts
    batched = Engine(model, tokenizer, batch_size=6, max_length=512).generate(questions, [], max_new_tokens=48)
    single = Engine(model, tokenizer, batch_size=1, max_length=512).generate(questions, [], max_new_tokens=48)
    assert batched == single
    assert all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= 40 for text in single)
    # One-by-one is itself plain greedy decoding: the first question's argmax chain, by hand.
    ids = tokenizer(questions[0])["input_ids"]
    for _ in range(48):
        ids.append(int(forward_logprobs(model, ids)[-1].argmax()))
    assert tokenizer.decode(ids[-48:], skip_special_tokens=True) == single[0]


def test_generation_stops_at_stop_string(tiny_model, tokenizer, questions):
    engine = Engine(tiny_model, tokenizer, batch_size=5, max_length=1024)
    free = engine.generate(questions, [], max_new_tokens=24)
    stop = free[0][len(free[0]) // 2 :][:3]
    stopped = engine.generate(questions, [stop], max_new_tokens=24)
    assert stopped[0] == free[0][: free[0].index(stop)]
    assert all(s == cut_at_stop(f, [stop]) for s, f in zip(stopped, free))


def test_loglikelihood_equals_unpadded_forward(model, tokenizer, questions):
    pairs = [(q, cont) for q in questions for cont in (" A", " 42", " She sold 16 eggs.")]
    scores = Engine(model, tokenizer, batch_size=4, max_length=512).loglikelihood(pairs)
    assert len({score.logprob for score in scores}) == len(pairs)
    for (context, continuation), score in zip(pairs, scores):
        whole = tokenizer(context + continuation)["input_ids"]
        start = len(tokenizer(context)["input_ids"])
        logprobs = forward_logprobs(model, whole)
        expected = sum(logprobs[i - 1, whole[i]].item() for i in range(start, len(whole)))
        assert score.logprob == pytest.approx(expected, abs=1e-4)
        assert score.greedy == all(logprobs[i - 1].argmax() == whole[i] for i in range(start, len(whole)))


def test_loglikelihood_cuts_long_context_from_the_left(tiny_model, tokenizer, questions):
    context, continuation = (
        tokenizer(questions[1])["input_ids"],
        tokenizer(" 42", add_special_tokens=False)["input_ids"],
    )
    (score,) = Engine(tiny_model, tokenizer, batch_size=2, max_length=16).loglikelihood_tokens(
        [(context, continuation)]
    )
    window = (context + continuation)[-17:]
    logprobs = forward_logprobs(tiny_model, window[:-1])
    expected = sum(logprobs[-len(continuation) + i, token].item() for i, token in enumerate(continuation))
    assert score.logprob == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    "num_tokens,max_length,stride", [(1, 8, 8), (2, 8, 8), (50, 8, 8), (50, 8, 3), (17, 16, 16), (100, 32, 1)]
)
def test_windows_score_every_token_once_within_max_length(num_tokens, max_length, stride):
    spans = windows(num_tokens, max_length, stride)
    scored = [t for _, first, end in spans for t in range(first, end)]
    assert scored == list(range(1, num_tokens))
    assert all(end - 1 - start <= max_length and start < first for start, first, end in spans)
    assert all(first - start >= min(first, max_length - stride) for start, first, _ in spans)


def test_perplexity_equals_model_loss_when_documents_fit(tiny_model, tokenizer, shared_data):
    from sharelora_cli.config.recipe import PerplexityTaskConfig
    from sharelora_cli.evaluation import perplexity

    cfg = PerplexityTaskConfig(path=str(shared_data / "gsm8k" / "test.jsonl"), field="answer")
    result = perplexity.evaluate(Engine(tiny_model, tokenizer, batch_size=3, max_length=1024), cfg, limit=3)
    texts = [json.loads(line)["answer"] for line in (shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]]
    total_nll, total_tokens = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            loss = tiny_model(ids, labels=ids).loss.item()
        total_nll += loss * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1
    assert result.metrics["num_tokens"] == total_tokens and result.metrics["num_documents"] == 3
    assert result.metrics["nll_per_token"] == pytest.approx(total_nll / total_tokens, rel=1e-5)
    assert result.metrics["token_perplexity"] == pytest.approx(
        torch.tensor(total_nll / total_tokens).exp().item(), rel=1e-5
    )
    chunked = perplexity.evaluate(Engine(tiny_model, tokenizer, batch_size=3, max_length=16), cfg, limit=3)
    assert chunked.metrics["num_tokens"] == total_tokens
    assert chunked.metrics["nll_per_token"] != pytest.approx(result.metrics["nll_per_token"], rel=1e-4)
