"""Adapter methods: one file each, one common interface (base.py)."""
