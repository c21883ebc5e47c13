"""Stdlib corpus: file discovery and exclusions, byte budgets, deterministic disjoint splits."""

from pathlib import Path

import pytest

from dyndepth.data.stdlib_corpus import (
    DOC_SEPARATOR,
    EXCLUDED_DIRS,
    file_split,
    stdlib_documents,
    stdlib_files,
    stdlib_root,
    stdlib_text,
)


def _utf8_size(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    """A small tree: 60 library modules with unique markers, plus things that must be skipped."""
    for i in range(60):
        pkg = tmp_path / f"pkg{i % 3}"
        pkg.mkdir(exist_ok=True)
        (pkg / f"mod{i}.py").write_text(f"# marker {i}\n" + "x = 1\n" * (i + 1))
    for skipped in ("test/test_a.py", "tests/b.py", "site-packages/numpy/c.py", "__pycache__/d.py",
                    "pkg0/tests/e.py", "_sysconfigdata__linux.py", "notes.txt"):
        path = tmp_path / skipped
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("# should not appear\n")
    (tmp_path / "latin1.py").write_bytes(b"# caf\xe9 should not appear\n")  # not utf-8
    (tmp_path / "empty.py").write_text("")
    return tmp_path


def test_fake_tree_exclusions_and_order(fake_stdlib):
    rel = [p.relative_to(fake_stdlib).as_posix() for p in stdlib_files(root=fake_stdlib)]
    assert rel == sorted(rel)
    assert len(rel) == 62  # 60 modules + latin1.py + empty.py (skipped later, when read)
    assert not [r for r in rel if "test" in r or "site-packages" in r or "sysconfigdata" in r]
    assert stdlib_files(max_files=5, root=fake_stdlib) == stdlib_files(root=fake_stdlib)[:5]
    docs = stdlib_documents(10**7, root=fake_stdlib)
    assert len(docs) == 60 and not any("should not appear" in d for d in docs)


def test_fake_tree_splits_disjoint_and_complete(fake_stdlib):
    def markers(split):
        docs = stdlib_documents(10**7, seed=1, split=split, root=fake_stdlib)
        return {d.splitlines()[0] for d in docs}

    train, val = markers("train"), markers("val")
    assert train and val and not train & val
    assert len(train | val) == 60
    assert markers("val") == {d.splitlines()[0] for d in stdlib_documents(10**7, seed=7, split="val",
                                                                         root=fake_stdlib)}


def test_budget_is_respected_and_last_doc_is_line_aligned(fake_stdlib):
    for budget in (0, 5, 100, 1000, 5000):
        docs = stdlib_documents(budget, root=fake_stdlib)
        assert _utf8_size(docs) <= budget
        assert all(d.endswith("\n") for d in docs)
        text = stdlib_text(budget, "train", root=fake_stdlib)
        assert len(text.encode("utf-8")) <= budget
    assert _utf8_size(stdlib_documents(5000, root=fake_stdlib)) > 4900  # the budget is filled
    assert stdlib_documents(0, root=fake_stdlib) == []


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stdlib_files(root=tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no .py files"):
        stdlib_files(root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        stdlib_text(100, split="test")
    with pytest.raises(ValueError, match="max_bytes"):
        stdlib_documents(-1)


# ---------------------------------------------------------------------------------------------------
# The real standard library of the running interpreter


def test_real_stdlib_files_found_and_filtered():
    files = stdlib_files()
    root = stdlib_root()
    rel = [p.relative_to(root) for p in files]
    assert len(files) > 100
    assert all(p.suffix == ".py" and p.is_file() for p in files)
    assert not [r for r in rel if set(r.parts[:-1]) & EXCLUDED_DIRS]
    assert Path("json/decoder.py") in rel and Path("argparse.py") in rel
    assert Path("this.py") not in rel and Path("html/entities.py") not in rel
    assert [r.as_posix() for r in rel] == sorted(r.as_posix() for r in rel)
    assert stdlib_files(max_files=10) == files[:10]


def test_real_stdlib_documents_deterministic_and_bounded():
    docs = stdlib_documents(60_000, seed=0)
    assert docs and _utf8_size(docs) <= 60_000
    assert docs == stdlib_documents(60_000, seed=0)
    assert docs != stdlib_documents(60_000, seed=1)
    assert sum(d.count("def ") for d in stdlib_documents(300_000, seed=0)) > 50  # code, not tables


def test_real_stdlib_splits_disjoint_by_file():
    root = stdlib_root()
    split_of = {}  # file content -> split of the file it came from
    for path in stdlib_files():
        try:
            split_of[path.read_bytes().decode("utf-8").replace("\r\n", "\n")] = file_split(
                path.relative_to(root).as_posix())
        except UnicodeDecodeError:
            continue
    assert set(split_of.values()) == {"train", "val"}
    for split in ("train", "val"):
        docs = stdlib_documents(300_000, seed=0, split=split)
        whole = docs[:-1]  # the last document may be a clipped prefix
        assert len(whole) >= 2 and all(split_of.get(d) == split for d in whole)
        text = stdlib_text(300_000, split, seed=0)
        assert len(text.encode("utf-8")) <= 300_000
        assert text.startswith(docs[0] + DOC_SEPARATOR) and text == stdlib_text(300_000, split, seed=0)
