# -*- test-case-name: tests.relay.test_tls -*-
"""The relay's built-in TLS: SNI over a directory of PEM files, reloadable without a restart.

The relay serves `*.<domain>` (one wildcard certificate) plus maybe a few exact
names, and certificates get renewed every couple of months by certbot/lego
dropping new PEM files into a directory.  Twisted 26.4+ has a `tls:<dir>`
server endpoint for exactly this, but on 26.10 it has two defects that rule it
out for a daemon:

1. **It busy-loops at startup** when the directory holds a self-signed
   certificate without its key, e.g. a chain file that ends with the root CA
   (common with private CAs and test fixtures): `inferDomainMapping` follows
   issuer -> subject links with no cycle check, so a root, being its own
   issuer, is followed for ever; the process spins at 100 % CPU and never
   listens.
2. **It never serves renewed or added certificates.**  Its "auto-reloading"
   lookup re-reads the directory only from a code path the handshake never
   reaches: the SNI callback is bound to the map built at first load.  After a
   renewal the relay would keep serving the old certificate until restarted.

So we keep Twisted's TLS layer (`wrapServerTLS`) and supply our own
`IOpenSSLServerConnectionCreator`, `CertificateStore`:

- all parsing happens off the reactor thread, into an immutable snapshot of
  ready-made OpenSSL contexts (built once per reload, never per handshake), and
  the snapshot is swapped in with one assignment on the reactor thread;
- the SNI callback is a dict lookup (exact name, else one-label wildcard);
- self-signed certificates are never chain links, and chain walking remembers
  what it has visited, so no input can make it loop;
- a broken file is logged and skipped; a reload that finds nothing usable
  keeps serving what it had;
- only regular files of at most `MAX_FILE` bytes are read, opened without
  blocking: a FIFO (whose read() waits for a writer for ever), a device or a
  socket with a certificate's name is skipped, it never hangs start-up;
- a certificate outside its validity is served only for names nothing valid
  covers, and never as the default while a valid one exists; expired ones,
  and ones expiring within `EXPIRY_WARNING`, are warned about at every load,
  and the watcher repeats the warning once a day.

Wiring: the endpoint string
`sni:<directory>[:<port>][:interface=][:backlog=][:reuseport=yes|no]`
reaches `sni_endpoint` through the parser plugin in
`twisted/plugins/mcpr_plugins.py`, so `serverFromString` and
`strports.service` build it like any other listener (`reuseport=yes`: over
`mcpr.relay.reuseport`, for several relay processes on one port).  It has its own prefix
because Twisted's built-in `tls:` parser wins over plugins; the relay accepts
`tls:` too, as an alias (`listen_description`).  `sni_endpoint` loads the
certificates right away (or raises), and the `SNIServerEndpoint` it returns
exposes its `store`, which the relay's `makeService` hands to a
`CertificateWatcher` (polls every 10 s) and to its SIGHUP reload.
`store.reload()` never fails (problems are logged), so its Deferred may be
dropped.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Hashable

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_pem_private_key,
)
from cryptography.x509.oid import NameOID
from OpenSSL.SSL import Connection, Context
from OpenSSL.SSL import Error as OpenSSLError
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, wrapServerTLS
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IProtocolFactory,
    IReactorThreads,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mcpr.relay.reuseport import ReusePortEndpoint, listen_backlog, listen_port

__all__ = [
    "CertificateDirectoryError",
    "CertificateStore",
    "CertificateWatcher",
    "SNIServerEndpoint",
    "listen_description",
    "sni_endpoint",
]

log = Logger()

_SUFFIXES = frozenset({".pem", ".crt", ".key"})
"""The files of the directory we read (and watch); anything else is left alone."""

MAX_FILE = 1 << 20
"""A PEM file larger than this is skipped: a key, a leaf and its chain take a few KiB, and even
every public root CA together fits in a quarter of it."""

EXPIRY_WARNING = timedelta(days=14)
"""A served certificate expiring within this is warned about, at load and once a day (renewal
tools renew at 30 days left, so a warning means renewal has been failing for two weeks)."""

# WebSockets (the tunnels) do not work over HTTP/2, so never offer h2.
_ALPN = [b"http/1.1"]

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)

_SelectContext = Callable[[Connection], None]

# The private keys OpenSSL can sign a TLS handshake with (through pyOpenSSL).
TLSKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey \
    | dsa.DSAPrivateKey
_TLS_KEYS = (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey,
             dsa.DSAPrivateKey)


class CertificateDirectoryError(Exception):
    """The certificate directory gave nothing we can serve, at startup, where that must be fatal."""


@dataclass(frozen=True, eq=False)
class _Leaf:
    """A server certificate whose private key we have, ready to serve."""

    file: str
    certificate: x509.Certificate
    names: tuple[str, ...]
    context: Context


@dataclass(frozen=True)
class _Snapshot:
    """One complete reading of the directory; the store swaps whole snapshots, never parts."""

    fingerprint: Hashable
    contexts: Mapping[str, Context]
    default: Context | None
    served: tuple[_Leaf, ...]
    problems: tuple[tuple[str, str], ...]


@implementer(IOpenSSLServerConnectionCreator)
class CertificateStore:
    """Serves, by SNI name, the certificates found in one directory of PEM files.

    Each file may hold any mix of private keys and certificates (key + leaf +
    chain in one file, or `.crt`/`.key` pairs): keys are matched with
    certificates by public key, wherever they are.  A certificate we have the
    key for, and that is not a CA, is served for its SAN DNS names (its CN if
    it has no SANs); the other certificates are chain candidates, except
    self-signed roots, which clients must already have.  When two
    certificates claim a name, one valid now beats one that is not (expired,
    or not valid yet), then the one that expires last wins, so a renewed
    certificate can be dropped beside the old one.

    A client that sends no SNI name, or one we have no certificate for, gets
    the default: the first served certificate in file-name order that is
    valid now (the first served one if none is).  It then fails name
    verification, which is the honest outcome.

    The directory is read synchronously by the constructor, which is meant to
    run at startup before the reactor does; it raises
    L{CertificateDirectoryError} (naming the directory) if nothing there is
    usable.  Later reads go through L{reload}, off the reactor thread.
    """

    _active: _Snapshot
    _fingerprint: Hashable

    def __init__(self, directory: str | os.PathLike[str],
                 reactor: IReactorThreads | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor
            reactor = globalReactor  # type: ignore[assignment]
        assert reactor is not None
        self.directory = Path(directory)
        self._reactor = reactor
        self._lock = DeferredLock()
        snapshot = _load(self.directory, self._select)
        if snapshot.default is None:
            details = "; ".join(f"{file}: {why}" for file, why in snapshot.problems)
            raise CertificateDirectoryError(
                f"no usable certificate in {self.directory}" + (f" ({details})" if details else ""))
        self._install(snapshot)

    def names(self) -> list[str]:
        """The names served now (wildcards as `*.domain`), sorted."""
        return sorted(self._active.contexts)

    def check_expiry(self) -> None:
        """Warn about served certificates that have expired or expire within `EXPIRY_WARNING`
        (the watcher calls this once a day; every load does it too)."""
        directory = str(self.directory)
        for file, why in _validity_problems(self._active.served, datetime.now(timezone.utc)):
            log.warn("TLS certificates: {file} in {directory}: {why}", file=file, directory=directory, why=why)

    def lookup(self, servername: bytes | str | None) -> Context | None:
        """The context for an SNI name: exact match, else a wildcard one label deep, else None.

        Case and a trailing dot do not matter; `a.b.example` is not covered by
        `*.example`, as in RFC 6125 and every browser.
        """
        if not servername:
            return None
        if isinstance(servername, bytes):
            servername = servername.decode("ascii", "replace")
        name = servername.lower().rstrip(".")
        contexts = self._active.contexts
        found = contexts.get(name)
        if found is None and "." in name:
            found = contexts.get("*." + name.split(".", 1)[1])
        return found

    def serverConnectionForTLS(self, protocol: object) -> Connection:
        """Start every connection on the default context; the SNI callback may switch it."""
        default = self._active.default
        assert default is not None  # a snapshot without one is never installed
        return Connection(default, None)

    def reload(self) -> Deferred[bool]:
        """Re-read the directory off the reactor thread and serve what it holds from now on.

        Connections already established keep their certificate.  Fires with
        whether new contexts are in use; it never fails: a broken file is
        logged and skipped, and if nothing usable is left the previous
        certificates stay in service (and an error is logged).  Reloads are
        serialized, so a SIGHUP during a watcher's reload cannot install an
        older reading over a newer one.
        """
        return Deferred.fromCoroutine(self._reload())

    def reload_if_changed(self) -> Deferred[bool]:
        """Reload only if the names, sizes, mtimes or inodes of the files changed since the last
        reading (whether that reading was usable or not, so a broken directory is reported once,
        not on every poll).  The directory listing happens off the reactor thread too."""
        return Deferred.fromCoroutine(self._reload_if_changed())

    async def _reload(self) -> bool:
        async with self._lock:
            try:
                snapshot = await self._in_thread(_load, self.directory, self._select)
            except Exception:
                log.failure("reading certificates from {directory} failed", directory=str(self.directory))
                return False
            return self._install(snapshot)

    async def _reload_if_changed(self) -> bool:
        current = await self._in_thread(_fingerprint, self.directory)
        if current == self._fingerprint:
            return False
        return await self._reload()

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), f, *args)

    def _install(self, snapshot: _Snapshot) -> bool:
        """Runs on the reactor thread: the swap is one assignment, so no handshake sees a mix."""
        self._fingerprint = snapshot.fingerprint
        directory = str(self.directory)
        for file, why in snapshot.problems:
            log.warn("TLS certificates: {file} in {directory}: {why}", file=file, directory=directory, why=why)
        if snapshot.default is None:
            log.error("no usable certificate in {directory}; still serving {names}",
                      directory=directory, names=self.names())
            return False
        self._active = snapshot
        for leaf in snapshot.served:
            log.info("TLS: serving {names} from {file} (serial {serial:x}, expires {expires})",
                     names=list(leaf.names), file=leaf.file, serial=leaf.certificate.serial_number,
                     expires=leaf.certificate.not_valid_after_utc.isoformat())
        return True

    def _select(self, connection: Connection) -> None:
        """The SNI callback: a dict lookup, run inside every handshake; unknown names keep the default."""
        context = self.lookup(connection.get_servername())
        if context is not None:
            connection.set_context(context)


class CertificateWatcher(TimerService):
    """Polls a L{CertificateStore}'s directory and reloads it when it changed.

    Polling a handful of `stat()`s every few seconds is cheap and works for
    every way certificates arrive (certbot hooks, `kubectl cp`, a config
    management run) without inotify.  A failed poll is logged and the next
    one still happens.
    """

    def __init__(self, store: CertificateStore, interval: float = 10.0,
                 clock: IReactorTime | None = None) -> None:
        super().__init__(interval, self._check)
        self.clock = clock
        self._store = store
        self._next_expiry_check: float | None = None

    def _check(self) -> Deferred[bool | None]:
        """Reload if the directory changed; else, once a day after the last load, repeat the
        expiry warnings, so a certificate nearing its end in a long-running relay is noticed."""
        assert self.clock is not None  # TimerService.startService sets it
        now = self.clock.seconds()
        if self._next_expiry_check is None:
            self._next_expiry_check = now + 86400  # the store's first load has just warned

        def checked(reloaded: bool) -> bool:
            assert self._next_expiry_check is not None
            if reloaded:
                self._next_expiry_check = now + 86400
            elif now >= self._next_expiry_check:
                self._next_expiry_check = now + 86400
                self._store.check_expiry()
            return reloaded

        def failed(failure: Failure) -> None:
            log.failure("watching {directory} for certificate changes failed", failure,
                        directory=str(self._store.directory))

        return self._store.reload_if_changed().addCallback(checked).addErrback(failed)


@implementer(IStreamServerEndpoint)
class SNIServerEndpoint:
    """TLS with SNI from a L{CertificateStore}, over any stream server endpoint.

    `store` is exposed for what must reload it: the L{CertificateWatcher} and SIGHUP.
    """

    def __init__(self, store: CertificateStore, wrapped: IStreamServerEndpoint,
                 clock: IReactorTime | None = None) -> None:
        self.store = store
        self._tls = wrapServerTLS(store, wrapped, clock)

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        return self._tls.listen(factory)


def sni_endpoint(reactor: Any, directory: str = "", *args: str, **kwargs: str) -> SNIServerEndpoint:
    r"""The endpoint of `sni:<directory>[:<port>][:port=][:interface=][:backlog=][:reuseport=yes|no]`
    (the parser plugin's job).

    `reactor` must provide IReactorTCP and IReactorThreads.  The port defaults
    to 443, the interface to `::` (which on Linux also accepts IPv4), the
    backlog to 50.  `reuseport=yes` listens with `SO_REUSEPORT`
    (L{ReusePortEndpoint}), so that several relay processes serve one port.
    Escape `:` and `\` in values with a backslash, as in every Twisted
    endpoint string: `sni:C\:\\certs:443` for `C:\certs`, `interface=\:\:1`.

    The certificates are loaded right here, synchronously, so a directory with
    nothing usable fails startup with L{CertificateDirectoryError}; a malformed
    description raises ValueError saying what is wrong, before any file is read.
    """
    unknown = sorted(set(kwargs) - {"port", "interface", "backlog", "reuseport"})
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} in an sni: listener")
    if not directory or len(args) > 1:
        raise ValueError("expected sni:<directory>[:<port>] (or tls:<directory>[:<port>])")
    if args and "port" in kwargs:
        raise ValueError(f"port given twice in the sni: listener of {directory}")
    where = f"the sni: listener of {directory}"
    port = listen_port(args[0] if args else kwargs.get("port", "443"), where)
    backlog = listen_backlog(kwargs.get("backlog", "50"), where)
    interface = kwargs.get("interface", "::")
    reuseport = kwargs.get("reuseport", "no").lower()
    tcp: IStreamServerEndpoint
    if reuseport == "yes":
        tcp = ReusePortEndpoint(reactor, port, backlog, interface)
    elif reuseport == "no":
        tcp = (TCP6ServerEndpoint if ":" in interface else TCP4ServerEndpoint)(reactor, port, backlog, interface)
    else:
        raise ValueError(f"bad reuseport {kwargs['reuseport']!r} in {where}: expected yes or no")
    return SNIServerEndpoint(CertificateStore(directory, reactor), tcp, reactor)


def listen_description(description: str) -> str:
    """A relay `--listen` value for `serverFromString`: `tls:` is the relay's documented alias of
    `sni:` (the relay never uses Twisted's own `tls:`, for the defects above); the rest stay as they are."""
    prefix, colon, rest = description.partition(":")
    return "sni" + colon + rest if prefix.strip().lower() == "tls" else description


def _is_ours(filename: str) -> bool:
    """One rule for what is read and what is watched (Kubernetes' `tls.crt`/`tls.key` included)."""
    return os.path.splitext(filename)[1].lower() in _SUFFIXES


def _fingerprint(directory: Path) -> Hashable:
    """Names, sizes, mtimes and inodes of the files we read: cheap, and it changes on any rewrite,
    including an atomic rename of a file that has the same size and a preserved mtime."""
    try:
        with os.scandir(directory) as listing:
            entries = [entry for entry in listing if _is_ours(entry.name)]
    except OSError as e:
        return ("unreadable", str(e))
    seen = []
    for entry in entries:
        try:
            if entry.is_dir():
                continue
            stat = entry.stat()  # follows symlinks, so a swapped target counts as a change
        except OSError:
            seen.append((entry.name, -1, -1, -1))
        else:
            seen.append((entry.name, stat.st_size, stat.st_mtime_ns, stat.st_ino))
    return tuple(sorted(seen))


def _load(directory: Path, select: _SelectContext) -> _Snapshot:
    """Read the whole directory into a snapshot.  Runs in a worker thread, so it only collects
    problems; the reactor thread logs them."""
    now = datetime.now(timezone.utc)
    fingerprint = _fingerprint(directory)  # before reading: a change during the read shows next poll
    problems: list[tuple[str, str]] = []
    try:
        paths = sorted(p for p in directory.iterdir() if _is_ours(p.name) and not p.is_dir())
    except OSError as e:
        return _Snapshot(fingerprint, {}, None, (), ((str(directory), e.strerror or str(e)),))

    keys: dict[bytes, tuple[str, TLSKey]] = {}
    certificates: dict[x509.Certificate, str] = {}  # the first file each one is in, in file order
    for path in paths:
        try:
            file_keys, file_certificates = _read_pem(path)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
            problems.append((path.name, f"skipped: {e}"))
            continue
        for key in file_keys:
            keys.setdefault(_spki(key.public_key()), (path.name, key))
        for certificate in file_certificates:
            certificates.setdefault(certificate, path.name)

    # Only now that every file is read: a key, its certificate and the intermediates may be
    # spread over several files, in any order.
    pending: list[tuple[str, x509.Certificate, TLSKey]] = []
    intermediates: dict[x509.Name, list[x509.Certificate]] = {}
    for certificate, file in certificates.items():
        spki = _spki(certificate.public_key())
        if spki in keys and not _is_ca(certificate):
            pending.append((file, certificate, keys[spki][1]))
        elif certificate.issuer != certificate.subject:  # roots are never sent, nor followed
            intermediates.setdefault(certificate.subject, []).append(certificate)
    paired = {_spki(certificate.public_key()) for _, certificate, _ in pending}
    problems.extend((file, "private key without a matching server certificate")
                    for spki, (file, _) in keys.items() if spki not in paired)

    leaves: list[_Leaf] = []
    for file, certificate, key in pending:
        names = _dns_names(certificate)
        if not names:
            problems.append((file, f"certificate {certificate.serial_number:x} has no DNS name"))
            continue
        try:
            context = _server_context(certificate, key, _chain(certificate, intermediates), select)
        except (OpenSSLError, TypeError, ValueError) as e:
            problems.append((file, f"skipped: OpenSSL refused the key or certificate: {e}"))
            continue
        leaves.append(_Leaf(file, certificate, names, context))

    best: dict[str, _Leaf] = {}
    for leaf in leaves:
        for name in leaf.names:
            if name not in best or _rank(leaf, now) > _rank(best[name], now):
                best[name] = leaf
    winners = {id(leaf) for leaf in best.values()}
    served = tuple(leaf for leaf in leaves if id(leaf) in winners)
    default = next((leaf for leaf in served if _valid(leaf, now)), served[0] if served else None)
    problems.extend(_validity_problems(served, now))
    return _Snapshot(
        fingerprint=fingerprint,
        contexts={name: leaf.context for name, leaf in best.items()},
        default=default.context if default else None,
        served=served,
        problems=tuple(problems),
    )


def _valid(leaf: _Leaf, now: datetime) -> bool:
    return leaf.certificate.not_valid_before_utc <= now < leaf.certificate.not_valid_after_utc


def _rank(leaf: _Leaf, now: datetime) -> tuple[bool, datetime]:
    """Which of two certificates for a name to serve: the one valid now, then the later expiry."""
    return _valid(leaf, now), leaf.certificate.not_valid_after_utc


def _validity_problems(served: tuple[_Leaf, ...], now: datetime) -> list[tuple[str, str]]:
    """What to warn about the served certificates: expired, not valid yet, or expiring soon."""
    problems = []
    for leaf in served:
        certificate = leaf.certificate
        what = f"certificate {certificate.serial_number:x} for {', '.join(leaf.names)}"
        start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
        if end <= now:
            problems.append((leaf.file, f"{what} expired on {end:%Y-%m-%d %H:%M} UTC; it is served only "
                                        "because no valid certificate has its names: renew it"))
        elif start > now:
            problems.append((leaf.file, f"{what} is not valid before {start:%Y-%m-%d %H:%M} UTC; it is "
                                        "served only because no valid certificate has its names"))
        elif end - now <= EXPIRY_WARNING:
            problems.append((leaf.file, f"{what} expires on {end:%Y-%m-%d}, in {(end - now).days} days"))
    return problems


def _read_pem(path: Path) -> tuple[list[TLSKey], list[x509.Certificate]]:
    """Every key and certificate of one file; any unreadable part rejects the whole file, which
    is most likely being rewritten (the next poll sees it again)."""
    keys: list[TLSKey] = []
    certificates: list[x509.Certificate] = []
    for block in _PEM_BLOCK.finditer(_read_regular(path)):
        label = block[1]
        if label == b"CERTIFICATE":
            certificate = x509.load_pem_x509_certificate(block[0])
            certificate.extensions  # parsed lazily: a malformed extension must fail here
            certificates.append(certificate)
        elif label == b"ENCRYPTED PRIVATE KEY":
            raise ValueError("encrypted private keys are not supported")
        elif label.endswith(b"PRIVATE KEY"):
            key = load_pem_private_key(block[0], password=None)
            if not isinstance(key, _TLS_KEYS):
                raise ValueError(f"a {type(key).__name__} cannot sign TLS handshakes")
            keys.append(key)
    if not keys and not certificates:
        raise ValueError("no PEM certificate or private key in it")
    return keys, certificates


def _read_regular(path: Path) -> bytes:
    """The bytes of `path` if it is a regular file of at most `MAX_FILE` bytes (symlinks followed:
    certbot's `live/` files are links).  Opened non-blocking, so a FIFO's open() returns at once
    and fstat() says what it is before anything reads it."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise ValueError("not a regular file")
        data = f.read(MAX_FILE + 1) if status.st_size <= MAX_FILE else b""
    if status.st_size > MAX_FILE or len(data) > MAX_FILE:  # the second: it grew while we read
        raise ValueError(f"larger than {MAX_FILE >> 20} MiB")
    return data


def _spki(key: Any) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _is_ca(certificate: x509.Certificate) -> bool:
    """A CA certificate is never a server certificate, even if its key lies in the directory."""
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        found = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    else:
        found = san.get_values_for_type(x509.DNSName)
    names = (name.strip().lower().rstrip(".") for name in found)
    return tuple(dict.fromkeys(name for name in names if name))


def _chain(leaf: x509.Certificate,
           intermediates: Mapping[x509.Name, list[x509.Certificate]]) -> list[x509.Certificate]:
    """The intermediates from the leaf up, each checked to have signed the previous one.

    Roots are not among the candidates and no certificate is used twice, so
    the walk ends even on intermediates that cross-sign each other."""
    chain: list[x509.Certificate] = []
    current = leaf
    while True:
        issuer = next((candidate for candidate in intermediates.get(current.issuer, ())
                       if candidate not in chain and _issued_by(current, candidate)), None)
        if issuer is None:
            return chain
        chain.append(issuer)
        current = issuer


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _server_context(certificate: x509.Certificate, key: TLSKey,
                    chain: list[x509.Certificate], select: _SelectContext) -> Context:
    """Twisted's server defaults (TLS 1.2+, its cipher list, ECDH, no session cache) with our key
    material added as `cryptography` objects, since pyOpenSSL 26 deprecates the X509/PKey ones
    that CertificateOptions takes.  Every context gets the SNI callback: any may be the default."""
    context = CertificateOptions(raiseMinimumTo=TLSVersion.TLSv1_2, acceptableProtocols=_ALPN).getContext()
    context.use_certificate(certificate)
    context.use_privatekey(key)
    for extra in chain:
        context.add_extra_chain_cert(extra)
    context.check_privatekey()
    context.set_tlsext_servername_callback(select)
    return context
