"""Smoke test for benchmarks/int8_inference.py: runs it with --quick and checks its JSON rows."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_int8_inference_quick(tmp_path):
    out = tmp_path / "int8.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.path.join(ROOT, "python") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, os.path.join("benchmarks", "int8_inference.py"), "--quick", "--json",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert all(set(r) == {"model", "impl", "device", "batch", "ms", "size_bytes"} for r in rows)
    assert all(r["device"] == "cpu" and r["ms"] > 0 and r["size_bytes"] > 0 for r in rows)
    seen = {(r["model"], r["impl"], r["batch"]) for r in rows}
    assert {(m, i, b) for m in ("mlp", "cnn", "mobilenet") for i in ("fp32", "qatx_int8", "qatx_int8_script")
            for b in (1, 64)} <= seen
    size = {(r["model"], r["impl"]): r["size_bytes"] for r in rows}
    assert size[("mlp", "fp32")] >= 3.5 * size[("mlp", "qatx_int8")]
