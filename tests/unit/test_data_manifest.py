"""Real-data manifest loaders: formats, image decoders, adapters and one-pass error reports."""

import csv
import gzip
import json

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from secure_fedvlp.data import FINDINGS, load_chexpert, load_manifest, load_mimic_cxr_jpg
from secure_fedvlp.data.adapters import extract_report_sections, template_report
from secure_fedvlp.data.images import load_image
from secure_fedvlp.errors import DataError

GRAD = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (20, 1))  # 20 x 40, dark left -> bright right


def _png(path, arr=GRAD):
    Image.fromarray(arr).save(path)
    return path


def _jpeg(path, arr=GRAD):
    Image.fromarray(arr).convert("RGB").save(path, quality=95)
    return path


def _dicom(path, stored, *, photometric="MONOCHROME1", slope=2.0, intercept=-100.0, window=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "DX", "anon"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_image_decoders_png_jpeg_dicom(tmp_path):
    png = load_image(_png(tmp_path / "a.png"), 16)
    jpg = load_image(_jpeg(tmp_path / "a.jpg"), 16)
    for im in (png, jpg):
        assert im.shape == (16, 16) and im.dtype == np.float32 and 0 <= im.min() and im.max() <= 1
        # 20 x 40 is padded (black) to a centred square: the top and bottom quarters are empty
        assert im[:3].max() < 0.05 and im[-3:].max() < 0.05
        assert im[8, 13] > im[8, 3] + 0.5  # the gradient survives: bright on the right
    stored = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (40, 1))  # 40 x 40 ramp, left dark in stored units
    mono1 = load_image(_dicom(tmp_path / "m1.dcm", stored), 40)
    # MONOCHROME1: high stored values are dark, so the image gets darker to the right; min-max window -> [0, 1]
    assert mono1[:, 0].mean() == pytest.approx(1.0, abs=1e-3) and mono1[:, -1].mean() == pytest.approx(0.0, abs=1e-3)
    # rescale then the VOI window: value = stored*2 - 100, window centre 3900 width 200 -> [3800, 4000]
    win = load_image(_dicom(tmp_path / "w.dcm", stored, photometric="MONOCHROME2", window=(3900, 200)), 40)
    col = np.arange(40) * 100 * 2 - 100
    np.testing.assert_allclose(win[0], np.clip((col - 3800) / 200, 0, 1), atol=1e-5)
    assert pydicom.dcmread(tmp_path / "w.dcm").file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_csv_manifest_per_finding_columns_builds_federation(tmp_path):
    _png(tmp_path / "a.png")
    _jpeg(tmp_path / "b.jpg")
    _dicom(tmp_path / "c.dcm", np.full((8, 8), 7, np.uint16) + np.eye(8, dtype=np.uint16))
    rows = []
    for i, (img, site, split) in enumerate(
        [
            ("a.png", "A", "train"),
            ("b.jpg", "A", "validate"),
            ("c.dcm", "A", "test"),
            ("a.png", "B", "train"),
            ("b.jpg", "C", ""),
        ]
    ):
        row = {"image": img, "report": f"report {i}", "site": site, "split": split}
        row.update(
            {
                "No Finding": "",
                "Cardiomegaly": "1" if i == 0 else "0",
                "Pleural Effusion": "-1",
                "consolidation": "",
                "pneumothorax": "1.0" if i == 3 else "",
                "Lung Lesion": "",
            }
        )
        rows.append(row)
    fed = load_manifest(_write_csv(tmp_path / "m.csv", rows), image_size=24, heldout_site="C", uncertain="negative")
    assert [s.name for s in fed.sites] == ["A", "B"] and fed.heldout.name == "C" and fed.heldout.role == "heldout"
    a = fed.site("A")
    assert (len(a.train), len(a.val), len(a.test)) == (1, 1, 1)
    assert a.train.images.shape == (1, 24, 24) and a.train.reports == ["report 0"]
    np.testing.assert_array_equal(a.train.labels[0], [0, 1, 0, 0, 0, 0])  # -1 effusion -> negative
    np.testing.assert_array_equal(a.val.labels[0], [1, 0, 0, 0, 0, 0])  # nothing positive -> no_finding
    np.testing.assert_array_equal(fed.site("B").train.labels[0], [0, 0, 0, 0, 1, 0])
    assert a.test.images[0].max() <= 1 and a.test.has_text.all() and a.train.record_ids[0] == "A/train/row000001"
    ones = load_manifest(tmp_path / "m.csv", image_size=24, uncertain="positive")
    assert ones.site("A").train.labels[0, FINDINGS.index("pleural_effusion")] == 1
    with pytest.raises(DataError, match="unknown site 'Z'.*A, B, C"):
        fed.site("Z")


