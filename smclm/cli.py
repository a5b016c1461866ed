"""`smclm <command> [overrides]`: a thin dispatcher over one @hydra.main function per command.

Hydra commands (config overrides, -m multirun, --cfg job, --help): train, eval, sample, collect.
Plain commands (a directory argument): table, plot.

Bad input of any kind is one line ``smclm: error: …`` and exit status 2: our UserErrors, and
Hydra's own composition errors (an unknown key, an override that does not parse). torch,
transformers and the package's modules are imported only inside the commands, so a mistyped
command line fails in about a second.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from smclm.errors import UserError

USAGE = """usage: smclm <command> [hydra overrides]

commands:
  train    train twists (e.g. smclm train task=toy method=ctl), evaluating on a schedule
  eval     evaluate a trained run (run=<dir>) or the configured model/task/twist
  sample   print SMC samples with weights and log Z-hat (run=<dir> to use a trained twist)
  collect  collect exact target samples into the cache (task=... n=2000)
  table    smclm table <sweep dir> [--at KEY=N] [--paper R]: KL table (table.md, table.csv),
           beside the paper's numbers for a paper setting; --at: at equal compute
  plot     smclm plot <run or sweep dir>: log-Z bounds vs particles, KL vs updates (PNG)

Hydra options work after the command: -m (multirun), --cfg job, --help.
verbose=true shows third-party log lines and warnings too (else they go to <run dir>/smclm.log).
smclm --version prints smclm's version and commit, Python, torch, transformers, the lock, the machine.
"""


def _config_path() -> str:
    from smclm.config import config_dir

    return str(config_dir())  # absolute: configs/ is installed as smclm.configs


CONFIG_PATH = _config_path()


# Only smclm speaks on the terminal. Every log record and Python warning, smclm's and third
# parties' (transformers, kernels, accelerate, gguf, Hydra), goes through the logging module: to
# <run dir>/smclm.log for train and eval (configs/hydra/job_logging/smclm.yaml), and to the
# terminal only when it is smclm's own, or with verbose=true (SMCLM_VERBOSE=1 for table/plot).
VERBOSE = False


class TerminalFilter(logging.Filter):
    """Pass smclm's own records (loggers smclm.*) to the terminal, and everything when verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        return VERBOSE or record.name == "smclm" or record.name.startswith("smclm.")


class TerminalFormatter(logging.Formatter):
    """``smclm: warning: …`` for our records; third parties' (verbose) with their logger name."""

    def format(self, record: logging.LogRecord) -> str:
        ours = record.name == "smclm" or record.name.startswith("smclm.")
        who = "smclm" if ours else f"[{record.name}]"
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        return f"{who}: {level}{record.getMessage()}"


def _set_verbose(argv: list[str]) -> None:
    """verbose=true among the overrides (or SMCLM_VERBOSE=1), read before Hydra starts."""
    global VERBOSE
    flag = os.environ.get("SMCLM_VERBOSE", "")
    for arg in argv:
        if arg.lstrip("+~").startswith("verbose="):
            flag = arg.split("=", 1)[1]
    VERBOSE = flag.strip().lower() in ("1", "true", "yes")


_TERMINAL: logging.Handler | None = None


def _terminal_logging() -> None:
    """Before Hydra (and for the commands without a run dir): the root logger writes smclm's
    records to stderr, warnings included; a run's Hydra logging config replaces this."""
    global _TERMINAL
    logging.captureWarnings(True)
    root = logging.getLogger()
    if _TERMINAL is None:
        _TERMINAL = logging.StreamHandler(sys.stderr)
        _TERMINAL.addFilter(TerminalFilter())
        _TERMINAL.setFormatter(TerminalFormatter())
    if _TERMINAL not in root.handlers:
        root.addHandler(_TERMINAL)
    root.setLevel(logging.INFO)


def _library_logs_to_root() -> None:
    """transformers writes to stderr through a handler of its own; send its records to the root
    logger instead, like every other library's, so that the rules above apply to them too."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def _fail(msg: str) -> None:
    print(f"smclm: error: {msg}", file=sys.stderr)
    sys.exit(2)


def _one_line(msg: str) -> str:
    return " ".join(line.strip() for line in str(msg).splitlines() if line.strip())


def _one_line_errors(fn):
    """Hydra prints a traceback for any exception; ours are one line and exit status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig):
        try:
            _precheck(cfg)  # before any heavy import: bad input fails in about a second
            _library_logs_to_root()
            return fn(cfg)
        except Exception as e:
            if not isinstance(e, (UserError, ValueError)):  # these need no import of torch
                from smclm.smc.sampler import ParticleCollapseError
                from smclm.train import Interrupted

                if isinstance(e, Interrupted):
                    print(f"smclm: {e}", file=sys.stderr)
                    sys.exit(128 + e.signum)
                if not isinstance(e, ParticleCollapseError):
                    raise
            if os.environ.get("SMCLM_DEBUG"):
                raise
            _fail(_one_line(str(e)))

    return wrapper


def _hydra_error(e: Exception) -> str | None:
    """One line for an error Hydra raises while composing the config (an unknown key, an
    override that does not parse), or None for anything else."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(e, (HydraException, OmegaConfBaseException)):
        return None
    from hydra.errors import OverrideParseException

    msg = _one_line(str(e))
    if isinstance(e, OverrideParseException):
        return f"cannot parse the override {e.override!r}: {msg}"
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException):
        msg += f" ({str(cause).strip().splitlines()[0]})"
    return f"{msg}; `smclm <command> --cfg job` prints every key"


def _precheck(cfg: DictConfig) -> None:
    """What can be checked before torch is imported (seconds): types and ranges of the config's
    values, and ``run=``/``checkpoint=`` directories."""
    from smclm.config import check_ranges

    check_ranges(cfg)
    if not cfg.get("run"):
        return
    from smclm.checkpoint import find_checkpoint

    find_checkpoint(cfg.run, cfg.get("checkpoint"))
    if not (Path(cfg.run) / "config.yaml").is_file():
        raise UserError(
            f"run={cfg.run} has no config.yaml; give a run directory written by smclm train"
        )


def _run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
@_one_line_errors
def train_main(cfg: DictConfig) -> None:
    from smclm.resume import Finished
    from smclm.train import train

    summary = train(cfg, _run_dir())
    if isinstance(summary, Finished):
        return  # a resume found the run complete and said so in one line
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
    if name == "table":  # <dir> [--at KEY=N] [--paper RESULT] [--out DIR]: see smclm table --help
        from smclm.report.table import table_command

        table_command(argv)
        return
    if len(argv) != 1 or argv[0].startswith("-"):
        _fail(f"usage: smclm {name} <run or sweep directory>")
    root = Path(argv[0])
    if not root.is_dir():
        _fail(f"{root}: no such directory; give a run or sweep directory")
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
    _set_verbose(rest)
    _terminal_logging()
    if cmd in ("-V", "--version", "version"):
        from smclm.envinfo import version_text

        print(version_text())
        return
    # Hydra raises its composition errors to us (one line below) instead of printing them
    os.environ["HYDRA_FULL_ERROR"] = "1"
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
    except Exception as e:
        one_line = _one_line(str(e)) if isinstance(e, (UserError, ValueError)) else None
        one_line = one_line or _hydra_error(e)
        if one_line is None or os.environ.get("SMCLM_DEBUG"):
            raise
        _fail(one_line)


if __name__ == "__main__":  # python -m smclm.cli: run the importable module's main, so that
    from smclm.cli import main as _main  # the logging configs' smclm.cli.* see its VERBOSE

    _main()
