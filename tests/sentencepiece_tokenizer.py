"""A SentencePiece tokenizer (BPE with byte fallback, as Llama-2's and Mistral's) trained offline on GSM8K text."""

import io
from pathlib import Path

import sentencepiece
from transformers import LlamaTokenizer

from sharelora_cli.models.tiny_model import CHAT_TEMPLATE


def build_sentencepiece_tokenizer(out_dir: Path, texts: list[str], vocab_size: int = 1000) -> LlamaTokenizer:
    """Train a SentencePiece model and load it the way a Llama-2 checkpoint's tokenizer.model is loaded."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer.from_pretrained(out_dir)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
