"""`python -m sharelora_cli` runs the CLI (used by `accelerate launch -m sharelora_cli`)."""

from sharelora_cli.cli import main

main()
