"""Self-test of an edgeq deploy bundle: run the module on the bundled inputs and compare
with the expected outputs recorded when the bundle was made: for a module on edgeq's
kernels the bit-exact NumPy reference of its plan (allowed difference 0), otherwise
onnxruntime's run of the same quantized model (selftest.json says which). Needs only NumPy
and the TVM runtime. Usage, in the bundle folder::

    python selftest.py

Prints PASS or FAIL with the figures, and exits 0 or 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import runner  # noqa: E402  (the bundle's runner.py, beside this file)


def main() -> int:
    config = json.loads((HERE / "selftest.json").read_text())
    inputs = np.load(HERE / config["inputs"])
    expected = np.load(HERE / config["expected"])
    try:
        machine = runner.load(str(HERE / config["module"]))
        outputs = runner.predict(machine, inputs)
    except Exception as exc:  # noqa: BLE001 - report any failure to load or run as a failed self-test
        print(f"FAIL: the module did not run: {str(exc).splitlines()[-1] if str(exc) else type(exc).__name__}")
        return 1
    difference = float(np.abs(outputs - expected).max())
    agreement = float((outputs.argmax(1) == expected.argmax(1)).mean())
    ok = difference <= config["max_abs_diff"] and agreement >= config["min_top1_agreement"]
    print(
        f"{'PASS' if ok else 'FAIL'}: {len(inputs)} inputs, "
        f"top-1 agreement {agreement:.3f} (need {config['min_top1_agreement']}), "
        f"max |difference| {difference:.3g} (allowed {config['max_abs_diff']:.3g})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
