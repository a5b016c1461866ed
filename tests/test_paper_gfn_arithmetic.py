"""Hu et al.'s Table 4 (integer arithmetic): experiment=gfn_arithmetic as composed, the paper
entry gfn_table4 and its accuracy report from hand-made run directories, and
scripts/paper/gfn_table4_arithmetic.sh (its bad input; its smoke profile end to end on a tiny
Llama, slow)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module

from smclm.cli import main as smclm_main
from smclm.errors import UserError
from smclm.report.paper import check_methods, paper_result
from smclm.report.table import make_table
from smclm.tasks.arithmetic_data import demo_text, generate

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "paper" / "gfn_table4_arithmetic.sh"
DATA = yaml.safe_load((ROOT / "smclm" / "report" / "paper_results.yaml").read_text())
ENTRY = DATA["other_papers"]["hu2024"]["results"]["gfn_table4"]
OPERANDS = (3, 4, 5)


def paper_cells(method: str) -> list[float]:
    """The paper's accuracy (%) for 3, 4, 5 operands, as paper_results.yaml gives it."""
    return [ENTRY["methods"][method][f"arith/acc_{n}op"] for n in OPERANDS]


def script_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "SMCLM_CACHE": str(tmp_path / "cache"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def run_script(tmp_path: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=script_env(tmp_path),
        cwd=tmp_path, timeout=timeout,
    )  # fmt: skip


# -- the experiment ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["gfn", "sft", "ppo", "ctl"])
def test_the_experiment_has_the_papers_settings(method):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose("train", overrides=["experiment=gfn_arithmetic", f"method={method}"])
    task = cfg.task
    assert (task.name, task.data, task.prompt_index, task.min_len, task.output_len) == (
        "latent", "arithmetic", "all", 5, 30
    )  # fmt: skip
    assert task.allowed == "0123456789=+-,. " and task.penalty == -99.0
    assert task.calculator is True and task.calculator_terms == 2  # the paper's two-term tool
    assert task.answer_template == ". The answer is {y}."
    # the reward's 3-shot prompt: the first 3 labelled rows, worked, one a line
    first3 = generate().labelled[:3]
    assert task.reward_prompt == "".join(demo_text(row) + "\n" for row in first3)
    assert cfg.evaluator.name == "arithmetic"
    assert (cfg.evaluator.n_samples, cfg.evaluator.temperature) == (10, 0.1)
    assert cfg.model.name == "smollm2" and cfg.smc.n_particles == 16
    if method in ("gfn", "sft", "ppo"):
        assert cfg.method.policy == "lora"
        assert (cfg.method.lora.r, cfg.method.lora.alpha, cfg.method.lora.dropout) == (64, 16, 0.1)
    if method == "gfn":
        m = cfg.method
        assert (m.tau_r_start, m.tau_r_end, m.tau_r_updates) == (1.1, 0.5, 150)
        assert m.allow_tempered_target and m.buffer.seed_with_task and m.buffer.capacity == 50
        assert m.loss == "modified_subtb" and m.lr == 1e-4 and m.warmup == 20


# -- the paper entry and its report ----------------------------------------------------------------


def test_the_paper_entry_holds_the_confirmed_numbers_only(capsys):
    result = paper_result("gfn_table4")
    assert result.methods == ["sft", "ppo", "gfn"] and result.experiment == "gfn_arithmetic"
    assert "arXiv:2310.04363" in result.citation and "ICLR 2024" in result.citation
    for method in result.methods:
        cells = [result.values[method][""][f"arith_acc_{n}op"] for n in OPERANDS]
        assert cells == [[v, None] for v in paper_cells(method)]  # no ± (unverified)
    assert "unverified" in result.paper_values
    check_methods("gfn_table4", ["gfn", "sft", "ppo", "ctl"])  # ctl: beyond the paper
    with pytest.raises(UserError, match="no paper numbers for method rl"):
        check_methods("gfn_table4", ["gfn", "rl"])
    smclm_main(["table", "--paper", "gfn_table4", "--methods", "gfn,sft,ppo,ctl"])
    out = capsys.readouterr().out
    gfn = " | ".join(f"{v:g}" for v in paper_cells("gfn"))
    assert f"| gfn | {gfn} |" in out and "| 3 operands | 4 operands | 5 operands (OOD) |" in out


def _run(root: Path, name: str, method: str, seed: int, acc: dict[int, float], **task) -> None:
    d = root / name
    d.mkdir(parents=True)
    cfg = {
        "task": {"name": "latent", "tau": 1.0, **task},
        "method": {"name": method},
        "model": {"name": "smollm2"},
        "seed": seed,
        "paper": {"result": "gfn_table4", "profile": "cpu", "reductions": [], "overrides": []},
    }
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {f"arith/acc_{n}op": a for n, a in acc.items()}
    (d / "summary.json").write_text(json.dumps(summary))


def test_the_accuracy_report_from_hand_made_runs(tmp_path):
    """Rows: the paper's methods, then ctl (beyond the paper) and the k-shot evaluations of p₀;
    cells: accuracy in %, mean ± 1.96·sd/√n over seeds, beside the paper's mean, Δ."""
    root = tmp_path / "sweep"
    _run(root, "gfn0", "gfn", 0, {3: 0.5, 4: 0.2, 5: 0.1})
    _run(root, "gfn1", "gfn", 1, {3: 0.7, 4: 0.2, 5: 0.0})
    _run(root, "ctl0", "ctl", 0, {3: 0.4, 4: 0.1, 5: 0.0})
    _run(root, "k3", "none", 0, {3: 0.3, 4: 0.0, 5: 0.0}, k_shot=3)
    _run(root, "k10", "none", 0, {3: 0.2, 4: 0.1, 5: 0.0}, k_shot=10)
    md, rows = make_table(root)  # detected from paper.result
    assert [r["method"] for r in rows] == ["sft", "ppo", "gfn", "ctl", "p0_3shot", "p0_10shot"]
    gfn = rows[2]
    assert gfn["n"] == 2 and gfn["arith_acc_3op"] == pytest.approx(60.0)
    assert gfn["arith_acc_3op_ci95"] == pytest.approx(1.96 * 14.1421356 / 2**0.5, rel=1e-6)
    assert gfn["paper_arith_acc_3op"] == paper_cells("gfn")[0]
    assert gfn["diff_arith_acc_3op"] == pytest.approx(60.0 - paper_cells("gfn")[0])
    assert rows[0]["n"] == 0 and rows[0]["arith_acc_3op"] is None
    g3, g4, g5 = paper_cells("gfn")
    assert f"| gfn | 60.0 ± 19.6 | {g3:g} | {60 - g3:+.1f} | 20.0 ± 0.0 | {g4:g} |" in md
    assert "| ctl (ours, beyond the paper) | 40.0 | – | – |" in md
    assert "| p0_3shot (k-shot prompting; the paper's numbers not recovered) | 30.0 |" in md
    assert "log Z" not in md and "arXiv:2310.04363" in md
    table = list(csv.DictReader(io.StringIO((root / "table.csv").read_text())))
    assert table[2]["method"] == "gfn" and float(table[2]["arith_acc_5op"]) == pytest.approx(5.0)
    assert table[2]["paper_arith_acc_5op_ci95"] == ""


# -- the script ----------------------------------------------------------------------------------


def test_a_bad_profile_is_one_line_and_exit_2(tmp_path):
    proc = run_script(tmp_path, "--profile", "gpu", "--out", str(tmp_path / "o"), timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines == [
        "gfn_table4_arithmetic: error: unknown profile 'gpu'; choose --profile paper, cpu or smoke"
    ]
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A tiny random Llama (SmolLM2's architecture) over a byte-level BPE trained on the
    arithmetic rows, so that digits, "=" and the operators are tokens of their own or merges."""
    import torch
    from conftest import byte_level_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    rows = generate().labelled + generate().unlabelled[:250]
    tok = byte_level_tokenizer([f"{r['x']} {r['z'] or ''}. The answer is {r['y']}." for r in rows],
                               300)  # fmt: skip
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("arith_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.slow  # ~45–80 s on 2 shared cores: 4 trainings, 4 final and 2 k-shot evaluations
def test_the_smoke_profile_end_to_end(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    proc = run_script(tmp_path, "--profile", "smoke", "--out", str(out),
                      f"model.name={tiny_llama_dir}", "device=cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every trained run: in-training evaluations on 3 rows, the final one on 6 (2 per count)
    trained = [p.parent for p in out.glob("runs/*/*/summary.json") if p.parts[-3] != "kshot"]
    assert sorted(str(p.relative_to(out / "runs")) for p in trained) == [
        "ctl/0_ctl_seed0", "gfn/0_gfn_seed0", "policies/0_sft_seed0", "policies/1_ppo_seed0"
    ]  # fmt: skip
    for run in trained:
        final = json.loads((run / "eval" / "summary.json").read_text())
        assert [final[f"arith/n_{n}op"] for n in OPERANDS] == [2, 2, 2], run
        during = json.loads((run / "summary.json").read_text())
        assert during["arith/n"] == 3 and during["run/updates"] == 2
    gfn_cfg = yaml.safe_load((out / "runs/gfn/0_gfn_seed0/config.yaml").read_text())
    assert gfn_cfg["method"]["tau_r_updates"] == 2 and gfn_cfg["method"]["tau_r_end"] == 0.5
    assert gfn_cfg["task"]["calculator"] is True
    assert gfn_cfg["task"]["test_data"] == str(out / "data" / "arithmetic_test_345.jsonl")
    assert gfn_cfg["paper"] == {
        "result": "gfn_table4", "profile": "smoke",
        "reductions": ["seed=0", "train.updates=2", "train.eval_every=2", "smc.n_particles=4",
                       "task.output_len=12", "evaluator.n_samples=3", "evaluator.n_prompts=3",
                       "train.progress=false"],
        "overrides": [f"model.name={tiny_llama_dir}", "device=cpu"],
    }  # fmt: skip
    rows = [json.loads(x) for x in (out / "data" / "arithmetic_test_345.jsonl").open()]
    assert [r["n_operands"] for r in rows[:6]] == [3, 4, 5, 3, 4, 5] and len(rows) == 1500
    for k in (0, 3):
        kshot = json.loads((out / "runs" / "kshot" / f"k{k}_seed0" / "summary.json").read_text())
        assert kshot["arith/sampler"] == "p0" and kshot["arith/n"] == 6
    # the report: our accuracy beside the paper's confirmed numbers (from paper_results.yaml)
    table = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert [(r["method"], r["n"]) for r in table] == [
        ("sft", "1"), ("ppo", "1"), ("gfn", "1"), ("ctl", "1"), ("p0_0shot", "1"),
        ("p0_3shot", "1"),
    ]  # fmt: skip
    report = (out / "report.md").read_text()
    for row in table:
        if row["method"] in ENTRY["methods"]:
            paper = paper_cells(row["method"])
            assert [float(row[f"paper_arith_acc_{n}op"]) for n in OPERANDS] == paper
            cells = [
                f"{float(row[f'arith_acc_{n}op']):.1f} | {p:g} |" for n, p in zip(OPERANDS, paper)
            ]
            line = next(ln for ln in report.splitlines() if ln.startswith(f"| {row['method']} |"))
            assert all(c in line for c in cells), line
        else:
            assert row["paper_arith_acc_3op"] == ""
    assert ENTRY["title"] in report and "Profile: smoke." in report
    assert "gfn_table4_arithmetic.sh --profile smoke" in report
    assert "## At equal compute" in report and "| at update |" in report
    at = list(csv.DictReader(io.StringIO((out / "at_equal_compute" / "table.csv").read_text())))
    assert {r["method"]: r["n"] for r in at} == {"sft": "1", "ppo": "1", "gfn": "1", "ctl": "1"}
