"""Hooks into the libraries users fine-tune with (transformers / TRL callbacks).

Modules here import their optional dependency at import time; ``import lalora_curv`` never
imports this package (the public names are loaded lazily).
"""
