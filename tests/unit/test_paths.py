"""Folders that do not exist yet: found from the nearest one that does, refused in one sentence."""

import os
from pathlib import Path

import pytest

from tinytale.errors import UserError
from tinytale.paths import check_can_make_folder, missing_folders, nearest_existing


def test_missing_folders_are_listed_deepest_first(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c"
    assert missing_folders(deep) == [deep, tmp_path / "a" / "b", tmp_path / "a"]
    assert nearest_existing(deep) == tmp_path
    assert missing_folders(tmp_path) == [] and nearest_existing(tmp_path) == tmp_path


def test_a_file_in_the_way_is_named_with_its_fix(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UserError) as caught:
        check_can_make_folder(tmp_path / "a-file" / "sub", "--out 'x'", if_file="use a folder",
                              if_read_only="unused")
    assert str(caught.value) == f"--out 'x': '{tmp_path / 'a-file'}' is a file, not a folder; " \
                                "use a folder."


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any folder")
def test_a_read_only_folder_is_named_with_its_fix(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(UserError, match=r"folder '.*locked' is not writable; ask for it\.$"):
            check_can_make_folder(locked / "new", "--out 'x'", if_file="unused",
                                  if_read_only="ask for it")
    finally:
        locked.chmod(0o700)
