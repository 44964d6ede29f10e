"""The five pipeline stages: synth -> quantize -> export -> compile -> verify.

Each stage is a function that reads the previous stage's folder and writes its own,
with a manifest; the CLI subcommands and the one-shot pipeline call these functions.
"""
