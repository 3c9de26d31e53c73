"""The HumanEval sandbox: session.py (the parent side), child.py (run by file path inside the namespaces, with
namespaces.py and wire.py imported from beside it), plan.py (what the child sees), wire.py (the plain-data
frames between them) and cleanup.py. Standard library and core only: the child starts once per sample."""
