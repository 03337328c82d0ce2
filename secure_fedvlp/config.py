"""Experiment configuration: frozen dataclasses, read once at the edge.

A TOML file (``configs/*.toml``) plus ``--set key=value`` overrides is parsed into an
:class:`ExperimentConfig`.  Unknown keys and values of the wrong type are rejected with
a message naming the dotted key; every problem is collected before raising (each section's
range checks, and the checks across sections, report all their failures together), so a
user fixes them in one pass.  Nothing below the CLI / app entry points reads raw dicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from secure_fedvlp.data.spec import SyntheticSpec
from secure_fedvlp.errors import ConfigError

__all__ = [
    "declare_method",
    "known_methods",
    "RunConfig",
    "DataConfig",
    "ModelConfig",
    "PretrainConfig",
    "TrainConfig",
    "FederationConfig",
    "EvalConfig",
    "FedDRAConfig",
    "CreamFLConfig",
    "FedSMConfig",
    "PrivacyConfig",
    "EncryptionConfig",
    "AnchorConfig",
    "AuditConfig",
    "ExperimentConfig",
    "load_config",
    "read_toml",
    "parse_config",
    "apply_overrides",
    "config_to_dict",
    "config_hash",
    "resolve_paths",
    "CHECKPOINT_SUFFIXES",
]

#: File types ``model.init_checkpoint`` may name: a numpy archive or a torch state dict.
CHECKPOINT_SUFFIXES: tuple[str, ...] = (".npz", ".pt")


@dataclass(frozen=True)
class RunConfig:
    """Where and how a run executes."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Threads per simulated client process (torch intra-op threads).
    threads_per_client: int = 1
    # CPUs Ray may use in total; 0 = all cores of the machine.
    num_cpus: int = 0

    def __post_init__(self) -> None:
        check = _Checks()
        check(self.threads_per_client >= 1, "run.threads_per_client", self.threads_per_client, "must be >= 1")
        check(self.num_cpus >= 0, "run.num_cpus", self.num_cpus, "must be >= 0")
        check.done()


