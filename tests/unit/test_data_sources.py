"""Data sources chosen by the config: MIMIC-CXR-JPG and CheXpert from tiny files, clear errors, one label parser."""

import csv
import typing

import numpy as np
import pytest
from PIL import Image

from secure_fedvlp.build import build_federation
from secure_fedvlp.config import DataConfig, parse_config
from secure_fedvlp.data import FINDINGS, SOURCES, load_federation
from secure_fedvlp.data.labels import CHEXPERT_COLUMNS, parse_labels
from secure_fedvlp.errors import ConfigError, DataError

CHEX_COLS = ["No Finding", "Cardiomegaly", "Lung Lesion", "Pleural Effusion", "Consolidation", "Pneumothorax"]


def _image(path, jpeg=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.tile(np.linspace(0, 255, 24, dtype=np.uint8), (20, 1))
    Image.fromarray(arr).convert("RGB" if jpeg else "L").save(path, **({"quality": 90} if jpeg else {}))


def _csv(path, rows, fieldnames=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fieldnames or list(rows[0]), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def _chexpert(tmp_path, drop_column=None):
    """CheXpert-v1.0-small with 6 frontal training images of 6 patients (one lateral) and 2 validation images."""
    root = tmp_path / "CheXpert-v1.0-small"
    tables = {
        "train.csv": [
            (
                f"train/patient0000{i}/study1/view1_frontal.jpg",
                "Frontal",
                {"Cardiomegaly": "1.0"} if i % 2 else {"Pleural Effusion": "-1.0"},
            )
            for i in range(1, 7)
        ]
        + [("train/patient00001/study1/view2_lateral.jpg", "Lateral", {})],
        "valid.csv": [
            (f"valid/patient6454{i}/study1/view1_frontal.jpg", "Frontal", {"No Finding": "1.0"}) for i in range(1, 3)
        ],
    }
    cols = [c for c in CHEX_COLS if c != drop_column]
    for table, entries in tables.items():
        rows = []
        for rel, view, vals in entries:
            _image(root / rel)
            rows.append(
                {
                    "Path": f"CheXpert-v1.0-small/{rel}",
                    "Sex": "Male",
                    "Age": "60",
                    "Frontal/Lateral": view,
                    "AP/PA": "PA",
                    **{c: vals.get(c, "") for c in cols},
                }
            )
        _csv(root / table, rows)
    return root


def _mimic(tmp_path):
    """MIMIC-CXR-JPG with 4 frontal images of 4 patients (one lateral), reports for 3 studies."""
    root = tmp_path / "mimic-cxr-jpg"
    reports = tmp_path / "mimic-cxr-reports"
    entries = [
        ("10000001", "50000001", "d1", "PA", "train", {"Cardiomegaly": "1.0"}),
        ("10000001", "50000001", "d1lat", "LATERAL", "train", {}),
        ("11000002", "51000002", "d2", "AP", "train", {"Pleural Effusion": "-1.0"}),
        ("12000003", "52000003", "d3", "PA", "validate", {"No Finding": "1.0"}),
        ("13000004", "53000004", "d4", "PA", "test", {"Lung Lesion": "1.0"}),
    ]
    meta, split, labels = [], [], {}
    for subj, study, dicom, view, sp, vals in entries:
        rel = f"files/p{subj[:2]}/p{subj}/s{study}"
        _image(root / rel / f"{dicom}.jpg")
        meta.append({"dicom_id": dicom, "subject_id": subj, "study_id": study, "ViewPosition": view})
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subj, "split": sp})
        row = {"subject_id": subj, "study_id": study, **{c: vals.get(c, "") for c in CHEX_COLS}}
        labels.setdefault((subj, study), row)  # one label row per study
        if dicom != "d4":
            (reports / rel).parent.mkdir(parents=True, exist_ok=True)
            text = f" FINDINGS: Study {study}.\n\n IMPRESSION: Impression {study}.\n"
            (reports / f"{rel}.txt").write_text(text)
    _csv(root / "mimic-cxr-2.0.0-metadata.csv", meta)
    _csv(root / "mimic-cxr-2.0.0-split.csv", split)
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv", list(labels.values()))
    return root, reports


def _cfg(data, **extra):
    return parse_config({"data": {"synthetic": {"image_size": 16}, **data}, **extra})


def _n(site):
    return len(site.train) + len(site.val) + len(site.test)


def test_sources_known_to_the_config_are_the_data_layers():
    assert typing.get_args(typing.get_type_hints(DataConfig)["source"]) == SOURCES


def test_config_chexpert_builds_a_federation(tmp_path):
    root = _chexpert(tmp_path)
    cfg = _cfg({"source": "chexpert", "root": str(root), "uncertain": "positive"})
    fed = build_federation(cfg)
    (site,) = fed.sites
    assert site.name == "chexpert" and fed.heldout is None and fed.public is None
    assert (len(site.train) + len(site.val), len(site.test)) == (6, 2)  # the lateral view is dropped
    assert site.test.images.shape == (2, 16, 16) and site.test.labels[:, 0].tolist() == [1, 1]
    every = np.concatenate([site.train.labels, site.val.labels])
    # odd patients: cardiomegaly; even ones: uncertain effusion read as positive (U-Ones)
    assert sorted(every[:, 1].tolist()) == [0, 0, 0, 1, 1, 1] and every[:, 2].sum() == 3 and not every[:, 0].any()
    assert site.train.has_text.all() and all(r for r in site.train.reports)  # templated reports
    assert build_federation(cfg) is fed  # cached per process


