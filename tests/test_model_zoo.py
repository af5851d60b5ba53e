"""The model zoo, offline: fabricated checkpoints in the published formats served from a loopback HTTP
server that the mirror variable points to."""
import errno
import hashlib
import io
import os
import pickle
import re
import threading
from typing import Optional

import pytest
import torch
from detectron2.checkpoint.catalog import ModelCatalog
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from gn_detection import model_zoo
from gn_detection.checkpoint import AtomicCheckpointer, load_weights
from gn_detection.download import (PART, VALIDATOR, Checksums, DownloadError, IntegrityError, cache_path, download,
                                   mirrored)

from .conftest import CONFIGS, TINY_OVERRIDES, load_tool, make_cfg, run_tool
from .fabricate import caffe2_name, detectron_blobs
from .http_server import (DIE_ONCE, FORBIDDEN, IGNORE_RANGE, NO_LENGTH, OK, SLOW, TRUNCATE, UNAVAILABLE_ONCE,
                          WRONG_RANGE, FileServer, validator)

# A depth-50 GN ResNet with Detectron's layer names at 1/4 of the width, so files stay a few MB.
NARROW_R50 = (*TINY_OVERRIDES, "MODEL.RESNETS.STEM_OUT_CHANNELS", 16, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64,
              "MODEL.RESNETS.WIDTH_PER_GROUP", 16)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A loopback file server standing in for dl.fbaipublicfiles.com, an empty cache, fast retries."""
    files = FileServer(slow_seconds=2.0)
    monkeypatch.setenv("GN_DETECTION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("GN_DETECTION_MIRROR", files.url)
    monkeypatch.setenv("GN_DETECTION_ALLOW_HTTP", "1")
    monkeypatch.setenv("GN_DETECTION_RETRIES", "3")
    monkeypatch.setenv("GN_DETECTION_BACKOFF", "0.01")
    monkeypatch.setenv("GN_DETECTION_TIMEOUT", "1")
    yield files
    files.stop()


@pytest.fixture
def register():
    """Register test entries in the catalog; they are removed afterwards."""
    added = []

    def add(entry: model_zoo.ZooModel) -> model_zoo.ZooModel:
        model_zoo.register(entry)
        added.append(entry.name)
        return entry

    yield add
    for name in added:
        model_zoo.CATALOG.pop(name)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes writing under ``folder`` fail as on a read-only mount (EROFS), even for root, whom
    file modes do not stop: opening a file to write, removing or renaming a file, making a folder."""
    folders = []

    def refusing(real, writes=lambda *args, **kwargs: True):
        def guarded(path, *args, **kwargs):
            if writes(*args, **kwargs) and any(os.path.abspath(path).startswith(f + os.sep) for f in folders):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
            return real(path, *args, **kwargs)
        return guarded

    monkeypatch.setattr("builtins.open", refusing(open, lambda mode="r", *_, **__: bool(set(mode) & set("wax+"))))
    for name in ("remove", "unlink", "replace", "rename", "mkdir"):
        monkeypatch.setattr(os, name, refusing(getattr(os, name)))
    return lambda folder: folders.append(os.path.abspath(folder))


def serve(server, url: str, body: bytes, behaviour: str = OK) -> None:
    server.routes[mirrored(url)[len(server.url):]] = (behaviour, body)


def cache_files(server_cache_url: str):
    """Files in the cache directory of ``url`` other than download locks."""
    folder = os.path.dirname(cache_path(server_cache_url))
    return sorted(f for f in os.listdir(folder) if not f.endswith(".lock")) if os.path.isdir(folder) else []


def model_state(config: str, opts) -> dict:
    return build_model(make_cfg(config, *opts)).state_dict()


def random_like(state: dict, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in state.items() if v.is_floating_point()}


# -- loading the published formats ------------------------------------------------------------------------

def test_detectron2_format_model_downloads_verifies_and_loads_every_key(server, register):
    weights = random_like(model_state(os.path.join(CONFIGS, "mask_rcnn_R50_FPN_gn_3x.yaml"), NARROW_R50), 1)
    body = pickle.dumps({"model": {k: v.numpy() for k, v in weights.items()}, "__author__": "Detectron2 Model Zoo"})
    md5 = hashlib.md5(body).hexdigest()
    url = f"{model_zoo.DETECTRON2}/Misc/tiny_gn/1/model_final_{md5[:6]}.pkl"
    entry = register(model_zoo.ZooModel("Test/tiny_gn", "mask_rcnn_R50_FPN_gn_3x.yaml", model_zoo.DETECTRON2_FORMAT,
                                        url, opts=NARROW_R50))
    assert entry.checksums.md5_prefix == md5[:6]
    serve(server, url, body)

    cfg = model_zoo.get_config("Test/tiny_gn")
    assert cfg.MODEL.WEIGHTS == "gn-zoo://Test/tiny_gn"
    model = build_model(cfg)
    counts = load_weights(model, cfg.MODEL.WEIGHTS)

    assert (counts.missing, counts.unused) == (0, 0) and counts.loaded == len(weights)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    assert cache_files(url) == [os.path.basename(url)]


