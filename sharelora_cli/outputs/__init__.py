"""What a trained adapter becomes: a merged checkpoint (merge.py) or another adapter format (export.py, and
lora_export.py for any method as one plain LoRA that serving engines load), all reading the saved adapter through
conversion.py. Imports every layer below except training."""
