"""Smoke test for benchmarks/calibration.py: runs it with --quick and checks its JSON rows."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_calibration_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    py = os.path.join(ROOT, "python")
    env["PYTHONPATH"] = py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "calibration.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    seen = set()
    for row in rows:
        assert set(row) == {"bench", "impl", "device", "numel", "bins", "ms", "gbps"}, row
        assert row["device"] == "cpu" and row["numel"] == 1 << 16 and row["bins"] == 2048
        assert row["ms"] > 0, row
        seen.add((row["bench"], row["impl"]))
    want = {("observe", "qatx"), ("range/percentile", "qatx"), ("range/mse", "qatx"), ("range/entropy", "qatx")}
    try:
        from torch.ao.quantization import HistogramObserver  # noqa: F401
        want |= {("observe", "torch.ao"), ("range/mse", "torch.ao")}
    except ImportError:
        pass
    assert want <= seen, sorted(want - seen)
