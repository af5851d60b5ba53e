"""Files written whole or not at all."""
import os

import pytest

from gn_detection.atomic_write import PARTIAL, write_atomically

from .conftest import SHAPES_CONFIG, TINY_OVERRIDES, make_cfg


def test_a_write_that_fails_leaves_the_previous_file_and_no_partial_one(tmp_path):
    path = str(tmp_path / "sub" / "report.json")
    write_atomically(path, "first")  # creates the folder
    with pytest.raises(TypeError):
        write_atomically(path, None)  # fails while writing, after the partial file is opened
    assert open(path).read() == "first"
    assert os.listdir(tmp_path / "sub") == ["report.json"]
    write_atomically(path, "second")
    assert open(path).read() == "second" and not os.path.exists(path + PARTIAL)


def test_a_rename_that_fails_leaves_no_partial_file(tmp_path):
    target = tmp_path / "results.json"
    target.mkdir()  # a folder where the file should go: the write succeeds, the rename cannot
    with pytest.raises(IsADirectoryError):
        write_atomically(str(target), "{}")
    assert os.listdir(tmp_path) == ["results.json"] and target.is_dir()


def test_a_picture_that_fails_to_save_leaves_the_previous_one(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from gn_detection.visualize import save_figure

    path = str(tmp_path / "plot.png")
    save_figure(Figure(), path)
    before = open(path, "rb").read()
    fig = Figure()

    def fail_halfway(target, **kwargs):
        open(target, "wb").write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        save_figure(fig, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["plot.png"]


def test_the_new_file_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or real_replace(a, b))
    path = str(tmp_path / "last_checkpoint")
    write_atomically(path, "model_final.pth")
    partial = path + PARTIAL
    assert events == [("fsync", partial), ("replace", partial), ("fsync", str(tmp_path))]


def test_a_folder_that_cannot_be_synced_still_gets_the_file(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def no_folder_sync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(22, "Invalid argument")  # as some network file systems answer
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", no_folder_sync)
    write_atomically(str(tmp_path / "results.md"), "# results")
    assert (tmp_path / "results.md").read_text() == "# results"


def test_a_prediction_picture_that_fails_to_save_leaves_the_previous_one(tiny_shapes_root, tmp_path, monkeypatch):
    import matplotlib.image
    from detectron2.modeling import build_model

    from gn_detection import visualize

    cfg = make_cfg(SHAPES_CONFIG, *TINY_OVERRIDES)
    model = build_model(cfg)
    [path] = visualize.draw_predictions(model, cfg, "tiny_shapes_val", str(tmp_path), 1, 0.0)
    before = open(path, "rb").read()
    real_imsave = matplotlib.image.imsave

    def fail_halfway(target, image, **kwargs):
        real_imsave(target, image, **kwargs)
        with open(target, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.image, "imsave", fail_halfway)
    with pytest.raises(OSError, match="No space left"):
        visualize.draw_predictions(model, cfg, "tiny_shapes_val", str(tmp_path), 1, 0.0)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == [os.path.basename(path)]


def test_drawing_pictures_leaves_the_users_matplotlib_backend_as_it_was(tmp_path):
    import subprocess
    import sys

    code = ("import sys, matplotlib; matplotlib.use('svg'); import gn_detection.visualize, gn_detection.report; "
            "from matplotlib.figure import Figure; gn_detection.visualize.save_figure(Figure(), sys.argv[1]); "
            "print(matplotlib.get_backend())")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.png")], capture_output=True, text=True)
    assert run.stdout == "svg\n", run.stderr
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")
