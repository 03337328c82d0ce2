"""Data: the embedded synthetic federation and real-data manifest loaders."""

from secure_fedvlp.data.manifest import (
    load_chexpert,
    load_image,
    load_manifest,
    load_manifest_federation,
    load_mimic_cxr_jpg,
)
from secure_fedvlp.data.synthetic import SyntheticSpec, generate_federation, site_style
from secure_fedvlp.data.types import FINDINGS, Federation, SiteData, VLPDataset

__all__ = ["FINDINGS", "Federation", "SiteData", "VLPDataset", "SyntheticSpec", "generate_federation", "site_style",
           "load_manifest", "load_manifest_federation", "load_mimic_cxr_jpg", "load_chexpert", "load_image"]
