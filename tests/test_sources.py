"""What a request may make a service read: sources parsed the way fsspec
would read them, checked in that form, opened as checked."""

from __future__ import annotations

import os

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tunewire.services.common.errors import InvalidArgument
from tunewire.services.common.sources import check_source, parse_source, roots_for


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imports"
    (root / "a").mkdir(parents=True)
    (root / "a" / "data.jsonl").write_text("inside\n")
    (tmp_path / "secret.txt").write_text("outside\n")
    (root / "a" / "escape").symlink_to(tmp_path / "secret.txt")
    return tmp_path, root


def rejected(text, roots, **kwargs) -> str:
    with pytest.raises(InvalidArgument) as caught:
        check_source(text, roots, **kwargs)
    assert caught.value.violations[0].field == kwargs.get("field", "source_uri")
    return caught.value.violations[0].description


def test_a_source_under_a_root_is_opened_as_checked(tree):
    _, root = tree
    for text in (f"{root}/a/data.jsonl", f"file://{root}/a/data.jsonl", f"{root}/a/./b/../data.jsonl"):
        source = check_source(text, (str(root),))
        assert source.path == str(root / "a" / "data.jsonl")
        with source.open() as f:
            assert f.read() == b"inside\n"


def test_chained_urls_traversal_and_symlinks_cannot_leave_a_root(tree):
    tmp_path, root = tree
    # fsspec reads `A::B` as filesystem A (a local path here) chained over B.
    assert "chained" in rejected(f"{root}/../secret.txt::memory://", (str(root),))
    assert "chained" in rejected(f"simplecache::file://{root}/a/data.jsonl", (str(root),))
    assert "outside" in rejected(f"{root}/../secret.txt", (str(root),))
    assert "outside" in rejected(f"{root}/a/escape", (str(root),))  # a symlink out of the root
    assert "outside" in rejected(f"{root}x/data.jsonl", (str(root),))  # a sibling sharing the prefix


def test_only_storage_protocols_are_accepted(tree):
    _, root = tree
    for text in ("http://example.com/data.jsonl", f"zip://x::{root}/a.zip", "ftp://host/x", "data:,hello", "blockcache://x"):
        rejected(text, (str(root),))
    assert "glob" in rejected(f"{root}/a/*.jsonl", (str(root),))
    assert "'..'" in rejected("s3://bucket/imports/../other/x", ("s3://bucket/imports",))
    assert "control" in rejected(f"{root}/a/data.jsonl\x00.txt", (str(root),))
    assert check_source("S3://bucket/imports/x.jsonl", ("s3://bucket/imports",)).uri == "s3://bucket/imports/x.jsonl"
    # An object-store root does not admit a local path of the same name, nor the reverse.
    rejected("/bucket/imports/x.jsonl", ("s3://bucket/imports",))
    rejected("s3://" + str(root).lstrip("/") + "/a/data.jsonl", (str(root),))


def test_a_project_root_and_an_excluded_store(tree):
    tmp_path, root = tree
    roots = (f"{root}/{{project}}",)
    assert check_source(f"{root}/a/data.jsonl", roots_for(roots, "a")).path.endswith("a/data.jsonl")
    rejected(f"{root}/a/data.jsonl", roots_for(roots, "b"))
    rejected(f"{root}/b/../a/data.jsonl", roots_for(roots, "b"))
    assert "outside" in rejected(f"{root}/a/data.jsonl", (str(root),), outside=(str(root / "a"),))


SEGMENTS = ["..", ".", "a", "data.jsonl", "secret.txt", "escape", "", "::", "://", "memory:", "file:", "%2e%2e", "~", "imports", "\\"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8), st.sampled_from(["", "file://", "{base}/", "file://{base}/"]))
def test_whatever_is_accepted_opens_inside_the_root(tmp_path_factory, parts, prefix):
    """Any string check_source accepts names a file fsspec opens inside the
    root, by the path checked: the class of escape, not only the examples."""
    base = tmp_path_factory.getbasetemp() / "sources-property"
    root = base / "imports"
    if not root.exists():
        (root / "a").mkdir(parents=True)
        (root / "a" / "data.jsonl").write_text("inside\n")
        (base / "secret.txt").write_text("outside\n")
        (root / "a" / "escape").symlink_to(base / "secret.txt")
    text = prefix.format(base=root) + "/".join(parts)
    try:
        source = check_source(text, (str(root),))
    except InvalidArgument:
        return
    real = os.path.realpath(source.path)
    assert real == str(root) or real.startswith(str(root) + os.sep)
    fs, path = fsspec.core.url_to_fs(source.uri)
    assert os.path.realpath(path) == real  # the URI handed on parses to what was checked


def test_roots_are_checked_when_the_settings_load(tmp_path):
    from tunewire.services.common.settings import load_settings

    with pytest.raises(InvalidArgument) as caught:
        parse_source("", "TUNEWIRE_IMPORT_ROOTS")
    assert caught.value.violations[0].field == "TUNEWIRE_IMPORT_ROOTS"
    for root in ("http://example.com/data", "simplecache::s3://bucket"):
        with pytest.raises(ValueError, match="TUNEWIRE_IMPORT_ROOTS"):
            load_settings(home=tmp_path, import_roots=f"{tmp_path},{root}")
