"""Build the tiny offline Llama model + BPE tokenizer used by the quickstart and the tests.

Usage: python scripts/make_tiny_model.py [OUT_DIR] (default artifacts/tiny-llama)
"""

import sys
from pathlib import Path

from sharelora_cli.tiny_model import build_tiny_model

if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts/tiny-llama")
    print(f"tiny model written to {build_tiny_model(out)}")
