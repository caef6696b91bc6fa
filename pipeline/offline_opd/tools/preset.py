"""Switch the active parameters (`params.yaml`) to a preset from `configs/`, or check one.

DVC reads `params.yaml` at the repo root (that is what `dvc exp run -S section.key=value` edits), so a
preset is copied there after validation; the presets themselves live in `configs/`. Stages whose
section changed rerun on the next `dvc repro`.

    opd-preset qwen3              # validate configs/qwen3.yaml, then copy it to params.yaml
    opd-preset check qwen3        # validate only (every key, cross-key and cross-stage rule, the loss)
    opd-preset check params.yaml  # a file path works too: check the active parameters
    opd-preset --list

Validation is what every stage runs at load (`offline_opd.validation`): nothing about this
machine or the model folders, which each stage checks when it starts.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from offline_opd.config import ConfigError
from offline_opd.errors import UserError
from offline_opd.validation import check_file

CONFIG_DIR = Path("configs")


def available(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def preset_path(name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """`configs/NAME.yaml`, or NAME itself when it is a YAML file's path."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return Path(name)
    src = config_dir / f"{name}.yaml"
    if not src.exists():
        raise ConfigError(f"{src}: no such preset; available: {', '.join(available(config_dir)) or 'none'}")
    return src


def check_preset(name: str, config_dir: Path = CONFIG_DIR) -> Path:
    """Validate a preset as every stage would at load; returns its path."""
    src = preset_path(name, config_dir)
    check_file(src)
    return src


def use_preset(name: str, dest: Path = Path("params.yaml"), config_dir: Path = CONFIG_DIR) -> Path:
    src = check_preset(name, config_dir)  # refuse a broken preset before it replaces a working params.yaml
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return src


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="opd-preset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("words", nargs="*", metavar="[check] NAME",
                        help="preset name, e.g. toy (the embedded default) or qwen3; `check NAME` only validates")
    parser.add_argument("--list", action="store_true", help="list the presets in configs/")
    args = parser.parse_args(argv)
    if args.list or not args.words:
        print("\n".join(available()))
        return
    check = args.words[0] == "check"
    names = args.words[1:] if check else args.words
    if len(names) != 1:
        parser.error("give one preset: `opd-preset NAME` or `opd-preset check NAME`")
    try:
        src = check_preset(names[0]) if check else use_preset(names[0])
    except UserError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        raise SystemExit(2) from None
    if check:
        print(f"{src}: valid (every section, key and cross-stage rule)")
    else:
        print(f"params.yaml <- {src}; run `dvc repro` (only stages whose section changed rerun)")


if __name__ == "__main__":
    main()
