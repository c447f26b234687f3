"""Runs that describe themselves: directory names that say what ran, failed runs that
say they failed, and checkpoints that carry the config they were trained with.

A run directory is `outputs/runs/<run name>/<start time>` (multiruns: `<job>_<run
name>`). It is finished when it holds metrics.json; a run that failed or was refused is
renamed `<start time>_FAILED` and holds FAILED with the reason."""

from __future__ import annotations

import fcntl
import functools
import os
import re
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from sar_exp.errors import ConfigError

# What a checkpoint is a model *of*: testing it needs the same values.
IDENTITY = ("task", "method", "backbone", "dataset")
CHECKPOINT_KEY = "sar_exp"
FINISHED, FAILED, LOCK = "metrics.json", "FAILED", ".lock"
# Config keys that differ between runs of one configuration without changing what is
# computed: where a run writes, how it reports, whether it resumed, and which other
# backbones and tasks the method accepts (a release that adds one changes no run).
INCIDENTAL = re.compile(
    r"^(seed|run_name|data\.seed|data\.cache_dir|ckpt_path|paths\..*|logger\..*|hydra\..*"
    r"|callbacks\.progress_bar\..*|callbacks\.(model|last)_checkpoint\.dirpath"
    r"|trainer\.(enable_progress_bar|default_root_dir)|method\.(backbones|tasks))$"
)


def run_name(method, backbone, source: str, protocol: str, task: str, eval_mode: str,
             seed, ckpt_path=None, train=True) -> str:  # fmt: skip
    """What distinguishes a run: method (with its switched-off parts), backbone (with
    its switched-on options), dataset, protocol, task and evaluation mode when not the
    default, and the seed. Testing a checkpoint is named after the run that trained it."""
    full_ranking = [f"{eval_mode}-ranking"] if eval_mode != "sampled" else []
    if not _as_bool(train) and ckpt_path:
        path = Path(str(ckpt_path)).expanduser()
        stored = stored_config(str(path)) if path.is_file() else None
        if stored is not None:
            return "_".join(["test-of_" + stored["run_name"], *full_ranking])
    module = _get(method, "module")
    off = [f"-no_{k.removeprefix('use_')}" for k, v in module.items() if k.startswith("use_") and v is False]  # fmt: skip
    encoder = _get(backbone, "encoder")
    on = [f"+{k.removeprefix('use_')}" for k, v in encoder.items() if k.startswith("use_") and v is True]  # fmt: skip
    name = backbone.get("name") if isinstance(backbone, DictConfig | dict) else backbone
    parts = [str(method.name) + "".join(off), str(name) + "".join(on), str(source), str(protocol)]
    if task != "ranking":
        parts.append(str(task))
    return "_".join([*parts, *full_ranking, f"seed{seed}"])


def _get(node, key: str) -> dict:
    return dict(node.get(key) or {}) if isinstance(node, DictConfig | dict) else {}


def _as_bool(value) -> bool:
    return str(value).lower() not in ("false", "0", "no")


@functools.cache
def run_dir(base: str, ckpt_path=None, train=True) -> str:
    """A new `<base>/<start time>` (created here, with a -2, -3... suffix when another
    run of the same name started in the same second); with ckpt_path=last and training,
    the newest unfinished run of the same name that left a last.ckpt and is not running,
    so the run goes on in its own directory. Cached: the answer stays the same however
    often the config is read (Lightning reads it again to start DDP ranks)."""
    if str(ckpt_path) == "last" and _as_bool(train):
        found = latest_unfinished(Path(base))
        if found is not None:
            return str(found)
    stamp = f"{base}/{datetime.now():%Y-%m-%d_%H-%M-%S}"
    for attempt in range(1, 1000):
        candidate = Path(stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            candidate.mkdir(parents=True)
            return str(candidate)
        except FileExistsError:
            continue
    raise ConfigError(f"could not create a new run directory under {base}")


def latest_unfinished(base: Path) -> Path | None:
    """The newest run directory with a last.ckpt, no metrics.json, not marked FAILED and
    not held by a running process."""
    candidates = [
        d
        for d in sorted(base.glob("*")) if d.is_dir() and not d.name.endswith("_FAILED")
        and (d / "checkpoints" / "last.ckpt").is_file() and not (d / FINISHED).exists()
        and not _locked(d)
    ]  # fmt: skip
    return candidates[-1] if candidates else None


_held_locks: dict[str, int] = {}


def _locked(run: Path) -> bool:
    path = run / LOCK
    if str(path) in _held_locks or not path.exists():
        return str(path) in _held_locks
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we just took
    return False


def hold_run_lock(run: Path) -> None:
    """Held until the process ends: `ckpt_path=last` never joins a run still going."""
    path = Path(run) / LOCK
    if str(path) in _held_locks:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"another process is running in {run}") from None
    _held_locks[str(path)] = fd


