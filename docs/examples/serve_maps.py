"""Replacing automount(8): `pyautofs serve --master` on a master map, `pyautofs inspect`,
a reload with SIGHUP and a clean stop with SIGTERM."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyautofs.lowlevel import unshare_mount_namespace

ROOT = tempfile.mkdtemp(prefix="serve-maps-")
LOG = Path(ROOT, "serve.log")
# Lock files in the scratch directory, not in /run/pyautofs on the host.
PYAUTOFS = [sys.executable, "-m", "pyautofs"]
SERVE = [*PYAUTOFS, "serve", "--lock-dir", f"{ROOT}/locks"]


def write(name: str, text: str) -> str:
    path = os.path.join(ROOT, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def ls(path: str) -> str:
    """List a directory from another session (lookups from the server's group never
    trigger)."""
    done = subprocess.run(
        ["ls", path],
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=30,
        check=False,
    )
    out = " ".join(done.stdout.split()) if done.returncode == 0 else done.stderr.strip()
    return out.replace(ROOT, "$ROOT")


def wait_for_log(text: str) -> None:
    deadline = time.monotonic() + 20
    while text not in LOG.read_text():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{LOG.read_text()}"
        time.sleep(0.02)


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
    with LOG.open("w") as log:  # serve logs to stderr
        server = subprocess.Popen([*SERVE, "--master", master], start_new_session=True, stderr=log)
    try:
        wait_for_log("serving 2 autofs mount(s)")
        print("data/alpha:", ls(f"{ROOT}/data/alpha"))  # the wildcard, read-only bind
        print("data/project:", ls(f"{ROOT}/data/project"))  # a multi-mount entry's root
        print("data/project/tools:", ls(f"{ROOT}/data/project/tools"))  # its offset
        print("data/scratch:", ls(f"{ROOT}/data/scratch") or "(an empty tmpfs)")
        print("direct/beta:", ls(f"{ROOT}/direct/beta"))  # a direct map
        print("data/nosuch:", ls(f"{ROOT}/data/nosuch"))
        inspect = subprocess.run(
            [*PYAUTOFS, "inspect"], capture_output=True, text=True, timeout=30, check=True
        )
        print("pyautofs inspect:", inspect.stdout.rstrip().replace(ROOT, "$ROOT"), sep="\n")
        write("auto.data", Path(data).read_text().replace("*  ", "renamed  ").replace("&", "beta"))
        server.send_signal(signal.SIGHUP)  # re-read the maps
        wait_for_log("maps re-read")
        print("after SIGHUP, data/renamed:", ls(f"{ROOT}/data/renamed"))
    finally:
        server.send_signal(signal.SIGTERM)  # unmount everything, remove the mounts
        server.wait(timeout=30)
    print("exit status:", server.returncode)
    log_lines = LOG.read_text().replace(ROOT, "$ROOT").splitlines()
    print("log:", *[line.split(" ", 3)[3] for line in log_lines], sep="\n  ")
    print("still mounted:", os.path.ismount(f"{ROOT}/data"))
    shutil.rmtree(ROOT)


if __name__ == "__main__":
    unshare_mount_namespace()  # nothing this example mounts can reach the host
    main()
