import os
import re
import shutil

import pytest
import torch

from gn_detection import checkpoint
from gn_detection.checkpoint import AtomicCheckpointer


def test_interrupted_save_keeps_the_previous_checkpoint_and_tag(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 3)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_final", iteration=10)
    good = (tmp_path / "model_final.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"

    real_save = torch.save

    def dies_mid_write(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the run is killed while writing

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save("model_final", iteration=20)
    monkeypatch.setattr(torch, "save", real_save)

    assert (tmp_path / "model_final.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]


def test_completed_save_replaces_and_loads(tmp_path):
    model = torch.nn.Linear(4, 3)
    checkpointer = AtomicCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000009", iteration=9)
    expected = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.zero_()
    assert checkpointer.has_checkpoint()
    assert checkpointer.resume_or_load("", resume=True)["iteration"] == 9
    torch.testing.assert_close(model.weight, expected)
    assert not any(name.endswith(".partial") or ".partial." in name for name in os.listdir(tmp_path))


def test_a_save_whose_rename_fails_leaves_no_partial_file(tmp_path, monkeypatch):
    checkpointer = AtomicCheckpointer(torch.nn.Linear(4, 3), str(tmp_path))
    checkpointer.save("model_final", iteration=10)
    good = (tmp_path / "model_final.pth").read_bytes()

    def full_disk(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "replace_durably", full_disk)
    with pytest.raises(checkpoint.CheckpointNotSaved) as error:
        checkpointer.save("model_final", iteration=20)
    assert re.match(f"cannot save the checkpoint {tmp_path}/model_final.pth \\(OSError: \\[Errno 28\\] No space "
                    r"left on device; [\d.]+ MB written, [\d.]+ MB left free on its file system\); the checkpoints "
                    "saved before", str(error.value))
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_final.pth"]
    assert (tmp_path / "model_final.pth").read_bytes() == good


def test_a_save_torch_fails_on_names_the_checkpoint_and_the_space_left(tmp_path, monkeypatch):
    checkpointer = AtomicCheckpointer(torch.nn.Linear(4, 3), str(tmp_path))

    def full_disk(obj, f, *args, **kwargs):  # what torch raises when the disk fills mid-write
        f.write(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3021312 vs 3021200\nframe #0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as error:
        checkpointer.save("model_0000009", iteration=9)
    assert str(error.value).startswith(f"cannot save the checkpoint {tmp_path}/model_0000009.pth (RuntimeError: "
                                       "[enforce fail at inline_container.cc:672] . unexpected pos 3021312 vs "
                                       "3021200; ")
    assert os.listdir(tmp_path) == []


def test_a_save_into_a_folder_removed_since_is_named_without_the_space_left(tmp_path):
    checkpointer = AtomicCheckpointer(torch.nn.Linear(4, 3), str(tmp_path / "out"))
    os.makedirs(tmp_path / "out")
    checkpointer.save("model_0000009", iteration=9)
    shutil.rmtree(tmp_path / "out")  # e.g. cleaned up by another job
    with pytest.raises(checkpoint.CheckpointNotSaved) as error:
        checkpointer.save("model_final", iteration=10)
    assert re.match(f"cannot save the checkpoint {tmp_path}/out/model_final.pth \\(FileNotFoundError: .*\\); the "
                    "checkpoints saved before", str(error.value)), str(error.value)
