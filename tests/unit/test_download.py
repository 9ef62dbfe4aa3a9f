"""Download stage pieces that need no network: error classes, config checks, the CLI's help."""

from __future__ import annotations

import pytest

from pipelines.cli import main
from pipelines.config import ConfigError, load_config
from pipelines.config import CONFIG_DIR
from pipelines.tasks.download import DownloadConfig, classify_error


@pytest.mark.parametrize("message, label", [
    ("HTTP Error 404: Not Found", "http_404"),
    ("HTTP Error 503: Service Unavailable (transient)", "http_503"),
    ("<urlopen error timed out>", "timeout"),
    ("The read operation timed out", "timeout"),
    ("image area too large", "too_large"),
    ("Image decoding error", "decode_error"),
    ("OpenCV(4.10.0) /io/opencv/modules/imgcodecs/src/loadsave.cpp:994: error: (-215:Assertion failed) "
     "!buf.empty() in function 'imdecode_'", "empty_body"),
    ("<urlopen error [Errno -2] Name or service not known>", "dns_error"),
    ("<urlopen error [Errno 111] Connection refused>", "connection_error"),
    ("something new", "other_error"),
    (None, "unknown_error"),
])
def test_error_classes(message, label):
    assert classify_error(message) == label


def test_configs_load_and_reject_typos():
    for name in ("default", "demo", "ray"):
        load_config(DownloadConfig, CONFIG_DIR / "download" / f"{name}.yaml")
    with pytest.raises(ConfigError, match="did you mean 'threads'"):
        load_config(DownloadConfig, {"thread": 4})
    with pytest.raises(ConfigError, match="'processes' = 0"):
        load_config(DownloadConfig, {"processes": 0})


def test_cli_user_errors(tmp_path, capsys):
    assert main(["download", str(tmp_path / "missing.json"), "--name", "raw", "--registry", str(tmp_path)]) == 2
    assert "source list not found" in capsys.readouterr().err
    assert main(["download", "--name", "raw", "--registry", str(tmp_path)]) == 2
    assert "--retry-failed" in capsys.readouterr().err
    assert main(["demo-corpus", "write", str(tmp_path / "c"), "--n", "12", "--bad-fraction", "0.0"]) == 0
    assert (tmp_path / "c" / "ground_truth.parquet").exists()
