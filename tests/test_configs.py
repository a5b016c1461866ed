"""The printed config is the config that runs: per-method experiment settings by Hydra
specialisation (compose, `--cfg job` and a run's config.yaml agree; the command line wins); user
config directories on the search path; `--help` lists every group; a non-editable install finds
its configs (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_smclm
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from smclm.config import check_group_overrides, config_dir, search_dirs
from smclm.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# What each paper setting sets for each learner (paper-spec §8; positives and particles per o as
# in §4.6 where smclm has them; PPO/GFlowNet policy and lr from baselines-spec A1/B4.5). Keys not
# listed keep the method's own default.
PAPER = {
    "toxicity_threshold": {  # Figure 3 ran CTL only; the others start from its lr
        **{m: {"lr": 1e-4} for m in ("ctl", "sixo", "fudge", "dpg")},
        "rl": {"lr": 1e-4, "positives": "sis"},  # the paper's rl_q_lsq, not smclm's snis default
        "ppo": {"lr": 1e-6, "policy": "full"},
        "gfn": {"lr": 1e-4, "policy": "mlp_head"},
    },
    "toxicity_classifier": {
        **{m: {"lr": 3e-5} for m in ("ctl", "sixo", "dpg")},
        "rl": {"lr": 3e-5, "positives": "sis"},
        "fudge": {"lr": 1e-4},
        "ppo": {"lr": 1e-6, "policy": "full"},
        "gfn": {"lr": 1e-6, "policy": "full"},
    },
    "sentiment": {
        **{m: {"lr": 1e-4} for m in ("ctl", "sixo", "dpg")},
        "rl": {"lr": 1e-4, "positives": "sis"},
        "fudge": {"lr": 1e-3},
        "ppo": {"lr": 1e-5, "policy": "mlp_head"},
        "gfn": {"lr": 1e-4, "policy": "mlp_head"},
    },
    "infilling_15": {  # CTL: 25 o × 4 particles, conditional-SMC positives; exact σ elsewhere
        "ctl": {"lr": 3e-6, "positives": "csmc", "particles_per_cond": 4},
        "rl": {"lr": 3e-5, "positives": "exact"},
        "sixo": {"lr": 1e-4, "positives": "exact"},
        "fudge": {"lr": 1e-6},
        "dpg": {"lr": 1e-4, "positives": "exact"},
        "ppo": {"lr": 3e-5, "policy": "separate_conditional"},
        "gfn": {"lr": 1e-4, "policy": "separate_conditional", "log_z": "conditional"},
    },
    "infilling_2": {  # all twist learners at 1e-4, CTL 10 o × 10 particles; PPO 3e-5
        "ctl": {"lr": 1e-4, "positives": "csmc", "particles_per_cond": 10},
        **{m: {"lr": 1e-4, "positives": "exact"} for m in ("rl", "sixo", "dpg")},
        "fudge": {"lr": 1e-4},
        "ppo": {"lr": 3e-5, "policy": "separate_conditional"},
        "gfn": {"lr": 1e-4, "policy": "separate_conditional", "log_z": "conditional"},
    },
}
METHODS = ["ctl", "rl", "sixo", "fudge", "dpg", "ppo", "gfn"]
KEYS = ("lr", "positives", "particles_per_cond", "policy", "log_z")


def _compose(*overrides):
    with initialize_config_module("smclm.configs", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _settings(method_cfg) -> dict:
    return {k: method_cfg.get(k) for k in KEYS}


def test_every_paper_experiment_and_method_composes_to_the_paper_settings():
    with initialize_config_module("smclm.configs", version_base="1.3"):
        for method in METHODS:
            default = _settings(compose("train", [f"method={method}"]).method)
            for exp, per in PAPER.items():
                cfg = compose("train", [f"experiment={exp}", f"method={method}"])
                assert cfg.method.name == method, (exp, method)
                assert _settings(cfg.method) == {**default, **per[method]}, (exp, method)
                assert cfg.optimizer.lr == per[method]["lr"], (exp, method)
                assert "per_method" not in cfg  # nothing is merged after composition any more


def test_command_line_overrides_win_over_the_experiment_settings():
    cfg = _compose(
        "experiment=infilling_15",
        "method=ctl",
        "method.lr=0.5",
        "method.positives=exact",
        "method.particles_per_cond=2",
    )
    assert (cfg.optimizer.lr, cfg.method.positives, cfg.method.particles_per_cond) == (
        0.5,
        "exact",
        2,
    )
    cfg = _compose("experiment=sentiment", "method=fudge", "optimizer.lr=0.25")
    assert cfg.optimizer.lr == 0.25 and cfg.method.lr == 1e-3


def smclm(*args, cwd, env_extra=None):
    return run_smclm(*args, cwd=cwd, env=env_extra)


def _yaml(text: str) -> dict:
    return OmegaConf.to_container(OmegaConf.create(text))


def test_cfg_job_shows_what_the_run_records(tmp_path):
    """`--cfg job` of a paper setting equals the run's config.yaml (one update on the toy LM)."""
    run = tmp_path / "run"
    args = [
        "experiment=infilling_2",
        "method=ctl",
        "model=toy",  # the paper's setting on the offline toy LM
        "task.prompt=the",
        "train.updates=1",
        "train.progress=false",
        "evaluator=none",
        "exact_samples.n=100",
        f"hydra.run.dir={run}",
    ]
    env = {"SMCLM_CACHE": str(tmp_path / "cache")}
    printed = smclm("train", *args, "--cfg", "job", "--resolve", cwd=tmp_path, env_extra=env)
    assert printed.returncode == 0, printed.stderr
    shown = _yaml(printed.stdout)
    proc = smclm("train", *args, cwd=tmp_path, env_extra=env)
    assert proc.returncode == 0, proc.stderr
    recorded = _yaml((run / "config.yaml").read_text())
    assert shown["method"] == recorded["method"]
    assert (shown["method"]["lr"], shown["method"]["positives"]) == (1e-4, "csmc")
    assert shown["method"]["particles_per_cond"] == 10 and recorded["optimizer"]["lr"] == 1e-4
    for key in ("task", "smc", "train", "twist", "exact_samples", "optimizer"):
        assert shown[key] == recorded[key], key


