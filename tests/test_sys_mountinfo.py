"""mountinfo parsing: escapes, optional fields, autofs options, and pipe holders."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyautofs import AutofsMode
from pyautofs.lowlevel import AutofsMount, find_pipe_holders, parse_mountinfo

LINE = (
    b"42 27 0:39 / /mnt/with\\040space\\012nl rw,relatime shared:5 master:1 - autofs pyautofs "
    b"rw,fd=4,pgrp=14862,timeout=300,minproto=5,maxproto=5,direct,strictexpire,pipe_ino=33540\n"
)


def test_parse_escapes_and_optional_fields() -> None:
    (info,) = parse_mountinfo(LINE)
    assert info.mount_point == "/mnt/with space\nnl"
    assert info.optional == ("shared:5", "master:1")
    assert info.dev == os.makedev(0, 39)
    assert info.super_option("pipe_ino") == "33540"
    m = AutofsMount.from_mountinfo(info)
    assert (m.fd, m.pgrp, m.timeout, m.mode, m.strictexpire, m.pipe_ino) == (
        4,
        14862,
        300,
        AutofsMode.DIRECT,
        True,
        33540,
    )
    assert not m.catatonic


def test_catatonic_and_missing_pipe_ino() -> None:
    cat = LINE.replace(b"fd=4", b"fd=-1").replace(b"pipe_ino=33540", b"pipe_ino=-1")
    assert AutofsMount.from_mountinfo(parse_mountinfo(cat)[0]).catatonic
    old = LINE.replace(b",pipe_ino=33540", b"")
    assert AutofsMount.from_mountinfo(parse_mountinfo(old)[0]).pipe_ino is None


def test_malformed_line_names_its_number() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse_mountinfo(LINE + b"garbage\n")


def test_find_pipe_holders_names_a_child_and_its_end() -> None:
    r, w = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", "import os; os.read(0, 1)"], stdin=r, pass_fds=(w,)
    )
    try:
        ino = os.fstat(r).st_ino
        holders = {(h.pid, h.fd, h.end) for h in find_pipe_holders(ino)}
        assert (child.pid, 0, "read") in holders
        assert (child.pid, w, "write") in holders
        assert (os.getpid(), r, "read") in holders
    finally:
        os.write(w, b"x")  # the child exits after one byte
        os.close(w)
        os.close(r)
        child.wait(timeout=10)
