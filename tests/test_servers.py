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