def test_detectron_imagenet_r50_gn_backbone_lands_in_the_bottom_up(server, register):
    state = model_state(os.path.join(CONFIGS, "mask_rcnn_R50_FPN_gn.yaml"), NARROW_R50)
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.bottom_up.")}
    blobs, expected = detectron_blobs(backbone, seed=2)
    # Detectron's ImageNet files are a flat dict of blobs, with the classifier and solver state besides.
    assert {"conv1_w", "conv1_gn_s", "res2_0_branch1_gn_b", "res5_2_branch2c_gn_s"} <= set(blobs)
    blobs.update(pred_w=torch.randn(1000, 256).numpy(), pred_b=torch.zeros(1000).numpy(),
                 conv1_w_momentum=torch.zeros(16, 3, 7, 7).numpy())
    url = f"{model_zoo.DETECTRON}/ImageNetPretrained/1/R-50-GN-narrow.pkl"
    register(model_zoo.ZooModel("Test/R-50-GN-narrow", "mask_rcnn_R50_FPN_gn.yaml", model_zoo.DETECTRON_FORMAT,
                                url, opts=NARROW_R50))
    serve(server, url, pickle.dumps(blobs, protocol=2))

    model = build_model(model_zoo.get_config("Test/R-50-GN-narrow", trained=False))
    counts = load_weights(model, "gn-zoo://Test/R-50-GN-narrow")

    assert counts.loaded == len(backbone) == len(expected)
    assert counts.unused == 2  # pred_w, pred_b (the _momentum blob is dropped on reading)
    assert counts.missing == len(state) - len(backbone)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    # as a ready model it would predict at random: get() says what it is for
    with pytest.raises(ValueError, match=rf"Test/R-50-GN-narrow sets {len(backbone)} of the model's {len(state)} "
                                         r"tensors; \d+ would keep their random initialization .* it is for fine-tuning"):
        model_zoo.get("Test/R-50-GN-narrow")


def test_detectron_e2e_gn_mask_rcnn_places_every_weight(server, register):
    state = model_state(os.path.join(CONFIGS, "mask_rcnn_R50_FPN_gn.yaml"), NARROW_R50)
    blobs, expected = detectron_blobs(state, seed=3)
    # The GN blob names of Detectron's backbone, FPN, 4conv1fc head and mask head (see the Detectron source).
    assert {"fpn_inner_res5_2_sum_gn_s", "fpn_inner_res4_5_sum_lateral_gn_b", "fpn_res2_2_sum_gn_s",
            "head_conv4_gn_s", "_mask_fcn1_gn_s", "conv5_mask_w", "mask_fcn_logits_w", "fc6_w"} <= set(blobs)
    e2e = model_zoo.lookup("Detectron/e2e_mask_rcnn_R-50-FPN_2x_gn")
    register(model_zoo.ZooModel("Test/e2e_narrow", e2e.config, e2e.file_format, e2e.url,
                                opts=NARROW_R50 + e2e.opts))
    serve(server, e2e.url, pickle.dumps({"blobs": blobs, "cfg": "MODEL:\n  TYPE: generalized_rcnn\n"}, protocol=2))

    model = model_zoo.get("Test/e2e_narrow")

    assert not model.training
    assert model.roi_heads.box_pooler.level_poolers[0].aligned is False  # Detectron's RoIAlign
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items()), "a Detectron blob landed in the wrong place"
    # cls_score: Detectron's background row 0 moves last; bbox_pred / mask logits: background rows dropped.
    assert torch.equal(loaded["roi_heads.box_predictor.cls_score.weight"][-1],
                       torch.from_numpy(blobs["cls_score_w"][0]))


def test_detectron_e2e_load_counts(server, register):
    state = model_state(os.path.join(CONFIGS, "mask_rcnn_R50_FPN_gn.yaml"), NARROW_R50)
    blobs, expected = detectron_blobs(state, seed=4)
    url = f"{model_zoo.DETECTRON}/GN/1/e2e_narrow/model_final.pkl"
    register(model_zoo.ZooModel("Test/e2e_counts", "mask_rcnn_R50_FPN_gn.yaml", model_zoo.DETECTRON_FORMAT, url,
                                opts=NARROW_R50))
    serve(server, url, pickle.dumps({"blobs": blobs}, protocol=2))
    model = build_model(model_zoo.get_config("Test/e2e_counts", trained=False))
    counts = load_weights(model, "gn-zoo://Test/e2e_counts")
    assert (counts.loaded, counts.missing, counts.unused) == (len(expected), 0, 0)