@dataclass(frozen=True)
class DataConfig:
    """Which data each site holds (sources, keys and file formats: ``docs/data.md``).

    ``source = "synthetic"`` uses the embedded generator (``[data.synthetic]``);
    ``source = "manifest"`` reads a CSV/JSONL manifest of real images and reports (``manifest_path``);
    ``source = "mimic_cxr_jpg"`` / ``"chexpert"`` read those datasets in their published layout under
    ``root``.  Real images are resized to ``data.synthetic.image_size``.  Paths are checked when the
    data are loaded (at the sites), not here.
    """

    source: Literal["synthetic", "manifest", "mimic_cxr_jpg", "chexpert"] = "synthetic"
    cache_dir: str = ".cache/secure_fedvlp"
    # Keep the locked towers' outputs for the site's records in cache_dir/features (model.trainable =
    # "heads"): another process with the same towers (a sweep's next cell, a deployment's next message)
    # reads them instead of recomputing them (secure_fedvlp.models.feature_cache).
    cache_features: bool = True
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    manifest_path: str = ""
    image_root: str = ""
    heldout_site: str = ""
    # Real sources: the site whose records (all splits) form the public reference set; "" = none.
    public_site: str = ""
    # mimic_cxr_jpg / chexpert: the dataset directory; mimic_cxr_jpg: the reports' directory ("" = root).
    root: str = ""
    reports_root: str = ""
    # Real sources: how CheXpert-style -1 (uncertain) labels are read.
    uncertain: Literal["negative", "positive", "error"] = "negative"
    # mimic_cxr_jpg / chexpert: patients hashed into this many simulated sites; the first `limit` images (0 = all).
    num_sites: int = 1
    limit: int = 0

    def __post_init__(self) -> None:
        check = _Checks()
        check(
            self.source != "manifest" or bool(self.manifest_path),
            "data.manifest_path",
            self.manifest_path,
            "is required when data.source = 'manifest'",
        )
        check(self.num_sites >= 1, "data.num_sites", self.num_sites, "must be >= 1")
        check(self.limit >= 0, "data.limit", self.limit, "must be >= 0 (0 = every image)")
        check(
            not self.public_site or self.public_site != self.heldout_site,
            "data.public_site",
            self.public_site,
            "must differ from data.heldout_site",
        )
        if self.source in ("mimic_cxr_jpg", "chexpert"):
            check(bool(self.root), "data.root", self.root, f"is required when data.source = {self.source!r}")
            roles = bool(self.heldout_site) + bool(self.public_site)
            check(
                self.num_sites >= 1 + roles,
                "data.num_sites",
                self.num_sites,
                f"must be >= {1 + roles} (one training site besides data.heldout_site / data.public_site)",
            )
        check.done()


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: a registered model config name (``secure_fedvlp/models/model_configs``).

    ``trainable`` chooses which parameters are federated and trained: ``"all"`` (every
    parameter the architecture leaves trainable), ``"alignment"`` (the alignment layers and
    heads, FedDRA's stage-1 set), ``"heads"`` (projection heads and temperature only; the
    whole text tower is then locked and cached) or ``"image_head"`` (the image head and the
    temperature only: the text side, head included, stays the public start's, so the prompts and
    reports keep the public start's embedding space and every step moves images within it).
    Everything else stays at its seeded or pretrained value, identical at every party, and never
    travels.  Under DP-SGD fewer trained parameters means less total noise for the same privacy.

    ``init_checkpoint`` (a ``.npz`` or ``.pt`` file of every parameter and buffer, e.g. a public
    start written by ``secure-fedvlp pretrain``) is loaded by every party right after it builds the
    seeded model (:func:`secure_fedvlp.build.build_model`), so the round-0 model, frozen parts
    included, is the checkpoint's.  A relative path is read from the current directory;
    ``secure-fedvlp run`` writes it absolute into the run's config.  It is treated as public: it
    spends no privacy budget (a checkpoint trained on private records carries no DP guarantee for them).
    """

    name: str = "demo"
    # Optional directory of a transformers text encoder; "" = the model config's default.
    text_weights_dir: str = ""
    trainable: Literal["all", "alignment", "heads", "image_head"] = "all"
    init_checkpoint: str = ""
    # true: the image head's input is whitened by the mean and covariance of the public corpus' image-tower
    # outputs, set once at the end of the public start (public data: no privacy cost) with the head re-expressed
    # so that the public start computes the same embeddings; training then takes steps preconditioned by that
    # covariance (docs/design.md, "Public whitening"). Needs a linear image head and a public start
    # (pretrain.enabled, or a model.init_checkpoint made with it).
    image_whitening: bool = False

    def __post_init__(self) -> None:
        check = _Checks()
        check(
            not self.init_checkpoint or Path(self.init_checkpoint).suffix.lower() in CHECKPOINT_SUFFIXES,
            "model.init_checkpoint",
            self.init_checkpoint,
            f"must name a {' or '.join(CHECKPOINT_SUFFIXES)} file (every parameter and buffer of the model)",
        )
        check.done()


@dataclass(frozen=True)
class PretrainConfig:
    """The public start: a non-private pre-training stage on a public image-report set (docs/design.md, "Public start").

    With ``enabled = true``, ``secure-fedvlp run`` trains the model every party builds on the public
    corpus *before* the Flower apps start (the server operator's public step; it touches no site's
    records and spends no privacy budget), with in-batch InfoNCE, every parameter the architecture
    leaves trainable (whatever ``model.trainable`` federates later), AdamW at ``lr`` (``text_lr``
    for the text tower), ``steps`` steps of ``batch_size`` records.  The result is cached under
    ``data.cache_dir`` by a hash of everything that determines it and becomes ``model.init_checkpoint``
    of the run.  ``source = "synthetic"`` uses ``data.synthetic.pretrain_size`` records of the
    synthetic public corpus (its own style, wording and prevalences); ``"manifest"`` reads
    ``manifest_path`` (every record, whatever its site or split; images under ``image_root``).
    ``log_every`` prints a progress line every that many steps (0 = none).
    ``seed`` seeds the model it starts from, its batch order and dropout; ``-1`` (the default)
    means ``run.seed``.  Fix it to hold one public start across runs of different ``run.seed``
    (a sweep over seeds then varies the federated training and the DP noise, not the start,
    as in a deployment where the public checkpoint is given).
    """

    enabled: bool = False
    source: Literal["synthetic", "manifest"] = "synthetic"
    manifest_path: str = ""
    image_root: str = ""
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    text_lr: float = 1e-4
    weight_decay: float = 0.05
    log_every: int = 50
    seed: int = -1

    def __post_init__(self) -> None:
        check = _Checks()
        check(self.seed >= -1, "pretrain.seed", self.seed, "must be >= 0, or -1 for run.seed")
        check(self.steps >= 1, "pretrain.steps", self.steps, "must be >= 1")
        check(self.batch_size >= 2, "pretrain.batch_size", self.batch_size, "must be >= 2 (in-batch negatives)")
        check(self.lr > 0, "pretrain.lr", self.lr, "must be > 0")
        check(self.text_lr >= 0, "pretrain.text_lr", self.text_lr, "must be >= 0")
        check(self.weight_decay >= 0, "pretrain.weight_decay", self.weight_decay, "must be >= 0")
        check(self.log_every >= 0, "pretrain.log_every", self.log_every, "must be >= 0 (0 = no progress lines)")
        check(
            self.source != "manifest" or bool(self.manifest_path),
            "pretrain.manifest_path",
            self.manifest_path,
            "is required when pretrain.source = 'manifest'",
        )
        check.done()


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each client."""

    local_steps: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    text_lr: float = 5e-5
    weight_decay: float = 0.05
    optimizer: Literal["adamw", "sgd"] = "adamw"
    # "infonce": in-batch negatives (couples records; refused under DP-SGD).
    # "decomposable": negatives from the public reference set embedded by the global model.
    # "report_variants": per record, its image against its own report and train.report_negatives variants of
    #   that report (one sentence left out each), all embedded by the model being trained; image to report
    #   only, no public bank (secure_fedvlp.objectives.ReportVariantsLoss). Needs model.trainable = "heads".
    # "site_centroids": per record, its image against its own report and the site's report centroids: the
    #   site's report embeddings summed per public bin, released once per run with Gaussian noise (accounted
    #   in the ledger; secure_fedvlp.privacy.site_centroids). Image to report only. Needs
    #   model.trainable = "image_head" (the report embeddings stay the public start's for the whole run).
    objective: Literal["infonce", "decomposable", "report_variants", "site_centroids"] = "infonce"
    # Where the decomposable objective's positives and public negatives come from:
    # "global": the global model of the round embeds each record's pair (positive) and the public
    #   bank once per job; "current": the model being trained embeds both, the bank re-embedded at
    #   every step (cheap when the towers are locked and cached, e.g. model.trainable = "heads").
    bank: Literal["global", "current"] = "global"
    # > 0 (with bank = "current"): the image-to-report term of the decomposable objective contrasts a
    # record's image with its own report against this many variants of that same report, each with one
    # sentence left out, instead of public reports (secure_fedvlp.objectives.report_variants). 0 = off.
    # With objective = "report_variants": the number of variants K (>= 1).
    report_negatives: int = 0
    # With objective = "site_centroids": the number of public bins (k-means of the public reports' embeddings)
    # the site's report embeddings are summed in, and, under privacy.enabled, the share of the epsilon budget
    # that release spends on its own: its noise is calibrated so that the release alone spends
    # site_centroids_budget_share x privacy.target_epsilon at privacy.delta (its L2 sensitivity is 1: one
    # record adds one unit vector to one bin), and DP-SGD's noise is calibrated to what the two spend together.
    site_centroids: int = 16
    site_centroids_budget_share: float = 0.25
    grad_clip: float = 0.0  # plain gradient-norm clipping without DP; 0 = off

    def __post_init__(self) -> None:
        check = _Checks()
        check(self.local_steps >= 1, "train.local_steps", self.local_steps, "must be >= 1")
        check(self.batch_size >= 2, "train.batch_size", self.batch_size, "must be >= 2")
        check(self.lr > 0, "train.lr", self.lr, "must be > 0")
        check(self.text_lr >= 0, "train.text_lr", self.text_lr, "must be >= 0")
        check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0")
        check(self.report_negatives >= 0, "train.report_negatives", self.report_negatives, "must be >= 0 (0 = off)")
        check(self.site_centroids >= 1, "train.site_centroids", self.site_centroids, "must be >= 1 (public bins)")
        check(
            0.0 < self.site_centroids_budget_share < 1.0,
            "train.site_centroids_budget_share",
            self.site_centroids_budget_share,
            "must be in (0, 1): the share of the epsilon budget the site's centroid release spends on its own",
        )
        check.done()


@dataclass(frozen=True)
class FederationConfig:
    """The federated protocol."""

    method: str = "fedavg"
    num_rounds: int = 3
    fraction_train: float = 1.0
    min_train_clients: int = 1
    round_timeout_s: float = 3600.0
    # How long the server waits for every expected site to connect before starting with those present.
    discovery_timeout_s: float = 120.0
    # FedProx proximal coefficient (used by method = "fedprox").
    proximal_mu: float = 0.01

    def __post_init__(self) -> None:
        check = _Checks()
        check(self.num_rounds >= 1, "federation.num_rounds", self.num_rounds, "must be >= 1")
        check(0.0 < self.fraction_train <= 1.0, "federation.fraction_train", self.fraction_train, "must be in (0, 1]")
        check(self.min_train_clients >= 1, "federation.min_train_clients", self.min_train_clients, "must be >= 1")
        check(self.round_timeout_s > 0, "federation.round_timeout_s", self.round_timeout_s, "must be > 0")
        check(self.discovery_timeout_s > 0, "federation.discovery_timeout_s", self.discovery_timeout_s, "must be > 0")
        check(self.proximal_mu >= 0, "federation.proximal_mu", self.proximal_mu, "must be >= 0")
        check.done()


@dataclass(frozen=True)
class EvalConfig:
    """Federated evaluation on each site's test split.

    Evaluation metrics are computed on private records without noise: no DP mechanism covers them.
    ``release = "clear"`` sends them to the server (per-finding AUROC, which findings occur in the
    split, Recall@K, the split's record count), named as not covered in every report;
    ``release = "local"`` writes them only to the site's own directory and the server receives none.
    Either way a site evaluates only the current round's global model, once.
    """

    batch_size: int = 64
    recall_ks: tuple[int, ...] = (1, 5, 10)
    every_round: bool = True
    split: Literal["test", "val"] = "test"
    release: Literal["clear", "local"] = "clear"
    # Downstream tasks run at each site after the run ("linear", "segmentation"; see docs/methods.md),
    # on the final model and the references; the same release policy applies to their metrics.
    downstream: tuple[str, ...] = ()
    downstream_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    downstream_seeds: int = 3
    downstream_seg_steps: int = 150

    def __post_init__(self) -> None:
        check = _Checks()
        bad = sorted(set(self.downstream) - {"linear", "segmentation"})
        check(not bad, "eval.downstream", list(self.downstream), "lists unknown tasks; known: linear, segmentation")
        check(
            bool(self.downstream_fractions) and all(0 < f <= 1 for f in self.downstream_fractions),
            "eval.downstream_fractions",
            list(self.downstream_fractions),
            "must be a non-empty list of label fractions in (0, 1]",
        )
        check(self.downstream_seeds >= 1, "eval.downstream_seeds", self.downstream_seeds, "must be >= 1")
        check(self.downstream_seg_steps >= 1, "eval.downstream_seg_steps", self.downstream_seg_steps, "must be >= 1")
        check(self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        check(
            len(self.recall_ks) > 0 and all(k >= 1 for k in self.recall_ks),
            "eval.recall_ks",
            self.recall_ks,
            "must be a non-empty list of integers >= 1",
        )
        check.done()


@dataclass(frozen=True)
class FedDRAConfig:
    """FedDRA / FedAID (arXiv 2404.03854 v3 / v2): robust client weights, anchor guidance, stages.

    ``mode = "robust"`` is this project's reading of the paper: q persists across rounds
    and weights the aggregate.  ``mode = "faithful"`` reproduces the authors' released
    code: q is reset to uniform every round, used only to scale local losses, and the
    aggregate is an unweighted mean (docs/methods.md).
    """

    mode: Literal["robust", "faithful"] = "robust"
    rho: float = 1.0  # chi-square radius
    eta: float = 0.5  # mirror-ascent step size (authors: 0.01 * 50)
    centre: Literal["uniform", "data_size"] = "uniform"
    holdout_fraction: float = 0.1  # slice of each client's train split used for the DRO losses
    loss_scaling: bool = False  # scale each client's local loss by K * q_k (always on in faithful mode)
    anchor_weight: float = 1.0  # lambda of the anchor-guidance term; 0 disables it
    anchor_distance: Literal["mse", "cosine"] = "mse"
    stage1_steps: int = 8  # FedDRA stage 1: alignment layers and heads only
    stage2_steps: int = 0  # FedDRA stage 2: whole network; 0 = train.local_steps

    def __post_init__(self) -> None:
        check = _Checks()
        check(self.rho > 0, "feddra.rho", self.rho, "must be > 0")
        check(self.eta >= 0, "feddra.eta", self.eta, "must be >= 0")
        check(0 < self.holdout_fraction < 1, "feddra.holdout_fraction", self.holdout_fraction, "must be in (0, 1)")
        check(self.anchor_weight >= 0, "feddra.anchor_weight", self.anchor_weight, "must be >= 0")
        check(self.stage1_steps >= 1, "feddra.stage1_steps", self.stage1_steps, "must be >= 1")
        check(self.stage2_steps >= 0, "feddra.stage2_steps", self.stage2_steps, "must be >= 0")
        check.done()

    def slice_size(self, declared: int) -> int:
        """The declared (public) size of the DRO slice of a site whose declared training size is ``declared``.

        ``round(holdout_fraction * declared)``, at least 1; the slice itself is chosen record by record
        with a keyed hash (``secure_fedvlp.methods.feddra``), so its actual size only approximates this.
        """
        return max(1, int(round(self.holdout_fraction * int(declared))))


@dataclass(frozen=True)
class CreamFLConfig:
    """CreamFL (Yu et al., ICLR 2023): a server model trained from heterogeneous sites' public-set representations.

    The global model (``model.name``) is the *server's* model: it trains on the public set, and is
    distilled towards the ensemble of the sites' representations of it.  Each site trains its own
    local model (``client_model``, or ``client_models[site]``; any architecture with the server's
    ``embed_dim``), which never leaves it.  Defaults follow the authors' code (docs/methods.md).
    """

    client_model: str = ""  # the sites' local architecture; "" = model.name
    client_models: dict[str, str] = field(default_factory=dict)  # per-site architectures, e.g. {site2 = "tiny"}
    use_clients: bool = True  # false: the server model trains on the public set alone (the reference)
    server_steps: int = 8  # server steps on the public set per round (in-batch InfoNCE on public pairs)
    distill_steps: int = 0  # distillation steps per round; 0 = one pass over the public set
    server_lr: float = 1e-3
    public_batch_size: int = 32  # batches over the public set (server training, regulariser, distillation)
    reg_passes: int = 1  # regulariser passes over the public set per local job
    reg_weight: float = 0.5  # weight of (inter + intra)
    tau: float = 0.5  # regulariser temperature
    kd_weight: float = 0.3  # distillation weight, per client type present
    # Encrypted ensembles: each site's per-item weight exp(score + log M) is raised to this floor, so
    # that no item's weight sum falls below the fixed-point grid.
    weight_floor: float = 1e-4
    # The public set's SHA-256 fingerprint (secure_fedvlp.data.VLPDataset.fingerprint); "" = pinned by each
    # site at first use.  A site refuses a round whose public set differs from the pinned one.
    public_fingerprint: str = ""

    def __post_init__(self) -> None:
        check = _Checks()
        for key in ("server_steps", "distill_steps", "reg_passes"):
            v = getattr(self, key)
            low = 0 if key in ("distill_steps", "reg_passes") else 1
            check(v >= low, f"creamfl.{key}", v, f"must be >= {low}")
        check(self.server_lr > 0, "creamfl.server_lr", self.server_lr, "must be > 0")
        check(self.public_batch_size >= 2, "creamfl.public_batch_size", self.public_batch_size, "must be >= 2")
        for key in ("reg_weight", "kd_weight"):
            check(getattr(self, key) >= 0, f"creamfl.{key}", getattr(self, key), "must be >= 0")
        check(self.tau > 0, "creamfl.tau", self.tau, "must be > 0")
        check(0 < self.weight_floor <= 1, "creamfl.weight_floor", self.weight_floor, "must be in (0, 1]")
        fp = self.public_fingerprint
        check(
            fp == "" or (len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)),
            "creamfl.public_fingerprint",
            fp,
            "must be empty or a 64-character lowercase hex SHA-256",
        )
        check.done()

    def client_model_for(self, site: str, default: str) -> str:
        """The local architecture of ``site``."""
        return self.client_models.get(site) or self.client_model or default


@dataclass(frozen=True)
class FedSMConfig:
    """FedSM (CVPR 2022; NVFlare ``research/fed-sm``): federated segmentation fine-tuning on a frozen VLP encoder.

    A global decoder (FedAvg), a personalised decoder per site (SoftPull with ``soft_pull_lambda``) and a site
    selector (one full-batch Adam step per round, moments averaged); at inference an image goes to the site's
    personalised decoder when the selector gives it that site with probability above ``threshold``, else to the
    global decoder.  ``encoder_checkpoint`` is the parameter file of a finished VLP run whose image encoder is
    used frozen (``""``: the seeded, untrained encoder).
    """

    encoder_checkpoint: str = ""
    soft_pull_lambda: float = 0.7
    threshold: float = 0.9
    lr: float = 1e-3
    select_lr: float = 1e-3
    decoder_width: int = 16
    global_steps: int = 0  # 0 = train.local_steps
    person_steps: int = 0  # 0 = train.local_steps

    def __post_init__(self) -> None:
        check = _Checks()
        check(0 < self.soft_pull_lambda <= 1, "fedsm.soft_pull_lambda", self.soft_pull_lambda, "must be in (0, 1]")
        check(0 <= self.threshold <= 1, "fedsm.threshold", self.threshold, "must be in [0, 1] (1 = global model only)")
        check(self.lr > 0, "fedsm.lr", self.lr, "must be > 0")
        check(self.select_lr > 0, "fedsm.select_lr", self.select_lr, "must be > 0")
        check(self.decoder_width >= 1, "fedsm.decoder_width", self.decoder_width, "must be >= 1")
        check(self.global_steps >= 0, "fedsm.global_steps", self.global_steps, "must be >= 0 (0 = train.local_steps)")
        check(self.person_steps >= 0, "fedsm.person_steps", self.person_steps, "must be >= 0 (0 = train.local_steps)")
        check.done()


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP for each client's records (docs/design.md, "The privacy unit").

    With ``enabled = true`` every method's trainer is wrapped in DP-SGD (Opacus: per-sample
    clipping, Gaussian noise, Poisson sampling), every release is recorded in the client's
    ledger before it happens, and a release that would exceed ``(target_epsilon, delta)``
    is refused.  ``noise_multiplier = 0`` calibrates the noise from the target and the
    planned rounds and steps (never overshooting).

    ``grad_sample_mode`` picks how Opacus clips per sample (same result, different cost):
    ``hooks`` (per-layer rules), ``functorch`` (vmap), or ``ghost`` (fast gradient clipping:
    per-sample gradient norms without per-sample gradients where Opacus can, then a second
    backward of the clipped loss; flat clipping only).  See ``secure_fedvlp.wrappers.dpsgd``.

    ``seeded_randomness``: by default DP-SGD's Poisson sampling and noise are drawn from
    generators seeded from the operating system's CSPRNG for every local job, so nobody can
    predict them.  ``true`` derives them from ``run.seed`` instead (bit-for-bit reproducible DP
    runs, for tests and experiments); ``run.seed`` is in the config the server holds, so such a
    run makes **no** DP claim against the server or anyone else who knows the seed (they could
    regenerate the noise and the batches): the report says so and ``secure-fedvlp audit`` fails it.
    """

    enabled: bool = False
    target_epsilon: float = 8.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0
    clip_norm: float = 1.0
    clipping: Literal["flat", "per_layer"] = "flat"
    grad_sample_mode: Literal["hooks", "functorch", "ghost"] = "hooks"
    secure_mode: bool = False
    seeded_randomness: bool = False
    accountant: Literal["rdp", "pld"] = "rdp"
    # Noised scalar reports (FedDRA's DRO losses): per-record clip and noise multiplier.
    report_clip: float = 10.0
    report_noise_multiplier: float = 2.0
    # The public size of every training site's training split (0 = not given: the synthetic source
    # declares data.synthetic.train_per_site; real sources must declare it, here or per site below).
    declared_size: int = 0
    # Per-site declared sizes, e.g. {site1 = 5000, site2 = 1200}; they take precedence over declared_size.
    declared_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def min_report_count(self) -> int:
        """The smallest public denominator a noised mean report may have: ``ceil(4 * report_noise_multiplier)``.

        A report is ``(sum of values clipped to [0, C_r] + N(0, (z_r C_r)^2)) / m``, so its noise std is
        ``z_r C_r / m``.  The rule keeps that std at most a quarter of the clip range ``C_r``
        (``m >= 4 z_r``); below it the noise swamps the losses it reports (a noised mean loss of -3.36
        from four records, and DRO weights of 0.007 / 0.993 from it).
        """
        return max(1, math.ceil(4.0 * self.report_noise_multiplier - 1e-9))

    def __post_init__(self) -> None:
        check = _Checks()
        check(
            self.target_epsilon > 0 and self.target_epsilon != float("inf"),
            "privacy.target_epsilon",
            self.target_epsilon,
            "must be a positive finite number",
        )
        check(0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1)")
        check(self.noise_multiplier >= 0, "privacy.noise_multiplier", self.noise_multiplier, "must be >= 0")
        check(self.clip_norm > 0, "privacy.clip_norm", self.clip_norm, "must be > 0")
        check(self.report_clip > 0, "privacy.report_clip", self.report_clip, "must be > 0")
        check(self.declared_size >= 0, "privacy.declared_size", self.declared_size, "must be >= 0 (0 = not given)")
        for site, size in self.declared_sizes.items():
            check(
                not isinstance(size, bool) and isinstance(size, int) and size >= 1,
                f"privacy.declared_sizes.{site}",
                size,
                "must be an integer >= 1 (the public size of the site's training split)",
            )
        check(
            self.report_noise_multiplier > 0,
            "privacy.report_noise_multiplier",
            self.report_noise_multiplier,
            "must be > 0",
        )
        check(
            not (self.grad_sample_mode == "ghost" and self.clipping == "per_layer"),
            "privacy.grad_sample_mode",
            self.grad_sample_mode,
            "cannot be 'ghost' with privacy.clipping = 'per_layer': ghost clipping clips each "
            "record's whole gradient by one norm (use clipping = 'flat', or grad_sample_mode = 'hooks' for "
            "per-layer clipping)",
        )
        check.done()


@dataclass(frozen=True)
class EncryptionConfig:
    """CKKS-encrypted aggregation with TenSEAL (docs/design.md and docs/ckks.md).

    With ``enabled = true`` clients send weighted, encrypted updates (a Flower client mod),
    the server sums ciphertexts it cannot decrypt and keeps the global model encrypted (a
    strategy wrapper), and clients decrypt it at the start of each round.  ``key_dir`` is
    where ``secure-fedvlp keys init`` wrote the key files; ``""`` makes the run create a fresh
    set under ``<run_dir>/keys`` (simulation: the CLI plays the key authority).
    """

    enabled: bool = False
    key_dir: str = ""
    preset: str = "sum_only_128"
    n_threads: int = 0  # TenSEAL threads; 0 = run.threads_per_client
    # Noise flooding of the exported (decrypted) final model: statistical security in bits.
    export_flooding_bits: int = 40
    # An encrypted aggregate of fewer contributions is not adopted (the global model is kept):
    # with one contributor the "aggregate" every site decrypts would be that site's own update.
    min_contributors: int = 2
    # Public clip: every value a site encrypts is clipped to [-clip, clip] (after DP noise, so it is
    # post-processing); with the largest admissible weight this keeps every sum inside the CKKS modulus,
    # and a site refuses an aggregate whose decrypted magnitude exceeds clip x total weight.
    clip: float = 100.0
    # What travels: "packed_delta" (each site sends its update relative to the round's global model,
    # clipped to [-delta_bound, delta_bound], quantised to value_bits (0: the most that fit 3 per slot)
    # and packed, ~10.7 bytes per value) or "exact" (the weighted full model on a fixed-point grid,
    # one value per slot, ~32 bytes per value).  docs/ckks.md compares them.
    codec: str = "packed_delta"
    delta_bound: float = 0.25
    value_bits: int = 0

    def __post_init__(self) -> None:
        from secure_fedvlp.encryption.params import PRESETS

        check = _Checks()
        check(self.preset in PRESETS, "encryption.preset", self.preset, f"must be one of {sorted(PRESETS)}")
        check(self.n_threads >= 0, "encryption.n_threads", self.n_threads, "must be >= 0")
        check(
            1 <= self.export_flooding_bits <= 128,
            "encryption.export_flooding_bits",
            self.export_flooding_bits,
            "must be in [1, 128]",
        )
        check(self.min_contributors >= 1, "encryption.min_contributors", self.min_contributors, "must be >= 1")
        check(
            isinstance(self.clip, (int, float)) and math.isfinite(self.clip) and self.clip > 0,
            "encryption.clip",
            self.clip,
            "must be a finite number > 0",
        )
        check(
            self.codec in ("packed_delta", "exact"), "encryption.codec", self.codec, "must be 'packed_delta' or 'exact'"
        )
        check(
            isinstance(self.delta_bound, (int, float)) and math.isfinite(self.delta_bound) and self.delta_bound > 0,
            "encryption.delta_bound",
            self.delta_bound,
            "must be a finite number > 0",
        )
        check(
            self.value_bits == 0 or 1 <= self.value_bits <= 32,
            "encryption.value_bits",
            self.value_bits,
            "must be 0 (auto) or 1..32",
        )
        check.done()


@dataclass(frozen=True)
class AnchorConfig:
    """Noised global anchor features: per-finding image and text anchors.

    Each round the current global model embeds every client's training records; each record's
    contribution (its embeddings under every finding it carries, plus a count) is clipped to
    L2 norm ``clip``; the sums are aggregated and Gaussian noise of std
    ``noise_multiplier * clip`` is added before anyone but the contributing client sees them.
    ``noise = "server"`` adds it at the server (in the ciphertext domain when encryption is on;
    a trusted-aggregator mode otherwise); ``"distributed"`` has each client add a share and
    refuses to release an aggregate with fewer than ``min_contributors`` shares.

    The trusted-aggregator mode (server noise without encryption) shows the server every site's
    un-noised sum, so the anchors' DP claim does not hold against the server.  It is a
    configuration error unless ``trust_server = true`` says so explicitly; the report, its
    ``not_covered`` list and ``secure-fedvlp audit`` then state that the claim holds only against
    parties other than the server.
    """

    enabled: bool = False
    clip: float = 1.0
    noise_multiplier: float = 2.0
    noise: Literal["server", "distributed"] = "server"
    min_contributors: int = 1
    use_as_negatives: bool = True  # the decomposable loss also draws negatives from the anchors
    use_for_guidance: bool = True  # FedDRA/FedAID guidance pulls towards the noised anchors
    trust_server: bool = False  # accept the trusted-aggregator mode (server noise, no encryption)

    def trusted_aggregator(self, encrypted: bool) -> bool:
        """Whether the server sees each site's un-noised sum (server noise without encryption)."""
        return self.noise == "server" and not encrypted

    def __post_init__(self) -> None:
        check = _Checks()
        check(self.clip > 0, "anchors.clip", self.clip, "must be > 0")
        check(self.noise_multiplier > 0, "anchors.noise_multiplier", self.noise_multiplier, "must be > 0")
        check(self.min_contributors >= 1, "anchors.min_contributors", self.min_contributors, "must be >= 1")
        check(
            self.noise == "server" or self.min_contributors >= 2,
            "anchors.min_contributors",
            self.min_contributors,
            "must be >= 2 with anchors.noise = 'distributed' (each share carries "
            "1/(min_contributors - 1) of the variance, so that any min_contributors - 1 shares give the full noise)",
        )
        check.done()


