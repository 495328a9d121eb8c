"""The synthetic release: exact formats, the reference mappings, the planted signals."""

import csv
import filecmp
import importlib.util
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from helpers import gazetune

from synthetic import phantom
from synthetic.release import resize_pad, screen_to_original, synthesize
from trainable.config import CLASS_NAMES as CLASSES
from trainable.data.split import TEST, patient_split
from trainable.errors import GazetuneError

# Literal headers of the release's tables, as published.
MASTER_HEADER = "dicom_id,path,study_id,patient_id,stay_id,gender,anchor_age,image_top_pad,image_bottom_pad,image_left_pad,image_right_pad,dx1,dx1_icd,dx2,dx2_icd,dx3,dx3_icd,dx4,dx4_icd,dx5,dx5_icd,dx6,dx6_icd,dx7,dx7_icd,dx8,dx8_icd,dx9,dx9_icd,normal_reports,Normal,CHF,pneumonia,consolidation,enlarged_cardiac_silhouette,linear__patchy_atelectasis,lobar__segmental_collapse,not_otherwise_specified_opacity___pleural__parenchymal_opacity__,pleural_effusion_or_thickening,pulmonary_edema__hazy_opacity,normal_anatomically,elevated_hemidiaphragm,hyperaeration,vascular_redistribution,atelectasis__chx,cardiomegaly__chx,consolidation__chx,edema__chx,enlarged_cardiomediastinum__chx,fracture__chx,lung_lesion__chx,lung_opacity__chx,no_finding__chx,pleural_effusion__chx,pleural_other__chx,pneumonia__chx,pneumothorax__chx,support_devices__chx,cxr_exam_indication"
FIXATION_HEADER = "SESSION_ID,MEDIA_ID,DICOM_ID,CNT,Time (in secs),TIMETICK(f=10000000),FPOGX,FPOGY,FPOGS,FPOGD,FPOGID,FPOGV,BPOGX,BPOGY,BPOGV,LPCX,LPCY,LPD,LPS,LPV,RPCX,RPCY,RPD,RPS,RPV,BKID,BKDUR,BKPMIN,LPMM,LPMMV,RPMM,RPMMV,SACCADE_MAG,SACCADE_DIR,VID_FRAME,X_ORIGINAL,Y_ORIGINAL"
BOX_HEADER = "dicom_id,bbox_name,x1,x2,y1,y2"
BOX_NAMES = {
    "cardiac silhouette", "left clavicle", "right clavicle", "left costophrenic angle",
    "right costophrenic angle", "left hilar structures", "right hilar structures", "left lung",
    "right lung", "left upper lung zone", "left mid lung zone", "left lower lung zone",
    "right upper lung zone", "right mid lung zone", "right lower lung zone", "trachea",
    "upper mediastinum",
}
DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def read_dicts(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def label_of(row: dict) -> str:
    return next(c for c in CLASSES if row[c] == "1")


def display(ds) -> np.ndarray:
    """What a viewer shows: rescale, the DICOM window (or min-max), MONOCHROME1 inverted."""
    arr = ds.pixel_array.astype(float)
    arr = arr * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    if "WindowCenter" in ds:
        centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
        arr = np.clip((arr - (centre - width / 2)) / width, 0, 1)
    else:
        arr = (arr - arr.min()) / (arr.max() - arr.min())
    return 1 - arr if ds.PhotometricInterpretation == "MONOCHROME1" else arr


def markers(image: np.ndarray) -> list[str]:
    """Corners whose marker box is saturated white."""
    boxes = {c: phantom.marker_box(c, image.shape) for c in phantom.CORNERS}
    return [c for c, (y0, y1, x0, x1) in boxes.items() if image[y0:y1, x0:x1].mean() > 0.95]


@pytest.fixture(scope="module")
def release(small_dataset):
    """The shared 60-image set (seed 0, no shortcut), its tables parsed once."""
    egd = small_dataset / "egd-cxr"
    master = read_dicts(egd / "master_sheet.csv")
    headers = {r["dicom_id"]: pydicom.dcmread(small_dataset / "mimic-cxr" / r["path"],
                                              stop_before_pixels=True) for r in master}
    return {"root": small_dataset, "egd": egd, "master": master, "headers": headers,
            "fixations": read_dicts(egd / "fixations.csv"),
            "boxes": read_dicts(egd / "bounding_boxes.csv")}


def test_headers_are_byte_identical_to_the_release(release):
    egd = release["egd"]
    for name, header in (("master_sheet.csv", MASTER_HEADER), ("fixations.csv", FIXATION_HEADER),
                         ("bounding_boxes.csv", BOX_HEADER)):
        assert (egd / name).read_bytes().startswith(header.encode() + b"\n"), name
    assert (egd / "filenames.csv").read_bytes().startswith(b"\xef\xbb\xbf,filename\r\n")


def test_every_row_has_the_release_columns_and_values(release):
    master = read_rows(release["egd"] / "master_sheet.csv")[1:]
    assert len(master) == 60 and all(len(r) == 59 for r in master)
    assert all(len(r) == 37 for r in read_rows(release["egd"] / "fixations.csv"))
    rows = release["master"]
    assert [label_of(r) for r in rows] == ["CHF"] * 20 + ["pneumonia"] * 20 + ["Normal"] * 20
    assert all(sum(int(r[c]) for c in CLASSES) == 1 for r in rows)
    assert all(DICOM_ID.match(r["dicom_id"]) for r in rows)
    ids = ("study_id", "patient_id", "stay_id")
    assert all(re.fullmatch(r"\d{8}", r[k]) for r in rows for k in ids)
    assert {r["anchor_age"] for r in rows} <= {"20 - 30", "30 - 40", "40 - 50", "50 - 60",
                                               "60 - 70", "70 - 80"}
    for r in rows:
        pid = r["patient_id"]
        assert r["path"] == f"files/p{pid[:2]}/p{pid}/s{r['study_id']}/{r['dicom_id']}.dcm"
    # The quirks a loader must survive: quoted commas, empty cells, multi-line text, -1.
    assert any("," in r["dx2"] for r in rows) and any(r["dx9"] == "" for r in rows)
    assert any("\n" in r["cxr_exam_indication"] for r in rows)
    assert all("___" in r["cxr_exam_indication"] for r in rows)
    chx = [v for r in rows for k, v in r.items() if k.endswith("__chx")]
    assert set(chx) == {"", "0", "1", "-1"}
    # Report findings agree with the class.
    assert all(r["normal_anatomically"] == str(int(label_of(r) == "Normal")) for r in rows)
    assert all(r["normal_reports"] == r["Normal"] for r in rows)
    icd = pd.read_csv(release["egd"] / "master_sheet.csv", dtype=str)["dx1_icd"]
    assert len(icd) == 60 and icd.str.len().min() >= 3


def test_pads_follow_the_reference_resize_pad(release):
    assert resize_pad(3056, 2544) == (0, 0, 534, 534)  # checks quoted in the spec
    assert resize_pad(2544, 3056) == (86, 86, 448, 448)
    for r in release["master"]:
        ds = release["headers"][r["dicom_id"]]
        pads = tuple(int(r[f"image_{s}_pad"]) for s in ("top", "bottom", "left", "right"))
        assert pads == resize_pad(ds.Rows, ds.Columns)


def test_screen_mapping_reproduces_the_spec_example():
    # The spec's public rows map to (998, 1035), (952, 884), (642, 860) on a 3056x2544 image;
    # these FPOG values lie inside the intervals that the reference formula sends there.
    pads, shape = (0, 0, 534, 534), (3056, 2544)
    for fpog, expected in (((0.4523, 0.33879), (998, 1035)), ((0.44427, 0.28943), (952, 884)),
                           ((0.3902, 0.28157), (642, 860))):
        assert screen_to_original(*fpog, pads, shape) == expected
    # Off the image: (-1, -1) scaled and truncated gives small negatives.
    assert screen_to_original(0.1, 0.5, pads, shape) == (-2, -2)
    # Odd sizes are padded to even before scaling.
    assert screen_to_original(0.5, 0.5, (0, 0, 534, 534), (3055, 2543)) == screen_to_original(
        0.5, 0.5, pads, shape)


def test_fixation_rows_follow_the_reference_mapping_and_clock(release):
    master = {r["dicom_id"]: r for r in release["master"]}
    per_image, sessions, off_image = Counter(), defaultdict(list), 0
    for row in release["fixations"]:
        assert float(row["Time (in secs)"]) == float(row["FPOGS"]) + float(row["FPOGD"])
        assert row["TIMETICK(f=10000000)"].endswith(".0")
        sessions[row["SESSION_ID"]].append(row)
        if row["DICOM_ID"] not in master:
            continue
        ds = release["headers"][row["DICOM_ID"]]
        r = master[row["DICOM_ID"]]
        pads = tuple(int(r[f"image_{s}_pad"]) for s in ("top", "bottom", "left", "right"))
        fpog = float(row["FPOGX"]), float(row["FPOGY"])
        xy = screen_to_original(*fpog, pads, (ds.Rows, ds.Columns))
        assert xy == (int(row["X_ORIGINAL"]), int(row["Y_ORIGINAL"]))
        if not pads[2] < fpog[0] * 1920 < 1920 - pads[3]:
            off_image += 1
            # int(-1 * scale): small negatives on real-size images, 0 on these small ones;
            # the reference heatmap keeps only y > 0.
            assert -4 < xy[0] <= 0 and -4 < xy[1] <= 0
        else:
            assert 0 <= xy[0] <= ds.Columns and 0 <= xy[1] <= ds.Rows
        per_image[row["DICOM_ID"]] += 1
    assert set(per_image) == set(master)
    assert min(per_image.values()) >= 20 and max(per_image.values()) <= 45
    assert 0 < off_image < 0.1 * sum(per_image.values())
    for rows in sessions.values():
        assert len({r["DICOM_ID"] for r in rows}) <= 30
        ids = [int(r["FPOGID"]) for r in rows]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        ticks = [float(r["TIMETICK(f=10000000)"]) for r in rows]
        assert ticks == sorted(ticks)


def test_calibration_screens_are_truncated_ids_outside_the_master_sheet(release):
    master_ids = [r["dicom_id"] for r in release["master"]]
    calibration = {r["DICOM_ID"] for r in release["fixations"]} - set(master_ids)
    assert len(calibration) == 3  # one per 20 images of each class
    assert calibration <= {d[:-5] for d in master_ids}


def test_bounding_boxes_name_the_17_structures_inside_the_image(release):
    boxes = defaultdict(dict)
    for b in release["boxes"]:
        assert all(re.fullmatch(r"\d+\.0", b[k]) for k in ("x1", "x2", "y1", "y2"))
        boxes[b["dicom_id"]][b["bbox_name"]] = [float(b[k]) for k in ("x1", "x2", "y1", "y2")]
    assert set(boxes) == set(release["headers"])
    for dicom_id, named in boxes.items():
        ds = release["headers"][dicom_id]
        assert set(named) == BOX_NAMES
        for x1, x2, y1, y2 in named.values():
            assert 0 <= x1 < x2 < ds.Columns and 0 <= y1 < y2 < ds.Rows
        # PA view: the patient's right lung is on the image's left.
        assert named["right lung"][0] < named["left lung"][0]


def test_subset_file_lists_94_percent_in_master_order(release):
    subset = pd.read_csv(release["egd"] / "filenames.csv", encoding="utf-8-sig", index_col=0)
    master_ids = [r["dicom_id"] for r in release["master"]]
    kept = subset["filename"].tolist()
    assert len(kept) == round(60 * 1017 / 1083) and subset.index.tolist() == list(range(1, 57))
    assert kept == [d for d in master_ids if d in set(kept)]


def test_dicoms_declare_what_they_hold(release):
    root, photometric, odd = release["root"], set(), False
    for r in release["master"]:
        ds = pydicom.dcmread(root / "mimic-cxr" / r["path"])
        pixels = ds.pixel_array
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.ViewPosition == "PA" and ds.Modality in ("CR", "DX")
        assert ds.PatientID == r["patient_id"]
        assert 10 <= ds.BitsStored <= 16 and ds.HighBit == ds.BitsStored - 1
        assert pixels.shape == (ds.Rows, ds.Columns) and pixels.dtype == np.uint16
        assert int(pixels.max()) < 2**ds.BitsStored
        photometric.add(ds.PhotometricInterpretation)
        odd |= ds.Rows % 2 == 1 or ds.Columns % 2 == 1
        assert 200 <= min(pixels.shape) and max(pixels.shape) <= 400
    assert photometric == {"MONOCHROME1", "MONOCHROME2"} and odd
    headers = release["headers"].values()
    assert any("RescaleSlope" in ds for ds in headers)
    assert 0.6 < np.mean(["WindowCenter" in ds for ds in headers]) < 1


def test_findings_are_drawn_and_looked_at(release):
    boxes = defaultdict(dict)
    for b in release["boxes"]:
        boxes[b["dicom_id"]][b["bbox_name"]] = [float(b[k]) for k in ("x1", "x2", "y1", "y2")]
    label = {r["dicom_id"]: label_of(r) for r in release["master"]}

    def ctr(named):  # cardiothoracic ratio from the boxes
        return ((named["cardiac silhouette"][1] - named["cardiac silhouette"][0])
                / (named["left lung"][1] - named["right lung"][0]))

    mean_ctr = {c: np.mean([ctr(boxes[d]) for d in boxes if label[d] == c]) for c in CLASSES}
    assert mean_ctr["CHF"] > mean_ctr["Normal"] + 0.05

    on_heart = defaultdict(list)
    for row in release["fixations"]:
        if row["DICOM_ID"] in label:
            x1, x2, y1, y2 = boxes[row["DICOM_ID"]]["cardiac silhouette"]
            x, y = int(row["X_ORIGINAL"]), int(row["Y_ORIGINAL"])
            on_heart[label[row["DICOM_ID"]]].append(x1 <= x <= x2 and y1 <= y <= y2)
    assert np.mean(on_heart["CHF"]) > 1.5 * np.mean(on_heart["Normal"])


def test_subtlety_one_removes_the_findings():
    draws = {c: [phantom.sample_chest(np.random.default_rng([c == "CHF", i]), c, 1.0)
                 for i in range(300)] for c in ("Normal", "CHF", "pneumonia")}
    assert all(ch.edema == 0 and ch.effusion_density == 0 for ch in draws["CHF"])
    assert all(ch.opacity.amplitude == 0 for ch in draws["pneumonia"])
    ctr = {c: np.mean([ch.ctr for ch in chests]) for c, chests in draws.items()}
    assert abs(ctr["CHF"] - ctr["Normal"]) < 0.01


def test_no_marker_without_shortcut_and_no_gaze_on_marker_boxes(release):
    root = release["root"]
    for r in release["master"][::6]:
        assert markers(display(pydicom.dcmread(root / "mimic-cxr" / r["path"]))) == []
    master = {r["dicom_id"]: r for r in release["master"]}
    for row in release["fixations"]:
        if row["DICOM_ID"] in master:
            ds = release["headers"][row["DICOM_ID"]]
            x, y = int(row["X_ORIGINAL"]), int(row["Y_ORIGINAL"])
            for corner in phantom.CORNERS:
                y0, y1, x0, x1 = phantom.marker_box(corner, (ds.Rows, ds.Columns))
                assert not (x0 <= x < x1 and y0 <= y < y1)


def test_shortcut_marker_follows_the_label_in_train_and_val_only(tmp_path):
    info = synthesize(tmp_path, n_images=60, seed=0, shortcut=1.0, subtlety=0.5, verbose=False)
    rows = read_dicts(info.egd_root / "master_sheet.csv")
    split = patient_split([r["patient_id"] for r in rows])  # the rule prepare uses
    test_hits = []
    for r, code in zip(rows, split):
        found = markers(display(pydicom.dcmread(info.mimic_root / r["path"])))
        assert len(found) == 1
        own = phantom.CORNERS[CLASSES.index(label_of(r))]
        if code == TEST:
            test_hits.append(found[0] == own)
        else:
            assert found == [own]
    assert len(test_hits) >= 5 and np.mean(test_hits) < 0.6


def test_same_seed_same_bytes_and_a_patient_with_two_images(tmp_path):
    first = synthesize(tmp_path / "a", n_images=20, seed=7, verbose=False)
    second = synthesize(tmp_path / "b", n_images=20, seed=7, verbose=False)
    def listing(root):
        return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())

    files = listing(first.root)
    assert files == listing(second.root)
    assert len(files) == 5 + 2 * 20  # 4 tables, SYNTHETIC.txt, 20 transcripts, 20 DICOMs
    _, mismatch, errors = filecmp.cmpfiles(first.root, second.root, files, shallow=False)
    assert mismatch == [] and errors == []
    patients = Counter(r["patient_id"] for r in read_dicts(first.egd_root / "master_sheet.csv"))
    assert max(patients.values()) == 2 and first.n_patients == len(patients) < 20
    other = synthesize(tmp_path / "c", n_images=3, seed=8, verbose=False)
    assert (other.egd_root / "master_sheet.csv").read_text()[:2000] != (
        first.egd_root / "master_sheet.csv").read_text()[:2000]


