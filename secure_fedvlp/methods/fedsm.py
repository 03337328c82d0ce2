"""FedSM (Xu et al., CVPR 2022, arXiv 2203.10144; NVFlare ``research/fed-sm``): federated segmentation fine-tuning.

The model (:class:`FedSMModel`) is a frozen image encoder taken from a federated VLP run
(``fedsm.encoder_checkpoint``) with three trainable parts: a **global** decoder, a **personalised**
decoder and a **site selector**, plus the selector's Adam moments.  Every round has three train
stages, each one Flower train message aggregated by the server (:meth:`FedSMStrategy.release_plan`):

1. ``global``: each site trains the global decoder (Dice loss); the server averages (FedAvg).
2. ``person``: each site completes its personalised model ``u_i`` by **SoftPull** and trains it into
   ``v_i``; it keeps ``v_i`` in its own directory and sends it; the server averages.  The message of
   the next round carries that mean ``S / N`` and the number ``N`` of contributors, and each site
   computes ``u_i = lambda v_i + (1 - lambda) / (N - 1) (S - v_i)`` (:func:`softpull_from_sum`), which
   is NVFlare's ``lambda v_i + (1 - lambda) / (N - 1) sum_{j != i} v_j``.  The server needs only the sum,
   so under CKKS it holds only the encrypted sum and no ``v_i`` leaves a site in clear.
3. ``select``: one full-batch Adam step of the selector with the site's index as the label, the Adam
   moments received from the server loaded first and sent back after (averaged by the server).

Weights: NVFlare weights every model by the local steps of the round; every site here takes the
plan's fixed step counts, so the weights are equal (:meth:`FedSMStrategy.aggregation_weights`).

Inference at a site (:meth:`FedSMTrainer.evaluate_model`): ``p = softmax(selector(x))``; if the
largest probability exceeds ``fedsm.threshold`` and names this site, the site's personalised
decoder segments the image, otherwise the global decoder (threshold 1.0: the global model only).
The other sites' personalised models are not at this site (they never leave theirs), so an image
the selector assigns to another site goes to the global decoder; the held-out site has no
personalised model and always uses the global one.  The rates at which images go each way are
reported.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from torch import nn

from secure_fedvlp.build import build_federation, build_model, seeded
from secure_fedvlp.config import ExperimentConfig
from secure_fedvlp.errors import DataError
from secure_fedvlp.methods.registry import register_method
from secure_fedvlp.methods.strategy import VLPStrategy
from secure_fedvlp.methods.trainer import LocalTrainer, TrainTask
from secure_fedvlp.models.segmentation import SiteSelector, UNetDecoder, dice_loss, feature_channels, per_image_dice
from secure_fedvlp.privacy.plan import ReleasePlan, StagePlan
from secure_fedvlp.wire import ARRAYS_KEY, CONFIG_KEY

logger = logging.getLogger(__name__)

__all__ = [
    "FedSMModel",
    "FedSMStrategy",
    "FedSMTrainer",
    "build_fedsm_model",
    "softpull",
    "softpull_from_sum",
    "CONTRIBUTORS",
    "IN_SUM",
]

GLOBAL, PERSON, SELECT = "global", "person", "select"
#: Train-config keys of the person stage: contributors N of the sum the message carries, and whether this site's
#: v_i is in it.
CONTRIBUTORS = "fedsm-contributors"
IN_SUM = "fedsm-in-sum"
PERSONAL_FILE = "fedsm_personal.npz"


# ----------------------------------------------------------------------------- SoftPull


def softpull(models: Mapping[str, np.ndarray], lam: float) -> dict[str, np.ndarray]:
    """NVFlare's SoftPull over contributors' models ``{site: v}`` (one array each): ``{site: u}``.

    ``u_i = lam v_i + (1 - lam) / (N - 1) sum_{j != i} v_j`` (the reference form, for tests and the docs).
    """
    n = len(models)
    if n < 2:
        raise ValueError(f"SoftPull needs at least 2 contributors (it averages the others' models). Found N = {n}.")
    out = {}
    for i, vi in models.items():
        others = [np.asarray(v, np.float64) for j, v in models.items() if j != i]
        out[i] = lam * np.asarray(vi, np.float64) + (1 - lam) / (n - 1) * np.sum(others, axis=0)
    return out


def softpull_from_sum(v_i: np.ndarray, total: np.ndarray, n: int, lam: float) -> np.ndarray:
    """``u_i`` from the site's own ``v_i`` and the sum ``total`` of all ``n`` contributors' models (``v_i`` in it).

    Equal to :func:`softpull`'s ``u_i``: ``lam v_i + (1 - lam) / (n - 1) (total - v_i)``.  ValueError at ``n < 2``.
    """
    if n < 2:
        raise ValueError(f"SoftPull needs at least 2 contributors (it averages the others' models). Found N = {n}.")
    v = np.asarray(v_i, np.float64)
    return lam * v + (1 - lam) / (n - 1) * (np.asarray(total, np.float64) - v)


# ----------------------------------------------------------------------------- the model


class _Moments(nn.Module):
    """Adam moments of the selector, stored as (travelling) parameters named after the selector's."""

    def __init__(self, selector: nn.Module) -> None:
        super().__init__()
        self.values = nn.ParameterDict(
            {n.replace(".", "__"): nn.Parameter(torch.zeros_like(p)) for n, p in selector.named_parameters()}
        )


