"""`scripts/infilling_twist_ceiling.py` runs end to end on a tiny GPT-2 of the real architecture:
its JSON holds a finite held-out ΔKL(σ‖q) per checkpoint, and maximum likelihood on a fixed set
of pairs lowers KL(σ‖q) on those pairs (the direction the script relies on); a task without
conditioning tokens is refused in one line with exit 2."""

import importlib.util
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location(
        "infilling_twist_ceiling", ROOT / "scripts" / "infilling_twist_ceiling.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_the_ceiling_script_writes_its_checkpoints_and_fits_fixed_pairs(
    tmp_path, tiny_lm_dirs, capsys
):
    out = tmp_path / "c.json"
    tiny = [
        "model=tinystories",
        f"model.name={tiny_lm_dirs['gpt2']}",
        "model.dtype=float32",
        "task.prompt=the cat",
    ]
    rc = _script().main(
        ["--steps", "8", "--pairs", "8", "--lr", "1e-2", "--fixed", "8", "--fixed-steps", "20",
         "--held-out", "16", "--out", str(out), "--", *tiny]
    )  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert [r["step"] for r in res["fresh"]] == [8]
    assert all(math.isfinite(r["held_out_dkl"]) for r in res["fresh"] + res["fixed"])
    last = res["fixed"][-1]
    assert last["step"] == 20 and last["train_dkl"] + 3 * last["train_se"] < 0, last
    assert res["dtype"] == "float32"
    rc = _script().main(["--", *tiny, "experiment=toy_ctl"])
    assert rc == 2
    assert "no conditioning tokens" in capsys.readouterr().err
