"""The canary files of a run directory: the auditor's coins and the canary site's list.

Before training, the auditor (:func:`prepare_canaries`, played by ``secure-fedvlp run``) draws
the coins that decide which canaries (:mod:`secure_fedvlp.data.canaries`) are included, keeps
them in :attr:`RunLayout.canary_coins <secure_fedvlp.layout.RunLayout.canary_coins>` (mode 0600),
and hands the canary site only the list of records to add to its training split
(:meth:`RunLayout.site_canaries <secure_fedvlp.layout.RunLayout.site_canaries>`; in deployment
this file lives on the site's disk).  Every client calls :func:`insert_canaries`; only the canary
site changes, and it reads its list, never the coins.  After training the empirical audit
(:mod:`secure_fedvlp.evaluation.membership`) reads the coins back with :func:`read_coins`.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from secure_fedvlp.data.canaries import concat_datasets, draw_coins, make_canaries, resolve_canary_site
from secure_fedvlp.data.types import SiteData
from secure_fedvlp.errors import ConfigError, DataError
from secure_fedvlp.layout import RunLayout

__all__ = ["prepare_canaries", "read_coins", "insert_canaries"]


def _write_private(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(data, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def prepare_canaries(
    cfg, run_dir: str | os.PathLike, train_sites: list[str], coins: np.ndarray | None = None
) -> dict[str, Any] | None:
    """The auditor's set-up before training: draw the coins (once per run directory) and hand the
    canary site its list.  Returns the coin record, or None when ``audit.canaries = 0``.

    ``coins`` (tests only) fixes the coins instead of drawing them from the CSPRNG.  An existing
    coin file of the same canaries is kept (a run restarted in its directory keeps its coins);
    one that disagrees with the config is an error.
    """
    a = cfg.audit
    if a.canaries == 0:
        return None
    layout = RunLayout(run_dir)
    site = resolve_canary_site(cfg, train_sites)
    path = layout.canary_coins
    if path.exists():
        rec = read_coins(run_dir)
        if (rec["m"], rec["canary_seed"], rec["canary_site"]) != (a.canaries, a.canary_seed, site):
            raise ConfigError(
                f"{path} holds coins for m={rec['m']}, canary_seed={rec['canary_seed']}, "
                f"site={rec['canary_site']!r}, but the config asks for m={a.canaries}, "
                f"canary_seed={a.canary_seed}, site={site!r}; use a fresh run directory."
            )
    else:
        source = "secrets (OS CSPRNG)"
        if coins is None:
            coins = draw_coins(a.canaries)
        else:
            coins = np.asarray(coins, dtype=bool)
            if coins.shape != (a.canaries,):
                raise ValueError(f"coins must be {a.canaries} booleans (audit.canaries). Found shape {coins.shape}.")
            source = "given by the caller"
        rec = {
            "m": a.canaries,
            "canary_seed": a.canary_seed,
            "canary_site": site,
            "included": [int(c) for c in coins],
            "source": source,
        }
        _write_private(path, rec)
    included = [i for i, c in enumerate(rec["included"]) if c]
    _write_private(layout.site_canaries(site), {"canary_seed": a.canary_seed, "m": a.canaries, "include": included})
    return rec


def read_coins(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The auditor's coin record of a run (validated)."""
    path = RunLayout(run_dir).canary_coins
    if not path.exists():
        raise DataError(
            f"{path} is missing: this run has no canary coins (was it run with audit.canaries > 0 "
            "through `secure-fedvlp run`?)."
        )
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        m, inc = int(rec["m"]), list(rec["included"])
        int(rec["canary_seed"])
        str(rec["canary_site"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a valid canary coin record: {exc}") from exc
    if len(inc) != m or any(c not in (0, 1) for c in inc):
        raise DataError(f"{path}: 'included' must hold m = {m} values of 0 or 1. Found {len(inc)} values.")
    return rec


def insert_canaries(cfg, run_dir: str | os.PathLike, site: SiteData, train_sites: list[str]) -> SiteData:
    """``site`` with its included canaries appended to its training split (unchanged elsewhere).

    Called by every client; only the canary site's changes, and it reads only the list it was
    given (:meth:`RunLayout.site_canaries <secure_fedvlp.layout.RunLayout.site_canaries>`), never the coins.
    """
    a = cfg.audit
    if a.canaries == 0 or site.role != "train" or site.name != resolve_canary_site(cfg, train_sites):
        return site
    path = RunLayout(run_dir).site_canaries(site.name)
    if not path.exists():
        raise DataError(
            f"audit.canaries = {a.canaries} makes {site.name!r} the canary site, but {path} is "
            "missing; `secure-fedvlp run` creates it (the auditor's set-up) before training."
        )
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        include = [int(i) for i in rec["include"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{path} is not a valid canary list: {exc}") from exc
    if int(rec.get("m", -1)) != a.canaries or int(rec.get("canary_seed", -1)) != a.canary_seed:
        raise DataError(
            f"{path} was made for m={rec.get('m')}, canary_seed={rec.get('canary_seed')}; the config "
            f"says m={a.canaries}, canary_seed={a.canary_seed}."
        )
    if any(not 0 <= i < a.canaries for i in include) or len(set(include)) != len(include):
        raise DataError(f"{path}: 'include' must hold distinct indices in [0, {a.canaries}).")
    if not include:
        return site
    canaries = make_canaries(a.canaries, a.canary_seed, site.train.images.shape[1]).subset(include)
    return replace(site, train=concat_datasets(site.train, canaries))