class FedSMModel(nn.Module):
    """Frozen image encoder + global decoder + personalised decoder + selector (+ its Adam moments)."""

    def __init__(self, image_encoder: nn.Module, num_sites: int, width: int) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        for p in self.image_encoder.parameters():
            p.requires_grad_(False)
        chans = feature_channels(image_encoder)
        self.global_decoder = UNetDecoder(chans, width=width)
        self.person_decoder = copy.deepcopy(self.global_decoder)  # NVFlare starts every u_i at the global model
        self.selector = SiteSelector(chans[-1], num_sites)
        self.select_exp_avg = _Moments(self.selector)
        self.select_exp_avg_sq = _Moments(self.selector)

    def train(self, mode: bool = True) -> FedSMModel:
        super().train(mode)
        self.image_encoder.eval()  # frozen: always in inference mode
        return self

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The frozen encoder's maps at each resolution (finest first), without gradient."""
        from secure_fedvlp.models.segmentation import _levels

        enc = self.image_encoder
        with torch.no_grad():
            maps = [enc.stem(images)]
            for stage in enc.stages:
                maps.append(stage(maps[-1]))
        return [maps[j] for j in _levels(enc)]

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """No text: a placeholder so the shared batch collation works (reports are not used)."""
        n = len(texts)
        return {"input_ids": torch.zeros(n, 1, dtype=torch.long), "attention_mask": torch.ones(n, 1, dtype=torch.long)}

    def forward(self, images: torch.Tensor, part: str = GLOBAL) -> torch.Tensor:
        feats = self.features(images)
        if part == SELECT:
            return self.selector(feats[-1])
        decoder = self.global_decoder if part == GLOBAL else self.person_decoder
        return decoder(images, feats)


def _num_sites(cfg: ExperimentConfig) -> int:
    if cfg.data.source == "synthetic":
        return int(cfg.data.synthetic.num_sites)
    return len(build_federation(cfg).sites)


def build_fedsm_model(cfg: ExperimentConfig) -> FedSMModel:
    """The FedSM model every party builds identically: the run's VLP image encoder (from ``fedsm.encoder_checkpoint``
    when set), frozen, and seeded decoders and selector."""
    vlp = build_model(cfg)
    path = cfg.fedsm.encoder_checkpoint
    if path:
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files if k.startswith("image_encoder.")}
        except OSError as exc:
            raise DataError(f"'fedsm.encoder_checkpoint' = {path!r} cannot be read: {exc}.") from None
        if not arrays:
            raise DataError(f"'fedsm.encoder_checkpoint' = {path!r} holds no image_encoder.* parameters.")
        params = dict(vlp.named_parameters())
        with torch.no_grad():
            for n, a in arrays.items():
                if n not in params or tuple(params[n].shape) != a.shape:
                    raise DataError(
                        f"'fedsm.encoder_checkpoint' = {path!r}: {n!r} does not fit model {cfg.model.name!r}."
                    )
                params[n].copy_(torch.as_tensor(a))
    with seeded(cfg.run.seed + 1):
        return FedSMModel(vlp.image_encoder, _num_sites(cfg), cfg.fedsm.decoder_width)


