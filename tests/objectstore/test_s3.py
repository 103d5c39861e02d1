"""What only the S3 store does, against moto's server."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from minio import Minio

from aiwm.errors import Unavailable
from aiwm.objectstore import S3Store
from tests.objectstore.conftest import s3_store
from tests.support.moto_server import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, PresignGateway, free_port


async def test_ensure_ready_makes_a_versioned_bucket_once(moto: MotoServer,
                                                         presign_gateway: PresignGateway) -> None:
    bucket = f"aiwm-ready-{uuid.uuid4().hex[:8]}"
    client = Minio(moto.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False,
                   region=REGION)
    assert not client.bucket_exists(bucket)
    store = s3_store(moto, presign_gateway, bucket=bucket)
    await store.ensure_ready()
    await store.ensure_ready()
    assert client.bucket_exists(bucket)
    assert client.get_bucket_versioning(bucket).status == "Enabled"


async def test_sha256_is_kept_as_object_metadata(moto: MotoServer, presign_gateway: PresignGateway,
                                                 tmp_path: Path) -> None:
    store = s3_store(moto, presign_gateway)
    await store.ensure_ready()
    src = tmp_path / "m.bin"
    src.write_bytes(b"meta")
    stored = await store.put_file(f"models/o/{uuid.uuid4().hex}/v1/m.bin", src)
    client = Minio(moto.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False,
                   region=REGION)
    head = client.stat_object(store.bucket, stored.key)
    assert head.metadata is not None
    assert head.metadata["x-amz-meta-sha256"] == stored.sha256


async def test_an_unreachable_store_is_unavailable() -> None:
    store = S3Store(endpoint=f"127.0.0.1:{free_port()}", access_key="a", secret_key="b",
                    secure=False, bucket="aiwm-nowhere", region=REGION)
    with pytest.raises(Unavailable):
        await store.stat("models/o/m/v1/x.bin")


async def test_ping_fails_for_a_missing_bucket_or_storage_that_is_not_there(
        moto: MotoServer, presign_gateway: PresignGateway) -> None:
    missing = s3_store(moto, presign_gateway, bucket="no-such-bucket-for-ping")
    with pytest.raises(Unavailable, match="'no-such-bucket-for-ping' does not exist"):
        await missing.ping()
    nobody = S3Store(endpoint=f"127.0.0.1:{free_port()}", access_key=ACCESS_KEY,
                     secret_key=SECRET_KEY, secure=False, bucket="aiwm-nowhere", region=REGION)
    with pytest.raises(Unavailable, match="unreachable"):
        await nobody.ping()
