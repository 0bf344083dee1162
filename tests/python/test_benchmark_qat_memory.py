"""Smoke test for benchmarks/qat_memory.py: runs it with --quick on two configs and checks its JSON rows."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_qat_memory_quick(tmp_path):
    out = tmp_path / "qat_memory.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "qat_memory.py"), "--quick", "--configs",
                           "fp32,qatx_w8a8", "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [r["config"] for r in rows] == ["fp32", "qatx_w8a8"]
    keys = {"model", "config", "device", "batch", "peak_mb", "at_start_mb", "step_mb", "ratio_vs_fp32"}
    assert all(set(r) == keys and r["device"] == "cpu" and r["batch"] == 8 for r in rows)
    # Peak includes what is alive at the start, and the step allocates activations and gradients.
    assert all(r["peak_mb"] >= r["at_start_mb"] > 0 and r["step_mb"] > 0 for r in rows)
    assert rows[0]["ratio_vs_fp32"] == 1.0
    # QAT keeps fake-quantized copies for backward: more memory than the float step, but bounded.
    assert 1.0 < rows[1]["ratio_vs_fp32"] < 4.0
