"""A real OpenLDAP ``slapd`` for the tests and the ldap benchmark: a throwaway config and database.

Each :class:`Slapd` gets its own directory: a ``slapd.conf`` (core, cosine and nis schemas,
and an RFC 2307bis autofs schema written here, since Debian's ``autofs.schema`` is an older
variant that clashes with it), an mdb database loaded with ``slapadd`` before the start, a
self-signed CA and server certificate made with ``openssl``, and listeners on ``ldapi://``
(a socket in that directory), ``ldap://127.0.0.1:PORT`` and ``ldaps://127.0.0.1:PORT``.
:meth:`Slapd.stop` kills the process (SIGKILL after a deadline) and :meth:`Slapd.remove`
removes every file; nothing is left on the machine. :meth:`Slapd.pause` and
:meth:`Slapd.start` stop and bring back the same server, database intact.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path

SLAPD = shutil.which("slapd") or ("/usr/sbin/slapd" if os.path.exists("/usr/sbin/slapd") else None)
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"
SCHEMA_DIR = Path("/etc/ldap/schema")
SUFFIX = "dc=example,dc=test"
ROOTDN = f"cn=admin,{SUFFIX}"
ROOTPW = "secret"
START_DEADLINE = 20.0
STOP_DEADLINE = 10.0

AUTOFS_2307BIS_SCHEMA = """\
attributetype ( 1.3.6.1.1.1.1.31 NAME 'automountMapName'
    DESC 'automount map name'
    EQUALITY caseExactIA5Match SUBSTR caseExactIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
attributetype ( 1.3.6.1.1.1.1.32 NAME 'automountKey'
    DESC 'automount key'
    EQUALITY caseExactIA5Match SUBSTR caseExactIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
attributetype ( 1.3.6.1.1.1.1.33 NAME 'automountInformation'
    DESC 'automount information'
    EQUALITY caseExactIA5Match SUBSTR caseExactIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26 SINGLE-VALUE )
objectclass ( 1.3.6.1.1.1.2.16 NAME 'automountMap' SUP top STRUCTURAL
    MUST automountMapName MAY description )
objectclass ( 1.3.6.1.1.1.2.17 NAME 'automount' SUP top STRUCTURAL
    MUST ( automountKey $ automountInformation ) MAY description )
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: Sequence[str], **kw: object) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({r.returncode}): {r.stderr}")


def make_ca(directory: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost: (ca, cert, key)."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    req = ["openssl", "req", "-newkey", "rsa:2048", "-nodes"]
    ca_subject = ["-subj", "/CN=pyautofs test CA"]
    _run([*req, "-x509", "-days", "2", *ca_subject, "-keyout", str(ca_key), "-out", str(ca)])
    _run([*req, "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr)])
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sign = ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key)]
    _run([*sign, "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert)])
    key.chmod(0o600)
    return ca, cert, key


def ldif_entry(dn: str, attrs: Iterable[tuple[str, str]]) -> str:
    """One LDIF record; values that need it are base64-encoded."""
    import base64

    lines = [f"dn:: {base64.b64encode(dn.encode()).decode()}"]
    for name, value in attrs:
        raw = value.encode()
        lines.append(f"{name}:: {base64.b64encode(raw).decode()}")
    return "\n".join(lines) + "\n\n"


class Slapd:
    """One slapd with its own temporary config, database, CA and listeners."""

    def __init__(self, entries: str = "", *, tls: bool = True) -> None:
        assert SLAPD is not None
        self.dir = Path(tempfile.mkdtemp(prefix="pyautofs-slapd-"))
        self.dir.chmod(0o755)  # the ldapi socket is reachable by automount(8) and tests
        self.port = free_port()
        self.tls_port = free_port()
        self.socket_path = self.dir / "ldapi"
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            self._configure(tls)
            self.load(self._base_ldif() + entries)
            self.start()
        except BaseException:
            self.remove()
            raise

    @property
    def ldap_uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    @property
    def ldapi_uri(self) -> str:
        return "ldapi://" + urllib.parse.quote(str(self.socket_path), safe="")

    def _configure(self, tls: bool) -> None:
        (self.dir / "db").mkdir()
        (self.dir / "autofs-2307bis.schema").write_text(AUTOFS_2307BIS_SCHEMA)
        conf = [
            f"include {SCHEMA_DIR / 'core.schema'}",
            f"include {SCHEMA_DIR / 'cosine.schema'}",
            f"include {SCHEMA_DIR / 'nis.schema'}",
            f"include {self.dir / 'autofs-2307bis.schema'}",
            f"pidfile {self.dir / 'slapd.pid'}",
            "modulepath /usr/lib/ldap",
            "moduleload back_mdb",
            "sizelimit unlimited",
        ]
        if tls:
            self.ca, cert, key = make_ca(self.dir)
            conf += [
                f"TLSCACertificateFile {self.ca}",
                f"TLSCertificateFile {cert}",
                f"TLSCertificateKeyFile {key}",
            ]
        conf += [
            "database mdb",
            f'suffix "{SUFFIX}"',
            f'rootdn "{ROOTDN}"',
            f"rootpw {ROOTPW}",
            f"directory {self.dir / 'db'}",
            "maxsize 67108864",
            "index objectClass,automountKey,automountMapName,cn,nisMapName eq",
            "access to * by * read",
        ]
        self.conf = self.dir / "slapd.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def _base_ldif(self) -> str:
        return (
            f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
            "o: pyautofs test\ndc: example\n\n"
        )

    def load(self, ldif: str) -> None:
        """Add entries with slapadd (only while stopped)."""
        assert self.proc is None or self.proc.poll() is not None
        path = self.dir / "load.ldif"
        path.write_text(ldif)
        _run([SLAPADD, "-q", "-f", str(self.conf), "-l", str(path)])
        path.unlink()

    def start(self) -> None:
        """Start (again) and wait until it answers on every listener."""
        assert SLAPD is not None
        urls = [self.ldapi_uri, self.ldap_uri]
        if hasattr(self, "ca"):
            urls.append(self.ldaps_uri)
        self.log_path = self.dir / "slapd.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [SLAPD, "-d", "0", "-f", str(self.conf), "-h", " ".join(urls)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        end = time.monotonic() + START_DEADLINE
        ports = [self.port, self.tls_port] if hasattr(self, "ca") else [self.port]
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited ({self.proc.returncode}): {self.log()}")
            if all(_listening(p) for p in ports) and self.socket_path.exists():
                return
            if time.monotonic() > end:
                self.stop()
                raise TimeoutError(f"slapd did not start: {self.log()}")
            time.sleep(0.02)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if hasattr(self, "log_path") else ""

    def pause(self) -> None:
        """SIGSTOP: the server is there but answers nothing (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        # The signal is delivered to each thread as it next runs: wait until all stand still.
        end = time.monotonic() + STOP_DEADLINE
        while not all(_stopped(t) for t in Path(f"/proc/{self.proc.pid}/task").iterdir()):
            if time.monotonic() > end:
                raise TimeoutError("slapd did not stop at SIGSTOP")
            time.sleep(0.001)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after a deadline); the database stays for :meth:`start`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_DEADLINE)
        self.socket_path.unlink(missing_ok=True)

    def remove(self) -> None:
        """Stop, then remove every file."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def modify(self, ldif_add: str) -> None:
        """Add entries to the running server (ldapadd over ldapi as the root DN)."""
        r = subprocess.run(
            ["ldapadd", "-x", "-H", self.ldapi_uri, "-D", ROOTDN, "-w", ROOTPW],
            input=ldif_add,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"ldapadd failed: {r.stderr}")


def _stopped(task: Path) -> bool:
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return True  # the thread is gone
    return stat.rpartition(")")[2].split()[0] in ("T", "t")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def automount_map_ldif(name: str, entries: dict[str, str], *, schema: str = "rfc2307bis") -> str:
    """LDIF for one autofs map below the suffix, in either schema."""
    if schema == "rfc2307bis":
        mapdn = f"automountMapName={name},{SUFFIX}"
        out = ldif_entry(
            mapdn,
            [("objectClass", "top"), ("objectClass", "automountMap"), ("automountMapName", name)],
        )
        for key, info in entries.items():
            dn = f"automountKey={_dn_escape(key)},{mapdn}"
            out += ldif_entry(
                dn,
                [
                    ("objectClass", "top"),
                    ("objectClass", "automount"),
                    ("automountKey", key),
                    ("automountInformation", info),
                ],
            )
        return out
    mapdn = f"nisMapName={name},{SUFFIX}"
    out = ldif_entry(
        mapdn, [("objectClass", "top"), ("objectClass", "nisMap"), ("nisMapName", name)]
    )
    for key, info in entries.items():
        dn = f"cn={_dn_escape(key)},{mapdn}"
        out += ldif_entry(
            dn,
            [
                ("objectClass", "top"),
                ("objectClass", "nisObject"),
                ("cn", key),
                ("nisMapEntry", info),
                ("nisMapName", name),
            ],
        )
    return out


def _dn_escape(value: str) -> str:
    """RFC 4514 escaping of an attribute value in a DN."""
    out = []
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (i == 0 and ch in "# ") or (i == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)
