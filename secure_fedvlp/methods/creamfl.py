"""CreamFL (Yu et al., ICLR 2023; code FLAIR-THU/CreamFL): a server model taught by heterogeneous sites.

Sites hold images only, reports only, or pairs (:attr:`SiteData.modality <secure_fedvlp.data.SiteData>`);
each trains its *own* local model (``creamfl.client_model`` / ``client_models``, any architecture with
the server's ``embed_dim``), which never leaves it.  Only representations of a public set travel.

Server (:class:`CreamFLStrategy`), each round
    1. trains the global (server) model, ``model.name``, on the public set (in-batch InfoNCE on public
       pairs: public data, no DP needed) for ``creamfl.server_steps`` steps;
    2. computes the global representations ``G^img``, ``G^txt`` of every public item;
    3. sends them to the sampled sites with the public set's fingerprint (and, for the evaluation
       guard, the global model the sites evaluated last);
    4. ensembles the sites' representations per item by their contrastive score against the global
       bank ("con_w": :func:`~secure_fedvlp.objectives.creamfl.ensemble`); a modality no site sent has
       no ensemble; with CKKS the ensemble is aggregated as a ratio of two encrypted sums
       (:mod:`secure_fedvlp.wrappers.encryption.ensemble`);
    5. distils the server model towards the ensembles (MSE, ``creamfl.kd_weight`` per client type
       present) for ``creamfl.distill_steps`` steps (one pass over the public set by default).

Site (:class:`CreamFLTrainer`), each job
    1. trains its local model on its private records: image-only, per-record BCE over the findings
       from the image embedding; text-only, the same from the report embedding; paired, the method's
       VLP objective (the per-sample decomposable one under DP).  Under DP-SGD this is the only step
       that touches a private record;
    2. a regulariser pass over the public set, outside the DP optimizer (public data, the broadcast
       global representations and the site's previous model only): inter-modal contrast against
       every global representation of the other modality, intra-modal MOON-style contrast (global
       representation positive, the previous local model's negative), ``tau = 0.5``, weight 0.5;
    3. replies with its local model's representations of the public set, for the modalities it
       holds, and no parameters.  They are a function of its DP-SGD output and public data:
       post-processing, logged in the ledger as a free release.

The public set is pinned: a site refuses a round whose public set (by SHA-256 fingerprint) is not
the one in ``creamfl.public_fingerprint``, or, when that is empty, the one it pinned at first use.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp import Grid
from torch import nn

from secure_fedvlp.build import build_federation, build_model, resolve_device, seeded
from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.data.types import FINDINGS
from secure_fedvlp.errors import ConfigError, ProtocolError
from secure_fedvlp.methods.registry import register_method
from secure_fedvlp.methods.strategy import RoundRecorder, VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
from secure_fedvlp.models.embed import embed_images, embed_texts
from secure_fedvlp.models.factory import create_model, get_model_spec
from secure_fedvlp.models.state import federated_state, load_federated_state
from secure_fedvlp.objectives import InfoNCELoss
from secure_fedvlp.objectives.creamfl import (
    distillation_terms,
    ensemble,
    modality_type_counts,
    regulariser_terms,
)
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, arrays_to_numpy, numpy_to_arrays

logger = logging.getLogger(__name__)

__all__ = [
    "CreamFLStrategy",
    "CreamFLTrainer",
    "GLOBAL_REPS_KEY",
    "REPS_KEY",
    "PUBLIC_FP",
    "MODALITY_REPS",
    "public_views",
]

#: Train-message record: the server model's representations of the public set (``image``, ``text``).
GLOBAL_REPS_KEY = "creamfl-global"
#: Train-reply record: the site's representations of the public set, for the modalities it holds.
REPS_KEY = "representations"
#: Train-message config key: the SHA-256 fingerprint of the server's public set.
PUBLIC_FP = "public-fingerprint"
#: Which representations a site of each modality sends.
MODALITY_REPS: dict[str, tuple[str, ...]] = {"paired": ("image", "text"), "image": ("image",), "text": ("text",)}
_OTHER = {"image": "text", "text": "image"}
_PREFIXES = {
    "image": ("image_encoder.", "image_head.", "image_classifier."),
    "text": ("text_encoder.", "text_head.", "text_classifier."),
}


@torch.no_grad()
def public_views(
    model: nn.Module, public, device: torch.device, batch_size: int, modalities: Iterable[str] = ("image", "text")
) -> dict[str, torch.Tensor]:
    """``model``'s (normalised) representations of every public item, by modality, in eval mode."""
    was = model.training
    model.eval()
    try:
        out: dict[str, torch.Tensor] = {}
        for m in modalities:
            if m == "image":
                out[m] = embed_images(model, public.images, batch_size, device)
            else:
                out[m] = embed_texts(model, list(public.reports), batch_size, device)
        return out
    finally:
        model.train(was)


