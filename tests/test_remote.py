"""Object-storage sources against real servers: moto (S3), RangeHTTPServer and a fault server.

Every load is compared bit for bit with the safetensors package reading the same files locally.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("obstore", reason="object-storage support is the optional [remote] extra")

import weightlift  # noqa: E402
from weightlift.errors import CheckpointError, ReadError, WeightliftError  # noqa: E402
from weightlift.remote import RemoteSource, scrub, scrub_url  # noqa: E402

from remote_servers import (  # noqa: E402
    BUCKET,
    MOTO_KEYS,
    Fault,
    FaultServer,
    Moto,
    fault_server,
    moto_server,
    serve_directory,
)

#: Fault tests fail fast: short timeouts, few retries.
FAST = {"timeout": "1s", "connect_timeout": "1s", "retries": "2", "retry_timeout": "5s"}


def tensors(seed: int, count: int, numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int64]
    out = {}
    for i in range(count):
        dtype = dtypes[i % len(dtypes)]
        raw = torch.randint(0, 256, (numel * torch.empty((), dtype=dtype).element_size(),),
                            dtype=torch.uint8, generator=g)
        out[f"t{seed}.{i}"] = raw.view(dtype).reshape(numel // 16, 16)
    return out


def write_sharded(directory: Path, shards: list[dict[str, torch.Tensor]],
                  metadata: dict[str, str] | None = None) -> Path:
    """Shards saved by the safetensors package, plus the index transformers writes."""
    directory.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(part, str(directory / name), metadata=metadata)
        weight_map.update({key: name for key in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def reference(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def assert_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with moto_server() as server:
        yield server


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards, the first 6 MiB (uploaded in two multipart parts), and an index."""
    directory = tmp_path_factory.mktemp("sharded")
    return write_sharded(directory, [tensors(1, 6, 1 << 18), tensors(2, 3, 4096)])


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server() as state:
        yield state


def no_new_threads(before: set[threading.Thread]) -> list[str]:
    return [t.name for t in threading.enumerate() if t not in before and t.is_alive()
            and t.name.startswith("weightlift")]


# ------------------------------------------------------------------------------------- S3 (moto)


def test_s3_sharded_checkpoint_with_multipart_shard_matches_safetensors(moto: Moto,
                                                                        sharded: Path) -> None:
    url = moto.upload_dir(sharded, "sharded", multipart_over=5 << 20)
    head = moto.client.head_object(Bucket=BUCKET, Key="sharded/model-00001-of-00002.safetensors")
    assert head["ETag"].endswith('-2"')  # really a two-part multipart upload
    reports: list[weightlift.LoadReport] = []
    state = weightlift.load(url, storage_options=moto.options(), on_report=reports.append)
    assert_equal(state, reference(sharded))
    report = reports[0]
    assert report.strategy == "remote" and report.bytes == sum(
        t.numel() * t.element_size() for t in state.values())
    assert report.source == f"s3://{BUCKET}/sharded/model.safetensors.index.json"
    # The same through stream() with a small budget, a dtype conversion, and open().
    streamed = {k: v.clone() for k, v in weightlift.stream(url, storage_options=moto.options(),
                                                           max_host_memory="4MiB")}
    assert_equal(streamed, reference(sharded))
    halves = weightlift.load(url, storage_options=moto.options(), dtype=torch.float16,
                             max_host_memory="4MiB")
    for name, tensor in reference(sharded).items():
        expected = tensor.half() if tensor.is_floating_point() else tensor
        assert torch.equal(halves[name].view(torch.uint8), expected.view(torch.uint8)), name
    with weightlift.open(url, storage_options=moto.options()) as ckpt:
        assert ckpt.keys() == list(reference(sharded))
        assert torch.equal(ckpt.get_tensor("t1.2").view(torch.uint8),
                           reference(sharded)["t1.2"].view(torch.uint8))


