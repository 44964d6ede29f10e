"""benchmarks/paper.py --quick: every calibration source through the same quantizer, the
table, plot and conclusions written into results.md between its markers, and resumable."""
import importlib.util
import json
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "paper.py"


def _paper():
    spec = importlib.util.spec_from_file_location("edgeq_paper_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_mode_writes_the_table_and_resumes(tmp_path):
    paper = _paper()
    (tmp_path / "results.md").write_text("# Results\n\n## Quantization methods\n\nkept as it is\n")
    assert paper.main(["--quick", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results-paper.json").read_text())
    sources = {e["source"] for e in results["entries"].values()}
    assert sources == {"fp", *paper.SOURCES}
    for entry in results["entries"].values():
        assert 0.0 <= entry["top1"] <= 1.0
    fp = results["entries"]["fmnist-resnet/fp"]["top1"]
    real = results["entries"]["fmnist-resnet/w4a4/real/0"]["top1"]
    assert fp > 0.9 and real > fp - 0.05  # W4A4 on real calibration images stays near full precision
    text = (tmp_path / "results.md").read_text()
    assert "kept as it is" in text and text.count(paper.BEGIN) == 1 and text.count(paper.END) == 1
    rows = [line for line in text.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in paper.SOURCES]
    assert len(rows) == len(paper.SOURCES)
    assert "mixup-embedding against single-class prompts" in text and (tmp_path / "results-paper.png").stat().st_size > 10_000
    began = time.perf_counter()
    assert paper.main(["--quick", "--out", str(tmp_path)]) == 0  # everything measured: only the document is rewritten
    assert time.perf_counter() - began < 60
    assert (tmp_path / "results.md").read_text().count(paper.BEGIN) == 1
