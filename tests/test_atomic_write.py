"""Files written whole or not at all."""
import os

import pytest

from gn_detection.atomic_write import PARTIAL, write_atomically


def test_a_write_that_fails_leaves_the_previous_file_and_no_partial_one(tmp_path):
    path = str(tmp_path / "sub" / "report.json")
    write_atomically(path, "first")  # creates the folder
    with pytest.raises(TypeError):
        write_atomically(path, None)  # fails while writing, after the partial file is opened
    assert open(path).read() == "first"
    assert os.listdir(tmp_path / "sub") == ["report.json"]
    write_atomically(path, "second")
    assert open(path).read() == "second" and not os.path.exists(path + PARTIAL)
