"""Smoke test for benchmarks/ops.py: runs it with --quick and checks its JSON output."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_ops_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    py = os.path.join(ROOT, "python")
    env["PYTHONPATH"] = py + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, os.path.join("benchmarks", "ops.py"), "--quick", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "qatx forward != torch forward" not in proc.stdout, proc.stdout
    assert "qatx input gradient != torch input gradient" not in proc.stdout, proc.stdout

    rows = json.loads(out.read_text())
    keys = {"op", "impl", "device", "numel", "direction", "ms", "gbps"}
    seen = set()
    for row in rows:
        assert set(row) == keys, row
        assert row["device"] == "cpu"
        assert row["ms"] > 0 and row["gbps"] > 0, row
        seen.add((row["op"], row["impl"], row["direction"]))
    want = {(op, impl, direction)
            for op in ("fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine")
            for impl in ("qatx", "torch", "copy")
            for direction in ("forward", "forward+backward")}
    want |= {(op, impl, direction)
             for op in ("fake_quantize_lsq_per_tensor", "fake_quantize_lsq_per_channel")
             for impl in ("qatx", "torch", "composite", "copy")
             for direction in ("forward", "forward+backward")}
    assert want <= seen, sorted(want - seen)