def test_fabricated_names_follow_detectron_for_r50():
    last = {2: 2, 3: 3, 4: 5, 5: 2}
    assert caffe2_name("backbone.fpn_lateral5.norm.weight", last) == "fpn_inner_res5_2_sum_gn_s"
    assert caffe2_name("backbone.fpn_lateral4.weight", last) == "fpn_inner_res4_5_sum_lateral_w"
    assert caffe2_name("backbone.fpn_output3.norm.bias", last) == "fpn_res3_3_sum_gn_b"
    assert caffe2_name("roi_heads.mask_head.mask_fcn2.norm.weight", last) == "_mask_fcn2_gn_s"


def test_pth_files_load_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch's default would now unpickle anything
    model = torch.nn.Linear(2, 2)
    good, bad = tmp_path / "good.pth", tmp_path / "bad.pth"
    torch.save({"model": {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}}, good)
    torch.save({"model": model.state_dict(), "extra": Checksums("ab")}, bad)  # an arbitrary Python object
    runs_code = tmp_path / "runs_code.pth"
    torch.save({"model": model.state_dict(), "extra": RunsCode()}, runs_code)

    assert load_weights(model, str(good)).loaded == 2
    assert torch.equal(model.weight, torch.ones(2, 2))
    for refused in (bad, runs_code):  # torch words the two refusals differently
        with pytest.raises(pickle.UnpicklingError, match=f"{refused.name}: refused to load"):
            AtomicCheckpointer(model).load(str(refused))


class RunsCode:
    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("name, content", [
    ("truncated.pth", lambda path: path.write_bytes(torch_bytes()[:200])),
    ("text.pth", lambda path: path.write_text("not a checkpoint")),
    ("hello.pth", lambda path: path.write_text("hello\n")),  # torch's weights-only unpickler: KeyError(101)
    ("empty.pth", lambda path: path.write_bytes(b"")),
    ("truncated.pkl", lambda path: path.write_bytes(pickle.dumps({"blobs": {"conv1_w": [1.0] * 100}})[:50])),
])
def test_an_unreadable_checkpoint_is_named_and_not_called_unsafe(tmp_path, name, content):
    path = tmp_path / name
    content(path)
    with pytest.raises(ValueError, match=f"{name}: not a readable checkpoint .*download or save it again"):
        load_weights(torch.nn.Linear(2, 2), str(path))


def test_a_torch_archive_named_pkl_is_named_with_the_suffix_detectron2_loads_it_by(tmp_path):
    (tmp_path / "model.pkl").write_bytes(torch_bytes())  # whole, but Detectron2 unpickles a .pkl as it is
    with pytest.raises(ValueError, match=r"model.pkl: not a readable .pkl checkpoint: it is a torch.save archive, "
                                         r"which Detectron2 loads from a .pth file; rename it to .pth$"):
        load_weights(torch.nn.Linear(2, 2), str(tmp_path / "model.pkl"))
    (tmp_path / "model.pkl").rename(tmp_path / "model.pth")
    assert load_weights(torch.nn.Linear(100, 100, bias=False), str(tmp_path / "model.pth")).loaded == 1


def torch_bytes():
    buffer = io.BytesIO()
    torch.save({"model": {"weight": torch.ones(100, 100)}}, buffer)
    return buffer.getvalue()


# -- downloading --------------------------------------------------------------------------------------------

URL = f"{model_zoo.DETECTRON2}/Misc/test/1/model_final_000000.pkl"
BODY = os.urandom(300_000)


def test_tampered_file_is_rejected_and_not_kept(server):
    good = Checksums(md5_prefix=hashlib.md5(BODY).hexdigest()[:6])
    tampered = BODY[:-1] + bytes([BODY[-1] ^ 1])
    serve(server, URL, tampered)
    with pytest.raises(IntegrityError) as error:
        download(URL, good, progress=False)
    message = str(error.value)
    assert "model_final_000000.pkl" in message and good.md5_prefix in message
    assert hashlib.md5(tampered).hexdigest() in message
    assert cache_files(URL) == []

    serve(server, URL, BODY)
    assert open(download(URL, good, progress=False), "rb").read() == BODY


