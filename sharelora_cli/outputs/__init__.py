"""What a trained adapter becomes: a merged checkpoint (merge.py) or another adapter format (export.py), both
reading the saved adapter through conversion.py. Imports every layer below except training."""
