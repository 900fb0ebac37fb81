"""A CSV dataset's patients: the seeded split keeps each patient on one side; a given split (a
split column) with a patient on both sides is named before any training, or refused (--strict)."""

import csv

import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write_csv(tmp_path, patient_header="Patient ID"):
    """30 8×8 gray images, findings A (every third) or B; rows 0–19 train, 20–29 test; patients of
    three images each, so patient 00006 has images 18, 19 (train) and 20 (test), and image 29
    (test) belongs to patient 00000 (train)."""
    from PIL import Image

    root = tmp_path / "xray"
    root.mkdir()
    rows = []
    for i in range(30):
        Image.fromarray(np.full((8, 8), i * 8, np.uint8)).save(root / f"{i:03d}.png")
        rows.append({"Image Index": f"{i:03d}.png", "Finding Labels": "A" if i % 3 == 0 else "B",
                     patient_header: "00000" if i == 29 else f"{i // 3:05d}", "split": "train" if i < 20 else "test"})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root / "labels.csv"


def test_patient_in_both_splits_is_named_or_refused(tmp_path):
    from synthaug.data.study import check_patient_overlap, load_study_dataset

    data = load_study_dataset(f"csv:{_write_csv(tmp_path, 'patient_id')}", rare_class="A", image_size=8)
    assert data.train_patients[:3] == ["00000"] * 3 and len(data.test_patients) == 10
    with pytest.warns(UserWarning, match=r"2 patients \(e\.g\. 00000, 00006\) have images in both train and test: 2 test images"):
        message = check_patient_overlap(data)
    assert "--strict" in message
    with pytest.raises(ValueError, match=r"2 patients \(e\.g\. 00000, 00006\) .*refused \(--strict\)"):
        check_patient_overlap(data, strict=True)
    # only the test images evaluated count (--test-size): images 21..28 share no patient with train
    assert check_patient_overlap(data, strict=True, test_indices=range(1, 9)) is None
    assert check_patient_overlap(data, test_indices=[0], warn=False).startswith(f"{data.name}: 1 patient (e.g. 00006) has")


def test_seeded_split_groups_patients_found_by_any_case_or_by_name(tmp_path):
    from PIL import Image

    from synthaug.data.csv_images import CsvImageDataset, read_image_csv
    from synthaug.data.study import check_patient_overlap, load_study_dataset

    for i in range(12):
        Image.fromarray(np.full((4, 4), i * 20, np.uint8)).save(tmp_path / f"{i}.png")
    # 0/1 label columns: the patient column, in any case or named, is not a label
    (tmp_path / "a.csv").write_text("path,PATIENT_ID,cat,dog\n" + "".join(f"{i}.png,p{i // 3},{i % 2},{int(i > 6)}\n" for i in range(12)))
    (tmp_path / "b.csv").write_text("path,subject,cat,dog\n" + "".join(f"{i}.png,s{i // 3},{i % 2},{int(i > 6)}\n" for i in range(12)))
    assert read_image_csv(tmp_path / "a.csv")[2] == ["cat", "dog"]
    assert read_image_csv(tmp_path / "b.csv", patient_column="subject")[2] == ["cat", "dog"]
    for name, kw in (("a.csv", {}), ("b.csv", {"patient_column": "subject"})):
        train, test = (CsvImageDataset(tmp_path / name, side, **kw) for side in ("train", "test"))
        assert len(test) == 3 and not set(train.patients) & set(test.patients)  # one patient of four, all three images
    with pytest.raises(ValueError, match="no patient column 'nobody'"):
        CsvImageDataset(tmp_path / "b.csv", patient_column="nobody")
    data = load_study_dataset(f"csv:{tmp_path / 'a.csv'}", rare_class="cat", image_size=4)
    assert check_patient_overlap(data, strict=True) is None


def test_sweep_warns_or_refuses_before_any_training(tmp_path, capsys):
    from synthaug.cli import main
    from synthaug.evaluation.sweep import SweepConfig, run_sweep

    csv_path = _write_csv(tmp_path)
    args = ["sweep", "--dataset", f"csv:{csv_path}", "--rare-class", "A", "--arms", "real_only", "--seeds", "1", "--shots", "2",
            "--per-class", "4", "--val-shots", "2", "--steps", "2", "--batch-size", "4", "--image-size", "8", "--set-sizes", "",
            "--bootstrap", "10", "--no-progress"]
    assert main([*args, "--strict", "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "2 patients (e.g. 00000, 00006) have images in both train and test" in err and "--strict" in err
    assert not (tmp_path / "strict" / "results.json").exists() and not (tmp_path / "strict" / "seeds").exists()
    cfg = SweepConfig(dataset=f"csv:{csv_path}", rare_class="A", arms=["real_only"], seeds=1, shots=2, per_class=4, val_shots=2, steps=2,
                      batch_size=4, image_size=8, set_sizes=[], bootstrap=10, strict=True, out=str(tmp_path / "strict2"))
    with pytest.raises(ValueError, match="have images in both train and test"):
        run_sweep(cfg, progress=False)
    assert not (tmp_path / "strict2" / "seeds").exists()
    # without --strict: named in the log and the summary, and the sweep runs
    summary = run_sweep(SweepConfig(**{**cfg.__dict__, "strict": False, "out": str(tmp_path / "warn")}), progress=False)
    assert "WARNING: csv:" in (tmp_path / "warn" / "sweep.log").read_text()
    assert "(e.g. 00000, 00006)" in summary["meta"]["patient_overlap"]
    assert summary["arms"]["real_only"]["seeds"] == [0]
    assert SweepConfig.from_dict({"strict": True}).strict is True
    with pytest.raises(ValueError, match="strict must be true or false"):
        SweepConfig.from_dict({"strict": "yes"})
