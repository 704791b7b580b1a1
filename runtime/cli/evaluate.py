"""`python cli.py evaluate`: the click command over `runtime.evaluation` (its library)."""
from __future__ import annotations

import click

from common.data import DataError
from runtime.evaluation import DEFAULT_TEST_FRACTION, PROBES, EvaluationError, EvaluationPlan, run_plan
from runtime.options import PipelineOptions, pipeline_options


@click.command("evaluate")
@click.argument("model_dirs", nargs=-1, metavar="[MODEL_DIR ...]")
@click.option("--target", "-t", "targets", multiple=True, required=True, metavar="DATA",
              help="A target: a built-in (fashion-mnist, mnist, digits, emoji:...) or an "
                   "ImageFolder (leaf folder = class). Repeat for several.")
@click.option("--reference", "-r", metavar="MODEL_DIR",
              help="Model the mNRG/aNRG are relative to (typically the specific-only network); "
                   "evaluated too if not listed.")
@click.option("--probe", type=click.Choice(PROBES), default="logreg", show_default=True,
              help="logreg: multinomial logistic regression (Kornblith/CLIP); svm: one-vs-rest "
                   "linear SVM (the TPAMI paper).")
@click.option("--name", "names", multiple=True, metavar="NAME",
              help="Display name per MODEL_DIR, in order (default: folder names).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Report folder: report.json, report.md, report.png.")
@click.option("--test-fraction", default=DEFAULT_TEST_FRACTION, show_default=True, type=float,
              help="Test share of the seeded stratified split, for targets without train/ and test/.")
@click.option("--max-per-class", type=int, default=None,
              help="Keep at most N images per class on each side (seeded), for quick runs.")
@click.option("--seed", default=0, show_default=True, help="Seed of splits, subsampling and probes.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Embedding cache folder [default: $UNIREP_CACHE/embeddings].")
@click.option("--no-cache", is_flag=True, help="Embed afresh; neither read nor write the cache.")
@pipeline_options(decode="exact")
@click.option("--seeds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Repeat each (model, target) with N evaluation seeds (split, per-class cap, "
                   "probe validation): mean and a 95% t interval per cell.")
@click.option("--group", "group_specs", multiple=True, metavar="NAME=DIR1,DIR2[,...]",
              help="Networks trained alike with different seeds, reported as one row (mean and "
                   "interval over members). Repeat for several groups.")
@click.option("--control", "controls", multiple=True, metavar="NAME",
              help="Model or group every other row is compared with (paired differences per "
                   "target, marked * when larger than seed noise) [default: the reference].")
@click.option("--sweep", type=click.Choice(["subsample", "full"]), default="subsample",
              show_default=True,
              help="Probe C sweep: on a stratified subsample then one fit on all rows (fast), "
                   "or every C on every row (the original protocol; slow on large targets).")
def evaluate(model_dirs, targets, reference, probe, names, out_dir, test_fraction, max_per_class,
             seed, cache_dir, no_cache, pipeline: PipelineOptions, seeds, group_specs, controls, sweep):
    """Measure universality: a linear probe per (model, target) on frozen embeddings.

    Each target uses its train/ and test/ splits, else a seeded stratified split (reported).
    The probe's regularisation is chosen on a validation split and refit on train+val; test is
    scored once. Per model: top-1 and mean per-class accuracy per target, their mean, Kornblith's
    mean logit and, with --reference, mNRG and aNRG (x100; 0 = as good as the reference).

    With --seeds N and --group NAME=DIR1,DIR2,... (networks trained with different seeds),
    each cell gets a 95% interval, and --control rows are compared with every other row:
    paired differences per target with a t interval (over seeds, or member i against member
    i), or a paired bootstrap over test images when both sides are one model and one seed.

    \b
    Examples:
      python cli.py evaluate models/spe models/mucale -t fashion-mnist -t digits \\
          -t ~/photos/flowers --reference models/spe --out reports/cmp
      python cli.py evaluate -t mnist -t digits --seeds 3 \\
          --group mucale=models/mucale-s0,models/mucale-s1,models/mucale-s2 \\
          --group twoseeds=models/spe2-s0,models/spe2-s1,models/spe2-s2 \\
          --control twoseeds --out reports/rigour
    """
    plan = EvaluationPlan(
        list(model_dirs), list(targets), out_dir, reference=reference, probe=probe, seed=seed,
        cache_dir=cache_dir, device=pipeline.device, batch_size=pipeline.batch_size,
        threads=pipeline.threads, names=list(names) or None, test_fraction=test_fraction,
        max_per_class=max_per_class, use_cache=not no_cache, variant=pipeline.variant,
        fast_decode=pipeline.fast_decode, seeds=seeds, groups=_parse_groups(group_specs),
        controls=list(controls) or None, probe_params={"sweep": sweep},
        pipeline_args=dict(device_id=pipeline.device_id, decode_threads=pipeline.decode_threads,
                           decode_processes=pipeline.decode_processes))
    try:
        report = run_plan(plan).to_dict()
    except (EvaluationError, DataError) as e:
        raise click.UsageError(str(e)) from e
    _echo_summary(report)


def _parse_groups(group_specs) -> dict[str, list[str]]:
    """--group NAME=DIR1,DIR2[,...] options -> {name: [dirs]}."""
    groups: dict[str, list[str]] = {}
    for spec in group_specs:
        name, sep, dirs = spec.partition("=")
        members = [d for d in dirs.split(",") if d]
        if not sep or not name or len(members) < 2:
            raise click.BadParameter(f"{spec!r}: write NAME=DIR1,DIR2[,...] (2 or more model "
                                     "dirs trained alike with different seeds)",
                                     param_hint="--group")
        if name in groups:
            raise click.BadParameter(f"group {name!r} given twice", param_hint="--group")
        groups[name] = members
    return groups


def _echo_summary(report: dict) -> None:
    """The table, each comparison in one line, the cache's hits and the files written."""
    from runtime.evaluation.report import render_table
    click.echo(render_table(report))
    for c in report["comparisons"]:
        m = c["mean"]
        interval = (f" [{100 * m['low']:+.1f}, {100 * m['high']:+.1f}]" if m["low"] == m["low"]
                    else "")
        click.echo(f"{c['model']} - {c['control']}: {100 * m['diff']:+.1f} points of mean "
                   f"top-1{interval} ({m['method']})"
                   + ("; larger than the noise" if m["significant"] else "; within the noise"))
    cache = report["cache"]
    click.echo(f"\nembeddings: {cache['hits']} from cache, {cache['misses']} computed")
    for path in report.get("files", {}).values():
        click.echo(f"wrote {path}")
