"""Smoke test for benchmarks/qat_step.py: runs it with --quick and checks its JSON rows."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_qat_step_quick(tmp_path):
    out = tmp_path / "qat_step.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "qat_step.py"), "--quick", "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert all(set(r) == {"model", "config", "device", "ms_per_step", "ratio_vs_fp32"} for r in rows)
    assert all(r["device"] == "cpu" and r["ms_per_step"] > 0 for r in rows)
    seen = {(r["model"], r["config"]) for r in rows}
    assert {(m, c) for m in ("cnn", "mlp") for c in ("fp32", "qatx_w8a8", "qatx_w4a4_lsq")} <= seen
    assert all(r["ratio_vs_fp32"] == 1.0 for r in rows if r["config"] == "fp32")
