"""Passing fds between restore workers: send_fds/recv_fds, FdChannel, install_fds, pipes."""

import os
import socket
import subprocess
import sys

import trio

import pyautofs

WORKER = """
import os, socket, sys
import pyautofs

sock = socket.socket(fileno=int(sys.argv[1]))
data, fds = pyautofs.recv_fds(sock)          # every fd of the message, close-on-exec
pyautofs.install_fds({100 + i: fd for i, fd in enumerate(fds)}, close_sources=True)
for i in range(len(fds)):                     # the pipes now sit at fds 100, 101, ...
    os.write(100 + i, f"worker wrote to pipe {i}\\n".encode())
sock.send(f"{data.decode()}: installed {len(fds)} fds at 100..{99 + len(fds)}".encode())
"""


def sync_to_a_process() -> None:
    """A coordinator hands pipe write ends to a worker process, which puts them at fd 100+."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pipes = [os.pipe() for _ in range(3)]
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(theirs.fileno())], pass_fds=[theirs.fileno()]
    )
    theirs.close()
    pyautofs.send_fds(ours, [w for _, w in pipes], b"job 1")
    print(ours.recv(4096).decode())
    assert worker.wait(timeout=30) == 0
    for r, w in pipes:
        os.close(w)
        print(" ", os.read(r, 100).decode().strip())
        os.close(r)
    ours.close()


def snapshot_and_restore_a_pipe() -> None:
    """Copy what a pipe holds, packet boundaries included, without consuming it."""
    r, w = os.pipe2(os.O_DIRECT)  # packet mode, like an autofs request pipe
    for packet in (b"first", b"second"):
        os.write(w, packet)
    image = pyautofs.snapshot_pipe(r)
    copy_r, copy_w = pyautofs.restore_pipe(image)
    print("snapshot:", image.packets, "| original still holds:", os.read(r, 100))
    print("restored copy reads:", os.read(copy_r, 100), os.read(copy_r, 100))
    for fd in (r, w, copy_r, copy_w):
        os.close(fd)


async def async_channel() -> None:
    """The same protocol from trio, with any number of fds per message."""
    left, right = pyautofs.FdChannel.pair()
    async with left, right:
        r, w = os.pipe()
        await left.send([r, w] * 200, b"400 fds")
        data, fds = await right.receive()
        print(f"FdChannel: {data.decode()} -> received {len(fds)}")
        for fd in [*fds, r, w]:
            os.close(fd)


if __name__ == "__main__":
    sync_to_a_process()
    snapshot_and_restore_a_pipe()
    trio.run(async_channel)