def test_config_chexpert_sites_heldout_public_and_limit(tmp_path):
    root = _chexpert(tmp_path)
    fed = build_federation(
        _cfg(
            {
                "source": "chexpert",
                "root": str(root),
                "num_sites": 3,
                "heldout_site": "chexpert3",
                "public_site": "chexpert2",
            }
        )
    )
    assert [s.name for s in fed.sites] == ["chexpert1"] and fed.heldout.name == "chexpert3"
    assert _n(fed.sites[0]) + _n(fed.heldout) + len(fed.public) == 8
    small = build_federation(_cfg({"source": "chexpert", "root": str(root), "limit": 2}))
    assert _n(small.sites[0]) == 4  # the first 2 frontal rows of each table


def test_config_mimic_cxr_jpg_builds_a_federation(tmp_path):
    root, reports = _mimic(tmp_path)
    fed = build_federation(_cfg({"source": "mimic_cxr_jpg", "root": str(root), "reports_root": str(reports)}))
    s = fed.site("mimic")
    assert (len(s.train), len(s.val), len(s.test)) == (2, 1, 1)  # official splits; lateral dropped
    assert s.train.record_ids == ["mimic/train/d1", "mimic/train/d2"]
    np.testing.assert_array_equal(s.train.labels, [[0, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])  # -1 -> negative
    assert s.train.reports[0] == "Study 50000001. Impression 50000001."
    np.testing.assert_array_equal(s.test.labels[0], [0, 0, 0, 0, 0, 1])
    assert not s.test.has_text[0]  # no report for d4
    two = build_federation(
        _cfg({"source": "mimic_cxr_jpg", "root": str(root), "reports_root": str(reports), "num_sites": 2})
    )
    assert {x.name for x in two.sites} <= {"mimic1", "mimic2"} and sum(_n(x) for x in two.sites) == 4


def test_config_manifest_public_site(tmp_path):
    _image(tmp_path / "a.png", jpeg=False)
    rows = [
        {"image": "a.png", "report": f"r{i}", "labels": "", "site": site, "split": "train"}
        for i, site in enumerate(["A", "B", "pub"])
    ]
    path = _csv(tmp_path / "m.csv", rows)
    fed = build_federation(_cfg({"source": "manifest", "manifest_path": str(path), "public_site": "pub"}))
    assert [s.name for s in fed.sites] == ["A", "B"] and len(fed.public) == 1


def test_chexpert_missing_image_names_file_row_column_and_value(tmp_path):
    root = _chexpert(tmp_path)
    (root / "train/patient00003/study1/view1_frontal.jpg").unlink()
    with pytest.raises(DataError) as ei:
        build_federation(_cfg({"source": "chexpert", "root": str(root)}))
    msg = str(ei.value)
    assert "train.csv, row 3 (line 4)" in msg and "column 'Path'" in msg
    assert "'CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg' not found" in msg


def test_chexpert_missing_column_names_file_and_column(tmp_path):
    root = _chexpert(tmp_path, drop_column="Cardiomegaly")
    with pytest.raises(
        DataError,
        match=r"(?s)train\.csv, line 1 \(header\): required column 'Cardiomegaly' is missing"
        r".*valid\.csv, line 1 \(header\): required column 'Cardiomegaly'",
    ):
        load_federation("chexpert", root=str(root), image_size=16)


def test_chexpert_bad_label_value_names_row_column_and_value(tmp_path):
    root = _chexpert(tmp_path)
    rows = list(csv.DictReader(open(root / "valid.csv", newline="")))
    rows[1]["Pneumothorax"] = "2"
    _csv(root / "valid.csv", rows)
    with pytest.raises(DataError, match=r"valid\.csv, row 2 \(line 3\): label column 'Pneumothorax': value '2' is not"):
        load_federation("chexpert", root=str(root), image_size=16)
    with pytest.raises(
        DataError,
        match=r"(?s)train\.csv, row 2 \(line 3\): label column 'Pleural Effusion': "
        r"uncertain value -1",
    ):
        load_federation("chexpert", root=str(root), image_size=16, uncertain="error")


def test_mimic_table_problems_name_file_row_column_and_value(tmp_path):
    root, reports = _mimic(tmp_path)
    label_rows = list(csv.DictReader(open(root / "mimic-cxr-2.0.0-chexpert.csv", newline="")))
    without = [c for c in label_rows[0] if c != "Pneumothorax"]
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv", label_rows, fieldnames=without)
    with pytest.raises(
        DataError,
        match=r"mimic-cxr-2\.0\.0-chexpert\.csv, line 1 \(header\): required column "
        r"'Pneumothorax' is missing",
    ):
        load_federation("mimic_cxr_jpg", root=str(root), image_size=16)
    _csv(root / "mimic-cxr-2.0.0-chexpert.csv", label_rows)
    split_rows = list(csv.DictReader(open(root / "mimic-cxr-2.0.0-split.csv", newline="")))
    split_rows[3]["split"] = "holdout"
    _csv(root / "mimic-cxr-2.0.0-split.csv", split_rows)
    (root / "files/p11/p11000002/s51000002/d2.jpg").unlink()
    meta_rows = list(csv.DictReader(open(root / "mimic-cxr-2.0.0-metadata.csv", newline="")))
    meta_rows[4]["study_id"] = ""
    _csv(root / "mimic-cxr-2.0.0-metadata.csv", meta_rows)
    with pytest.raises(DataError) as ei:
        load_federation("mimic_cxr_jpg", root=str(root), reports_root=str(reports), image_size=16)
    msg = str(ei.value)
    assert "mimic-cxr-2.0.0-split.csv, row 4 (line 5): column 'split' has value 'holdout' for dicom_id 'd3'" in msg
    assert "mimic-cxr-2.0.0-metadata.csv, row 3 (line 4): image of dicom_id 'd2' not found" in msg
    assert "mimic-cxr-2.0.0-metadata.csv, row 5 (line 6): column 'study_id' is blank" in msg
    with pytest.raises(DataError, match=r"MIMIC-CXR reports directory '.*nowhere' does not exist"):
        load_federation("mimic_cxr_jpg", root=str(root), reports_root=str(tmp_path / "nowhere"), image_size=16)


def test_missing_dataset_directory_and_unknown_source(tmp_path):
    with pytest.raises(DataError, match=r"CheXpert directory '.*nope' does not exist"):
        build_federation(_cfg({"source": "chexpert", "root": str(tmp_path / "nope")}))
    with pytest.raises(DataError, match="unknown data source 'imagenet'; known sources: synthetic, manifest"):
        load_federation("imagenet", image_size=16)
    with pytest.raises(DataError, match="needs root; found ''"):
        load_federation("mimic_cxr_jpg", image_size=16)
    with pytest.raises(DataError, match="uncertain must be one of negative, positive, error; found 'maybe'"):
        load_federation("chexpert", root=str(tmp_path), image_size=16, uncertain="maybe")


@pytest.mark.parametrize(
    ("data", "pattern"),
    [
        ({"source": "chexpert"}, r"'data\.root' is required when data\.source = 'chexpert'\. Found ''"),
        ({"source": "mimic_cxr_jpg", "root": ""}, r"'data\.root' is required when data\.source = 'mimic_cxr_jpg'"),
        ({"source": "padchest"}, r"'data\.source' must be one of .*'chexpert'; found 'padchest'"),
        ({"source": "chexpert", "root": "/d", "num_sites": 0}, r"'data\.num_sites' must be >= 1\. Found 0"),
        ({"source": "chexpert", "root": "/d", "heldout_site": "chexpert2"}, r"'data\.num_sites' must be >= 2.*Found 1"),
        ({"limit": -1}, r"'data\.limit' must be >= 0.*Found -1"),
        (
            {"uncertain": "maybe"},
            r"'data\.uncertain' must be one of 'negative' \| 'positive' \| 'error'; found 'maybe'",
        ),
        (
            {"public_site": "X", "heldout_site": "X"},
            r"'data\.public_site' must differ from data\.heldout_site\. Found 'X'",
        ),
    ],
)
def test_config_validation_names_key_and_value(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config({"data": data})


def test_one_label_parser_for_every_loader():
    """CheXpert conventions: 1 / 0 / blank / -1 under each policy; positives clear no_finding."""
    row = {
        "No Finding": "1.0",
        "Cardiomegaly": "",
        "Pleural Effusion": "-1",
        "Consolidation": "0",
        "Pneumothorax": "",
        "Lung Lesion": "",
    }
    neg, errs = parse_labels(row, CHEXPERT_COLUMNS, uncertain="negative")
    assert errs == [] and neg.tolist() == [1, 0, 0, 0, 0, 0]
    pos, _ = parse_labels(row, CHEXPERT_COLUMNS, uncertain="positive")
    assert pos.tolist() == [0, 0, 1, 0, 0, 0]  # the positive effusion clears no_finding
    _, errs = parse_labels(row, CHEXPERT_COLUMNS, uncertain="error")
    assert errs == ["label column 'Pleural Effusion': uncertain value -1 (uncertain='error')"]
    blank, _ = parse_labels({c: "" for c in CHEXPERT_COLUMNS}, CHEXPERT_COLUMNS, uncertain="negative")
    assert blank.tolist() == [1, 0, 0, 0, 0, 0]  # nothing positive: no_finding derived
    listed, errs = parse_labels({"labels": "Lung Lesion|effusion"}, None, uncertain="negative")
    assert errs == [] and listed[[FINDINGS.index("nodule"), FINDINGS.index("pleural_effusion")]].tolist() == [1, 1]
    _, errs = parse_labels({"Cardiomegaly": "maybe"}, None, uncertain="negative")
    assert errs == ["label column 'Cardiomegaly': value 'maybe' is not one of 1, 0, -1 or blank"]