def test_sha256_is_verified_when_recorded(server):
    serve(server, URL, BODY)
    wrong = Checksums(sha256=hashlib.sha256(b"other").hexdigest())
    with pytest.raises(IntegrityError, match=hashlib.sha256(BODY).hexdigest()):
        download(URL, wrong, progress=False)
    assert cache_files(URL) == []
    assert download(URL, Checksums(sha256=hashlib.sha256(BODY).hexdigest()), progress=False)


def test_truncated_responses_give_up_with_a_clear_error_and_nothing_trusted(server):
    serve(server, URL, BODY, TRUNCATE)
    with pytest.raises(DownloadError, match="after 3 attempts: the connection closed before the whole file"):
        download(URL, progress=False)
    assert server.count(mirrored(URL)[len(server.url):]) == 3
    assert not os.path.exists(cache_path(URL))  # only the .part, which is never trusted
    assert cache_files(URL) == [os.path.basename(URL) + PART, os.path.basename(URL) + PART + VALIDATOR]


@pytest.mark.parametrize("validators, resumed", [("etag", True), ("last_modified", True), ("weak_etag", False),
                                                  ("none", False)])
def test_server_dying_mid_transfer_is_resumed_only_if_the_files_version_is_known(server, validators, resumed):
    server.validators = validators
    serve(server, URL, BODY, DIE_ONCE)
    local = download(URL, Checksums(md5_prefix=hashlib.md5(BODY).hexdigest()[:8]), progress=False)
    assert open(local, "rb").read() == BODY
    asked = [(r[2], r[3]) for r in server.requests]
    resume = (f"bytes={len(BODY) // 2}-", validator(validators, BODY))
    assert asked == [(None, None), resume if resumed else (None, None)]  # a weak ETag cannot make a Range safe
    assert cache_files(URL) == [os.path.basename(URL)]  # the version record goes with the part


def test_404_is_final_and_names_the_url(server):
    with pytest.raises(DownloadError, match=r"does not exist \(HTTP 404\)") as error:
        download(URL, progress=False)
    assert mirrored(URL) in str(error.value)
    assert len(server.requests) == 1  # no retries for a missing file


def test_cache_hit_needs_no_server(server):
    serve(server, URL, BODY)
    first = download(URL, progress=False)
    server.stop()
    assert download(URL, progress=False) == first
    assert len(server.requests) == 1


def test_refused_connection_and_timeout_are_named(server):
    serve(server, URL, BODY, SLOW)
    with pytest.raises(DownloadError, match="timed out"):
        download(URL, progress=False)
    server.stop()
    with pytest.raises(DownloadError, match="connection refused"):
        download(URL, progress=False)


def test_plain_http_needs_an_opt_in(server, monkeypatch):
    monkeypatch.delenv("GN_DETECTION_ALLOW_HTTP")
    with pytest.raises(DownloadError, match="plain HTTP.*GN_DETECTION_ALLOW_HTTP=1"):
        download(URL, progress=False)
    assert server.requests == []


def test_mirror_replaces_only_the_public_host(monkeypatch):
    monkeypatch.setenv("GN_DETECTION_MIRROR", "https://mirror.example/fb/")
    assert mirrored(URL) == "https://mirror.example/fb/detectron2/Misc/test/1/model_final_000000.pkl"
    assert mirrored("https://elsewhere.example/x.pkl") == "https://elsewhere.example/x.pkl"


def test_bad_retry_setting_names_the_variable(server, monkeypatch):
    monkeypatch.setenv("GN_DETECTION_RETRIES", "many")
    with pytest.raises(ValueError, match="GN_DETECTION_RETRIES='many'"):
        download(URL, progress=False)


def part_of(url: str) -> str:
    return cache_path(url) + PART


def start_part(url: str, data: bytes, version: Optional[str]) -> None:
    """A partial download left behind, as by a killed process, of the file the server named ``version``."""
    os.makedirs(os.path.dirname(part_of(url)), exist_ok=True)
    with open(part_of(url), "wb") as f:
        f.write(data)
    if version:
        with open(part_of(url) + VALIDATOR, "w") as f:
            f.write(version)


def test_a_killed_downloads_part_is_resumed_not_trusted(server):
    start_part(URL, BODY[:1000], validator("etag", BODY))
    serve(server, URL, BODY)
    assert open(download(URL, progress=False), "rb").read() == BODY
    assert server.requests[-1][2:] == ("bytes=1000-", validator("etag", BODY))


@pytest.mark.parametrize("version", [validator("etag", b"old"), None], ids=["older", "unknown"])
def test_a_part_of_an_older_or_unknown_version_is_not_spliced(server, version):
    old, new = os.urandom(len(BODY)), BODY  # the file changed on the server; no digest would catch a splice
    start_part(URL, old[:1000], version)
    serve(server, URL, new)
    assert open(download(URL, progress=False), "rb").read() == new
    assert len(server.requests) == 1 and server.requests[0][2:] == (("bytes=1000-", version) if version else
                                                                    (None, None))
    assert cache_files(URL) == [os.path.basename(URL)]


