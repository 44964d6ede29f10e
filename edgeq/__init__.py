"""edgeq: ship a trained vision model to an edge CPU at 2-bit weights and 4-bit activations.

The pipeline is five stages, each a function here, a CLI subcommand and a folder on disk::

    synth -> quantize -> export -> compile -> verify

``edgeq.run`` chains them into one run folder, reusing stages whose inputs are unchanged.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import EdgeqError
from .spec import Observer, QuantSpec

__all__ = ["EdgeqError", "Observer", "QuantSpec", "__version__"]
