"""CSV data on the command line: delimiters, labels, blank cells, and `--target csv:FILE` (value
every row of your own data against your own clean set)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dvgs_fast.cli import main
from dvgs_fast.cli._data import read_csv_table, load_csv_pair
from dvgs_fast.cli._errors import CLIError

BASE = ["--no-progress", "--threads", "1"]


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in err
    for n in needles:
        assert n in last, last


def _write(path, header, rows, delimiter=","):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def _data(seed, n, labels=("no", "yes")):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4))
    y = np.where(X[:, 0] + 0.5 * X[:, 1] > 0, labels[1], labels[0])
    return X, y


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiter_detected(tmp_path, delimiter):
    X, y = _data(0, 30)
    p = _write(tmp_path / "d.csv", ["a", "b", "c", "d", "label"], [[*r, lab] for r, lab in zip(X, y)], delimiter)
    tab = read_csv_table(p, None)
    assert tab.delimiter == delimiter
    assert tab.header == ["a", "b", "c", "d", "label"]
    np.testing.assert_allclose(tab.X, X, rtol=1e-15)          # every cell parsed, none merged or lost
    assert tab.labels == list(y)


def test_european_decimal_commas_with_semicolons(tmp_path):
    # ';'-separated with ',' decimals is common in European exports: the Sniffer must pick ';' and
    # the decimal commas must then be reported as non-numeric (not silently split into columns).
    p = tmp_path / "eu.csv"
    p.write_text("a;b;label\n1,5;2,0;x\n0,5;1,0;y\n")
    with pytest.raises(CLIError, match=r"eu.csv:2: column 'a' is not a number \('1,5'\)"):
        read_csv_table(p, None)


def test_no_delimiter_says_what_was_seen(tmp_path):
    p = tmp_path / "one.csv"
    p.write_text("abc\n1\n2\n")
    with pytest.raises(CLIError) as ei:
        read_csv_table(p, None)
    msg = str(ei.value)
    assert "'abc'" in msg and "delimiter" in msg and "one.csv" in msg


def test_numeric_labels_are_numbers(tmp_path):
    # 1, 1.0 and " 1 " are one class; 0 and 0.0 another; the reference: float values' classes
    raw = ["1", "1.0", " 1 ", "0", "0.0", "2.50", "2.5", "1e0"]
    p = _write(tmp_path / "n.csv", ["a", "y"], [[i, v] for i, v in enumerate(raw)])
    tab = read_csv_table(p, None)
    want = {float(v) for v in raw}
    assert {float(v) for v in tab.labels} == want and len(set(tab.labels)) == len(want) == 3
    from dvgs_fast.cli._data import _csv_loaded
    ld = _csv_loaded(tab)
    assert ld.n_classes == 3 and ld.class_names == ["0", "1", "2.5"]      # numeric order
    np.testing.assert_array_equal(ld.y, [1, 1, 1, 0, 0, 2, 2, 1])


def test_text_labels_keep_their_text(tmp_path):
    p = _write(tmp_path / "t.csv", ["a", "y"], [[0, "cat"], [1, " dog"], [2, "cat "], [3, "dog"]])
    tab = read_csv_table(p, None)
    assert tab.labels == ["cat", "dog", "cat", "dog"]


def test_blank_labels_named_by_line(tmp_path):
    rows = [[i, "a" if i % 2 else "b"] for i in range(10)]
    rows[3][1] = ""
    rows[7][1] = "  "
    p = _write(tmp_path / "b.csv", ["x", "y"], rows)
    with pytest.raises(CLIError) as ei:
        read_csv_table(p, None)
    msg = str(ei.value)
    assert "label column 'y' is blank on line(s) 5, 9" in msg     # header is line 1


def test_blank_and_nan_features_named(tmp_path):
    p = tmp_path / "f.csv"
    p.write_text("a,b,y\n1,2,x\n3,,y\n")
    with pytest.raises(CLIError, match=r"f.csv:3: column 'b' is blank"):
        read_csv_table(p, None)
    p.write_text("a,b,y\n1,2,x\n3,nan,y\n4,inf,x\n")
    with pytest.raises(CLIError, match=r"column 'b' holds NaN/Inf on line\(s\) 3, 4"):
        read_csv_table(p, None)


def test_ragged_row_named_with_its_real_line(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("a,b,y\n1,2,x\n\n3,4,y,extra\n")          # a blank line before the bad one
    with pytest.raises(CLIError, match=r"r.csv:4: 4 fields but the header has 3"):
        read_csv_table(p, None)


def test_semicolon_csv_end_to_end(tmp_path, capsys):
    X, y = _data(1, 300)
    p = _write(tmp_path / "s.csv", ["a", "b", "c", "d", "label"], [[*r, lab] for r, lab in zip(X, y)], ";")
    out = tmp_path / "o"
    rc, _, err = _run(["run", "--method", "random", "--dataset", f"csv:{p}", "--n-source", "150", "--n-target",
                       "60", "--no-curves", "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert any("delimiter ';' (detected)" in n for n in m["notes"])
    rows = list(csv.DictReader(open(out / "values.csv")))
    assert {r["label"] for r in rows} == {"no", "yes"}          # the file's own labels, not codes


def test_own_csv_defaults_inject_nothing_and_size_from_the_file(tmp_path, capsys):
    # Issue 34: a user's own CSV of 300 rows (under the old fixed 1000 + 400) runs on the defaults:
    # no injected noise, a fifth target, a fifth test, the rest valued, and a warning that the
    # target comes from the same file; the report invents no "clean" samples and no "(none)".
    X, y = _data(4, 300)
    p = _write(tmp_path / "own.csv", ["a", "b", "c", "d", "label"], [[*r, lab] for r, lab in zip(X, y)])
    out = tmp_path / "o"
    rc, _, err = _run(["run", "--method", "random", "--dataset", f"csv:{p}", "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    assert "warning: the target set is 60 rows drawn from own.csv itself" in err       # even with --no-progress
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_source"], m["n_target"], m["n_test"]) == (180, 60, 60)
    assert m["noise"] == "none" and "auroc" not in m["metrics"] and "remove_high" in m["metrics"]
    assert any("no corruption injected" in n for n in m["notes"])
    md = (out / "report.md").read_text()
    assert md.splitlines()[0] == "# dvgs-fast: random on csv (own.csv)"
    assert "(none)" not in md.splitlines()[0] and "clean (" not in md
    rows = list(csv.DictReader(open(out / "values.csv")))
    assert len(rows) == 180 and "corrupted" not in rows[0]


def test_own_csv_explicit_noise_is_injected_and_scored(tmp_path, capsys):
    X, y = _data(5, 300)
    p = _write(tmp_path / "own.csv", ["a", "b", "c", "d", "label"], [[*r, lab] for r, lab in zip(X, y)])
    out = tmp_path / "o"
    rc, _, err = _run(["run", "--method", "random", "--dataset", f"csv:{p}", "--noise", "label:0.2", "--no-curves",
                       "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["noise"] == "label:0.2" and m["metrics"]["n_corrupted"] == 36 and "auroc" in m["metrics"]


def test_own_csv_too_small_says_how_to_proceed(tmp_path, capsys):
    p = _write(tmp_path / "tiny.csv", ["a", "label"], [[0, "x"], [1, "y"], [2, "x"]])
    rc, _, err = _run(["run", "--method", "random", "--dataset", f"csv:{p}", "--out", str(tmp_path / "o"), *BASE],
                      capsys)
    _one_line_error(rc, err, "3 rows are too few", "--target csv:CLEAN.csv")


# ----------------------------------------------------------------------------- --target
def _pair(tmp_path, n_src=120, n_tgt=50, reorder=False):
    Xs, ys = _data(2, n_src)
    Xt, yt = _data(3, n_tgt)
    head = ["a", "b", "c", "d", "label"]
    src = _write(tmp_path / "mine.csv", head, [[*r, lab] for r, lab in zip(Xs, ys)])
    if reorder:   # the same columns in another order
        tgt = _write(tmp_path / "clean.csv", ["d", "b", "a", "c", "label"],
                     [[r[3], r[1], r[0], r[2], lab] for r, lab in zip(Xt, yt)])
    else:
        tgt = _write(tmp_path / "clean.csv", head, [[*r, lab] for r, lab in zip(Xt, yt)])
    return src, tgt, (Xs, ys, Xt, yt)


def test_load_csv_pair_scales_both_alike(tmp_path):
    src, tgt, (Xs, ys, Xt, yt) = _pair(tmp_path, reorder=True)
    ls, lt = load_csv_pair(src, tgt, None)
    both = np.concatenate([Xs, Xt])
    lo, hi = both.min(0), both.max(0)
    np.testing.assert_allclose(ls.X, (Xs - lo) / (hi - lo), atol=1e-6)      # reference min-max over both
    np.testing.assert_allclose(lt.X, (Xt - lo) / (hi - lo), atol=1e-6)      # columns matched by name
    assert ls.class_names == lt.class_names == ["no", "yes"]
    np.testing.assert_array_equal(lt.y, (yt == "yes").astype(int))


def test_target_file_values_every_row_without_noise(tmp_path, capsys):
    src, tgt, _ = _pair(tmp_path)
    out = tmp_path / "o"
    rc, stdout, err = _run(["run", "--method", "random", "--dataset", f"csv:{src}", "--target", f"csv:{tgt}",
                            "--out", str(out), *BASE], capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_source"], m["n_target"], m["n_test"]) == (120, 50, 0)
    assert m["noise"] == "none"
    assert "auroc" not in m["metrics"] and "remove_high" not in m["metrics"]
    assert any("no corruption injected" in n for n in m["notes"])
    assert "no corruption injected" in (out / "report.md").read_text()
    rows = list(csv.DictReader(open(out / "values.csv")))
    assert [int(r["source_row"]) for r in rows] == list(range(120))        # every row, in file order
    assert "corrupted" not in rows[0]


def test_target_file_explicit_options_are_kept(tmp_path, capsys):
    src, tgt, _ = _pair(tmp_path, n_src=200)
    out = tmp_path / "o"
    rc, _, err = _run(["run", "--method", "random", "--dataset", f"csv:{src}", "--target", str(tgt),
                       "--noise", "label:0.2", "--n-target", "30", "--n-source", "150", "--out", str(out), *BASE],
                      capsys)
    assert rc == 0, err
    m = json.loads((out / "metrics.json").read_text())
    assert (m["n_source"], m["n_target"], m["n_test"]) == (150, 30, 50)     # the rest is the test set
    assert m["noise"] == "label:0.2" and "auroc" in m["metrics"] and m["metrics"]["n_corrupted"] == 30


@pytest.mark.parametrize("case, needle", [
    ("missing_column", "missing: d"),
    ("other_label", "ends with"),
    ("not_csv_dataset", "--dataset csv:FILE.csv"),
    ("no_file", "not found"),
    ("too_many_target", "--n-target"),
])
def test_target_file_errors(tmp_path, capsys, case, needle):
    src, tgt, (Xs, ys, Xt, yt) = _pair(tmp_path)
    args = ["run", "--method", "random", "--dataset", f"csv:{src}", "--target", f"csv:{tgt}"]
    if case == "missing_column":
        _write(tgt, ["a", "b", "c", "label"], [[*r[:3], lab] for r, lab in zip(Xt, yt)])
    elif case == "other_label":
        _write(tgt, ["a", "b", "c", "label", "d"], [[*r[:3], lab, r[3]] for r, lab in zip(Xt, yt)])
    elif case == "not_csv_dataset":
        args[3:5] = ["--dataset", "digits"]
    elif case == "no_file":
        args[-1] = f"csv:{tmp_path / 'nope.csv'}"
    elif case == "too_many_target":
        args += ["--n-target", "51"]
    rc, _, err = _run([*args, "--out", str(tmp_path / "o"), *BASE], capsys)
    _one_line_error(rc, err, needle)
    assert not (tmp_path / "o").exists()
