"""Canary records for the empirical privacy audit (Steinke, Nasr and Jagielski, 2023).

A canary is an image-report pair built to be unlike any real record and unlike every other
canary, so that a model can only score it well by having *seen it*, never by having learnt the
data distribution:

* the image is a random field of coarse blocks (random intensities on a random 4x4 to 8x8
  grid) plus fine noise: no anatomy, and every canary's layout differs;
* the report is a string of random everyday words (``CANARY_WORDS``): no finding vocabulary,
  and every canary's words differ;
* the finding labels are all zero (a canary carries no finding, so it feeds no finding anchor).

The ``m`` canaries are a deterministic function of ``audit.canary_seed`` (the auditor may publish
them; the membership test assumes the attacker knows the candidates).  Which of them are
*included* is decided by ``m`` fair coins drawn from the operating system's CSPRNG, never from
the config, so nobody who knows the config (the server does) can derive them.  The auditor
keeps the coins and hands the canary site only the list of records to add to its training split;
those files of the run directory are written and read by
:mod:`secure_fedvlp.evaluation.canary_files`.  The site's training-set size, which the server
sees as an aggregation weight, reveals how many canaries were included, not which.
"""

from __future__ import annotations

import secrets

import numpy as np

from secure_fedvlp.data.types import FINDINGS, VLPDataset
from secure_fedvlp.errors import ConfigError, DataError

__all__ = ["CANARY_WORDS", "make_canaries", "draw_coins", "resolve_canary_site", "concat_datasets"]

#: Everyday words with no radiology meaning (each a single WordPiece token of the BERT vocabulary).
CANARY_WORDS: tuple[str, ...] = tuple(
    """
apple river violin harbour quartz lantern garden pepper rocket castle meadow canyon pillow marble candle
window ladder basket dragon feather jacket kettle lemon mirror needle orange parrot pencil planet rabbit
saddle silver spider sugar summer tiger tomato tunnel velvet wagon walnut winter yellow zebra anchor
bridge button camera carpet cherry circus cloud copper cotton desert dinner engine forest fountain galaxy
guitar hammer honey island jungle kitten ladle magnet mango market monkey mountain napkin ocean olive
oyster painter palace peanut pirate pocket potato puzzle rainbow ribbon robot salmon sandal scarf shadow
shovel singer sofa statue stone storm sunset table teapot theatre thunder ticket tractor trumpet turtle
umbrella valley village volcano whistle wizard wolf yogurt bamboo beetle blanket bottle cabbage cactus
canoe carrot cello chess cinema coconut comet cookie crayon crystal dolphin donkey eagle falcon festival
flute fox giraffe glove goat harp helmet hockey igloo jelly kangaroo kite koala lobster melon mitten moose
noodle owl panda parade peach penguin piano pizza pumpkin raccoon radio rose sailor sausage scooter shark
skate snail squirrel strawberry submarine swan tennis tulip vase waffle walrus whale wheat
""".split()
)

_REPORT_WORDS = 10  # words per canary report


def make_canaries(m: int, seed: int, image_size: int) -> VLPDataset:
    """The ``m`` canary records of ``seed`` (deterministic; independent of any site's data)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"The number of canaries must be an integer >= 1. Found {m!r}.")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"Canary image size must be an integer >= 8. Found {image_size!r}.")
    rng = np.random.default_rng([int(seed), 7_331])
    images = np.empty((m, image_size, image_size), np.float32)
    for i in range(m):
        g = int(rng.integers(4, 9))
        coarse = rng.random((g, g))
        idx = (np.arange(image_size) * g) // image_size
        img = coarse[idx][:, idx] + 0.15 * rng.standard_normal((image_size, image_size))
        images[i] = np.clip(img, 0.0, 1.0)
    reports, seen = [], set()
    words = np.asarray(CANARY_WORDS)
    for _ in range(m):
        while True:
            r = " ".join(rng.choice(words, size=_REPORT_WORDS, replace=False))
            if r not in seen:
                break
        seen.add(r)
        reports.append(r)
    labels = np.zeros((m, len(FINDINGS)), np.float32)
    masks = np.zeros((m, image_size, image_size), np.uint8)
    return VLPDataset("canary", images, reports, labels, masks, [f"canary/{i:05d}" for i in range(m)])


def draw_coins(m: int) -> np.ndarray:
    """``m`` fair coins (True = included) from the operating system's CSPRNG."""
    bits = secrets.randbits(m)
    return np.array([(bits >> i) & 1 for i in range(m)], dtype=bool)


def resolve_canary_site(cfg, train_sites: list[str]) -> str:
    """``audit.canary_site``, or the first training site when it is ``""``; must be a training site."""
    if not train_sites:
        raise ConfigError("the empirical audit needs a training site to hold the canaries; the federation has none.")
    site = cfg.audit.canary_site or train_sites[0]
    if site not in train_sites:
        raise ConfigError(
            f"'audit.canary_site' must be one of the training sites ({', '.join(train_sites)}). Found {site!r}."
        )
    return site


def concat_datasets(a: VLPDataset, b: VLPDataset) -> VLPDataset:
    """Records of ``a`` followed by those of ``b`` (same image size), under ``a``'s site name."""
    if a.images.shape[1:] != b.images.shape[1:]:
        raise DataError(f"cannot concatenate images of shape {a.images.shape[1:]} and {b.images.shape[1:]}.")
    if (a.masks is None) != (b.masks is None):
        ma = a.masks if a.masks is not None else np.zeros(a.images.shape, np.uint8)
        mb = b.masks if b.masks is not None else np.zeros(b.images.shape, np.uint8)
    else:
        ma, mb = a.masks, b.masks
    masks = None if ma is None else np.concatenate([ma, mb])
    return VLPDataset(
        a.site,
        np.concatenate([a.images, b.images]),
        a.reports + b.reports,
        np.concatenate([a.labels, b.labels]),
        masks,
        a.record_ids + b.record_ids,
        np.concatenate([a.has_image, b.has_image]),
        np.concatenate([a.has_text, b.has_text]),
    )
