"""Bad input to every command through the real `smclm`: one line naming the problem, exit 2, no
traceback, and no file written outside the run dir (nor into the exact-sample cache, nor into
the run dirs the input points at).

The cases run as subprocesses a few at a time, once for the module; each case is its own test.
Most fail before torch is imported (under a second each); the few that need the model loaded
(lengths, cond=, a damaged checkpoint, a model path) take a few seconds.
"""

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_smclm

HYDRA_COMMANDS = ("train", "eval", "sample", "collect")
CONCURRENT = 3
FIX = "<fixtures>"  # replaced by the fixtures directory

# (id, arguments, what the one error line must contain)
CASES = [
    ("unknown-command", ["frobnicate"], "unknown command 'frobnicate'"),
    # an unknown option of every config group
    ("task-option", ["train", "task=nope"], "unknown task 'nope'"),
    ("model-option", ["eval", "model=nope"], "unknown model 'nope'"),
    ("method-option", ["train", "method=nope"], "unknown method 'nope'"),
    ("twist-option", ["sample", "twist=nope"], "unknown twist 'nope'"),
    ("smc-option", ["collect", "smc=nope"], "unknown smc 'nope'"),
    ("evaluator-option", ["eval", "evaluator=nope"], "unknown evaluator 'nope'"),
    ("logger-option", ["train", "logger=nope"], "unknown logger 'nope'"),
    ("experiment-option", ["sample", "experiment=nope"], "unknown experiment 'nope'"),
    ("sweep-option", ["train", "-m", "method=ctl,nope"], "unknown method 'nope'"),
    # keys that do not exist, overrides that do not parse
    ("unknown-key", ["train", "train.foo=1"], "Could not override 'train.foo'"),
    ("misspelt-key", ["sample", "smc.n_particle=3"], "Could not override 'smc.n_particle'"),
    ("unparsable", ["train", "train.updates=[1"], "cannot parse the override 'train.updates=[1'"),
    # wrong types
    ("updates-type", ["train", "train.updates=abc"], "train.updates='abc' must be a non-negative"),
    ("particles-type", ["sample", "smc.n_particles=1.5"], "smc.n_particles=1.5 must be a positive"),
    ("bool-type", ["train", "train.progress=maybe"], "train.progress='maybe' must be true or false"),
    ("seed-type", ["eval", "seed=1.5"], "seed=1.5 must be an integer"),
    ("lr-type", ["train", "method.lr=fast"], "method.lr='fast' must be a positive number"),
    ("targets-type", ["sample", "task.target_ids=[a]"], "task.target_ids=['a'] must be a list"),
    # out of range, every numeric key with a range
    ("updates", ["train", "train.updates=-1"], "train.updates=-1 must be a non-negative integer"),
    ("eval-every", ["train", "train.eval_every=0"], "train.eval_every=0 must be a positive"),
    ("keep", ["train", "train.checkpoint_keep=-1"], "train.checkpoint_keep=-1 must be"),
    ("lr", ["train", "optimizer.lr=-1"], "optimizer.lr=-1 must be a positive number"),
    ("method-lr", ["train", "method.lr=0"], "method.lr=0 must be a positive number"),
    ("n-particles", ["sample", "smc.n_particles=0"], "smc.n_particles=0 must be a positive"),
    ("ess", ["sample", "smc.ess_threshold=1.5"], "smc.ess_threshold=1.5 must be a number in [0, 1]"),
    ("resampling", ["sample", "smc.resampling=residual"], "smc.resampling=residual is not one of"),
    ("output-len", ["train", "task.output_len=0"], "task.output_len=0 must be a positive integer"),
    ("cond-len", ["train", "task=infilling", "task.cond_len=-1"], "task.cond_len=-1 must be"),
    ("min-count", ["train", "task.min_count=-1"], "task.min_count=-1 must be a non-negative"),
    ("epsilon", ["sample", "task.epsilon=-1"], "task.epsilon=-1 must be a non-negative number"),
    ("beta", ["sample", "task.beta=inf"], "task.beta=inf must be a finite number"),
    ("threads", ["sample", "threads=0"], "threads=0 must be auto or a positive integer"),
    ("sample-n", ["sample", "n=0"], "n=0 must be a positive integer"),
    ("collect-n", ["collect", "n=0"], "n=0 must be a positive integer"),
    ("pool-n", ["train", "exact_samples.n=0"], "exact_samples.n=0 must be a positive integer"),
    ("batch", ["collect", "exact_samples.batch_size=0"], "exact_samples.batch_size=0 must be"),
    ("draws", ["train", "exact_samples.max_draws=0"], "exact_samples.max_draws=0 must be"),
    ("n-exact", ["eval", "evaluator=bounds", "evaluator.n_exact=0"], "evaluator.n_exact=0 must"),
    (
        "max-batch-particles",
        ["eval", "evaluator=bounds", "evaluator.max_batch_particles=0"],
        "evaluator.max_batch_particles=0 must",
    ),
    ("n-g-q", ["eval", "evaluator=bounds", "evaluator.n_g_q=0"], "evaluator.n_g_q=0 must be null"),
    ("max-seq", ["eval", "evaluator=exact", "evaluator.max_sequences=0"], "max_sequences=0 must"),
    ("hidden", ["train", "twist.hidden_mult=0"], "twist.hidden_mult=0 must be a positive"),
    ("layers", ["train", "twist.n_layers=0"], "twist.n_layers=0 must be a positive integer"),
    # evaluator.particles empty or not positive
    ("particles-empty", ["eval", "evaluator=bounds", "evaluator.particles=[]"],
     "evaluator.particles=[] must be a non-empty list of positive integers"),
    ("particles-zero", ["train", "evaluator=bounds", "evaluator.particles=[0,4]"],
     "evaluator.particles=[0, 4] must be a non-empty list"),
    # run= and checkpoint= that do not exist
    ("eval-run", ["eval", "run=no/such/run"], "run=no/such/run: no such directory"),
    ("sample-run", ["sample", "run=no/such/run"], "run=no/such/run: no such directory"),
    ("no-checkpoints", ["eval", f"run={FIX}/empty"], "has no checkpoints"),
    ("checkpoint", ["eval", f"run={FIX}/run", "checkpoint=step_9"],
     "checkpoint=step_9: not a checkpoint directory"),
    ("sample-checkpoint", ["sample", f"run={FIX}/run", "checkpoint=step_9"], "(it has: step_0"),
    # table and plot
    ("table-empty", ["table", f"{FIX}/empty"], "no runs found"),
    ("plot-empty", ["plot", f"{FIX}/empty"], "no runs found"),
    ("plot-missing", ["plot", "no/such/dir"], "no such directory"),
    ("plot-usage", ["plot"], "usage: smclm plot"),
    # these load the (toy) model first
    ("damaged-checkpoint", ["eval", f"run={FIX}/damaged"], "params.safetensors cannot be read"),
    ("context", ["sample", "task.output_len=100"], "= 101 tokens is longer than model.name=toy"),
    # (infilling's T + c and a GPT-2's n_positions: tests/test_lifecycle.py)
    ("cond-length", ["sample", "task=infilling", "model=toy", "twist=mlp", "task.prompt=the",
                     "task.output_len=2", "task.cond_len=2", "cond=the cat sat"],
     "is 3 tokens but task.cond_len=2"),
    ("prompt", ["sample", "task.prompt=zebra"], "task.prompt"),
    ("enumeration", ["eval", "evaluator=exact", "task.output_len=8"], "evaluator=exact enumerates"),
    ("model-dir", ["sample", "model.name=/no/such/model/dir"], "no such directory"),
]  # fmt: skip


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run_case(root: Path, fixtures: Path, case_id: str, args: list[str]):
    """Run one case in its own working directory; return (process, files outside the run dir,
    whether the exact-sample cache was touched)."""
    cwd = root / case_id
    cwd.mkdir()
    args = [a.replace(FIX, str(fixtures)) for a in args]
    if args[0] in HYDRA_COMMANDS:
        key = "hydra.sweep.dir" if "-m" in args else "hydra.run.dir"
        args.append(f"{key}={cwd / 'run'}")
    proc = run_smclm(*args, cwd=cwd, env={"SMCLM_CACHE": cwd / "cache"})
    outside = [
        str(p.relative_to(cwd))
        for p in cwd.rglob("*")
        if p.is_file() and "run" not in p.relative_to(cwd).parts[:1]
    ]
    return proc, outside


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's (process, files written outside its run dir), run concurrently once; and
    whether the fixtures (a real run, a damaged copy, an empty dir) are unchanged."""
    from hydra import compose, initialize_config_module

    from smclm.train import train

    fixtures = tmp_path_factory.mktemp("fixtures")
    (fixtures / "empty").mkdir()
    overrides = ["train.updates=1", "task.output_len=3", "smc.n_particles=8",
                 "train.progress=false", "evaluator=exact"]  # fmt: skip
    with initialize_config_module("smclm.configs", version_base="1.3"):
        train(compose("train", overrides=overrides), fixtures / "run")
    shutil.copytree(fixtures / "run", fixtures / "damaged")
    newest = fixtures / "damaged" / "checkpoints" / "step_1" / "params.safetensors"
    newest.write_bytes(newest.read_bytes()[:64])  # truncated
    before = snapshot(fixtures)
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(CONCURRENT) as pool:
        futures = {c: pool.submit(run_case, root, fixtures, c, args) for c, args, _ in CASES}
        out = {c: f.result() for c, f in futures.items()}
    return out, snapshot(fixtures) == before


def test_there_are_at_least_25_cases_across_every_command():
    commands = {args[0] for _, args, _ in CASES}
    assert len(CASES) >= 25 and len({c for c, _, _ in CASES}) == len(CASES)
    assert {"train", "eval", "sample", "collect", "table", "plot"} <= commands


@pytest.mark.parametrize("case_id,args,needle", CASES, ids=[c for c, _, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(results, case_id, args, needle):
    out, fixtures_unchanged = results
    proc, outside = out[case_id]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("smclm: error: "), proc.stderr[-3000:]
    assert needle in lines[0], lines[0]
    assert outside == [], outside  # nothing outside the run dir, no exact-sample cache
    assert fixtures_unchanged