def test_help_lists_every_config_group(tmp_path):
    proc = smclm("train", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    groups = {
        str(p.parent.relative_to(config_dir()))
        for p in config_dir().rglob("*.yaml")
        if p.parent != config_dir() and p.parent.parent.name != "hydra"  # Hydra's own groups
    }
    assert {
        "task",
        "model",
        "method",
        "twist",
        "smc",
        "evaluator",
        "logger",
        "experiment",
    } <= groups
    listed = {
        line.split(":")[0]
        for line in proc.stdout.split("== Config ==")[0].splitlines()
        if ":" in line
    }
    assert groups <= listed, groups - listed


def test_user_config_dirs_join_the_group_check(tmp_path, monkeypatch):
    mine = tmp_path / "my_configs"
    (mine / "task").mkdir(parents=True)
    (mine / "task" / "my_task.yaml").write_text("_target_: my.task\n")
    monkeypatch.delenv("SMCLM_CONFIG_PATH", raising=False)
    with pytest.raises(
        ConfigError, match="unknown task 'my_task'; choose one of: arithmetic, classifier"
    ):
        check_group_overrides(["task=my_task"])
    check_group_overrides([f"hydra.searchpath=[file://{mine}]", "task=my_task,toy"])
    # the user's options listed too
    with pytest.raises(ConfigError, match="my_task, next_sentence, sentiment"):
        check_group_overrides([f"hydra.searchpath=[file://{mine}]", "task=nope"])
    monkeypatch.setenv("SMCLM_CONFIG_PATH", str(mine))
    check_group_overrides(["task=my_task"])
    assert search_dirs([]) == [config_dir(), mine]
    assert search_dirs(["hydra.searchpath=[pkg://smclm.configs]"]) == [config_dir()] * 2


@pytest.mark.slow
def test_a_non_editable_install_finds_its_configs(tmp_path):
    """Build a wheel, install it (no deps) into a fresh venv that borrows this environment's
    site-packages for torch, Hydra and transformers, and run the installed `smclm` from an
    unrelated directory."""
    import shutil
    import site
    import sysconfig

    src = tmp_path / "src"  # build from a copy: setuptools writes build/ next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("smclm", "configs"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",  # the build backend's messages too
            "--no-deps",
            "--no-build-isolation",
            "-w",
            wheels,
            src,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr
    assert "would be ignored" not in build.stdout + build.stderr  # every config folder is listed
    (wheel,) = wheels.glob("smclm-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "--no-index", wheel],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr
    venv_site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # our site-packages after the venv's own: dependencies only (a path line in a .pth does not
    # run that directory's .pth files, so the editable smclm there stays inactive)
    ours = sysconfig.get_paths()["purelib"]
    Path(venv_site, "zz_deps.pth").write_text("\n".join([ours, *site.getsitepackages()]) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SMCLM_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    smclm_bin = venv / "bin" / "smclm"

    def run(*args):
        return subprocess.run(
            [smclm_bin, *args], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=300
        )

    where = subprocess.run(
        [py, "-c", "import smclm.config as c; print(c.config_dir())"],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout  # the installed copy
    job = run("train", "experiment=infilling_15", "method=ctl", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    shown = _yaml(job.stdout)
    assert (shown["method"]["lr"], shown["method"]["positives"]) == (3e-6, "csmc")
    helped = run("train", "--help")
    assert helped.returncode == 0, helped.stderr
    for group in ("task", "method", "twist", "experiment", "per_method/infilling_15"):
        assert f"\n{group}: " in helped.stdout, group
    trained = run("train", "train.updates=1", "train.progress=false", "hydra.run.dir=run")
    assert trained.returncode == 0, trained.stderr
    assert (elsewhere / "run" / "summary.json").is_file()


def test_method_configs_name_the_registered_learners():
    """configs/method/<name>.yaml and ``build_method(<name>)`` build the same learner."""
    from smclm.methods import METHODS

    files = sorted((config_dir() / "method").glob("*.yaml"))
    for path in files:
        cfg = OmegaConf.load(path)
        assert cfg.name == path.stem
        if path.stem == "none":  # no learner
            assert "_target_" not in cfg
        else:
            assert cfg._target_ == METHODS[path.stem], path.stem
    assert sorted(METHODS) == sorted(p.stem for p in files if p.stem != "none")


def test_eval_and_sample_take_an_experiment_without_its_train_section():
    """An experiment sets train.* for `smclm train`; eval/sample of the configured model (no
    run=) read none of it, so `smclm eval experiment=… method=none` is not refused as a
    training config (it was: "smclm train needs a learner")."""
    from smclm.config import validate

    with initialize_config_module("smclm.configs", version_base="1.3"):
        cfg = compose("eval", ["experiment=gfn_arithmetic", "method=none", "twist=none"])
    assert cfg.train.updates == 2000  # the experiment's train section is in the composed config
    validate(cfg, training=False)
    with pytest.raises(ConfigError, match="needs a learner"):
        validate(cfg)  # smclm train's check still refuses it
