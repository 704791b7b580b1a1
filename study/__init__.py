"""The reproduction study (issue 6): train every source-problem variant on emoji (and on a second
source, Fashion-MNIST), export the networks and their combinations, evaluate them all with linear
probes, write the results page (docs/results.md).

    python -m study --scale small            # ~50 min on 2 idle cores -> docs/results.md
    python -m study --scale full             # ~2 h, more epochs and probe images
    python -m study --scale pilot            # a few minutes: proves the pipeline
    python -m study --scale smoke --seeds 2  # a dry run of every stage (page under WORK)
    python -m study --scale small --seeds 2  # intervals over 2 trained replicates (~100 min)
    python -m study --scale small --plan-only   # print the plan, run nothing

Source: `emoji:styles=google,skin=5` (Google style only, up to 5 skin-tone variants per emoji),
levels category (10) > subcategory (99) > emoji (1,910). Twitter-style emoji are kept out of
training: they are a cross-style target, labelled at the subcategory and category levels (a
1,910-way probe with about one image per class would be degenerate): the built-in
`emoji:styles=twitter,label=subcategory` (and `label=category`), named under WORK/targets/.

A second source arm trains the same recipes on Fashion-MNIST's two levels, generic (5) >
specific (10), with hundreds of images per class (`fashion-mnist:per_class=N`, N by scale), where
the specific network is not starved and FiNet's clusters of 20 exist. Its rows ("F: ...") have
their own table and reference (F: Net-S specific); the fashion-mnist target, their source domain,
is shown there but not counted. At `small` it adds about 6-8 training minutes per seed.

Resumable: a run with model.pt, an exported model with model.onnx and cached embeddings are
reused; an interrupted training resumes from its checkpoint. Per-stage wall times go to
WORK/timings.json and the page. Run it on a quiet machine: the page reports measured images/s.

The strong-backbones arm (issue 21; `--arm strong`, its own section of the page): plain ImageNet
EfficientNet-Lite0/1/2 at their native sizes, their multi-depth taps, FSFT of ImageNet Lite0 on
the emoji and Fashion-MNIST levels alone and combined with plain Lite0, against both size
controls (plain Lite0 + a random twin; plain Lite2), on held-out targets (MNIST, digits, three
icon themes), with FLOPs and measured images/s. It runs one model at a time and keeps a JSON
record per model (docs/study-records/strong-SCALE/): the records are its resumable state.

    python -m study --arm strong --scale small --seeds 3 --work /work/study-work/strong-small
    python -m study --arm strong --scale small --seeds 3 --page-only   # page from the records

Modules: `plan` (arms, runs, replicates, seeds, scales and page rows, as data), `stages`
(training, export and evaluation in child processes or calls, resumable), `views` (reports
shaped into page rows), `prose` (the page's sentences, templates without numbers), `page`
(the page from the records), `plots` (its figure), `__main__` (the command); the strong arm:
`strong` (its plan), `strong_stages` (one model at a time, records), `strong_page` and
`strong_prose` (its section), `strong_speed` (the speed stage), `cost` (FLOPs and weights from
the ONNX graph).
"""
