"""The shared server fixtures work: S3 round trip through the standard env vars, MLflow server health."""

import pyarrow.fs as pafs

from crossdim import storage


def test_moto_s3_round_trip_via_env(moto_s3):
    uri = moto_s3.uri("probe/hello.txt")
    storage.write_text(uri, "hi")
    assert storage.read_text(uri) == "hi"
    assert moto_s3.keys("probe/") == ["probe/hello.txt"]
    fs, path = storage.filesystem(uri)
    assert isinstance(fs, pafs.S3FileSystem)
    assert storage.list_files(moto_s3.uri("probe")) == [uri]


def test_gz_objects_are_stored_byte_for_byte(moto_s3):
    """pyarrow's default compression='detect' would gzip a .gz again on write and unzip on read."""
    import gzip

    payload = gzip.compress(b"voxels" * 100)
    uri = moto_s3.uri("probe/image.nii.gz")
    storage.write_bytes(uri, payload)
    raw = moto_s3.client().get_object(Bucket=moto_s3.bucket, Key="probe/image.nii.gz")["Body"].read()
    assert raw == payload
    assert storage.read_bytes(uri) == payload
