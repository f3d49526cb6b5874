"""Passing fds between restore workers: a trio coordinator captures a pipe, rebuilds it and
hands both ends to a worker process, which installs them at the numbers it asked for."""

import fcntl
import json
import os
import socket
import sys
from functools import partial

import trio

import pyautofs
import pyautofs.restore

# -- the worker: `python pass_fds.py worker SOCK_FD` --------------------------------------


def worker(sock: socket.socket) -> None:
    """Receive fds and where they go, install them there, use them, report back."""
    data, fds = pyautofs.recv_fds(sock)  # every fd of the message, close-on-exec, or none
    targets: list[int] = json.loads(data)
    pyautofs.restore.install_fds(dict(zip(targets, fds, strict=True)), close_sources=True)
    read_end, write_end = targets
    packets = [os.read(read_end, 4096) for _ in range(2)]  # one read, one packet
    os.write(write_end, b"written by the worker")
    report = f"worker: fds {targets} installed, fd {read_end} reads {packets}"
    pyautofs.send_fds(sock, [], report.encode())


# -- the coordinator ---------------------------------------------------------------------


async def coordinator() -> None:
    # A checkpoint found this pipe: packet mode (like an autofs request pipe), two packets.
    r, w = os.pipe2(os.O_DIRECT)
    for packet in (b"first", b"second"):
        os.write(w, packet)
    image = pyautofs.restore.snapshot_pipe(r)  # size, mode, packets: nothing is consumed
    print("snapshot:", image.packets, "| the pipe still holds:", os.read(r, 100))
    new_r, new_w = pyautofs.restore.restore_pipe(image)  # a new pipe, with the same packets

    sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    channel = pyautofs.FdChannel(sock)  # the same protocol as send_fds, from trio
    async with channel, trio.open_nursery() as nursery:
        # The worker inherits its end of the socket, and nothing else (fds are cloexec).
        argv = [sys.executable, __file__, "worker", str(theirs.fileno())]
        await nursery.start(partial(trio.run_process, argv, pass_fds=[theirs.fileno()]))
        theirs.close()
        with trio.fail_after(30):
            await channel.send([new_r, new_w], json.dumps([100, 101]).encode())
            print((await channel.receive())[0].decode())
    print("the restored pipe now holds:", os.read(new_r, 100))
    for fd in (r, w, new_r, new_w):
        os.close(fd)


def many_fds() -> None:
    """Past the kernel's 253 fds per sendmsg: one message, batched, all or nothing."""
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    pyautofs.send_fds(left, [r, w] * 300, b"600 fds")
    data, fds = pyautofs.recv_fds(right)
    cloexec = all(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds)
    print(f"send_fds: {data.decode()} -> received {len(fds)}, all close-on-exec: {cloexec}")
    for fd in [*fds, r, w]:
        os.close(fd)
    left.close()
    right.close()


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker(socket.socket(fileno=int(sys.argv[2])))
    else:
        trio.run(coordinator)
        many_fds()
