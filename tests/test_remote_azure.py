"""Azure Blob Storage (``az://``) against Azurite, Microsoft's emulator, started by the tests.

Checkpoints are written by the safetensors package, uploaded with ``azure-storage-blob`` and
loaded through weightlift; every load is compared bit for bit with safetensors reading the same
files locally. Azurite comes from npm: .ci/run installs it into .ci/node; elsewhere run
``npm install --no-save --prefix .ci/node azurite@3.35.0`` or set ``WEIGHTLIFT_AZURITE``.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

pytest.importorskip("obstore", reason="object-storage support is the optional [remote] extra")

import weightlift  # noqa: E402
from weightlift.errors import CheckpointError, ReadError  # noqa: E402

from remote_servers import (  # noqa: E402
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    BUCKET,
    Azurite,
    azurite_binary,
    azurite_server,
    required,
)
from test_remote import (  # noqa: E402
    assert_equal,
    no_new_threads,
    reference,
    tensors,
    write_sharded,
)

INSTALL = ("npm install --no-save --prefix .ci/node azurite@3.35.0 (needs node ≥ 20; .ci/run "
           "does this), or set WEIGHTLIFT_AZURITE to an azurite-blob executable")


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    binary = required(azurite_binary(), "the Azurite emulator (azurite-blob)", INSTALL)
    with azurite_server(binary, tmp_path_factory.mktemp("azurite")) as server:
        yield server


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards, the first 6 MiB, and the index transformers writes."""
    directory = tmp_path_factory.mktemp("sharded")
    return write_sharded(directory, [tensors(1, 6, 1 << 18), tensors(2, 3, 4096)])