def release_run_lock(run: Path) -> None:
    fd = _held_locks.pop(str(Path(run) / LOCK), None)
    if fd is not None:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write beside `path` under a name of this process and rename into place: a reader
    never sees half a file, and two writers never share a temporary file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark_failed(output_dir: Path, reason: str) -> Path:
    """FAILED (with the reason) in the run directory, renamed `<name>_FAILED`, so no
    failed or refused run looks like a finished one."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir() or (output_dir / FINISHED).exists():
        return output_dir
    write_atomic(output_dir / FAILED, reason.rstrip() + "\n")
    if output_dir.name.endswith("_FAILED"):
        return output_dir
    target = output_dir.with_name(output_dir.name + "_FAILED")
    if target.exists():
        return output_dir
    output_dir.rename(target)
    return target


def check_same_run(output_dir: Path, cfg: DictConfig) -> None:
    """Resuming in a run directory needs the config that run was started with (a longer
    trainer.max_epochs aside): anything else would mix two runs in one."""
    for key, before, now in config_changes(output_dir, cfg)[:1]:
        raise ConfigError(
            f"ckpt_path resumes the run in {output_dir}, which was started with "
            f"{key}={before}; this command has {key}={now}"
        )


def config_changes(output_dir: Path, cfg: DictConfig) -> list[tuple[str, object, object]]:
    """(key, the run's value, cfg's value) for each setting of the run in output_dir
    (its config.yaml; none: no changes known) that cfg changes, incidental ones and
    trainer.max_epochs aside. A key the run's config did not have yet (added by a later
    release) held its default, which the run used all along: it is a change only where
    cfg sets it to something else (a protocol or method preset that uses the new key).
    A new key whose default the code does not declare (outside the protocol, the
    generator and method.module) is a change when cfg gives it a value (not null): such
    keys are added as null, and set where they change what runs (AUG's
    method.companion_negatives)."""
    recorded = output_dir / "config.yaml"
    if not recorded.exists():
        return []
    before = flatten(OmegaConf.to_container(OmegaConf.load(recorded), resolve=False))
    now = flatten(OmegaConf.to_container(cfg, resolve=True))
    allowed = re.compile(INCIDENTAL.pattern + r"|^(train|trainer\.max_epochs)$")
    changed = [(key, before.get(key), now.get(key)) for key in sorted(before)
               if not allowed.match(key) and before.get(key) != now.get(key)]  # fmt: skip
    defaults = _defaults_of_new_keys(cfg)
    added = [key for key in sorted(set(now) - set(before)) if not allowed.match(key)]
    changed += [(key, "(not recorded: its default, " + repr(defaults[key]) + ")", now[key])
                for key in added if key in defaults and now[key] != defaults[key]]  # fmt: skip
    # (a method.module key its constructor takes through **kwargs declares no default:
    # as before, it is not a change)
    changed += [(key, "(not recorded)", now[key]) for key in added
                if key not in defaults and now[key] is not None
                and not key.startswith("method.module.")]  # fmt: skip
    return changed


def _defaults_of_new_keys(cfg: DictConfig) -> dict[str, object]:
    """The code's defaults of the settings a later release may add: the protocol's fields
    (dataset.protocol.*), the embedded generator's knobs (dataset.synthetic.*), both also
    as the datamodule's copies (data.protocol.*, data.synthetic.*), and the method's
    constructor arguments (method.module.*)."""
    import dataclasses
    import inspect

    from hydra.utils import get_class

    from sar_exp.data.synthetic import SyntheticConfig
    from sar_exp.data.views import Protocol

    out = {f"{group}.{section}.{f.name}": f.default for group in ("dataset", "data")
           for section, fields in (("protocol", Protocol), ("synthetic", SyntheticConfig))
           for f in dataclasses.fields(fields) if f.default is not dataclasses.MISSING}  # fmt: skip
    target = OmegaConf.select(cfg, "method.module._target_")
    if target:
        try:
            parameters = inspect.signature(get_class(target).__init__).parameters.values()
        except Exception:  # a target that does not import: nothing known
            parameters = []
        out.update({f"method.module.{p.name}": p.default for p in parameters
                    if p.default is not inspect.Parameter.empty})  # fmt: skip
    return {key: list(v) if isinstance(v, tuple) else v for key, v in out.items()}


# ------------------------------------------------------------------ checkpoints


def identity(cfg: DictConfig) -> dict:
    """The resolved config sections a checkpoint depends on, plus the run's name."""
    values = {key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig)
              else cfg[key] for key in IDENTITY}  # fmt: skip
    values["run_name"] = str(cfg.get("run_name", ""))
    return values


