"""Data: the embedded synthetic federation and the real-data loaders (manifest, MIMIC-CXR-JPG, CheXpert).

Names are imported lazily, so that reading a config (which needs only the torch-free
:class:`~secure_fedvlp.data.spec.SyntheticSpec`) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FINDINGS": "secure_fedvlp.data.types",
    "Federation": "secure_fedvlp.data.types",
    "SiteData": "secure_fedvlp.data.types",
    "VLPDataset": "secure_fedvlp.data.types",
    "SyntheticSpec": "secure_fedvlp.data.spec",
    "generate_federation": "secure_fedvlp.data.synthetic",
    "generate_pretrain_corpus": "secure_fedvlp.data.synthetic",
    "pretrain_corpus_key": "secure_fedvlp.data.synthetic",
    "site_style": "secure_fedvlp.data.synthetic",
    "SOURCES": "secure_fedvlp.data.sources",
    "load_federation": "secure_fedvlp.data.sources",
    "load_manifest": "secure_fedvlp.data.manifest",
    "load_manifest_federation": "secure_fedvlp.data.manifest",
    "load_mimic_cxr_jpg": "secure_fedvlp.data.adapters",
    "load_chexpert": "secure_fedvlp.data.adapters",
    "extract_report_sections": "secure_fedvlp.data.adapters",
    "template_report": "secure_fedvlp.data.adapters",
    "load_image": "secure_fedvlp.data.images",
    "LABEL_ALIASES": "secure_fedvlp.data.labels",
    "CHEXPERT_COLUMNS": "secure_fedvlp.data.labels",
    "parse_labels": "secure_fedvlp.data.labels",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