def test_jsonl_manifest_with_labels_column_gz_and_missing_text(tmp_path):
    _png(tmp_path / "a.png")
    recs = [
        {
            "image": "a.png",
            "report": "Cardiomegaly and left effusion.",
            "labels": "cardiomegaly|pleural_effusion",
            "site": "s1",
            "split": "train",
        },
        {"image": "a.png", "report": "", "labels": "", "site": "s1", "split": "train"},
        {"image": "a.png", "report": "Normal.", "labels": "No Finding", "site": "pub", "split": "test"},
    ]
    path = tmp_path / "m.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in recs) + "\n\n")
    fed = load_manifest(path, image_size=16, allow_missing_text=True, public_site="pub")
    tr = fed.site("s1").train
    np.testing.assert_array_equal(tr.labels, [[0, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    assert tr.has_text.tolist() == [True, False] and tr.reports[1] == ""
    assert fed.public is not None and len(fed.public) == 1 and fed.heldout is None
    assert tr[0]["image"].shape == (1, 16, 16) and "mask" not in tr[0]


def _bad_manifest(tmp_path):
    _png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    rows = [
        {"image": "ok.png", "report": "fine", "labels": "nodule", "site": "A"},
        {"image": "missing.png", "report": "fine", "labels": "nodule", "site": "A"},
        {"image": "ok.png", "report": "   ", "labels": "", "site": "A"},
        {"image": "ok.png", "report": "fine", "labels": "fibrosis", "site": "A"},
    ]
    return _write_csv(tmp_path / "bad.csv", rows)


def test_row_problems_are_collected_and_name_file_row_and_value(tmp_path):
    with pytest.raises(DataError) as ei:
        load_manifest(_bad_manifest(tmp_path), image_size=16)
    msg = str(ei.value)
    assert "bad.csv" in msg and "3 problems" in msg
    assert "row 2 (line 3)" in msg and "missing.png" in msg  # missing file
    assert "row 3 (line 4)" in msg and "'report' is empty" in msg  # empty report
    assert "row 4 (line 5)" in msg and "fibrosis" in msg  # unknown label
    # the unreadable image is found once the table is clean
    rows = [
        {"image": "ok.png", "report": "r", "labels": "", "site": "A"},
        {"image": "broken.png", "report": "r", "labels": "", "site": "A"},
    ]
    with pytest.raises(DataError, match=r"(?s)unreadable\.csv.*row 2 \(line 3\).*broken\.png"):
        load_manifest(_write_csv(tmp_path / "unreadable.csv", rows), image_size=16)


def test_header_problems_unknown_label_column_and_missing_required_column(tmp_path):
    _png(tmp_path / "ok.png")
    path = _write_csv(tmp_path / "h.csv", [{"image": "ok.png", "report": "r", "cardiomegaly": "1", "site": "A"}])
    with pytest.raises(DataError, match=r"(?s)h\.csv, line 1 \(header\).*unknown label column 'fibrosis'"):
        load_manifest(path, label_columns=["cardiomegaly", "fibrosis"])
    with pytest.raises(DataError, match=r"h\.csv, line 1 \(header\).*'Edema' is not in the header"):
        load_manifest(path, label_columns={"Edema": "consolidation"})
    nosite = _write_csv(tmp_path / "n.csv", [{"image": "ok.png", "report": "r", "cardiomegaly": "1"}])
    with pytest.raises(DataError, match=r"n\.csv, line 1 \(header\).*required column 'site'"):
        load_manifest(nosite)
    assert load_manifest(nosite, default_site="only", image_size=16).sites[0].name == "only"
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")


def test_problem_cap(tmp_path):
    rows = [{"image": f"m{i}.png", "report": "r", "labels": "", "site": "A"} for i in range(30)]
    with pytest.raises(DataError, match=r"30 problems(?s:.*)and 25 more \(cap 5\)"):
        load_manifest(_write_csv(tmp_path / "many.csv", rows), max_problems=5)


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 The heart is enlarged.  Small left
 pleural effusion.

 IMPRESSION:  Cardiomegaly with small left effusion.
"""


def test_report_section_extraction():
    assert extract_report_sections(MIMIC_REPORT) == (
        "The heart is enlarged. Small left pleural effusion. Cardiomegaly with small left effusion."
    )
    assert extract_report_sections(MIMIC_REPORT, ("impression",)) == "Cardiomegaly with small left effusion."
    assert extract_report_sections("no headings at all") == ""


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=5, max_size=5))
def test_template_report_mentions_exactly_the_positives(flags):
    lab = np.array([float(not any(flags)), *map(float, flags)])
    text = template_report(lab).lower()
    for flag, word in zip(
        flags, ("cardiomegaly", "pleural effusion", "consolidation", "pneumothorax", "lung nodule"), strict=True
    ):
        assert (f"no {word}" not in text) == flag
    assert ("no acute" in text) == (not any(flags))


def _mimic_layout(tmp_path):
    root = tmp_path / "mimic"
    studies = [
        ("10000032", "50414267", "d1", "PA", "train"),
        ("10000032", "50414267", "d2", "LATERAL", "train"),
        ("11000011", "51111111", "d3", "AP", "validate"),
        ("12000022", "52222222", "d4", "PA", "test"),
    ]
    meta, split, labels = [], [], []
    for subj, study, dicom, view, sp in studies:
        d = root / "files" / f"p{subj[:2]}" / f"p{subj}" / f"s{study}"
        d.mkdir(parents=True, exist_ok=True)
        _jpeg(d / f"{dicom}.jpg")
        meta.append({"dicom_id": dicom, "subject_id": subj, "study_id": study, "ViewPosition": view})
        split.append({"dicom_id": dicom, "study_id": study, "subject_id": subj, "split": sp})
    (root / "files/p10/p10000032/s50414267.txt").write_text(MIMIC_REPORT)
    (root / "files/p11/p11000011/s51111111.txt").write_text(" FINDINGS: Lungs are clear.\n")
    cols = [
        "Atelectasis",
        "Cardiomegaly",
        "Consolidation",
        "Edema",
        "Lung Lesion",
        "No Finding",
        "Pleural Effusion",
        "Pneumothorax",
        "Support Devices",
    ]
    for subj, study, vals in [
        ("10000032", "50414267", {"Cardiomegaly": "1.0", "Pleural Effusion": "-1.0"}),
        ("11000011", "51111111", {"No Finding": "1.0"}),
        ("12000022", "52222222", {"Lung Lesion": "1.0", "Atelectasis": "1.0"}),
    ]:
        labels.append({"subject_id": subj, "study_id": study, **{c: vals.get(c, "") for c in cols}})
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", meta)
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", split)
    with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(labels[0]))
        w.writeheader()
        w.writerows(labels)
    return root


def test_mimic_cxr_jpg_adapter(tmp_path):
    root = _mimic_layout(tmp_path)
    fed = load_mimic_cxr_jpg(root, image_size=16, uncertain="positive")
    s = fed.site("mimic")
    assert (len(s.train), len(s.val), len(s.test)) == (1, 1, 1)  # lateral d2 filtered out
    np.testing.assert_array_equal(s.train.labels[0], [0, 1, 1, 0, 0, 0])  # -1 effusion -> positive (U-Ones)
    assert s.train.reports[0].startswith("The heart is enlarged.") and "IMPRESSION" not in s.train.reports[0]
    assert s.train.record_ids == ["mimic/train/d1"]
    np.testing.assert_array_equal(s.val.labels[0], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(s.test.labels[0], [0, 0, 0, 0, 0, 1])  # Lung Lesion -> nodule
    assert not s.test.has_text[0] and s.test.reports[0] == ""  # report file absent -> has_text False
    with pytest.raises(DataError, match=r"(?s)mimic-cxr-2.0.0-metadata\.csv, row 4 \(line 5\).*s52222222\.txt"):
        load_mimic_cxr_jpg(root, image_size=16, missing_report="error")
    two = load_mimic_cxr_jpg(root, image_size=16, num_sites=2, missing_report="skip")
    assert sum(len(x.train) + len(x.val) + len(x.test) for x in two.all_sites()) == 2


def test_chexpert_adapter_template_or_no_text(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    rows = {
        "train.csv": [
            ("train/patient00001/study1/view1_frontal.jpg", "Frontal", {"Cardiomegaly": "1.0"}),
            ("train/patient00001/study1/view2_lateral.jpg", "Lateral", {}),
            ("train/patient00002/study1/view1_frontal.jpg", "Frontal", {"Lung Lesion": "-1.0"}),
        ],
        "valid.csv": [("valid/patient64541/study1/view1_frontal.jpg", "Frontal", {"No Finding": "1.0"})],
    }
    cols = ["No Finding", "Cardiomegaly", "Lung Lesion", "Pleural Effusion", "Consolidation", "Pneumothorax"]
    for table, entries in rows.items():
        out = []
        for rel, view, vals in entries:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            _jpeg(root / rel)
            out.append(
                {
                    "Path": f"CheXpert-v1.0-small/{rel}",
                    "Sex": "Female",
                    "Age": "68",
                    "Frontal/Lateral": view,
                    "AP/PA": "AP",
                    **{c: vals.get(c, "") for c in cols},
                }
            )
        _write_csv(root / table, out)
    fed = load_chexpert(root, image_size=16, val_fraction=0.0, uncertain="positive")
    s = fed.site("chexpert")
    assert (len(s.train), len(s.val), len(s.test)) == (2, 0, 1)
    np.testing.assert_array_equal(s.train.labels, [[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]])
    assert s.train.reports[0].startswith("Cardiomegaly.") and s.train.has_text.all()
    assert s.test.labels[0, 0] == 1
    bare = load_chexpert(root, image_size=16, reports="none").site("chexpert")
    assert not bare.test.has_text.any() and bare.test.reports == [""]
    (root / "train/patient00002/study1/view1_frontal.jpg").unlink()
    with pytest.raises(DataError, match=r"(?s)train\.csv, row 3 \(line 4\).*patient00002"):
        load_chexpert(root, image_size=16)
