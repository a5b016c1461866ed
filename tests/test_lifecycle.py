"""The run lifecycle through the real `smclm` command: resuming finished runs, longer runs,
changed settings, empty run dirs, damaged checkpoints; the context-length check; NaN/+inf
potentials. Independent commands run concurrently (a few at a time) to keep this file fast."""

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = [
    "method=ctl",
    "smc.n_particles=8",
    "task.output_len=3",
    "train.progress=false",
    "seed=3",
]
CONCURRENT = 3  # subprocesses at once: each is mostly the import of torch


def smclm(*args, cwd, timeout=300):
    env = {**ENV, "SMCLM_CACHE": str(Path(cwd) / "cache")}
    return subprocess.run(
        [sys.executable, "-m", "smclm.cli", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def smclm_many(calls, cwd):
    """Run the argument lists of ``calls`` concurrently; their results in order."""
    with ThreadPoolExecutor(CONCURRENT) as pool:
        return list(pool.map(lambda args: smclm(*args, cwd=cwd), calls))


def error_lines(proc):
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("smclm: error")]


def one_error(proc, *needles):
    """Exit 2, exactly one error line containing every needle, and no traceback."""
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def snapshot(run: Path) -> dict[str, bytes]:
    """Every file of a run dir except Hydra's own records of the latest launch (.hydra/)."""
    return {
        str(p.relative_to(run)): p.read_bytes()
        for p in sorted(run.rglob("*"))
        if p.is_file() and ".hydra" not in p.relative_to(run).parts
    }


def rows(run: Path) -> list[dict]:
    """metrics.jsonl without wall times (the only keys two equal runs may differ in)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out.append({k: v for k, v in row.items() if not k.startswith("time/")})
    return out


def summary(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in s.items() if not k.startswith("time/")}


def params(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step}" / "params.safetensors"))


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_finished_longer_and_changed(tmp_path):
    """A finished run resumed: nothing changes (one line, exit 0). Resumed with a larger
    train.updates: it ends where an uninterrupted run of that length ends. Changed settings:
    refused before anything loads, naming the key, changing nothing."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    # eval_every=3: the 4-update schedule is {0, 3, 4}; the 2-update run also evaluates at 2
    common = [*TINY, "train.eval_every=3"]
    first = smclm_many(
        [
            ["train", *common, "train.updates=4", f"hydra.run.dir={whole}"],
            ["train", *common, "train.updates=2", f"hydra.run.dir={split}"],
        ],
        tmp_path,
    )
    for proc in first:
        assert proc.returncode == 0, proc.stderr[-3000:]
    before = snapshot(split)
    assert {"config.yaml", "summary.json", "metrics.jsonl"} <= before.keys()
    assert any(k.startswith("checkpoints/step_2/") for k in before)

    # the same command again with resume=true (what a sweep launcher does after a requeue), and
    # resumes that would train or measure something else, or with a bad model path (a load
    # would fail with another message: the refusal comes first)
    again, *refused = smclm_many(
        [
            ["train", *common, "train.updates=2", "resume=true", f"hydra.run.dir={split}"],
            ["train", *common, "train.updates=2", "resume=true", "task.output_len=4",
             f"hydra.run.dir={split}"],
            ["train", *common, "train.updates=2", "resume=true", "method=rl",
             f"hydra.run.dir={split}"],
            ["train", *common, "train.updates=2", "resume=true", "seed=4",
             "model.name=/no/such/model", f"hydra.run.dir={split}"],
            ["train", *common, "train.updates=1", "resume=true", f"hydra.run.dir={split}"],
        ],
        tmp_path,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout.strip().splitlines()
    assert len(out) == 1 and "is complete" in out[0] and str(split) in out[0], again.stdout
    assert snapshot(split) == before  # byte-identical: config, summary, metrics, checkpoints
    one_error(refused[0], "task.output_len (saved 3, now 4)", "another hydra.run.dir")
    one_error(refused[1], "method.name (saved 'ctl', now 'rl')")
    line = one_error(refused[2], "model.name", "seed (saved 3, now 4)")
    assert "no such directory" not in line  # refused before the model was looked for
    one_error(refused[3], "train.updates=1", "already at update 2")
    assert snapshot(split) == before

    longer = smclm(
        "train", *common, "train.updates=4", "resume=true", f"hydra.run.dir={split}", cwd=tmp_path
    )
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert_same_params(params(whole, 4), params(split, 4))
    # The metrics so far are kept: the split run has one record the uninterrupted run has
    # not, the evaluation that ended the 2-update run (2 is not on the 4-update schedule).
    # Every other record, and the summary, is the uninterrupted run's (wall times aside).
    extra = [r for r in rows(split) if r["step"] == 2 and "kl/sigma_q_exact" in r]
    assert len(extra) == 1
    assert [r for r in rows(split) if r not in extra] == rows(whole)
    assert summary(split) == summary(whole)
    assert json.loads((split / "summary.json").read_text())["run/updates"] == 4


def test_resume_where_there_is_nothing_to_resume_starts_fresh(tmp_path):
    """resume=true on a missing or an empty run dir: a fresh run, and it says so."""
    (tmp_path / "empty").mkdir()
    procs = smclm_many(
        [
            ["train", *TINY, "train.updates=1", "resume=true", f"hydra.run.dir={tmp_path / d}"]
            for d in ("missing", "empty")
        ],
        tmp_path,
    )
    for d, proc in zip(("missing", "empty"), procs):
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "starting a fresh run" in proc.stderr
        assert summary(tmp_path / d)["run/updates"] == 1


def test_unreadable_checkpoints_fall_back_to_the_previous_kept_one(tmp_path):
    """A truncated params.safetensors, then a missing state.pt: each is named, the resume
    falls back to the previous kept checkpoint and ends bit-identical to an uninterrupted run;
    with no readable checkpoint left it is one line."""
    run, whole = tmp_path / "run", tmp_path / "whole"
    common = [*TINY, "train.eval_every=1", "train.checkpoint_keep=2"]
    for proc in smclm_many(
        [
            ["train", *common, "train.updates=2", f"hydra.run.dir={run}"],
            ["train", *common, "train.updates=3", f"hydra.run.dir={whole}"],
        ],
        tmp_path,
    ):
        assert proc.returncode == 0, proc.stderr[-3000:]
    newest = run / "checkpoints" / "step_2" / "params.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    resumed = smclm(
        "train", *common, "train.updates=3", "resume=true", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr
    assert "step_2: params.safetensors cannot be read" in resumed.stderr
    assert "resuming from" in resumed.stderr and "step_1" in resumed.stderr
    assert (run / "checkpoints" / "unreadable_step_2").is_dir()  # kept, out of the way
    assert_same_params(params(whole, 3), params(run, 3))
    assert rows(run) == rows(whole)

    (run / "checkpoints" / "step_3" / "state.pt").unlink()
    again = smclm(
        "train", *common, "train.updates=3", "resume=true", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step_3: state.pt is missing" in again.stderr and "step_2" in again.stderr
    assert_same_params(params(whole, 3), params(run, 3))
    assert rows(run) == rows(whole)

    for ckpt in (run / "checkpoints").glob("step_*"):
        (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    broken = smclm(
        "train", *common, "train.updates=4", "resume=true", f"hydra.run.dir={run}", cwd=tmp_path
    )
    one_error(broken, "no readable checkpoint")


def save_tiny_gpt2(path: Path, n_positions: int) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel

    from smclm.models.toy import build_toy_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=12, n_embd=16, n_layer=1, n_head=2, n_positions=n_positions,
                     bos_token_id=11, eos_token_id=11)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(path)
    build_toy_tokenizer(12).save_pretrained(path)
    return str(path)


def test_lengths_beyond_the_context_are_one_line_before_any_sampling(tmp_path):
    """The toy model (64 positions), a tiny GPT-2 (n_positions 32) and infilling's T + c; the
    limit itself (prompt + T = 64 on the toy model) still samples."""
    gpt2 = save_tiny_gpt2(tmp_path / "gpt2", n_positions=32)
    prompt = "task.prompt=the cat"  # 2 tokens
    at_limit, toy, small, infill, infill_train = smclm_many(
        [
            ["sample", "n=2", "task.output_len=63"],
            ["sample", "task.output_len=64"],
            ["sample", "model=tinystories", f"model.name={gpt2}", "model.dtype=float32",
             "twist=linear", prompt, "task.output_len=31"],
            ["sample", "task=infilling", "model=toy", "twist=mlp", "task.prompt=the",
             "task.output_len=60", "task.cond_len=4"],
            ["train", "task=infilling", "model=toy", "twist=mlp", "task.prompt=the",
             "task.output_len=60", "task.cond_len=4", "train.progress=false",
             f"hydra.run.dir={tmp_path / 'run'}"],
        ],
        tmp_path,
    )  # fmt: skip
    assert at_limit.returncode == 0, at_limit.stderr[-3000:]
    assert "log Z-hat" in at_limit.stdout
    one_error(toy, "prompt 1 + task.output_len 64 = 65 tokens", "context of 64", "=63 or less")
    one_error(small, "prompt 2 + task.output_len 31 = 33 tokens", "context of 32", "=30 or less")
    for proc in (infill, infill_train):  # T = 60 alone would fit; T + c does not
        one_error(proc, "prompt 1 + task.output_len 60 + task.cond_len 4 = 65", "=59 or less")
    assert not (tmp_path / "cache").exists()  # refused before any exact sample was drawn


def test_context_limit_is_read_from_the_model_config():
    from types import SimpleNamespace

    from smclm.errors import ConfigError
    from smclm.lengths import check_context, max_positions

    task = SimpleNamespace(prompt_ids=torch.zeros(3), output_len=5, cond_len=2)
    assert max_positions(SimpleNamespace(config=SimpleNamespace(n_positions=16))) == 16
    assert max_positions(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8))) == 8
    unlimited = SimpleNamespace(config=SimpleNamespace())  # e.g. relative positions: no limit
    assert max_positions(unlimited) is None
    check_context(unlimited, task)
    check_context(SimpleNamespace(config=SimpleNamespace(n_positions=10)), task)  # 10 fits 10
    with pytest.raises(ConfigError, match="= 10 tokens is longer than .* context of 9"):
        check_context(SimpleNamespace(config=SimpleNamespace(n_positions=9)), task)


def test_nan_or_inf_potential_is_a_named_error(tmp_path):
    """β = 1e39 overflows float32: log φ = β·count is +inf where count > 0 and NaN (0·inf)
    where count = 0. sample and train say how many particles and at which step."""
    bad = ["task.potential=exp_count", "task.beta=1e39", "task.output_len=2"]
    sample, train = smclm_many(
        [
            ["sample", *bad, "n=16"],
            ["train", *bad, "train.progress=false", "smc.n_particles=8",
             f"hydra.run.dir={tmp_path / 'run'}"],
        ],
        tmp_path,
    )  # fmt: skip
    line = one_error(sample, "log φ is NaN for", "of 16 particles at step t = T = 2")
    n_nan, n_inf = (int(line.split(w)[1].split()[0]) for w in ("NaN for", "+inf for"))
    assert n_nan + n_inf == 16  # every particle: count = 0 gives NaN, count > 0 gives +inf
    one_error(train, "log φ is NaN for", "+inf for", "at step t = T = 2")


def test_potential_check_in_python():
    """NaN and +inf are counted; −inf (φ = 0) is legal; the KV-cache path is checked too."""
    from smclm.errors import PotentialError
    from smclm.tasks.base import Task

    values = torch.tensor([0.0, -math.inf, math.nan, math.inf, math.inf])
    task = Task("t", torch.zeros(1, dtype=torch.long), 3, lambda s, c=None: values[: len(s)])
    tokens = torch.zeros(5, 3, dtype=torch.long)
    with pytest.raises(PotentialError, match=r"NaN for 1 and \+inf for 2 of 5 particles"):
        task.log_phi(tokens)
    assert torch.equal(task.log_phi(tokens[:2]), values[:2])  # −inf passes

    class Cached:
        def __call__(self, tokens, cond=None):
            return torch.zeros(len(tokens))

        def from_cache(self, model, ctx, tokens, cond):
            return torch.full((len(tokens),), math.nan)

    cond_task = Task("c", torch.zeros(1, dtype=torch.long), 3, Cached(), cond_len=1)
    bound = cond_task.bind(torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(PotentialError, match="NaN for 4 and"):
        bound.from_cache(None, None, tokens[:4])


# -- the same lifecycle through train() (cheaper; the paths a subprocess cannot reach) ---------


def make_cfg(*overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_a_complete_run_without_its_summary_gets_it_back(tmp_path):
    """Stopped between its last checkpoint and summary.json: the resume rebuilds the summary
    from the run's records (every key but the wall time of the whole run) and trains nothing."""
    from smclm.resume import Finished
    from smclm.train import train

    args = [*TINY, "train.updates=2", "train.eval_every=1"]
    original = train(make_cfg(*args), tmp_path)
    (tmp_path / "summary.json").unlink()
    metrics = (tmp_path / "metrics.jsonl").read_bytes()
    again = train(make_cfg(*args, "resume=true"), tmp_path)
    assert isinstance(again, Finished)
    rebuilt = json.loads((tmp_path / "summary.json").read_text())
    expected = {k: v for k, v in json.loads(json.dumps(original)).items() if k != "time/total_s"}
    assert rebuilt == expected
    assert (tmp_path / "metrics.jsonl").read_bytes() == metrics


def test_a_run_stopped_during_an_evaluation_repeats_it(tmp_path, monkeypatch):
    """A failure inside the evaluation at update 2 saves update 2's checkpoint marked as not
    evaluated, and a last metrics row cut short by a kill is dropped: the resume evaluates
    update 2 again and ends as an uninterrupted run."""
    import smclm.train as train_mod

    args = [*TINY, "train.updates=3", "train.eval_every=1"]
    train_mod.train(make_cfg(*args), tmp_path / "whole")
    real = train_mod._evaluate

    def failing(evaluator, tracker, step, meter):
        if step == 2:
            raise RuntimeError("the evaluation failed")
        return real(evaluator, tracker, step, meter)

    monkeypatch.setattr(train_mod, "_evaluate", failing)
    with pytest.raises(RuntimeError, match="the evaluation failed"):
        train_mod.train(make_cfg(*args), tmp_path / "split")
    monkeypatch.setattr(train_mod, "_evaluate", real)
    assert (tmp_path / "split/checkpoints/step_2").is_dir()
    with (tmp_path / "split/metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "kl/sigma_q_ex')  # a row cut short
    train_mod.train(make_cfg(*args, "resume=true"), tmp_path / "split")
    assert_same_params(params(tmp_path / "whole", 3), params(tmp_path / "split", 3))
    assert rows(tmp_path / "split") == rows(tmp_path / "whole")
    assert summary(tmp_path / "split") == summary(tmp_path / "whole")


def test_random_state_of_another_device_is_refused():
    from smclm.errors import UserError
    from smclm.train import _rng_state, _set_rng_state

    gen = torch.Generator().manual_seed(0)
    state = {**_rng_state(gen), "device": "cuda"}
    with pytest.raises(UserError, match="resume it with device=cuda"):
        _set_rng_state(gen, state)
