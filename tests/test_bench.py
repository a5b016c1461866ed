"""`scripts/bench_smc.py` still runs end to end and reports every ratio it promises (a smoke run
on the toy model: no timing is asserted; speed is judged from the script's own output)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_toy_writes_every_ratio_as_json_and_markdown(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    args = ["--models", "toy", "--sections", "core,grouped", "--quick", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_smc.py"), *args, "--md", str(md)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())["toy"]
    keys = [
        "smc_overhead",
        "speedup_vs_recompute",
        "length_scaling",
        "plain_length_scaling",
        "kv_reorder_overhead",
        "grouped_train_speedup",
        "grouped_eval_speedup",
    ]
    for key in keys:
        assert isinstance(res[key], float) and res[key] == res[key], key  # a number, not NaN
    core = res["core"]["seconds_all"]
    assert len(core["ours_T"]) == len(core["ours_no_kv_reorder_T"]) == 1
    text = md.read_text()
    assert "python scripts/bench_smc.py --models toy --sections core,grouped --quick" in text
    assert "load average" in text
    for key in keys:
        assert f"| toy | core | `{key}`" in text or f"| toy | grouped | `{key}`" in text, key
