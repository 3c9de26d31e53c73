"""Method name -> Method. Adding a method means adding its file, one line here and its name in recipe.METHOD_NAMES."""

from sharelora_cli.adapters.aslora import ASLORA
from sharelora_cli.adapters.base import Method
from sharelora_cli.adapters.lily import LILY
from sharelora_cli.adapters.lora import LORA
from sharelora_cli.adapters.miss import MISS
from sharelora_cli.adapters.randlora import RANDLORA
from sharelora_cli.adapters.sharelora import SHAREA, SHAREAB, SHAREB
from sharelora_cli.adapters.tied_lora import TIED_LORA
from sharelora_cli.adapters.tinylora import TINYLORA
from sharelora_cli.adapters.unilora import UNILORA
from sharelora_cli.adapters.vblora import VBLORA
from sharelora_cli.adapters.vera import VERA

METHODS: dict[str, Method] = {
    m.name: m
    for m in (LORA, SHAREA, SHAREB, SHAREAB, ASLORA, MISS, VERA, TIED_LORA, VBLORA, LILY, UNILORA, RANDLORA, TINYLORA)
}