@functools.lru_cache(maxsize=8)
def stored_config(ckpt_path: str) -> dict | None:
    """The config a checkpoint was trained with (None for checkpoints from before it
    was stored)."""
    import torch

    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"ckpt_path={ckpt_path}: not a readable checkpoint ({err})") from None
    if not isinstance(checkpoint, dict):
        raise ConfigError(f"ckpt_path={ckpt_path}: not a Lightning checkpoint")
    return (checkpoint.get(CHECKPOINT_KEY) or {}).get("config")


def flatten(node, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; lists are leaves."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


# A group choice on the command line names a method, backbone, dataset or protocol: it
# contradicts a checkpoint only if that name differs (its other values may have been
# overridden when the checkpoint was trained).
CHOICE_PATHS = {"method": "method.name", "backbone": "backbone.name", "dataset": "dataset.source",
                "protocol": "dataset.protocol.name", "task": "task"}  # fmt: skip


def _override_paths(override: str) -> list[str]:
    """The identity values an override sets (dotted paths), none if it sets none."""
    key = override.lstrip("+~").split("=", 1)[0]
    top = key.split(".")[0]
    if key == "experiment":
        return list(CHOICE_PATHS.values())
    if key in CHOICE_PATHS:
        return [CHOICE_PATHS[key]]
    return [key] if top in IDENTITY else []


def _describe(path: str, value) -> str:
    """`method=clardrec` for a group's name, else `key=value`."""
    group = {v: k for k, v in CHOICE_PATHS.items()}.get(path)
    return f"{group or path}={value}"


# Where the data lives may change (another machine, a moved folder) without changing
# what the model is: a given dataset.path replaces the stored one.
MOVABLE = ("dataset.path",)


def restore_from_checkpoint(cfg: DictConfig, ckpt_path: str, overrides: list[str]) -> DictConfig:
    """`train=false ckpt_path=FILE`: test the model as it was trained. Its method,
    backbone, task and dataset (protocol included) come from the checkpoint; an
    override that says otherwise, or sets something the trained config did not have,
    is refused."""
    stored = stored_config(ckpt_path)
    if stored is None:
        return cfg
    given = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    moved = {key: OmegaConf.select(cfg, key) for key in MOVABLE if key in given}
    trained = flatten({k: stored[k] for k in IDENTITY})
    now = flatten({k: identity(cfg)[k] for k in IDENTITY})
    differing = {p: trained.get(p) for p in set(trained) | set(now)
                 if trained.get(p) != now.get(p) and p not in moved}  # fmt: skip
    for override in overrides:
        for scope in _override_paths(override):
            clash = sorted(p for p in differing if p == scope or p.startswith(scope + "."))
            if not clash:
                continue
            if clash[0] not in trained:
                raise ConfigError(
                    f"ckpt_path={ckpt_path} was trained without {clash[0]}; the override "
                    f"{override} contradicts it (leave it out to test the checkpoint)"
                )
            raise ConfigError(
                f"ckpt_path={ckpt_path} was trained with {_describe(clash[0], differing[clash[0]])}; "
                f"the override {override} contradicts it (leave it out to test the checkpoint)"
            )
    with open_dict(cfg):
        for key in IDENTITY:
            OmegaConf.update(cfg, key, stored[key], merge=False)
        for key, value in moved.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return cfg
