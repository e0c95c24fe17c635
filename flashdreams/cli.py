"""Console entry points. torch is imported lazily so ``--help`` and ``--cfg`` stay fast.

Errors the user can fix (bad settings, unknown options, unreadable files) are printed as one
line naming the setting, with exit status 2; ``debug=true`` shows the traceback instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import threading
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from flashdreams import ConfigError
from flashdreams.config import schema  # noqa: F401  (registers the structured configs)
from flashdreams.config.options import hydra_choices, scope_options
from flashdreams.config.validate import check_run_config, unknown_key_error
from flashdreams.parallel.launch import failure_line, launched_rank, rank_overrides, rank_prefix

CONF_DIR = Path(__file__).parent / "conf"
GROUPS = ("model", "scheduler", "cache", "attention", "parallel", "graph", "vae",
          "text_encoder", "guidance", "image_encoder", "conditioner", "control", "logger",
          "recipe", "paths", "precision", "postprocess")  # fmt: skip


def group_options(group: str, extra_dirs: list[Path] = ()) -> list[str]:
    """YAML options available in a config group (of the package, and of ``extra_dirs``)."""
    dirs = [CONF_DIR, *extra_dirs]
    return sorted({p.stem for d in dirs for p in (Path(d) / group).glob("*.yaml")})


def extra_config_dirs(argv: list[str]) -> list[Path]:
    """Config dirs a command line adds to Hydra's search path (``--config-dir``/``-cd``,
    ``hydra.searchpath=[file://...]``): their options are valid choices too."""
    dirs = []
    for i, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and i + 1 < len(argv):
            dirs.append(Path(argv[i + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
        elif arg.startswith("hydra.searchpath="):
            for item in arg.split("=", 1)[1].strip("[]").split(","):
                if item.strip().startswith("file://"):
                    dirs.append(Path(item.strip().removeprefix("file://")))
    return dirs


def nested_groups() -> list[str]:
    """Groups inside a group's options (``control/encoder``): sub-folders of a group's folder."""
    return [f"{g}/{d.name}" for g in GROUPS for d in (CONF_DIR / g).glob("*") if d.is_dir()]


def groups_help() -> str:
    """``group: options`` lines of ``--help`` (YAML options only, not the ``base_*`` schemas)."""
    return "\n".join(
        f"{g}: {', '.join(group_options(g))}" for g in sorted([*GROUPS, *nested_groups()])
    )


OmegaConf.register_new_resolver("fd_groups_help", groups_help, replace=True)


def check_choices(argv: list[str]) -> None:
    """One-line error for ``group=unknown`` before Hydra composes anything."""
    extra, nested = extra_config_dirs(argv), nested_groups()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~").removeprefix("override ")
        if key in GROUPS or key in nested:
            allowed = group_options(key, extra)
            for choice in value.split(","):
                if choice and choice not in allowed and not choice.startswith(("choice(", "glob(")):
                    fail(f"{key}={choice}: unknown option; allowed: {', '.join(allowed)}")


def check_keys(config_name: str, argv: list[str]) -> None:
    """One-line error (exit 2) for a misspelled ``key=value`` or a ``+key`` a schema lacks."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    message = unknown_key_error(config_name, overrides, GROUPS) if overrides else None
    if message is not None:
        fail(message)


def run_dir_of_job() -> Path | None:
    """This Hydra job's output dir (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def discard_if_empty(run_dir: Path | None) -> bool:
    """Remove a run dir that holds nothing but what Hydra wrote (``.hydra/``, its log).

    A run that fails validation or is interrupted before writing anything leaves no
    directory behind. Returns True when the dir is gone.
    """
    if run_dir is None or not run_dir.is_dir():
        return run_dir is not None
    entries = list(run_dir.iterdir())
    if any(e.name != ".hydra" and not (e.is_file() and e.suffix == ".log") for e in entries):
        return False
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    run_dir.rmdir()
    return True


def interrupted_message() -> str:
    """The one line of a Ctrl-C: where the output is, if anything was written."""
    run_dir = run_dir_of_job()
    if run_dir is None or discard_if_empty(run_dir):
        return "interrupted before anything was written"
    return f"interrupted; the video and stats.json written so far are kept in {run_dir}"


def _interrupted(err: BaseException | None) -> bool:
    """True when a Ctrl-C is in ``err``'s chain of causes."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


class SweepReport(Callback):
    """Hydra callback: a multirun ends by printing where its sweep went."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir).absolute()
        print(f"flashdreams: sweep written to {sweep} (table: flashdreams-report {sweep})",
              file=sys.stderr)  # fmt: skip


def fail(message: str, code: int = 2) -> None:
    print(f"flashdreams: error: {rank_prefix()}{message}", file=sys.stderr)
    raise SystemExit(code)


OOM_HINT = ("lower the footprint with text_encoder.offload=true, precision.kv_cache=fp8, a "
            "shorter cache.window_frames, offload=blocks (graph=eager) or, for two-expert "
            "models, model.offload_idle_expert=true")  # fmt: skip


def user_error(err: BaseException) -> str | None:
    """The one-line message of a user-fixable error (also when wrapped by instantiate).

    Config and checkpoint errors carry their own line; running out of GPU memory is reported
    with what the device said and the settings that shrink the run.
    """
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    while err is not None:
        if isinstance(err, ConfigError):
            return str(err)
        if oom is not None and isinstance(err, oom):
            said = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
            return f"out of GPU memory ({said.rstrip('.')}); {OOM_HINT}"
        err = err.__cause__ or err.__context__
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name="run")
def _run(cfg: DictConfig) -> None:
    try:
        scope_options(cfg, hydra_choices())  # the recipe's keys of options it did not choose
        check_run_config(cfg)  # before any import of torch or loading
        from flashdreams.job import run_job

        run_job(cfg)
    except KeyboardInterrupt:
        fail(interrupted_message(), 130)
    except Exception as err:  # noqa: BLE001
        if _interrupted(err):  # a Ctrl-C that broke a half-done import or clean-up
            fail(interrupted_message(), 130)
        message = user_error(err)
        if message is not None:
            discard_if_empty(run_dir_of_job())
        if message is None or cfg.debug:
            if rank_prefix():  # torchrun: one line naming this rank above the traceback
                print(f"flashdreams: error: {failure_line(err)}", file=sys.stderr)
            raise
        fail(message)


def _image_flag(argv: list[str]) -> list[str]:
    """``--image PATH`` / ``--image=PATH`` -> the Hydra override ``image=PATH``."""
    out, args = [], iter(argv)
    for arg in args:
        if arg != "--image" and not arg.startswith("--image="):
            out.append(arg)
            continue
        value = arg.partition("=")[2] if "=" in arg else next(args, "")
        if not value:
            fail("--image needs a path: --image path/to/first_frame.png")
        if not re.fullmatch(r"[\w./+-]+", value):  # quote for Hydra's override grammar
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        out.append(f"image={value}")
    return out


def _exit_at_once(signum, frame) -> None:
    """Ctrl-C while starting (composing, importing, loading): nothing is written yet, so the
    process ends here, with one line. A ``KeyboardInterrupt`` raised inside an import can be
    swallowed by a library's ``except:`` and leave a module half-imported."""
    print(f"flashdreams: error: {rank_prefix()}{interrupted_message()}", file=sys.stderr,
          flush=True)  # fmt: skip
    os._exit(130)


def exit_at_once_on_ctrl_c(enable: bool) -> None:
    """While starting, Ctrl-C ends the process at once; after (``enable=False``) it raises
    ``KeyboardInterrupt`` so the video and stats written so far are closed properly."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_at_once if enable else signal.default_int_handler)


def _interruptible(main):
    """Ctrl-C anywhere (imports, composition, the run) ends with one line, exit 130."""

    def wrapped() -> None:
        exit_at_once_on_ctrl_c(True)
        try:
            main()
        except KeyboardInterrupt:
            fail("interrupted", 130)

    wrapped.__doc__ = main.__doc__
    return wrapped


@_interruptible
def run_main() -> None:
    """``flashdreams-run``: run a recipe (Hydra app); ``--image PATH`` is ``image=PATH``."""
    sys.argv[1:] = _image_flag(sys.argv[1:])
    check_choices(sys.argv[1:])
    check_keys("run", sys.argv[1:])
    sys.argv[1:] += rank_overrides()  # torchrun ranks > 0: no output dir of their own
    if "debug=true" in sys.argv[1:]:
        os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    _run()


@hydra.main(version_base="1.3", config_path="conf", config_name="bench")
def _bench(cfg: DictConfig) -> None:
    from flashdreams.bench import apply_memory_fraction, check_peer, run_bench
    from flashdreams.job import output_dir, run_job

    try:
        scope_options(cfg, hydra_choices())
        check_run_config(cfg)
        check_peer(cfg)  # before the run, not after it
        apply_memory_fraction(cfg)  # before anything is allocated
        run_job(cfg)
    except KeyboardInterrupt:
        fail(interrupted_message(), 130)
    except Exception as err:  # noqa: BLE001
        message = user_error(err)
        if message is not None:
            discard_if_empty(run_dir_of_job())
        if message is None or cfg.debug:
            raise
        fail(message)
    if launched_rank()[0] == 0:
        run_bench(cfg, output_dir(cfg))


@_interruptible
def bench_main() -> None:
    """``flashdreams-bench``: a profiled random-weight run + floor + diffusers peer (JSON)."""
    sys.argv[1:] = _image_flag(sys.argv[1:])
    check_choices(sys.argv[1:])
    check_keys("bench", sys.argv[1:])
    sys.argv[1:] += rank_overrides()  # torchrun ranks > 0: no output dir of their own
    _bench()


def report_main(argv: list[str] | None = None) -> None:
    """``flashdreams-report <sweep dir>``: table, report.csv and report.png of a sweep."""
    from flashdreams.report import main

    sys.exit(main(argv))


if __name__ == "__main__":
    run_main()