# ----------------------------------------------------------------------------- the client


class FedSMTrainer(LocalTrainer):
    """The three FedSM stages at one site (see the module docstring); every stage runs :meth:`LocalTrainer.fit`."""

    name = "fedsm"

    def __init__(self, cfg: ExperimentConfig, device: torch.device, public=None) -> None:
        super().__init__(cfg, device, public)
        self.site_dir: Path | None = None  # the site's own directory (set by the client runtime)
        self.dice = dice_loss()
        self._select_opt: torch.optim.Optimizer | None = None
        self._round = 0
        self._stage = GLOBAL
        self._label = 0

    # -- where the site keeps v_i ----------------------------------------------------------
    def personal_path(self) -> Path | None:
        return None if self.site_dir is None else Path(self.site_dir) / PERSONAL_FILE

    def load_personal(self) -> dict[str, np.ndarray] | None:
        path = self.personal_path()
        if path is None or not path.exists():
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def save_personal(self, model: FedSMModel) -> None:
        path = self.personal_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().numpy() for n, p in model.person_decoder.named_parameters()}
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **state)
        tmp.replace(path)

    def site_index(self, site_name: str) -> int | None:
        """The selector's label of ``site_name`` (its position among the training sites), None if it is not one."""
        names = [s.name for s in build_federation(self.cfg).sites]
        return names.index(site_name) if site_name in names else None

    # -- hooks of the loop -----------------------------------------------------------------
    def make_objective(self) -> nn.Module:
        obj = nn.Identity()
        obj.couples_samples = False  # every loss below is per image
        return obj

    def training_subset(self, dataset):
        if dataset.masks is None:
            raise DataError(f"site {dataset.site!r}: FedSM trains on lesion masks; its training split has none.")
        return dataset

    def trainable_names(self, model: nn.Module, stage: str) -> list[str]:
        prefix = {GLOBAL: "global_decoder.", PERSON: "person_decoder.", SELECT: "selector."}.get(stage)
        if prefix is None:
            raise ValueError(f"unknown FedSM stage {stage!r}; expected global, person or select.")
        return [n for n, _ in model.named_parameters() if n.startswith(prefix)]

    def make_loader(self, dataset, model: nn.Module, generator: torch.Generator):
        if self._stage == SELECT:  # one full batch: the whole training split, one step
            from torch.utils.data import DataLoader

            from secure_fedvlp.models.state import make_collate

            return DataLoader(dataset, batch_size=len(dataset), shuffle=False, collate_fn=make_collate(model))
        return super().make_loader(dataset, model, generator)

    def make_optimizer(self, model: nn.Module, names: list[str]) -> torch.optim.Optimizer:
        params = dict(model.named_parameters())
        if self._stage != SELECT:
            chosen = [params[n] for n in names]
            if self.cfg.train.optimizer == "sgd":  # train.optimizer = "sgd" (parity tests); NVFlare's is Adam
                return torch.optim.SGD(chosen, lr=self.cfg.train.lr, momentum=0.9)
            return torch.optim.Adam(chosen, lr=self.cfg.fedsm.lr)
        sel = dict(model.selector.named_parameters())
        opt = torch.optim.Adam(list(sel.values()), lr=self.cfg.fedsm.select_lr)
        # NVFlare overwrites the local optimiser's moments with the averaged ones each round; the step count is the
        # round's (one selector step per round)
        for n, p in sel.items():
            key = n.replace(".", "__")
            opt.state[p] = {
                "step": torch.tensor(float(self._round - 1)),
                "exp_avg": model.select_exp_avg.values[key].detach().clone(),
                "exp_avg_sq": model.select_exp_avg_sq.values[key].detach().clone(),
            }
        self._select_opt = opt
        return opt

    def begin(self, model: nn.Module, task: TrainTask, global_state, dataset=None) -> dict[str, Any]:
        state: dict[str, Any] = {"stage": task.stage}
        if task.stage == SELECT:
            state["label"] = self._label
        return state

    def compute_loss(self, model: nn.Module, batch: dict[str, Any], state: dict[str, Any], reduction: str = "mean"):
        images = batch["images"]
        if state["stage"] == SELECT:
            logits = model(images, SELECT)
            target = torch.full((images.shape[0],), int(state["label"]), dtype=torch.long, device=logits.device)
            per = F.cross_entropy(logits, target, reduction="none")
        else:
            logits = model(images, state["stage"])
            per = self.dice(logits, batch["masks"]).reshape(-1)
        return {"loss": per if reduction == "none" else per.mean()}

    # -- one stage --------------------------------------------------------------------------
    def _softpull(self, model: FedSMModel, task: TrainTask) -> str:
        """Replace the received mean ``S / N`` in ``model.person_decoder`` by this site's ``u_i``; say what was done."""
        n = int(task.options.get(CONTRIBUTORS, 0))
        in_sum = bool(task.options.get(IN_SUM, 0))
        mine = self.load_personal()
        lam = self.cfg.fedsm.soft_pull_lambda
        with torch.no_grad():
            for name, p in model.person_decoder.named_parameters():
                if mine is None:  # first round: the received initial model
                    continue
                if not in_sum or n < 2:  # dropped last round, or nobody to pull from: keep v_i (NVFlare keeps it)
                    p.copy_(torch.as_tensor(mine[name]))
                    continue
                total = p.detach().cpu().double().numpy() * n
                p.copy_(torch.as_tensor(softpull_from_sum(mine[name], total, n, lam)).to(p.dtype))
        if mine is None:
            return "initial"
        return "softpull" if in_sum and n >= 2 else "kept"

    def fit(self, model, dataset, task: TrainTask, generator, global_state, *, engine=None) -> dict[str, float]:
        self._stage, self._round = task.stage, task.server_round
        label = self.site_index(dataset.site)
        if label is None:
            raise DataError(f"site {dataset.site!r} is not a training site of the federation; FedSM does not train it.")
        self._label = label
        pulled = self._softpull(model, task) if task.stage == PERSON else None
        metrics = super().fit(model, dataset, task, generator, global_state, engine=engine)
        if task.stage == PERSON:
            self.save_personal(model)  # v_i stays here; what leaves is the reply, summed by the server
            logger.info(
                "site %s round %d: personalised model from %s, trained", dataset.site, task.server_round, pulled
            )
        if task.stage == SELECT and self._select_opt is not None:
            with torch.no_grad():
                for n, p in model.selector.named_parameters():
                    st = self._select_opt.state[p]
                    key = n.replace(".", "__")
                    model.select_exp_avg.values[key].copy_(st["exp_avg"])
                    model.select_exp_avg_sq.values[key].copy_(st["exp_avg_sq"])
            metrics["select_steps"] = float(st["step"]) - float(self._round - 1)
        return metrics

    # -- evaluation at the site ---------------------------------------------------------------
    @torch.no_grad()
    def evaluate_model(self, model: FedSMModel, dataset, eval_cfg, device) -> dict[str, float]:
        """Per-image Dice with FedSM routing, of the global decoder alone, and the routing rates (module docstring)."""
        if dataset.masks is None or not len(dataset):
            return {"num-examples": float(len(dataset))}
        was = model.training
        model.eval()
        own = self.site_index(dataset.site)
        mine = self.load_personal() if own is not None else None
        person = None
        if mine is not None:
            person = copy.deepcopy(model.person_decoder)
            for name, p in person.named_parameters():
                p.copy_(torch.as_tensor(mine[name]))
        thr = self.cfg.fedsm.threshold
        d_route, d_glob, d_pers, to_global, to_own, to_other = [], [], [], [], [], []
        try:
            bs = eval_cfg.batch_size
            for i in range(0, len(dataset), bs):
                x = torch.from_numpy(dataset.images[i : i + bs]).unsqueeze(1).to(device)
                y = torch.from_numpy(dataset.masks[i : i + bs].astype(np.float32)).unsqueeze(1)
                feats = model.features(x)
                prob = torch.softmax(model.selector(feats[-1]), dim=1).cpu()
                top, arg = prob.max(dim=1)
                confident = top > thr
                mine_routed = confident & (arg == own) if own is not None else torch.zeros_like(confident)
                g = per_image_dice(model.global_decoder(x, feats).cpu(), y)
                pd = per_image_dice(person(x, feats).cpu(), y) if person is not None else g
                use_person = mine_routed if person is not None else torch.zeros_like(mine_routed)
                d_route.append(torch.where(use_person, pd, g))
                d_glob.append(g)
                d_pers.append(pd)
                to_global.append(~confident)
                to_own.append(use_person)
                to_other.append(confident & ~use_person)
        finally:
            model.train(was)
        cat = lambda xs: torch.cat(xs).double()  # noqa: E731
        out = {
            "dice": float(cat(d_route).mean()),
            "dice_global": float(cat(d_glob).mean()),
            "route_global": float(cat(to_global).mean()),
            "route_own": float(cat(to_own).mean()),
            "route_other_fallback": float(cat(to_other).mean()),
            "num-examples": float(len(dataset)),
        }
        if person is not None:
            out["dice_person"] = float(cat(d_pers).mean())
        return out


