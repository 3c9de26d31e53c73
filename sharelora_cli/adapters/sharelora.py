"""ShareLoRA: LoRA layers whose A and/or B is one parameter shared by every layer of a module type."""

from sharelora_cli.adapters.base import Method
from sharelora_cli.adapters.lora import LoraLayer

SHAREA = Method("sharea", LoraLayer, frozenset({"lora_A"}), "A shared across layers, B per layer")
SHAREB = Method("shareb", LoraLayer, frozenset({"lora_B"}), "A per layer, B shared across layers")
SHAREAB = Method("shareab", LoraLayer, frozenset({"lora_A", "lora_B"}), "A and B shared across layers")
