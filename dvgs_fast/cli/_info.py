"""``dvgs-fast info``: build facts, the methods and whether each can run, which data files were found."""
from __future__ import annotations

from ._errors import CLIError, one_line
from ._options import PROG, version


def info() -> int:
    import dvgs_fast
    from ._data import DATASETS, LINCS_DEFAULT_FILE, resolve_data_root
    from ._methods import METHODS, NotAvailable, load_class
    print(f"{PROG} {version()}")
    bi = dvgs_fast.build_info()
    for k, v in (bi.items() if isinstance(bi, dict) else [("build", bi)]):
        print(f"  {k}: {v}")
    print("methods:")
    for name, (_, cls_name, _, desc) in METHODS.items():
        try:
            load_class(name)
            state = "available"
        except NotAvailable as exc:
            state = one_line(exc)
        print(f"  {name:<8} {cls_name:<16} {state:<20} {desc}")
    try:
        root = resolve_data_root(None)
    except CLIError as exc:
        root = None
        print(f"data root: {one_line(exc)}")
    else:
        print(f"data root: {root if root is not None else 'none found (set $DVGS_FAST_DATA or pass --data-root)'}")
    need = {"digits": None, "breast_cancer": None, "adult": ["adult.data", "adult.test"],
            "blog": ["BlogFeedback.zip"], "cifar10": ["cifar-10-batches-py", "cifar10_foolbox_samples"],
            "lincs": [LINCS_DEFAULT_FILE]}
    print("datasets:")
    for name in DATASETS:
        files = need[name]
        if files is None:
            state = "bundled with scikit-learn"
        elif root is None:
            state = "no data root"
        else:
            found = [f for f in files if (root / f).exists()]
            state = ("found: " + ", ".join(found)) if found else f"missing: place {' or '.join(files)} in {root}"
        print(f"  {name:<14} {state}")
    print("  csv:FILE.csv   any CSV with a header; the label column is the last one (or --label-column)")
    return 0
