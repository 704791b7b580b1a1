"""The configuration of a training run, and the files a run folder holds."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

FINER_MODES = ("kmeans", "auto")
CONFIG_FILE = "train_config.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
# Options that may differ between an interrupted run and its --resume (they do not change results).
RESUME_MAY_DIFFER = {"resume", "device", "workers", "compile", "cache_gb", "allow_unsplit"}


@dataclass(kw_only=True)  # keyword-only, like every public constructor: options are always named
class TrainConfig:
    """Everything a run depends on. Saved to RUN_DIR/train_config.json and in the checkpoint."""

    data: str
    out: str
    method: str = "specific"
    level: str | None = None            # generic: level number (0 = coarsest) or name
    arch: str | None = None              # None: small_cnn, or the --from run's architecture
    arch_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None           # a state dict file to start from (train.weights)
    from_run: str | None = None          # finer, fsft
    mapping: str | None = None           # CSV: fine label, then its ancestors
    group_by_clustering: str | None = None  # a run whose class prototypes are clustered
    k: int = 10                          # number of groups for --group-by-clustering
    finer_mode: str = "kmeans"
    finer_k: int = 4
    finer_min_size: int = 20
    allow_unsplit: bool = False          # finer: train even when no class could be split
    alpha: float = 0.1                   # fsft: lr factor of the kept layers
    reinit: int = 2                      # fsft: number of last blocks re-initialised
    epochs: int = 10
    batch_size: int = 64                 # per process (DDP: global batch = this x processes)
    lr: float | None = None              # None: 0.05 (sgd) or 1e-3 (adamw)
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None    # None: 5e-4 (sgd) or 0.05 (adamw)
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    loss_weights: list[float] | None = None  # multilevel: one per head, coarsest first
    seed: int = 0
    input_size: int | None = None        # None: the architecture's default
    hflip: bool = True
    augment: str = "standard"            # standard | strong (more crop, rotation, colour)
    val_fraction: float = 0.1            # hold-out when the data has no test split
    per_class: int | None = None         # at most this many images per leaf class and split
    workers: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    resume: bool = False
    strict_images: bool = False
    cache_gb: float = 2.0                # decode images once into memory when under this size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
