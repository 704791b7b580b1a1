#!/usr/bin/env python
"""unirep: universal image representations, from training to fast feature serving.

Stages: `train` a backbone (PyTorch), `export` it (ONNX, Caffe2), then `embed`, `probe` and
`evaluate` with the onnxruntime pipeline, which never imports torch.
"""
from __future__ import annotations

import importlib
import os
import sys

import click

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common.errors import UserError  # a leaf module: imports nothing heavy

# Subcommands live with their stage and are imported only when used, so `--help` is instant
# and the runtime commands work without torch installed.
COMMANDS = {
    "train": ("train.commands", "train",
              "Train a backbone on a dataset (methods: specific, generic, multilevel, finer, fsft)."),
    "export": ("export.commands", "export", "Export trained runs to ONNX (and Caffe2), with proven parity."),
    "import": ("export.import_commands", "import_model",
               "Import an image ONNX exported elsewhere into a model folder, with proven parity."),
    "caffe2-run": ("export.caffe2_commands", "caffe2_run",
                   "Embed images with exported Caffe2 nets in the real Caffe2 runtime (torch 1.8.1)."),
    "inspect": ("export.commands", "inspect", "Show an exported model: description, I/O, formats, parity, sizes."),
    "embed": ("runtime.cli.embed", "embed", "Embed images with an exported model (onnxruntime)."),
    "probe": ("runtime.cli.probe", "probe", "Fit, apply and fuse linear probes on frozen embeddings."),
    "evaluate": ("runtime.cli.evaluate", "evaluate", "Measure universality: linear probes on many targets, mNRG."),
    "index": ("runtime.cli.search", "index", "Build a similarity index over an embed output; list near-duplicates."),
    "search": ("runtime.cli.search", "search", "Find the indexed images most like query images (ids, cosine scores)."),
    "serve": ("runtime.cli.serve", "serve", "Serve a model over HTTP (KServe v2 protocol), batched."),
    "bench": ("benchmarks.commands", "bench", "Benchmark the runtime against PyTorch, side by side."),
}


class LazyGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:  # bad input the user can fix: one line, exit status 1
            raise click.ClickException(" ".join(str(e).split())) from e

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, _, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Universal image representations: train -> export -> embed/probe/evaluate.

    \b
    Typical flow:
      python cli.py train  --data fashion-mnist --method specific --out runs/spe
      python cli.py export runs/spe --out models/spe
      python cli.py probe fit models/spe --data mnist --out probes/mnist
      python cli.py probe predict models/spe probes/mnist IMAGES/ --out preds.jsonl

    DATA is a folder (nested folders are label levels; train/ and test/ are splits) or a
    built-in: fashion-mnist, mnist, digits, emoji[:styles=google+twitter,skin=N].
    """


if __name__ == "__main__":
    main()
