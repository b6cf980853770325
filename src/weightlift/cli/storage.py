"""Object-storage flags shared by the subcommands that take a SOURCE.

    weightlift load s3://models/llama/ --endpoint-url http://127.0.0.1:9000 -o path_style=true
"""

from __future__ import annotations

import argparse

from ..remote import RemoteSource, as_remote


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("object storage (s3://, gs://, az://, https:// sources)")
    group.add_argument("-o", "--storage-option", action="append", default=[], metavar="KEY=VALUE",
                       help="a storage option, e.g. region=eu-west-1, path_style=true, "
                            "concurrency=32, request_size=8MiB (see docs/remote.md); repeatable")
    group.add_argument("--endpoint-url", metavar="URL",
                       help="the store's endpoint: S3-compatible (MinIO, Ceph, R2), Azure "
                            "(Azurite) or GCS; default AWS_ENDPOINT_URL, AZURE_STORAGE_ENDPOINT, "
                            "GOOGLE_BASE_URL")
    group.add_argument("--anonymous", action="store_true",
                       help="unsigned requests, for public buckets")


def storage_options(args: argparse.Namespace) -> dict[str, str]:
    options: dict[str, str] = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"weightlift: error: --storage-option takes KEY=VALUE, not {item!r}")
        options[key.strip()] = value
    if args.endpoint_url:
        options["endpoint"] = args.endpoint_url
    if args.anonymous:
        options["anonymous"] = "true"
    return options


def source_of(args: argparse.Namespace) -> str | RemoteSource:
    """``args.source`` with the storage flags attached when it is an object-storage URL."""
    try:
        return as_remote(args.source, storage_options(args))  # type: ignore[return-value]
    except ValueError as exc:
        raise SystemExit(f"weightlift: error: {exc}") from None
