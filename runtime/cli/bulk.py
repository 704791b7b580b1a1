"""The command-line side of bulk jobs: the shared option group and `run_bulk`, which `embed` and
`probe predict` call when --out is a folder (not a .npy / .jsonl file).

Imports nothing heavy at module level: the commands that use it must load instantly.
"""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Any

import click

ENGINES = ("local", "ray")


def bulk_options(f):
    """--shard-size, --overwrite, --prune, --column, --id-column, --root, --engine and the Ray options."""
    options = [
        click.option("--shard-size", type=click.IntRange(1), default=10_000, show_default=True,
                     help="Folder output: images per Parquet shard (the unit of resume)."),
        click.option("--overwrite", is_flag=True,
                     help="Folder output: replace another job's shards instead of refusing "
                          "(a rerun of the same job needs none: it embeds only new or "
                          "changed inputs)."),
        click.option("--prune", is_flag=True,
                     help="Folder output: remove the rows of inputs that are gone (default: "
                          "report them and keep them)."),
        click.option("--column", default=None,
                     help="Table inputs (.parquet/.csv): the path or image-bytes column "
                          "(default: bytes/image_bytes/jpg/png/image, else path/file/"
                          "filename/image)."),
        click.option("--id-column", default=None,
                     help="Table inputs: the column holding ids (default: id or key when "
                          "present, else the path, else TABLE#row)."),
        click.option("--root", type=click.Path(exists=True, file_okay=False), default=None,
                     help="Table inputs: folder that relative paths are read from (default: "
                          "the table's folder); paths may not leave it."),
        click.option("--engine", type=click.Choice(ENGINES), default="local",
                     show_default=True,
                     help="Folder output: local = this process; ray = actors on Ray Data "
                          "(a local Ray instance, or --address)."),
        click.option("--address", default=None,
                     help="Ray engine: cluster to join (e.g. auto, or ray://HEAD:10001); "
                          "default: start a local instance."),
        click.option("--actors", type=click.IntRange(1), default=None,
                     help="Ray engine: pipelines (actors) to run (default: CPUs / "
                          "--cpus-per-actor, or one per GPU)."),
        click.option("--cpus-per-actor", type=click.FloatRange(0, min_open=True), default=1.0,
                     show_default=True,
                     help="Ray engine: CPUs each actor reserves; its pipeline runs that many "
                          "onnxruntime threads."),
        click.option("--gpus-per-actor", type=click.FloatRange(0), default=0.0,
                     show_default=True, help="Ray engine: GPUs each actor reserves."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def probe_identity(probe_dir: str) -> str:
    """A short hash of a probe folder's files: a resumed job must use the same probe."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(probe_dir)):
        if name.startswith("probe."):
            with open(os.path.join(probe_dir, name), "rb") as f:
                digest.update(name.encode() + f.read())
    return digest.hexdigest()[:16]


def model_identity(model_dir: str, variant: str) -> tuple[dict, Any]:
    """({fingerprint, architecture, variant, dim}, description) of MODEL_DIR without opening a
    session, so that both engines identify the model the same way."""
    from runtime import load_description, resolve_model
    from runtime.probes import description_fingerprint
    try:
        description = load_description(resolve_model(model_dir, variant))
    except (FileNotFoundError, ValueError) as e:
        raise click.UsageError(str(e))
    return ({"fingerprint": description_fingerprint(description),
             "architecture": description.architecture, "variant": variant,
             "dim": int(description.feature_dim)}, description)


def load_probes(probe_dirs, description) -> list:
    from runtime.bulk.job import Probe
    from runtime.probes import ProbeMismatchError, load_probe_for
    probes, names = [], set()
    for probe_dir in probe_dirs:
        try:
            estimator = load_probe_for(description, probe_dir)
        except ProbeMismatchError as e:
            raise click.UsageError(f"probe {probe_dir} does not match the model: {e.reason}")
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise click.UsageError(f"cannot load probe {probe_dir}: {e}")
        name = "".join(c if c.isalnum() else "_" for c in os.path.basename(
            os.path.normpath(probe_dir))) or "probe"
        while name in names:
            name += "_"
        names.add(name)
        probes.append(Probe(name, estimator, probe_identity(probe_dir)))
    return probes


def _require(module: str, extra: str, what: str) -> None:
    import importlib.util
    if importlib.util.find_spec(module) is None:
        raise click.UsageError(f"{what} needs {module}: pip install 'unirep[{extra}]'")


def run_bulk(model_dir: str, inputs, out: str, *, pipeline: dict, probe_dirs=(),
             file_suffix: str = ".npy",
             shard_size: int, overwrite: bool, prune: bool = False, column, id_column, root,
             engine: str, address, actors, cpus_per_actor: float,
             gpus_per_actor: float) -> None:
    """Run (or update) a sharded job into folder `out` and print its summary (the CLI's bulk
    branch). Ctrl-C keeps the complete shards and says how to resume."""
    try:
        _run_bulk(model_dir, inputs, out, pipeline=pipeline, probe_dirs=probe_dirs,
                  file_suffix=file_suffix, shard_size=shard_size, overwrite=overwrite,
                  prune=prune, column=column, id_column=id_column, root=root, engine=engine,
                  address=address, actors=actors, cpus_per_actor=cpus_per_actor,
                  gpus_per_actor=gpus_per_actor)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: the complete shards in {out} are kept; run the same "
                   f"command again to resume (only what is missing is embedded)", err=True)
        sys.exit(130)


def _run_bulk(model_dir: str, inputs, out: str, *, pipeline: dict, probe_dirs, file_suffix: str,
              shard_size: int, overwrite: bool, prune: bool, column, id_column, root,
              engine: str, address, actors, cpus_per_actor: float,
              gpus_per_actor: float) -> None:
    from runtime.bulk.job import JobError, pipeline_engine, run_job
    from runtime.bulk.lock import BusyError
    from runtime.bulk.output import OutputError
    from runtime.bulk.sources import SourceError, open_source
    from runtime.cli.items import collect_items

    if os.path.splitext(os.path.normpath(out))[1] and not os.path.isdir(out):
        raise click.UsageError(f"--out {out}: the output file must end in {file_suffix}, or "
                               f"name a folder (no suffix) for resumable Parquet shards")
    _require("pyarrow", "bulk", "a folder --out (Parquet shards)")
    if engine == "ray":
        _require("ray", "ray", "--engine ray")
    model, description = model_identity(model_dir, pipeline.get("variant", "fp32"))
    probes = load_probes(probe_dirs, description)
    try:
        source = open_source(inputs, column=column, id_column=id_column, root=root,
                             collect=collect_items,
                             on_error=lambda p, m: click.echo(f"warning: {p}: {m}", err=True))
    except SourceError as e:
        raise click.UsageError(str(e))
    common = dict(dim=model["dim"], model=model, description=description.to_dict(),
                  shard_size=shard_size, probes=probes, overwrite=overwrite, prune=prune,
                  echo=lambda s: click.echo(s, err=True), model_dir=model_dir)
    try:
        if engine == "ray":
            from runtime.bulk.ray_engine import RayEngine
            with RayEngine(model_dir, pipeline, address=address, actors=actors,
                           cpus_per_actor=cpus_per_actor,
                           gpus_per_actor=gpus_per_actor) as ray_engine:
                click.echo(ray_engine.describe(), err=True)
                summary = run_job(source, out, ray_engine, **common)
        else:
            from runtime.pipeline import FeaturePipeline
            try:
                pipe = FeaturePipeline(model_dir, **pipeline)
            except (FileNotFoundError, ValueError) as e:
                raise click.UsageError(str(e))
            with pipe:
                click.echo(f"model {pipe.model_path_}: {model['architecture']}, "
                           f"{model['dim']}-d; provider {pipe.provider_}; threads "
                           f"{pipe.threads_}", err=True)
                summary = run_job(source, out, pipeline_engine(pipe), **common)
    except (OutputError, JobError, BusyError) as e:
        raise click.ClickException(str(e))
    click.echo(summary.line(engine, out), err=True)
    if summary.total and summary.images and summary.failed == summary.images \
            and not summary.kept:
        raise click.ClickException(f"all {summary.images} images failed; see the error column "
                                   f"in {out}")