def test_s3_configuration_from_the_standard_environment(moto: Moto, sharded: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    url = moto.upload_dir(sharded, "env")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", MOTO_KEYS["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", MOTO_KEYS["secret_access_key"])
    monkeypatch.setenv("AWS_REGION", MOTO_KEYS["region"])
    assert_equal(weightlift.load(url + "model-00002-of-00002.safetensors"),
                 load_file(str(sharded / "model-00002-of-00002.safetensors")))


def test_s3_credentials_from_an_aws_profile(moto: Moto, sharded: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("boto3", reason="profiles are read through boto3")
    url = moto.upload_dir(sharded, "profile")
    credentials = tmp_path / "credentials"
    credentials.write_text("[bench]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.setenv("AWS_PROFILE", "bench")
    options = {"endpoint": moto.endpoint, "region": MOTO_KEYS["region"]}
    assert_equal(weightlift.load(url, storage_options=options), reference(sharded))
    with pytest.raises(WeightliftError, match="profile"):  # a profile that does not exist
        weightlift.load(url, storage_options={**options, "profile": "missing"})


def test_s3_prefix_without_index_is_listed(moto: Moto, tmp_path: Path) -> None:
    write_sharded(tmp_path, [tensors(3, 2, 1024), tensors(4, 2, 1024)])
    (tmp_path / "model.safetensors.index.json").unlink()
    url = moto.upload_dir(tmp_path, "loose")
    assert_equal(weightlift.load(url.rstrip("/"), storage_options=moto.options()),
                 reference(tmp_path))


def test_s3_missing_object_and_missing_shard_name_the_url(moto: Moto, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/nothing/.*no \\*.safetensors"):
        weightlift.load(f"s3://{BUCKET}/nothing/", storage_options=moto.options())
    with pytest.raises(CheckpointError, match=f"s3://{BUCKET}/nothing/x.safetensors: not found"):
        weightlift.load(f"s3://{BUCKET}/nothing/x.safetensors", storage_options=moto.options())
    write_sharded(tmp_path, [tensors(5, 1, 64), tensors(6, 1, 64)])
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    url = moto.upload_dir(tmp_path, "half")
    with pytest.raises(CheckpointError, match="'model-00002-of-00002.safetensors' listed in the "
                       f"index is missing \\(s3://{BUCKET}/half/model-00002"):
        weightlift.load(url, storage_options=moto.options())


def test_s3_object_replaced_mid_load_fails_the_read(moto: Moto, tmp_path: Path) -> None:
    save_file(tensors(7, 16, 1 << 18), str(tmp_path / "model.safetensors"))  # 16 × ≥ 512 KiB
    url = moto.upload_dir(tmp_path, "replaced")
    before = set(threading.enumerate())
    loaded = weightlift.stream(url, storage_options=moto.options(), max_host_memory="4MiB")
    next(loaded)  # at most the 4 MiB window has been fetched: the rest is read after the swap
    save_file(tensors(8, 16, 1 << 18), str(tmp_path / "model.safetensors"))
    moto.client.upload_file(str(tmp_path / "model.safetensors"), BUCKET,
                            "replaced/model.safetensors")
    with pytest.raises(ReadError, match=f"s3://{BUCKET}/replaced/model.safetensors: the object "
                       "changed during the load"):
        for _ in loaded:
            pass
    assert no_new_threads(before) == []


# ---------------------------------------------------------------------- HTTP (RangeHTTPServer)


def test_https_style_directory_url_and_a_header_longer_than_the_first_guess(
        tmp_path: Path) -> None:
    # A 1.5 MB metadata value makes the header longer than the 1 MiB first GET.
    write_sharded(tmp_path / "ckpt", [tensors(9, 3, 4096), tensors(10, 2, 4096)],
                  metadata={"notes": "x" * 1_500_000})
    with serve_directory(tmp_path) as base:
        state = weightlift.load(f"{base}/ckpt/")
        with weightlift.safe_open(RemoteSource(f"{base}/ckpt/model-00001-of-00002.safetensors"),
                                  framework="pt") as f:
            assert f.metadata()["notes"] == "x" * 1_500_000
            first = {k: f.get_tensor(k) for k in f.keys()}
            rows = f.get_slice("t9.1")[3:7]  # a slice: only its bytes are fetched
    assert_equal(state, reference(tmp_path / "ckpt"))
    local = load_file(str(tmp_path / "ckpt/model-00001-of-00002.safetensors"))
    assert_equal(first, local)
    assert_equal({"rows": rows}, {"rows": local["t9.1"][3:7]})


def test_verify_on_a_url_is_refused_before_any_tensor(tmp_path: Path) -> None:
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(tmp_path / "model.safetensors"))
    with serve_directory(tmp_path) as base:
        with pytest.raises(CheckpointError, match="object-storage sources") as caught:
            weightlift.load(f"{base}/model.safetensors", verify={"model.safetensors": "0" * 64})
    assert "model.safetensors" in str(caught.value)


def test_load_into_a_module_from_a_url(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))
    expected = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    save_file(expected, str(tmp_path / "model.safetensors"))
    with serve_directory(tmp_path) as base:
        weightlift.load_into(model, RemoteSource(f"{base}/"))
    assert_equal({k: v.detach() for k, v in model.state_dict().items()}, expected)


# ------------------------------------------------------------------------------ fault server


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_and_throttling_are_retried_then_succeed(server: FaultServer, tmp_path: Path,
                                                               status: int) -> None:
    save_file(tensors(11, 4, 4096), str(tmp_path / "model.safetensors"))
    url = server.put_dir(tmp_path, "flaky")
    server.faults["flaky/model.safetensors"] = Fault(status=status, times=2)
    assert_equal(weightlift.load(url, storage_options=FAST), reference(tmp_path))
    assert server.faults["flaky/model.safetensors"].seen > 2


def test_truncated_bodies_are_retried_and_a_permanent_one_is_an_error(
        server: FaultServer, tmp_path: Path) -> None:
    save_file(tensors(12, 4, 1 << 16), str(tmp_path / "model.safetensors"))
    url = server.put_dir(tmp_path, "cut")
    with weightlift.open(url, storage_options=FAST) as ckpt:
        server.faults["cut/model.safetensors"] = Fault(truncate=0.5)
        before = set(threading.enumerate())
        with pytest.raises(ReadError, match="cut/model.safetensors: GET failed \\(3 attempt"):
            ckpt.get_tensor("t12.1")
        assert no_new_threads(before) == []
        del server.faults["cut/model.safetensors"]  # healthy again: the same open checkpoint
        assert_equal({"t12.1": ckpt.get_tensor("t12.1")},
                     {"t12.1": reference(tmp_path)["t12.1"]})
    assert server.wait_idle() == 0


@pytest.mark.parametrize("status", [403, 404])
def test_permanent_errors_name_the_url_and_never_a_secret(server: FaultServer, tmp_path: Path,
                                                          status: int) -> None:
    save_file(tensors(13, 1, 64), str(tmp_path / "model.safetensors"))
    url = server.put_dir(tmp_path, "denied")
    server.faults["denied/model.safetensors"] = Fault(status=status)
    secret_url = url.replace("http://", "http://user:hunter2@") + "model.safetensors"
    with pytest.raises(CheckpointError) as caught:
        weightlift.load(secret_url, storage_options=FAST)
    message = str(caught.value)
    assert f"{server.url}/denied/model.safetensors:" in message
    assert ("access denied (403)" if status == 403 else "not found (404)") in message
    assert "hunter2" not in message and "user" not in message
    assert server.faults["denied/model.safetensors"].seen == 1  # not retried


def test_a_stall_past_the_timeout_fails_within_the_deadline(server: FaultServer,
                                                             tmp_path: Path) -> None:
    save_file(tensors(14, 2, 4096), str(tmp_path / "model.safetensors"))
    url = server.put_dir(tmp_path, "slow")
    with weightlift.open(url, storage_options={**FAST, "timeout": "300ms", "retries": "1"}
                         ) as ckpt:
        server.faults["slow/model.safetensors"] = Fault(stall=1.0)
        with pytest.raises(ReadError, match="slow/model.safetensors: GET failed .*timed out"):
            ckpt.get_tensor("t14.0")


def test_content_replaced_mid_load_is_an_error_even_when_if_match_is_ignored(
        server: FaultServer, tmp_path: Path) -> None:
    save_file(tensors(15, 6, 1 << 16), str(tmp_path / "model.safetensors"))
    url = server.put_dir(tmp_path, "swap")
    # The header GET sees one version, every later GET another (the server ignores If-Match).
    server.faults["swap/model.safetensors"] = Fault(replace_after=1)
    with pytest.raises(ReadError, match="swap/model.safetensors: the object changed"):
        weightlift.load(url, storage_options=FAST)
    assert server.wait_idle() == 0


def test_reads_are_ranged_gets_of_the_planned_size(server: FaultServer, tmp_path: Path) -> None:
    save_file(tensors(16, 4, 1 << 18), str(tmp_path / "model.safetensors"))  # 4 × ≥ 1 MiB
    url = server.put_dir(tmp_path, "sized")
    options = {"request_size": "1MiB", "concurrency": "4"}
    assert_equal(weightlift.load(url, storage_options=options), reference(tmp_path))
    data = [(s, e) for path, s, e in server.gets if path.endswith(".safetensors")][1:]
    assert data and all(end - start <= 1 << 20 for start, end in data)
    assert server.data_bytes() == sum(t.numel() * t.element_size()
                                      for t in reference(tmp_path).values())


# ------------------------------------------------------------------------------------ edges


def test_local_loading_does_not_need_the_object_store_client(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    save_file({"a": torch.arange(10)}, str(tmp_path / "m.safetensors"))
    monkeypatch.setitem(sys.modules, "obstore", None)  # as if not installed: imports fail
    assert torch.equal(weightlift.load(tmp_path / "m.safetensors")["a"], torch.arange(10))
    with pytest.raises(WeightliftError, match=r"pip install 'weightlift\[remote\]'"):
        weightlift.load("s3://bucket/model/")


def test_importing_weightlift_does_not_import_the_client() -> None:
    code = "import sys, weightlift; assert 'obstore' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_secrets_are_scrubbed_from_urls_and_client_messages() -> None:
    assert scrub_url("https://key:pw@host:9000/b/k.safetensors?X-Amz-Signature=abc") == \
        "https://host:9000/b/k.safetensors"
    text = scrub("GET https://host/b/k?X-Amz-Credential=AKIA1&X-Amz-Signature=abc failed; "
                 "secret_access_key=shh")
    assert "abc" not in text and "AKIA1" not in text and "shh" not in text
    assert "https://host/b/k" in text


def test_bad_sources_and_options_are_refused_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="storage_options apply to object-storage URLs"):
        weightlift.load(str(tmp_path), storage_options={"region": "x"})
    with pytest.raises(ValueError, match="concurrency"):
        weightlift.load("s3://bucket/x/", storage_options={"concurrency": "0"})
    with pytest.raises(CheckpointError, match="object storage and strategy 'mmap' reads local"):
        with serve_directory(tmp_path) as base:
            save_file({"a": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
            weightlift.load(f"{base}/", strategy="mmap")
    with pytest.raises(WeightliftError):
        weightlift.load("s3://bucket/x/", storage_options={"no_such_option": "1"})


# ------------------------------------------------------------------------------- CLI and bench


def test_cli_info_and_load_take_urls_and_storage_flags(moto: Moto, sharded: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from weightlift.cli import main

    url = moto.upload_dir(sharded, "cli")
    flags = ["--endpoint-url", moto.endpoint, "-o", "path_style=true",
             *[arg for key, value in MOTO_KEYS.items() for arg in ("-o", f"{key}={value}")]]
    assert main(["info", url, "--json", *flags]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"] == len(reference(sharded))
    assert main(["load", url, "--json", "-q", *flags]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["strategy"] == "remote"
    assert report["bytes"] == sum(t.numel() * t.element_size() for t in reference(sharded).values())
    assert MOTO_KEYS["secret_access_key"] not in json.dumps(report)


def test_bench_measures_an_object_storage_url(server: FaultServer, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from weightlift.cli import main

    save_file(tensors(17, 4, 1 << 16), str(tmp_path / "model.safetensors"))
    url = server.put_dir(tmp_path, "bench")
    out = tmp_path / "bench.json"
    assert main(["bench", url, "--scenario", "to_cpu", "--reps", "1", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["loader"], r["status"], r["strategy"]) for r in runs] == [
        ("weightlift auto", "ok", "remote")]
    assert runs[0]["bytes"] == server.data_bytes("bench/")


def test_every_scheme_gets_its_store_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from weightlift.remote.store import connect

    for name in [n for n in os.environ if n.startswith("AZURE_")]:
        monkeypatch.delenv(name)  # the Azure client reads its account from these

    cases = [("s3://bucket/a/b/", {"anonymous": "true", "region": "eu-west-1"}, "S3Store"),
             ("gs://bucket/a/b/", {"anonymous": "true"}, "GCSStore"),
             ("az://container/a/b/", {"account_name": "acct", "anonymous": "true"}, "AzureStore"),
             ("https://host.example/a/b/", {}, "HTTPStore")]
    for url, options, kind in cases:
        client = connect(url, options)
        assert type(client.store).__name__ == kind and client.key == "a/b/", url
    with pytest.raises(CheckpointError, match="az://container/a/: cannot set up the Azure client"):
        connect("az://container/a/", {}, environ={})