def test_a_complete_part_is_verified_not_fetched_again(server):
    start_part(URL, BODY, validator("etag", BODY))  # killed after the transfer, before the rename
    serve(server, URL, BODY)
    assert open(download(URL, progress=False), "rb").read() == BODY
    assert [r[2] for r in server.requests] == [f"bytes={len(BODY)}-"]  # answered 416 with the size: no GET


@pytest.mark.parametrize("behaviour, part", [(IGNORE_RANGE, BODY[:1000]), (WRONG_RANGE, BODY[:1000]),
                                             (OK, BODY + b"stale tail")])  # the last gets HTTP 416
def test_a_part_the_server_cannot_extend_is_started_over(server, monkeypatch, behaviour, part):
    monkeypatch.setenv("GN_DETECTION_RETRIES", "1")  # starting over is part of the same attempt
    start_part(URL, part, validator("etag", BODY))
    serve(server, URL, BODY, behaviour)
    assert open(download(URL, progress=False), "rb").read() == BODY


def test_503_is_retried_and_403_is_final(server):
    serve(server, URL, BODY, UNAVAILABLE_ONCE)
    assert open(download(URL, progress=False), "rb").read() == BODY
    other = URL.replace("000000", "111111")
    serve(server, other, BODY, FORBIDDEN)
    with pytest.raises(DownloadError, match="HTTP 403"):
        download(other, progress=False)
    assert server.count(mirrored(other)[len(server.url):]) == 1


def test_a_file_of_unknown_size_is_not_kept(server):
    serve(server, URL, BODY, NO_LENGTH)
    with pytest.raises(DownloadError, match="did not say how large the file is"):
        download(URL, progress=False)
    assert cache_files(URL) == []


