"""How far an adapter trained on a 4-bit base moves when it is served on the full-precision base instead.

A serving engine given `--format lora` output applies the adapter to whatever base it loads. An adapter
trained under `quantization.load_in_4bit` saw W_nf4, not W: on a bf16 or fp32 base the model differs by the
quantisation error. This script measures that gap on the tiny Llama (random weights, BPE tokenizer trained on
GSM8K; random non-zero LoRA factors on all seven projections) over real GSM8K questions: the adapter on the
NF4 base (fp32 compute, the reference: the model training saw) against the same adapter on the fp32 and bf16
bases, as max |Δlogit|, mean |Δlogit|, the mean KL divergence of the next-token distribution and how often the
top-1 token agrees.

    .venv/bin/python scripts/serving_base_gap.py [--questions 16] [--json OUT]
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from sharelora_cli.adapters.adapter_io import load_adapter, save_adapter
from sharelora_cli.adapters.inject import inject_adapter
from sharelora_cli.config.recipe import AdapterConfig, ModelConfig, QuantizationConfig
from sharelora_cli.core.paths import data_dir
from sharelora_cli.models.loading import load_model
from sharelora_cli.models.tiny_model import build_tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = QuantizationConfig(load_in_4bit=True, compute_dtype="float32")


def questions(count: int) -> list[str]:
    rows = (data_dir() / "gsm8k" / "test.jsonl").read_text().splitlines()[:count]
    return [json.loads(row)["question"] for row in rows]


def forward(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**batch).logits.float()


def adapted_logits(model, adapter_dir: Path, batch) -> torch.Tensor:
    load_adapter(model, adapter_dir)
    return forward(model, batch)


def compare(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> dict:
    keep = mask.bool()
    ref, oth = reference[keep], other[keep]
    kl = F.kl_div(F.log_softmax(oth, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    return {
        "max_abs_logit_diff": float((ref - oth).abs().max()),
        "mean_abs_logit_diff": float((ref - oth).abs().mean()),
        "mean_kl": float(kl.mean()),
        "top1_agreement": float((ref.argmax(-1) == oth.argmax(-1)).float().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serving-gap-"))
    base_dir = build_tiny_model(work / "tiny-llama")
    trained_on = load_model(ModelConfig(name_or_path=str(base_dir)), NF4, torch.device("cpu"))
    adapter = inject_adapter(trained_on, AdapterConfig(method="lora", rank=8, alpha=16, targets=TARGETS))
    torch.manual_seed(1)
    with torch.no_grad():
        for factor in adapter.parameters():
            factor.normal_(0, 0.05)
    save_adapter(adapter, work / "adapter", base_model=str(base_dir), extra={"quantization": NF4.model_dump()})
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = tokenizer(questions(args.questions), return_tensors="pt", padding=True)
    reference = forward(trained_on, batch)
    rows = {"tokens": int(batch["attention_mask"].sum()), "logit_std": float(reference.std())}
    for name, dtype in (("fp32 base", torch.float32), ("bf16 base", torch.bfloat16)):
        served = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
        rows[name] = compare(reference, adapted_logits(served, work / "adapter", batch), batch["attention_mask"])
    nf4_again = load_model(ModelConfig(name_or_path=str(base_dir)), NF4, torch.device("cpu"))
    rows["nf4 base"] = compare(reference, adapted_logits(nf4_again, work / "adapter", batch), batch["attention_mask"])
    print(json.dumps(rows, indent=2))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
