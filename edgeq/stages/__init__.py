"""The five pipeline stages: synth -> quantize -> export -> compile -> verify.

Each stage is a function that reads the previous stage's folder and writes its own,
with a manifest; the CLI subcommands and the one-shot pipeline call these functions.
Only the pipeline, the sweep and the CLI import stage modules: what stages share lives in
library modules (:mod:`edgeq.quantized`, :mod:`edgeq.qdq`, :mod:`edgeq.folders`,
:mod:`edgeq.data`), and no stage imports another but the sweep, which runs the pipeline
(``tests/test_layout.py`` checks it).
"""