def _public_batch(model: nn.Module, public, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    i = idx.cpu().numpy()
    tok = model.tokenize([public.reports[j] for j in i])
    return {
        "images": torch.from_numpy(np.ascontiguousarray(public.images[i])).unsqueeze(1).to(device),
        "input_ids": tok["input_ids"].to(device),
        "attention_mask": tok["attention_mask"].to(device),
    }


def _encode(model: nn.Module, batch: Mapping[str, torch.Tensor], modalities: Iterable[str]) -> dict[str, torch.Tensor]:
    out = {}
    for m in modalities:
        if m == "image":
            out[m] = model.encode_image(batch["images"])
        else:
            out[m] = model.encode_text(batch["input_ids"], batch["attention_mask"])
    return out


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterable[torch.Tensor]:
    """``steps`` batches of public items: consecutive slices of fresh permutations."""
    perm = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos : pos + batch_size]
        pos += batch_size


# ------------------------------------------------------------------------------------ client side
class CreamFLTrainer(LocalTrainer):
    """A site's CreamFL job: private training of its own model, the public regulariser, public representations."""

    name = "creamfl"
    post_processing_release = "creamfl public-set representations"

    def __init__(self, cfg: ExperimentConfig, device: torch.device, public=None) -> None:
        super().__init__(cfg, device, public)
        self.modality = "paired"
        self.site_name = ""
        self.site_dir: Path | None = None
        self._local: nn.Module | None = None
        self._pending: dict[str, np.ndarray] | None = None
        self._public_fp: str | None = None

    # -- the site's own model --------------------------------------------------------------
    def bind_site(self, site, site_dir) -> None:
        self.modality = site.modality
        self.site_name = site.name
        self.site_dir = Path(site_dir)

    @property
    def architecture(self) -> str:
        return self.cfg.creamfl.client_model_for(self.site_name, self.cfg.model.name)

    def build_local_model(self) -> nn.Module:
        """The site's local architecture (seeded), with a finding classifier per tower for single-modality sites."""
        name = self.architecture
        spec, server = get_model_spec(name), get_model_spec(self.cfg.model.name)
        if spec.embed_dim != server.embed_dim:
            raise ConfigError(
                f"'creamfl.client_model' {name!r} has embed_dim {spec.embed_dim}, but the server model "
                f"{self.cfg.model.name!r} has {server.embed_dim}: their representations must share one space."
            )
        with seeded(self.cfg.run.seed):
            model = create_model(name, text_weights_dir=self.cfg.model.text_weights_dir or None)
            model.image_classifier = nn.Linear(spec.embed_dim, len(FINDINGS))
            model.text_classifier = nn.Linear(spec.embed_dim, len(FINDINGS))
        model.restrict_trainable(self.cfg.model.trainable)
        return model.to(self.device)

    @property
    def _state_path(self) -> Path | None:
        return None if self.site_dir is None else self.site_dir / "creamfl_local_model.pt"

    def local_model(self) -> nn.Module:
        """The site's local model as its last job left it (read back from the site's directory when there)."""
        if self._local is None:
            self._local = self.build_local_model()
        path = self._state_path
        if path is not None and path.exists():
            self._local.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        return self._local

    def save_local_model(self, model: nn.Module) -> None:
        path = self._state_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)

    # -- the public set and the global bank ------------------------------------------------
    def pinned_fingerprint(self, own: str) -> str:
        """``creamfl.public_fingerprint``, else the fingerprint this site pinned at first use (pinned now if none)."""
        if self.cfg.creamfl.public_fingerprint:
            return self.cfg.creamfl.public_fingerprint
        if self.site_dir is None:
            return own
        path = self.site_dir / "creamfl_public_fingerprint.txt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(own + "\n", encoding="utf-8")
        return path.read_text(encoding="utf-8").strip()

    def global_bank(self, task: TrainTask) -> dict[str, torch.Tensor]:
        """The round's global representations, after checking the public set against the pin."""
        if self.public is None or len(self.public) < 2:
            raise ConfigError(
                "CreamFL needs a public set at every site (data.synthetic.public_size or data.public_site)."
            )
        if self._public_fp is None:
            self._public_fp = self.public.fingerprint()
        own = self._public_fp
        pinned = self.pinned_fingerprint(own)
        if own != pinned:
            raise ProtocolError(
                f"site {self.site_name}: its public set (sha256 {own[:16]}...) is not the pinned one "
                f"({pinned[:16]}...); refused."
            )
        sent = task.strings.get(PUBLIC_FP, "")
        if sent != pinned:
            raise ProtocolError(
                f"site {self.site_name}: the server's public set (sha256 {sent[:16] or 'none'}...) is not the "
                f"pinned one ({pinned[:16]}...); round {task.server_round} refused."
            )
        rec = task.records.get(GLOBAL_REPS_KEY)
        if rec is None or set(rec) != {"image", "text"}:
            raise ProtocolError(f"site {self.site_name}: the train message carries no global representations.")
        dim = get_model_spec(self.cfg.model.name).embed_dim
        bank = {}
        for m in ("image", "text"):
            a = np.asarray(rec[m], dtype=np.float32)
            if a.shape != (len(self.public), dim) or not np.isfinite(a).all():
                raise ProtocolError(
                    f"site {self.site_name}: global {m} representations of shape {a.shape} (or non-finite); "
                    f"expected ({len(self.public)}, {dim})."
                )
            bank[m] = torch.from_numpy(a).to(self.device)
        return bank

    # -- private training ----------------------------------------------------------------------
    def training_subset(self, dataset):
        """The records holding this site's modality (pairs for a paired site)."""
        if self.modality == "paired":
            return super().training_subset(dataset)
        flags = dataset.has_image if self.modality == "image" else dataset.has_text
        keep = np.flatnonzero(np.asarray(flags, bool))
        return dataset if keep.size == len(dataset) else dataset.subset(keep)

    def trainable_names(self, model: nn.Module, stage: str) -> list[str]:
        names = super().trainable_names(model, stage)
        if self.modality == "paired":
            return [n for n in names if not n.startswith(("image_classifier.", "text_classifier."))]
        return [n for n in names if n.startswith(_PREFIXES[self.modality])]

    def begin(
        self, model: nn.Module, task: TrainTask, global_state: Mapping[str, np.ndarray], dataset=None
    ) -> dict[str, Any]:
        if self.modality == "paired":
            return super().begin(model, task, global_state, dataset=dataset)
        return {}  # per-record BCE needs no bank

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], state: dict[str, Any], reduction: str = "mean"
    ) -> dict[str, torch.Tensor]:
        """Paired: the VLP objective.  Single modality: per-record BCE over the findings (mean over findings)."""
        if self.modality == "paired":
            return super().compute_loss(model, batch, state, reduction=reduction)
        # Under DP ``model`` is Opacus' wrapper, which forwards submodules only: the wrapped model's methods
        # (``inner``) run the same hooked submodules.
        if self.modality == "image":
            inner = getattr(model, "_module", model)
            z = inner.project_image(inner.image_encoder(batch["images"]))
            logits = model.image_classifier(z)
        else:
            z = F.normalize(model.text_head(model.text_encoder(batch["input_ids"], batch["attention_mask"])), dim=-1)
            logits = model.text_classifier(z)
        per = F.binary_cross_entropy_with_logits(logits, batch["labels"].to(logits.dtype), reduction="none").mean(-1)
        loss = per if reduction == "none" else per.mean()
        return {"loss": loss, "bce": loss}

    # -- the public regulariser ----------------------------------------------------------------
    def regularise(
        self, model: nn.Module, old: nn.Module, bank: Mapping[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, float]:
        """``creamfl.reg_passes`` passes over the public set with the inter- and intra-modal terms (plain steps)."""
        c = self.cfg.creamfl
        if c.reg_passes == 0 or c.reg_weight == 0:
            return {}
        mods = MODALITY_REPS[self.modality]
        federated = {n for n, p in model.named_parameters() if p.requires_grad}
        names = set(self.trainable_names(model, "full"))
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        sums: dict[str, float] = {}
        steps = 0
        try:
            model.train()
            opt = self.make_optimizer(model, [n for n, _ in model.named_parameters() if n in names])
            bs = min(c.public_batch_size, len(self.public))
            per_pass = math.ceil(len(self.public) / bs)
            for idx in _batches(len(self.public), bs, c.reg_passes * per_pass, generator):
                batch = _public_batch(model, self.public, idx, self.device)
                z = _encode(model, batch, mods)
                with torch.no_grad():
                    z_old = _encode(old, batch, mods)
                terms = regulariser_terms(z, z_old, bank, idx.to(self.device), tau=c.tau, weight=c.reg_weight)
                opt.zero_grad(set_to_none=True)
                terms["loss"].backward()
                opt.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                steps += 1
        finally:
            for n, p in model.named_parameters():
                p.requires_grad_(n in federated)
        return {f"train_reg_{k}": v / max(steps, 1) for k, v in sums.items()}

    # -- the job ---------------------------------------------------------------------------------
    def fit(
        self,
        model: nn.Module,
        dataset,
        task: TrainTask,
        generator: torch.Generator,
        global_state: Mapping[str, np.ndarray],
        *,
        engine=None,
    ) -> dict[str, float]:
        """Private training of the site's own model, the public regulariser, then its public representations.

        ``model`` holds the global (server) model, which a CreamFL site does not train; ``engine`` (DP-SGD's
        when privacy is on) drives the private steps only.
        """
        self._pending = None
        bank = self.global_bank(task)
        local = self.local_model()
        old = copy.deepcopy(local).eval()  # the previous model: the intra-modal negative
        for p in old.parameters():
            p.requires_grad_(False)
        metrics = super().fit(local, dataset, task, generator, global_state, engine=engine)
        metrics.update(self.regularise(local, old, bank, generator))
        views = public_views(local, self.public, self.device, self.cfg.eval.batch_size, MODALITY_REPS[self.modality])
        self._pending = {m: v.numpy().astype(np.float32) for m, v in views.items()}
        self.save_local_model(local)
        return metrics

    def reply_arrays(self, model: nn.Module) -> dict[str, dict[str, np.ndarray]]:
        """The site's representations of the public set (never parameters)."""
        if self._pending is None:
            raise RuntimeError("no representations to send: the job did not finish.")
        reps, self._pending = self._pending, None
        return {REPS_KEY: reps}


# ------------------------------------------------------------------------------------ server side
class CreamFLStrategy(VLPStrategy):
    """CreamFL's server: public training, global representations, the con_w ensemble, distillation."""

    method_name = "creamfl"
    #: What a train reply carries: representations of the public set, not parameters.
    reply_payload = "representations"
    #: Image-only, text-only and paired sites all train (each on what it holds).
    trains_on = ("paired", "image", "text")

    def __init__(self, cfg: ExperimentConfig, recorder: RoundRecorder | None = None) -> None:
        super().__init__(cfg, recorder)
        self.c = cfg.creamfl
        public = build_federation(cfg).public
        if public is None or len(public) < 2:
            raise ConfigError(
                "federation.method = 'creamfl' needs a public set of >= 2 image-report pairs "
                "(data.synthetic.public_size, or data.public_site for real sources)."
            )
        if not (np.asarray(public.has_image).all() and np.asarray(public.has_text).all()):
            raise ConfigError("CreamFL's public set must hold image-report pairs; some public records lack one.")
        self.public = public
        self.public_fp = public.fingerprint()
        if self.c.public_fingerprint and self.c.public_fingerprint != self.public_fp:
            raise ConfigError(
                f"'creamfl.public_fingerprint' = {self.c.public_fingerprint!r} but the public set's fingerprint "
                f"is {self.public_fp!r}."
            )
        self.device = resolve_device(cfg.run.device)
        self.server_model = build_model(cfg).to(self.device)
        self.embed_dim = int(self.server_model.spec.embed_dim)
        self.server_optimizer: torch.optim.Optimizer | None = None
        self.server_generator = torch.Generator().manual_seed(int(cfg.run.seed) + 7919)
        self.ensembles: dict[str, torch.Tensor | None] = {}

    def discover(self, grid: Grid, expected_nodes: int, timeout: float):
        sites = super().discover(grid, expected_nodes, timeout)
        for s in sites.values():
            if s.role != "train":
                continue
            name = self.c.client_model_for(s.site, self.cfg.model.name)
            dim = get_model_spec(name).embed_dim
            if dim != self.embed_dim:
                raise ConfigError(
                    f"site {s.site}'s local architecture {name!r} has embed_dim {dim}; the server model "
                    f"{self.cfg.model.name!r} has {self.embed_dim}."
                )
        return sites

    # -- the server model ------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        if self.server_optimizer is None:
            params = [p for p in self.server_model.parameters() if p.requires_grad]
            self.server_optimizer = torch.optim.AdamW(
                params, lr=self.c.server_lr, weight_decay=self.cfg.train.weight_decay
            )
        return self.server_optimizer

    def train_server(self, server_round: int) -> float:
        """``creamfl.server_steps`` steps of in-batch InfoNCE on public pairs; the mean loss."""
        model, opt, loss_fn = self.server_model, self._optimizer(), InfoNCELoss()
        bs = min(self.c.public_batch_size, len(self.public))
        model.train()
        total = 0.0
        for idx in _batches(len(self.public), bs, self.c.server_steps, self.server_generator):
            b = _public_batch(model, self.public, idx, self.device)
            out = model(b["images"], b["input_ids"], b["attention_mask"])
            loss = loss_fn(out["image_emb"], out["text_emb"], model.logit_scale)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        return total / max(1, self.c.server_steps)

    def distil(self, targets: Mapping[str, torch.Tensor | None], counts: Mapping[str, int]) -> float:
        """Distillation of the server model towards the ensembles; the mean loss."""
        model, opt = self.server_model, self._optimizer()
        bs = min(self.c.public_batch_size, len(self.public))
        steps = self.c.distill_steps or math.ceil(len(self.public) / bs)
        mods = [m for m in ("image", "text") if targets.get(m) is not None and counts.get(m, 0) > 0]
        if not mods:
            return float("nan")
        model.train()
        total = 0.0
        for idx in _batches(len(self.public), bs, steps, self.server_generator):
            b = _public_batch(model, self.public, idx, self.device)
            out = _encode(model, b, mods)
            terms = distillation_terms(
                out, {m: targets[m][idx].to(self.device) for m in mods}, counts, kd_weight=self.c.kd_weight
            )
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            opt.step()
            total += float(terms["loss"].detach())
        return total / max(1, steps)

    def server_arrays(self) -> ArrayRecord:
        return numpy_to_arrays(federated_state(self.server_model))

    # -- the sites' representations ------------------------------------------------------------------
    def expected_modalities(self, msg: Message) -> tuple[str, ...]:
        s = self.sites.get(msg.metadata.src_node_id)
        return MODALITY_REPS[s.modality if s is not None else "paired"]

    def validate_representations(self, msg: Message) -> str | None:
        """Reason to drop a reply, or None: representations of exactly the site's modalities, ``[M, d]``, finite."""
        content = msg.content
        if ARRAYS_KEY in content.array_records:
            return "reply carries model parameters; a CreamFL site sends public-set representations only"
        if REPS_KEY not in content.array_records:
            return f"reply carries no '{REPS_KEY}' record"
        want, got = set(self.expected_modalities(msg)), set(content[REPS_KEY].keys())
        if got != want:
            return f"representations of {sorted(got)}; the site holds {sorted(want)}"
        for m in sorted(want):
            a = content[REPS_KEY][m].numpy()
            if a.shape != (len(self.public), self.embed_dim):
                return f"{m} representations have shape {a.shape}, expected ({len(self.public)}, {self.embed_dim})"
            if not np.isfinite(a).all():
                return f"{m} representations hold non-finite values"
        return None

    def combine_representations(
        self, server_round: int, accepted: list[Message], bank: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor | None], dict[str, list[str]], dict[str, str]]:
        """The con_w ensemble per modality (plaintext): ``(ensembles, contributors, {site: reason dropped})``."""
        ens: dict[str, torch.Tensor | None] = {}
        who: dict[str, list[str]] = {}
        for m in ("image", "text"):
            msgs = [x for x in accepted if m in x.content[REPS_KEY].keys()]
            who[m] = [self.site_name(x) for x in msgs]
            reps = torch.stack([torch.from_numpy(x.content[REPS_KEY][m].numpy()) for x in msgs]) if msgs else None
            ens[m] = None if reps is None else ensemble(reps, bank[_OTHER[m]].cpu())[0].float()
        return ens, who, {}

    # -- the round -------------------------------------------------------------------------------------
    def train_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> ArrayRecord:
        # The server model's dropout draws from torch's global generator: seed it per round, so a run is
        # reproducible whatever else ran in the process.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(int(self.cfg.run.seed) * 1_000_003 + server_round)
            return self._train_round(server_round, grid, arrays, timeout)

    def _train_round(self, server_round: int, grid: Grid, arrays: ArrayRecord, timeout: float) -> ArrayRecord:
        load_federated_state(self.server_model, arrays_to_numpy(arrays))
        server_loss = self.train_server(server_round)
        row: dict[str, Any] = {"round": server_round, "phase": "creamfl", "server_public_loss": server_loss}
        if not self.c.use_clients:
            # The server model trained on the public set: the round adopted it, and no site was asked.
            self.participation.append({"stage": "full", "sampled": 0, "accepted": 0, "adopted": True})
            self.recorder.record(row)
            return self.server_arrays()
        bank = public_views(self.server_model, self.public, self.device, self.cfg.eval.batch_size)
        config = self.stage_config(server_round, "full")
        config[PUBLIC_FP] = self.public_fp
        global_record = ArrayRecord({m: Array(v.numpy().astype(np.float32)) for m, v in bank.items()})
        messages = list(self.configure_train(server_round, arrays, config, grid))
        for msg in messages:
            msg.content[GLOBAL_REPS_KEY] = global_record
            if PUBLIC_FP not in msg.content[CONFIG_KEY]:  # a wrapper rebuilt the config
                msg.content[CONFIG_KEY][PUBLIC_FP] = self.public_fp
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        accepted = []
        for msg in replies:
            site = self.site_name(msg)
            self.note_ledger_head(server_round, msg, "train", "full")
            if self.note_budget_exhausted(server_round, msg, "train"):
                continue
            reason = f"client error: {msg.error.reason}" if msg.has_error() else self.validate_representations(msg)
            if reason is not None:
                self._drop(server_round, "full", site, reason)
                continue
            accepted.append(msg)
        ens, who, rejected = self.combine_representations(server_round, accepted, bank) if accepted else ({}, {}, {})
        contributed = 0
        for msg in accepted:
            site = self.site_name(msg)
            if site in rejected:
                self._drop(server_round, "full", site, rejected[site])
                continue
            contributed += 1
            values = (
                {k: float(v) for k, v in msg.content[METRICS_KEY].items()}
                if METRICS_KEY in msg.content.metric_records
                else {}
            )
            self.recorder.record(
                {"round": server_round, "stage": "full", "phase": "train", "site": site, "status": "ok", **values}
            )
        # The round always adopts the server model (trained on the public set, distilled when an ensemble
        # exists); it is degraded when fewer sites contributed than were asked.
        self.participation.append({"stage": "full", "sampled": len(messages), "accepted": contributed, "adopted": True})
        counts = modality_type_counts([s.modality for s in self.sites.values() if s.role == "train"])
        self.ensembles = ens
        row.update({f"contributors_{m}": who.get(m, []) for m in ("image", "text")})
        if any(v is not None for v in ens.values()):
            row["distill_loss"] = self.distil(ens, counts)
        else:
            logger.warning("Round %d: no ensemble of any modality; the server model is not distilled.", server_round)
        self.recorder.record(row)
        return self.server_arrays()

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """As the base, but each metric is averaged over the sites that report it (sites differ in modality)."""
        replies = list(replies)
        base = super().aggregate_evaluate(server_round, replies)
        rows = [
            {k: float(v) for k, v in m.content[METRICS_KEY].items()}
            for m in replies
            if not m.has_error()
            and METRICS_KEY in m.content.metric_records
            and self.sites.get(m.metadata.src_node_id) is not None
            and self.sites[m.metadata.src_node_id].role == "train"
        ]
        if not rows:
            return base
        out: dict[str, float] = {}
        for k in sorted({k for r in rows for k in r}):
            have = [r for r in rows if k in r]
            w = np.asarray([r.get("num-examples", 1.0) for r in have])
            out[k] = float(np.average([r[k] for r in have], weights=w)) if k != "num-examples" else float(w.sum())
        return MetricRecord(out)


register_method(
    "creamfl",
    CreamFLStrategy,
    CreamFLTrainer,
    "CreamFL: heterogeneous sites teach a server model through an ensemble of public-set representations.",
)