@dataclass(frozen=True)
class AuditConfig:
    """Empirical privacy audit: canary records inserted at one client.

    ``canaries`` random canary image-report pairs are generated from ``canary_seed``; each is
    inserted into the training data of ``canary_site`` with probability 1/2 (a fair coin per
    canary, drawn from the operating system's CSPRNG, never from the config).  After training, a
    membership-inference score on every canary gives an empirical lower bound on epsilon (Steinke, Nasr
    and Jagielski, 2023).
    """

    canaries: int = 0
    canary_site: str = ""  # "" = the first training site
    canary_seed: int = 1234

    def __post_init__(self) -> None:
        check = _Checks()
        check(
            self.canaries == 0 or self.canaries >= 2,
            "audit.canaries",
            self.canaries,
            "must be 0 (no empirical audit) or >= 2 (each canary is scored against the others)",
        )
        check.done()


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: everything a run needs, resolved and immutable."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    feddra: FedDRAConfig = field(default_factory=FedDRAConfig)
    creamfl: CreamFLConfig = field(default_factory=CreamFLConfig)
    fedsm: FedSMConfig = field(default_factory=FedSMConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        """The checks across sections, all reported together.

        They run once every section is valid: a section that fails its own checks (or a value of the
        wrong type) leaves nothing to compare, so its problems are reported first.
        """
        known = known_methods()
        check = _Checks()
        check(
            self.federation.method in known,
            "federation.method",
            self.federation.method,
            f"must be one of {', '.join(known)}",
        )
        check(
            not (self.privacy.enabled and self.train.objective == "infonce"),
            "train.objective",
            self.train.objective,
            "= 'infonce' cannot be used with 'privacy.enabled' = true: in-batch InfoNCE makes each record's loss "
            "depend on every other record of its batch (they are its negatives), so per-sample clipping does not "
            "bound one record's influence and the DP-SGD guarantee would not hold. Set train.objective = "
            "'decomposable' (negatives from the public reference set) or 'report_variants' (the record's own "
            "report variants)",
        )
        check(
            not (
                self.train.report_negatives
                and self.train.objective != "report_variants"
                and (self.train.objective, self.train.bank) != ("decomposable", "current")
            ),
            "train.report_negatives",
            self.train.report_negatives,
            "applies to the decomposable objective with the current model's bank, or to train.objective = "
            "'report_variants'; set train.objective = 'decomposable' and train.bank = 'current', or "
            "train.report_negatives = 0",
        )
        check(
            not (self.train.objective == "report_variants" and self.train.report_negatives < 1),
            "train.report_negatives",
            self.train.report_negatives,
            "must be >= 1 with train.objective = 'report_variants': it is the number of variants of each "
            "record's report that its image is contrasted with",
        )
        if self.train.objective == "site_centroids":
            check(
                self.model.trainable == "image_head",
                "model.trainable",
                self.model.trainable,
                "must be 'image_head' with train.objective = 'site_centroids': the site's report centroids are "
                "released once per run, so the report embeddings must stay the public start's (a trained text head "
                "would leave them behind)",
            )
            check(
                self.train.report_negatives == 0,
                "train.report_negatives",
                self.train.report_negatives,
                "must be 0 with train.objective = 'site_centroids' (its negatives are the site's report centroids)",
            )
            check(
                not (self.data.source == "synthetic" and self.data.synthetic.public_size < 1),
                "data.synthetic.public_size",
                self.data.synthetic.public_size,
                "must be >= 1 with train.objective = 'site_centroids', whose bins are the public reports' clusters",
            )
        check(
            not (self.train.report_negatives and self.model.trainable not in ("heads", "image_head")),
            "train.report_negatives",
            self.train.report_negatives,
            "needs locked towers (its variants are embedded once per job); set model.trainable = 'heads' or "
            "'image_head'",
        )
        check(
            not (self.train.bank == "current" and self.train.objective != "decomposable"),
            "train.bank",
            self.train.bank,
            "= 'current' applies to the decomposable objective (its public negatives); set train.objective = "
            "'decomposable' or train.bank = 'global'",
        )
        check(
            not (
                self.train.objective == "decomposable"
                and self.data.source == "synthetic"
                and self.data.synthetic.public_size < 1
            ),
            "data.synthetic.public_size",
            self.data.synthetic.public_size,
            "must be >= 1 with train.objective = 'decomposable', which takes "
            "its negatives from the public reference set",
        )
        check(
            not (
                self.anchors.enabled
                and self.anchors.trusted_aggregator(self.encryption.enabled)
                and not self.anchors.trust_server
            ),
            "anchors.trust_server",
            self.anchors.trust_server,
            "must be true to run anchors with anchors.noise = 'server' and encryption.enabled = false: the server then "
            "sees every site's un-noised anchor sum, so the anchors' DP claim would not hold against it. Turn "
            "encryption on, use anchors.noise = 'distributed', or set anchors.trust_server = true to accept a claim "
            "that holds only against parties other than the server",
        )
        check(
            not (
                self.federation.method == "creamfl"
                and self.data.source == "synthetic"
                and self.data.synthetic.public_size < 2
            ),
            "data.synthetic.public_size",
            self.data.synthetic.public_size,
            "must be >= 2 with federation.method = 'creamfl', which trains the server model on the public set and "
            "ensembles the sites' representations of it",
        )
        check(
            not (
                self.pretrain.enabled
                and not self.model.init_checkpoint
                and self.pretrain.source == "synthetic"
                and self.data.synthetic.pretrain_size < self.pretrain.batch_size
            ),
            "data.synthetic.pretrain_size",
            self.data.synthetic.pretrain_size,
            f"must be >= pretrain.batch_size = {self.pretrain.batch_size} with pretrain.enabled = true and "
            "pretrain.source = 'synthetic' (the public start trains on that many synthetic public records; "
            "e.g. 4096)",
        )
        check(
            not (self.model.image_whitening and not (self.pretrain.enabled or self.model.init_checkpoint)),
            "model.image_whitening",
            self.model.image_whitening,
            "needs a public start to take the whitening from: set pretrain.enabled = true (or a "
            "model.init_checkpoint made with model.image_whitening = true)",
        )
        if self.privacy.enabled:
            self._check_declared_sizes(check)
        check.done()

    # -- declared public sizes (docs/design.md, "The privacy unit") -----------------------------
    def declared_size(self, site: str) -> int | None:
        """The public size of ``site``'s training split, or ``None`` when the configuration declares none.

        ``privacy.declared_sizes[site]``, else ``privacy.declared_size``, else (synthetic source)
        ``data.synthetic.train_per_site``: public configuration, never a count of the data.  Under DP
        every count a site releases, and its DP-SGD sample rate, derive from it.
        """
        p = self.privacy
        if site in p.declared_sizes:
            return int(p.declared_sizes[site])
        if p.declared_size > 0:
            return int(p.declared_size)
        if self.data.source == "synthetic":
            return int(self.data.synthetic.train_per_site)
        return None

    def require_declared_size(self, site: str) -> int:
        """:meth:`declared_size`, or a :class:`ConfigError` naming the site and the keys that declare it."""
        n = self.declared_size(site)
        if n is None:
            raise ConfigError(
                f"'privacy.declared_sizes.{site}' is missing: with privacy.enabled = true every training site needs "
                f"a declared public size (data.source = {self.data.source!r} declares none), because the DP-SGD "
                "sample rate and every count a site releases are computed from it, never from the data. Set "
                f"privacy.declared_sizes.{site} or privacy.declared_size."
            )
        return n

    def _declared_sizes_known(self) -> dict[str, int]:
        """The declared sizes the configuration alone fixes, by site (``"every site"`` for ``privacy.declared_size``
        when the site names come from the data)."""
        p = self.privacy
        if self.data.source == "synthetic":
            names = self.data.synthetic.site_names()
            return {s: n for s in names if (n := self.declared_size(s)) is not None}
        known = {s: int(n) for s, n in p.declared_sizes.items()}
        if p.declared_size > 0:
            known["every site"] = int(p.declared_size)
        return known

    def _check_declared_sizes(self, check: _Checks) -> None:
        """Under DP: a declared size exists, ``delta <= 1 / (10 n)`` per site, and a DRO slice fits its noise."""
        p = self.privacy
        if self.data.source != "synthetic":
            check(
                p.declared_size > 0 or bool(p.declared_sizes),
                "privacy.declared_size",
                p.declared_size,
                f"must be given (or privacy.declared_sizes per site) with privacy.enabled = true and data.source = "
                f"{self.data.source!r}: the DP-SGD sample rate and every count a site releases are computed from "
                "each site's declared public size, never from its data",
            )
        else:
            names = set(self.data.synthetic.site_names())
            for site in sorted(set(p.declared_sizes) - names):
                check(
                    False,
                    f"privacy.declared_sizes.{site}",
                    p.declared_sizes[site],
                    f"names no training site of the synthetic federation ({', '.join(sorted(names))})",
                )
        for site, n in sorted(self._declared_sizes_known().items()):
            bound = 1.0 / (10.0 * n)
            check(
                p.delta <= bound,
                "privacy.delta",
                p.delta,
                f"must be <= 1/(10 n) = {bound:.3g} for {site} (declared size n = {n}): a delta near 1/n allows "
                "releasing a record outright",
            )
            if self.federation.method in ("feddra", "fedaid"):
                m = self.feddra.slice_size(n)
                check(
                    m >= p.min_report_count,
                    "feddra.holdout_fraction",
                    self.feddra.holdout_fraction,
                    f"gives {site} a declared DRO slice of {m} records (holdout_fraction x declared size {n}); "
                    f"a noised DRO-loss report needs at least {p.min_report_count} (4 x "
                    f"privacy.report_noise_multiplier = 4 x {p.report_noise_multiplier:g}, so that its noise std "
                    "report_noise_multiplier x report_clip / slice stays within a quarter of report_clip). Raise "
                    "feddra.holdout_fraction or the declared size, or lower privacy.report_noise_multiplier",
                )


# --------------------------------------------------------------------------- method names

#: Entry-point group listing the methods' modules (``pyproject.toml``); the config reads only their names.
METHOD_ENTRY_POINTS = "secure_fedvlp.methods"
_DECLARED_METHODS: set[str] = set()


def declare_method(name: str) -> None:
    """Make ``name`` a valid ``federation.method`` (the method registry calls this when it registers one)."""
    _DECLARED_METHODS.add(str(name))


def known_methods() -> list[str]:
    """Valid ``federation.method`` names: the installed entry points and every method registered in this process.

    The config layer sits below the methods, so it knows them by name only, without importing them.
    """
    from importlib.metadata import entry_points

    return sorted({ep.name for ep in entry_points(group=METHOD_ENTRY_POINTS)} | _DECLARED_METHODS)


# --------------------------------------------------------------------------- helpers


class _FieldError(ValueError):
    """The range failures of one section (or of the checks across sections), raised together from
    ``__post_init__``; ``problems`` holds one sentence per failure, naming its key and value."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Checks:
    """Collects a section's range checks: call it once per rule, then :meth:`done` raises every failure at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def __call__(self, ok: bool, key: str, value: Any, why: str) -> None:
        if not ok:
            self.problems.append(f"'{key}' {why}. Found {value!r}.")

    def done(self) -> None:
        if self.problems:
            raise _FieldError(self.problems)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        (inner, *_) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(inner)}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return the (lightly coerced) value."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"'{key}' must be a table, found {type(value).__name__} {value!r}.")
            return None
        return _build(tp, value, key, problems)
    if origin is Literal:
        if value not in typing.get_args(tp):
            problems.append(f"'{key}' must be one of {_type_name(tp)}; found {value!r}.")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            sub: list[str] = []
            out = _coerce(value, arg, key, sub)
            if not sub:
                return out
        problems.append(f"'{key}' must be {_type_name(tp)}; found {type(value).__name__} {value!r}.")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            problems.append(f"'{key}' must be a list; found {type(value).__name__} {value!r}.")
            return value
        (inner, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, inner, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"'{key}' must be true or false; found {type(value).__name__} {value!r}.")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"'{key}' must be an integer; found {type(value).__name__} {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"'{key}' must be a number; found {type(value).__name__} {value!r}.")
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"'{key}' must be a string; found {type(value).__name__} {value!r}.")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            problems.append(f"'{key}' must be a table; found {type(value).__name__} {value!r}.")
        return value
    return value


