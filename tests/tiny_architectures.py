"""Tiny random models built from a config in code, for architectures the session fixture does not cover."""

import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def load_tiny_llama(model_dir) -> torch.nn.Module:
    """Another copy of the session's tiny Llama (hidden 128, ffn 320, 4 layers, k/v width 64)."""
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 with Conv1D projections: c_attn 64→192, attn.c_proj 64→64, c_fc 64→256, mlp.c_proj 256→64."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=3, n_head=4)
    return GPT2LMHeadModel(config).eval()


def narrow_llama(seed: int = 0) -> LlamaForCausalLM:
    """A Llama with the tiny model's module names but hidden size 64: same paths, other shapes."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()