@pytest.mark.skipif(importlib.util.find_spec("trainable.data.cache") is None,
                    reason="the cache module is not written yet")
def test_prepare_reads_every_synthetic_row(small_dataset, tmp_path):
    from trainable.data.cache import prepare

    summary = prepare(egd_root=small_dataset / "egd-cxr", mimic_root=small_dataset / "mimic-cxr",
                      cache=tmp_path / "cache", size=32, workers=1)
    assert not summary.skipped  # nothing is planted to be skipped


def test_command_line_writes_a_set_and_bad_strengths_are_refused(tmp_path):
    done = gazetune("synth", str(tmp_path / "out"), "--images", "3", "--seed", "1")
    assert done.stdout.startswith("synthesized 3 images (1 CHF, 1 pneumonia, 1 Normal)")
    assert len(read_dicts(tmp_path / "out" / "egd-cxr" / "master_sheet.csv")) == 3
    with pytest.raises(GazetuneError, match=r"--shortcut must lie in \[0, 1\]"):
        synthesize(tmp_path / "bad", n_images=3, shortcut=1.5)
    assert not (tmp_path / "bad").exists()


def test_synth_never_writes_into_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "egd-cxr").mkdir()
    mine = tmp_path / "egd-cxr" / "master_sheet.csv"
    mine.write_text("a researcher's own table")
    with pytest.raises(GazetuneError, match="not empty: .* never replaces what it did not write"):
        synthesize(tmp_path, n_images=3, verbose=False, force=True)
    assert mine.read_text() == "a researcher's own table"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["egd-cxr", "master_sheet.csv"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(GazetuneError, match="is a file"):
        synthesize(a_file, n_images=3, verbose=False)


def test_synth_force_replaces_only_the_release_it_wrote(tmp_path):
    first = synthesize(tmp_path, n_images=3, seed=1, verbose=False)
    before = (first.egd_root / "master_sheet.csv").read_text()
    notes = tmp_path / "notes.txt"
    notes.write_text("kept")
    with pytest.raises(GazetuneError, match="--force replaces"):
        synthesize(tmp_path, n_images=3, seed=2, verbose=False)
    assert (first.egd_root / "master_sheet.csv").read_text() == before
    second = synthesize(tmp_path, n_images=3, seed=2, verbose=False, force=True)
    assert notes.read_text() == "kept"
    assert (second.egd_root / "master_sheet.csv").read_text() != before
    assert len(list(second.mimic_root.rglob("*.dcm"))) == 3  # none of the first release left