@pytest.fixture
def clean_azure_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No ``AZURE_*``/``AZURITE_*`` variables from the machine: each test sets its own."""
    for name in [n for n in os.environ if n.startswith(("AZURE_", "AZURITE_"))]:
        monkeypatch.delenv(name)
    return monkeypatch


def test_azure_sharded_checkpoint_matches_safetensors(azurite: Azurite, sharded: Path,
                                                      clean_azure_env: pytest.MonkeyPatch
                                                      ) -> None:
    url = azurite.upload_dir(sharded, "sharded")
    expected = reference(sharded)
    reports: list[weightlift.LoadReport] = []
    state = weightlift.load(url, storage_options=azurite.options(), on_report=reports.append)
    assert_equal(state, expected)
    assert reports[0].strategy == "remote"
    assert reports[0].source == f"az://{BUCKET}/sharded/model.safetensors.index.json"
    assert reports[0].bytes == sum(t.numel() * t.element_size() for t in expected.values())
    # stream() with a window smaller than the first shard: many ranged GETs, same bytes.
    streamed = {name: tensor.clone() for name, tensor in weightlift.stream(
        url, storage_options=azurite.options(request_size="1MiB"), max_host_memory="4MiB")}
    assert_equal(streamed, expected)


def test_azure_prefix_without_index_is_listed(azurite: Azurite, tmp_path: Path,
                                              clean_azure_env: pytest.MonkeyPatch) -> None:
    write_sharded(tmp_path, [tensors(3, 2, 1024), tensors(4, 2, 1024)])
    (tmp_path / "model.safetensors.index.json").unlink()
    url = azurite.upload_dir(tmp_path, "loose")
    assert_equal(weightlift.load(url.rstrip("/"), storage_options=azurite.options()),
                 reference(tmp_path))


@pytest.mark.parametrize("how", ["AZURE_STORAGE_ENDPOINT", "AZURE_STORAGE_USE_EMULATOR"])
def test_azure_configuration_from_the_standard_environment(
        azurite: Azurite, sharded: Path, clean_azure_env: pytest.MonkeyPatch, how: str) -> None:
    url = azurite.upload_dir(sharded, f"env-{how.lower()}")
    if how == "AZURE_STORAGE_ENDPOINT":  # any account at a custom (here plain-HTTP) endpoint
        clean_azure_env.setenv("AZURE_STORAGE_ENDPOINT", azurite.account_url)
        clean_azure_env.setenv("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT)
        clean_azure_env.setenv("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY)
    else:  # the emulator switch: its account and key are the published defaults
        clean_azure_env.setenv("AZURE_STORAGE_USE_EMULATOR", "true")
        clean_azure_env.setenv("AZURITE_BLOB_STORAGE_URL", azurite.endpoint)
    shard = "model-00002-of-00002.safetensors"
    assert_equal(weightlift.load(url + shard), load_file(str(sharded / shard)))


def test_azure_use_emulator_goes_to_the_endpoint_it_is_given(
        azurite: Azurite, sharded: Path, clean_azure_env: pytest.MonkeyPatch) -> None:
    """object_store alone would ignore ``endpoint`` in emulator mode and go to port 10000."""
    url = azurite.upload_dir(sharded, "emulator")
    options = {"use_emulator": "true", "endpoint": azurite.endpoint}
    assert_equal(weightlift.load(url, storage_options=options), reference(sharded))


def test_azure_missing_blob_and_missing_shard_name_the_url(
        azurite: Azurite, tmp_path: Path, clean_azure_env: pytest.MonkeyPatch) -> None:
    options = azurite.options()
    with pytest.raises(CheckpointError) as caught:
        weightlift.load(f"az://{BUCKET}/nothing/x.safetensors", storage_options=options)
    assert f"az://{BUCKET}/nothing/x.safetensors: not found (404)" in str(caught.value)
    assert AZURITE_KEY not in str(caught.value)
    with pytest.raises(CheckpointError, match=f"az://{BUCKET}/nothing/.*no \\*.safetensors"):
        weightlift.load(f"az://{BUCKET}/nothing/", storage_options=options)
    write_sharded(tmp_path, [tensors(5, 1, 64), tensors(6, 1, 64)])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    url = azurite.upload_dir(tmp_path, "half")
    with pytest.raises(CheckpointError) as caught:
        weightlift.load(url, storage_options=options)
    assert ("'model-00002-of-00002.safetensors' listed in the index is missing "
            f"(az://{BUCKET}/half/model-00002-of-00002.safetensors") in str(caught.value)
    assert AZURITE_KEY not in str(caught.value)


def test_azure_wrong_account_key_is_access_denied_without_the_key(
        azurite: Azurite, tmp_path: Path, clean_azure_env: pytest.MonkeyPatch) -> None:
    save_file(tensors(9, 1, 64), str(tmp_path / "model.safetensors"))
    url = azurite.upload_dir(tmp_path, "denied") + "model.safetensors"
    wrong = base64.b64encode(bytes(range(64))).decode()  # a well-formed key, not the account's
    with pytest.raises(CheckpointError) as caught:
        weightlift.load(url, storage_options=azurite.options(account_key=wrong))
    message = str(caught.value)
    assert message.startswith(f"az://{BUCKET}/denied/model.safetensors: access denied (403)")
    assert wrong not in message and AZURITE_KEY not in message
    malformed = "=" + AZURITE_KEY[:-1]  # not base64: refused before any request
    with pytest.raises(CheckpointError) as caught:
        weightlift.load(url, storage_options=azurite.options(account_key=malformed))
    message = str(caught.value)
    assert message.startswith(f"az://{BUCKET}/denied/model.safetensors: cannot set up the Azure "
                              "client")
    assert malformed not in message and AZURITE_KEY[:-1] not in message


def test_azure_blob_replaced_mid_load_fails_the_read(
        azurite: Azurite, tmp_path: Path, clean_azure_env: pytest.MonkeyPatch) -> None:
    save_file(tensors(7, 16, 1 << 18), str(tmp_path / "model.safetensors"))  # 16 × ≥ 512 KiB
    url = azurite.upload_dir(tmp_path, "replaced")
    before = set(threading.enumerate())
    loaded = weightlift.stream(url, storage_options=azurite.options(), max_host_memory="4MiB")
    next(loaded)  # at most the 4 MiB window has been fetched: the rest is read after the swap
    save_file(tensors(8, 16, 1 << 18), str(tmp_path / "model.safetensors"))
    azurite.upload_dir(tmp_path, "replaced")
    with pytest.raises(ReadError, match=f"az://{BUCKET}/replaced/model.safetensors: the object "
                       "changed during the load"):
        for _ in loaded:
            pass
    assert no_new_threads(before) == []
