"""Runs that describe themselves: directory names that say what ran, failed runs that
say they failed, and checkpoints that carry the config they were trained with.

A run directory is `outputs/runs/<run name>/<start time>` (multiruns: `<job>_<run
name>`). It is finished when it holds metrics.json; a run that failed or was refused is
renamed `<start time>_FAILED` and holds FAILED with the reason."""

from __future__ import annotations

import functools
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from sar_exp.errors import ConfigError

# What a checkpoint is a model *of*: testing it needs the same values.
IDENTITY = ("task", "method", "backbone", "dataset")
CHECKPOINT_KEY = "sar_exp"
FINISHED, FAILED = "metrics.json", "FAILED"


def run_name(method, backbone: str, source: str, protocol: str, task: str, eval_mode: str,
             seed, ckpt_path=None, train=True) -> str:  # fmt: skip
    """What distinguishes a run: method (with its switched-off parts), backbone, dataset,
    protocol, task and evaluation mode when not the default, and the seed. Testing a
    checkpoint is named after the run that trained it."""
    if not _as_bool(train) and ckpt_path and Path(str(ckpt_path)).is_file():
        stored = stored_config(str(ckpt_path))
        if stored is not None:
            return "test-of_" + stored["run_name"]
    module = method.get("module", {}) if isinstance(method, DictConfig | dict) else {}
    off = [f"-no_{k.removeprefix('use_')}" for k, v in module.items() if k.startswith("use_") and v is False]  # fmt: skip
    parts = [str(method.name) + "".join(off), str(backbone), str(source), str(protocol)]
    if task != "ranking":
        parts.append(str(task))
    if eval_mode != "sampled":
        parts.append(f"{eval_mode}-ranking")
    return "_".join([*parts, f"seed{seed}"])


def _as_bool(value) -> bool:
    return str(value).lower() not in ("false", "0", "no")


def run_dir(base: str, ckpt_path=None) -> str:
    """A new `<base>/<start time>`; with ckpt_path=last, the newest unfinished run of the
    same name that left a last.ckpt, so the run goes on in its own directory."""
    if str(ckpt_path) == "last":
        found = latest_unfinished(Path(base))
        if found is not None:
            return str(found)
    return f"{base}/{datetime.now():%Y-%m-%d_%H-%M-%S}"


def latest_unfinished(base: Path) -> Path | None:
    candidates = [
        d
        for d in sorted(base.glob("*")) if d.is_dir()
        and (d / "checkpoints" / "last.ckpt").is_file() and not (d / FINISHED).exists()
    ]  # fmt: skip
    return candidates[-1] if candidates else None


def mark_failed(output_dir: Path, reason: str) -> Path:
    """FAILED (with the reason) in the run directory, renamed `<name>_FAILED`, so no
    failed or refused run looks like a finished one."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir() or (output_dir / FINISHED).exists():
        return output_dir
    (output_dir / FAILED).write_text(reason.rstrip() + "\n")
    if output_dir.name.endswith("_FAILED"):
        return output_dir
    target = output_dir.with_name(output_dir.name + "_FAILED")
    if target.exists():
        return output_dir
    output_dir.rename(target)
    return target


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
    return checkpoint.get(CHECKPOINT_KEY, {}).get("config")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
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


def restore_from_checkpoint(cfg: DictConfig, ckpt_path: str, overrides: list[str]) -> DictConfig:
    """`train=false ckpt_path=FILE`: test the model as it was trained. Its method,
    backbone, task and dataset (protocol included) come from the checkpoint; an
    override that says otherwise is refused."""
    stored = stored_config(ckpt_path)
    if stored is None:
        return cfg
    current = identity(cfg)
    differing = {
        path: (value, stored_value)
        for path, stored_value in _flatten({k: stored[k] for k in IDENTITY}).items()
        if (value := _flatten({k: current[k] for k in IDENTITY}).get(path)) != stored_value
    }
    for override in overrides:
        for scope in _override_paths(override):
            clash = sorted(p for p in differing if p == scope or p.startswith(scope + "."))
            if clash:
                trained = _describe(clash[0], differing[clash[0]][1])
                raise ConfigError(
                    f"ckpt_path={ckpt_path} was trained with {trained}; the override {override} "
                    "contradicts it (leave it out to test the checkpoint)"
                )
    with open_dict(cfg):
        for key in IDENTITY:
            OmegaConf.update(cfg, key, stored[key], merge=False)
    return cfg
