"""Replacing automount(8): `pyautofs serve --master` on a master map, a reload, a clean stop."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from pyautofs.lowlevel import unshare_mount_namespace

ROOT = tempfile.mkdtemp(prefix="serve-maps-")
# Lock files in the scratch directory, not in /run/pyautofs on the host.
SERVE = [sys.executable, "-m", "pyautofs", "serve", "--lock-dir", f"{ROOT}/locks"]


def write(name: str, text: str) -> str:
    path = os.path.join(ROOT, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def ls(path: str) -> str:
    done = subprocess.run(
        ["ls", path],
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=30,
        check=False,
    )
    return " ".join(done.stdout.split()) if done.returncode == 0 else done.stderr.strip()


def main() -> None:
    for name in ("alpha", "beta", "tools"):
        os.makedirs(f"{ROOT}/exports/{name}")
        write(f"exports/{name}/{name}.txt", name)
    os.makedirs(f"{ROOT}/direct")
    data = write(
        "auto.data",
        "# key     options          location\n"
        "scratch   -fstype=tmpfs,size=16m  :tmpfs\n"
        f"project   / :{ROOT}/exports/alpha  /tools :{ROOT}/exports/tools\n"
        f"*         -fstype=bind,ro  :{ROOT}/exports/&\n",
    )
    direct = write("auto.direct", f"{ROOT}/direct/beta  :{ROOT}/exports/beta\n")
    master = write("auto.master", f"{ROOT}/data  {data}  --timeout=300\n/-  {direct}\n")
    server = subprocess.Popen(
        [*SERVE, "--master", master],
        start_new_session=True,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.ismount(f"{ROOT}/data") or not os.path.ismount(f"{ROOT}/direct/beta"):
            assert time.monotonic() < deadline and server.poll() is None, "serve did not start"
            time.sleep(0.05)
        print("data/alpha:", ls(f"{ROOT}/data/alpha"))  # the wildcard, read-only bind
        print("data/project:", ls(f"{ROOT}/data/project"))  # a multi-mount entry's root
        print("data/project/tools:", ls(f"{ROOT}/data/project/tools"))  # its offset
        print("data/scratch:", ls(f"{ROOT}/data/scratch") or "(an empty tmpfs)")
        print("direct/beta:", ls(f"{ROOT}/direct/beta"))  # a direct map
        print("data/nosuch:", ls(f"{ROOT}/data/nosuch"))
        with open(data) as f:
            text = f.read()
        write("auto.data", text.replace("*  ", "renamed  ").replace("&", "beta"))
        server.send_signal(signal.SIGHUP)  # re-read the maps
        time.sleep(0.5)
        print("after SIGHUP, data/renamed:", ls(f"{ROOT}/data/renamed"))
    finally:
        server.send_signal(signal.SIGTERM)  # unmount everything, remove the mounts
        _, log = server.communicate(timeout=30)
    print("exit status:", server.returncode)
    print("log:", *[line.split(" ", 2)[2] for line in log.splitlines()], sep="\n  ")
    print("still mounted:", os.path.ismount(f"{ROOT}/data"))
    shutil.rmtree(ROOT)


if __name__ == "__main__":
    unshare_mount_namespace()
    main()