def test_concurrent_downloads_share_one_transfer(server):
    server.slow_seconds = 0.3
    serve(server, URL, BODY, SLOW)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(download(URL, progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(paths) == 3
    assert server.count(mirrored(URL)[len(server.url):]) == 1


def test_a_cached_file_needs_no_lock_and_an_unwritable_cache_is_named(server):
    serve(server, URL, BODY)
    local = download(URL, progress=False)
    os.remove(local + ".lock")
    os.mkdir(local + ".lock")  # the lock cannot be opened now
    assert download(URL, progress=False) == local
    other = URL.replace("000000", "222222")
    os.mkdir(cache_path(other) + ".lock")
    with pytest.raises(DownloadError, match="cannot write to the cache .*GN_DETECTION_CACHE"):
        download(other, progress=False)


def test_a_folder_at_the_cache_path_is_named_before_downloading(server):
    serve(server, URL, BODY)
    os.makedirs(cache_path(URL))
    with pytest.raises(DownloadError, match=f"{cache_path(URL)} is a folder; remove it or point GN_DETECTION_CACHE"):
        download(URL, progress=False)
    assert server.requests == []


@pytest.mark.parametrize("mirror, message", [("https://", "names no host"), ("ftp://127.0.0.1", "only https://"),
                                             ("https://127.0.0.1:port", "Port could not be cast"),
                                             ("https://127.0.0.1:99999", "Port out of range"),
                                             ("https://[::1", "Invalid IPv6 URL"),
                                             ("127.0.0.1", r"only https:// and http:// URLs are supported"),
                                             ("https + the loopback server", "the server does not speak TLS")])
def test_malformed_mirrors_fail_at_once(server, monkeypatch, mirror, message):
    monkeypatch.setenv("GN_DETECTION_MIRROR", server.url.replace("http:", "https:") if "+" in mirror else mirror)
    monkeypatch.setenv("GN_DETECTION_BACKOFF", "5")  # a retry would make this test slow
    with pytest.raises(DownloadError, match=message):
        download(URL, progress=False)


@pytest.mark.parametrize("variable, value", [("GN_DETECTION_RETRIES", "0"), ("GN_DETECTION_TIMEOUT", "0"),
                                             ("GN_DETECTION_TIMEOUT", "inf"), ("GN_DETECTION_TIMEOUT", "nan"),
                                             ("GN_DETECTION_BACKOFF", "nan"), ("GN_DETECTION_BACKOFF", "inf"),
                                             ("GN_DETECTION_BACKOFF", "-1")])
def test_out_of_range_settings_are_named(server, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=variable):
        download(URL, progress=False)


# -- the catalog ----------------------------------------------------------------------------------------------

def test_catalog_matches_detectron2s_names_and_md5_prefixes():
    for ours, theirs in (("R-50-GN", "FAIR/R-50-GN"), ("R-101-GN", "FAIR/R-101-GN")):
        assert model_zoo.lookup(f"ImageNetPretrained/{ours}").url == ModelCatalog.get(f"ImageNetPretrained/{theirs}")
    assert "catalog://" in PathManager._path_handlers  # Detectron2's catalog:// still resolves
    prefixes = {m.name: m.checksums.md5_prefix for m in model_zoo.catalog() if m.file_format == model_zoo.DETECTRON2_FORMAT}
    assert prefixes == {"Detectron2/mask_rcnn_R_50_FPN_3x_gn": "dc5d9e",
                        "Detectron2/scratch_mask_rcnn_R_50_FPN_3x_gn": "01ca85",
                        "Detectron2/scratch_mask_rcnn_R_50_FPN_9x_gn": "da7b4c"}


@pytest.mark.parametrize("entry", model_zoo.catalog(), ids=lambda m: m.name)
def test_every_entry_has_a_config(entry):
    cfg = model_zoo.get_config(entry.name, trained=bool(entry.url))  # results only: no weights to name
    assert cfg.MODEL.WEIGHTS == (f"gn-zoo://{entry.name}" if entry.url else "")
    assert cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.FPN.NORM == "GN"


def test_remote_sizes_wait_as_long_as_downloads_do_and_a_bad_mirror_is_named_once(server, monkeypatch):
    slow = model_zoo.lookup("Detectron/e2e_mask_rcnn_R-50-FPN_2x_gn")
    serve(server, slow.url, BODY, SLOW)  # answers after 2 s; GN_DETECTION_TIMEOUT is 1
    listing = run_tool(["tools/model_zoo.py", "list", "--remote"], {})
    assert listing.returncode == 0, listing.stderr
    assert "timed out" in next(line for line in listing.stdout.splitlines() if line.startswith(slow.name))
    assert "Asking the server for the size of 9 files" in listing.stderr
    for mirror, message in (("https://[::1", "Invalid IPv6 URL (check GN_DETECTION_MIRROR)"),
                            ("http://127.0.0.1:1", "over plain HTTP")):
        monkeypatch.setenv("GN_DETECTION_MIRROR", mirror)
        monkeypatch.delenv("GN_DETECTION_ALLOW_HTTP", raising=False)
        refused = run_tool(["tools/model_zoo.py", "list", "--remote"], {})
        assert refused.returncode == 1 and refused.stdout == "" and "Asking" not in refused.stderr
        assert refused.stderr.count(message) == 1 and "Traceback" not in refused.stderr


def test_unknown_and_results_only_names_are_clear():
    with pytest.raises(KeyError, match="Did you mean Detectron2/mask_rcnn_R_50_FPN_3x_gn"):
        model_zoo.lookup("Detectron2/mask_rcnn_R_50_FPN_3x")
    with pytest.raises(DownloadError, match="results only"):
        model_zoo.fetch("Detectron/scratch_e2e_mask_rcnn_R-50-FPN_3x_gn")
    with pytest.raises(DownloadError, match="results only"):  # its MODEL.WEIGHTS would name no file
        model_zoo.get_config("Detectron/scratch_e2e_mask_rcnn_R-50-FPN_3x_gn")
    assert model_zoo.get_config("Detectron/scratch_e2e_mask_rcnn_R-50-FPN_3x_gn", trained=False).MODEL.WEIGHTS == ""
    for not_a_name in (None, 3):
        with pytest.raises(TypeError, match=f"a checkpoint name is a string .* not {not_a_name}"):
            model_zoo.get_config(not_a_name)


def test_command_line_list_and_download(server):
    e2e = model_zoo.lookup("Detectron/e2e_mask_rcnn_R-101-FPN_3x_gn")
    serve(server, e2e.url, BODY)
    not_cached = model_zoo.lookup("Detectron/e2e_mask_rcnn_R-50-FPN_2x_gn")
    serve(server, not_cached.url, BODY[:2048])
    env = {}  # the GN_DETECTION_* variables set by the fixture reach the tool through os.environ

    done = run_tool(["tools/model_zoo.py", "download", e2e.name], env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == cache_path(e2e.url)
    assert open(cache_path(e2e.url), "rb").read() == BODY
    assert "B/s" in done.stderr  # progress bar with rate

    listing = run_tool(["tools/model_zoo.py", "list"], env)
    row = next(line for line in listing.stdout.splitlines() if line.startswith(e2e.name))
    assert "42.3" in row and "37.2" in row and "293.0 KiB (cached)" in row
    # the overrides its weights are evaluated with, which train_net --eval-only asks for
    assert ("mask_rcnn_R101_FPN_gn_3x.yaml MODEL.ROI_BOX_HEAD.POOLER_TYPE ROIAlign MODEL.ROI_MASK_HEAD.POOLER_TYPE "
            "ROIAlign") in row
    remote_listing = run_tool(["tools/model_zoo.py", "list", "--remote"], env)
    assert "Asking the server for the size of 8 files" in remote_listing.stderr  # not of the cached one
    remote = remote_listing.stdout.splitlines()
    assert "2.0 KiB" in next(line for line in remote if line.startswith(not_cached.name))

    results_only = next(line for line in remote if line.startswith("Detectron/scratch_e2e_mask_rcnn_R-50-FPN_3x_gn"))
    assert "- (no file)" in results_only and "Detectron (Caffe2)" not in results_only

    unknown = run_tool(["tools/model_zoo.py", "download", "Detectron/nothing"], env)
    assert unknown.returncode == 1 and "not in the GN model zoo" in unknown.stderr
    not_served = run_tool(["tools/model_zoo.py", "download", "Detectron/e2e_mask_rcnn_R-101-FPN_2x_gn"], env)
    assert not_served.returncode == 1 and "does not exist (HTTP 404)" in not_served.stderr
    assert "Traceback" not in unknown.stderr + not_served.stderr


def test_a_damaged_cached_checkpoint_says_how_to_fetch_it_again_and_download_again_does(server, capsys):
    e2e = model_zoo.lookup("Detectron/e2e_mask_rcnn_R-101-FPN_3x_gn")
    good = pickle.dumps({"blobs": {"conv1_w": [1.0] * 100}})
    serve(server, e2e.url, good)
    local = model_zoo.fetch(e2e.name, progress=False)
    with open(local, "wb") as f:
        f.write(good[:50])  # damaged in the cache after it was verified
    with pytest.raises(ValueError, match="it is a cached download: `python tools/model_zoo.py download --again` "
                                         "with its gn-zoo:// name"):
        load_weights(torch.nn.Linear(2, 2), local)
    assert model_zoo.fetch(e2e.name, progress=False) == local and open(local, "rb").read() == good[:50]  # as cached
    assert load_tool("model_zoo").main(["download", "--again", e2e.name]) == 0
    assert capsys.readouterr().out.strip() == local and open(local, "rb").read() == good


@pytest.mark.parametrize("failure, message", [("mirror down", "connection refused"),
                                              ("tampered copy", "failed verification")])
def test_download_again_keeps_the_cached_copy_until_a_new_one_is_verified(server, register, capsys, failure,
                                                                           message):
    url = f"{model_zoo.DETECTRON2}/Misc/again/1/model_final_{hashlib.md5(BODY).hexdigest()[:6]}.pkl"
    entry = register(model_zoo.ZooModel("Test/again", "mask_rcnn_R50_FPN_gn_3x.yaml", model_zoo.DETECTRON2_FORMAT, url,
                                        sha256=hashlib.sha256(BODY).hexdigest().upper()))  # either case is accepted
    serve(server, url, BODY)
    local = model_zoo.fetch(entry.name, progress=False)
    if failure == "mirror down":
        server.stop()
    else:
        serve(server, url, BODY[::-1])

    assert load_tool("model_zoo").main(["download", "--again", entry.name]) == 1

    error = capsys.readouterr().err.split("\r")[-1]  # after the progress bar, erased
    assert error.startswith("error: ") and message in error and error.count("\n") == 1
    assert open(local, "rb").read() == BODY and cache_files(url) == [os.path.basename(url)]


def test_download_again_into_a_read_only_cache_is_one_line_and_leaves_it_alone(server, read_only, capsys):
    backbone = model_zoo.lookup("ImageNetPretrained/R-50-GN")
    serve(server, backbone.url, BODY)
    local = cache_path(backbone.url)
    os.makedirs(os.path.dirname(local))
    with open(local, "wb") as f:
        f.write(BODY[:50])  # truncated, in a shared cache the user cannot write
    read_only(os.environ["GN_DETECTION_CACHE"])

    assert load_tool("model_zoo").main(["download", "--again", backbone.name]) == 1

    error, cache = capsys.readouterr().err, os.environ["GN_DETECTION_CACHE"]
    assert error.count("\n") == 1 and error.startswith(f"error: cannot write to the cache {cache} ")
    assert "Read-only file system" in error and "point GN_DETECTION_CACHE elsewhere" in error
    assert open(local, "rb").read() == BODY[:50] and server.requests == []


def test_ctrl_c_during_a_download_is_one_line_and_exit_status_130(monkeypatch, capsys):
    def interrupted(name, again=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(model_zoo, "fetch", interrupted)
    assert load_tool("model_zoo").main(["download", "Detectron/e2e_mask_rcnn_R-101-FPN_3x_gn"]) == 130
    assert capsys.readouterr().err == ("interrupted; the part downloaded so far stays in the cache and the same "
                                       "command resumes it\n")


def test_only_detectron2_names_with_six_hex_digits_are_read_as_an_md5_prefix():
    def prefix(file_name):
        url = f"{model_zoo.DETECTRON2}/Misc/run/1/{file_name}"
        return model_zoo.ZooModel("x", "c.yaml", model_zoo.DETECTRON2_FORMAT, url).checksums.md5_prefix

    assert prefix("model_final_dc5d9e.pkl") == prefix("model_final_dc5d9e.pkl?dl=1") == "dc5d9e"
    assert prefix("model_final_20240101.pkl") == prefix("model_0089999.pkl") == ""  # a run's own names


@pytest.mark.parametrize("path", ["/exp/../../outside.pkl", "/", "/exp/"])
def test_a_url_that_names_no_file_in_the_cache_is_refused_before_asking(server, path):
    url = server.url.rstrip("/") + path
    with pytest.raises(DownloadError, match=re.escape(f"cannot cache {url}: it names no file, or its path holds '..'")):
        download(url, progress=False)
    assert server.requests == []


def test_two_hosts_files_of_the_same_path_are_cached_apart(monkeypatch, tmp_path):
    monkeypatch.setenv("GN_DETECTION_CACHE", str(tmp_path))
    first, second = cache_path("http://127.0.0.1:18765/exp/a.pkl"), cache_path("http://localhost:18766/exp/a.pkl")
    assert first != second and first == str(tmp_path / "127.0.0.1_18765" / "exp" / "a.pkl")
    assert cache_path(URL) == str(tmp_path / "detectron2" / "Misc" / "test" / "1" / "model_final_000000.pkl")


@pytest.mark.parametrize("changes, message", [
    ({"name": ""}, "name must be a non-blank string without 'gn-zoo://'"),
    ({"name": " "}, "name must be a non-blank string"),
    ({"name": "gn-zoo://Mine/model"}, "name must be a non-blank string"),
    ({"config": None}, "config must be a config file's name under configs/"),
    ({"url": 5}, "url must be an http(s) URL of a file"),
    ({"url": "https://"}, "url must be an http(s) URL of a file"),  # its cached file would be the cache's folder
    ({"url": "https://host/"}, "url must be an http(s) URL of a file"),
    ({"opts": (1, 2)}, "opts must be a tuple of KEY, VALUE items"),
    ({"opts": ("MODEL.NOPE", 1)}, "opts ('MODEL.NOPE', 1) do not apply to its config: overrides: Non-existent key"),
    ({"file_format": "pth"}, "file_format must be model_zoo.DETECTRON2_FORMAT or DETECTRON_FORMAT, got 'pth'"),
    ({"url": "host/model.pkl"}, "url must be an http(s) URL"),
    ({"url": "https://host/a/../../../model_final_1a2b3c.pkl"}, "url must not hold '..' path segments"),
    ({"url": "http://../model_final_1a2b3c.pkl"}, "url must not hold '..' path segments"),  # the host's folder
    ({"sha256": "1a2b3c"}, "sha256 must be the file's SHA-256 as 64 hex digits (or empty when not recorded), got '1a"),
    ({"sha256": "g" * 64}, "sha256 must be the file's SHA-256 as 64 hex digits"),
    ({"sha256": None}, "sha256 must be the file's SHA-256 as 64 hex digits"),
    ({"opts": "MODEL.GN.NUM_GROUPS 16"}, "opts must be a tuple of KEY, VALUE items"),
    ({"opts": ("MODEL.GN.NUM_GROUPS",)}, "opts must be a tuple of KEY, VALUE items"),
])
def test_a_registered_entry_that_could_never_be_used_is_refused_by_field(changes, message):
    entry = {"name": "Mine/model", "config": "mask_rcnn_R50_FPN_gn_3x.yaml",
             "file_format": model_zoo.DETECTRON2_FORMAT, "url": "https://host/model_final_1a2b3c.pkl", **changes}
    with pytest.raises(ValueError, match=re.escape(message)):
        model_zoo.register(model_zoo.ZooModel(**entry))
    assert "Mine/model" not in model_zoo.CATALOG
    with pytest.raises(TypeError, match="register\\(\\) takes a model_zoo.ZooModel, not dict"):
        model_zoo.register(entry)
