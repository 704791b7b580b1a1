"""The strong-backbones arm (issue 21) as data: does a source-problem recipe on an ImageNet start
beat simply using a bigger ImageNet backbone, at matched inference cost, on held-out targets?

Rows (labels start with "S"): the plain ImageNet EfficientNet-Lite0/1/2 at their native sizes
(224/240/260 px; frozen, not trained); FSFT-style tuning of ImageNet Lite0 on the categorical
levels of a source (all its levels as heads, every layer but the last block at alpha x lr),
alone and combined with plain Lite0 in one graph; the controls for size: plain Lite0 + a
random-weights twin (the same cost as Lite0 + a tuned Lite0), and plain Lite2, the bigger
backbone (it costs about as much as two Lite0s); the control for the levels: the same tuning
on the leaf labels alone (Fashion-MNIST), alone and beside plain Lite0. Sources: the emoji levels (category >
subcategory > emoji, Google style) and the Fashion-MNIST levels (generic > specific).

Targets: counted ones are held out from every source (digits, MNIST, three icon themes labelled
by freedesktop context); the sources' own domains (Fashion-MNIST, Twitter-style emoji by
category) are shown and never counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from .plan import SOURCE, TrainStep

# The three ImageNet backbones and their native input sizes (the wheels' evaluation sizes).
LITES = {"lite0": 224, "lite1": 240, "lite2": 260}
FASHION = "fashion-mnist:per_class={}"
ICONS = [f"icons:theme={t},label=context" for t in ("gnome", "tango", "mate")]

# Everything that changes with the budget; a GPU machine takes `full` unchanged (--device cuda).
# emoji_per_class / fashion_per_class: source images per class the tuning sees; targets
# `counted` (held out) and `source_domain` (shown only); max_per_class caps probe images per
# class and side.
STRONG_SCALES: dict[str, dict] = {
    # a dry run at 32 px: proves every stage end to end; figures mean nothing
    "smoke": dict(sizes={k: 32 for k in LITES}, emoji_per_class=1, fashion_per_class=5,
                  epochs=1, alpha=0.1, reinit=1,
                  counted=["digits:per_class=8", "icons:theme=tango,label=context"],
                  source_domain=["fashion-mnist:per_class=8"], max_per_class=8,
                  probe_params={"Cs": [1e-2, 1e0], "refine": 0}),
    "pilot": dict(sizes=dict(LITES), emoji_per_class=1, fashion_per_class=10, epochs=1,
                  alpha=0.1, reinit=1, counted=["digits:per_class=10", *ICONS[:2]],
                  source_domain=["fashion-mnist:per_class=10"], max_per_class=10,
                  probe_params={"Cs": [1e-3, 1e-1, 1e1, 1e3], "refine": 0}),
    # sized for 3 seeds in about 2-3 hours on 2 idle cores (the page gives the measured time)
    "small": dict(sizes=dict(LITES), emoji_per_class=1, fashion_per_class=100, epochs=2,
                  alpha=0.1, reinit=1,
                  counted=["mnist:per_class=40", "digits:per_class=40", *ICONS],
                  source_domain=["fashion-mnist:per_class=40", "emoji-twitter-category"],
                  max_per_class=40, probe_params={"refine": 0}),
    # for a GPU machine: every source image, more epochs, the full probe protocol
    "full": dict(sizes=dict(LITES), emoji_per_class=6, fashion_per_class=1000, epochs=5,
                 alpha=0.1, reinit=1, counted=["mnist", "digits", *ICONS],
                 source_domain=["fashion-mnist:per_class=200", "emoji-twitter-category",
                                "emoji-twitter-subcategory"],
                 max_per_class=200, probe_params={}),
}

# runs that do not depend on the training seed: ImageNet weights, untrained (one per study)
SEEDLESS_RUNS = {"s-lite0", "s-lite0-fashion", "s-lite0-fashion-flat", "s-lite1", "s-lite2"}


@dataclass(frozen=True)
class StrongRow:
    """A page row: one network or a combination of runs (their L-inf normalised embeddings
    concatenated in one graph). `kind`: plain, recipe or control."""
    id: str
    label: str
    runs: tuple[str, ...]
    kind: str
    tap_of: str | None = None        # a taps row: exported from this Lite's ImageNet weights

    @property
    def seeded(self) -> bool:
        return any(r not in SEEDLESS_RUNS for r in self.runs)


# The taps of the plain backbones: the pooled outputs of two MBConv stages (of seven) and the
# final features, each L-inf normalised, concatenated (training-free; `export --taps`).
TAPS = "3,5,final"


ROWS: dict[str, StrongRow] = {r.id: r for r in [
    StrongRow("s-lite0", "S: Lite0 plain", ("s-lite0",), "plain"),
    StrongRow("s-lite1", "S: Lite1 plain", ("s-lite1",), "plain"),
    StrongRow("s-lite2", "S: Lite2 plain", ("s-lite2",), "plain"),
    *[StrongRow(f"s-{k}-taps", f"S: {k.capitalize()} taps {TAPS}", (), "plain", tap_of=k)
      for k in LITES],
    StrongRow("s-fsft-emoji", "S: Lite0 FSFT emoji levels", ("s-fsft-emoji",), "recipe"),
    StrongRow("s-fsft-fashion", "S: Lite0 FSFT fashion levels", ("s-fsft-fashion",), "recipe"),
    StrongRow("s-plus-emoji", "S: Lite0 + FSFT emoji", ("s-lite0", "s-fsft-emoji"), "recipe"),
    StrongRow("s-plus-fashion", "S: Lite0 + FSFT fashion", ("s-lite0", "s-fsft-fashion"),
              "recipe"),
    StrongRow("s-plus-both", "S: Lite0 + FSFT emoji + FSFT fashion",
              ("s-lite0", "s-fsft-emoji", "s-fsft-fashion"), "recipe"),
    StrongRow("s-random-twin", "S control: Lite0 + random twin", ("s-lite0", "s-random"),
              "control"),
    # the levels' own share: the same tuning, images and seeds on the leaf labels alone
    StrongRow("s-fsft-fashion-flat", "S control: Lite0 FSFT fashion, leaf level only",
              ("s-fsft-fashion-flat",), "control"),
    StrongRow("s-plus-fashion-flat", "S control: Lite0 + FSFT fashion, leaf level only",
              ("s-lite0", "s-fsft-fashion-flat"), "control"),
]}
BIG, TWIN, PLAIN = "s-lite2", "s-random-twin", "s-lite0"
COMBINED_RECIPES = ["s-plus-emoji", "s-plus-fashion", "s-plus-both"]
# (levels recipe, its flat control): the same tuning with one head on the leaf labels
LEVELS_CONTROLS = [("s-fsft-fashion", "s-fsft-fashion-flat"),
                   ("s-plus-fashion", "s-plus-fashion-flat")]

# paired comparisons (row, control) by id: every combined recipe against both size controls,
# the levels against the same tuning on the leaf level alone, each tuned network alone against
# the Lite0 it started from (does tuning forget?) and against both size controls, and the bigger
# backbones and the twin against plain Lite0
PAIR_IDS: list[tuple[str, str]] = [
    *[(r, c) for r in COMBINED_RECIPES for c in (BIG, TWIN)], *LEVELS_CONTROLS,
    ("s-fsft-emoji", PLAIN), ("s-fsft-fashion", PLAIN),
    # a tuned Lite0 alone (Lite0's cost) against the bigger backbone and the two-network twin
    ("s-fsft-emoji", BIG), ("s-fsft-fashion", BIG), ("s-fsft-fashion", TWIN),
    *[(f"s-{k}-taps", f"s-{k}") for k in LITES], ("s-lite0-taps", BIG),
    ("s-lite1", PLAIN), ("s-lite2", PLAIN), (TWIN, PLAIN), (TWIN, BIG)]


def export_args(row: StrongRow, scale: str) -> list[str]:
    """`cli.py export` options of a row made from an architecture's weights (a taps row)."""
    if row.tap_of is None:
        return []
    size = STRONG_SCALES[scale]["sizes"][row.tap_of]
    return ["--arch", f"efficientnet_{row.tap_of}", "--pretrained", "--input-size", str(size),
            "--taps", TAPS]


