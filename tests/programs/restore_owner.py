"""A minimal autofs owner for the restore tests: one mount, one blocking read per packet.

Usage: ``restore_owner.py '<json config>'``. Config keys:

- ``mode``: ``"mount"`` makes the mount itself (the original owner); ``"adopt"`` receives
  the mount over the unix socket at fd ``sock_fd`` with ``accept_handover`` (the restored
  owner), which installs the pipe at the dumped fd numbers and issues SETPIPEFD.
- ``mount_point``, ``kind`` (``"direct"`` or ``"indirect"``), ``bind_source`` (direct).
- ``read_fd``, ``write_fd`` (mount mode): where the pipe's ends go; ``write_fd`` null means
  the systemd style (write end closed after mounting). ``nonblock``: read end O_NONBLOCK.

Requests are answered as a real daemon would: an indirect key gets a ``mkdir`` (no mount),
a direct mount gets a bind mount of ``bind_source`` on top of it; then READY. Each answer is
printed as a JSON line; so is ``{"ready": ...}`` once serving. It exits at EOF on the pipe
(the mount went catatonic and nobody else holds a write end) or on SIGTERM.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys

from pyautofs import AutofsMode
from pyautofs.lowlevel import (
    AutofsControl,
    AutofsOptions,
    ExpireDirect,
    ExpireIndirect,
    MissingDirect,
    MissingIndirect,
    MountFlags,
    UmountFlags,
    decode_packet,
    mount,
    mount_autofs,
    umount2,
)
from pyautofs.restore import AutofsHandover, accept_handover, install_fds


def say(**obj: object) -> None:
    print(json.dumps(obj), flush=True)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    mp = cfg["mount_point"]
    ctl = AutofsControl.open()
    if cfg["mode"] == "mount":
        r, w = os.pipe2(os.O_CLOEXEC)
        plan = {cfg["read_fd"]: r}
        if cfg.get("write_fd") is not None:
            plan[cfg["write_fd"]] = w
        install_fds(plan)
        os.close(r)
        read_fd = cfg["read_fd"]
        if cfg.get("write_fd") is not None:
            os.close(w)
            w = cfg["write_fd"]
        mode = AutofsMode.DIRECT if cfg["kind"] == "direct" else AutofsMode.INDIRECT
        dev = mount_autofs(mp, AutofsOptions(fd=w, pgrp=os.getpgrp(), mode=mode))
        ioctlfd = ctl.openmount(mp, dev)
        ctl.set_timeout(ioctlfd, cfg.get("timeout", 0))
        if cfg.get("write_fd") is None:
            os.close(w)  # systemd style: only the kernel holds the write end now
        if cfg.get("nonblock"):
            os.set_blocking(read_fd, False)
    else:
        sock = socket.socket(fileno=cfg["sock_fd"])
        adopted = accept_handover(sock)
        sock.close()
        item = adopted[0].item
        read_fd = adopted[0].read_fd
        assert isinstance(item, AutofsHandover) and read_fd is not None
        ioctlfd = ctl.openmount(mp, item.dev)
    say(ready=True, pid=os.getpid(), pgrp=os.getpgrp(), read_fd=read_fd)
    while True:
        select.select([read_fd], [], [])
        try:
            raw = os.read(read_fd, 512)
        except BlockingIOError:
            continue
        if not raw:
            say(eof=True)
            return
        pkt = decode_packet(raw)
        if isinstance(pkt, MissingIndirect):
            os.makedirs(os.path.join(mp, pkt.name.decode()), exist_ok=True)
        elif isinstance(pkt, MissingDirect):
            mount(cfg["bind_source"], mp, None, MountFlags.BIND)
        elif isinstance(pkt, ExpireDirect):
            umount2(mp, UmountFlags.NONE)
        elif isinstance(pkt, ExpireIndirect):
            os.rmdir(os.path.join(mp, pkt.name.decode()))
        ctl.ready(ioctlfd, pkt.token)
        say(answered=type(pkt).__name__, name=pkt.name.decode(errors="replace"), token=pkt.token)


if __name__ == "__main__":
    main()