# ----------------------------------------------------------------------------- the server


class FedSMStrategy(VLPStrategy):
    """FedSM's server: three stages per round, equal weights, the person stage's contributors passed on."""

    method_name = "fedsm"

    @classmethod
    def release_plan(cls, cfg: ExperimentConfig) -> ReleasePlan:
        """``global`` and ``person`` stages of ``fedsm.global_steps`` / ``fedsm.person_steps`` (``train.local_steps``
        when 0), then one ``select`` step."""
        f = cfg.fedsm
        return ReleasePlan(
            stages=(
                StagePlan(GLOBAL, f.global_steps or cfg.train.local_steps),
                StagePlan(PERSON, f.person_steps or cfg.train.local_steps),
                StagePlan(SELECT, 1),
            )
        )

    def aggregation_weights(self, server_round: int, stage: str, replies: list[Message]) -> list[float]:
        """Equal: NVFlare weights by the round's local steps, which the plan makes equal at every site."""
        return [1.0] * len(replies)

    def planned_weight(self, site: str, stage: str) -> float | None:
        """Equal weights fixed before training (scaled for CKKS fixed-point precision, as FedDRA's)."""
        train = [s for s in self.sites.values() if s.role == "train"]
        return float(sum(max(1, s.num_train) for s in train)) / max(1, len(train))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if str(config.get("stage", "")) != PERSON:
            return super().configure_train(server_round, arrays, config, grid)
        contributors = self.last_accepted.get(PERSON, [])
        messages = []
        for nid in self.sample_train_nodes(server_round):
            node_cfg = ConfigRecord(dict(config))
            node_cfg[CONTRIBUTORS] = len(contributors)
            node_cfg[IN_SUM] = int(self.sites[nid].site in contributors)
            messages.append(
                Message(
                    RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: node_cfg}),
                    dst_node_id=nid,
                    message_type=MessageType.TRAIN,
                )
            )
        return messages

    def aggregate_train(self, server_round: int, replies, *, stage: str = "full", reference=None):
        arrays, metrics = super().aggregate_train(server_round, replies, stage=stage, reference=reference)
        if stage == PERSON and arrays is None:
            self.last_accepted[PERSON] = self._person_before  # nothing aggregated: the old sum stays, with its N
        return arrays, metrics

    def run_stage(self, server_round: int, stage: str, grid: Grid, arrays: ArrayRecord, timeout: float) -> ArrayRecord:
        if stage == PERSON:
            self._person_before = list(self.last_accepted.get(PERSON, []))
        out = super().run_stage(server_round, stage, grid, arrays, timeout)
        if stage == PERSON:
            self.recorder.record(
                {"round": server_round, "phase": "fedsm", "person_contributors": self.last_accepted.get(PERSON, [])}
            )
        return out


register_method(
    "fedsm",
    FedSMStrategy,
    FedSMTrainer,
    "FedSM: global and SoftPull-personalised segmentation decoders on a frozen VLP encoder, with a model selector.",
    model_builder=build_fedsm_model,
)