def member_name(row: StrongRow, replicate: int) -> str:
    """The model name of one replicate of a row: a seed-independent row has one model."""
    return row.label if not row.seeded else f"{row.label} [r{replicate}]"


def run_name(run: str, replicate: int) -> str:
    return run if replicate == 0 or run in SEEDLESS_RUNS else f"{run}-r{replicate}"


def strong_steps(scale: str, seed: int, replicate: int) -> dict[str, TrainStep]:
    """The arm's training runs for one replicate, by run id (seed-independent ones keep their
    name in every replicate; replicate r uses seeds from seed + 10 r)."""
    s = STRONG_SCALES[scale]
    seed = seed + 10 * replicate
    emoji, fashion = SOURCE, FASHION.format(s["fashion_per_class"])
    size0 = str(s["sizes"]["lite0"])

    def lite(name: str, per_class: int) -> list[str]:
        return ["--arch", f"efficientnet_{name}", "--input-size", str(s["sizes"][name]),
                "--per-class", str(per_class), "--cache-gb", "0"]

    # ImageNet weights, untrained (epochs 0 keeps them); the heads name the source's levels
    # (multilevel: one head per level) so that FSFT below rebuilds them
    start = ["--pretrained", "--method", "multilevel", "--epochs", "0"]
    tune = ["--method", "fsft", "--alpha", str(s["alpha"]), "--reinit", str(s["reinit"]),
            "--epochs", str(s["epochs"]), "--seed", str(seed), "--input-size", size0,
            "--cache-gb", "0"]
    steps = {
        "s-lite0": TrainStep("s-lite0", lite("lite0", s["emoji_per_class"]) + start, data=emoji),
        "s-lite0-fashion": TrainStep("s-lite0-fashion", lite("lite0", s["fashion_per_class"])
                                     + start, data=fashion),
        "s-lite1": TrainStep("s-lite1", lite("lite1", 1) + ["--pretrained", "--epochs", "0"],
                             data=FASHION.format(1)),
        "s-lite2": TrainStep("s-lite2", lite("lite2", 1) + ["--pretrained", "--epochs", "0"],
                             data=FASHION.format(1)),
        "s-fsft-emoji": TrainStep("s-fsft-emoji", tune + ["--per-class",
                                                          str(s["emoji_per_class"])],
                                  after=["s-lite0"], data=emoji),
        "s-fsft-fashion": TrainStep("s-fsft-fashion", tune + ["--per-class",
                                                              str(s["fashion_per_class"])],
                                    after=["s-lite0-fashion"], data=fashion),
        # the flat control: one head on the leaf labels (FSFT tunes its start's problem)
        "s-lite0-fashion-flat": TrainStep(
            "s-lite0-fashion-flat", lite("lite0", s["fashion_per_class"])
            + ["--pretrained", "--method", "specific", "--epochs", "0"], data=fashion),
        "s-fsft-fashion-flat": TrainStep("s-fsft-fashion-flat",
                                         tune + ["--per-class", str(s["fashion_per_class"])],
                                         after=["s-lite0-fashion-flat"], data=fashion),
        # the same architecture with seeded random weights: the same-size control's twin
        "s-random": TrainStep("s-random", lite("lite0", 1) + ["--epochs", "0", "--seed",
                                                             str(seed + 100)],
                              data=FASHION.format(1)),
    }
    for run_id, step in steps.items():
        step.name = run_name(run_id, replicate)
        step.after = [run_name(a, replicate) for a in step.after]
    return steps


def targets(scale: str) -> tuple[list[str], list[str]]:
    """(counted held-out targets, source-domain targets shown only) of a scale."""
    s = STRONG_SCALES[scale]
    return list(s["counted"]), list(s["source_domain"])


def strong_plan(scale: str, seed: int = 0, seeds: int = 1) -> dict:
    """What the arm will do at a scale (what --plan-only prints)."""
    counted, shown = targets(scale)
    train = {}
    for r in range(seeds):
        for step in strong_steps(scale, seed, r).values():
            train[step.name] = {"data": step.data, "args": step.args, "after": step.after}
    return {"arm": "strong", "scale": scale, "seeds": seeds, "settings": STRONG_SCALES[scale],
            "train": train, "rows": {r.label: list(r.runs) or export_args(r, scale)
                                     for r in ROWS.values()},
            "pairs": [[ROWS[a].label, ROWS[c].label] for a, c in PAIR_IDS],
            "counted": counted, "source_domain": shown}
