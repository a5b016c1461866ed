"""`smclm <command> [overrides]`: a thin dispatcher over one @hydra.main function per command.

Hydra commands (config overrides, -m multirun, --cfg job, --help): train, eval, sample, collect.
Plain commands (a directory argument): table, plot.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from smclm.errors import UserError

USAGE = """usage: smclm <command> [hydra overrides]

commands:
  train    train twists (e.g. smclm train task=toy method=ctl), evaluating on a schedule
  eval     evaluate a trained run (run=<dir>) or the configured model/task/twist
  sample   print SMC samples with weights and log Z-hat (run=<dir> to use a trained twist)
  collect  collect exact target samples into the cache (task=... n=2000)
  table    smclm table <sweep dir>: KL table (table.md, table.csv) from runs' summary.json
  plot     smclm plot <run or sweep dir>: log-Z bounds vs particles, KL vs updates (PNG)

Hydra options work after the command: -m (multirun), --cfg job, --help.
"""

def _config_path() -> str:
    from smclm.config import config_dir

    return str(config_dir())  # absolute: configs/ is installed as smclm.configs


CONFIG_PATH = _config_path()


def _fail(msg: str) -> None:
    print(f"smclm: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _one_line_errors(fn):
    """Hydra prints a traceback for any exception; ours are one line and exit status 2."""
    import functools

    from smclm.smc.sampler import ParticleCollapseError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, ValueError, ParticleCollapseError) as e:
            if os.environ.get("SMCLM_DEBUG"):
                raise
            _fail(str(e))
        except Exception as e:
            from smclm.train import Interrupted

            if not isinstance(e, Interrupted):
                raise
            print(f"smclm: {e}", file=sys.stderr)
            sys.exit(128 + e.signum)

    return wrapper


def _run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@_one_line_errors
def train_main(cfg: DictConfig) -> None:
    from smclm.train import train

    summary = train(cfg, _run_dir())
    keys = [
        k
        for k in (
            "kl/q_sigma_exact",
            "kl/sigma_q_exact",
            "kl/q_sigma",
            "kl/sigma_q",
            "log_z/exact",
            "log_z/estimate",
        )
        if k in summary
    ]
    print(f"run dir: {_run_dir()}")
    for k in keys:
        print(f"  {k:22s} {summary[k]}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
@_one_line_errors
def eval_main(cfg: DictConfig) -> None:
    from smclm.evaluate import evaluate

    out_dir = None if cfg.get("run") else _run_dir()
    summary = evaluate(cfg, out_dir)
    where = Path(cfg.run) / "eval" if cfg.get("run") else out_dir
    print(f"wrote {where / 'summary.json'}")
    for k, v in sorted(summary.items()):
        if k.startswith(("log_z/", "kl/")) or k.count("/") == 1 and k.startswith("bounds"):
            print(f"  {k:30s} {v}")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="sample")
@_one_line_errors
def sample_main(cfg: DictConfig) -> None:
    from smclm.sample import sample

    sample(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="collect")
@_one_line_errors
def collect_main(cfg: DictConfig) -> None:
    from smclm.sample import collect

    collect(cfg)


def _dir_command(name: str, argv: list[str]) -> None:
    if len(argv) != 1 or argv[0].startswith("-"):
        _fail(f"usage: smclm {name} <run or sweep directory>")
    root = Path(argv[0])
    if not root.is_dir():
        _fail(f"{root}: no such directory; give a run or sweep directory")
    if name == "table":
        from smclm.report.table import make_table

        markdown, _ = make_table(root)
        print(markdown)
        print(f"wrote {root / 'table.md'} and {root / 'table.csv'}")
    else:
        from smclm.report.plot import make_plots

        for path in make_plots(root):
            print(f"wrote {path}")


HYDRA_COMMANDS = {
    "train": train_main,
    "eval": eval_main,
    "sample": sample_main,
    "collect": collect_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-h", "--help", "help"):
        print(USAGE)
        return
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    try:
        if cmd in ("table", "plot"):
            _dir_command(cmd, rest)
            return
        if cmd not in HYDRA_COMMANDS:
            _fail(
                f"unknown command '{cmd}'; choose one of: {', '.join([*HYDRA_COMMANDS, 'table', 'plot'])}"
            )
        from smclm.config import check_group_overrides

        check_group_overrides(rest)
        sys.argv = [f"smclm {cmd}", *rest]
        HYDRA_COMMANDS[cmd]()
    except (UserError, ValueError) as e:
        if os.environ.get("SMCLM_DEBUG"):
            raise
        _fail(str(e))


if __name__ == "__main__":
    main()
