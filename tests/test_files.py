"""Files a resumed run reads as facts: whole or not at all, whoever else writes them."""

import os
import subprocess
import sys

import pytest

from nemo_plrd.files import write_text_atomic

WRITER = """import sys
from nemo_plrd.files import write_text_atomic
for _ in range(200):
    write_text_atomic(sys.argv[1], sys.argv[2] * 100_000)
"""


def test_two_writers_of_one_path_each_rename_a_whole_file(tmp_path):
    """Two processes writing one path (two evaluations into one folder): each renames its own whole file, the
    last one stays; neither fails, and no reader sees a mix of the two."""
    path = tmp_path / "results.json"
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), mark], stderr=subprocess.PIPE, text=True)
               for mark in "ab"]
    reads = set()
    while any(writer.poll() is None for writer in writers):
        if path.exists():
            reads.add(path.read_text())
    assert [writer.wait() for writer in writers] == [0, 0], [writer.stderr.read()[-2000:] for writer in writers]
    assert reads <= {"a" * 100_000, "b" * 100_000} and path.read_text() in {"a" * 100_000, "b" * 100_000}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no writer's temp file left


def test_a_write_cut_short_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old")
    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new text is written, then the flush to the disk fails
    with pytest.raises(OSError, match="No space left on device"):
        write_text_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


KILLED_WRITER = """import os, signal, sys
os.replace = lambda *args: os.kill(os.getpid(), signal.SIGKILL)  # killed once the text is on disk, before the rename
from nemo_plrd.files import write_text_atomic
write_text_atomic(sys.argv[1], "{}")
"""


def test_a_finished_output_carries_no_temp_file_of_a_writer_killed_in_it(tmp_path):
    from nemo_plrd.pipeline import finish

    partial = tmp_path / "out.partial"
    (partial / "stage1").mkdir(parents=True)
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(partial / "stage1" / "decomposed.json")])
    left = [p.name for p in (partial / "stage1").iterdir()]
    assert killed.returncode == -9 and len(left) == 1 and left[0].startswith(".decomposed.json.tmp"), left
    write_text_atomic(partial / "stage1" / "decomposed.json", "{}")  # the rerun writes it whole
    finish(partial, tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*")) == [
        "stage1", "stage1/decomposed.json"]
