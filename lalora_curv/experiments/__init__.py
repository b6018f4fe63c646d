"""Experiment code: offline data (WordNet, pydoc, reasoning-gym), model loading (SmolLM2 GGUF,
tiny Llamas), scoring and the demo pipeline.

Used by the CLI, the benchmarks and the tests; the core (everything else under ``lalora_curv``)
never imports it, so ``import lalora_curv`` stays free of these dependencies.
"""
