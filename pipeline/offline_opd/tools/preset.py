"""Switch the active parameters (`params.yaml`) to a preset from `configs/`.

DVC reads `params.yaml` at the repo root (that is what `dvc exp run -S section.key=value` edits), so a
preset is copied there after validation; the presets themselves live in `configs/`. Stages whose
section changed rerun on the next `dvc repro`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from offline_opd.config import ConfigError, load_all

CONFIG_DIR = Path("configs")


def available(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml"))


def use_preset(name: str, dest: Path = Path("params.yaml"), config_dir: Path = CONFIG_DIR) -> Path:
    src = config_dir / f"{name}.yaml"
    if not src.exists():
        raise ConfigError(f"{src}: no such preset; available: {', '.join(available(config_dir)) or 'none'}")
    load_all(src)  # refuse a broken preset before it replaces a working params.yaml
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return src


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m offline_opd.tools.preset", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="preset name, e.g. toy (the embedded default) or qwen3")
    parser.add_argument("--list", action="store_true", help="list the presets in configs/")
    args = parser.parse_args(argv)
    if args.list or not args.name:
        print("\n".join(available()))
        return
    try:
        src = use_preset(args.name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"params.yaml <- {src}; run `dvc repro` (only stages whose section changed rerun)")


if __name__ == "__main__":
    main()