def _build(cls: type, data: dict[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    n_before = len(problems)
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            valid = ", ".join(sorted(names))
            problems.append(f"unknown key '{dotted}' (valid keys here: {valid}).")
            continue
        kwargs[key] = _coerce(value, hints[key], dotted, problems)
    if len(problems) > n_before:
        return None
    try:
        return cls(**kwargs)
    except _FieldError as exc:
        problems.extend(exc.problems)
    except ConfigError as exc:  # nested specs (e.g. SyntheticSpec) validate themselves
        problems.extend(f"{prefix}: {p}" if prefix else p for p in exc.problems)
    except (TypeError, ValueError) as exc:
        problems.append(f"'{prefix or cls.__name__}': {exc}")
    return None


def parse_config(data: dict[str, Any], source: str | None = None) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from a nested dict, collecting all problems."""
    problems: list[str] = []
    cfg = _build(ExperimentConfig, data, "", problems)
    if problems or cfg is None:
        raise ConfigError(problems or ["could not build the configuration"], source=source)
    return cfg


def _parse_value(text: str) -> Any:
    """Parse the right-hand side of ``--set key=value`` as a TOML value, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted ``key=value`` overrides applied."""
    out = json.loads(json.dumps(data))
    problems = []
    for item in overrides:
        if "=" not in item:
            problems.append(f"override {item!r} must look like section.key=value.")
            continue
        key, raw = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            problems.append(f"override {item!r} has an empty key.")
            continue
        node = out
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                problems.append(f"override {item!r}: '{p}' is not a table.")
                break
            node = nxt
        else:
            node[parts[-1]] = _parse_value(raw.strip())
    if problems:
        raise ConfigError(problems, source="--set")
    return out


def read_toml(path: str | Path, what: str = "config") -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} file {str(path)!r} does not exist.")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a TOML experiment config and apply ``key=value`` overrides."""
    data = apply_overrides(read_toml(path), list(overrides))
    return parse_config(data, source=str(path))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON/TOML-serialisable nested dict of a config."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def resolve_paths(cfg: ExperimentConfig, base: str | Path | None = None) -> ExperimentConfig:
    """``cfg`` with ``model.init_checkpoint`` made absolute (relative to ``base``, default the current directory).

    Every party of a run must read the same file whatever its working directory (a simulation
    client, a ``flwr run`` app), so the edges that read a config (the CLI, the ``flwr run`` apps)
    resolve it once.
    """
    path = cfg.model.init_checkpoint
    if not path:
        return cfg
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path(base if base is not None else Path.cwd()) / p
    resolved = str(p.resolve())
    if resolved == path:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_checkpoint=resolved))


def config_hash(cfg: Any) -> str:
    """Stable short hash of a config (identifies runs and caches)."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dump_toml(data: dict[str, Any]) -> str:
    """Serialise a nested dict of scalars/lists/tables as TOML (what :func:`read_toml` reads back).

    Raises ``TypeError`` for a value TOML cannot hold (``None``, arbitrary objects).
    """
    return tomli_w.dumps(data)
