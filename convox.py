#!/bin/sh
"""":
exec "${CONVOX_PYTHON:-python3}" -S -c '
import marshal, os, sys
zipped = sys.argv[0] != "-c"
if zipped:
    source = __loader__.archive
else:
    sys.argv.pop(0)
    source = os.path.realpath(sys.argv[0])
    sys.path[0] = os.path.dirname(source)
__file__ = sys.argv[0]
stat = os.stat(source)
folder = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "convox")
mine = "%x-%x-%x-" % (sys.hexversion, stat.st_dev, stat.st_ino)
cache = os.path.join(folder, mine + "%x-%x.code" % (stat.st_size, stat.st_mtime_ns))
try:
    with open(cache, "rb") as file:
        code = marshal.loads(file.read())
except Exception:
    with open(source, "rb") as file:
        text = __loader__.get_data(os.path.join(source, "convox.py")) if zipped else file.read()
    code = compile(text, __file__, "exec")
    try:
        os.makedirs(folder, 0o700, exist_ok=True)
        for name in os.listdir(folder):
            if name.startswith(mine):
                os.unlink(os.path.join(folder, name))
        new = "%s.%d" % (cache, os.getpid())
        with open(new, "wb") as file:
            marshal.dump(code, file)
        os.replace(new, cache)
    except OSError:
        pass
    del text
del marshal, zipped, source, stat, folder, mine, cache, file
exec(code)
' "$0" "$@"

convox.py -- Convox's one-off commands for any host with a Docker Engine API socket.

    convox ps                       list the app's processes
    convox exec TARGET COMMAND...   run a command in a running process
    convox run SERVICE COMMAND...   run a command in a new one-off process of a service
    convox logs [PID]               the app's logs, merged in time order, followed
    convox start [SERVICE...]       run the app locally from convox.yml or docker-compose.yml,
                                    syncing edited files into its running services
    convox start SERVICE COMMAND... run COMMAND in a new local process of SERVICE

One file, standard library only, CPython 3.6+.  It speaks the Docker Engine API itself
(``http.client`` over the engine's UNIX socket, TCP/TLS, or for ``ssh://`` racks a UNIX socket
that one ``ssh`` forwards from the server), so it works where there is a socket but no Docker
CLI.

Lifecycle of an attached session (``exec``; ``run`` differs only where noted)::

    POST /containers/ID/exec ........ create the exec (run: POST /containers/create,
         |                             then attach and POST .../wait before start)
    POST /exec/EID/start ............ Connection: Upgrade, Upgrade: tcp
         |  101 Switching Protocols    -- the socket is now a raw byte stream
         v
    pump <-----------------------+    stdin -> socket; socket -> stdout/stderr
     |  SIGWINCH (self-pipe) ----+--> POST /exec/EID/resize on the control connection
     |  detach keys ------------------> leave it running, status 0
     |  stdin EOF ----> shutdown(SHUT_WR) (TLS: close_notify), with a TTY ^D: the process sees EOF
     v
    socket EOF
    GET /exec/EID/json .............. ExitCode (polled briefly while still null)

Without a TTY the stream carries 8-byte frame headers ([stream, 0, 0, 0, size32]) that
``Demuxer`` splits back into stdout and stderr; with a TTY it is raw terminal bytes.

Sections, in the order of the data: Constants, Errors, Transport (where the engine is, its
socket), Engine API (thin methods returning dicts), Racks (what the verbs ask of a rack:
processes, the engine that runs one, one-offs, log streams; one engine, or a Swarm through
its manager and its nodes' engines), Streams (demux, pump, the logs
merge), Terminal (raw mode, size, signals), Apps and processes (labels, the one-off
template), Manifest, Sync (start's Dockerfile copies, context snapshots, uploads), Commands
(one function per verb), CLI.

The first lines are a launcher: run by name (``./convox.py``, ``convox`` on the PATH) the
file starts under /bin/sh, which execs python3 (``CONVOX_PYTHON`` names another) with a
loader that runs the code compiled once and kept in ``$XDG_CACHE_HOME/convox`` (default
``~/.cache/convox``), one file per Python version and version of this file; where nothing
can be written it compiles as ``python3 convox.py`` always does.  Python runs it with -S:
this file needs nothing from site-packages, whose .pth hooks can cost more than its own
start.  The loader is also a zipapp's ``__main__.py`` (README: Install): then it takes the
source from the archive and keys the cache on the archive.
"""

import signal

# Out of order, before the other imports: until main() takes over, Ctrl-C ends the process
# quietly, as it would a C program.  A KeyboardInterrupt while the modules below load
# (http.client and json take a while) would print a traceback.  A SIGINT that the
# shell set to be ignored (a background job) stays ignored.
_SIGINT_DEFERRED = (__name__ == "__main__" and
                    signal.getsignal(signal.SIGINT) is signal.default_int_handler)
if _SIGINT_DEFERRED:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import collections
import errno
import functools
import io
import json
import os
import posixpath
import re
import select
import socket
import stat
import struct
import sys
import time

# http.client imports ssl (a few ms and MiB at every start) only to offer HTTPSConnection.
# Only TLS racks need ssl, and they import it themselves (import_ssl), so it is hidden while
# http.client loads.
_SSL_HIDDEN = "ssl" not in sys.modules
if _SSL_HIDDEN:
    sys.modules["ssl"] = None  # `import ssl` raises ImportError: http.client goes without
try:
    import http.client
finally:
    if _SSL_HIDDEN:
        del sys.modules["ssl"]

__version__ = "0.1.0"
__all__ = [
    "main", "build_parser", "ConvoxError", "Engine", "Rack", "parse_rack", "resolve_rack",
    "Demuxer", "DetachMatcher", "pump", "humanize_since",
]


# ==========================================================================================
# Constants
# ==========================================================================================

#: Labels that carry a process's identity (SPEC §3), and the Compose labels read as fallback.
LABEL_APP = "convox.app"
LABEL_SERVICE = "convox.service"
LABEL_RELEASE = "convox.release"
LABEL_TYPE = "convox.type"
COMPOSE_PROJECT = "com.docker.compose.project"
COMPOSE_SERVICE = "com.docker.compose.service"
COMPOSE_ONEOFF = "com.docker.compose.oneoff"
#: `docker stack deploy` labels its services with the stack (the app, SPEC §3).
STACK_NAMESPACE = "com.docker.stack.namespace"
#: Marks the containers and the network that `convox start` made, so that it removes or
#: reuses nothing else (never put on images: a container run from one would inherit it).
LABEL_START = "convox.start"

#: The newest Engine API version this tool knows; the engine's own is used when lower.
API_VERSION_MAX = "1.45"

#: Where the engine is looked for when no rack is named (SPEC §2), in order.
DEFAULT_SOCKETS = (
    "/var/run/docker.sock",
    "${XDG_RUNTIME_DIR}/podman/podman.sock",
    "/run/podman/podman.sock",
)

#: Seconds a control request (anything but a stream or a build; for run's wait, the time
#: from the end of the stream) may take; CONVOX_TIMEOUT overrides it.
CONTROL_TIMEOUT = 60.0

#: Bytes read from a socket or a local fd at once.
CHUNK = 64 * 1024
#: Bytes of a stdin file given to sendfile(2) at once (the socket takes what it can).
SENDFILE_CHUNK = 1024 * 1024

#: The largest answer to a control request (``ps --all`` on a host with 10,000 containers
#: is about 30 MiB), and the largest error body read after a stream request.  Streams and
#: builds have no limit.
CONTROL_BODY_MAX = 64 * 1024 * 1024
ERROR_BODY_MAX = 64 * 1024

#: Pipelined inspects sent ahead of the answers read (Engine.inspect_many): 50 requests
#: are about 6 KB, far below what a socket holds; beyond one window of them, connections
#: that the engine serves in parallel (200 containers here: 83 -> 66 ms with 4).
PIPELINE_WINDOW = 50
PIPELINE_CONNECTIONS = 4

#: TCP keepalive on tcp:// and TLS racks (idle seconds, interval, probes): a stream or a
#: build may be quiet for hours, but an engine host that is gone is noticed in a minute.
KEEPALIVE = (30, 10, 3)

#: What a non-blocking stream raises when it has nothing now (over TLS, also half a record:
#: import_ssl adds ssl's errors).
WOULD_BLOCK = (BlockingIOError, InterruptedError)
#: What reading a stream raises when it has simply ended: a reset (over TLS also the
#: engine's close_notify after ours, see _close_notify).
STREAM_ENDED = (ConnectionResetError, ConnectionAbortedError)

#: Docker's default detach sequence: ctrl-p, ctrl-q.
DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"

#: Exit statuses of run and exec (SPEC §6).
STATUS_TIMEOUT = 124
STATUS_FAILED = 125
STATUS_NOT_EXECUTABLE = 126
STATUS_NOT_FOUND = 127

DEFAULT_RUN_TIMEOUT = 3600
#: The longest --timeout (68 years): beyond 9.2e9 s, select() and socket timeouts overflow.
MAX_RUN_TIMEOUT = 2 ** 31 - 1
STOP_GRACE = 10

#: Largest .convox/app (it holds a name) and largest manifest, .env or .dockerignore read.
APP_FILE_MAX = 1024
TEXT_FILE_MAX = 16 * 1024 * 1024


# ==========================================================================================
# Errors
# ==========================================================================================

class ConvoxError(Exception):
    """Root of every error this tool reports; ``main()`` prints it as one ``ERROR:`` line.

    ``status`` is the exit status when the error decides it (usage 2, timeout 124 ...);
    ``None`` lets the verb pick (1 for ps/start, 125 for run/exec).
    """
    status = None


class UsageError(ConvoxError):
    """The command line is wrong."""
    status = 2


class EngineUnavailable(ConvoxError):
    """The engine's socket or address cannot be reached."""


class EngineError(ConvoxError):
    """The engine answered with an HTTP error."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class NotFound(EngineError):
    """The engine answered 404."""


class StreamError(ConvoxError):
    """The attached stream broke, or carried something that is not the protocol."""


class ManifestError(ConvoxError):
    """A manifest or .env problem; the message starts with FILE:LINE when a line is known."""


class TimeoutExpired(ConvoxError):
    """A one-off process ran past its --timeout."""
    status = STATUS_TIMEOUT


# ==========================================================================================
# Transport
# ==========================================================================================

class SocketHTTPConnection(http.client.HTTPConnection):
    """HTTP over a socket that ``opener(timeout)`` returns connected: only ``connect()``
    differs from the base class (a UNIX socket, or one an ssh rack provides)."""

    def __init__(self, opener, timeout=None, host="localhost", port=None):
        super().__init__(host, port, timeout=timeout)
        self.opener = opener

    def connect(self):
        self.sock = self.opener(self.timeout)


def import_ssl():
    """The ssl module, imported on first use (TLS racks only); from then on the stream loop
    also takes ssl's would-block and closed errors for what they are."""
    global WOULD_BLOCK, STREAM_ENDED
    import ssl
    WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                   ssl.SSLWantWriteError)
    STREAM_ENDED = (ConnectionResetError, ConnectionAbortedError, ssl.SSLZeroReturnError)
    return ssl


def unix_socket(path, timeout):
    """A stream socket connected to the UNIX socket at ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def _time_left(sock, deadline):
    """Give the socket's next operation what is left until ``deadline`` (socket.timeout
    when nothing is): a timeout per operation would let an engine that sends one byte a
    second hold a request forever."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise socket.timeout("timed out")
    sock.settimeout(left)


class _DeadlineReader(io.RawIOBase):
    """The reading side of a socket, against a deadline: http.client reads a head line by
    line and a body in blocks, each of them as many recv() calls as it takes."""

    def __init__(self, raw, sock, deadline):
        super().__init__()
        self.raw, self.sock, self.deadline = raw, sock, deadline

    def readable(self):
        return True

    def readinto(self, buffer):
        _time_left(self.sock, self.deadline)
        return self.raw.readinto(buffer)

    def close(self):
        self.raw.close()  # the socket's makefile(): the socket closes once both let go
        super().close()


class _ControlResponse(http.client.HTTPResponse):
    """A response to a control request, read by the request's deadline."""

    def __init__(self, sock, *args, deadline, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline))


class _SharedReader:
    """One buffered reader of a connection for a run of pipelined answers: each
    ``HTTPResponse`` made on it reads its own part, and none closes it."""

    def __init__(self, reader):
        self.reader = reader

    def makefile(self, mode):
        return self

    def close(self):
        pass

    def __getattr__(self, name):
        return getattr(self.reader, name)


#: The longest status or header line read (http.client's _MAXLINE).
_MAX_LINE = 65536


def _read_exactly(reader, count):
    data = reader.read(count)
    if len(data) < count:
        raise http.client.IncompleteRead(data, count - len(data))
    return data


def _json_body(data, method, path):
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):  # RecursionError: nested 100,000 deep
        raise EngineError("the engine sent a response that is not JSON (or is nested too "
                          "deeply) for %s %s — check that the rack is a Docker Engine "
                          "API" % (method, path.split("?")[0]))


def _keep_alive(sock):
    """TCP keepalive with KEEPALIVE's timing on an internet socket (as the Docker CLI's
    dialer does), so that a quiet stream to a host that is gone ends."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in zip(("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT"), KEEPALIVE):
        if hasattr(socket, name):  # Linux; macOS has only TCP_KEEPINTVL and TCP_KEEPCNT
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class Rack:
    """Where the engine is: ``kind`` is ``unix``, ``tcp``, ``tls`` or ``ssh``; ``address`` a
    path, a ``(host, port)`` pair or, for ssh, ``(user, host, port, remote socket)``;
    ``url`` is what the user wrote, for messages."""

    def __init__(self, kind, address, url, cert_path=None, ssh_command=None, verify=True):
        self.kind = kind
        self.address = address
        self.url = url
        self.cert_path = cert_path
        self.ssh_command = ssh_command  # CONVOX_SSH_COMMAND, for ssh racks
        self._tunnel = None
        self.verify = verify  # TLS: check the engine's certificate against ca.pem

    def __repr__(self):
        return "Rack(%r, %r)" % (self.kind, self.address)

    def close(self):
        """End what reaching the engine took (an ssh rack's ssh and its socket)."""
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None

    def connection(self, timeout):
        """A new, not yet connected, ``http.client`` connection to the engine."""
        if self.kind == "unix":
            return SocketHTTPConnection(lambda t: unix_socket(self.address, t), timeout)
        if self.kind == "ssh":
            if self._tunnel is None:
                self._tunnel = SshTunnel(self)
            return SocketHTTPConnection(self._tunnel.socket, timeout)
        host, port = self.address
        if self.kind == "tcp":
            return http.client.HTTPConnection(host, port, timeout=timeout)
        context = self.tls_context()

        def tls_socket(timeout):
            sock = socket.create_connection((host, port), timeout)
            try:
                return context.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        return SocketHTTPConnection(tls_socket, timeout, host, port)

    def tls_context(self):
        """Client TLS as the Docker CLI does it, from DOCKER_CERT_PATH: the engine checked
        against ca.pem (unless ``verify`` is off), cert.pem and key.pem shown when there."""
        ssl = import_ssl()
        folder = os.path.expanduser(self.cert_path or "~/.docker")
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        try:
            if self.verify:
                context = ssl.create_default_context(cafile=os.path.join(folder, "ca.pem"))
                # Python 3.13 checks strictly by default (RFC 5280: a CA's key usage, key
                # identifiers), which certificates made as Docker's documentation shows fail;
                # the Docker CLI (Go's verifier) takes them.
                context.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
            else:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if os.path.exists(cert) or os.path.exists(key):
                context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise EngineUnavailable(
                "cannot load the TLS certificates in %s (%s) — set DOCKER_CERT_PATH to the "
                "folder with ca.pem, cert.pem and key.pem" % (folder, exc))
        return context


#: The far side's engine socket when an ssh:// rack names none (SPEC §2.1).
SSH_DEFAULT_SOCKET = "/var/run/docker.sock"

#: The python3 stdio bridge: stdin to the engine in a thread of its own (a single loop that
#: blocks writing one way while the other way fills up deadlocks), then a half-close; the
#: engine's output to stdout until the engine ends (so no output is lost at the end).
PYTHON_BRIDGE = """\
import os, socket, sys, threading
engine = socket.socket(socket.AF_UNIX)
engine.connect(sys.argv[1])
def upstream():
    try:
        for data in iter(lambda: os.read(0, 65536), b""):
            engine.sendall(data)
        engine.shutdown(socket.SHUT_WR)
    except OSError:
        pass
threading.Thread(target=upstream, daemon=True).start()
for data in iter(lambda: engine.recv(65536), b""):
    while data:
        data = data[os.write(1, data):]
os._exit(0)
"""


def ssh_bridge_command(path):
    """The far side's command that joins ssh's stdio to the engine socket at ``path``: the
    first of docker, socat, nc, python3 that it has (SPEC §2.1).  socat's default ``-t 0.5``
    drops output that comes after stdin's end, and nc passes that end on only with ``-N``.
    One line in ``sh -c``, so that a csh or fish login shell runs it too."""
    from shlex import quote
    sock = quote(path)
    bridges = [
        ("docker", "docker -H %s system dial-stdio" % quote("unix://" + path)),
        ("socat", "socat -t 86400 STDIO %s" % quote("UNIX-CONNECT:" + path)),
        ("nc", "nc -N -U %s" % sock),
        ("python3", "python3 -c %s %s" % (quote("exec(%r)" % PYTHON_BRIDGE), sock)),
    ]
    script = "[ -S %s ] || { echo no socket at %s >&2; exit 1; }; " % (sock, sock)
    for program, command in bridges:
        script += "%s command -v %s >/dev/null 2>&1; then exec %s; " % (
            "if" if program == "docker" else "elif", program, command)
    script += "else echo \"none of docker, socat, nc, python3 is installed\" >&2; exit 1; fi"
    return "sh -c " + quote(script)


class SshTunnel:
    """An ssh:// rack's engine socket, reached through one ``ssh`` per invocation.

    ``ssh`` runs as a ControlMaster with a stream-local forward of the far side's socket to
    ``engine.sock`` in a folder only we can open (0700), so that every connection is a plain
    UNIX connection and costs what it costs locally.  A server that refuses forwarding
    (``AllowStreamLocalForwarding no``) still lets the local end accept, then closes it: a
    probe tells, and each connection then runs a stdio bridge on the far side through the
    master instead (one end of a socketpair as its stdin and stdout).  ``ssh`` ignores the
    SIGINT and SIGHUP that convox handles (it keeps an ignored signal ignored), and a
    janitor process ends it and removes the folder should convox itself be killed.
    """

    def __init__(self, rack):
        from shlex import split
        self.rack = rack
        self.user, self.host, self.port, self.path = rack.address
        self.command = split(rack.ssh_command or "ssh")
        self.folder = self.master = self.janitor = None
        self.bridged = False
        self.bridges = []

    def destination(self):
        """ssh's options that name the far side, ``--`` before the host."""
        words = ["-p", str(self.port)] if self.port else []
        return words + (["-l", self.user] if self.user else []) + ["--", self.host]

    def hint(self):
        """The ssh command a user can try by hand."""
        from shlex import quote
        return " ".join(quote(word) for word in
                        self.command + self.destination()[:-2] + [self.host])

    def socket(self, timeout):
        """A new connection to the far side's engine socket (ssh starts on the first)."""
        if self.master is None:
            self.start(timeout)
        if self.bridged:
            return self.bridge(timeout)
        try:
            return unix_socket(os.path.join(self.folder, "engine.sock"), timeout)
        except OSError:
            if self.master.poll() is None:
                raise
            raise self.failure("ssh ended")  # the connection dropped, or ssh was killed

    def start(self, timeout):
        import tempfile
        self.folder = tempfile.mkdtemp(prefix="convox-ssh-")  # mode 0700
        local = os.path.join(self.folder, "engine.sock")
        control = os.path.join(self.folder, "ssh.ctl")
        self.master = self.spawn(
            ["-nNT", "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=yes",
             "-o", "ControlPersist=no", "-o", "ControlPath=" + control,
             "-L", "%s:%s" % (local, self.path)])
        self.janitor = _spawn_janitor(self.master.pid, self.folder)
        give_up = time.monotonic() + (timeout or CONTROL_TIMEOUT)
        while not (os.path.exists(local) and os.path.exists(control)):
            if self.master.poll() is not None:
                raise self.failure()
            if time.monotonic() > give_up:
                raise EngineUnavailable(
                    "ssh to %s did not connect within %g s — check that `%s` works from "
                    "here" % (self.host, timeout or CONTROL_TIMEOUT, self.hint()))
            time.sleep(0.005)
        while True:  # ssh binds, then listens: a connect in between is refused
            try:
                first = unix_socket(local, timeout)
                break
            except ConnectionRefusedError:
                if self.master.poll() is not None or time.monotonic() > give_up:
                    raise self.failure()
                time.sleep(0.002)
        if not self.answers(first):
            self.bridged = True  # forwarding refused, or no socket there: the bridge says
            if not self.answers(self.bridge(timeout)):
                self.wait_bridges()  # for its last words
                raise self.failure()

    def answers(self, sock):
        """Does an HTTP server answer on this fresh connection?"""
        try:
            sock.sendall(b"GET /_ping HTTP/1.1\r\nHost: engine\r\nConnection: close\r\n\r\n")
            head = b""
            while len(head) < 5:
                chunk = sock.recv(5 - len(head))
                if not chunk:
                    return False
                head += chunk
            return head == b"HTTP/"
        except OSError:
            return False
        finally:
            sock.close()

    def bridge(self, timeout):
        """A connection through a stdio bridge on the far side, over the master."""
        for proc in list(self.bridges):  # reap those that ended; in place, as another
            if proc.poll() is not None:  # thread (Swarm's task watcher) may append
                try:
                    self.bridges.remove(proc)
                except ValueError:
                    pass  # that thread was quicker
        ours, theirs = socket.socketpair()
        try:
            self.bridges.append(self.spawn(
                ["-T", "-o", "ControlMaster=no", "-o", "ControlPath=" +
                 os.path.join(self.folder, "ssh.ctl")],
                [ssh_bridge_command(self.path)], stdin=theirs, stdout=theirs))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(timeout)
        return ours

    def spawn(self, options, remote=(), stdin=None, stdout=None):
        """Start ssh with these options; its complaints go to ssh.log in the folder (a
        pipe nobody reads while a session runs would fill up and stall ssh)."""
        import subprocess
        argv = self.command + options + self.destination() + list(remote)
        null = subprocess.DEVNULL
        with open(os.path.join(self.folder, "ssh.log"), "ab") as log:
            try:
                return subprocess.Popen(argv, stdin=null if stdin is None else stdin,
                                        stdout=null if stdout is None else stdout,
                                        stderr=log, preexec_fn=_ssh_signals)
            except OSError as exc:
                raise EngineUnavailable(
                    "cannot run %s (%s) — install the OpenSSH client, or set "
                    "CONVOX_SSH_COMMAND" % (argv[0], exc.strerror or exc))

    def failure(self, what=None):
        """EngineUnavailable quoting ssh's (or the bridge's) last line of complaint."""
        try:
            with open(os.path.join(self.folder, "ssh.log"), "rb") as log:
                lines = log.read()[-4096:].decode("utf-8", "replace").splitlines()
        except OSError:
            lines = []
        lines = [printable(line).strip() for line in lines if line.strip()]
        reason = "; ".join(filter(None, [what, lines[-1] if lines else None])) or "ssh failed"
        return EngineUnavailable(
            "cannot reach the engine at %s over ssh (%s) — check that `%s` works from here "
            "and that the engine's socket is at %s there" % (
                self.rack.url, reason, self.hint(), self.path))

    def wait_bridges(self, patience=5.0):
        """Wait for the bridges' ssh to end; -> those still running."""
        give_up = time.monotonic() + patience
        while any(proc.poll() is None for proc in self.bridges) and \
                time.monotonic() < give_up:
            time.sleep(0.005)
        return [proc for proc in self.bridges if proc.poll() is None]

    def close(self):
        """End every ssh of this tunnel, remove the folder, let the janitor go."""
        procs = [proc for proc in self.bridges + [self.master] if proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        self.bridges = procs
        for proc in self.wait_bridges():
            proc.kill()
            proc.wait()
        if self.folder is not None:
            import shutil
            shutil.rmtree(self.folder, ignore_errors=True)
        if self.janitor is not None:
            pid, fd = self.janitor
            self.janitor = None
            try:
                os.write(fd, b"x")  # all done: nothing for it to do
            except OSError:
                pass  # it is gone already
            os.close(fd)
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _ssh_signals():
    """In ssh's child, before exec: Ctrl-C and a hang-up are convox's to handle (it passes
    them on to the process and cleans up over this very ssh); ssh keeps them ignored.  Not a
    process group of its own, as the Docker CLI gives its ssh: then ssh could not ask for a
    passphrase or a host key's confirmation on the terminal."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _spawn_janitor(ssh_pid, folder):
    """Fork a process that outlives a killed convox (SIGKILL) just long enough to end its
    ssh and remove its folder; -> (pid, the pipe that tells it all went well), or None when
    it cannot fork (then a killed convox leaves them)."""
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return None
    if pid:
        os.close(read_fd)
        return pid, write_fd
    try:
        os.setsid()
        _become_daemon(keep=read_fd)
        if not os.read(read_fd, 1):  # EOF without a word: convox is gone
            os.kill(ssh_pid, signal.SIGTERM)
            for _ in range(200):
                time.sleep(0.01)
                os.kill(ssh_pid, 0)  # raises once it is gone
    except BaseException:
        pass
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def parse_rack(url, environ=None):
    """Parse a rack URL: ``unix:///path``, ``/path``, ``tcp://host:port``."""
    environ = os.environ if environ is None else environ
    malformed = UsageError(
        "malformed rack URL %r — use unix:///path/to/docker.sock or tcp://host:port" % url)
    if "\0" in url:
        raise malformed  # no path or host has one; the socket calls would raise ValueError
    if url.startswith("/"):
        return Rack("unix", url, url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise malformed
    scheme = scheme.lower()
    if scheme == "unix":
        if not rest.startswith("/"):
            raise malformed
        return Rack("unix", rest, url)
    if scheme in ("tcp", "http", "https"):
        host, _, port = rest.rstrip("/").rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        # Docker's rule (docker/cli, cli/flags): DOCKER_TLS_VERIFY set to anything, "0" and
        # "false" too, means TLS that verifies the engine; DOCKER_TLS alone, TLS that doesn't.
        verify = environ.get("DOCKER_TLS_VERIFY", "") != ""
        tls = scheme == "https" or verify or environ.get("DOCKER_TLS", "") != ""
        if not _:
            host, port = port, "2376" if tls else "2375"
        # ASCII digits only ("²".isdigit() is true, int("²") fails); a host without
        # spaces, controls or stray brackets (http.client refuses those as it connects).
        if not re.match(r"[^\s/\[\]\x00-\x1f\x7f]+\Z", host) or \
                not re.match(r"[0-9]{1,5}\Z", port) or not 0 < int(port) < 65536:
            raise malformed
        return Rack("tls" if tls else "tcp", (host, int(port)), url,
                    cert_path=environ.get("DOCKER_CERT_PATH") or environ.get("DOCKER_CONFIG"),
                    verify=verify or not environ.get("DOCKER_TLS"))
    if scheme == "ssh":
        return _ssh_rack(url, environ)
    raise malformed


def _ssh_rack(url, environ):
    """``ssh://[user@]host[:port][/path/of/remote/socket]`` (SPEC §2.1)."""
    from urllib.parse import unquote, urlsplit

    def refused(why):
        return UsageError("rack URL %r %s — use ssh://[user@]host[:port][/path/to/engine.sock]"
                          % (url, why))
    try:
        parts = urlsplit("ssh://" + url.partition("://")[2])
    except ValueError:  # "Invalid IPv6 URL": a '[' without its ']'
        raise refused("is malformed")
    if parts.password is not None:
        raise refused("carries a password (ssh would never use it); ssh asks for one, "
                      "or use a key or ssh-agent")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise refused("has a query or a fragment")
    host = parts.hostname or ""
    if host.startswith("-"):
        raise refused("names a host that starts with '-'")
    try:
        port = parts.port
    except ValueError:
        port = -1
    path = unquote(parts.path) or SSH_DEFAULT_SOCKET
    if path == "/":
        path = SSH_DEFAULT_SOCKET
    if not re.match(r"[^\s/\[\]\x00-\x1f\x7f]+\Z", host) or port == -1 or port == 0 or \
            ":" in path or re.search(r"[\x00-\x1f\x7f]", path + (parts.username or "")):
        raise refused("is malformed")
    return Rack("ssh", (unquote(parts.username or "") or None, host, port, path), url,
                ssh_command=environ.get("CONVOX_SSH_COMMAND"))


def resolve_rack(option=None, environ=None, exists=os.path.exists):
    """Find the engine (SPEC §2): --rack, CONVOX_RACK, DOCKER_HOST, then default sockets."""
    environ = os.environ if environ is None else environ
    for url in (option, environ.get("CONVOX_RACK"), environ.get("DOCKER_HOST")):
        if url:
            return parse_rack(url, environ)
    candidates = []
    for path in DEFAULT_SOCKETS:
        if "${XDG_RUNTIME_DIR}" in path:
            if not environ.get("XDG_RUNTIME_DIR"):
                continue
            path = path.replace("${XDG_RUNTIME_DIR}", environ["XDG_RUNTIME_DIR"])
        candidates.append(path)
        if exists(path):
            return Rack("unix", path, "unix://" + path)
    return Rack("unix", candidates[0], "unix://" + candidates[0])


def unreachable(rack, exc):
    """Turn a connection failure into an error that says what to do."""
    where = rack.url
    if isinstance(exc, PermissionError):
        return EngineUnavailable(
            "permission denied on %s — run as root, or add your user to the group that owns "
            "the socket (usually: sudo usermod -aG docker $USER, then log in again)" % where)
    if isinstance(exc, socket.timeout):
        return EngineUnavailable(
            "the engine at %s did not answer in time — check that it is healthy" % where)
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError)) and rack.kind == "unix":
        return EngineUnavailable(
            "cannot reach the engine at %s (%s) — start dockerd, or point --rack, CONVOX_RACK "
            "or DOCKER_HOST at its socket" % (where, exc.strerror or exc))
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return EngineUnavailable(
        "cannot reach the engine at %s (%s) — check that it is running and that the rack "
        "URL is right" % (where, reason))


# ==========================================================================================
# Engine API
# ==========================================================================================

def _version_tuple(version):
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def negotiate_version(server_version, override=None):
    """The API version to speak: DOCKER_API_VERSION, else min(server's, the newest known)."""
    if override:
        return override
    if not re.match(r"[0-9]+\.[0-9]+\Z", server_version or ""):
        # No header (or one that is not a version, which would end up in every URL): the
        # engine predates the header; 1.24 is Docker 1.12's API.
        return "1.24"
    return min(server_version, API_VERSION_MAX, key=_version_tuple)


def control_timeout(environ):
    """Seconds a control request may take: CONVOX_TIMEOUT, else CONTROL_TIMEOUT."""
    text = environ.get("CONVOX_TIMEOUT")
    if not text:
        return CONTROL_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):  # NaN fails both comparisons
        raise UsageError("CONVOX_TIMEOUT must be a number of seconds above 0, not %r — "
                         "unset it for the default of %d" % (text, CONTROL_TIMEOUT))
    return seconds


def _error_message(body, status, reason):
    """The engine's message: JSON ``message`` when there is one, else the plain text; on
    one line and cut short, as a proxy's HTML error page would otherwise flood the terminal."""
    text = body.decode("utf-8", "replace").strip()
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError, RecursionError):
        message = None
    message = " ".join(str(message or text).split())
    if len(message) > 300:
        message = message[:300] + "..."
    return message or "%d %s" % (status, reason)


def _http_error(body, status, reason):
    """The typed error of an HTTP error answer: NotFound for 404, else EngineError."""
    error = NotFound if status == 404 else EngineError
    return error(_error_message(body, status, reason), status)


class Hijacked:
    """A raw stream taken over from an HTTP response (101 Switching Protocols)."""

    def __init__(self, sock, early, content_type):
        self.sock = sock
        self.early = early            # stream bytes that arrived with the headers
        self.content_type = content_type
        self.first_output = b""       # the start of the output, where engine errors show

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


class Engine:
    """A thin client of the Engine API: methods return decoded JSON.

    Control requests share one keep-alive connection; streams, waits and builds get their
    own.  ``connections`` counts the sockets opened, so that tests can check reuse.
    """

    def __init__(self, rack, environ=None):
        environ = os.environ if environ is None else environ
        self.rack = rack
        self.version = environ.get("DOCKER_API_VERSION") or None
        if self.version and not re.match(r"[0-9]+\.[0-9]+\Z", self.version):
            raise UsageError("DOCKER_API_VERSION must be an API version like 1.41, not %r — "
                             "unset it to negotiate one" % self.version)
        self.timeout = control_timeout(environ)
        self.connections = 0
        self.swarm = None  # the ping's Swarm header, where the engine sends one
        self._conn = None

    # -- plumbing --------------------------------------------------------------------------

    def connect(self, timeout):
        """A new connected HTTP connection; connection failures become EngineUnavailable."""
        conn = self.rack.connection(timeout)
        try:
            conn.connect()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            # ValueError: a host name that IDNA cannot encode (UnicodeError, a label over 63
            # characters), and ssl.CertificateError on Python 3.6.
            conn.close()
            raise unreachable(self.rack, exc)
        _keep_alive(conn.sock)
        self.connections += 1
        return conn

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def api_version(self):
        """Negotiate once per Engine: GET /_ping, header API-Version (SPEC §2)."""
        if self.version is None:
            response = self._roundtrip("GET", "/_ping", None, {}, self.timeout)
            self.version = negotiate_version(response[1].get("API-Version"))
            self.swarm = response[1].get("Swarm")
        return self.version

    def manages_swarm(self):
        """Is this engine a Swarm manager?  The ping's Swarm header says (API 1.42+, e.g.
        ``active/manager``); older engines answer GET /swarm only on a manager (503 on any
        other, 404 on Podman) -- a few ms, where /info takes tens."""
        self.api_version()
        if self.swarm is not None:
            return self.swarm.endswith("/manager")
        try:
            self.request("GET", "/swarm")
        except EngineError:
            return False
        return True

    def url(self, path, query=None):
        """The versioned URL of an API path, with a query string from a dict."""
        from urllib.parse import quote, urlencode
        # Paths carry words from the command line (IDs, names): quoted, a space, '?', '#' or
        # a non-ASCII word is a name the engine doesn't know, not a broken request.
        url = "/v%s%s" % (self.api_version(),
                          quote(path, safe="/:@", errors="surrogateescape"))
        if query:
            pairs = [(k, v) for k, v in query.items() if v is not None]
            pairs = [(k, json.dumps(v) if isinstance(v, dict) else
                      (str(v).lower() if isinstance(v, bool) else v)) for k, v in pairs]
            url += "?" + urlencode(pairs)
        return url

    def _roundtrip(self, method, url, body, headers, timeout):
        """One request on the keep-alive connection -> (status, headers, body bytes).

        ``timeout`` bounds the whole request, the body is at most CONTROL_BODY_MAX."""
        deadline = time.monotonic() + timeout
        for attempt in (1, 2):
            fresh = self._conn is None
            if fresh:
                self._conn = self.connect(timeout)
            conn = self._conn
            conn.response_class = functools.partial(_ControlResponse, deadline=deadline)
            try:
                _time_left(conn.sock, deadline)
                conn.request(method, url, body=body, headers=headers)
                response = conn.getresponse()
                data = self._read_control_body(response, method, url)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # An idle keep-alive connection the engine closed: the request never reached
                # it, so one retry on a new connection is safe.
                self.close()
                if fresh or attempt == 2:
                    raise StreamError("the engine closed the connection (%s) — check that "
                                      "it is healthy and try again" % exc)
                continue
            except (OSError, http.client.HTTPException) as exc:
                raise self._failure(exc, method, url, timeout)
            except BaseException:
                # Ctrl-C mid-request: the connection is half-way through an exchange, so
                # the clean-up requests that follow must not reuse it.
                self.close()
                raise
            if response.will_close:
                self.close()
            return response.status, response.headers, data

    def _failure(self, exc, method, url, timeout):
        """Close the connection that ``exc`` broke; -> the error to raise."""
        self.close()
        if isinstance(exc, socket.timeout):
            return EngineUnavailable(
                "the engine at %s did not answer %s %s within %g s — check that it is "
                "healthy" % (self.rack.url, method, url.split("?")[0], timeout))
        return unreachable(self.rack, exc)

    def inspect_many(self, idents, window=None, connections=None):
        """-> {ident: its inspect, or None when it is gone}.  The GETs go out together on
        keep-alive connections and the engine answers them in order (HTTP/1.1 pipelining,
        RFC 9112 §9.3.2), so ``ps`` of 200 containers waits about one round trip, not 200.
        They go in windows of PIPELINE_WINDOW: beyond one window, the windows take turns
        over up to PIPELINE_CONNECTIONS connections, which the engine serves in parallel
        (it answers one connection's requests one after the other), and each connection
        has at most two windows unanswered -- all at once, the requests of a few thousand
        containers would fill the socket while the engine waits for us to read its
        answers.  CONVOX_TIMEOUT bounds the whole exchange."""
        if len(idents) < 2:
            return {ident: self._inspect_or_none(ident) for ident in idents}
        urls = [self.url("/containers/%s/json" % ident) for ident in idents]
        if self._conn is None:
            self._conn = self.connect(self.timeout)
        deadline = time.monotonic() + self.timeout
        window = window or PIPELINE_WINDOW
        windows = [range(start, min(start + window, len(urls)))
                   for start in range(0, len(urls), window)]
        conns = [self._conn]
        found = {}
        try:
            if self.rack.kind != "ssh":  # an ssh rack's connection costs a round trip
                while len(conns) < min(len(windows), connections or PIPELINE_CONNECTIONS):
                    conns.append(self.connect(max(0.0, deadline - time.monotonic())))
            heads = ["GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (url, self._conn.host)
                     for url in urls]
            readers = []
            for conn in conns:
                _time_left(conn.sock, deadline)
                readers.append(_SharedReader(io.BufferedReader(_DeadlineReader(
                    conn.sock.makefile("rb", buffering=0), conn.sock, deadline))))

            def send(number):
                if number < len(windows):
                    sock = conns[number % len(conns)].sock
                    sock.sendall("".join(heads[i] for i in windows[number]).encode("utf-8"))

            for number in range(2 * len(conns)):
                send(number)
            for number, indexes in enumerate(windows):
                for index in indexes:
                    ident, url = idents[index], urls[index]
                    status, data, closes = self._answer(readers[number % len(conns)], url)
                    if status == 404:
                        found[ident] = None
                    elif status >= 300:
                        raise _http_error(data, status, "")
                    else:
                        found[ident] = _json_body(data, "GET", url)
                    if number % len(conns) == 0:
                        will_close = closes
                send(number + 2 * len(conns))
        except (OSError, http.client.HTTPException) as exc:
            raise self._failure(exc, "GET", urls[len(found)], self.timeout)
        except BaseException:
            self.close()  # answers may be left unread on it
            raise
        finally:
            for conn in conns[1:]:
                conn.close()
        if will_close:
            self.close()
        return found

    def _answer(self, reader, url):
        """One answer to a pipelined GET -> (status, body, the connection closes after it).
        HTTP/1.1's framing read directly (RFC 9112 §6), with http.client's limits and
        errors: its parser goes through the email package, 110 µs an answer against 40."""
        while True:
            line = reader.readline(_MAX_LINE + 1)
            if not line:
                raise http.client.RemoteDisconnected("no answer")
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                raise http.client.BadStatusLine(repr(line[:80]))
            status, headers = int(parts[1]), {}
            for count in range(101):
                line = reader.readline(_MAX_LINE + 1)
                if len(line) > _MAX_LINE:
                    raise http.client.LineTooLong("header line")
                if line in (b"\r\n", b"\n", b""):
                    break
                if count == 100:
                    raise http.client.HTTPException("got more than 100 headers")
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip().lower()
            if status >= 200:
                break  # 1xx: an interim answer, the real one follows
        closes = headers.get(b"connection") == b"close" or (
            parts[0] == b"HTTP/1.0" and headers.get(b"connection") != b"keep-alive")
        chunks, size = [], 0
        if status in (204, 304):
            return status, b"", closes
        try:
            if headers.get(b"transfer-encoding") == b"chunked":
                while True:
                    length = int(reader.readline(_MAX_LINE + 1).split(b";", 1)[0], 16)
                    if length < 0:
                        raise ValueError(length)
                    if not length:
                        while reader.readline(_MAX_LINE + 1) not in (b"\r\n", b"\n", b""):
                            pass  # trailer fields
                        return status, b"".join(chunks), closes
                    size += length
                    if size > CONTROL_BODY_MAX:
                        break
                    chunks.append(_read_exactly(reader, length))
                    _read_exactly(reader, 2)  # CRLF
            elif b"content-length" in headers:
                length = int(headers[b"content-length"])
                if 0 <= length <= CONTROL_BODY_MAX:
                    return status, _read_exactly(reader, length), closes
            else:  # the body ends with the connection
                while size <= CONTROL_BODY_MAX:
                    chunk = reader.read1(CHUNK)
                    if not chunk:
                        return status, b"".join(chunks), True
                    chunks.append(chunk)
                    size += len(chunk)
        except ValueError:  # a malformed size or length
            raise http.client.IncompleteRead(b"".join(chunks))
        raise EngineError("the engine at %s answered GET %s with more than %d MiB — check that "
                          "the rack is a Docker Engine API" % (
                              self.rack.url, url.split("?")[0], CONTROL_BODY_MAX >> 20))

    def _inspect_or_none(self, ident):
        try:
            return self.inspect(ident)
        except NotFound:
            return None

    def _read_control_body(self, response, method, url):
        """The body of a response read whole; EngineError beyond CONTROL_BODY_MAX (an engine
        that announces 10 GB, or never ends, is not one to read into memory)."""
        chunks, size = [], 0
        while size <= CONTROL_BODY_MAX and (response.length or 0) <= CONTROL_BODY_MAX:
            chunk = response.read(CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
        raise EngineError("the engine at %s answered %s %s with more than %d MiB — check that "
                          "the rack is a Docker Engine API" % (
                              self.rack.url, method, url.split("?")[0], CONTROL_BODY_MAX >> 20))

    def request(self, method, path, query=None, body=None, timeout=None):
        """Send a control request; return its decoded JSON (or None); raise on HTTP errors."""
        timeout = self.timeout if timeout is None else timeout
        headers = {}
        if body is not None:
            body = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        status, response_headers, data = self._roundtrip(
            method, self.url(path, query), body, headers, timeout)
        if status >= 400:
            raise _http_error(data, status, "")
        if status >= 300 and status != 304:  # 304: already started, already stopped
            raise EngineError(
                "the engine at %s answered %d %s to %s %s (to %s) — point the rack at the "
                "engine itself, not at something that redirects" % (
                    self.rack.url, status, http.client.responses.get(status, ""), method,
                    path, response_headers.get("Location") or "nowhere"), status)
        if not data:
            return None
        if "json" not in (response_headers.get("Content-Type") or "json"):
            return data.decode("utf-8", "replace")
        return _json_body(data, method, path)

    def hijack(self, path, body=None, query=None):
        """POST with ``Upgrade: tcp`` and take over the socket once the engine answers 101.

        ``http.client`` would read ahead into its buffer, so the response head is read here
        byte-exactly from the socket and whatever follows it is handed back as ``early``.
        """
        conn = self.connect(self.timeout)
        # No body unless one is asked for: the engine reads the hijacked connection from its
        # start, so a body nobody parses (attach's) would reach the process as its stdin.
        payload = b"" if body is None else json.dumps(body).encode("utf-8")
        conn.putrequest("POST", self.url(path, query), skip_accept_encoding=True)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
        conn.putheader("Connection", "Upgrade")
        conn.putheader("Upgrade", "tcp")
        conn.putheader("Content-Length", str(len(payload)))
        sock = conn.sock
        try:
            conn.endheaders(payload)
            head, rest = _read_head(sock, time.monotonic() + self.timeout)
        except socket.timeout:
            sock.close()
            raise EngineUnavailable("the engine did not answer the stream request for %s "
                                    "within %g s — check that it is healthy"
                                    % (path, self.timeout))
        except OSError as exc:
            sock.close()
            raise StreamError("the engine closed the stream before it started (%s) — try "
                              "again" % (exc.strerror or exc))
        conn.sock = None  # the socket is ours now; conn.close() must not close it
        try:
            status, reason, headers = _parse_head(head)
        except StreamError:
            sock.close()
            raise
        content_type = headers.get("Content-Type", "")
        if status >= 400:
            data = _read_body(sock, rest, headers)
            sock.close()
            raise _http_error(data, status, reason)
        if status != 101 and not (status == 200 and "vnd.docker" in content_type):
            sock.close()
            raise StreamError("the engine answered %d %s instead of switching protocols — "
                              "is the rack a Docker Engine API?" % (status, reason))
        sock.settimeout(None)  # a timeout on a quiet stream would look like its end
        return Hijacked(sock, rest, content_type)

    def send_only(self, method, path, query=None):
        """Send a request on its own connection and return it unread (for long waits)."""
        conn = self.connect(self.timeout)
        try:
            conn.request(method, self.url(path, query), body=b"")
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise unreachable(self.rack, exc)
        return conn

    def stream(self, path, query=None):
        """GET an endless answer (logs, events) -> Hijacked whose socket carries its body.

        Asked as HTTP/1.0, so that the engine sends the body as it is, up to the close,
        without HTTP/1.1's chunk framing to undo around every log line.
        """
        conn = self.connect(self.timeout)
        sock, conn.sock = conn.sock, None
        try:
            sock.sendall(("GET %s HTTP/1.0\r\nHost: docker\r\n\r\n" %
                          self.url(path, query)).encode("ascii"))
            head, rest = _read_head(sock, time.monotonic() + self.timeout)
            status, reason, headers = _parse_head(head)
        except socket.timeout:
            sock.close()
            raise EngineUnavailable("the engine did not answer GET %s within %g s — check "
                                    "that it is healthy" % (path, self.timeout))
        except OSError as exc:
            sock.close()
            raise unreachable(self.rack, exc)
        except StreamError:
            sock.close()
            raise
        if status >= 400:
            data = _read_body(sock, rest, headers)
            sock.close()
            raise _http_error(data, status, reason)
        if "chunked" in (headers.get("Transfer-Encoding") or ""):
            sock.close()
            raise StreamError("the engine answered an HTTP/1.0 request for %s in chunks — is "
                              "the rack a Docker Engine API?" % path)
        sock.settimeout(None)  # a quiet stream is no dead one
        return Hijacked(sock, rest, headers.get("Content-Type", ""))

    # -- containers ------------------------------------------------------------------------

    def containers(self, all=True, filters=None):
        query = {"all": "1" if all else "0"}
        if filters:
            query["filters"] = filters
        return self.request("GET", "/containers/json", query)

    def inspect(self, ident):
        return self.request("GET", "/containers/%s/json" % ident)

    def create_container(self, config, name=None):
        return self.request("POST", "/containers/create", {"name": name}, config)

    def start(self, ident):
        return self.request("POST", "/containers/%s/start" % ident)

    def stop(self, ident, grace=STOP_GRACE):
        """SIGTERM, ``grace`` seconds, SIGKILL (304, already stopped, is no error here)."""
        return self.request("POST", "/containers/%s/stop" % ident, {"t": grace},
                            timeout=grace + self.timeout)

    def kill(self, ident, signal_name="KILL"):
        return self.request("POST", "/containers/%s/kill" % ident, {"signal": signal_name})

    def remove(self, ident, force=True, missing_ok=True, patience=10.0):
        """Remove a container; a missing one is fine, and one already being removed (by
        AutoRemove) is waited for, up to ``patience`` seconds: gone means gone on return,
        as after ``docker run --rm``."""
        try:
            return self.request("DELETE", "/containers/%s" % ident,
                                {"force": "1" if force else "0", "v": "0"})
        except EngineError as exc:
            in_progress = exc.code == 409 and "in progress" in str(exc)
            if not (missing_ok and (exc.code == 404 or in_progress)):
                raise
            if not in_progress:
                return None
        give_up = time.monotonic() + patience
        while time.monotonic() < give_up:
            time.sleep(0.02)
            try:
                self.inspect(ident)
            except NotFound:
                break
        return None

    def resize(self, kind, ident, rows, cols):
        return self.request("POST", "/%s/%s/resize" % (kind, ident), {"h": rows, "w": cols})

    def connect_network(self, network, ident, aliases=None):
        body = {"Container": ident, "EndpointConfig": {"Aliases": aliases or None}}
        return self.request("POST", "/networks/%s/connect" % network, body=body)

    def put_archive(self, ident, path, data):
        """Unpack the tar ``data`` into a container at ``path`` (PUT /containers/ID/archive)."""
        status, _, body = self._roundtrip(
            "PUT", self.url("/containers/%s/archive" % ident, {"path": path}), data,
            {"Content-Type": "application/x-tar"}, self.timeout)
        if status >= 400:
            raise _http_error(body, status, "")

    def get_archive(self, ident, path):
        """A tar of ``path`` in a container (GET /containers/ID/archive)."""
        status, _, body = self._roundtrip(
            "GET", self.url("/containers/%s/archive" % ident, {"path": path}), None, {},
            self.timeout)
        if status >= 400:
            raise _http_error(body, status, "")
        return body

    # -- images ----------------------------------------------------------------------------

    def build(self, context_chunks, query):
        """POST /build with a tar context sent in chunks; yield the engine's JSON messages.

        Raises EngineError with the engine's message when the build fails.
        """
        conn = self.connect(timeout=None)
        try:
            conn.request("POST", self.url("/build", query), body=iter(context_chunks),
                         headers={"Content-Type": "application/x-tar"}, encode_chunked=True)
            response = conn.getresponse()
            if response.status >= 400:
                raise EngineError(_error_message(response.read(ERROR_BODY_MAX),
                                                 response.status, response.reason),
                                  response.status)
            for message in _json_messages(response):
                if message.get("error"):
                    raise EngineError(str(message.get("error")).strip())
                yield message
        except (OSError, http.client.HTTPException) as exc:
            raise StreamError("the build stream from the engine broke (%s)" % exc)
        finally:
            conn.close()

    # -- exec ------------------------------------------------------------------------------

    def exec_create(self, ident, config):
        return self.request("POST", "/containers/%s/exec" % ident, body=config)

    def exec_inspect(self, exec_id):
        return self.request("GET", "/exec/%s/json" % exec_id)


def _json_messages(response):
    """The JSON objects of a stream of them: one a line from Docker; one over several lines
    is read on until it parses, tried again each time the text doubled (so that hostile
    input costs linear time), and none may be longer than CONTROL_BODY_MAX."""
    decoder, buffered, retry_at = json.JSONDecoder(), "", 0
    while True:
        line = response.readline(CONTROL_BODY_MAX)
        buffered += line.decode("utf-8", "replace")
        if len(buffered) > CONTROL_BODY_MAX:
            raise EngineError("the engine sent a message of more than %d MiB — check that "
                              "the rack is a Docker Engine API" % (CONTROL_BODY_MAX >> 20))
        while buffered and not buffered.isspace() and (len(buffered) >= retry_at or not line):
            try:
                message, end = decoder.raw_decode(buffered.lstrip())
            except ValueError:
                retry_at = 2 * len(buffered)
                break
            except RecursionError:
                raise StreamError("the engine sent a message nested too deeply")
            buffered, retry_at = buffered.lstrip()[end:], 0
            if isinstance(message, dict):
                yield message
        if not line:
            return


def _read_head(sock, deadline):
    """Read an HTTP response head from a socket by ``deadline``; return (head bytes, the
    bytes after it)."""
    data, end = bytearray(), -1
    while end < 0:
        _time_left(sock, deadline)
        chunk = sock.recv(CHUNK)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed")
        data += chunk
        end = data.find(b"\r\n\r\n", max(0, len(data) - len(chunk) - 3))
        if end < 0 and len(data) > 1024 * 1024:
            raise ConnectionResetError(errno.EPROTO, "response head too long")
    return bytes(data[:end]), bytes(data[end + 4:])


def _parse_head(head):
    """Status line and headers of a response head -> (status, reason, headers)."""
    import email.parser
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise StreamError("the engine sent a malformed response (%r) — is the rack a Docker "
                          "Engine API?" % status_line[:60])
    headers = email.parser.Parser(_class=http.client.HTTPMessage).parsestr(
        header_block.decode("latin-1") + "\r\n\r\n")
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


def _read_body(sock, rest, headers):
    """The rest of an error body after a response head: what comes within 5 s, at most
    ERROR_BODY_MAX bytes (only its start is shown)."""
    length = headers.get("Content-Length")
    data, deadline = bytearray(rest), time.monotonic() + 5
    try:
        limit = min(ERROR_BODY_MAX, ERROR_BODY_MAX if length is None else int(length))
        while len(data) < limit:
            _time_left(sock, deadline)
            chunk = sock.recv(CHUNK)
            if not chunk:
                break
            data += chunk
    except (OSError, ValueError):
        pass
    data = bytes(data[:ERROR_BODY_MAX])
    if "chunked" in (headers.get("Transfer-Encoding") or ""):
        data = _dechunk(data)
    return data


def _dechunk(data):
    out = b""
    while data:
        size, _, data = data.partition(b"\r\n")
        try:
            size = int(size.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


# ==========================================================================================
# Racks
# ==========================================================================================
#
# What the verbs ask of a rack -- the app's processes, the one exec enters, the engine that
# runs a process, a new one-off, a process's logs and the processes that start -- so that
# no verb asks what kind of rack it runs on.
# EngineRack is the rack of a single engine (Docker or Podman); SwarmRack gives the same
# methods for a Swarm, read through a manager (SPEC §10): processes are tasks, each reached
# through its node's engine; a one-off is a Swarm service of its own.  (``Rack``, under
# Transport, is only where the engine is.)

class EngineRack:
    """The apps on one engine.  Each app's containers are listed once, through label
    filters (the engine may hold thousands of others); every container only when an error
    must name the apps."""

    #: Process fields that ps shows after NAME, and that ps info adds (none here).
    COLUMNS = ()
    DETAILS = ()

    def __init__(self, engine):
        self.engine = engine
        self._summaries = {}  # app -> its container summaries, newest first
        self._all = None

    # -- listing ---------------------------------------------------------------------------

    def summaries(self, app, service=None, running_only=False):
        """Container summaries of an app (Convox labels or Compose's), optionally of one
        service and running ones only."""
        if app not in self._summaries:
            # Two small answers filtered by the engine instead of the list of every container.
            found = {}
            for app_label in (LABEL_APP, COMPOSE_PROJECT):
                filters = {"label": ["%s=%s" % (app_label, app)]}
                for summary in self.engine.containers(all=True, filters=filters):
                    found[summary["Id"]] = summary
            self._summaries[app] = list(found.values())
        found = []
        for summary in self._summaries[app]:
            c_app, c_service, _, _ = identity(summary.get("Labels"))
            if c_app != app or (service is not None and c_service != service):
                continue
            if running_only and summary.get("State") != "running":
                continue
            found.append(summary)
        return found

    def processes(self, app, service=None, all=False):
        """The app's processes (running ones unless ``all``), inspected together over the
        one keep-alive connection."""
        found = self.engine.inspect_many(
            [summary["Id"] for summary in self.summaries(app, service, running_only=not all)])
        # None: removed between the list and the inspect
        return [Process(info) for info in found.values() if info is not None]

    def apps(self):
        """Names of every app that has a process here."""
        if self._all is None:
            self._all = self.engine.containers(all=True)
        return sorted({identity(c.get("Labels"))[0] for c in self._all} - {""})

    def services(self, app):
        return sorted({identity(c.get("Labels"))[1] for c in self.summaries(app)} - {""})

    def require_app(self, app, inferred):
        """Raise a helpful error when nothing carries this app's name."""
        if not self.summaries(app):
            raise no_app_error(app, inferred, self.apps())

    # -- choosing a process ----------------------------------------------------------------

    def find(self, app, ident):
        """A process by ID, ID prefix or name, checked to be one of ``app``'s."""
        try:
            process = Process(self.engine.inspect(ident))
        except NotFound:
            raise ConvoxError("no such process: %s (app %s) — see convox ps" % (ident, app))
        if process.app != app:
            owner = ('it belongs to app "%s"' % process.app) if process.app else \
                "it belongs to no app"
            raise ConvoxError("process %s is not part of app %s (%s) — use -a APP" %
                              (ident, app, owner))
        return process

    def target(self, app, target):
        """exec's TARGET (SPEC §5): a container by ID, ID prefix or name, else the app's
        service TARGET's service process that has run longest (never a one-off), so that
        repeated execs land in the same process.  The container is looked up first: an ID
        then costs no list."""
        try:
            info = self.engine.inspect(target)
        except EngineError as exc:
            if exc.code not in (400, 404):  # 400: a prefix that several IDs share
                raise
            info = None
        state = (info or {}).get("State") or {}
        exact = info is not None and target in (info["Id"], (info.get("Name") or "")[1:])
        if info is not None and state.get("Running") and (exact or target not in
                                                          self.services(app)) and \
                identity((info.get("Config") or {}).get("Labels"))[0] == app:
            return Process(info)  # (a service named like an ID prefix, "db", wins)
        running = [Process(self.engine.inspect(s["Id"])) for s in
                   self.summaries(app, target, running_only=True)
                   if identity(s.get("Labels"))[3] == "service"]
        if running:
            return min(running, key=lambda p: (parse_timestamp(p.started) or 0, p.id))
        if info is not None and state.get("Running"):
            return Process(info)  # a container of another app (or of none), named exactly
        services = self.services(app)
        if target in services:
            raise ConvoxError("service %s of app %s has no running service process (a "
                              "one-off is never chosen) — see convox ps --all, or give "
                              "a process ID" % (target, app))
        if info is None:
            raise ConvoxError("no such process or service: %s (app %s)%s — see convox ps" %
                              (target, app, "; services: " + ", ".join(services)
                               if services else ""))
        raise ConvoxError("process %s is not running (%s) — see convox ps --all" %
                          (target, status_text(info.get("State") or {})))

    def engine_for(self, process):
        """The engine that runs ``process`` (None: the one new one-offs are made on)."""
        return self.engine

    # -- one-offs --------------------------------------------------------------------------

    def template(self, app, service):
        """Inspect of the container a one-off of ``service`` copies: the newest running one
        of the service, else its newest of any state (services before earlier one-offs);
        None when the service has no container."""
        candidates = self.summaries(app, service)
        if not candidates:
            return None
        services = [s for s in candidates if identity(s.get("Labels"))[3] == "service"]
        pool = services or candidates
        running = [s for s in pool if s.get("State") == "running"]
        return self.engine.inspect(newest(running or pool)["Id"])

    def release_image(self, app, service, release):
        """The image of release R of a service: from any container of it, or a labelled
        image (the images `start` builds)."""
        for summary in self.summaries(app, service):
            if identity(summary.get("Labels"))[2] == release:
                return summary["ImageID"] if summary.get("ImageID") else summary["Image"]
        image = newest_image(self.engine, app, service, release)
        if image:
            return image
        known = sorted({identity(s.get("Labels"))[2] for s in self.summaries(app, service)}
                       - {""})
        raise ConvoxError("no such release: %s (app %s, service %s)%s — see convox ps --all"
                          % (release, app, service,
                             "; releases: " + ", ".join(known) if known else ""))

    def one_off(self, config, name, networks):
        """Create a one-off process (``one_off_config``'s body and extra networks) on
        ``engine_for(None)``, not started; -> its container ID."""
        container = self.engine.create_container(config, name)["Id"]
        for network in networks:
            self.engine.connect_network(network, container)
        return container

    def run(self, ctx, template, command, *, app, service, image=None, release=None,
            entrypoint=True, node_labels=(), resources=None):
        """Run a one-off process of ``service`` from ``template`` (see ``run_one_off``)."""
        if node_labels:
            raise UsageError("--node-labels places a one-off on Swarm nodes, and %s is a "
                             "single engine — leave it out, or point --rack at a Swarm "
                             "manager" % self.engine.rack.url)
        return run_one_off(ctx, template, command, app=app, service=service, image=image,
                           release=release, entrypoint=entrypoint, resources=resources)

    # -- logs (SPEC §9) --------------------------------------------------------------------

    def log_stream(self, process, query):
        """A process's log stream (GET /containers/ID/logs) -> Hijacked."""
        return self.engine_for(process).stream("/containers/%s/logs" % process.id, query)

    def refresh(self, process):
        """The process as it is now; None when it is gone."""
        try:
            return Process(self.engine_for(process).inspect(process.id))
        except NotFound:
            return None

    def starts(self, since=None):
        """The engine's events as they come, from ``since`` (an event's ``time``): JSON
        lines, of which ``started`` picks the processes that start."""
        query = {"filters": {"type": ["container"], "event": ["start"]}, "since": since}
        return self.engine.stream("/events", query)

    def started(self, event, app):
        """The process of ``app`` that an event says started, or None."""
        actor = event.get("Actor") or {}
        ident = actor.get("ID") or event.get("id")
        if not ident or identity(actor.get("Attributes"))[0] != app:
            return None
        try:
            return Process(self.engine.inspect(ident))
        except NotFound:
            return None  # gone again already

    def close(self):
        """End what the rack opened besides its engine (on one engine: nothing)."""

    def stop(self, process):
        """Stop a process (10 s grace); a one-off is removed too."""
        self.engine.stop(process.id)
        if process.type == "process":
            self.engine.remove(process.id)


def open_rack(engine, environ):
    """The rack of an engine: a Swarm rack when it manages a Swarm, else the single
    engine's own."""
    if engine.manages_swarm():
        return SwarmRack(engine, environ)
    return EngineRack(engine)


def no_app_error(app, inferred, names):
    where = " (from the current directory)" if inferred else ""
    here = ("apps here: %s" % ", ".join(names)) if names else "no apps here"
    return ConvoxError('no processes for app "%s"%s; %s — use -a APP' % (app, where, here))


# -- Swarm (SPEC §10) -----------------------------------------------------------------------

class SwarmRack(EngineRack):
    """The apps of a Swarm, read through a manager: their processes are the tasks of their
    services, and each task is reached through the engine of its node (SPEC §10)."""

    COLUMNS = ("node",)
    DETAILS = ("node", "task")

    def __init__(self, engine, environ):
        super().__init__(engine)
        self.environ = environ
        self._node_id = None
        self._services = {}
        self._nodes = None
        self._node_engines = {}
        self._image_configs = {}

    # -- listing ---------------------------------------------------------------------------

    @property
    def node_id(self):
        """The manager's own node (GET /info): its tasks need no other engine."""
        if self._node_id is None:
            info = self.engine.request("GET", "/info") or {}
            self._node_id = (info.get("Swarm") or {}).get("NodeID") or ""
        return self._node_id

    def app_services(self, app):
        """{ID: service} of an app: labelled by Convox, or deployed as a stack named APP."""
        if app not in self._services:
            found = {}
            for label in (LABEL_APP, STACK_NAMESPACE):
                query = {"filters": {"label": ["%s=%s" % (label, app)]}}
                for service in self.engine.request("GET", "/services", query) or []:
                    if service_identity(service["Spec"])[0] == app:
                        found[service["ID"]] = service
            self._services[app] = found
        return self._services[app]

    def nodes(self):
        if self._nodes is None:
            self._nodes = {n["ID"]: n for n in self.engine.request("GET", "/nodes") or []}
        return self._nodes

    def processes(self, app, service=None, all=False):
        """The tasks of the app's services: unless ``all``, those meant to run (a one-off
        job's while it runs)."""
        services = {ident: s for ident, s in self.app_services(app).items()
                    if service is None or service_identity(s["Spec"])[1] == service}
        if not services:
            return []
        filters = {"service": sorted(services)}
        if not all:
            filters["desired-state"] = LIVE_TASKS
        nodes = self.nodes()
        return [Task(task, services[task["ServiceID"]], nodes.get(task.get("NodeID")),
                     self.command(services[task["ServiceID"]]))
                for task in self.engine.request("GET", "/tasks", {"filters": filters}) or []
                if task.get("ServiceID") in services and (all or live_task(task))]

    def command(self, service):
        """A service's command as its tasks run it: its Command (the image's ENTRYPOINT
        where it has none) and Args (else the image's CMD)."""
        spec = service["Spec"]["TaskTemplate"].get("ContainerSpec") or {}
        command, args = spec.get("Command") or [], spec.get("Args")
        if not command or args is None:
            image = self.image_config(spec.get("Image") or "")
            command = command or image.get("Entrypoint") or []
            args = image.get("Cmd") or [] if args is None else args
        return list(command) + list(args)

    def image_config(self, image, engine=None):
        """The Config of an image, from the manager (or ``engine``); {} where it is absent."""
        key = (image, id(engine))
        if key not in self._image_configs:
            try:
                info = (engine or self.engine).request("GET", "/images/%s/json" % image)
            except EngineError:
                info = {}
            self._image_configs[key] = (info or {}).get("Config") or {}
        return self._image_configs[key]

    def apps(self):
        services = self.engine.request("GET", "/services") or []
        return sorted({service_identity(s["Spec"])[0] for s in services} - {""})

    def services(self, app):
        return sorted({service_identity(s["Spec"])[1] for s in self.app_services(app).values()
                       if service_identity(s["Spec"])[3] == "service"} - {""})

    def require_app(self, app, inferred):
        if not self.app_services(app):
            raise no_app_error(app, inferred, self.apps())

    # -- choosing a process ----------------------------------------------------------------

    def find(self, app, ident):
        """A task of the app by container ID (prefix) or task ID (prefix)."""
        found = [t for t in self.processes(app, all=True) if t.matches(ident)]
        if found:
            return min(found, key=lambda t: (t.id != ident and t.task != ident, t.id))
        for task in self.engine.request("GET", "/tasks") or []:
            container = (task["Status"].get("ContainerStatus") or {}).get("ContainerID", "")
            if ident and (container.startswith(ident) or task["ID"].startswith(ident)):
                try:
                    owner = service_identity(self.engine.request(
                        "GET", "/services/%s" % task["ServiceID"])["Spec"])[0]
                except NotFound:
                    break
                raise ConvoxError("process %s is not part of app %s (%s) — use -a APP" % (
                    ident, app, 'it belongs to app "%s"' % owner if owner
                    else "it belongs to no app"))
        raise ConvoxError("no such process: %s (app %s) — see convox ps" % (ident, app))

    def target(self, app, target):
        """exec's TARGET: a running task by container or task ID (prefix), else the task of
        the app's service TARGET that has run longest (so that repeated execs meet)."""
        running = [t for t in self.processes(app) if t.running]
        by_id = [t for t in running if t.matches(target)]
        if by_id:
            return by_id[0]
        of_service = [t for t in running if t.service == target and t.type == "service"]
        if of_service:
            return min(of_service, key=lambda t: (t.started or "", t.id))
        known = [t for t in self.processes(app, all=True) if t.matches(target)]
        if known:
            raise ConvoxError("process %s is not running (%s) — see convox ps --all" %
                              (target, known[0].status))
        services = self.services(app)
        raise ConvoxError("no such process or service: %s (app %s)%s — see convox ps" %
                          (target, app, "; services: " + ", ".join(services)
                           if services else ""))

    def engine_for(self, process):
        """The engine of the process's node: the rack's own on the manager's node, else
        CONVOX_NODE_RACK (or the rack's URL) with the node filled in."""
        node_id = getattr(process, "node_id", self.node_id)
        if node_id == self.node_id:
            return self.engine
        if node_id not in self._node_engines:
            self._node_engines[node_id] = self.node_engine(self.nodes().get(node_id) or {})
        return self._node_engines[node_id]

    def node_engine(self, node):
        hostname = (node.get("Description") or {}).get("Hostname") or node.get("ID", "?")
        url = node_rack_url(self.environ.get("CONVOX_NODE_RACK") or
                            node_rack_template(self.engine.rack.url), node)
        try:
            engine = Engine(parse_rack(url, self.environ), self.environ)
            if engine.version is None:
                engine.api_version()  # GET /_ping: reachable, and the API version settled
            else:
                engine.request("GET", "/_ping")
        except ConvoxError as exc:
            what, _, todo = str(exc).partition(" — ")
            raise EngineUnavailable(
                "node %s: %s — %s%sset CONVOX_NODE_RACK to a rack URL that reaches every node "
                "(e.g. ssh://USER@{addr})" % (hostname, what, todo, "; or " if todo else ""))
        return engine

    def close(self):
        for engine in self._node_engines.values():
            engine.close()
            engine.rack.close()

    # -- logs ------------------------------------------------------------------------------

    def log_stream(self, process, query):
        """A task's log stream, through the manager (GET /tasks/ID/logs): no node needed."""
        return self.engine.stream("/tasks/%s/logs" % process.task, query)

    def task(self, ident, app=None):
        """A task as it is now (of ``app``, when given); None when it is gone (or not)."""
        try:
            task = self.engine.request("GET", "/tasks/%s" % ident)
            service = self.engine.request("GET", "/services/%s" % task["ServiceID"])
        except NotFound:
            return None
        if app is not None and service_identity(service["Spec"])[0] != app:
            return None
        return Task(task, service, self.nodes().get(task.get("NodeID")),
                    self.command(service))

    def refresh(self, process):
        return self.task(process.task)

    def starts(self, since=None):
        """Tasks as they start: Swarm has no events for tasks, so TaskStarts asks."""
        return TaskStarts(self.engine)

    def started(self, event, app):
        return self.task(event["Actor"]["ID"], app)

    def stop(self, process):
        """Stop the task's container through its node: Swarm replaces a service's task; a
        one-off's service is removed."""
        if process.type == "process":
            self.remove_service(process.service_id)
        else:
            self.engine_for(process).stop(process.id)

    def remove_service(self, ident):
        try:
            self.engine.request("DELETE", "/services/%s" % ident)
        except NotFound:
            pass

    # -- one-offs --------------------------------------------------------------------------

    def template(self, app, service):
        """The newest Swarm service of that name (its spec is what a one-off copies)."""
        found = [s for s in self.app_services(app).values()
                 if service_identity(s["Spec"])[1:4:2] == (service, "service")]
        return max(found, key=lambda s: s.get("CreatedAt") or "", default=None)

    def release_image(self, app, service, release):
        images = [s["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"]
                  for s in self.app_services(app).values()
                  if service_identity(s["Spec"])[1:3] == (service, release)]
        if images:
            return images[0]
        known = sorted({service_identity(s["Spec"])[2] for s in
                        self.app_services(app).values()} - {""})
        raise ConvoxError("no such release: %s (app %s, service %s)%s — see convox ps --all"
                          % (release, app, service,
                             "; releases: " + ", ".join(known) if known else ""))

    def run(self, ctx, template, command, *, app, service, image=None, release=None,
            entrypoint=True, node_labels=(), resources=None):
        """A one-off as a Swarm service of its own, cloned from the service's.

        Detached, the task runs COMMAND and stays, with its output, until ``ps stop``.
        Attached (Convox's own design), the task holds for the timeout, and COMMAND is
        executed in it through its node's engine: the exec gives a TTY, stdin's end and the
        exact status, which a Swarm task's own stream cannot (Swarm sets StdinOnce=false);
        and the deadline holds on the cluster however the client ends.
        """
        if "Spec" not in template:  # a service of the manifest: a local one-off
            return super().run(ctx, template, command, app=app, service=service,
                               image=image, release=release, entrypoint=entrypoint,
                               resources=resources)
        import contextlib
        args = ctx.args
        detach = bool(args.detach)
        timeout = DEFAULT_RUN_TIMEOUT if args.timeout is None else args.timeout
        spec = swarm_one_off_spec(
            template["Spec"], command if detach else ["sleep", str(
                timeout + HOLD_MARGIN if timeout else 2 ** 31 - 1)],
            name=_container_name(app, service), app=app, service=service, image=image,
            release=release, env=local_env(args.env, ctx.environ) if detach else (),
            resources=resources,
            entrypoint=entrypoint and detach, node_labels=node_labels,
            job=_version_tuple(self.engine.api_version()) >= (1, 41))
        with contextlib.ExitStack() as cleanup:
            pending = cleanup.enter_context(SignalPipe(
                [getattr(signal, n) for n in SESSION_SIGNALS]))
            ident = self.engine.request("POST", "/services/create", body=spec)["ID"]
            keep = []
            cleanup.callback(lambda: keep or _quietly(self.remove_service, ident))
            if not detach and timeout:
                spawn_watchdog(self.engine, "service:" + ident, timeout + HOLD_MARGIN,
                               ctx.environ)
            task = self.one_off_task(ident)
            if detach:
                keep.append(True)
                ctx.out("Running detached process... OK, %s\n" % task.id[:12])
                return 0
            if pending.fd is not None and set(_drain_signals(pending.fd)) - {signal.SIGWINCH}:
                raise KeyboardInterrupt  # a signal before the command: never run it
            engine = self.engine_for(task)
            prefix = []
            if entrypoint:
                container = template["Spec"]["TaskTemplate"].get("ContainerSpec") or {}
                prefix = container.get("Command") or self.image_config(
                    task.image, engine).get("Entrypoint") or []
            forwarded = []

            def forward(signum):  # a second of the same signal kills, as on one engine
                forwarded.append(signum)
                name = "KILL" if forwarded.count(signum) > 1 else \
                    signal.Signals(signum).name[3:]
                _quietly(signal_command, engine, task.id, name)

            status = exec_session(ctx, engine, task.id, list(prefix) + command,
                                  env=local_env(args.env, ctx.environ),
                                  tty=ctx.stdio.wants_tty(args.tty),
                                  deadline=time.monotonic() + timeout if timeout else None,
                                  signal_pipe=pending, forward=forward)
            if status == "timeout":
                raise TimeoutExpired("timeout after %d seconds" % timeout)
            if status == "detached":
                keep.append(True)  # it runs on until its deadline (the watchdog's too)
                return 0
            return status

    def one_off_task(self, service_id, patience=60.0):
        """The one-off's task once it has a container (or the reason it cannot start)."""
        give_up = time.monotonic() + patience
        service = self.engine.request("GET", "/services/%s" % service_id)
        while True:
            for task in self.engine.request("GET", "/tasks", {"filters": {
                    "service": [service_id]}}) or []:
                status = task.get("Status") or {}
                if (status.get("ContainerStatus") or {}).get("ContainerID") and \
                        status.get("State") in ("running", "complete", "failed", "shutdown"):
                    return Task(task, service, self.nodes().get(task.get("NodeID")), [])
                if "no suitable node" in (status.get("Err") or ""):
                    raise ConvoxError("no node can run the one-off: %s — check --node-labels "
                                      "against the nodes' labels (docker node inspect)"
                                      % status["Err"])
                if status.get("State") in ("rejected", "failed"):
                    raise _start_failure(EngineError("the one-off could not start: %s" % (
                        status.get("Err") or status.get("Message") or status["State"])))
            if time.monotonic() > give_up:
                raise ConvoxError("the one-off did not start within %g s — see docker "
                                  "service ps %s" % (patience, service_id))
            time.sleep(0.05)


#: The desired states of the tasks that may be running: a job's task is meant to complete.
LIVE_TASKS = ["running", "complete"]


def live_task(task):
    """Is the task meant to run, or (a job's) running?"""
    return task.get("DesiredState") == "running" or task["Status"].get("State") == "running"


class TaskStarts:
    """The start events of a Swarm's tasks, which Swarm does not send: a thread asks the
    manager for the running tasks twice a second and writes an event line, as the engine's
    /events would, for each task it had not seen running.  Read like an event stream:
    ``sock``, ``early``, ``close()``."""

    INTERVAL = 0.5

    def __init__(self, engine):
        import threading
        self.engine = Engine(engine.rack, {"DOCKER_API_VERSION": engine.api_version()})
        self.sock, self._out = socket.socketpair()
        self.early = b""
        self._stopped = threading.Event()
        self._seen = {task["ID"] for task in self._running()}  # the follower lists these
        threading.Thread(target=self._watch, daemon=True).start()

    def _running(self):
        return self.engine.request("GET", "/tasks", {"filters": {
            "desired-state": LIVE_TASKS}}) or []

    def _watch(self):
        try:
            while not self._stopped.wait(self.INTERVAL):
                for task in self._running():
                    if task["ID"] not in self._seen and \
                            task["Status"].get("State") == "running":
                        self._seen.add(task["ID"])
                        self._out.sendall(json.dumps({
                            "Type": "task", "Action": "start", "Actor": {"ID": task["ID"]},
                            "timeNano": int(time.time() * 1e9)}).encode("utf-8") + b"\n")
        except (ConvoxError, OSError):
            pass  # the manager went away: the follower sees the end of this stream
        finally:
            self._out.close()
            self.engine.close()

    def close(self):
        self._stopped.set()  # the thread ends within INTERVAL, closing its end and engine
        self.sock.close()


#: Sends signal $1 to the command a Swarm one-off executes in its task: every process there
#: but the task's init (PID 1), the ``sleep`` that holds the task (a child of PID 1) and
#: this shell; as a terminal's Ctrl-C reaches the whole foreground job.  Builtins only.
SIGNAL_SCRIPT = (
    'for d in /proc/[0-9]*; do p=${d#/proc/}; { [ "$p" = 1 ] || [ "$p" = $$ ]; } && '
    'continue; read -r s < "$d/stat" || continue; s=${s##*) }; set -- $s; '
    '[ "$2" = 1 ] || kill -"$SIG" "$p"; done')


def signal_command(engine, container, name):
    """Signal the command executed in a Swarm one-off's task (SIGNAL_SCRIPT), at once."""
    exec_id = engine.exec_create(container, {"Cmd": ["sh", "-c", SIGNAL_SCRIPT],
                                             "Env": ["SIG=" + name]})["Id"]
    engine.request("POST", "/exec/%s/start" % exec_id, body={"Detach": True, "Tty": False})


#: Seconds an attached Swarm one-off's task holds beyond the timeout, so that the client's
#: own deadline (and its 124) comes first.
HOLD_MARGIN = 5


def node_rack_template(url):
    """CONVOX_NODE_RACK's default: the rack's scheme, user, port and path with the host
    replaced by {addr} for ssh:// and tcp:// racks; ssh://{addr} for a UNIX-socket rack."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("tcp", "http", "https", "ssh"):
        return "ssh://{addr}"
    netloc, slash, path = rest.partition("/")
    user, at, host_port = netloc.rpartition("@")
    port = re.search(r":[0-9]+\Z", host_port)
    return "%s://%s%s{addr}%s%s%s" % (scheme, user, at, port.group() if port else "",
                                     slash, path)


def node_rack_url(template, node):
    """A node's rack URL: {addr}, {hostname} and {id} filled in from the node."""
    fields = {"{addr}": (node.get("Status") or {}).get("Addr") or "",
              "{hostname}": (node.get("Description") or {}).get("Hostname") or "",
              "{id}": node.get("ID") or ""}
    return re.sub(r"\{(?:addr|hostname|id)\}", lambda m: fields[m.group()], template)


#: run's resource flags on a Swarm task: (Resources key, field, unit) (SPEC §6, §10).
SWARM_RESOURCES = {
    "cpu": ("Reservations", "NanoCPUs", 1000000),
    "cpu_limit": ("Limits", "NanoCPUs", 1000000),
    "memory": ("Reservations", "MemoryBytes", 1024 * 1024),
    "memory_limit": ("Limits", "MemoryBytes", 1024 * 1024),
}


def swarm_one_off_spec(spec, command, *, name, app, service, image=None, release=None,
                       env=(), resources=None, entrypoint=True, node_labels=(), job=True):
    """The create body of a one-off Swarm service cloned from a service's spec (SPEC §10):
    its task template (image, env, mounts, networks without aliases, resources, placement)
    with COMMAND, the node labels as constraints, no restarts, no ports."""
    import copy
    task = copy.deepcopy(spec.get("TaskTemplate") or {})
    container = task.setdefault("ContainerSpec", {})
    labels = {LABEL_APP: app, LABEL_SERVICE: service,
              LABEL_RELEASE: release or service_identity(spec)[2], LABEL_TYPE: "process"}
    container["Labels"] = dict(container.get("Labels") or {}, **labels)
    if image:
        container["Image"] = image
    container["Env"] = merge_env(container.get("Env") or [], env)
    if entrypoint:
        container["Args"] = command  # the ENTRYPOINT (Command, or the image's) stays
    else:
        container["Command"], container["Args"] = command, []
    container["Init"] = True
    container["Healthcheck"] = {"Test": ["NONE"]}
    container.pop("StopSignal", None)
    for flag, value in (resources or {}).items():  # requests reserve, limits limit
        if value is not None:
            kind, field, scale = SWARM_RESOURCES[flag]
            task.setdefault("Resources", {}).setdefault(kind, {})[field] = value * scale
    task["RestartPolicy"] = {"Condition": "none", "MaxAttempts": 0}
    task["Networks"] = [dict(n, Aliases=None) for n in task.get("Networks") or
                        spec.get("Networks") or []] or None
    placement = task.setdefault("Placement", {})
    placement["Constraints"] = list(placement.get("Constraints") or []) + [
        "node.labels.%s==%s" % pair for pair in node_labels]
    task["ForceUpdate"] = 0
    mode = {"ReplicatedJob": {"MaxConcurrent": 1, "TotalCompletions": 1}} if job else \
        {"Replicated": {"Replicas": 1}}
    return {"Name": name, "Labels": dict(spec.get("Labels") or {}, **labels),
            "TaskTemplate": task, "Mode": mode, "EndpointSpec": {"Mode": "dnsrr"}}


# ==========================================================================================
# Streams
# ==========================================================================================

#: A frame header as two big-endian words: [stream, 0, 0, 0] and the payload's size.
_FRAME_HEAD = struct.Struct(">LL")
#: The first word of a valid header -> the fd index it names (0, stdin echo, is stdout).
_FRAME_STREAMS = {0: 1, 1 << 24: 1, 2 << 24: 2, 3 << 24: 3}


class Demuxer:
    """Split Docker's multiplexed stream ([stream, 0, 0, 0] + size32 + payload) incrementally.

    ``feed(data)`` returns ``[(fd_index, bytes), ...]`` with 1 = stdout, 2 = stderr; frames
    may be split anywhere across calls.  Stream 0 (stdin echo) goes to stdout as in Docker's
    stdcopy; stream 3 carries an engine error; anything else is a protocol error.  With
    ``whole=True`` each payload is one whole frame (a log entry, whose end means something),
    held back until its last byte has come.
    """

    def __init__(self, whole=False):
        self.whole = whole
        self._pending = bytearray()   # header bytes so far, or the held frame's payload
        self._stream = None
        self._left = 0
        self._copy = True

    def feed(self, data, copy=True):
        """-> [(fd_index, payload)]; with copy=False the payloads are views into ``data``,
        valid until ``data`` changes (the pump writes them out at once)."""
        out = []
        self._copy = copy
        try:
            return self._split(data, out)
        except StreamError as exc:
            # The frames before the fault are the process's output all the same: the
            # caller writes them out before it reports the error (never lose output).
            exc.output = out
            raise

    def _split(self, data, out):
        view = memoryview(data)
        pos, end = 0, len(view)
        # Whole frames, one after another, are the common case (a log's are ~100 bytes):
        # taken in a tight loop, straight from ``data`` when copies are asked for anyway.
        source = data if self._copy and isinstance(data, bytes) else view
        copy = self._copy and source is view
        unpack_from, streams, append = _FRAME_HEAD.unpack_from, _FRAME_STREAMS, out.append
        while pos < end:
            if not (self._left or self._pending):
                while end - pos >= 8:
                    head, size = unpack_from(view, pos)
                    stream = streams.get(head)
                    if stream is None or stream == 3 or size > end - pos - 8:
                        break
                    start, pos = pos + 8, pos + 8 + size
                    if size:
                        append((stream, bytes(source[start:pos]) if copy else
                                source[start:pos]))
                if pos == end:
                    break
            if self._left:
                piece = view[pos:pos + self._left]
                pos += len(piece)
                self._left -= len(piece)
                if self._stream != 3 and not self.whole:
                    out.append((self._stream, bytes(piece) if self._copy else piece))
                    continue
                self._pending += piece
                if not self._left:
                    payload, self._pending = bytes(self._pending), bytearray()
                    self._frame(self._stream, payload, out)
                continue
            if self._pending or end - pos < 8:
                need = 8 - len(self._pending)
                self._pending += view[pos:pos + need]
                pos += need
                if len(self._pending) < 8:
                    break
                head, size = _FRAME_HEAD.unpack(self._pending)
                self._pending = bytearray()
            else:
                head, size = _FRAME_HEAD.unpack_from(view, pos)
                pos += 8
            stream = _FRAME_STREAMS.get(head)
            if stream is None:
                raise StreamError("the engine sent a malformed stream frame header %r — the "
                                  "output is incomplete" % _FRAME_HEAD.pack(head, size))
            if size <= end - pos:  # the whole frame is here: the common case
                piece = view[pos:pos + size]
                pos += size
                self._frame(stream, bytes(piece) if self._copy else piece, out)
            else:
                self._stream, self._left = stream, size
        return out

    def _frame(self, stream, payload, out):
        if stream == 3:
            raise StreamError("the engine reported: %s" % bytes(payload).decode(
                "utf-8", "replace").strip())
        if payload:
            out.append((stream, payload))

    def partial(self):
        """True when the stream stopped inside a frame."""
        return bool(self._pending) or self._left > 0


def parse_detach_keys(spec):
    """Docker's --detach-keys format ("ctrl-p,ctrl-q", "ctrl-@", "a") -> bytes."""
    keys = bytearray()
    for part in spec.split(","):
        part = part.strip()
        if len(part) == 1 and ord(part) < 128:  # one ASCII key; "é" is no single byte
            keys.append(ord(part))
            continue
        name = part.lower()
        if not name.startswith("ctrl-") or len(name) != 6:
            raise UsageError("invalid detach keys %r — use a comma-separated list like "
                             "ctrl-p,ctrl-q (a-z, @, [, \\, ], ^, _ after ctrl-)" % spec)
        char = name[5]
        if "a" <= char <= "z":
            keys.append(ord(char) - ord("a") + 1)
        elif char in "@[\\]^_":
            keys.append("@[\\]^_".index(char) + (0 if char == "@" else 26))
        else:
            raise UsageError("invalid detach keys %r — ctrl- takes a-z, @, [, \\, ], ^ or _"
                             % spec)
    return bytes(keys)


class DetachMatcher:
    """Find the detach sequence in keystrokes that may arrive split across reads.

    A possible start of the sequence is held back until it is complete (detach) or broken
    (the held bytes are sent after all), as Docker's own proxy does.
    """

    def __init__(self, keys):
        self.keys = keys
        self._held = b""

    def feed(self, data):
        """-> (bytes to send now, True when the sequence is complete)."""
        if not self.keys:
            return data, False
        out = bytearray()
        for byte in bytearray(data):
            candidate = self._held + bytes((byte,))
            if self.keys.startswith(candidate):
                if candidate == self.keys:
                    return bytes(out), True
                self._held = candidate
                continue
            # A broken prefix: flush it, but its tail may start a new match.
            out += self._held
            self._held = b""
            if self.keys.startswith(bytes((byte,))):
                self._held = bytes((byte,))
                if self._held == self.keys:
                    return bytes(out), True
            else:
                out.append(byte)
        return bytes(out), False


def _write_all(fd, data):
    view = memoryview(data)
    while len(view):
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


def _half_close(sock):
    """Tell the engine there is no more input: Docker's CloseWrite; over TLS, close_notify."""
    try:
        if hasattr(sock, "unwrap"):  # an ssl.SSLSocket
            _close_notify(sock)
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _close_notify(sock):
    """TLS's half-close: send close_notify, and go on reading (as Go's engine does).

    ``SSLSocket.shutdown()`` would drop TLS for reading too.  ``unwrap()`` sends the alert,
    then reads for the engine's own, and output still in flight fails that read and the
    connection (APPLICATION_DATA_AFTER_CLOSE_NOTIFY).  So unwrap() runs with the socket's
    fd number pointing at one end of a socketpair, where the read finds nothing, and the
    alert written there is passed on to the engine.  (OpenSSL 3.0 reads on after sending
    close_notify; the engine's own close_notify then raises SSLZeroReturnError.)
    """
    import ssl
    fd = sock.fileno()
    engine_end = os.dup(fd)
    near, far = socket.socketpair()
    try:
        near.setblocking(False)
        os.dup2(near.fileno(), fd, inheritable=False)
        try:
            sock.unwrap()
        except ssl.SSLWantReadError:
            pass  # the read that found nothing
        finally:
            os.dup2(engine_end, fd, inheritable=False)
        far.setblocking(False)
        _write_all(fd, far.recv(CHUNK))
    finally:
        os.close(engine_end)
        near.close()
        far.close()


def pump(stream, *, tty, stdin_fd=None, stdout_fd=1, stderr_fd=2, signal_fd=None,
         on_signal=None, detach_keys=b"", deadline=None):
    """Copy bytes both ways between local fds and a hijacked stream until it ends.

    Returns ``"eof"`` (the engine closed the stream), ``"detached"``, ``"broken-pipe"``
    (our stdout went away), ``"timeout"`` (``deadline``, a ``time.monotonic()`` value,
    passed) or whatever ``on_signal(signum)`` returned when it returned something.
    The local stdout is written blocking: a slow reader slows the engine through TCP flow
    control instead of losing output.  Input to the engine is buffered and sent
    non-blocking, so a process that stops reading its stdin never stalls its output.
    """
    sock = stream.sock
    sock.setblocking(False)
    demux = None if tty else Demuxer()
    matcher = DetachMatcher(detach_keys) if detach_keys else None
    # Both directions reuse one buffer each: a fresh bytes object per read costs page
    # faults (glibc hands 64 KiB blocks back to the kernel) and a copy.
    inbox = memoryview(bytearray(CHUNK))     # engine -> local fds
    outbox = bytearray(CHUNK)                # stdin -> engine
    to_engine = memoryview(b"")              # what is read from stdin and not yet sent
    stdin_open = stdin_fd is not None
    line_start = True  # the last byte of input ended a line (see stdin EOF below)
    # A regular file as stdin (``< file``) goes to a plain socket by sendfile(2): the kernel
    # copies from the page cache as fast as the socket takes it, with no read, no buffer
    # and no select per 64 KiB.  Not over TLS (the bytes must be encrypted here), not
    # with a TTY (its end is ^D, below), nor where detach keys are looked for.
    from_file = (stdin_open and not tty and matcher is None and not hasattr(sock, "unwrap")
                 and stat.S_ISREG(os.fstat(stdin_fd).st_mode))
    outputs = {1: stdout_fd, 2: stderr_fd}

    def deliver(data):
        if len(stream.first_output) < 512:
            stream.first_output += bytes(data[:512])
        if demux is None:
            _write_all(stdout_fd, data)
            return
        try:
            pieces = demux.feed(data, copy=False)
        except StreamError as exc:
            for index, payload in exc.output:
                _write_all(outputs[index], payload)
            raise
        for index, payload in pieces:
            _write_all(outputs[index], payload)

    def send():
        """Send what the engine will take now; -> False when it takes no more input."""
        nonlocal to_engine
        try:
            sent = sock.send(to_engine)
        except WOULD_BLOCK:
            return True
        except OSError:
            to_engine = memoryview(b"")  # the process is gone; output may remain
            return False
        to_engine = to_engine[sent:]
        return True

    try:
        if stream.early:
            deliver(stream.early)
        if not stdin_open:
            _half_close(sock)
        while True:
            readable = [sock]
            # One chunk of input in flight: a process that stops reading its stdin holds
            # up at most CHUNK bytes here, never its output.
            if stdin_open and not to_engine and not from_file:
                readable.append(stdin_fd)
            if signal_fd is not None:
                readable.append(signal_fd)
            timeout = None
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            ready, writable, _ = select.select(
                readable, [sock] if to_engine or (from_file and stdin_open) else [], [],
                timeout)
            # Checked on every turn: output that never pauses must not hold the deadline off.
            if deadline is not None and time.monotonic() >= deadline:
                return "timeout"
            if signal_fd is not None and signal_fd in ready:
                for signum in _drain_signals(signal_fd):
                    outcome = on_signal(signum) if on_signal else None
                    if outcome:
                        return outcome
            if writable and from_file:
                try:
                    if not os.sendfile(sock.fileno(), stdin_fd, None, SENDFILE_CHUNK):
                        stdin_open = False  # the file's end
                except WOULD_BLOCK:
                    pass
                except OSError:
                    stdin_open = False  # the process is gone, or the file can't be read
                if not stdin_open:
                    _half_close(sock)
            elif writable:
                if not send():
                    stdin_open = False
                if not to_engine and not stdin_open and not tty:
                    _half_close(sock)
            if stdin_open and stdin_fd in ready:
                try:
                    count = os.readv(stdin_fd, [outbox])
                except (BlockingIOError, InterruptedError):
                    count = None
                except OSError:
                    count = 0
                if count == 0:
                    stdin_open = False
                    if tty:
                        # The far end is a terminal, whose EOF is the VEOF key (^D; a
                        # second one after a partial line).  A half-close would make
                        # Docker hang the terminal up and drop the output not yet sent
                        # (--tty with stdin from a file or /dev/null, as in a batch job).
                        to_engine = memoryview(b"\x04" if line_start else b"\x04\x04")
                    elif not to_engine:
                        _half_close(sock)
                elif count:
                    data = memoryview(outbox)[:count]
                    line_start = data[-1:] in (b"\n", b"\r")
                    if matcher is not None:
                        data, detached = matcher.feed(bytes(data))
                        to_engine = memoryview(data)
                        if detached:
                            return "detached"
                    else:
                        to_engine = data
                    if to_engine and not send():  # most often the socket takes it now
                        stdin_open = False
            if sock in ready:
                try:
                    count = sock.recv_into(inbox)
                except WOULD_BLOCK:
                    continue
                except STREAM_ENDED:
                    count = 0
                except OSError as exc:
                    raise StreamError("the stream from the engine broke (%s)" %
                                      (exc.strerror or exc))
                if not count:
                    if demux is not None and demux.partial():
                        raise StreamError("the stream from the engine ended inside a frame — "
                                          "the output is incomplete")
                    return "eof"
                deliver(inbox[:count])
    except OSError as exc:
        # Our stdout went away: a closed pipe (| head), or a hung-up terminal (EIO).
        if exc.errno in (errno.EPIPE, errno.EIO):
            return "broken-pipe"
        raise


def _drain_signals(fd):
    try:
        return bytearray(os.read(fd, 512))
    except (BlockingIOError, InterruptedError):
        return bytearray()

# -- logs (SPEC §9): each process's timestamped lines, merged in the engine's order ---------

def canonical_stamp(raw):
    """An engine's RFC 3339 timestamp (bytes) -> Docker's fixed form in UTC,
    ``2026-12-02T10:00:00.123456789Z``: 30 bytes that sort as the times do; None if it is
    no timestamp.  Docker writes that form already; Podman writes whole seconds."""
    if len(raw) == 30 and raw[29:] == b"Z" and raw[19:20] == b".":
        return raw
    match = re.match(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:?\d\d)\Z",
                     raw)
    if not match:
        return None
    whole, fraction, zone = match.groups()
    if zone != b"Z":
        import calendar
        offset = (int(zone[1:3]) * 3600 + int(zone[-2:]) * 60) * (1 if zone[:1] == b"+"
                                                                    else -1)
        seconds = calendar.timegm(time.strptime(whole.decode(), "%Y-%m-%dT%H:%M:%S"))
        whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds - offset)).encode()
    return whole + b"." + (fraction or b"").ljust(9, b"0") + b"Z"


def stamp_seconds(stamp):
    """A canonical stamp -> UNIX seconds as the engine's ``since`` takes them, exactly."""
    import calendar
    seconds = calendar.timegm(time.strptime(stamp[:19].decode(), "%Y-%m-%dT%H:%M:%S"))
    return "%d.%s" % (seconds, stamp[20:29].decode())


#: Docker cuts a log line longer than this into entries (daemon/logger/copier.go).
LOG_CUT = 16 * 1024
#: The longest line held whole: a process that never ends its line costs no more memory.
LOG_LINE_MAX = 1024 * 1024
#: Docker's stamp (RFC3339NanoFixed) and its space, where it starts a cut line's next piece.
_CUT_STAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z ")


class LogLines:
    """The lines of one process's ``/containers/ID/logs`` stream (``timestamps=1``).

    Every log entry is ``STAMP SP text``: one frame each without a TTY (Demuxer, whole
    frames), raw lines with one.  A frame without a newline is the start of a line that the
    engine cut (Docker at 16 KiB); the entries that continue it carry stamps of their own,
    dropped here, so that a line is never split.  ``feed(data)`` -> ``[(stamp, stream,
    text)]``: stamps canonical (see canonical_stamp), text without its line end; ``end()``
    -> what is left when the stream ends.
    """

    def __init__(self, tty):
        self.demux = None if tty else Demuxer(whole=True)
        self.rest = b""       # TTY: the start of a line
        self.cut = {}         # stream -> (stamp, text) of a line still without its end
        self.last = b""       # the newest stamp so far

    def feed(self, data):
        if self.demux is not None:
            try:
                return self._entries(self.demux.feed(data))
            except StreamError as exc:  # the lines before the engine's error still count
                exc.entries = self._entries(exc.output)
                raise
        lines = (self.rest + bytes(data)).split(b"\n")
        self.rest = lines.pop()
        if len(self.rest) > LOG_LINE_MAX:  # a line that never ends: printed in parts
            lines.append(self.rest)
            self.rest = b""
        # A raw stream has no frames to tell a cut line by: its pieces run together, each
        # after a stamp of its own.  Only a line over the engine's 16 KiB can be one.
        lines = [line[:31] + _CUT_STAMP.sub(b"", line[31:]) if len(line) > LOG_CUT else line
                 for line in lines]
        # A TTY's output ends its lines with CRLF: the CR is the terminal's, not the line's.
        return self._entries([(1, line[:-1] + b"\n" if line[-1:] == b"\r" else line + b"\n")
                              for line in lines])

    def end(self):
        """The lines still open when the stream ends, each a whole line (SPEC §9)."""
        out = self.feed(b"\n") if self.rest else []
        for stamp, stream, pieces in sorted((stamp, stream, pieces) for stream, (
                stamp, pieces, _) in self.cut.items()):
            out += [(stamp, stream, line) for line in b"".join(pieces).split(b"\n")]
        self.cut = {}
        return out

    def _entries(self, frames):
        out = []
        append = out.append
        last, cut = self.last, self.cut
        for stream, entry in frames:
            # The common case first: one whole line after a stamp in Docker's form.
            if not cut and entry[29:31] == b"Z " and entry[19:20] == b"." and \
                    entry.find(b"\n", 31) == len(entry) - 1:
                stamp = entry[:30]
                if stamp > last:
                    last = stamp
                append((stamp, stream, entry[31:-1]))
                continue
            if entry[29:31] == b"Z " and entry[19:20] == b".":  # Docker's form: no parsing
                stamp, text = entry[:30], entry[31:]
            else:
                raw, _, text = entry.partition(b" ")
                stamp = canonical_stamp(raw)
                if stamp is None:  # no stamp at all: the previous line's time
                    stamp, text = last, entry
            pieces, size = [text], len(text)
            if stream in cut:  # continues a cut line: its own stamp is dropped
                stamp, pieces, size = cut.pop(stream)
                pieces.append(text)
                size += len(text)
            if text[-1:] != b"\n":
                if size <= LOG_LINE_MAX:
                    cut[stream] = (stamp, pieces, size)
                    continue
                pieces.append(b"\n")  # a line that never ends: printed in parts of 1 MiB
            text = b"".join(pieces)
            if stamp > last:
                last = stamp
            # several lines in one entry share its stamp
            out += [(stamp, stream, line) for line in text[:-1].split(b"\n")]
        self.last = last
        return out


class LogMerge:
    """One output from the lines of many processes, in the order of the engine's stamps.

    A line waits until every open process has a line waiting (nothing earlier can come
    then), or for ``hold`` seconds, so that a slower stream can still sort in before it;
    a line whose stamp another process's waiting line precedes waits for that one too.
    With one open process and nothing waiting, lines go at once.  ``emit(source,
    entries)`` receives them in order.
    """

    def __init__(self, emit, hold):
        self.emit = emit
        self.hold = hold
        self.heap = []
        self.waiting = {}     # open source -> how many of its lines wait in the heap
        self.idle = 0         # open sources with no line waiting
        self.floors = {}      # source -> the sort key of its last line
        self.seq = 0

    def join(self, source):
        if source not in self.waiting:
            self.waiting[source] = 0
            self.idle += 1

    def leave(self, source):
        """The source's stream ended (after its last lines were added)."""
        if self.waiting.pop(source, None) == 0:
            self.idle -= 1
        self.floors.pop(source, None)

    def add(self, source, entries, now):
        if not entries:
            return
        if not self.heap and len(self.waiting) <= 1:
            self.emit(source, entries)
            return
        import heapq
        # A process's lines keep their order even where its stamps do not (its stdout and
        # stderr are stamped apart): each sorts in no earlier than the one before it.
        floor = self.floors.get(source, b"")
        for stamp, stream, text in entries:
            floor = max(floor, stamp)
            heapq.heappush(self.heap, (floor, self.seq, now, source, stamp, stream, text))
            self.seq += 1
        self.floors[source] = floor
        if source in self.waiting:
            if not self.waiting[source]:
                self.idle -= 1
            self.waiting[source] += len(entries)

    def release(self, now, everything=False):
        """Emit the lines that may go; -> seconds until the next one may, or None."""
        import heapq
        heap, waiting = self.heap, self.waiting
        while heap:
            _, _, arrived, source, stamp, stream, text = heap[0]
            if not (everything or self.idle == 0 or arrived + self.hold <= now):
                return arrived + self.hold - now
            heapq.heappop(heap)
            if source in waiting:
                waiting[source] -= 1
                if not waiting[source]:
                    self.idle += 1
            self.emit(source, [(stamp, stream, text)])
        return None

    def backlog(self, source):
        return self.waiting.get(source, 0)


def _json_line(source, stamp, stream, text):
    return json.dumps({"time": stamp.decode(), "service": source.service, "id": source.id,
                       "stream": "stderr" if stream == 2 else "stdout",
                       "line": text.decode("utf-8", "replace")})


#: How each --format prints a batch of one source's lines (stamp, stream, text) as bytes.
LOG_FORMATS = {
    # Convox's: 2026-12-02T10:00:00Z service/web/310481bf223f message
    "convox": lambda source, entries: b"".join(
        [stamp[:19] + b"Z " + source.label + text + b"\n" for stamp, _, text in entries]),
    # Compose's: web-310481bf | message (the prefix padded, maybe coloured)
    "compose": lambda source, entries: b"".join(
        [source.prefix + text + b"\n" for _, _, text in entries]),
    "json": lambda source, entries: "".join(
        [_json_line(source, *entry) + "\n" for entry in entries]).encode("utf-8"),
}



# ==========================================================================================
# Terminal
# ==========================================================================================

def raw_attributes(attributes):
    """The termios attributes of raw mode (cfmakeraw), computed apart from applying them."""
    import termios
    attrs = list(attributes)
    attrs[6] = list(attrs[6])
    attrs[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP |
                  termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
    attrs[1] &= ~termios.OPOST
    attrs[2] &= ~(termios.CSIZE | termios.PARENB)
    attrs[2] |= termios.CS8
    attrs[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG |
                  termios.IEXTEN)
    attrs[6][termios.VMIN] = 1
    attrs[6][termios.VTIME] = 0
    return attrs


class RawTerminal:
    """Context manager: the terminal on ``fd`` in raw mode, restored on every way out."""

    def __init__(self, fd):
        self.fd = fd
        self.saved = None

    def __enter__(self):
        import termios
        self.saved = termios.tcgetattr(self.fd)
        termios.tcsetattr(self.fd, termios.TCSANOW, raw_attributes(self.saved))
        return self

    def __exit__(self, *exc):
        import termios
        try:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
        except termios.error:
            pass  # the terminal is gone (hang-up): nothing left to restore
        return False


def terminal_size(fd):
    """(rows, cols) of the terminal on fd, or None."""
    import fcntl
    import struct
    import termios
    try:
        rows, cols = struct.unpack("hhhh", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))[:2]
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def _in_main_thread():
    """Only the main thread may set signal handlers.  No threading module loaded means no
    thread of ours but this one (and spares importing it at every start)."""
    threading = sys.modules.get("threading")
    return threading is None or threading.current_thread() is threading.main_thread()


class SignalPipe:
    """Context manager: the given signals arrive as bytes on ``fd`` (a self-pipe fed by
    ``signal.set_wakeup_fd``), so that the pump loop handles them, never a handler.

    Outside the main thread signals cannot be caught; ``fd`` is then None.
    """

    def __init__(self, signums):
        self.signums = signums
        self.fd = None
        self._write_fd = None
        self._saved = {}
        self._saved_wakeup = None

    def __enter__(self):
        if not _in_main_thread():
            return self
        self.fd, self._write_fd = os.pipe()
        for fd in (self.fd, self._write_fd):
            os.set_blocking(fd, False)
        self._saved_wakeup = signal.set_wakeup_fd(self._write_fd)
        for signum in self.signums:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue  # ignored by whoever started us (nohup, a background job): stays so
            # A Python-level handler is needed for the C handler to write to the pipe.
            self._saved[signum] = signal.signal(signum, _note_signal)
        return self

    def __exit__(self, *exc):
        for signum, handler in reversed(list(self._saved.items())):
            signal.signal(signum, handler)
        if self.fd is not None:
            signal.set_wakeup_fd(self._saved_wakeup)
            os.close(self.fd)
            os.close(self._write_fd)
        return False


class TerminationAsInterrupt:
    """Context manager: SIGTERM and SIGHUP unwind like Ctrl-C (KeyboardInterrupt(signum)),
    so that what a verb created is removed on the way out; sessions take them over through
    their SignalPipe.  Signals ignored by our parent (nohup) stay ignored."""

    SIGNALS = ("SIGTERM", "SIGHUP")

    def __init__(self):
        self._saved = {}

    def __enter__(self):
        if _in_main_thread():
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                if signal.getsignal(signum) == signal.SIG_DFL:
                    self._saved[signum] = signal.signal(signum, _raise_interrupt)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)
        return False


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signum)


def _note_signal(signum, frame):
    """Handler for signals that SignalPipe delivers through its pipe: nothing to do here."""


# ==========================================================================================
# Apps and processes
# ==========================================================================================

#: Labels that only a container's creator writes, never an image: convox's type, Compose's
#: one-off flag, the task ID Swarm puts on its tasks' containers.
CREATION_LABELS = (LABEL_TYPE, COMPOSE_ONEOFF, "com.docker.swarm.task.id")


def identity(labels, own=False):
    """(app, service, release, type) of a container from its Convox or Compose labels.

    A container inherits its image's labels, and `start` labels the images it builds with
    the app and service, so those alone would make a container run by hand from such an
    image look like a process (SPEC §3).  Only labels a container was created with count:
    it is a process when it carries one of CREATION_LABELS.  ``own``: the labels cannot be
    inherited (a Swarm service's own spec), so no such label is needed.
    """
    labels = labels or {}
    if not own and not any(label in labels for label in CREATION_LABELS):
        return "", "", "", "service"
    app = labels.get(LABEL_APP) or labels.get(COMPOSE_PROJECT) or ""
    service = labels.get(LABEL_SERVICE) or labels.get(COMPOSE_SERVICE) or ""
    release = labels.get(LABEL_RELEASE) or ""
    kind = labels.get(LABEL_TYPE)
    if not kind:
        kind = "process" if labels.get(COMPOSE_ONEOFF, "").lower() == "true" else "service"
    return app, service, release, kind


def normalize_app_name(name):
    """The app name Convox infers from a folder name: lower-case, '_' and '.' become '-'."""
    return name.lower().replace("_", "-").replace(".", "-")


#: What a path is when it is not a regular file, for messages.
_FILE_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a fifo", stat.S_IFCHR: "a device",
               stat.S_IFBLK: "a device", stat.S_IFSOCK: "a socket"}


def read_regular_file(path, limit):
    """The bytes of the regular file at ``path``, at most ``limit`` of them, else OSError.

    Opened without blocking and checked with fstat: a fifo would block the open and every
    read, and a link to /dev/zero never ends, so anything but a regular file is refused."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            raise OSError(errno.EINVAL, "it is %s, not a regular file" %
                          _FILE_KINDS.get(kind, "something else"))
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise OSError(errno.EFBIG, "it is larger than %d bytes" % limit)
    return b"".join(chunks)


def resolve_app(option=None, environ=None, cwd=None):
    """-> (app, inferred): -a, CONVOX_APP, .convox/app, then the current folder's name."""
    environ = os.environ if environ is None else environ
    if option:
        return option, False
    if environ.get("CONVOX_APP"):
        return environ["CONVOX_APP"], False
    cwd = cwd or os.getcwd()
    try:
        name = read_regular_file(os.path.join(cwd, ".convox", "app"), APP_FILE_MAX)
    except (FileNotFoundError, NotADirectoryError):
        name = b""
    except OSError as exc:
        raise ConvoxError("cannot read the app's name from .convox/app: %s — write the "
                          "name into it, or use -a APP" % (exc.strerror or exc))
    name = name.decode("utf-8", "replace").strip()
    if name:
        return name, False
    project = compose_project(cwd, environ)
    if project:
        return project, False
    return normalize_app_name(os.path.basename(os.path.abspath(cwd)) or "root"), True


def command_words(words):
    """The argv rule (SPEC §5): words go as a list; one word with whitespace runs in sh -c."""
    if len(words) == 1 and any(char.isspace() for char in words[0]):
        return ["sh", "-c", words[0]]
    return list(words)


def status_text(state):
    """The STATUS column: running, exited (N), created, paused, restarting, dead ..."""
    status = state.get("Status") or ("running" if state.get("Running") else "unknown")
    if status == "exited":
        return "exited (%d)" % state.get("ExitCode", 0)
    return status


class Process:
    """One container seen as a Convox process."""

    def __init__(self, info):
        self.info = info
        config = info.get("Config") or {}
        self.id = info["Id"]
        self.app, self.service, self.release, self.type = identity(config.get("Labels"))
        state = info.get("State") or {}
        self.running = bool(state.get("Running"))
        self.status = status_text(state)
        self.exit_code = None if self.running else state.get("ExitCode")
        memory = (info.get("HostConfig") or {}).get("Memory") or 0
        self.size = memory // (1024 * 1024) if memory else None
        started = state.get("StartedAt") or ""
        self.started = None if started.startswith("0001-") else started or None
        self.command = [info.get("Path") or ""] + list(info.get("Args") or [])
        if self.command[:2] == ["/run/podman-init", "--"]:
            # Podman shows its init (HostConfig.Init) as the command; Docker hides its own.
            self.command = self.command[2:]
        if self.command == [""]:
            self.command = []
        self.image = config.get("Image") or info.get("Image") or ""
        self.created = info.get("Created") or ""
        self.tty = bool(config.get("Tty"))

    def as_json(self):
        return {
            "id": self.id, "name": self.service, "app": self.app,
            "release": self.release or None, "size": self.size, "started": self.started,
            "status": self.status, "exit_code": self.exit_code, "command": self.command,
            "type": self.type,
        }


def service_identity(spec):
    """(app, service, release, type) of a Swarm service from its spec: the Convox (or
    Compose) labels, else `docker stack deploy`'s: the stack is the app, and the service
    is the service's name without the ``STACK_`` prefix."""
    labels = spec.get("Labels") or {}
    app, service, release, kind = identity(labels, own=True)  # a spec inherits no label
    stack = labels.get(STACK_NAMESPACE) or ""
    name = spec.get("Name") or ""
    if not app:
        app = stack
    if not service and stack:
        service = name[len(stack) + 1:] if name.startswith(stack + "_") else name
    return app, service, release, kind


def task_status(status):
    """The STATUS column of a task: running, exited (N), or Swarm's state (pending ...)."""
    state = status.get("State") or "unknown"
    if state in ("complete", "failed", "shutdown") and status.get("ContainerStatus"):
        return "exited (%d)" % (status["ContainerStatus"].get("ExitCode") or 0)
    return state


class Task(Process):
    """One Swarm task seen as a Convox process: its ID is its container's (the task's own
    when it has none yet); ``node`` is its node's hostname."""

    def __init__(self, task, service, node, command):
        status = task.get("Status") or {}
        container = status.get("ContainerStatus") or {}
        spec = task.get("Spec") or {}
        self.info = task
        self.task = task["ID"]
        self.service_id = task.get("ServiceID") or ""
        self.node_id = task.get("NodeID") or ""
        self.node = ((node or {}).get("Description") or {}).get("Hostname") or "-"
        self.id = container.get("ContainerID") or self.task
        self.app, self.service, self.release, self.type = service_identity(service["Spec"])
        self.running = status.get("State") == "running"
        self.status = task_status(status)
        self.exit_code = None if self.running else container.get("ExitCode")
        memory = ((spec.get("Resources") or {}).get("Limits") or {}).get("MemoryBytes") or 0
        self.size = memory // (1024 * 1024) if memory else None
        self.started = status.get("Timestamp") if self.running else None
        self.command = command
        self.image = (spec.get("ContainerSpec") or {}).get("Image") or ""
        self.created = task.get("CreatedAt") or ""
        self.tty = bool((spec.get("ContainerSpec") or {}).get("TTY"))

    def matches(self, ident):
        return bool(ident) and (self.id.startswith(ident) or self.task.startswith(ident))

    def as_json(self):
        fields = super().as_json()
        fields.update(node=self.node, task=self.task)
        return fields


def newest(summaries):
    """The newest container summary (by creation time), or None."""
    # Created is in whole seconds; within one second the engine's own order decides: it
    # lists containers newest first by their exact creation time (Docker container/history.go).
    ranked = [(s.get("Created") or 0, -index, s) for index, s in enumerate(summaries)]
    return max(ranked, key=lambda r: r[:2], default=(0, 0, None))[2]


def newest_image(engine, app, service, release=None):
    """ID of the newest image labelled with the app, the service (and the release), or None:
    the images `start` builds."""
    labels = ["%s=%s" % (LABEL_APP, app), "%s=%s" % (LABEL_SERVICE, service)]
    if release:
        labels.append("%s=%s" % (LABEL_RELEASE, release))
    images = engine.request("GET", "/images/json", {"filters": {"label": labels}}) or []
    if not images:
        return None
    return max(images, key=lambda image: image.get("Created") or 0)["Id"]


def _mount_binds(template):
    """The service's mounts as Binds strings (named volumes, anonymous ones, host paths)."""
    binds = []
    for mount in template.get("Mounts") or []:
        source = mount.get("Name") if mount.get("Type") == "volume" else mount.get("Source")
        if mount.get("Type") not in ("bind", "volume") or not source:
            continue
        bind = "%s:%s" % (source, mount["Destination"])
        if not mount.get("RW", True):
            bind += ":ro"
        binds.append(bind)
    return binds


def merge_env(base, overrides):
    """``base`` (K=V entries) with ``overrides`` applied in order: K=V replaces K, a bare K
    removes it (as the engine treats a bare K over the image's environment)."""
    merged = {}
    for entry in list(base) + list(overrides):
        key, equals, _ = entry.partition("=")
        merged.pop(key, None)  # a replaced variable moves to the end, as docker run's -e
        if equals:
            merged[key] = entry
    return list(merged.values())


#: run's resource flags -> (HostConfig field, from the flag's value) (SPEC §6): --cpu is a
#: relative weight in millicores (1024 shares = one CPU), --memory a reservation.
RESOURCES = {
    "cpu": ("CpuShares", lambda m: max(2, m * 1024 // 1000)),  # 2: the kernel's minimum
    "cpu_limit": ("NanoCpus", lambda m: m * 1000000),
    "memory": ("MemoryReservation", lambda mb: mb * 1024 * 1024),
    "memory_limit": ("Memory", lambda mb: mb * 1024 * 1024),
}


def one_off_config(template, command, *, app, service, image=None, release=None, env=(),
                   resources=None, entrypoint=True, tty=False, stdin=False, detach=False,
                   console=None):
    """The create body of a one-off process of a service (SPEC §6), and the extra networks
    to connect before start: ``(config, [network, ...])``.  ``image`` and ``release`` are
    those of ``--release``; by default the template's.  ``resources`` maps RESOURCES' keys
    to the flags' values.

    It copies the service's image, environment, working directory, user, mounts, networks,
    DNS, extra hosts and resources; not its ports, name, restart policy or network aliases
    (a one-off must never answer to the service's DNS name, as `docker compose run`).
    """
    config = template.get("Config") or {}
    host = template.get("HostConfig") or {}
    release = release or identity(config.get("Labels"))[2]
    body = {
        "Image": image or template.get("Image") or config.get("Image"),
        "Cmd": command,
        "Env": merge_env(config.get("Env") or [], env),
        "WorkingDir": config.get("WorkingDir") or "",
        "User": config.get("User") or "",
        "Labels": {LABEL_APP: app, LABEL_SERVICE: service, LABEL_RELEASE: release,
                   LABEL_TYPE: "process"},
        "Tty": tty,
        "OpenStdin": stdin,
        "StdinOnce": stdin,
        "AttachStdin": stdin,
        "AttachStdout": not detach,
        "AttachStderr": not detach,
    }
    if not entrypoint:
        body["Entrypoint"] = [""]  # an empty entrypoint resets the image's (Docker API)
    elif image is None and config.get("Entrypoint"):
        body["Entrypoint"] = config["Entrypoint"]
    host_config = {
        "Binds": _mount_binds(template) or None,
        "Tmpfs": host.get("Tmpfs") or None,
        "NetworkMode": host.get("NetworkMode") or "default",
        "Dns": host.get("Dns") or None,
        "DnsSearch": host.get("DnsSearch") or None,
        "DnsOptions": host.get("DnsOptions") or None,
        "ExtraHosts": host.get("ExtraHosts") or None,
        "CapAdd": host.get("CapAdd") or None,
        "CapDrop": host.get("CapDrop") or None,
        "Privileged": bool(host.get("Privileged")),
        # An init process as PID 1 passes signals on and reaps: a one-off's command then
        # dies of SIGINT/SIGTERM as it would in a shell (PID 1 ignores them otherwise).
        "Init": True,
        "AutoRemove": not detach,
    }
    # Each resource flag sets its own field; every other is the service's.
    given = {RESOURCES[flag][0]: RESOURCES[flag][1](value)
             for flag, value in (resources or {}).items() if value is not None}
    for field in ("CpuShares", "NanoCpus", "MemoryReservation", "Memory"):
        host_config[field] = given.get(field, host.get(field) or 0)
    if host_config["Memory"] and host.get("MemorySwap") and "Memory" not in given:
        host_config["MemorySwap"] = host["MemorySwap"]
    if console:
        host_config["ConsoleSize"] = list(console)
    body["HostConfig"] = host_config
    networks = []
    mode = host_config["NetworkMode"]
    if not mode.startswith("container:") and mode not in ("host", "none"):
        networks = sorted((template.get("NetworkSettings") or {}).get("Networks") or {},
                          key=lambda name: name != mode)
    if networks:
        first = networks[0]
        body["NetworkingConfig"] = {"EndpointsConfig": {first: {}}}
        if mode in ("default", "bridge") and first != "bridge":
            host_config["NetworkMode"] = first
    return body, networks[1:]


# -- humanised times (go-humanize's RelTime, as Convox prints them) -------------------------

_DAY = 86400
_WEEK = 7 * _DAY
_MONTH = 30 * _DAY
_YEAR = 12 * _MONTH
#: (below this many seconds, text, divide by) -- go-humanize's defaultMagnitudes.
_MAGNITUDES = (
    (1, "now", None),
    (2, "1 second %s", 0),
    (60, "%d seconds %s", 1),
    (120, "1 minute %s", 0),
    (3600, "%d minutes %s", 60),
    (7200, "1 hour %s", 0),
    (_DAY, "%d hours %s", 3600),
    (2 * _DAY, "1 day %s", 0),
    (_WEEK, "%d days %s", _DAY),
    (2 * _WEEK, "1 week %s", 0),
    (_MONTH, "%d weeks %s", _WEEK),
    (2 * _MONTH, "1 month %s", 0),
    (_YEAR, "%d months %s", _MONTH),
    (18 * _MONTH, "1 year %s", 0),
    (2 * _YEAR, "2 years %s", 0),
    (37 * _YEAR, "%d years %s", _YEAR),
)


def humanize_since(seconds):
    """Seconds elapsed -> '5 days ago' with go-humanize's thresholds (integer truncation)."""
    label = "ago"
    if seconds < 0:
        seconds, label = -seconds, "from now"
    for limit, text, divide in _MAGNITUDES:
        if seconds < limit:
            if divide is None:
                return text
            if divide == 0:
                return text % label
            return text % (int(seconds // divide), label)
    return "a long while %s" % label


#: RFC 3339 as engines write it: nanoseconds optional, "Z" or an offset (Podman's local).
_RFC3339 = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})"
                      r"(\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})?\Z")


def parse_timestamp(text):
    """RFC 3339 (with nanoseconds, as the engine writes) -> POSIX seconds; None for an empty
    or zero time (never started).  Anything else is the engine's error, as in the Docker CLI,
    whose JSON decoding of a time fails the command."""
    import calendar
    import datetime  # loaded already (http.client's email.utils); time.strptime is not
    if not text or text.startswith("0001-"):
        return None
    match = _RFC3339.match(text)
    try:
        fields = [int(field) for field in match.group(1, 2, 3, 4, 5, 6)]
        datetime.datetime(*fields)  # raises for a 13th month, a 61st second
    except (AttributeError, ValueError):  # or no match
        raise EngineError("the engine sent a malformed time (%r) — check that the rack is a "
                          "Docker Engine API" % text[:40])
    fraction, zone = match.group(7), match.group(8) or "Z"
    offset = 0 if zone == "Z" else \
        (1 if zone[0] == "+" else -1) * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
    return calendar.timegm(fields) + float(fraction or 0) - offset


def format_table(headers, rows):
    """Left-aligned columns two spaces apart, the last one unpadded (Convox's tables)."""
    rows = [[printable(str(cell)) for cell in row] for row in rows]
    widths = [max([len(headers[i])] + [len(row[i]) for row in rows])
              for i in range(len(headers))]
    lines = []
    for row in [list(headers)] + rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


#: Characters shown escaped, never sent raw to a terminal: C0, DEL, C1 and the bidi
#: overrides that reorder what follows.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text):
    """Text from labels or the engine, safe for a terminal: a newline would break a table's
    rows, an escape sequence would act on the terminal; both are shown escaped (\\n, \\x1b)."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def one_line(text):
    """A message that carries foreign text, as one safe line: line breaks and runs of white
    space become one space (scripts read the last line of stderr), the rest as printable."""
    return printable(" ".join(str(text).split()))


def shell_join(words):
    import shlex
    return " ".join(shlex.quote(word) for word in words)


# ==========================================================================================
# Manifest
# ==========================================================================================

# Plain-scalar resolution follows the YAML 1.2 core schema (what compose's yaml.v3 does),
# so "yes", "on", "0755"-style and "8080:80" stay strings or decimal ints as users expect.
_YAML_NULLS = ('', '~', 'null', 'Null', 'NULL')
_YAML_TRUES = ('true', 'True', 'TRUE')
_YAML_FALSES = ('false', 'False', 'FALSE')
_YAML_INT = r'[-+]?[0-9]+\Z'
_YAML_OCT = r'0o[0-7]+\Z'
_YAML_HEX = r'0x[0-9a-fA-F]+\Z'
_YAML_FLOAT = r'[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?\Z'
_YAML_INF = r'[-+]?\.(inf|Inf|INF)\Z'
_YAML_NAN = r'\.(nan|NaN|NAN)\Z'
_YAML_ESCAPES = {
    '0': '\0', 'a': '\a', 'b': '\b', 't': '\t', '\t': '\t', 'n': '\n', 'v': '\v',
    'f': '\f', 'r': '\r', 'e': '\x1b', ' ': ' ', '"': '"', '/': '/', '\\': '\\',
    'N': '\x85', '_': '\xa0', 'L': '\u2028', 'P': '\u2029',
}
_YAML_HEX_ESCAPES = {'x': 2, 'u': 4, 'U': 8}
_PROPS_HELP = {
    '!': 'tags other than the core ones (!!str, !!int, !!float, !!bool, !!null, !!map, !!seq) '
         'are not supported — quote the value if it must be a string',
}
#: YAML 1.2 core schema tags -> the Python type a value so tagged must have.
_CORE_TAGS = {'str': str, 'int': int, 'float': float, 'bool': bool, 'null': type(None),
              'map': dict, 'seq': list}


def _core_tagged(tag, value, raw):
    """`value` under a core tag (`raw`: the plain text, or None when it was not plain);
    -> (value, None) or (None, what is wrong)."""
    if raw is not None or (isinstance(value, str) and tag != 'str'):  # !!int "3" is 3
        value = raw if tag == 'str' else _resolve_plain(value if raw is None else raw)
    if value is None and tag == 'str':
        value = ''  # "key: !!str" is the empty string
    if tag == 'float' and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tag in ('int', 'float') and isinstance(value, bool) or not isinstance(value, _CORE_TAGS[tag]):
        return None, 'the value does not fit its tag !!%s' % tag
    return value, None

_AFTER_COMMENT_HELP = ('a plain value cannot go on after a comment — '
                       'remove the comment or quote the value')
_ANCHOR_NAME = r'[^\s,\[\]{}]+'
#: Aliases may repeat a subtree, so a small file can stand for a huge value ("billion
#: laughs"); expansion past this many values is refused instead of taking the machine.
YAML_ALIAS_LIMIT = 100000
_MERGE = '<<'  # a plain "<<" key: YAML's merge key (compose files use it with aliases)


def _resolve_plain(text):
    """Turn an unquoted scalar into None/bool/int/float/str per the YAML 1.2 core schema."""
    if text in _YAML_NULLS:
        return None
    if text[0] not in '0123456789+-.tTfF':
        return text  # fast path: most values are words
    if text in _YAML_TRUES:
        return True
    if text in _YAML_FALSES:
        return False
    if re.match(_YAML_INT, text):
        return int(text, 10)
    if re.match(_YAML_OCT, text):
        return int(text[2:], 8)
    if re.match(_YAML_HEX, text):
        return int(text[2:], 16)
    if re.match(_YAML_FLOAT, text):
        return float(text)
    if re.match(_YAML_INF, text):
        return float('-inf') if text[0] == '-' else float('inf')
    if re.match(_YAML_NAN, text):
        return float('nan')
    return text


def _props_error(text):
    """The message for a value starting with & or * that names nothing, or with a tag."""
    if text[0] in '&*':
        return 'a value starting with %r must be quoted' % text[0]  # e.g. a cron "*/5 * * * *"
    return _PROPS_HELP[text[0]]


def _is_dash(text):
    """True when a line's content is a block sequence entry ("- x" or a lone "-")."""
    return text == '-' or text[:2] in ('- ', '-\t')


def _is_doc_marker(raw):
    """True for a '---' or '...' document marker line."""
    return raw[:3] in ('---', '...') and (len(raw) == 3 or raw[3] in ' \t')


def _is_comment_rest(rest):
    """True when the text left on a line is blank or a comment."""
    body = rest.lstrip(' \t')
    return not body or (body[0] == '#' and len(body) < len(rest))


def _find_key_colon(text):
    """Index of the ': ' ending a plain mapping key, or -1 when the line holds no key."""
    for k, ch in enumerate(text):
        if ch == '#' and k > 0 and text[k - 1] in ' \t':
            return -1
        if ch == ':' and (k + 1 == len(text) or text[k + 1] in ' \t'):
            return k
    return -1


def _fold_lines(lines):
    """Join folded (>) block scalar lines: single breaks become spaces, blank lines stay."""
    out = []
    prev = None
    blanks = 0
    for line in lines:
        if line == '':
            blanks += 1
            continue
        if prev is None:
            out.append('\n' * blanks)
        elif prev[0] in ' \t' or line[0] in ' \t':
            out.append('\n' * (blanks + 1))  # more-indented lines keep their breaks
        else:
            out.append('\n' * blanks if blanks else ' ')
        out.append(line)
        prev = line
        blanks = 0
    return ''.join(out)


class _YamlParser(object):
    """Line-based recursive-descent parser for the YAML subset manifests use."""

    def __init__(self, text, filename):
        self.filename = filename
        if text.startswith('\ufeff'):
            text = text[1:]
        text = text.replace('\r\n', '\n').replace('\r', '\n')
        self.final_newline = text.endswith('\n')
        self.raw = text.split('\n')
        if self.final_newline:
            self.raw.pop()  # the '' after the last newline is not a line
        self.virtual = {}  # line index -> (indent, text) for "- key: v" items re-read in place
        self.pos = 0
        self.anchors = {}  # &name -> the value it was last given
        self.path = []     # keys from the root to the value being parsed
        self.key_lines = {}  # "services.web.ports" -> the line of that key, for messages
        self.sizes = {}    # id(value) -> (value, values it stands for): alias expansion bound
        self.expanded = 0  # values aliases have repeated so far

    def error(self, lineno, message):
        """Build a ManifestError pointing at a 1-based line."""
        return ManifestError('%s:%d: %s' % (self.filename, lineno, message))

    def _split(self, i):
        """Return (indent, content) of line i, honouring virtual lines."""
        if i in self.virtual:
            return self.virtual[i]
        raw = self.raw[i]
        body = raw.lstrip(' ')
        return len(raw) - len(body), body

    def _next_content(self, i):
        """Index of the first line at or after i that is not blank or a comment."""
        while i < len(self.raw):
            body = self._split(i)[1].strip(' \t')
            if body and body[0] != '#':
                return i
            i += 1
        return None

    def peek(self):
        """Index of the next content line of this document, or None at the end."""
        i = self._next_content(self.pos)
        if i is None:
            self.pos = len(self.raw)
            return None
        self.pos = i
        indent, text = self._split(i)
        if text[0] == '\t':
            raise self.error(i + 1, 'tabs are not allowed for indentation — use spaces')
        if indent == 0 and i not in self.virtual and _is_doc_marker(text):
            return None  # the caller reports the marker
        return i

    def parse(self):
        """Parse the whole text as one document."""
        i = self._next_content(0)
        if i is not None:
            raw = self.raw[i]
            if raw.startswith('%'):
                raise self.error(i + 1, 'directives (%YAML, %TAG) are not supported — remove the line')
            if raw.startswith('---') and _is_doc_marker(raw):
                if not _is_comment_rest(raw[3:]):
                    raise self.error(i + 1, "content on the '---' line is not supported — "
                                            "move it to the next line")
                self.pos = i + 1
        value = self.block_node(0, -1)
        i = self._next_content(self.pos)
        if i is not None:
            raw = self.raw[i]
            if raw.startswith('---') and _is_doc_marker(raw):
                raise self.error(i + 1, "a second document ('---') is not supported — "
                                        "keep one document per file")
            if _is_doc_marker(raw):
                raise self.error(i + 1, "the document end marker '...' is not supported — remove it")
            raise self.error(i + 1, 'bad indentation — this line does not line up with anything above it')
        return value

    def block_node(self, min_indent, parent_indent):
        """Parse the node on the next content line if it is indented at least min_indent."""
        i = self.peek()
        if i is None or self._split(i)[0] < min_indent:
            return None
        return self.node_at(i, parent_indent)

    def node_at(self, i, parent_indent):
        """Parse the node starting on line i: a sequence, a mapping or a scalar."""
        indent, text = self._split(i)
        if _is_dash(text):
            return self.sequence(indent)
        if self.split_key(i, text) is not None:
            return self.mapping(indent)
        self.pos = i + 1
        return self.inline_value(i, text, parent_indent)

    def sequence(self, n):
        """Parse a block sequence whose dashes sit at column n."""
        items = []
        while True:
            i = self.peek()
            if i is None:
                break
            indent, text = self._split(i)
            if indent < n:
                break
            if indent > n:
                raise self.error(i + 1, 'bad indentation (expected %d spaces, found %d)' % (n, indent))
            if not _is_dash(text):
                break
            items.append(self.sequence_item(i, n, text))
        return items

    def sequence_item(self, i, n, text):
        """Parse one "- ..." entry; inline content is re-read as a virtual, deeper line."""
        rest = text[1:]
        body = rest.lstrip(' \t')
        if body[:1] == '&':
            anchor, rest = self.take_anchor(i + 1, body)
            if _is_comment_rest(rest):
                self.pos = i + 1
                return self.define(anchor, self.block_node(n + 1, n))
            if self.split_key(i, rest.lstrip(' \t')) is not None:
                raise self.error(i + 1, 'an anchor before a key names the key — put "- &%s" '
                                        'on its own line, the mapping below it' % anchor)
            self.pos = i + 1
            return self.define(anchor, self.inline_value(i, rest.lstrip(' \t'), n))
        if _is_comment_rest(rest):
            self.pos = i + 1
            return self.block_node(n + 1, n)
        # "- key: v" starts a mapping whose keys line up with "key": re-read the line there.
        self.virtual[i] = (n + 1 + len(rest) - len(body), body)
        self.pos = i
        return self.node_at(i, n)

    def mapping(self, n):
        """Parse a block mapping whose keys sit at column n."""
        result = {}
        explicit = set()
        while True:
            i = self.peek()
            if i is None:
                break
            indent, text = self._split(i)
            if indent < n:
                break
            if indent > n:
                raise self.error(i + 1, 'bad indentation (expected %d spaces, found %d)' % (n, indent))
            if _is_dash(text):
                raise self.error(i + 1, 'a list item is not allowed here — check the indentation')
            pair = self.split_key(i, text)
            if pair is None:
                hint = ' — put a space after the ":"' if ':' in text else ''
                raise self.error(i + 1, 'expected "key: value"' + hint)
            key, rest = pair
            if key in explicit:
                raise self.error(i + 1, 'duplicate key %r' % (key,))
            explicit.add(key)
            self.pos = i + 1
            self.enter(key, i + 1)
            value = self.mapping_value(i, rest, n)
            self.path.pop()
            if key is _MERGE:
                self.merge(result, value, i + 1)
            else:
                result[key] = value
        return result

    def enter(self, key, lineno):
        """Note that the value of `key` on line `lineno` is being parsed."""
        self.path.append(key if isinstance(key, str) else json.dumps(key))
        self.key_lines.setdefault('.'.join(self.path), lineno)

    def merge(self, result, value, lineno):
        """Apply a merge key: keys of the mapping(s) not given in this one; in a list, the
        earlier mapping wins (yaml.org/type/merge.html, as compose's yaml.v3 does)."""
        for source in value if isinstance(value, list) else [value]:
            if not isinstance(source, dict):
                raise self.error(lineno, 'a merge key (<<) takes a mapping or a list of '
                                         'mappings, e.g. "<<: *defaults"')
            self.count(len(source), lineno)
            for key, item in source.items():
                if key not in result:
                    result[key] = item

    def take_anchor(self, lineno, body):
        """Split "&name rest" into (name, rest)."""
        m = re.match('&(%s)' % _ANCHOR_NAME, body)
        if not m:
            raise self.error(lineno, _props_error(body))
        rest = body[m.end():]
        after = rest.lstrip(' \t')
        if after[:1] in ('*', '&'):
            raise self.error(lineno, 'an alias or a second anchor cannot follow &%s' % m.group(1))
        return m.group(1), rest

    def define(self, anchor, value):
        """Remember value under &anchor (a later anchor of the same name replaces it)."""
        self.anchors[anchor] = value
        return value

    def alias(self, lineno, name):
        """The value of *name, counted against YAML_ALIAS_LIMIT."""
        if name not in self.anchors:
            raise self.error(lineno, 'unknown alias *%s — define &%s before using it' % (name, name))
        value = self.anchors[name]
        self.count(self.size(value), lineno)
        return value

    def count(self, size, lineno):
        """Add values repeated by an alias or merge; refuse an alias bomb."""
        self.expanded += size
        if self.expanded > YAML_ALIAS_LIMIT:
            raise self.error(lineno, 'aliases expand this file to more than %d values — '
                                     'an alias bomb? write the values out instead' % YAML_ALIAS_LIMIT)

    def size(self, value):
        """How many values `value` stands for, each alias expanded (memoised: linear)."""
        if not isinstance(value, (list, dict)):
            return 1
        known = self.sizes.get(id(value))
        if known is None:
            items = value.values() if isinstance(value, dict) else value
            known = self.sizes[id(value)] = (value, 1 + sum(self.size(v) for v in items))
        return known[1]

    def mapping_value(self, i, rest, n):
        """Parse what follows "key:" — on the same line or on the lines below."""
        body = rest.lstrip(' \t')
        if body[:1] == '&':
            anchor, rest = self.take_anchor(i + 1, body)
            return self.define(anchor, self.mapping_value(i, rest, n))
        if not _is_comment_rest(rest):
            return self.inline_value(i, body, n)
        j = self.peek()
        if j is None:
            return None
        indent, text = self._split(j)
        if indent > n:
            return self.node_at(j, n)
        if indent == n and _is_dash(text):
            return self.sequence(n)  # compose style: "key:\n- a" at the key's own indent
        return None

    def split_key(self, i, text):
        """Return (key, rest) when line i is "key: ...", else None."""
        c = text[0]
        if c in '&*':
            if _find_key_colon(text) > 0:
                raise self.error(i + 1, 'anchors and aliases on mapping keys are not supported')
            return None
        if c in _PROPS_HELP:
            raise self.error(i + 1, _props_error(text))
        if c == '?' and (len(text) == 1 or text[1] in ' \t'):
            raise self.error(i + 1, 'complex keys ("? ") are not supported')
        if c in '[{':
            return None
        if c in '"\'':
            key, end = self.scan_quoted(text, 0, i + 1)
            after = text[end:].lstrip(' \t')
            if after[:1] == ':' and (len(after) == 1 or after[1] in ' \t'):
                return key, after[1:]
            return None
        k = _find_key_colon(text)
        if k < 0:
            return None
        key_text = text[:k].rstrip(' \t')
        if key_text == '<<':
            return _MERGE, text[k + 1:]
        if not key_text:
            raise self.error(i + 1, 'missing key before ":"')
        return _resolve_plain(key_text), text[k + 1:]

    def inline_value(self, i, text, parent_indent, raw=False):
        """Parse a value that starts on line i (text has no leading space); `raw`: a plain
        value is returned as its text, unresolved (for !!str)."""
        c = text[0]
        lineno = i + 1
        if c == '&':
            anchor, rest = self.take_anchor(lineno, text)
            if _is_comment_rest(rest):
                self.pos = i + 1
                return self.define(anchor, self.block_node(parent_indent + 1, parent_indent))
            return self.define(anchor, self.inline_value(i, rest.lstrip(' \t'), parent_indent))
        if c == '*':
            m = re.match('\\*(%s)' % _ANCHOR_NAME, text)
            if not m:
                raise self.error(lineno, _props_error(text))
            if not _is_comment_rest(text[m.end():]):
                raise self.error(lineno, _props_error(text))  # a cron "*/5 * * * *"?
            self.pos = i + 1
            self.no_continuation(parent_indent)
            return self.alias(lineno, m.group(1))
        if c == '!':
            m = re.match('!!(%s)(?=[ \t]|\\Z)' % '|'.join(_CORE_TAGS), text)
            if not m:
                raise self.error(lineno, _props_error(text))
            rest = text[m.end():]
            if _is_comment_rest(rest):
                self.pos = i + 1
                value, raw = self.block_node(parent_indent + 1, parent_indent), None
            else:
                rest = rest.lstrip(' \t')
                plain = rest[0] not in '&*!|>[{"\'' and not _is_dash(rest)
                value = self.inline_value(i, rest, parent_indent, raw=plain)
                value, raw = (None, value) if plain else (value, None)
            value, problem = _core_tagged(m.group(1), value, raw)
            if problem:
                raise self.error(lineno, problem)
            return value
        if c in '|>':
            return self.block_scalar(i, text, parent_indent)
        if c in '[{':
            return self.flow(i, text)
        if c in '"\'':
            return self.quoted(i, text, parent_indent)
        if _is_dash(text):
            raise self.error(lineno, 'a list cannot start on the same line as its key — '
                                     'move "- ..." to the next line')
        if c in '?:' and (len(text) == 1 or text[1] in ' \t'):
            raise self.error(lineno, 'unexpected %r — quote the value' % c)
        if c in '@`%,]}':
            raise self.error(lineno, 'a plain value cannot start with %r — quote the value' % c)
        value, commented = self.plain(lineno, text)
        if not commented:
            value += self.plain_continuation(parent_indent)
        self.no_continuation(parent_indent)
        return value if raw else _resolve_plain(value)

    def plain_continuation(self, parent_indent):
        """The folded lines of a multi-line plain value below its first line (YAML 1.2 §7.3.3:
        a line break is a space, each blank line a newline), up to a comment or a line that
        is not deeper than the value's parent."""
        out = []
        blanks = 0
        j = self.pos
        while j < len(self.raw):
            raw = self.raw[j]
            body = raw.strip(' \t')
            indent = len(raw) - len(raw.lstrip(' '))
            if not body:
                blanks += 1
            elif indent <= parent_indent or body[0] == '#' or (indent == 0 and _is_doc_marker(raw)):
                break
            elif _is_dash(body) or _find_key_colon(body) >= 0 or body[0] in '[]{},':
                break  # no_continuation() names the problem
            else:
                text, commented = self.plain(j + 1, body)
                out.append('\n' * blanks if blanks else ' ')
                out.append(text)
                blanks = 0
                self.pos = j + 1
                if commented:
                    break
            j += 1
        return ''.join(out)

    def no_continuation(self, parent_indent):
        """Reject a deeper line after a value that has ended (after a comment, a key line)."""
        j = self.peek()
        if j is None:
            return
        indent, text = self._split(j)
        if indent <= parent_indent:
            return
        if _is_dash(text) or _find_key_colon(text) > 0:
            raise self.error(j + 1, 'bad indentation (expected %d spaces, found %d)'
                             % (max(parent_indent, 0), indent))
        raise self.error(j + 1, _AFTER_COMMENT_HELP)

    def plain(self, lineno, text):
        """Return (plain scalar text of a line without a trailing comment, had a comment)."""
        for k, ch in enumerate(text):
            if ch == '#' and text[k - 1] in ' \t':
                return text[:k].rstrip(' \t'), True
            if ch == ':' and (k + 1 == len(text) or text[k + 1] in ' \t'):
                raise self.error(lineno, 'unexpected ":" in a value — quote values that contain ": "')
        return text.rstrip(' \t'), False

    def quoted(self, i, text, parent_indent):
        """A quoted value starting on line i; it may go on over the lines below, deeper than
        its parent (YAML 1.2 §7.3: line breaks fold as in plain values)."""
        try:
            value, end = self.scan_quoted(text, 0, i + 1, partial=True)
            rest, last = text[end:], i
        except _FlowTruncated:
            lines = [text]
            for raw in self.raw[i + 1:]:
                body = raw.lstrip(' \t')
                if body and (len(raw) - len(raw.lstrip(' ')) <= parent_indent or
                             (raw == body and _is_doc_marker(raw))):
                    break
                lines.append(raw)
            joined = '\n'.join(lines)
            value, end = self.scan_quoted(joined, 0, i + 1)
            last = i + joined.count('\n', 0, end)
            rest = joined[end:].split('\n', 1)[0]
        if not _is_comment_rest(rest):
            raise self.error(last + 1, 'unexpected text after the closing quote')
        self.pos = last + 1
        return value

    def scan_quoted(self, text, start, lineno, partial=False):
        """Scan a single- or double-quoted scalar at text[start]; return (value, end index).
        Line breaks inside fold (a break is a space, blank lines are newlines); with
        `partial`, running out of text raises _FlowTruncated so that the caller adds lines."""
        quote = text[start]
        out = []
        k = start + 1
        while k < len(text):
            ch = text[k]
            if ch == '\n':
                while out and out[-1] in (' ', '\t'):
                    out.pop()  # trailing white space before a break is not content
                k = self.fold_break(text, k, out)
                continue
            if ch == quote:
                if quote == "'" and text[k + 1:k + 2] == "'":
                    out.append("'")
                    k += 2
                    continue
                return ''.join(out), k + 1
            if ch == '\\' and quote == '"':
                if k + 1 == len(text) and partial:
                    raise _FlowTruncated()
                if text[k + 1:k + 2] == '\n':  # an escaped line break joins the lines
                    k = self.fold_break(text, k + 1, [])
                    continue
                piece, k = self.escape(text, k, lineno)
                out.append(piece)
                continue
            out.append(ch)
            k += 1
        if partial:
            raise _FlowTruncated()
        raise self.error(lineno, 'unterminated quoted string — add the closing %s' % quote)

    @staticmethod
    def fold_break(text, k, out):
        """Fold the line break at text[k] and the blank lines after it into `out`; return
        the index of the next line's first non-blank character."""
        breaks = 0
        while k < len(text) and text[k] == '\n':
            breaks += 1
            k += 1
            while k < len(text) and text[k] in ' \t':
                k += 1
        out.append('\n' * (breaks - 1) if breaks > 1 else ' ')
        return k

    def escape(self, text, k, lineno):
        """Decode the double-quoted escape at text[k]; return (chars, next index)."""
        code = text[k + 1:k + 2]
        if code in _YAML_ESCAPES:
            return _YAML_ESCAPES[code], k + 2
        if code in _YAML_HEX_ESCAPES:
            digits = text[k + 2:k + 2 + _YAML_HEX_ESCAPES[code]]
            if len(digits) == _YAML_HEX_ESCAPES[code] and re.match(r'[0-9a-fA-F]+\Z', digits):
                return chr(int(digits, 16)), k + 2 + len(digits)
        if code == '':
            raise self.error(lineno, 'unterminated quoted string — add the closing "')
        raise self.error(lineno, 'invalid escape "\\%s" in a double-quoted string' % code)

    def block_header(self, lineno, text):
        """Parse a | or > header; return (style, chomp, explicit indent or 0)."""
        chomp, explicit, k = '', 0, 1
        while k < len(text) and k <= 2:
            if text[k] in '+-' and not chomp:
                chomp = text[k]
            elif text[k] in '123456789' and not explicit:
                explicit = int(text[k])
            else:
                break
            k += 1
        if not _is_comment_rest(text[k:]):
            raise self.error(lineno, 'bad block scalar header %r — use |, |-, |+, >, >- or >+' % text)
        return text[0], chomp, explicit

    def block_scalar(self, i, text, parent_indent):
        """Parse a literal (|) or folded (>) block scalar whose header is on line i."""
        style, chomp, explicit = self.block_header(i + 1, text)
        indent = max(parent_indent + explicit, 0) if explicit else None
        j = i + 1
        lines = []
        leading = 0  # the most spaces on a blank line before the first content line
        while j < len(self.raw):
            raw = self.raw[j]
            ind = len(raw) - len(raw.lstrip(' '))
            if ind == len(raw):  # spaces only: a blank line
                leading = max(leading, ind) if indent is None else leading
                lines.append(raw)
                j += 1
                continue
            if raw.strip(' \t') == '' and ind < (indent or parent_indent + 1):
                raise self.error(j + 1, 'a tab cannot indent a line of a block scalar — use spaces')
            if indent is None:
                if ind <= parent_indent:
                    break
                if leading > ind:  # YAML 1.2 §8.1.1.1
                    raise self.error(j + 1, 'a blank line above has more spaces than this first '
                                            'line of the block scalar — remove them')
                indent = ind
            if ind < indent or (ind == 0 and _is_doc_marker(raw)):
                break
            lines.append(raw)
            j += 1
        self.pos = j
        at_eof_without_newline = j == len(self.raw) and not self.final_newline
        contents = [raw[indent:] if indent is not None else '' for raw in lines]
        return self._chomp(style, chomp, contents, at_eof_without_newline)

    @staticmethod
    def _chomp(style, chomp, contents, eof_no_newline):
        """Join block scalar lines and apply the chomping indicator."""
        last = len(contents) - 1
        while last >= 0 and contents[last] == '':
            last -= 1
        body = contents[:last + 1]
        breaks = len(contents) - len(body) + (1 if body else 0) - (1 if eof_no_newline else 0)
        breaks = max(breaks, 0)
        text = '\n'.join(body) if style == '|' else _fold_lines(body)
        if chomp == '-':
            return text
        if chomp == '+':
            return text + '\n' * breaks
        return text + ('\n' if body and breaks else '')

    def flow(self, i, text):
        """Parse a [ ] or { } collection that starts on line i and may span lines."""
        expanded = self.expanded
        try:
            joined = text
            parser = _FlowParser(self, joined, i, partial=True)
            value = parser.node()
        except _FlowTruncated:  # not closed on this line: parse again with the lines below
            self.expanded = expanded
            joined = '\n'.join([text] + self.raw[i + 1:])
            parser = _FlowParser(self, joined, i)
            value = parser.node()
        end = joined.find('\n', parser.p)
        rest = joined[parser.p:] if end < 0 else joined[parser.p:end]
        if not _is_comment_rest(rest):
            raise parser.error('unexpected text after the closing bracket')
        self.pos = i + 1 + joined.count('\n', 0, parser.p)
        return value


class _FlowTruncated(Exception):
    """Internal: a flow collection ran past the end of the text it was given."""


class _FlowParser(object):
    """Parses one flow collection ([a, b] or {k: v}) from text that may hold newlines."""

    def __init__(self, owner, text, first_index, partial=False):
        self.owner = owner
        self.s = text
        self.p = 0
        self.first = first_index
        self.partial = partial  # True: the text is only the first line; more may follow

    def end_error(self, message, at=None):
        """The error for running out of text (or a signal to retry with more lines)."""
        if self.partial:
            return _FlowTruncated()
        return self.error(message, at)

    def error(self, message, at=None):
        """Build a ManifestError for the line holding position `at` (default: current)."""
        return self.owner.error(self._lineno(at), message)

    def skip_space(self):
        """Skip spaces, newlines and comments."""
        s = self.s
        while self.p < len(s):
            ch = s[self.p]
            if ch in ' \t\n':
                self.p += 1
            elif ch == '#' and (self.p == 0 or s[self.p - 1] in ' \t\n'):
                end = s.find('\n', self.p)
                self.p = len(s) if end < 0 else end
            else:
                break

    def node(self):
        """Parse any flow node at the current position."""
        self.skip_space()
        if self.p >= len(self.s):
            raise self.end_error('unexpected end of file inside [ ] or { }')
        ch = self.s[self.p]
        if ch == '[':
            return self.sequence()
        if ch == '{':
            return self.mapping()
        if ch in '"\'':
            value, self.p = self.owner.scan_quoted(self.s, self.p, self._lineno(), self.partial)
            return value
        if ch in '&*':
            m = re.compile('[&*](%s)' % _ANCHOR_NAME).match(self.s, self.p)
            if not m:
                raise self.error(_props_error(self.s[self.p:]))
            self.p = m.end()
            if ch == '*':
                return self.owner.alias(self._lineno(), m.group(1))
            self.skip_space()
            empty = self.s[self.p:self.p + 1] in (',', ']', '}', '')
            return self.owner.define(m.group(1), None if empty else self.node())
        if ch == '!':
            m = re.compile('!!(%s)(?=[ \t\n,\\]}]|\\Z)' % '|'.join(_CORE_TAGS)).match(self.s, self.p)
            if not m:
                raise self.error(_props_error(self.s[self.p:]))
            at = self.p = m.end()
            self.skip_space()
            if self.s[self.p:self.p + 1] in (',', ']', '}', ''):
                value, raw = None, ''
            elif self.s[self.p] in '&*!"\'[{':
                value, raw = self.node(), None
            else:
                value, raw = None, self.plain()
            value, problem = _core_tagged(m.group(1), value, raw)
            if problem:
                raise self.error(problem, at)
            return value
        if ch in '|>':
            raise self.error('block scalars (| or >) cannot be used inside [ ] or { }')
        if ch in ',]}:#' or (ch in '-?' and self.s[self.p + 1:self.p + 2] in ' \t\n,[]{}'):
            raise self.error('expected a value before %r' % ch)
        return _resolve_plain(self.plain())

    def _lineno(self, at=None):
        """1-based line number of position `at` (default: the current position)."""
        return self.first + 1 + self.s.count('\n', 0, self.p if at is None else at)

    def plain(self):
        """Scan a plain scalar inside a flow collection; it may go on over lines (folded)."""
        s = self.s
        out = []
        start = self.p
        while self.p < len(s):
            ch = s[self.p]
            if ch == '\n':
                out.append(s[start:self.p].rstrip(' \t'))
                k = self.p
                while k < len(s) and s[k] in ' \t\n':
                    k += 1
                if k == len(s) and self.partial:
                    raise _FlowTruncated()
                if k == len(s) or s[k] in ',[]{}#' or s[k - 1] == '\n' or (
                        s[k] == ':' and s[k + 1:k + 2] in ('', ' ', '\t', '\n', ',', ']', '}')):
                    return ''.join(out)
                fold = []
                self.p = _YamlParser.fold_break(s, self.p, fold)
                out.append(fold[0])
                start = self.p
                continue
            if ch in ',[]{}':
                break
            if ch == ':' and (self.p + 1 == len(s) or s[self.p + 1] in ' \t\n,[]{}'):
                break
            if ch == '#' and s[self.p - 1] in ' \t':
                break
            self.p += 1
        out.append(s[start:self.p].rstrip(' \t'))
        return ''.join(out)

    def sequence(self):
        """Parse [a, b, ...]."""
        start = self.p
        self.p += 1
        items = []
        while True:
            self.skip_space()
            if self.p >= len(self.s):
                raise self.end_error("unclosed '[' — add the missing ']'", start)
            if self.s[self.p] == ']':
                self.p += 1
                return items
            items.append(self.node())
            self.separator(']', start)

    def mapping(self):
        """Parse {k: v, ...}."""
        start = self.p
        self.p += 1
        result = {}
        explicit = set()
        while True:
            self.skip_space()
            if self.p >= len(self.s):
                raise self.end_error("unclosed '{' — add the missing '}'", start)
            if self.s[self.p] == '}':
                self.p += 1
                return result
            key_at = self.p
            key = self.key()
            value = None
            self.skip_space()
            self.owner.enter(key, self._lineno(key_at))
            if self.s[self.p:self.p + 1] == ':':
                self.p += 1
                self.skip_space()
                if self.s[self.p:self.p + 1] not in (',', '}', ''):
                    value = self.node()
            self.owner.path.pop()
            if key in explicit:
                raise self.error('duplicate key %r' % (key,), key_at)
            explicit.add(key)
            if key is _MERGE:
                self.owner.merge(result, value, self._lineno(key_at))
            else:
                result[key] = value
            self.separator('}', start)

    def key(self):
        """Parse a scalar mapping key inside { }."""
        ch = self.s[self.p]
        if ch in '[{':
            raise self.error('collections as mapping keys are not supported')
        if ch == '?' and self.s[self.p + 1:self.p + 2] in (' ', '\t', '\n'):
            raise self.error('complex keys ("? ") are not supported')
        if self.s.startswith('<<', self.p) and self.s[self.p + 2:self.p + 3] in (' ', ':'):
            self.p += 2
            return _MERGE
        at = self.p
        key = self.node()
        if isinstance(key, (list, dict)):  # {*alias: …} naming a collection
            raise self.error('collections as mapping keys are not supported', at)
        return key

    def separator(self, closer, start):
        """Consume the ',' between entries, or stop before the closing bracket."""
        self.skip_space()
        if self.p >= len(self.s):
            raise self.end_error("unclosed '%s' — add the missing '%s'"
                                 % ('[' if closer == ']' else '{', closer), start)
        ch = self.s[self.p]
        if ch == ',':
            self.p += 1
        elif ch == ':' and closer == ']':
            raise self.error('"key: value" inside [ ] is not supported — use { } for mappings')
        elif ch != closer:
            hint = '' if self._lineno() == self._lineno(start) else \
                " — is the '%s' from line %d missing?" % (closer, self._lineno(start))
            raise self.error("expected ',' or '%s'%s" % (closer, hint))


def parse_yaml(text, filename, key_lines=None):
    """Parse a convox.yml/compose YAML document (a practical subset) into Python values;
    `key_lines` (a dict) receives the line of each key path ("services.web.ports")."""
    parser = _YamlParser(text, filename)
    if key_lines is not None:
        parser.key_lines = key_lines
    try:
        return parser.parse()
    except RecursionError:  # each level of nesting is a level of recursion
        raise parser.error(max(parser.pos, 1), "nested too deeply — flatten it")


# -- .env files -----------------------------------------------------------------------------

# Compose's dotenv rules (compose-go's dotenv parser): KEY=VALUE, KEY: VALUE, "export KEY=",
# a bare KEY (taken from the environment), quotes that may span lines, " #" comments after
# unquoted values, and ${VAR} expansion in unquoted and double-quoted values. One pass over
# the text: a quote that is never closed costs one scan, not one per line.
_ENV_SPACE = re.compile(r'\s*')
_ENV_INLINE_SPACE = re.compile('[ \t\v\f\r\x85\xa0]*')
_ENV_EXPORT = re.compile('export[ \t\v\f\r\x85\xa0]+')
_ENV_KEY_RUN = re.compile('[\\w.\\-\\[\\] \t\v\f\r\x85\xa0]*')
_ENV_QUOTE_STOP = {'"': re.compile(r'[\\"]'), "'": re.compile(r"[\\']")}
#: Escapes decoded in double quotes; \$ stays a literal $ (compose turns it into $$).
_ENV_ESCAPES = re.compile(r'\\(?:([abfnrtv"\\])|(\$)|0([0-7]{3}))')
_ENV_ESCAPE_CHARS = {'a': '\a', 'b': '\b', 'f': '\f', 'n': '\n', 'r': '\r', 't': '\t',
                     'v': '\v', '"': '"', '\\': '\\'}


def _env_escape(match):
    """One double-quoted escape of a .env value."""
    if match.group(2):
        return '$$'
    if match.group(3):
        return chr(int(match.group(3), 8))
    return _ENV_ESCAPE_CHARS[match.group(1)]


def parse_env_file(text, filename, environ=None, known=None):
    """Parse a .env file into a dict. ${VAR} and $VAR read `environ` first, then `known` (the
    values already set, e.g. the service's environment), then the file's earlier lines —
    compose's order."""
    out = {}
    lookup = collections.ChainMap(environ or {}, known or {}, out)
    if text.startswith('\ufeff'):
        text = text[1:]
    pos, line, counted = 0, 1, 0
    while True:
        pos = _ENV_SPACE.match(text, pos).end()
        line += text.count('\n', counted, pos)
        counted = pos
        if pos >= len(text):
            return out
        if text[pos] == '#':
            pos = text.find('\n', pos)
            if pos < 0:
                return out
            continue
        start = pos
        export = _ENV_EXPORT.match(text, pos)
        if export:
            pos = export.end()
        end = _ENV_KEY_RUN.match(text, pos).end()
        where = '%s:%d' % (filename, line)
        stop = text[end:end + 1]
        if stop not in ('=', ':', '\n', ''):
            raise ManifestError('%s: unexpected character %r in variable name %r — use KEY=VALUE'
                                % (where, stop, text[start:].split('\n', 1)[0]))
        key = text[pos:end].strip()
        if re.search(r'\s', key):
            raise ManifestError('%s: a variable name cannot contain a space (%r) — use KEY=VALUE'
                                % (where, key))
        if stop in ('\n', ''):  # a bare KEY: its value comes from the environment, if set
            if key in (environ or {}):
                out[key] = environ[key]
            pos = end
            continue
        pos = _ENV_INLINE_SPACE.match(text, end + 1).end()
        quote = text[pos:pos + 1]
        if quote in _ENV_QUOTE_STOP:
            value, pos = _env_quoted(text, pos, where, key)
            if quote == "'":
                out[key] = value
                continue
            value = _ENV_ESCAPES.sub(_env_escape, value)
        else:
            eol = text.find('\n', pos)
            eol = len(text) if eol < 0 else eol
            value = text[pos:eol].split(' #', 1)[0].rstrip()
            pos = eol
        out[key] = _interpolate_str(value, lookup, where, [], False)


def _env_quoted(text, pos, where, key):
    """Scan the quoted value at text[pos]; -> (value with escapes still in, end)."""
    quote = text[pos]
    finder = _ENV_QUOTE_STOP[quote]
    pieces = []
    k = pos + 1
    while True:
        m = finder.search(text, k)
        if m is None or (text[m.start()] == '\\' and m.start() + 1 == len(text)):
            raise ManifestError('%s: unterminated quoted value for %s — add the closing %s'
                                % (where, key, quote))
        j = m.start()
        pieces.append(text[k:j])
        if text[j] == quote:
            return ''.join(pieces), j + 1
        escaped = text[j + 1]  # a backslash: \<quote> is the quote, anything else stays as is
        pieces.append(escaped if escaped == quote else '\\' + escaped)
        k = j + 2


# -- interpolation --------------------------------------------------------------------------

_INTERP_NAME = r'[_A-Za-z][_A-Za-z0-9]*'
_INTERP_BRACED = r'([_A-Za-z][_A-Za-z0-9]*)(?:(:?[-?+])(.*))?\Z'


#: How deep ``${...}`` may nest (``${A:-${B:-x}}`` is 2).  Each level is evaluated by
#: recursion and rescanned to its end: 100,000 levels would exhaust the stack after minutes.
INTERPOLATION_DEPTH = 32


def _closing_brace(text, start):
    """Index of the '}' closing the '${' whose body starts at `start`; -1 when there is none,
    -2 when '${' nests deeper than INTERPOLATION_DEPTH before it. Every '{' opens a level,
    as compose counts them, so ${V:-{"json":1}} keeps its braces."""
    depth = 1
    for k in range(start, len(text)):
        if text[k] == '{':
            depth += 1
            if depth > INTERPOLATION_DEPTH and text[k - 1] == '$':
                return -2
        elif text[k] == '}':
            depth -= 1
            if depth == 0:
                return k
    return text.find('}', start)  # unbalanced: compose falls back to the first '}'


def _interpolate_braced(body, variables, filename, missing, braces_only):
    """Evaluate the inside of one ${...} expression."""
    if braces_only:  # convox.yml: Convox's rule, ${ANYTHING} is that variable's value or nothing
        value = variables.get(body)
        if value is None:
            missing.append(body)
        return value or ''
    m = re.match(_INTERP_BRACED, body, re.S)
    if not m:
        raise ManifestError('%s: invalid interpolation "${%s}" — use ${NAME}, ${NAME:-default} or '
                            'write $$ for a literal $' % (filename, body))
    name, op, arg = m.group(1), m.group(2), m.group(3)
    value = variables.get(name)
    if op is None:
        if value is None:
            missing.append(name)
            return ''
        return value
    is_set = value is not None and (value != '' or ':' not in op)
    if op[-1] == '-':
        return value if is_set else _interpolate_str(arg, variables, filename, missing, braces_only)
    if op[-1] == '+':
        return _interpolate_str(arg, variables, filename, missing, braces_only) if is_set else ''
    if not is_set:  # ? and :?
        detail = _interpolate_str(arg, variables, filename, missing, braces_only)
        raise ManifestError('%s: required variable %s is missing a value%s'
                            % (filename, name, ': ' + detail if detail else ''))
    return value


def _interpolate_str(text, variables, filename, missing, braces_only):
    """Substitute variables in one string."""
    if '$' not in text:
        return text
    out = []
    k = 0
    while k < len(text):
        dollar = text.find('$', k)
        if dollar < 0:
            out.append(text[k:])
            break
        out.append(text[k:dollar])
        nxt = text[dollar + 1:dollar + 2]
        if nxt == '{':
            end = text.find('}', dollar) if braces_only else _closing_brace(text, dollar + 2)
            if end < 0 and braces_only:  # convox leaves what its pattern does not match
                out.append(text[dollar:])
                break
            try:
                if end == -2:
                    raise ManifestError('%s: "${" nested more than %d deep — simplify the '
                                        'defaults' % (filename, INTERPOLATION_DEPTH))
                if end < 0:
                    raise ManifestError('%s: unterminated "${" in %r — close it with "}" or write '
                                        '$$ for a literal $' % (filename, text))
                out.append(_interpolate_braced(text[dollar + 2:end], variables, filename, missing,
                                               braces_only))
            except ManifestError as exc:  # remember the innermost ${...}: its line is found later
                if getattr(exc, 'fragment', None) is None:
                    exc.fragment = text[dollar:end + 1] if end >= 0 else text[dollar:]
                raise
            k = end + 1
            continue
        if not braces_only:
            if nxt == '$':
                out.append('$')
                k = dollar + 2
                continue
            m = re.compile(_INTERP_NAME).match(text, dollar + 1)
            if m:
                out.append(_interpolate_braced(m.group(0), variables, filename, missing, braces_only))
                k = m.end()
                continue
        out.append('$')
        k = dollar + 1
    return ''.join(out)


def _interpolate_value(value, variables, filename, missing, braces_only):
    """Recursively substitute variables in strings, lists and mappings (keys too)."""
    if isinstance(value, str):
        return _interpolate_str(value, variables, filename, missing, braces_only)
    if isinstance(value, list):
        return [_interpolate_value(v, variables, filename, missing, braces_only) for v in value]
    if isinstance(value, dict):
        return dict((_interpolate_value(k, variables, filename, missing, braces_only),
                     _interpolate_value(v, variables, filename, missing, braces_only))
                    for k, v in value.items())
    return value


def interpolate(value, variables, filename, braces_only=False):
    """Substitute ${VAR}-style variables compose-style; return (new_value, missing_names)."""
    # braces_only=True is convox.yml's rule: each ${...} (up to the first "}") is replaced by
    # the variable of that name or by nothing, while $VAR and $$ are left for the container's
    # shell (convox's own interpolate() matches just \$\{([^}]*?)\}).
    missing = []
    result = _interpolate_value(value, variables, filename, missing, braces_only)
    unique = []
    for name in missing:
        if name not in unique:
            unique.append(name)
    return result, unique


# -- manifest model -------------------------------------------------------------------------

#: Service names: Convox's, and the compose spec's (which allows upper case).
_SERVICE_NAME = {'convox': r'[a-z0-9][a-z0-9_.-]*\Z', 'compose': r'[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z'}
_VOLUME_NAME = r'[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z'
_ENV_KEY = r'[A-Za-z_][A-Za-z0-9_.-]*\Z'
# Real convox.yml keys (convox/convox pkg/manifest) that have no meaning for a local run.
_CONVOX_TOP_IGNORED = ('resources', 'timers', 'balancers', 'params', 'labels', 'configs',
                       'appSettings', 'budget')
_CONVOX_SERVICE_IGNORED = (
    'health', 'domain', 'resources', 'timeout', 'termination', 'deployment', 'agent', 'sticky',
    'internal', 'certificate', 'drain', 'singleton', 'tls', 'whitelist', 'init', 'test', 'labels',
    'annotations', 'privileged', 'internalRouter', 'ingressAnnotations', 'configMounts',
    'accessControl', 'volumeOptions', 'dnsConfig', 'lifecycle', 'liveness', 'startupProbe',
    'grpcHealthEnabled', 'disableHostUsers', 'imagePullSecrets', 'initContainer',
    'nodeAffinityLabels', 'nodeSelectorLabels', 'securityContext', 'nlb')
_CONVOX_SCALE_IGNORED = ('count', 'cpu', 'gpu', 'targets', 'keda', 'vpa', 'min', 'max', 'autoscale')
_COMPOSE_TOP_IGNORED = ('version', 'networks', 'secrets', 'configs')
# Accepted quietly: they only affect naming/networking/restarts that convox start manages itself.
_COMPOSE_SERVICE_QUIET = ('container_name', 'networks', 'expose', 'deploy')
_MEMORY_UNITS = {'': 1, 'b': 1, 'k': 1 << 10, 'm': 1 << 20, 'g': 1 << 30, 't': 1 << 40, 'p': 1 << 50}


class Service(object):
    """One service of a manifest, normalised for both convox.yml and compose files."""

    def __init__(self, name):
        self.name = name
        self.build = None
        self.image = None
        self.command = None
        self.entrypoint = None
        self.environment = {}
        self.ports = []
        self.memory = None
        self.volumes = []
        self.links = []
        self.labels = {}
        self.healthcheck = None   # the engine's Config.Healthcheck, or None for the image's
        self.conditions = {}      # dependency -> service_started|_healthy|_completed_successfully
        self.profiles = []        # compose profiles: start only when one is active or named
        self.working_dir = ''
        self.user = ''

    def __repr__(self):
        return '<Service %s>' % self.name


class Manifest(object):
    """A loaded convox.yml or compose file."""

    def __init__(self, path, kind):
        self.path = path
        self.directory = os.path.dirname(path)
        self.kind = kind
        self.services = {}
        self.warnings = []
        self.name = None          # compose's top-level name: (the project name)
        self.variables = {}       # the environment over .env: what ${VAR} reads
        self.volume_names = {}    # compose volume key -> its engine name when set by name:/external

    def dependencies(self, name):
        """Services `name` needs, transitively, dependencies first and `name` last."""
        if name not in self.services:
            raise ManifestError('no service named %r (services: %s)'
                                % (name, ', '.join(self.services) or 'none'))
        order = []
        state = {}

        def visit(current, trail):
            """Depth-first post-order walk over links, detecting cycles."""
            if state.get(current) == 'done':
                return
            if state.get(current) == 'active':
                cycle = trail[trail.index(current):] + [current]
                raise ManifestError('dependency cycle: %s' % ' -> '.join(cycle))
            state[current] = 'active'
            for dep in self.services[current].links:
                visit(dep, trail + [current])
            state[current] = 'done'
            order.append(current)

        visit(name, [])
        return order

    def selected(self, profiles):
        """Every service to start when none is named, dependencies first: those without
        profiles and those in an active profile ("*": all), as compose selects them."""
        active = set(profiles)
        enabled = [name for name, svc in self.services.items()
                   if not svc.profiles or '*' in active or active & set(svc.profiles)]
        order = []
        for name in enabled:
            for dep in self.dependencies(name):
                if dep not in enabled:
                    raise ManifestError('service %s depends on %s, which is only in profile %s — '
                                        'add --profile %s' % (
                                            name, dep, ', '.join(self.services[dep].profiles),
                                            self.services[dep].profiles[0]))
                if dep not in order:
                    order.append(dep)
        return order


class _Ctx(object):
    """What the manifest builders share: file name for messages, folder, variables, warnings."""

    def __init__(self, manifest, display, variables, dotenv):
        self.manifest = manifest
        self.display = display
        self.directory = manifest.directory
        self.variables = variables  # environ over .env
        self.dotenv = dotenv  # the .env file alone: what convox's "*" entry expands to
        self.missing_required = set()
        self.unsupported = {}  # warned key ('services.*.restart') -> services that have it
        self.key_lines = {}  # key path -> line, from the parser

    def error(self, where, message):
        """A ManifestError naming the file, the line of the key (or of the nearest key
        above it that the file writes) and the key path."""
        parts = where.split('.') if where else []
        for n in range(len(parts), 0, -1):
            line = self.key_lines.get('.'.join(parts[:n]))
            if line:
                return ManifestError('%s:%d: %s %s' % (self.display, line, where, message))
        return ManifestError('%s: %s %s' % (self.display, where, message) if where
                             else '%s: %s' % (self.display, message))

    def warn(self, where):
        """Record an ignored, unsupported key; the same key in several services is one line
        (`services.*.restart … (57 services: a, b, …)`), so that real files stay readable."""
        m = re.match(r'services\.([^.]+)\.(.+)\Z', where)
        key = 'services.*.%s' % m.group(2) if m else where
        services = self.unsupported.get(key)
        if services is None:
            services = self.unsupported[key] = []
            self.manifest.warnings.append(key)  # a placeholder, written out by warnings_done()
        services.append(m.group(1) if m else None)

    def warnings_done(self):
        """Turn the recorded keys into WARNING lines."""
        warnings = self.manifest.warnings
        for index, key in enumerate(warnings):
            services = self.unsupported.get(key)
            if services is None:
                continue
            if len(services) == 1:
                key = key.replace('*', services[0], 1) if services[0] else key
                warnings[index] = '%s: %s is not supported and is ignored' % (self.display, key)
            else:
                names = ', '.join(services[:3]) + (', …' if len(services) > 3 else '')
                warnings[index] = '%s: %s is not supported and is ignored (%d services: %s)' % (
                    self.display, key, len(services), names)

    def path(self, value):
        """Resolve a path from the manifest against the manifest's folder."""
        return os.path.normpath(os.path.join(self.directory, os.path.expanduser(value)))


def _display_path(path):
    """A path for messages: relative to the working directory when below it."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith('..') else rel


def _read_text(path, display):
    """Read a UTF-8 text file or raise ManifestError."""
    try:
        data = read_regular_file(path, TEXT_FILE_MAX)
    except OSError as e:
        raise ManifestError('%s: cannot read: %s' % (display, e.strerror or e))
    try:
        return data.decode('utf-8')
    except UnicodeDecodeError:
        raise ManifestError('%s: not valid UTF-8 text' % display)


def _key_str(key, ctx, where):
    """Mapping keys as strings: YAML may have made them ints or bools."""
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return 'true' if key else 'false'
    if isinstance(key, (int, float)):
        return str(key)
    raise ctx.error(where, 'has an empty key')


def _scalar_str(value, ctx, where):
    """Render a scalar value as a string the way compose does (true/false, 1, 1.5)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == value and abs(value) < 1e21 and value == int(value):
            return str(int(value))
        return repr(value)
    raise ctx.error(where, 'must be a string, not a %s' % _type_name(value))


def _type_name(value):
    """A user-facing name for a parsed YAML value's type."""
    if value is None:
        return 'null'
    if isinstance(value, bool):
        return 'boolean'
    if isinstance(value, (int, float)):
        return 'number'
    if isinstance(value, list):
        return 'list'
    if isinstance(value, dict):
        return 'mapping'
    return 'string'


def _expect(value, types, ctx, where, what):
    """Return value if it has one of `types`, else raise '<where> must be <what>'."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:  # YAML true is not a number here
        raise ctx.error(where, 'must be %s' % what)
    if not isinstance(value, types):
        raise ctx.error(where, 'must be %s' % what)
    return value


def _string_list(value, ctx, where, what='a list of strings'):
    """A list of scalars as strings."""
    _expect(value, list, ctx, where, what)
    out = []
    for item in value:
        if isinstance(item, (list, dict)) or item is None:
            raise ctx.error(where, 'must be %s' % what)
        out.append(_scalar_str(item, ctx, where))
    return out


def _port_number(value, ctx, where):
    """Validate a port number (int or digit string)."""
    if isinstance(value, str) and re.match(r'[0-9]+\Z', value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ctx.error(where, 'must be a port number between 1 and 65535')
    return value


def _port(host_ip, host_port, container_port, protocol):
    """One published port in the model's shape."""
    return {'host_ip': host_ip, 'host_port': host_port, 'container_port': container_port,
            'protocol': protocol}


def _parse_memory(value, ctx, where):
    """Docker memory sizes (512m, 1g, 1.5g, 268435456) in MiB, rounded up."""
    if isinstance(value, bool) or value is None:
        raise ctx.error(where, 'must be a size like 512m or 1g')
    if isinstance(value, (int, float)):
        size = value
    elif isinstance(value, str):
        m = re.match(r'\s*([0-9]+(?:\.[0-9]+)?) ?([bkmgtp]?)i?b?\s*\Z', value, re.I)
        if not m:
            raise ctx.error(where, 'must be a size like 512m or 1g')
        size = float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()]
    else:
        raise ctx.error(where, 'must be a size like 512m or 1g')
    if not abs(size) < float('inf'):  # .inf and .nan are YAML floats too
        raise ctx.error(where, 'must be a size like 512m or 1g, not %s' % value)
    return int(-(-size // (1 << 20)))


def _short_volume(spec, ctx, where):
    """Parse "/path", "name:/path", "./rel:/path[:ro]" volume strings."""
    parts = spec.split(':')
    if len(parts) > 3 or not spec:
        raise ctx.error(where, 'has a bad volume %r — use SOURCE:TARGET[:ro]' % spec)
    if len(parts) == 1:
        source, target, options = '', parts[0], ''
    else:
        source, target = parts[0], parts[1]
        options = parts[2] if len(parts) == 3 else ''
    if not target.startswith('/'):
        raise ctx.error(where, 'has a bad volume %r — the target must be an absolute path' % spec)
    read_only = 'ro' in options.split(',')
    if not source:
        return {'type': 'volume', 'source': '', 'target': target, 'read_only': read_only}
    if source[0] in './~':
        return {'type': 'bind', 'source': ctx.path(source), 'target': target, 'read_only': read_only}
    if not re.match(_VOLUME_NAME, source):
        raise ctx.error(where, 'has a bad volume name %r' % source)
    return {'type': 'volume', 'source': source, 'target': target, 'read_only': read_only}


def _check_links(ctx):
    """Every link/depends_on must name a service of this manifest."""
    services = ctx.manifest.services
    for svc in services.values():
        for dep in svc.links:
            if dep not in services:
                raise ctx.error('services.%s' % svc.name,
                                'depends on unknown service %r (services: %s)'
                                % (dep, ', '.join(services)))


def _service_map(top, ctx):
    """The services mapping of a manifest, validated."""
    services = top.get('services')
    if services is None or services == {}:
        raise ctx.error('', 'no services defined — add a "services:" section')
    _expect(services, dict, ctx, 'services', 'a mapping of service names')
    out = []
    for key, spec in services.items():
        name = _key_str(key, ctx, 'services')
        if not re.match(_SERVICE_NAME[ctx.manifest.kind], name):
            raise ctx.error('services.%s' % name, 'is not a valid service name — use %sletters, '
                            'digits, "-", "_" and "."' % ('lowercase ' * (ctx.manifest.kind == 'convox')))
        where = 'services.%s' % name
        if spec is None:
            spec = {}
        _expect(spec, dict, ctx, where, 'a mapping')
        out.append((name, where, spec))
    return out


# -- convox.yml -----------------------------------------------------------------------------

def _convox_env_list(value, ctx, where):
    """Parse a convox environment list into [(KEY, default or None)]."""
    if value is None:
        return []
    entries = _string_list(value, ctx, where, 'a list of KEY or KEY=default')
    out = []
    for entry in entries:
        key, sep, default = entry.partition('=')
        key = key.strip()
        if key == '*' and not sep:
            out.append(('*', None))  # every variable of the app (locally: the .env file)
            continue
        if not re.match(_ENV_KEY, key):
            raise ctx.error(where, 'has a bad entry %r — use KEY or KEY=default' % entry)
        out.append((key, default if sep else None))
    return out


def _convox_build(value, ctx, where):
    """services.X.build: a path or {path, manifest}."""
    if value is None:
        value = '.'
    if isinstance(value, str):
        return {'context': ctx.path(value), 'dockerfile': 'Dockerfile', 'args': {}}
    _expect(value, dict, ctx, where, 'a path or a mapping with path and manifest')
    path, dockerfile, args = '.', 'Dockerfile', {}
    for key, item in value.items():
        key = _key_str(key, ctx, where)
        if key == 'path':
            path = _expect(item, str, ctx, where + '.path', 'a path')
        elif key == 'manifest':
            dockerfile = _expect(item, str, ctx, where + '.manifest', 'a Dockerfile name')
        elif key == 'args':
            args = _compose_kv_list(_expect(item, list, ctx, where + '.args', 'a list of KEY or KEY=value'),
                                    ctx, where + '.args', ctx.variables.get)
        else:
            ctx.warn('%s.%s' % (where, key))
    return {'context': ctx.path(path), 'dockerfile': dockerfile, 'args': args}


def _convox_command(value, ctx, where):
    """A string command is split into words as Convox splits it (shell quoting, no shell:
    go-shellquote), keeping the image's ENTRYPOINT; a list is the argv."""
    if isinstance(value, str) and not value.strip():
        return None
    return _compose_command(value, ctx, where)


def _convox_port(value, ctx, where):
    """`port: 3000`, `port: SCHEME:3000` (http, https, grpc …) or {port, scheme}."""
    if isinstance(value, dict):
        value = value.get('port')
    number = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        m = re.match(r'\s*(?:[A-Za-z][A-Za-z0-9+.-]*:)?([0-9]+)\s*\Z', value)
        number = int(m.group(1)) if m else None
    if number is None or not 1 <= number <= 65535:
        raise ctx.error(where, 'must be a number or "SCHEME:NUMBER" like http:3000 or grpc:50051')
    return _port('127.0.0.1', number, number, 'tcp')


def _convox_ports(value, ctx, where):
    """`ports: [5000, "5001/udp"]`: extra ports published on the same host port."""
    out = []
    for item in _string_list(value, ctx, where, 'a list of NUMBER or NUMBER/udp'):
        m = re.match(r'\s*([0-9]+)(?:/(tcp|udp))?\s*\Z', item)
        if not m:
            raise ctx.error(where, 'must be a list of NUMBER or NUMBER/udp')
        number = _port_number(m.group(1), ctx, where)
        out.append(_port('127.0.0.1', number, number, m.group(2) or 'tcp'))
    return out


def _convox_scale(value, ctx, where):
    """Return the memory in MiB: scale.limit.memory (the hard limit) or else scale.memory."""
    if not isinstance(value, dict):
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return None  # "scale: 2" / "scale: 1-3" is a count
        raise ctx.error(where, 'must be a mapping like {count: 1, memory: 512}')
    memory = limit = None
    for key, item in value.items():
        key = _key_str(key, ctx, where)
        if key == 'memory':
            memory = _megabytes(item, ctx, where + '.memory')
        elif key == 'limit':
            _expect(item, dict, ctx, where + '.limit', 'a mapping like {memory: 1024}')
            if item.get('memory') is not None:
                limit = _megabytes(item['memory'], ctx, where + '.limit.memory')
        elif key not in _CONVOX_SCALE_IGNORED:
            ctx.warn('%s.%s' % (where, key))
    return memory if limit is None else limit


def _megabytes(value, ctx, where):
    """A convox memory amount: a whole number of megabytes."""
    if isinstance(value, str) and re.match(r'\s*[0-9]+\s*\Z', value):
        value = int(value)
    return _expect(value, int, ctx, where, 'a number of megabytes')


def _convox_service(name, where, spec, top_env, ctx):
    """Build one Service from a convox.yml service mapping."""
    svc = Service(name)
    own_env = []
    has_build = False
    for key, value in spec.items():
        key = _key_str(key, ctx, where)
        at = '%s.%s' % (where, key)
        if key == 'build':
            svc.build, has_build = _convox_build(value, ctx, at), True
        elif key == 'image':
            svc.image = _expect(value, str, ctx, at, 'an image name')
        elif key == 'command':
            svc.command = _convox_command(value, ctx, at)
        elif key == 'environment':
            own_env = _convox_env_list(value, ctx, at)
        elif key == 'port':
            svc.ports.insert(0, _convox_port(value, ctx, at))
        elif key == 'ports':
            svc.ports.extend(_convox_ports(value, ctx, at))
        elif key == 'scale':
            svc.memory = _convox_scale(value, ctx, at)
        elif key == 'volumes':
            svc.volumes = [_short_volume(v, ctx, at) for v in _string_list(value, ctx, at)]
        elif key == 'links':
            svc.links = _string_list(value, ctx, at, 'a list of service names')
        elif key not in _CONVOX_SERVICE_IGNORED:
            ctx.warn(at)
    if not has_build and svc.image is None:
        svc.build = _convox_build('.', ctx, where + '.build')  # convox builds "." by default
    svc.environment = _convox_env_values(top_env + own_env, ctx)
    return svc


def _convox_env_values(entries, ctx):
    """Final values: environ/.env beat defaults; required keys with no value are collected."""
    declared = {}
    for key, default in entries:
        if key == '*':
            for name in ctx.dotenv:
                declared.setdefault(name, '')
            continue
        declared[key] = default  # later (service) entries win over top-level ones
    values = {}
    for key, default in declared.items():
        if key in ctx.variables:
            values[key] = ctx.variables[key]
        elif default is not None:
            values[key] = default
        else:
            ctx.missing_required.add(key)
    return values


def _build_convox(data, ctx):
    """Fill ctx.manifest from a parsed convox.yml."""
    top = _expect(data, dict, ctx, '', 'a mapping with a "services:" section')
    for key in top:
        key = _key_str(key, ctx, '')
        if key not in ('environment', 'services') + _CONVOX_TOP_IGNORED:
            ctx.warn(key)
    top_env = _convox_env_list(top.get('environment'), ctx, 'environment')
    for name, where, spec in _service_map(top, ctx):
        ctx.manifest.services[name] = _convox_service(name, where, spec, top_env, ctx)
    _check_links(ctx)
    if ctx.missing_required:
        raise ManifestError('required env: %s' % ', '.join(sorted(ctx.missing_required)))


# -- compose --------------------------------------------------------------------------------

def _compose_kv_list(value, ctx, where, unset):
    """Compose "KEY=VALUE" lists or KEY: VALUE maps; `unset(key)` supplies a bare KEY's value."""
    out = {}
    if value is None:
        return out
    if isinstance(value, dict):
        for key, item in value.items():
            key = _key_str(key, ctx, where)
            if item is None:
                fallback = unset(key)
                if fallback is not None:
                    out[key] = fallback
            else:
                out[key] = _scalar_str(item, ctx, '%s.%s' % (where, key))
        return out
    for entry in _string_list(value, ctx, where, 'a list of KEY=VALUE or a mapping'):
        key, sep, item = entry.partition('=')
        if sep:
            out[key] = item
        else:
            fallback = unset(key.strip())
            if fallback is not None:
                out[key.strip()] = fallback
    return out


def _compose_build(value, ctx, where):
    """build: a context path or {context, dockerfile, args}."""
    if isinstance(value, str):
        value = {'context': value}
    _expect(value, dict, ctx, where, 'a path or a mapping with context, dockerfile and args')
    context, dockerfile, args, target = '.', 'Dockerfile', {}, None
    for key, item in value.items():
        key = _key_str(key, ctx, where)
        at = '%s.%s' % (where, key)
        if key == 'context':
            context = _expect(item, str, ctx, at, 'a path')
        elif key == 'dockerfile':
            dockerfile = _expect(item, str, ctx, at, 'a file name')
        elif key == 'args':
            args = _compose_kv_list(item, ctx, at, ctx.variables.get)
        elif key == 'target':
            target = _expect(item, str, ctx, at, 'the name of a build stage')
        else:
            ctx.warn(at)
    if re.match(r'[a-z][a-z0-9+.-]*://', context) or context.startswith('git@'):
        raise ctx.error(where + '.context', 'is a remote URL; only local build folders are supported')
    build = {'context': ctx.path(context), 'dockerfile': dockerfile, 'args': args}
    if target:
        build['target'] = target
    return build


def _compose_command(value, ctx, where):
    """A string command is split like a shell would (compose semantics); a list is the argv."""
    if value is None:
        return None
    if isinstance(value, str):
        import shlex
        try:
            return shlex.split(value)
        except ValueError as e:
            raise ctx.error(where, 'cannot be split into arguments: %s' % e)
    return _string_list(value, ctx, where, 'a string or a list of strings')


def _port_range(text, ctx, where):
    """'8080' or '8080-8085' -> list of ints."""
    m = re.match(r'([0-9]+)(?:-([0-9]+))?\Z', text)
    if not m:
        raise ctx.error(where, 'has a bad port %r' % text)
    first = _port_number(m.group(1), ctx, where)
    last = _port_number(m.group(2), ctx, where) if m.group(2) else first
    if last < first:
        raise ctx.error(where, 'has a bad port range %r' % text)
    return list(range(first, last + 1))


def _compose_port_string(text, ctx, where):
    """Parse "80", "8080:80", "127.0.0.1:8080:80", "[::1]:8080:80", "8080:80/udp", ranges."""
    spec, _, protocol = text.strip().partition('/')
    protocol = protocol.lower() or 'tcp'
    if protocol not in ('tcp', 'udp'):
        raise ctx.error(where, 'has an unsupported protocol in %r (use tcp or udp)' % text)
    host_ip = '0.0.0.0'
    if spec.startswith('['):
        end = spec.find(']')
        if end < 0 or spec[end + 1:end + 2] != ':':
            raise ctx.error(where, 'has a bad port %r' % text)
        host_ip, spec = spec[1:end], spec[end + 2:]
        parts = spec.split(':')
    else:
        parts = spec.split(':')
        if len(parts) == 3:
            host_ip = parts.pop(0) or '0.0.0.0'
    if len(parts) == 1:
        parts.insert(0, '')
    if len(parts) != 2:
        raise ctx.error(where, 'has a bad port %r — use [HOST_IP:][HOST_PORT:]PORT[/udp]' % text)
    containers = _port_range(parts[1], ctx, where)
    hosts = _port_range(parts[0], ctx, where) if parts[0] else [None] * len(containers)
    if len(hosts) != len(containers):
        raise ctx.error(where, 'has port ranges of different sizes in %r' % text)
    return [_port(host_ip, h, c, protocol) for h, c in zip(hosts, containers)]


def _compose_port_long(value, ctx, where):
    """Parse the long port form {target, published, host_ip, protocol}."""
    target, published, host_ip, protocol = None, None, '0.0.0.0', 'tcp'
    for key, item in value.items():
        key = _key_str(key, ctx, where)
        at = '%s.%s' % (where, key)
        if key == 'target':
            target = _port_number(item, ctx, at)
        elif key == 'published':
            if item not in (None, ''):
                published = _port_number(item, ctx, at)
        elif key == 'host_ip':
            host_ip = _expect(item, str, ctx, at, 'an IP address')
        elif key == 'protocol':
            protocol = _expect(item, str, ctx, at, 'tcp or udp').lower()
            if protocol not in ('tcp', 'udp'):
                raise ctx.error(at, 'must be tcp or udp')
        elif key not in ('mode', 'name', 'app_protocol'):
            ctx.warn(at)
    if target is None:
        raise ctx.error(where, 'needs a target port')
    return _port(host_ip, published, target, protocol)


def _compose_ports(value, ctx, where):
    """ports: list of strings, numbers or long-form mappings."""
    _expect(value, list, ctx, where, 'a list')
    out = []
    for item in value:
        if isinstance(item, dict):
            out.append(_compose_port_long(item, ctx, where))
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(_port('0.0.0.0', None, _port_number(item, ctx, where), 'tcp'))
        elif isinstance(item, str):
            out.extend(_compose_port_string(item, ctx, where))
        else:
            raise ctx.error(where, 'entries must be strings like "8080:80" or numbers')
    return out


def _compose_volume_long(value, ctx, where):
    """Parse the long volume form {type, source, target, read_only}; None for unsupported types."""
    source = value.get('source') or ''
    kind = value.get('type') or ('bind' if str(source)[:1] in './~' else 'volume')
    if kind not in ('bind', 'volume'):
        ctx.manifest.warnings.append('%s: %s: volumes of type %s are not supported and are ignored'
                                     % (ctx.display, where, kind))
        return None
    target = _expect(value.get('target'), str, ctx, where + '.target', 'an absolute path')
    if not target.startswith('/'):
        raise ctx.error(where + '.target', 'must be an absolute path')
    source = _expect(source, str, ctx, where + '.source', 'a path or volume name')
    read_only = _expect(value.get('read_only', False), bool, ctx, where + '.read_only', 'true or false')
    if kind == 'bind':
        if not source:
            raise ctx.error(where + '.source', 'is required for a bind mount')
        source = ctx.path(source)
    return {'type': kind, 'source': source, 'target': target, 'read_only': read_only}


def _compose_volumes(value, ctx, where):
    """volumes: short strings or long-form mappings."""
    _expect(value, list, ctx, where, 'a list')
    out = []
    for item in value:
        if isinstance(item, dict):
            volume = _compose_volume_long(item, ctx, where)
            if volume:
                out.append(volume)
        elif isinstance(item, str):
            out.append(_short_volume(item, ctx, where))
        else:
            raise ctx.error(where, 'entries must be strings like "./src:/app" or mappings')
    return out


def _compose_env_files(value, ctx, where, service_env):
    """Merge env_file files in order (later files win); ${VAR} in them reads the project's
    variables, then the service's environment, then earlier values (compose's order)."""
    entries = value if isinstance(value, list) else [value]
    out = {}
    for entry in entries:
        required = True
        if isinstance(entry, dict):
            required = entry.get('required', True) is not False
            entry = entry.get('path')
        path = ctx.path(_expect(entry, str, ctx, where, 'a path or a list of paths'))
        display = _display_path(path)
        if not os.path.isfile(path):
            if required:
                raise ctx.error(where, 'file %s not found' % display)
            continue
        out.update(parse_env_file(_read_text(path, display), display, ctx.variables,
                                  collections.ChainMap(service_env, out)))
    return out


_CONDITIONS = ('service_started', 'service_healthy', 'service_completed_successfully')


def _compose_depends(value, ctx, where):
    """depends_on: a list, or a mapping of service -> {condition, required, restart};
    returns [(service, condition)]."""
    if not isinstance(value, dict):
        return [(name, 'service_started')
                for name in _string_list(value, ctx, where, 'a list of service names')]
    out = []
    for key, item in value.items():
        name = _key_str(key, ctx, where)
        at = '%s.%s' % (where, name)
        condition = 'service_started'
        for option, setting in _expect(item if item is not None else {}, dict, ctx, at,
                                       'a mapping like {condition: service_healthy}').items():
            option = _key_str(option, ctx, at)
            if option == 'condition':
                condition = setting
                if condition not in _CONDITIONS:
                    raise ctx.error(at + '.condition', 'must be one of %s' % ', '.join(_CONDITIONS))
            elif option not in ('required', 'restart'):
                ctx.warn('%s.%s' % (at, option))
        out.append((name, condition))
    return out


_GO_DURATION_UNITS = {'ns': 1, 'us': 10 ** 3, '\u00b5s': 10 ** 3, 'ms': 10 ** 6, 's': 10 ** 9,
                      'm': 60 * 10 ** 9, 'h': 3600 * 10 ** 9}


def _go_duration(value, ctx, where):
    """A Go duration ("30s", "1m30s", "1.5s", "500ms") in nanoseconds, as compose reads them."""
    text = value if isinstance(value, str) else ''
    pieces = re.findall(r'([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|\u00b5s|ms|s|m|h)', text)
    if not text or ''.join(n + u for n, u in pieces) != text:
        raise ctx.error(where, 'must be a duration like 30s, 1m30s or 500ms')
    return int(sum(float(n) * _GO_DURATION_UNITS[u] for n, u in pieces))


#: compose healthcheck keys -> the engine's Config.Healthcheck fields (nanosecond durations).
_HEALTHCHECK_DURATIONS = {'interval': 'Interval', 'timeout': 'Timeout',
                          'start_period': 'StartPeriod', 'start_interval': 'StartInterval'}


def _compose_healthcheck(value, ctx, where):
    """healthcheck: {test, interval, timeout, retries, start_period, disable} for the engine."""
    _expect(value, dict, ctx, where, 'a mapping with test, interval, timeout and retries')
    check = {}
    for key, item in value.items():
        key = _key_str(key, ctx, where)
        at = '%s.%s' % (where, key)
        if key == 'test':
            if isinstance(item, str):
                check['Test'] = ['CMD-SHELL', item]
            else:
                check['Test'] = _string_list(item, ctx, at, 'a string or a list like [CMD, ...]')
                if check['Test'][:1] not in (['CMD'], ['CMD-SHELL'], ['NONE']):
                    raise ctx.error(at, 'must start with CMD, CMD-SHELL or NONE')
        elif key in _HEALTHCHECK_DURATIONS:
            check[_HEALTHCHECK_DURATIONS[key]] = _go_duration(item, ctx, at)
        elif key == 'retries':  # "$RETRIES" interpolates to a string of digits
            item = int(item) if isinstance(item, str) and item.isdigit() else item
            check['Retries'] = _expect(item, int, ctx, at, 'a number')
        elif key == 'disable':
            if _expect(item, bool, ctx, at, 'true or false'):
                return {'Test': ['NONE']}
        else:
            ctx.warn(at)
    return check


def _compose_memory_from_deploy(value, ctx, where):
    """deploy.resources.limits.memory, the compose v3 way of setting mem_limit."""
    memory = value
    for key in ('resources', 'limits', 'memory'):
        memory = memory.get(key) if isinstance(memory, dict) else None
    return None if memory is None else _parse_memory(memory, ctx, where + '.resources.limits.memory')


def _compose_service(name, where, spec, ctx):
    """Build one Service from a compose service mapping."""
    svc = Service(name)
    env_files, env = None, {}
    deploy_memory = None
    for key, value in spec.items():
        key = _key_str(key, ctx, where)
        at = '%s.%s' % (where, key)
        if key == 'build':
            svc.build = _compose_build(value, ctx, at)
        elif key == 'image':
            svc.image = _scalar_str(_expect(value, (str, int), ctx, at, 'an image name'), ctx, at)
        elif key in ('command', 'entrypoint'):
            setattr(svc, key, _compose_command(value, ctx, at))
        elif key == 'environment':
            env = _compose_kv_list(value, ctx, at, ctx.variables.get)
        elif key == 'env_file':
            env_files = (value, at)  # read below, once the service's environment is known
        elif key == 'ports':
            svc.ports = _compose_ports(value, ctx, at)
        elif key == 'volumes':
            svc.volumes = _compose_volumes(value, ctx, at)
        elif key == 'depends_on':
            for dep, condition in _compose_depends(value, ctx, at):
                svc.links.append(dep)
                svc.conditions[dep] = condition
        elif key == 'healthcheck':
            svc.healthcheck = _compose_healthcheck(value, ctx, at)
        elif key == 'profiles':
            svc.profiles = _string_list(value, ctx, at, 'a list of profile names')
        elif key in ('working_dir', 'user'):
            setattr(svc, key, _scalar_str(_expect(value, (str, int), ctx, at, 'a string'), ctx, at))
        elif key == 'links':
            svc.links.extend(link.split(':')[0] for link in _string_list(value, ctx, at))
        elif key == 'mem_limit':
            svc.memory = _parse_memory(value, ctx, at)
        elif key == 'labels':
            svc.labels = _compose_kv_list(value, ctx, at, lambda k: '')
        elif key == 'deploy':
            deploy_memory = _compose_memory_from_deploy(value, ctx, at)
        elif key not in _COMPOSE_SERVICE_QUIET and not key.startswith('x-'):
            ctx.warn(at)
    if svc.build is None and svc.image is None:
        raise ctx.error(where, 'needs "image" or "build"')
    if svc.memory is None:
        svc.memory = deploy_memory
    svc.links = list(dict.fromkeys(svc.links))  # depends_on + links may repeat a name
    svc.environment = _compose_env_files(env_files[0], ctx, env_files[1], env) if env_files else {}
    svc.environment.update(env)
    return svc


def _build_compose(data, ctx):
    """Fill ctx.manifest from a parsed compose file."""
    top = _expect(data, dict, ctx, '', 'a mapping with a "services:" section')
    if 'services' not in top and any(isinstance(v, dict) and ('image' in v or 'build' in v)
                                     for v in top.values()):
        raise ctx.error('', 'this looks like a version 1 compose file; put the services under '
                            '"services:" (compose file format 2 or later)')
    for key in top:
        key = _key_str(key, ctx, '')
        if key == 'name':
            ctx.manifest.name = _compose_project_name(top[key], ctx)
        elif key == 'volumes':
            ctx.manifest.volume_names = _compose_top_volumes(top[key], ctx)
        elif key != 'services' and key not in _COMPOSE_TOP_IGNORED and not key.startswith('x-'):
            ctx.warn(key)
    for name, where, spec in _service_map(top, ctx):
        ctx.manifest.services[name] = _compose_service(name, where, spec, ctx)
    _check_links(ctx)


def compose_project(cwd, environ):
    """Compose's project name when the folder's manifest is a compose file (SPEC §3):
    COMPOSE_PROJECT_NAME from the environment or .env, then the file's name:; else None."""
    try:
        path = find_manifest(None, cwd)
    except ConvoxError:
        return None
    if os.path.basename(path) in ('convox.yml', 'convox.yaml'):
        return None
    variables = dict(read_dotenv(cwd, environ))
    variables.update(environ)
    name = variables.get('COMPOSE_PROJECT_NAME')
    if name:
        if normalize_project_name(name) != name:
            raise ManifestError('COMPOSE_PROJECT_NAME %r is not a valid project name — use '
                                'lower-case letters, digits, "-" and "_"' % name)
        return name
    display = _display_path(path)
    data = parse_yaml(_read_text(path, display), display)
    if not isinstance(data, dict) or data.get('name') is None:
        return None
    ctx = _Ctx(Manifest(path, 'compose'), display, variables, {})
    return _compose_project_name(interpolate(data['name'], variables, display)[0], ctx)


def normalize_project_name(name):
    """Compose's NormalizeProjectName: lower-case, only a-z 0-9 _ -, no leading _ or -."""
    return re.sub(r'[^a-z0-9_-]', '', name.lower()).lstrip('_-')


def _compose_project_name(value, ctx):
    """The top-level name:, normalised as compose does (a name that leaves nothing is an error)."""
    name = normalize_project_name(_scalar_str(value, ctx, 'name'))
    if not name:
        raise ctx.error('name', 'must contain a letter or digit')
    return name


def _compose_top_volumes(value, ctx):
    """Top-level volumes: -> {key: engine name} for those with name: or external: true; the
    others are PROJECT_key (as compose names them), decided when the project is known."""
    names = {}
    for key, spec in _expect(value if value is not None else {}, dict, ctx, 'volumes',
                             'a mapping of volume names').items():
        key = _key_str(key, ctx, 'volumes')
        where = 'volumes.%s' % key
        for option, item in _expect(spec if spec is not None else {}, dict, ctx, where,
                                    'a mapping').items():
            option = _key_str(option, ctx, where)
            if option == 'name':
                names[key] = _scalar_str(item, ctx, where + '.name')
            elif option == 'external':
                if _expect(item, bool, ctx, where + '.external', 'true or false'):
                    names.setdefault(key, key)
            elif option != 'labels' and (option, item) != ('driver', 'local'):
                ctx.warn('%s.%s' % (where, option))
    return names


def _located(exc, source, display):
    """An interpolation error with the line of the file that holds its ${...} (values are
    interpolated after parsing, so the line is found by the expression's text)."""
    fragment = (getattr(exc, 'fragment', None) or '').split('\n', 1)[0]
    message = str(exc)
    if fragment and message.startswith(display + ': '):
        for lineno, line in enumerate(source.splitlines(), 1):
            if fragment in line and not line.lstrip().startswith('#'):
                return ManifestError('%s:%d: %s' % (display, lineno, message[len(display) + 2:]))
    return exc


def read_dotenv(directory, environ):
    """The .env file of a manifest's folder as a dict (empty when there is none)."""
    path = os.path.join(directory, '.env')
    if not os.path.isfile(path):
        return {}
    display = _display_path(path)
    return parse_env_file(_read_text(path, display), display, environ)


def load_manifest(path, environ):
    """Load convox.yml/convox.yaml (convox) or any other file name (compose) into a Manifest."""
    full = os.path.abspath(path)
    display = _display_path(full)
    kind = 'convox' if os.path.basename(full) in ('convox.yml', 'convox.yaml') else 'compose'
    if not os.path.isfile(full):
        raise ManifestError('%s: file not found' % display)
    source = _read_text(full, display)
    key_lines = {}
    data = parse_yaml(source, display, key_lines)
    manifest = Manifest(full, kind)
    dotenv = read_dotenv(manifest.directory, environ)
    variables = dict(dotenv)
    variables.update(environ)
    manifest.variables = variables
    try:
        data, missing = interpolate(data, variables, display, braces_only=(kind == 'convox'))
    except ManifestError as exc:
        raise _located(exc, source, display)
    for name in missing:
        manifest.warnings.append('%s: variable %s is not set; using an empty string' % (display, name))
    ctx = _Ctx(manifest, display, variables, dotenv)
    ctx.key_lines = key_lines
    if data is None:
        raise ctx.error('', 'the file is empty — add a "services:" section')
    try:
        if kind == 'convox':
            _build_convox(data, ctx)
        else:
            _build_compose(data, ctx)
    finally:
        ctx.warnings_done()
    return manifest


# -- .dockerignore --------------------------------------------------------------------------

def _go_clean(path):
    """Go's filepath.Clean for '/'-separated paths."""
    rooted = path.startswith('/')
    parts = []
    for seg in path.split('/'):
        if seg in ('', '.'):
            continue
        if seg == '..':
            if parts and parts[-1] != '..':
                parts.pop()
            elif not rooted:
                parts.append('..')
            continue
        parts.append(seg)
    cleaned = '/'.join(parts)
    if rooted:
        return '/' + cleaned
    return cleaned or '.'


# Tokens of a pattern besides single characters and classes: "*", "?", a "**" with more
# after it (any folders, even none: RE2's "(.*/)?") and a final "**" (anything: ".*").
_STAR, _ONE, _FOLDERS, _REST = range(4)


def _class_char(pattern, k):
    """One character of a class at pattern[k:] -> (character, index after it)."""
    ch = pattern[k:k + 1]
    if ch == '\\':
        k += 1
        ch = pattern[k:k + 1]
    elif ch in '-]':
        ch = ''  # Go's filepath.Match wants these escaped where a character is due
    if not ch:
        raise ValueError('unclosed class or misplaced "-" or "]"')
    return ch, k + 1


def _class(pattern, k):
    """The class after a '[' at pattern[k:] -> ((negated, ranges), index after ']')."""
    negated = pattern[k:k + 1] == '^'
    k += negated
    ranges = []
    while not (pattern[k:k + 1] == ']' and ranges):  # "[]" is no empty class: refused
        low, k = _class_char(pattern, k)
        high = low
        if pattern[k:k + 1] == '-':
            high, k = _class_char(pattern, k + 1)
        if low > high:
            raise ValueError('a range that runs backwards')  # refused by RE2 (Docker)
        ranges.append((low, high))
    return (negated, tuple(ranges)), k + 1


def _dockerignore_tokens(pattern):
    """Read a cleaned pattern as moby's patternmatcher does -> (kind, tokens).

    ``kind`` is exact, prefix ("dir/**"), suffix ("**/name") or glob; tokens are
    characters, (negated, ranges) classes and the wildcards above.  Raises ValueError for
    what Docker refuses (Go's filepath.Match syntax, then RE2's): a lone trailing '\\',
    an unclosed or empty class, '-' or ']' unescaped where a class wants a character."""
    tokens, kind, k = [], 'exact', 0
    while k < len(pattern):
        ch, first = pattern[k], k == 0
        k += 1
        if ch == '*' and pattern[k:k + 1] == '*':
            k += 1
            if pattern[k:k + 1] == '/':
                k += 1  # "**/" is treated as "**"
            if k < len(pattern):
                tokens.append(_FOLDERS)
                kind = 'glob'
            elif kind == 'exact':
                kind = 'prefix'
            else:
                tokens.append(_REST)
                kind = 'glob'
            if first:
                kind = 'suffix'  # moby: a leading "**" makes a suffix match, for now
            continue
        if ch in '*?':
            tokens.append(_STAR if ch == '*' else _ONE)
        elif ch == '\\':
            if k >= len(pattern):
                raise ValueError('a lone "\\" at the end')
            tokens.append(pattern[k])
            k += 1
        elif ch == '[':
            token, k = _class(pattern, k)
            tokens.append(token)
        else:
            tokens.append(ch)
            continue
        kind = 'glob'
    return kind, tokens


class _Glob(object):
    """A glob pattern as an automaton that reads a path once, a character at a time.

    Docker compiles patterns to RE2 expressions, which match in linear time; Python's re
    backtracks, and "x/**/**/**/**/**/**/**/**/**/**/**/**/y" against a path 25 folders deep
    took minutes.  The NFA (state i: before token i; -i-1: inside the "(.*/)?" of token i)
    becomes a DFA lazily, as in RE2: each path costs a dictionary lookup per character."""

    #: DFA states kept at most; then they are forgotten, and made again as needed (RE2 too
    #: bounds the memory of its DFA).
    max_states = 4096

    def __init__(self, tokens):
        self.tokens = tokens
        self.sets, self.ids, self.accepting, self.moves = [], {}, [], {}
        self.reset()

    def reset(self):
        """Forget every DFA state, in place (a match under way holds these tables)."""
        for table in (self.sets, self.ids, self.accepting, self.moves):
            table.clear()
        self.dead = self._state(frozenset())
        self.start = self._state(self._closure({0}))

    def _state(self, nfa_states):
        if nfa_states not in self.ids:
            self.ids[nfa_states] = len(self.sets)
            self.sets.append(nfa_states)
            self.accepting.append(len(self.tokens) in nfa_states)
        return self.ids[nfa_states]

    def _closure(self, nfa_states):
        """Add the states reachable without reading: past "*", "**/" and a final "**"."""
        out, n = set(), len(self.tokens)
        for state in nfa_states:
            while 0 <= state < n and self.tokens[state] in (_STAR, _FOLDERS, _REST):
                out.add(state)
                state += 1
            out.add(state)
        return frozenset(out)

    def _step(self, state, ch):
        """The DFA state after reading ``ch`` in ``state``."""
        n, after = len(self.tokens), set()
        for nfa in self.sets[state]:
            index = -nfa - 1 if nfa < 0 else nfa
            token = self.tokens[index] if index < n else None
            if token == _FOLDERS:  # "(.*/)?": any character goes inside, a "/" may leave
                if ch != '\n':
                    after.add(-index - 1)
                if ch == '/':
                    after.add(index + 1)
            elif token in (_STAR, _REST):
                if ch != ('/' if token == _STAR else '\n'):
                    after.add(nfa)
            elif token == _ONE:
                if ch != '/':
                    after.add(nfa + 1)
            elif isinstance(token, tuple):
                negated, ranges = token
                if negated != any(low <= ch <= high for low, high in ranges):
                    after.add(nfa + 1)
            elif token == ch:
                after.add(nfa + 1)
        if len(self.sets) >= self.max_states:
            self.reset()
            return self._state(self._closure(after))  # ``state`` is no more: no move to keep
        nxt = self._state(self._closure(after))
        self.moves[state, ch] = nxt
        return nxt

    def __call__(self, path):
        """True when the pattern matches path or one of the folders above it."""
        state, moves, accepting, dead = self.start, self.moves, self.accepting, self.dead
        for ch in path:
            if ch == '/' and accepting[state]:
                return True
            nxt = moves.get((state, ch))
            state = self._step(state, ch) if nxt is None else nxt
            if state == dead:
                return False
        return accepting[state]


def _dockerignore_pattern(pattern):
    """Compile one cleaned pattern into match(path) -> bool, true when the pattern matches
    the path or a folder above it (Docker's MatchesOrParentMatches)."""
    try:
        kind, tokens = _dockerignore_tokens(pattern)
    except ValueError as exc:
        raise ManifestError('.dockerignore: bad pattern %r (%s), which Docker refuses too — '
                            'write \\[, \\], \\- or \\\\ for the character itself' % (pattern, exc))
    if kind == 'exact':
        return lambda path: path == pattern or path.startswith(pattern + '/')
    if kind == 'prefix':
        prefix = pattern[:-2]
        return lambda path: path.startswith(prefix)
    if kind == 'glob':
        return _Glob(tokens)
    suffix = pattern[2:]

    def match_suffix(path):
        while path:
            if path.endswith(suffix) or (suffix[:1] == '/' and path == suffix[1:]):
                return True
            path = path.rpartition('/')[0]
        return False
    return match_suffix


def _dockerignore_lines(lines):
    """Normalise .dockerignore lines like Docker's ReadAll; return [(exclusion, pattern)]."""
    out = []
    for line in lines:
        if line.startswith('#'):
            continue
        pattern = line.strip()
        if not pattern:
            continue
        invert = pattern.startswith('!')
        if invert:
            pattern = pattern[1:].strip()
        if pattern:
            pattern = _go_clean(pattern)
            if len(pattern) > 1 and pattern[0] == '/':
                pattern = pattern[1:]
        if invert and not pattern:
            raise ManifestError('.dockerignore: illegal exclusion pattern "!"')
        out.append((invert, _go_clean(pattern)))
    return out


def dockerignore_matcher(lines):
    """Return excluded(relpath) -> bool implementing Docker's .dockerignore semantics."""
    patterns = [(exclusion, text, _dockerignore_pattern(text))
                for exclusion, text in _dockerignore_lines(lines)]

    def excluded(relpath):
        """True when relpath (relative to the context, '/'-separated) is ignored."""
        path = _go_clean(relpath.replace(os.sep, '/'))
        if path == '.':
            return False
        matched = False
        for exclusion, _, match in patterns:
            if exclusion != matched:
                continue  # only an exception can undo a match, only a pattern can make one
            if match(path):
                matched = not exclusion
        return matched

    excluded.patterns = [(exclusion, text) for exclusion, text, _ in patterns]
    return excluded


def read_dockerignore(context_dir):
    """Lines of context_dir/.dockerignore, or [] when there is none."""
    path = os.path.join(context_dir, '.dockerignore')
    if not os.path.isfile(path):
        return []
    return _read_text(path, _display_path(path)).lstrip('\ufeff').splitlines()


# -- build context tar ----------------------------------------------------------------------

_TAR_CHUNK = 64 * 1024
_S_IFMT, _S_IFDIR, _S_IFREG, _S_IFLNK = 0o170000, 0o040000, 0o100000, 0o120000


def _may_reinclude(excluded, rel_dir):
    """Whether some '!' exception could re-include something below an excluded directory."""
    dir_slash = rel_dir + '/'
    for exclusion, pattern in excluded.patterns:
        if not exclusion:
            continue
        if (pattern + '/').startswith(dir_slash):
            return True  # Docker's own rule: "!dir/file" below this directory
        wildcard = re.search(r'[*?\[\\]', pattern)
        if wildcard and dir_slash.startswith(pattern[:wildcard.start()]):
            return True  # a wildcard exception such as "!**/keep.md" might match inside
    return False


#: How the walk opens what lstat listed: never through a link (a file swapped for a link
#: to /etc/shadow between the two would put it in the tar), never blocking (a fifo).
_OPEN_ENTRY = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _walk_error(display, exc):
    return ManifestError('cannot read %s: %s — fix its permissions or add it to '
                         '.dockerignore' % (display, exc.strerror or exc))


def _changed(display, exc=None):
    """The error for an entry that is no longer what the listing saw (or any other error)."""
    if exc is not None and exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.ENXIO,
                                             errno.EINVAL):
        return _walk_error(display, exc)
    return ManifestError('%s changed while the build context was read — try again once '
                         'nothing is moving files in it' % display)


def _open_entry(dir_fd, name, listed, display):
    """What to send of an entry that lstat ``listed`` -> (fd or link target, stat), or None
    when it is gone.  Files and folders are opened relative to their folder's fd, without
    following a link and without blocking, and must be what lstat saw (device, inode and
    type): what is read is inside the context whatever renames things meanwhile."""
    try:
        if stat.S_ISLNK(listed.st_mode):
            return os.readlink(name, dir_fd=dir_fd), listed  # EINVAL: no longer a link
        flags = _OPEN_ENTRY | (os.O_DIRECTORY if stat.S_ISDIR(listed.st_mode) else 0)
        fd = os.open(name, flags, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _changed(display, exc)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino, stat.S_IFMT(now.st_mode)) != (
            listed.st_dev, listed.st_ino, stat.S_IFMT(listed.st_mode)):
        os.close(fd)
        raise _changed(display)
    return fd, now


def read_context_file(root, rel):
    """The bytes of the regular file ``rel`` ('/'-separated) below the folder ``root``, or
    None when it is not one now.  Each folder on the way and the file itself are opened
    without following a link and without blocking, as the build context's walk does."""
    try:
        fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parts = rel.split('/')
        for depth, part in enumerate(parts, 1):
            flags = _OPEN_ENTRY | (os.O_DIRECTORY if depth < len(parts) else 0)
            child = os.open(part, flags, dir_fd=fd)
            os.close(fd)
            fd = child
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = list(iter(lambda: os.read(fd, CHUNK), b''))
        return b''.join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _walk_context(dir_fd, rel_dir, excluded, display_root):
    """Yield (relpath, stat, fd or link target) for everything to send, in sorted depth-first
    order; an fd stays open until the next item is asked for.  Errors are local ones
    (ManifestError) that name the entry; what vanishes meanwhile is left out."""
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError as exc:
        raise _walk_error(os.path.join(display_root, rel_dir), exc)
    for name in names:
        rel = rel_dir + '/' + name if rel_dir else name
        display = os.path.join(display_root, rel)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise _walk_error(display, exc)
        kind, skip = stat.S_IFMT(st.st_mode), excluded(rel)
        descend = kind == stat.S_IFDIR and (not skip or _may_reinclude(excluded, rel))
        if not descend and (skip or kind not in (stat.S_IFREG, stat.S_IFLNK)):
            continue  # ignored; sockets, fifos and devices do not belong in a context
        opened = _open_entry(dir_fd, name, st, display)
        if opened is None:
            continue
        content, st = opened
        if kind == stat.S_IFLNK:
            yield rel, st, content
            continue
        try:
            if not skip:
                yield rel, st, content
            if descend:
                for item in _walk_context(content, rel, excluded, display_root):
                    yield item
        finally:
            os.close(content)


def _tar_member(tarfile, rel, st, content):
    """Yield the tar header and (for files, ``content`` an fd) the padded contents."""
    info = tarfile.TarInfo(rel)
    info.mode = st.st_mode & 0o7777
    info.mtime = int(st.st_mtime)
    info.uid = info.gid = 0
    info.uname = info.gname = ''
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFLNK:
        info.type, info.linkname = tarfile.SYMTYPE, content
    elif kind == stat.S_IFDIR:
        info.type = tarfile.DIRTYPE
    else:
        info.type, info.size = tarfile.REGTYPE, st.st_size
    yield info.tobuf(tarfile.PAX_FORMAT, 'utf-8', 'surrogateescape')
    if info.type == tarfile.REGTYPE:
        for piece in _file_pieces(content, info.size, rel):
            yield piece


def _file_pieces(fd, size, display):
    """Yield exactly `size` bytes of a file (zero-padded if it shrank) plus tar block padding."""
    remaining = size
    try:
        while remaining > 0:
            data = os.read(fd, min(_TAR_CHUNK, remaining))
            if not data:
                break
            remaining -= len(data)
            yield data
    except OSError as exc:
        raise _walk_error(display, exc)
    if remaining:
        yield b'\0' * remaining
    if size % 512:
        yield b'\0' * (512 - size % 512)


def _tar_stream(root, excluded):
    """Generate the tar archive in chunks of about 64 KiB."""
    import tarfile
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _walk_error(_display_path(root), exc)
    buf = bytearray()
    try:
        for rel, st, content in _walk_context(root_fd, '', excluded, _display_path(root)):
            for piece in _tar_member(tarfile, rel, st, content):
                buf += piece
                if len(buf) >= _TAR_CHUNK:
                    yield bytes(buf)
                    del buf[:]
    finally:
        os.close(root_fd)
    buf += b'\0' * 1024  # end-of-archive marker: two empty blocks
    yield bytes(buf)


def tar_context(context_dir, dockerfile='Dockerfile'):
    """Return a generator of bytes chunks: an uncompressed tar of the build context."""
    if not os.path.isdir(context_dir):
        raise ManifestError('build context %s does not exist' % _display_path(context_dir))
    lines = read_dockerignore(context_dir)
    excluded = dockerignore_matcher(lines)
    if os.path.isabs(dockerfile):
        dockerfile = os.path.relpath(dockerfile, context_dir)
    dockerfile = _go_clean(dockerfile.replace(os.sep, '/'))
    # Docker always sends the Dockerfile and .dockerignore: it appends "!" exceptions for them.
    keep = [name for name in (dockerfile, '.dockerignore')
            if name != '..' and not name.startswith('../') and excluded(name)]
    if keep:
        excluded = dockerignore_matcher(list(lines) + ['!' + name for name in keep])
    return _tar_stream(context_dir, excluded)


# ==========================================================================================
# Sync (start's development loop: where the Dockerfile put each file, what changed, upload)
# ==========================================================================================

#: Seconds between two looks at the build contexts while nothing changes, and while a burst
#: of changes (an editor's save, a `git checkout`) goes on; a burst is sent once its last
#: change (by ctime) is SYNC_SETTLE old or a look finds nothing new, or after SYNC_BURST_MAX
#: seconds.  A change is seen within SYNC_INTERVAL and sent at once or SYNC_SETTLE later
#: (+ the upload): < 2 s; a look at 10,000 files (~25 ms) every 1.5 s keeps the watcher
#: under 2% of a core.
SYNC_INTERVAL = 1.5
SYNC_SETTLE = 0.15
SYNC_BURST_MAX = 1.0
SYNC_CPU_SHARE = 0.02

#: ADD sources that the builder unpacks or downloads instead of copying: not synced.
_ADD_UNPACKED = re.compile(r"(\.tar|\.tar\.\w+|\.tgz|\.tbz2?|\.txz)\Z|^[a-z][a-z0-9+.-]*://|"
                           r"^git@", re.I)


class Copy(object):
    """One COPY/ADD of the build context: sources (context-relative), destination, owner."""

    def __init__(self, sources, dest, chown=None, chmod=None):
        self.sources, self.dest, self.chown, self.chmod = sources, dest, chown, chmod

    def __repr__(self):
        return "<Copy %r -> %r>" % (self.sources, self.dest)


def _dockerfile_instructions(text):
    """(KEYWORD, arguments) of each instruction: comments dropped, continuations joined."""
    escape = "\\"
    directive = re.match(r"\s*#\s*escape\s*=\s*(\S)", text)
    if directive:
        escape = directive.group(1)
    joined = ""
    for line in text.splitlines():
        if not joined and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if joined and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith(escape):
            joined += line.rstrip()[:-1] + " "
            continue
        words = (joined + line).strip().split(None, 1)
        joined = ""
        if words:
            yield words[0].upper(), words[1] if len(words) > 1 else ""


def _substitute(text, variables):
    """$VAR and ${VAR} from the stage's ARG and ENV values (unknown: empty, as the builder)."""
    return re.sub(r"\$(?:\{(\w+)\}|(\w+))",
                  lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def dockerfile_copies(text, args=None, target=None):
    """The COPY/ADD instructions of the final stage (or ``target``) that read the context,
    with WORKDIR-relative destinations made absolute."""
    stages = []
    for keyword, rest in _dockerfile_instructions(text):
        if keyword == "FROM":
            name = re.search(r"\s+as\s+(\S+)\s*\Z", rest, re.I)
            stages.append((name.group(1).lower() if name else None, []))
        elif stages:
            stages[-1][1].append((keyword, rest))
    chosen = stages[-1][1] if stages else []
    for name, instructions in stages:
        if target and name == target.lower():
            chosen = instructions
    variables, workdir, copies = dict(args or {}), "/", []
    for keyword, rest in chosen:
        if keyword in ("ARG", "ENV"):
            pairs = re.findall(r"(\w+)=(\"[^\"]*\"|'[^']*'|\S*)", rest)
            if not pairs and keyword == "ENV" and len(rest.split(None, 1)) == 2:
                pairs = [rest.split(None, 1)]  # the old form, ENV KEY value
            for key, value in pairs:
                if keyword == "ENV" or key not in variables:  # a build arg wins over ARG's
                    variables[key] = value.strip().strip("\"'")
        elif keyword == "WORKDIR":
            workdir = posixpath.join(workdir, _substitute(rest.strip(), variables))
        elif keyword in ("COPY", "ADD"):
            copy = _parse_copy(keyword, rest, variables, workdir)
            if copy is not None:
                copies.append(copy)
    return copies


def _parse_copy(keyword, rest, variables, workdir):
    flags = {}
    while True:
        flag = re.match(r"--(\w+)(?:=(\S*))?\s+", rest)
        if not flag:
            break
        flags[flag.group(1)] = flag.group(2)
        rest = rest[flag.end():]
    if "from" in flags:
        return None  # from another stage or image, not from the context
    rest = rest.strip()
    try:
        words = json.loads(rest) if rest.startswith("[") else None
    except (ValueError, RecursionError):  # RecursionError: nested 100,000 deep
        words = None
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        words = rest.split()  # not an array of strings: the builder reads the shell form
    words = [_substitute(word, variables) for word in words]
    if len(words) < 2:
        return None
    sources = [_go_clean(word) for word in words[:-1]
               if not (keyword == "ADD" and _ADD_UNPACKED.search(word))]
    if not sources:
        return None
    dest = words[-1]
    absolute = posixpath.normpath(posixpath.join(workdir, dest))
    if dest.endswith("/") or dest in (".", "..") or dest.endswith("/."):
        absolute = absolute.rstrip("/") + "/"
    chmod = int(flags["chmod"], 8) if re.match(r"[0-7]{3,4}\Z", flags.get("chmod") or "") \
        else None
    return Copy(sources, absolute, flags.get("chown"), chmod)


def _glob_match(pattern, path):
    """Go's filepath.Match: wildcards never cross '/'."""
    import fnmatch
    parts, names = pattern.split("/"), path.split("/")
    return len(parts) == len(names) and all(
        fnmatch.fnmatchcase(name, part.replace("[^", "[!")) for part, name in zip(parts, names))


def copy_destinations(copies, rel, is_dir=False):
    """[(path in the container, Copy)] where the build put context file ``rel``.  A folder
    named as a source has no place of its own: its content is copied, entry by entry."""
    found = []
    for copy in copies:
        many = len(copy.sources) > 1 or copy.dest.endswith("/")
        for source in copy.sources:
            dest = copy.dest
            if source == ".":
                found.append((posixpath.join(dest, rel), copy))
            elif re.search(r"[*?\[]", source):
                names = rel.split("/")
                for depth in range(1, len(names) + 1):
                    if depth == len(names) and is_dir:
                        break
                    if _glob_match(source, "/".join(names[:depth])):
                        # a matching file lands in dest/, a matching folder's content too
                        found.append((posixpath.join(dest, *names[depth - 1:]) if
                                      depth == len(names) else
                                      posixpath.join(dest, *names[depth:]), copy))
                        break
            elif rel == source and not is_dir:
                found.append((posixpath.join(dest, posixpath.basename(rel)) if many else
                              dest, copy))
            elif rel.startswith(source + "/"):
                found.append((posixpath.join(dest, rel[len(source) + 1:]), copy))
    return found


class ContextWatch(object):
    """Stat snapshots of one build context (minus .dockerignore), compared look by look.

    A snapshot maps each path to its ``st_ctime_ns`` (0 for a folder): the kernel sets
    ctime on every write, truncation, chmod and rename, and no tool can set it back, so it
    alone tells a changed file.  ``os.scandir`` gives folders for free; files cost one
    lstat each, about 2.5 µs in Python, so a look at 10,000 files takes ~25 ms.  Whether a
    path is ignored is decided once per path: the patterns do not change while start runs.
    """

    def __init__(self, root):
        self.root = root
        self.excluded = dockerignore_matcher(read_dockerignore(root))
        self.ignored = {}
        self.snapshot = self.scan()

    def scan(self):
        found, ignored, excluded = {}, self.ignored, self.excluded
        patterns = bool(excluded.patterns)
        cut = len(os.path.join(self.root, ""))
        pending = [self.root]
        while pending:
            try:
                entries = os.scandir(pending.pop())
            except OSError:
                continue  # removed while we looked: the next look sees it gone
            with entries:
                for entry in entries:
                    path = entry.path
                    skip = ignored.get(path) if patterns else False
                    if skip is None:
                        skip = ignored[path] = excluded(path[cut:])
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if not skip or _may_reinclude(excluded, path[cut:]):
                                pending.append(path)
                            if not skip:
                                found[path] = 0
                        elif not skip:
                            found[path] = entry.stat(follow_symlinks=False).st_ctime_ns
                    except OSError:
                        continue
        return found

    def changes(self):
        """({changed or added path: is a folder}, {removed path: was a folder}) since the
        last look, relative to the context; a folder counts only when it comes or goes."""
        before, after = self.snapshot, self.scan()
        self.snapshot = after
        if before == after:
            return {}, {}
        cut = len(os.path.join(self.root, ""))
        changed = {path[cut:]: not stamp for path, stamp in after.items()
                   if before.get(path) != stamp and (stamp or path not in before)}
        removed = {path[cut:]: not stamp for path, stamp in before.items()
                   if path not in after}
        # When the last change happened (a removal or a new folder leaves no time: now).
        now = time.time()
        self.newest = now if removed else max(
            after[os.path.join(self.root, rel)] / 1e9 or now for rel in changed)
        return changed, removed


class SyncTarget(object):
    """A running service container and what its Dockerfile copied from a context."""

    def __init__(self, service, container, watch, copies):
        self.service, self.container, self.watch, self.copies = service, container, watch, copies
        self.owners = {}


class Syncer(object):
    """Keeps running service containers in step with their build contexts (SPEC §7.2).

    No thread: ``Follower.run`` calls ``tick`` when ``due`` has come.  Changed and added files go
    in one tar through ``PUT /containers/ID/archive`` (path ``/``, the members named by their
    absolute destinations); removed ones by one ``rm -rf`` exec.
    """

    def __init__(self, engine, printer, targets):
        self.engine, self.printer, self.targets = engine, printer, targets
        self.due = time.monotonic() + SYNC_INTERVAL
        self.burst_began = None
        self.pending = {}  # context root -> ({changed path: is a folder}, {removed: was})

    def tick(self):
        now, cpu = time.monotonic(), time.process_time()
        news = False  # a change seen now that may be part of a burst still going on
        for watch in {id(t.watch): t.watch for t in self.targets}.values():
            changed, removed = watch.changes()
            if changed or removed:
                news = news or time.time() - watch.newest < SYNC_SETTLE
                have = self.pending.setdefault(watch.root, ({}, {}))
                for rel in removed:
                    have[0].pop(rel, None)
                for rel in changed:
                    have[1].pop(rel, None)
                have[0].update(changed)
                have[1].update(removed)
        # A tree so big that a look costs more than SYNC_CPU_SHARE of SYNC_INTERVAL is
        # looked at less often: the CPU stays bounded, the 2 s do not.
        interval = max(SYNC_INTERVAL, (time.process_time() - cpu) / SYNC_CPU_SHARE)
        if news and self.burst_began is None:
            self.burst_began = now
        if self.burst_began is not None and (news and now - self.burst_began < SYNC_BURST_MAX):
            self.due = time.monotonic() + SYNC_SETTLE
            return
        if self.pending:
            pending, self.pending, self.burst_began = self.pending, {}, None
            for target in self.targets:
                if target.watch.root in pending:
                    self.send(target, *pending[target.watch.root])
        self.due = time.monotonic() + interval

    def send(self, target, changed, removed):
        """Upload and remove what the Dockerfile of ``target`` copied; say how many."""
        uploads = [(dest, rel, copy) for rel in sorted(changed)
                   for dest, copy in copy_destinations(target.copies, rel, changed[rel])]
        removals = [(dest, rel) for rel in sorted(removed)
                    for dest, _ in copy_destinations(target.copies, rel, removed[rel])]
        if not uploads and not removals:
            return
        try:
            if uploads:
                self.upload(target, uploads)
            if removals:
                self.remove(target.container, [dest for dest, _ in removals])
        except ConvoxError as exc:
            self.printer.say("sync %s failed: %s" % (target.service, printable(str(exc))))
            return
        files = ([rel for _, rel, _ in uploads if not changed[rel]] +  # not the folders
                 [rel for _, rel in removals if not removed[rel]])
        self.printer.say("sync %s: %d %s" % (target.service, len(files),
                                             "file" if len(files) == 1 else "files"))

    def remove(self, container, paths):
        exec_id = self.engine.exec_create(container, {
            "Cmd": ["rm", "-rf", "--"] + [path.rstrip("/") or "/." for path in paths],
            "AttachStdout": False, "AttachStderr": False})["Id"]
        self.engine.request("POST", "/exec/%s/start" % exec_id, body={"Detach": True})
        give_up = time.monotonic() + 10
        while self.engine.exec_inspect(exec_id).get("Running") and \
                time.monotonic() < give_up:
            time.sleep(0.02)

    def upload(self, target, uploads):
        import io
        import tarfile
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for dest, rel, copy in uploads:
                full = os.path.join(target.watch.root, rel)
                try:
                    info = tar.gettarinfo(full, dest.lstrip("/"))
                except OSError:
                    continue  # gone again since the look: the next look removes it
                info.uid, info.gid = self.owner(target, copy.chown)
                info.uname = info.gname = ""
                if copy.chmod is not None:
                    info.mode = copy.chmod
                if info.isreg():
                    data = read_context_file(target.watch.root, rel)
                    if data is None:
                        continue  # no longer a file: the next look sees what it is
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                elif info.isdir() or info.issym():
                    tar.addfile(info)
        self.engine.put_archive(target.container, "/", buffer.getvalue())

    def owner(self, target, chown):
        """(uid, gid) of --chown=USER[:GROUP] (names read from the container's /etc)."""
        if not chown:
            return 0, 0
        if chown not in target.owners:
            user, _, group = chown.partition(":")
            uid = self.lookup(target, "/etc/passwd", user)
            gid = self.lookup(target, "/etc/group", group) if group else uid
            target.owners[chown] = (uid, gid)
        return target.owners[chown]

    def lookup(self, target, path, name):
        if name.isdigit():
            return int(name)
        import io
        import tarfile
        try:
            with tarfile.open(fileobj=io.BytesIO(self.engine.get_archive(
                    target.container, path))) as tar:
                member = tar.next()
                text = tar.extractfile(member).read().decode("utf-8", "replace") \
                    if member and member.isreg() else ""
        except (EngineError, tarfile.TarError):
            text = ""
        for line in text.splitlines():
            fields = line.split(":")
            if len(fields) > 2 and fields[0] == name and fields[2].isdigit():
                return int(fields[2])
        raise ConvoxError("no %s %s in the container (--chown) — check the Dockerfile" %
                          ("user" if path.endswith("passwd") else "group", name))


# ==========================================================================================
# Commands
# ==========================================================================================

class Context:
    """What every verb needs: the engine, the app and the standard streams."""

    def __init__(self, args, environ=None, stdin=None, stdout=None, stderr=None, stdio=None):
        self.args = args
        self.environ = os.environ if environ is None else environ
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.stdio = stdio if stdio is not None else Stdio()
        self._engine = None
        self._rack = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = Engine(resolve_rack(getattr(self.args, "rack", None), self.environ),
                                  self.environ)
        return self._engine

    @property
    def rack(self):
        """The rack the verbs ask for processes and one-offs (section Racks)."""
        if self._rack is None:
            self._rack = open_rack(self.engine, self.environ)
        return self._rack

    def app(self):
        return resolve_app(getattr(self.args, "app", None), self.environ)

    def out(self, text):
        self.stdout.write(text)
        self.stdout.flush()

    def close(self):
        if self._rack is not None:
            self._rack.close()
        if self._engine is not None:
            self._engine.close()
            self._engine.rack.close()


def cmd_ps(ctx):
    """convox ps [info ID | stop ID]"""
    args = ctx.args
    words = args.words
    if words and words[0] in ("info", "stop"):
        if len(words) != 2:
            raise UsageError("ps %s takes one process ID — convox ps %s ID" % (words[0], words[0]))
        return ps_info(ctx, words[1]) if words[0] == "info" else ps_stop(ctx, words[1])
    if words:
        raise UsageError("unknown ps command %r — use convox ps, ps info ID or ps stop ID"
                         % words[0])
    app, inferred = ctx.app()
    ctx.rack.require_app(app, inferred)
    # -s lists every process of the service, one-offs included; stopped ones with --all.
    processes = ctx.rack.processes(app, args.service, all=args.all)
    if args.release:
        processes = [p for p in processes if p.release == args.release]
    processes.sort(key=lambda p: (p.service, p.id))
    if args.format == "json":
        ctx.out(json.dumps([p.as_json() for p in processes], indent=2) + "\n")
        return 0
    now = time.time()
    columns = ctx.rack.COLUMNS
    headers = ["ID", "NAME"] + [c.upper() for c in columns] + \
        (["STATUS"] if args.all else []) + ["RELEASE", "SIZE", "STARTED", "COMMAND"]
    rows = []
    for p in processes:
        started = parse_timestamp(p.started)
        row = [p.id[:12], p.service or "-"] + [getattr(p, c) for c in columns] + \
            ([p.status] if args.all else [])
        row += [p.release or "-", "-" if p.size is None else p.size,
                "-" if started is None else humanize_since(now - started),
                shell_join(p.command)]
        rows.append(row)
    ctx.out(format_table(headers, rows))
    return 0


def ps_info(ctx, ident):
    app, _ = ctx.app()
    p = ctx.rack.find(app, ident)
    started = parse_timestamp(p.started)
    fields = [
        ("Id", p.id), ("App", p.app), ("Name", p.service), ("Release", p.release or "-"),
        ("Size", "-" if p.size is None else p.size), ("Status", p.status),
        ("Started", "-" if started is None else humanize_since(time.time() - started)),
        ("Command", shell_join(p.command)), ("Image", p.image),
    ] + [(c.title(), getattr(p, c)) for c in ctx.rack.DETAILS]
    width = max(len(key) for key, _ in fields)
    ctx.out("".join("%s  %s\n" % (key.ljust(width), printable(str(value)))
                    for key, value in fields))
    return 0


def ps_stop(ctx, ident):
    app, _ = ctx.app()
    p = ctx.rack.find(app, ident)
    ctx.out("Stopping %s... " % printable(ident))
    ctx.rack.stop(p)
    ctx.out("OK\n")
    return 0


class Stdio:
    """The local ends of a session: fds, so that tests can hand in pipes or a pty."""

    def __init__(self, stdin_fd=0, stdout_fd=1, stderr_fd=2):
        self.stdin_fd = stdin_fd if _fd_usable(stdin_fd) else None
        self.stdout_fd = stdout_fd
        self.stderr_fd = stderr_fd

    def wants_tty(self, forced):
        """SPEC §5: a TTY when stdin and stdout are both terminals, unless forced."""
        if forced is not None:
            return forced
        return self.stdin_fd is not None and os.isatty(self.stdin_fd) and \
            os.isatty(self.stdout_fd)

    def terminal_fd(self):
        """The fd whose terminal is made raw and measured, when there is one."""
        for fd in (self.stdin_fd, self.stdout_fd):
            if fd is not None and os.isatty(fd):
                return fd
        return None


def _fd_usable(fd):
    try:
        os.fstat(fd)
        return True
    except (OSError, TypeError):
        return False


#: Signals a session takes through its self-pipe.
SESSION_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGWINCH")


def session(stream, stdio, *, tty, resize=None, detach_keys=b"", forward=None,
            deadline=None, signal_pipe=None):
    """Run an attached session: raw terminal, resizes, signals, then the pump.

    ``resize(rows, cols)`` is called at start and on every SIGWINCH (from the loop, never
    from a handler).  ``forward(signum)`` passes SIGINT/SIGTERM/SIGHUP to the process (run);
    without it such a signal ends the session as ``("signal", signum)`` (exec).
    ``signal_pipe``: a SignalPipe of SESSION_SIGNALS entered earlier, whose signals are
    taken over (run's, open since before start, so that none is lost in between).
    Returns what ``pump`` returned.
    """
    import contextlib
    terminal = stdio.terminal_fd() if tty else None
    signums = [getattr(signal, name) for name in SESSION_SIGNALS]

    def on_signal(signum):
        if signum == signal.SIGWINCH:
            if terminal is not None and resize is not None:
                size = terminal_size(terminal)
                if size:
                    _quietly(resize, *size)
            return None
        if forward is not None:
            forward(signum)
            return None
        return ("signal", signum)

    with contextlib.ExitStack() as stack:
        pipe = signal_pipe or stack.enter_context(SignalPipe(signums))
        if terminal is not None and stdio.stdin_fd is not None and \
                os.isatty(stdio.stdin_fd):
            stack.enter_context(RawTerminal(stdio.stdin_fd))
        if terminal is not None and resize is not None:
            size = terminal_size(terminal)
            if size:
                _resize_until_ready(resize, size)
        return pump(stream, tty=tty, stdin_fd=stdio.stdin_fd, stdout_fd=stdio.stdout_fd,
                    stderr_fd=stdio.stderr_fd, signal_fd=pipe.fd, on_signal=on_signal,
                    detach_keys=detach_keys if tty else b"", deadline=deadline)


def _quietly(function, *args):
    try:
        function(*args)
    except ConvoxError:
        pass  # a resize that races the process's end is not worth an error


def _resize_until_ready(resize, size):
    """The first resize can come before the process exists: retry briefly (as Docker does)."""
    for delay in (0, 0.01, 0.02, 0.05, 0.1, 0.2):
        time.sleep(delay)
        try:
            resize(*size)
            return
        except ConvoxError:
            continue


def exit_status(code, first_output=b""):
    """The status of a process that ended, with the engine's 'cannot run' cases mapped to
    126/127 as Docker's CLI maps them (SPEC §6)."""
    text = first_output.lower()
    # Only the runtime's own message counts (Docker and Podman both name the "OCI
    # runtime"): a process that prints "No such file or directory" and exits 126 keeps 126.
    if code in (126, 127, None) and b"oci runtime" in text:
        if b"executable file not found" in text or b"no such file or directory" in text:
            return STATUS_NOT_FOUND
        if b"permission denied" in text:
            return STATUS_NOT_EXECUTABLE
    # Podman's init (catatonit, for HostConfig.Init) that cannot run the command says so
    # and exits 1, where Docker's (tini) exits 127 or 126 itself.
    if code == 1 and b"(catatonit:" in text and b"failed to exec pid1" in text:
        return STATUS_NOT_EXECUTABLE if b"permission denied" in text else STATUS_NOT_FOUND
    return code


def _start_failure(exc):
    """A container that could not start: 127/126 when the command was not there/runnable."""
    status = exit_status(None, str(exc).encode("utf-8"))
    if status is not None:
        exc.status = status
    return exc


def cmd_exec(ctx):
    """convox exec TARGET COMMAND..."""
    args = ctx.args
    command = command_words(args.command)
    if not args.target or not command:
        raise UsageError("exec needs a process and a command — convox exec TARGET COMMAND...")
    keys_text = args.detach_keys or DEFAULT_DETACH_KEYS
    parse_detach_keys(keys_text)  # bad keys are an error before anything runs
    app, _ = ctx.app()
    process = ctx.rack.target(app, args.target)
    status = exec_session(ctx, ctx.rack.engine_for(process), process.id, command,
                          tty=ctx.stdio.wants_tty(args.tty),
                          env=local_env(args.env, ctx.environ), workdir=args.workdir, user=args.user, keys_text=keys_text)
    return 0 if status == "detached" else status


def exec_session(ctx, engine, container, command, *, tty, env=None, workdir=None, user=None,
                 keys_text=DEFAULT_DETACH_KEYS, deadline=None, signal_pipe=None, forward=None):
    """Run COMMAND in a running container, attached (SPEC §5); -> its exit status, or
    ``"detached"`` (the detach keys) or ``"timeout"`` (past ``deadline``).  ``forward``:
    as for ``session``."""
    stdio = ctx.stdio
    config = {
        "AttachStdin": stdio.stdin_fd is not None, "AttachStdout": True,
        "AttachStderr": True, "Tty": tty, "Cmd": command, "Env": env or None,
        "WorkingDir": workdir or "", "User": user or "", "DetachKeys": keys_text,
    }
    exec_id = engine.exec_create(container, config)["Id"]
    stream = engine.hijack("/exec/%s/start" % exec_id, {"Detach": False, "Tty": tty})
    try:
        outcome = session(stream, stdio, tty=tty, detach_keys=parse_detach_keys(keys_text),
                          resize=lambda rows, cols: engine.resize("exec", exec_id, rows, cols),
                          deadline=deadline, signal_pipe=signal_pipe, forward=forward)
    finally:
        stream.close()
    if outcome in ("detached", "timeout"):
        return outcome
    if outcome == "broken-pipe":
        return 141
    if isinstance(outcome, tuple):
        return 128 + outcome[1]
    return exit_status(exec_exit_code(engine, exec_id), stream.first_output)


def local_env(words, environ):
    """--env words as the engine takes them: a bare K takes the local value of K, and
    stays bare (the engine then unsets K) when K is not set here -- docker's rule."""
    return [word if "=" in word or word not in environ else "%s=%s" % (word, environ[word])
            for word in words or ()]


def exec_exit_code(engine, exec_id, patience=5.0):
    """ExitCode of an exec whose stream ended; polled while the engine catches up."""
    give_up = time.monotonic() + patience
    delay = 0.005
    while True:
        info = engine.exec_inspect(exec_id)
        if not info.get("Running") and info.get("ExitCode") is not None:
            return info["ExitCode"]
        if time.monotonic() > give_up:
            raise StreamError("the stream ended but the engine reported no exit status — "
                              "the process may still be running (see convox ps)")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def _container_name(app, service):
    import binascii
    stem = "".join(c if c.isalnum() or c in "_.-" else "-" for c in "%s-%s" % (app, service))
    return "%s-run-%s" % (stem.strip("-_.") or "convox",
                          binascii.hexlify(os.urandom(4)).decode("ascii"))


def cmd_run(ctx):
    """convox run SERVICE COMMAND..."""
    args = ctx.args
    command = command_words(args.command)
    if not args.target or not command:
        raise UsageError("run needs a service and a command — convox run SERVICE COMMAND...")
    if args.timeout is not None and not 0 <= args.timeout <= MAX_RUN_TIMEOUT:
        raise UsageError("--timeout must be 0 (none) or a number of seconds up to %d" %
                         MAX_RUN_TIMEOUT)
    if args.detach and args.timeout is not None:  # SPEC §6: never silently ignored
        raise UsageError("--timeout does not apply to --detach: a detached one-off runs until "
                         "it ends or convox ps stop — leave one of them out")
    node_labels = parse_node_labels(args.node_labels)
    rack = ctx.rack
    app, inferred = ctx.app()
    service = args.target
    template = rack.template(app, service)
    declared = ()
    if template is None:
        template, declared = manifest_template(rack.engine_for(None), app, service,
                                               ctx.environ)
    if template is None:
        services = sorted(set(rack.services(app)) | set(declared))
        if not services:
            rack.require_app(app, inferred)
        raise ConvoxError("no such service: %s (app %s); services: %s" %
                          (service, app, ", ".join(services) or "none"))
    image = rack.release_image(app, service, args.release) if args.release else None
    resources = {flag: getattr(args, flag) for flag in RESOURCES}
    return rack.run(ctx, template, command, app=app, service=service, image=image,
                    release=args.release, entrypoint=args.entrypoint, node_labels=node_labels,
                    resources=resources)


def parse_node_labels(text):
    """--node-labels K=V,K2=V2 -> [(K, V), ...]."""
    pairs = []
    for item in (text or "").split(",") if text is not None else ():
        key, sep, value = item.strip().partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UsageError("--node-labels takes KEY=VALUE pairs separated by commas, not "
                             "%r — e.g. --node-labels role=batch,disk=ssd" % text)
        pairs.append((key.strip(), value.strip()))
    return pairs


def run_one_off(ctx, template, command, *, app, service, image=None, release=None,
                entrypoint=True, resources=None):
    """Create, attach, start and follow a one-off process; return its exit status.

    Attached, the container is removed when it ends whatever happens (AutoRemove, and a
    removal by name on every way out: the name is known before create returns, so even
    Ctrl-C during create leaves nothing).  ``--timeout`` is enforced twice: by this client,
    and by a watchdog process that outlives it (SIGKILL, a lost terminal).
    """
    args = ctx.args
    rack = ctx.rack
    engine = rack.engine_for(None)
    stdio = ctx.stdio
    detach = bool(args.detach)
    tty = False if detach else stdio.wants_tty(args.tty)
    terminal = stdio.terminal_fd() if tty else None
    console = terminal_size(terminal) if terminal is not None else None
    attach_stdin = not detach and stdio.stdin_fd is not None
    config, extra_networks = one_off_config(
        template, command, app=app, service=service, image=image, release=release,
        env=local_env(args.env, ctx.environ), resources=resources, entrypoint=entrypoint,
        tty=tty, stdin=attach_stdin, detach=detach, console=console)
    name = _container_name(app, service)
    timeout = DEFAULT_RUN_TIMEOUT if args.timeout is None else args.timeout
    if detach:
        try:
            container = rack.one_off(config, name, extra_networks)
            engine.start(container)
        except BaseException as exc:
            _quietly(engine.remove, name)
            raise _start_failure(exc) if isinstance(exc, EngineError) else exc
        ctx.out("Running detached process... OK, %s\n" % printable(container[:12]))
        return 0

    import contextlib
    stream = waiter = None
    detached = False
    with contextlib.ExitStack() as cleanup:
        # One pipe from here to the end: the session takes it over, so a signal during start
        # (which takes a while) still reaches the process; and the removal below runs
        # before the pipe is gone, so a second Ctrl-C cannot cut it short.
        pending = cleanup.enter_context(SignalPipe(
            [getattr(signal, n) for n in SESSION_SIGNALS]))
        cleanup.callback(lambda: detached or _quietly(engine.remove, name))
        container = rack.one_off(config, name, extra_networks)
        if timeout:
            spawn_watchdog(engine, name, timeout, ctx.environ)
        stream = engine.hijack("/containers/%s/attach" % container, query={
            "stream": 1, "stdin": int(attach_stdin), "stdout": 1, "stderr": 1})
        cleanup.callback(stream.close)
        # Set the wait up before start, and read its headers: then the engine is known to
        # be waiting, so a process that exits at once cannot be missed.
        waiter = engine.send_only("POST", "/containers/%s/wait" % container,
                                  {"condition": "next-exit"})
        cleanup.callback(waiter.close)
        try:
            wait_response = waiter.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            raise unreachable(engine.rack, exc)  # e.g. no head within CONVOX_TIMEOUT
        if pending.fd is not None and set(_drain_signals(pending.fd)) - {signal.SIGWINCH}:
            raise KeyboardInterrupt  # a signal before start: never start it
        try:
            engine.start(container)
        except EngineError as exc:
            raise _start_failure(exc)
        deadline = time.monotonic() + timeout if timeout else None
        forwarded = []

        def forward(signum):
            if not forwarded:
                _await_init(engine, container)
            forwarded.append(signum)
            name_ = "KILL" if forwarded.count(signum) > 1 else signal.Signals(signum).name
            _quietly(engine.kill, container, name_)

        outcome = session(stream, stdio, tty=tty, detach_keys=parse_detach_keys(
            DEFAULT_DETACH_KEYS) if tty else b"", forward=forward, deadline=deadline,
            resize=lambda rows, cols: engine.resize("containers", container, rows, cols),
            signal_pipe=pending)
        if outcome == "detached":
            detached = True  # it runs on: no removal (its watchdog still holds the timeout)
            return 0
        if outcome == "timeout":
            _quietly(engine.stop, container)
            raise TimeoutExpired("timeout after %d seconds" % timeout)
        if outcome == "broken-pipe":
            _quietly(engine.kill, container, "PIPE")
            return 141
        code = _wait_status(wait_response)
        if code is None:
            raise StreamError("the stream ended but the engine reported no exit status — "
                              "see convox ps --all")
        return exit_status(code, stream.first_output)


def _await_init(engine, container, patience=10.0):
    """Wait briefly until the one-off's init has started the command, before a signal.

    The engine's start returns before the init has set up its signals, and until it has,
    the kernel drops any signal sent to it (a PID namespace's init gets only the signals
    it handles or blocks, pid_namespaces(7)): a Ctrl-C right after start would be lost.
    Once the init has a child (GET /containers/ID/top), it passes on what it is sent.
    """
    give_up = time.monotonic() + patience
    while True:
        try:
            top = engine.request("GET", "/containers/%s/top" % container) or {}
        except ConvoxError:
            return  # it has ended, or this engine has no top: send the signal anyway
        if len(top.get("Processes") or []) > 1 or time.monotonic() > give_up:
            return
        time.sleep(0.02)


def _wait_status(response):
    """StatusCode from a /wait response, or None when it broke off."""
    try:
        body = json.loads(response.read(ERROR_BODY_MAX).decode("utf-8") or "{}")
    except (OSError, ValueError, RecursionError, http.client.HTTPException):
        return None
    if (body.get("Error") or {}).get("Message"):
        raise StreamError("the engine could not wait for the process: %s" %
                          body["Error"]["Message"])
    return body.get("StatusCode")


#: All the watchdog keeps of the environment: what reaching the engine takes (TLS settings;
#: for ssh:// racks the ssh client, its PATH, HOME and agent, and where its socket goes).
#: Nothing else: the client's environment, like its command line, may hold secrets.
WATCHDOG_ENVIRON = ("DOCKER_TLS_VERIFY", "DOCKER_TLS", "DOCKER_CERT_PATH", "DOCKER_CONFIG",
                    "HOME", "PATH", "SSH_AUTH_SOCK", "CONVOX_SSH_COMMAND", "TMPDIR",
                    "XDG_CACHE_HOME")


def spawn_watchdog(engine, container, timeout, environ):
    """Enforce --timeout even if this client dies: a program of its own, in a session of its
    own (``convox.py --watchdog RACK CONTAINER DEADLINE``), waits for the container's removal
    and past the deadline stops and removes it.  A new program, not a fork that runs on: a
    fork shows the client's command line in ``ps`` (``--env DBPASS=…``) and its environment
    in /proc.  Its inputs are a rack URL, so that it reaches the engine on its own."""
    program = os.path.abspath(
        getattr(globals().get("__loader__"), "archive", None) or __file__)  # zipapp
    argv = [sys.executable, program]
    try:
        with open(program, "rb") as handle:
            if handle.read(10) == b"#!/bin/sh\n":
                argv = ["/bin/sh", program]  # the launcher: the code compiled once, not again
    except OSError:
        pass
    argv += ["--watchdog", engine.rack.url, container, "%d" % (time.time() + timeout + 1)]
    env = {key: environ[key] for key in WATCHDOG_ENVIRON if key in environ}
    env.update(DOCKER_API_VERSION=engine.api_version(), CONVOX_PYTHON=sys.executable)
    try:
        child = os.fork()
    except OSError:
        return  # the client still enforces the timeout while it lives
    if child:
        os.waitpid(child, 0)
        return
    try:
        os.setsid()
        if not os.fork():
            _become_daemon()
            os.execve(argv[0], argv, env)
    except BaseException:
        pass
    os._exit(0)


def watchdog(rack_url, container, deadline, environ):
    """The watchdog's program (see spawn_watchdog): wait for the container's removal; at
    ``deadline`` (UNIX seconds) stop and remove it.  On an ssh rack it has its own ssh."""
    engine = Engine(parse_rack(rack_url, environ), environ)
    try:
        if container.startswith("service:"):  # a Swarm one-off's service
            return _watch_service(engine, container[len("service:"):], float(deadline))
        try:
            conn = engine.connect(timeout=max(0.0, float(deadline) - time.time()) + 1)
            conn.request("POST", engine.url("/containers/%s/wait" % container,
                                            {"condition": "removed"}), body=b"")
            conn.getresponse().read(ERROR_BODY_MAX)
            return  # removed before its deadline
        except (ConvoxError, OSError, http.client.HTTPException):
            pass  # the deadline passed (socket.timeout), or the way there broke (ssh)
        time.sleep(max(0.0, float(deadline) - time.time()))
        engine.close()  # a new way there: after an hour, the old one may be long dead
        engine.rack.close()
        engine.stop(container)
        engine.remove(container)
    finally:
        engine.rack.close()


def _watch_service(engine, service, deadline):
    """A Swarm one-off's watchdog: its task ends by itself at the deadline (it holds that
    long); then remove its service, unless the service is gone before."""
    while time.time() < deadline:
        time.sleep(max(0.0, min(5.0, deadline - time.time())))
        try:
            engine.request("GET", "/services/%s" % service)
        except NotFound:
            return
        except ConvoxError:
            engine.close()  # the next look takes a new way there (a new ssh)
            engine.rack.close()
            continue
    engine.request("DELETE", "/services/%s" % service)


def _become_daemon(keep=None):
    """Drop everything a watchdog or janitor inherited: fds (sockets, the terminal; all but
    ``keep``) and handlers."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
        signal.signal(signum, signal.SIG_IGN if signum != signal.SIGTERM else signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if keep is None:
        os.closerange(3, _max_fd())
    else:
        os.closerange(3, keep)
        os.closerange(keep + 1, _max_fd())


def _max_fd():
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 65536)
    except (ValueError, OSError):
        return 4096



# -- start ----------------------------------------------------------------------------------

#: Manifest file names `start` looks for, in order (SPEC §7).
MANIFEST_NAMES = ("convox.yml", "convox.yaml", "docker-compose.yml", "docker-compose.yaml",
                  "compose.yml", "compose.yaml")

#: The longest line `start` holds back waiting for its end; a longer one is printed in
#: pieces of this size, each as a line of its own, so that output with no newline in it
#: takes neither memory nor time beyond its size.
LINE_MAX = 64 * 1024

#: ANSI colours of the service prefixes, in turn.
PREFIX_COLOURS = (36, 33, 32, 35, 34, 31, 96, 93, 92, 95, 94, 91)


# -- logs -----------------------------------------------------------------------------------

#: Seconds a line may wait for an earlier one of another process (SPEC §9).
LOG_HOLD = 0.25
#: Lines of one process that may wait in the merge before its stream is read no further.
LOG_BACKLOG = 10000
#: Go's duration units (time.ParseDuration) and days, in seconds.
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60,
                   "h": 3600, "d": 86400}
_DURATION_PART = r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)"


def parse_when(text, option, now=None):
    """--since/--until (SPEC §9) -> UNIX seconds as the engine takes them ("S.NNNNNNNNN"):
    a Go duration or days before now (90s, 1h30m, 2d), RFC 3339, a local
    YYYY-MM-DD[THH[:MM[:SS]]], or UNIX seconds."""
    now = time.time() if now is None else now
    try:
        if re.match("(?:%s)+\\Z" % _DURATION_PART, text):
            ago = sum(float(number) * _DURATION_UNITS[unit]
                      for number, unit in re.findall(_DURATION_PART, text))
            return "%.9f" % (now - ago)
        if re.match(r"\d+(\.\d{1,9})?\Z", text):
            return text
        stamp = canonical_stamp(text.encode("utf-8", "surrogateescape"))
        if stamp is not None:
            return stamp_seconds(stamp)
        match = re.match(r"(\d{4}-\d\d-\d\d)(?:T(\d\d)(?::(\d\d)(?::(\d\d))?)?)?\Z", text)
        if match:
            day, hour, minute, second = match.groups()
            local = time.strptime("%sT%s:%s:%s" % (day, hour or "00", minute or "00",
                                                   second or "00"), "%Y-%m-%dT%H:%M:%S")
            return "%d.000000000" % time.mktime(local)
    except (ValueError, OverflowError):
        pass  # a date that does not exist (2026-02-30): as malformed
    raise UsageError("invalid %s %r — use a duration (90s, 10m, 1h30m, 2d), RFC 3339 "
                     "(2026-12-02T10:00:00Z), a local date (2026-12-02, 2026-12-02T10:00) "
                     "or UNIX seconds" % (option, text))


class LogSource:
    """One process whose logs are read: its labels in each format and how far it got."""

    def __init__(self, process):
        self.process = process
        self.id, self.service = process.id, process.service
        self.tty = process.tty
        self.label = ("service/%s/%s " % (self.service, self.id[:12])).encode("utf-8")
        self.name = "%s-%s" % (self.service, self.id[:8])
        self.prefix = b""     # compose's, set by the follower (its width depends on all)
        self.colour = None    # compose's on a terminal, set by the follower
        self.stream = None
        self.lines = None
        self.last = None      # the stamp of the last line read, and how many lines had it
        self.repeats = 0
        self.skip = None      # after a resume: (stamp, count) of lines already read again

    def take(self, entries):
        """Entries read -> those not read before (a resumed stream repeats its last stamp's
        lines: the engine's since is inclusive); notes how far the stream got."""
        if self.skip is not None and entries:
            stamp, count = self.skip
            index = 0
            while index < len(entries) and (entries[index][0] < stamp or (
                    entries[index][0] == stamp and count > 0)):
                count -= entries[index][0] == stamp
                index += 1
            entries = entries[index:]
            self.skip = (stamp, count) if not entries else None
        if entries:
            last = entries[-1][0]
            same = 0
            for entry in reversed(entries):
                if entry[0] != last:
                    break
                same += 1
            self.repeats = same + (self.repeats if same == len(entries) and
                                   last == self.last else 0)
            self.last = last
        return entries


class LogFollower:
    """Reads the log streams of processes, and with ``follow`` the engine's events, in one
    select loop; merges their lines (LogMerge) and writes them to ``fd``."""

    def __init__(self, rack, fd, render, query, needle=None, follow=True, until=False,
                 colour=False):
        self.rack = rack
        self.fd = fd
        self.render = render
        self.query = query
        self.needle = needle
        self.follow = follow
        self.until = until        # --until: a stream that ends is done, also when running
        self.colour = colour
        self.sources = {}         # container ID -> LogSource, of the processes not ended
        self.ended = {}           # container ID -> (last stamp, repeats) of ended ones
        self.joined = 0           # processes seen: the next one's colour
        self.by_sock = {}         # socket -> LogSource, of the streams being read
        self.merge = LogMerge(self._emit, LOG_HOLD)
        self.pending = []
        self.events = None
        self.events_rest = b""
        self.events_since = None
        self.accept = None        # Process -> True for one that joins while following

    def _emit(self, source, entries):
        if self.needle is not None:
            entries = [entry for entry in entries if self.needle in entry[2]]
        if entries:
            self.pending.append(self.render(source, entries))

    def flush(self):
        if self.pending:
            data, self.pending = b"".join(self.pending), []
            _write_all(self.fd, data)

    def add(self, *processes):
        """Read these processes' logs (again, after the last line, when it is known).  All
        join the merge before a line of any is read: the first cannot go ahead alone."""
        opened = [source for source in map(self._open, processes) if source is not None]
        for source in opened:
            if source.stream.early:
                self._read(source, source.stream.early)

    def _open(self, process):
        source = self.sources.get(process.id)
        if source is None:
            source = self.sources[process.id] = LogSource(process)
            # A process that ended and starts again goes on after its last line.
            source.last, source.repeats = self.ended.pop(process.id, (None, 0))
            source.colour = PREFIX_COLOURS[self.joined % len(PREFIX_COLOURS)]
            self.joined += 1
            width = max(len(s.name) for s in self.sources.values())
            for each in self.sources.values():
                text = "%s | " % each.name.ljust(width)
                if self.colour:
                    text = "\x1b[%dm%s\x1b[0m" % (each.colour, text)
                each.prefix = text.encode("utf-8")
        elif source.stream is not None:
            return None  # read already
        query = dict(self.query, follow=self.follow)
        if source.last is not None:
            query.pop("tail", None)
            query["since"] = stamp_seconds(source.last)
            source.skip = (source.last, source.repeats)
        source.stream = self.rack.log_stream(source.process, query)
        source.lines = LogLines(source.tty)
        self.by_sock[source.stream.sock] = source
        self.merge.join(source)
        return source

    def watch(self, app, accept):
        """Follow the rack's events: a process of ``app`` for which ``accept(process)``
        holds is read from the moment it starts (SPEC §9: within 1 s)."""
        self.accept = (app, accept)
        self.events = self.rack.starts(self.events_since)
        self.events_rest = self.events.early

    def _event_lines(self, data):
        lines = (self.events_rest + data).split(b"\n")
        self.events_rest = lines.pop()
        for line in lines:
            try:
                event = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):  # RecursionError: nested 100,000 deep
                continue
            if not isinstance(event, dict):
                continue
            if event.get("timeNano"):
                self.events_since = "%d.%09d" % divmod(event["timeNano"], 10 ** 9)
            app, accept = self.accept
            process = self.rack.started(event, app)
            if process is not None and accept(process):
                self.add(process)

    def _read(self, source, data):
        try:
            entries = source.lines.feed(data)
        except StreamError as exc:
            self.merge.add(source, source.take(exc.entries), time.monotonic())
            raise
        self.merge.add(source, source.take(entries), time.monotonic())

    def _ended(self, source):
        del self.by_sock[source.stream.sock]
        source.stream.close()
        source.stream = None
        self.merge.add(source, source.take(source.lines.end()), time.monotonic())
        if self.follow and not self.until:
            # The engine ends a followed stream when the process stops; a stream that ends
            # while the process runs was cut, and goes on after its last line.
            process = self.rack.refresh(source.process)
            if process is not None and process.running:
                time.sleep(0.1)  # a stream the engine keeps cutting costs no busy loop
                source.process = process
                self.add(process)
                return
        self.merge.leave(source)
        # Only where it got to is kept: following for days through many one-offs costs
        # no more memory than following one.
        del self.sources[source.id]
        self.ended[source.id] = (source.last, source.repeats)

    def close(self):
        """Print what still waits (also on errors: output is never lost); close streams."""
        try:
            self.merge.release(time.monotonic(), everything=True)
            self.flush()
        finally:
            for source in list(self.by_sock.values()):
                source.stream.close()
            if self.events is not None:
                self.events.close()

    def run(self):
        """Until every stream has ended (with events: until interrupted)."""
        if self.events is not None and self.events_rest:
            self._event_lines(b"")
        # A pipe's writing end turns readable (POLLERR) when its reader goes (| head): then
        # end, as the next write would, without waiting for a line that may never come.
        reader_gone = [self.fd] if stat.S_ISFIFO(os.fstat(self.fd).st_mode) else []
        while self.by_sock or self.events is not None:
            wait = self.merge.release(time.monotonic())
            self.flush()
            readable = [sock for sock, source in self.by_sock.items()
                        if self.merge.backlog(source) < LOG_BACKLOG]
            if self.events is not None:
                readable.append(self.events.sock)
            ready, _, _ = select.select(readable + reader_gone, [], [], wait)
            if reader_gone and self.fd in ready:
                raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")
            for sock in ready:
                try:
                    data = sock.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if self.events is not None and sock is self.events.sock:
                    if data:
                        self._event_lines(data)
                    else:  # the engine went away, or restarts: ask again, or fail
                        self.events.close()
                        self.watch(*self.accept)
                elif data:
                    self._read(self.by_sock[sock], data)
                else:
                    self._ended(self.by_sock[sock])


def cmd_logs(ctx):
    """convox logs [PID]"""
    args = ctx.args
    rack = ctx.rack
    app, inferred = ctx.app()
    query = {"stdout": 1, "stderr": 1, "timestamps": 1, "tail": args.tail}
    if args.tail is not None and args.tail < 0:
        raise UsageError("--tail takes a number of lines (0 or more), not %d" % args.tail)
    since = args.since or (None if args.pid else "2m")
    if since:
        query["since"] = parse_when(since, "--since")
    if args.until:
        query["until"] = parse_when(args.until, "--until")
    fd = ctx.stdio.stdout_fd
    colour = args.format == "compose" and not args.no_color and \
        not ctx.environ.get("NO_COLOR") and os.isatty(fd)
    needle = None if args.filter is None else args.filter.encode("utf-8", "surrogateescape")
    follower = LogFollower(rack, fd, LOG_FORMATS[args.format], query, needle,
                           follow=args.follow, until=bool(args.until), colour=colour)
    services = set(args.service or ())

    def accept(process):
        return not services or process.service in services
    try:
        if args.pid:
            try:
                processes = [rack.find(app, args.pid)]
            except ConvoxError:
                if args.pid not in rack.services(app):
                    raise
                raise ConvoxError("no such process: %s (app %s); %s is a service — use "
                                  "convox logs -s %s" % (args.pid, app, args.pid, args.pid))
        else:
            if args.follow and not args.until:
                # Before the list: a process that starts meanwhile is not missed.
                follower.watch(app, accept)
            rack.require_app(app, inferred)
            known = rack.services(app)
            unknown = sorted(services - set(known))
            if unknown:
                raise ConvoxError("no such service: %s (app %s); services: %s — see convox ps"
                                  % (", ".join(unknown), app, ", ".join(known)))
            processes = [p for p in rack.processes(app, all=True) if accept(p)]
        follower.add(*sorted(processes, key=lambda process: process.created))
        follower.run()
    except KeyboardInterrupt as exc:
        if exc.args and exc.args[0] != signal.SIGINT:
            raise
    finally:
        follower.close()
    return 0  # Ctrl-C ends following: that is how it ends (SPEC §9)


def find_manifest(option, cwd=None):
    """The manifest to start: -m FILE, else the first of MANIFEST_NAMES in the folder."""
    cwd = cwd or os.getcwd()
    if option:
        path = os.path.join(cwd, option)
        if not os.path.isfile(path):
            raise ConvoxError("no manifest at %s — check the -m/--manifest path" % option)
        return path
    for name in MANIFEST_NAMES:
        path = os.path.join(cwd, name)
        if os.path.isfile(path):
            return path
    raise ConvoxError("no convox.yml or docker-compose.yml in %s — cd to the app's folder "
                      "or use -m FILE" % cwd)


def new_release():
    """A release ID like Convox's: R and ten upper-case letters."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return "R" + "".join(letters[byte % 26] for byte in bytearray(os.urandom(10)))


class LogPrinter:
    """Writes ``SERVICE | line`` output: prefixes padded to the longest name, one colour per
    service on a terminal, whole lines only (partial lines wait for their end, up to
    LINE_MAX bytes)."""

    def __init__(self, names, fd=1, colour=False):
        self.width = max([len(name) for name in names] + [len("convox"), len("build")])
        self.fd = fd
        self.colours = {}
        if colour:
            for index, name in enumerate(names):
                self.colours[name] = PREFIX_COLOURS[index % len(PREFIX_COLOURS)]
        self.partial = {}

    def prefix(self, name):
        text = "%s | " % name.ljust(self.width)
        colour = self.colours.get(name)
        return ("\x1b[%dm%s\x1b[0m" % (colour, text)) if colour else text

    def write(self, name, data, key=None):
        """Print the whole lines of ``data`` (bytes) under ``name``; keep the rest."""
        key = key or name
        data = self.partial.pop(key, b"") + data  # what is kept is short: linear in all
        lines = data.split(b"\n")
        rest, start = lines.pop(), 0
        while len(rest) - start > LINE_MAX:
            cut = start + LINE_MAX
            for back in range(4):  # not inside a UTF-8 character, if it is UTF-8
                if rest[cut - back] & 0xC0 != 0x80:
                    cut -= back
                    break
            lines.append(rest[start:cut])
            start = cut
        if start < len(rest):
            self.partial[key] = rest[start:]
        prefix = self.prefix(name).encode("utf-8")
        out = b"".join(prefix + line.rstrip(b"\r") + b"\n" for line in lines)
        if out:
            _write_all(self.fd, out)

    def flush(self, name, key=None):
        rest = self.partial.pop(key or name, b"")
        if rest:
            self.write(name, rest + b"\n", key)

    def say(self, text, name="convox"):
        """A status line of ours (``convox | web exited with code 3``), made safe."""
        self.write(name, one_line(text).encode("utf-8") + b"\n")


class LocalApp:
    """What one `convox start` created on the engine, so that it can all be removed."""

    def __init__(self, engine, app, manifest, release):
        self.engine = engine
        self.app = app
        self.manifest = manifest
        self.release = release
        self.network = None
        self.network_created = False
        self.containers = {}      # service -> container ID, in start order
        self.images = {}          # service -> image reference

    def repository(self, service):
        return ("%s/%s" % (self.app, service)).lower()

    # -- images ----------------------------------------------------------------------------

    def build(self, names, printer, no_build=False, no_cache=False):
        for name in names:
            service = self.manifest.services[name]
            if service.build is None:
                self.images[name] = self.ensure_image(service.image, printer)
            elif no_build:
                self.images[name] = self.last_build(name)
            else:
                self.images[name] = self.build_service(service, printer, no_cache)
                self.prune_images(name)

    def prune_images(self, name):
        """Untag all but the current and the previous release's build of a service (tags
        APP/SERVICE:RELEASE on images labelled with the app and service: start made them)."""
        # Podman lists the tags with a registry: docker.io/APP/SERVICE:RELEASE.
        tags = re.compile(r"((docker\.io|localhost)/)?%s:(R[A-Z]{10})\Z" %
                          re.escape(self.repository(name)))
        builds = []
        # One label in the filter: Podman 4 finds nothing when given two.
        for image in self.engine.request("GET", "/images/json", {"filters": {"label": [
                "%s=%s" % (LABEL_APP, self.app)]}}) or []:
            if (image.get("Labels") or {}).get(LABEL_SERVICE) != name:
                continue
            builds += [(image.get("Created") or 0, tag) for tag in image.get("RepoTags") or []
                       if tags.match(tag) and tags.match(tag).group(3) != self.release]
        older = sorted(builds, reverse=True)
        for _, tag in older[1:]:
            _quietly(self.engine.request, "DELETE", "/images/%s" % tag)

    def watches(self, names):
        """name -> (ContextWatch, copies) of each built service whose Dockerfile copies from
        its context; taken before the build, so that edits made during it are synced."""
        found, by_root = {}, {}
        for name in names:
            build = self.manifest.services[name].build
            if build is None:
                continue
            path = os.path.join(build["context"], build.get("dockerfile") or "Dockerfile")
            rel = _go_clean(os.path.relpath(path, build["context"]).replace(os.sep, "/"))
            # Read as the build reads its context: never through a link, never a fifo.
            text = None if rel.startswith("../") else read_context_file(build["context"], rel)
            if text is None:
                continue  # the build says what is wrong (a Dockerfile outside: no sync)
            args = {k: v for k, v in (build.get("args") or {}).items() if v is not None}
            copies = dockerfile_copies(text.decode("utf-8", "replace"), args,
                                       build.get("target"))
            if copies:
                if build["context"] not in by_root:
                    by_root[build["context"]] = ContextWatch(build["context"])
                found[name] = (by_root[build["context"]], copies)
        return found

    def build_service(self, service, printer, no_cache):
        build = service.build
        tag = "%s:%s" % (self.repository(service.name), self.release)
        printer.say("building %s" % service.name, "build")
        labels = {LABEL_APP: self.app, LABEL_SERVICE: service.name,
                  LABEL_RELEASE: self.release}
        query = {"t": tag, "dockerfile": build.get("dockerfile") or "Dockerfile",
                 "target": build.get("target"),
                 "labels": json.dumps(labels), "rm": "1", "forcerm": "1",
                 "buildargs": json.dumps(build.get("args") or {}),
                 "nocache": "1" if no_cache else None}
        chunks = tar_context(build["context"], build.get("dockerfile") or "Dockerfile")
        try:
            for message in self.engine.build(chunks, query):
                text = message.get("stream") or message.get("status") or ""
                for line in text.splitlines():
                    if line.strip():  # the Dockerfile's output: as raw as a service's
                        printer.write("build", line.rstrip().encode("utf-8") + b"\n")
        except EngineError as exc:
            raise ConvoxError("build of %s failed: %s — fix the Dockerfile or the build "
                              "context" % (service.name, exc))
        return tag

    def last_build(self, name):
        image = newest_image(self.engine, self.app, name)
        if image is None:
            raise ConvoxError("no build of %s yet — run convox start without --no-build" %
                              name)
        return image

    def ensure_image(self, image, printer):
        """An image service's image, pulled when the engine does not have it."""
        if not image:
            raise ConvoxError("a service needs build or image — see the manifest")
        try:
            self.engine.request("GET", "/images/%s/json" % image)
            return image
        except NotFound:
            pass
        printer.say("pulling %s" % image, "build")
        if "@" in image or ":" not in image.rsplit("/", 1)[-1]:
            query = {"fromImage": image, "tag": None if "@" in image else "latest"}
        else:
            name, _, tag = image.rpartition(":")
            query = {"fromImage": name, "tag": tag}
        conn = self.engine.connect(timeout=None)
        try:
            conn.request("POST", self.engine.url("/images/create", query), body=b"")
            response = conn.getresponse()
            body = self.engine._read_control_body(response, "POST", "/images/create")
            body = body.decode("utf-8", "replace")
        except (OSError, http.client.HTTPException) as exc:
            raise unreachable(self.engine.rack, exc)
        finally:
            conn.close()
        for line in body.splitlines():
            try:
                message = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if message.get("error") or message.get("message"):
                raise ConvoxError("cannot pull %s: %s — build it or load it into the "
                                  "engine first" % (image, message.get("error") or
                                                    message.get("message")))
        if response.status >= 400:
            raise ConvoxError("cannot pull %s: %s" % (image, _error_message(
                body.encode("utf-8"), response.status, response.reason)))
        return image

    # -- containers ------------------------------------------------------------------------

    def made_by_start(self, labels, service=None):
        """Whether an object's labels say this app's `convox start` made it."""
        labels = labels or {}
        return (labels.get(LABEL_APP) == self.app and LABEL_START in labels and
                (service is None or labels.get(LABEL_SERVICE) == service))

    def claim(self, names):
        """Refuse to start over another start of the app or over objects start did not make
        (a `docker run --name APP-db` holding data, someone's network named APP); remove
        the leftovers of an earlier start that was killed, which are ours."""
        ours = self.refuse_another_start(("running",))
        for name in names:
            container = "%s-%s" % (self.app, name)
            try:
                labels = self.engine.inspect(container)["Config"]["Labels"]
            except NotFound:
                continue
            if not self.made_by_start(labels, name):
                raise ConvoxError("a container named %s exists that convox start did not "
                                  "make — remove or rename it (docker rm %s), or start the "
                                  "app under another name with -a" % (container, container))
        network = self.network_info()
        if network is not None and not self.made_by_start(network.get("Labels")):
            raise ConvoxError("a network named %s exists that convox start did not make — "
                              "remove it (docker network rm %s), or start the app under "
                              "another name with -a" % (self.app, self.app))
        for summary in ours:
            self.engine.remove(summary["Id"])

    def refuse_another_start(self, states=None):
        """Raise when another `start` of the app has containers (in one of ``states``);
        -> all the containers that starts of the app made."""
        # One label in the filter: Podman 4 finds nothing when given two (see prune_images).
        ours = [s for s in self.engine.containers(all=True, filters={
            "label": ["%s=%s" % (LABEL_APP, self.app)]}) if self.made_by_start(s.get("Labels"))]
        running = [s for s in ours if states is None or s.get("State") in states]
        if running:
            names = sorted(n.lstrip("/") for s in running for n in s.get("Names") or [])
            raise ConvoxError("app %s is already running (%s, from another convox start) — "
                              "stop that one first (Ctrl-C in its terminal, or convox ps stop ID if "
                              "it is gone)"
                              % (self.app, ", ".join(names)))
        return ours

    def network_info(self):
        """The network named APP, or None (a lookup by name also matches ID prefixes)."""
        try:
            info = self.engine.request("GET", "/networks/%s" % self.app)
        except NotFound:
            return None
        return info if info.get("Name") == self.app else None

    def ensure_network(self):
        """Make the APP network, or take over the one an earlier, killed start left."""
        # claim() removed a killed start's containers: any there now are those of a start
        # that began while this one was building, and the network is in its use.
        self.refuse_another_start()
        self.network = self.app
        if self.network_info() is None:
            self.engine.request("POST", "/networks/create", body={
                "Name": self.network, "CheckDuplicate": True,
                "Labels": {LABEL_APP: self.app, LABEL_START: "1"}})
        self.network_created = True

    def container_config(self, name):
        """The create body of service ``name`` from the manifest."""
        service = self.manifest.services[name]
        labels = dict(service.labels or {})
        labels.update({LABEL_APP: self.app, LABEL_SERVICE: name,
                       LABEL_RELEASE: self.release, LABEL_TYPE: "service", LABEL_START: "1"})
        config = {
            "Image": self.images[name],
            "Env": ["%s=%s" % item for item in sorted(service.environment.items())],
            "Labels": labels,
            "HostConfig": {"NetworkMode": self.network or "default",
                           "Memory": (service.memory or 0) * 1024 * 1024},
            "AttachStdout": True, "AttachStderr": True,
        }
        if self.network:
            config["NetworkingConfig"] = {"EndpointsConfig": {
                self.network: {"Aliases": [name]}}}
        if service.command is not None:
            config["Cmd"] = service.command
        if service.entrypoint is not None:
            config["Entrypoint"] = service.entrypoint
        if service.healthcheck is not None:
            config["Healthcheck"] = service.healthcheck
        if service.working_dir:
            config["WorkingDir"] = service.working_dir
        if service.user:
            config["User"] = service.user
        binds, anonymous = [], {}
        for volume in service.volumes:
            if volume["type"] == "bind" or volume["source"]:
                source = volume["source"]
                if volume["type"] == "volume":
                    source = self.volume_name(source)
                binds.append("%s:%s%s" % (source, volume["target"],
                                          ":ro" if volume.get("read_only") else ""))
            else:
                anonymous[volume["target"]] = {}
        config["HostConfig"]["Binds"] = binds or None
        if anonymous:
            config["Volumes"] = anonymous
        if service.ports:
            exposed, bindings = {}, {}
            for port in service.ports:
                key = "%d/%s" % (port["container_port"], port["protocol"])
                exposed[key] = {}
                bindings.setdefault(key, []).append({
                    "HostIp": port["host_ip"] or "",
                    "HostPort": str(port["host_port"] or "")})
            config["ExposedPorts"] = exposed
            config["HostConfig"]["PortBindings"] = bindings
        return config

    def volume_name(self, key):
        """The engine's name of a named volume: compose's (PROJECT_key, or the name: or
        external name the file gives), so data is shared with `docker compose up`."""
        if self.manifest.kind != "compose":
            return "%s-%s" % (self.app, key)
        return self.manifest.volume_names.get(key) or "%s_%s" % (self.app, key)

    def await_dependencies(self, name, printer,
                           pause=lambda seconds: not time.sleep(seconds)):
        """Wait until the services ``name`` depends on meet their compose conditions
        (service_healthy, service_completed_successfully); False if a stop was asked for.
        ``pause(seconds)`` passes the time between two looks (Follower.pause prints the
        services' output meanwhile, and is False on Ctrl-C)."""
        for dep, condition in self.manifest.services[name].conditions.items():
            if condition != "service_started" and dep in self.containers:
                printer.say("%s waits for %s (%s)" % (name, dep, condition))
                if not self.await_condition(name, dep, condition, pause):
                    return False
        return True

    def await_condition(self, name, dep, condition, pause):
        """Poll dependency ``dep``'s state until ``condition`` holds (compose waits as long
        as it takes: the healthcheck's retries end it); raise when it can never hold."""
        while True:
            state = self.engine.inspect(self.containers[dep])["State"]
            health = (state.get("Health") or {}).get("Status")
            running = state.get("Running") or state.get("Status") in ("created", "restarting")
            if condition == "service_healthy":
                if health == "healthy":
                    return True
                if health is None:
                    raise ConvoxError("%s waits for %s to be healthy, but %s has no healthcheck "
                                      "— add one to %s or use condition: service_started"
                                      % (name, dep, dep, dep))
                if health == "unhealthy" or not running:
                    raise ConvoxError("%s is %s — %s cannot start; see %s's output above"
                                      % (dep, "unhealthy" if running else "exited with code %s"
                                         % state.get("ExitCode"), name, dep))
            elif not running:
                if state.get("ExitCode") == 0:
                    return True
                raise ConvoxError("%s exited with code %s, but %s needs it to complete "
                                  "successfully — fix %s" % (dep, state.get("ExitCode"), name, dep))
            if not pause(0.25):
                return False

    def template(self, name):
        """An inspect-like view of service ``name`` for `run`'s one-off config."""
        config = self.container_config(name)
        mounts = []
        for bind in config["HostConfig"]["Binds"] or []:
            parts = bind.split(":")
            mounts.append({"Type": "bind" if parts[0].startswith("/") else "volume",
                           "Source": parts[0], "Name": parts[0], "Destination": parts[1],
                           "RW": len(parts) < 3})
        return {
            "Image": config["Image"],
            "Config": {"Env": config["Env"], "Labels": config["Labels"],
                       "Entrypoint": config.get("Entrypoint"),
                       "WorkingDir": config.get("WorkingDir", ""), "User": config.get("User", "")},
            "HostConfig": config["HostConfig"],
            "Mounts": mounts,
            "NetworkSettings": {"Networks": {self.network: {"Aliases": [name]}}
                                if self.network else {}},
        }

    def create(self, name):
        """Create service ``name`` as container APP-SERVICE (claim() made way for it)."""
        container_name = "%s-%s" % (self.app, name)
        ident = self.engine.create_container(self.container_config(name),
                                             container_name)["Id"]
        self.containers[name] = ident
        return ident

    def term_all(self):
        for ident in self.containers.values():
            _quietly(self.engine.kill, ident, "TERM")

    def stop_all(self, grace=STOP_GRACE):
        self.term_all()
        give_up = time.monotonic() + grace
        for ident in self.containers.values():
            while time.monotonic() < give_up:
                try:
                    if not self.engine.inspect(ident)["State"]["Running"]:
                        break
                except ConvoxError:
                    break
                time.sleep(0.1)
        self.kill_all()

    def kill_all(self):
        for ident in self.containers.values():
            _quietly(self.engine.kill, ident, "KILL")

    def remove_all(self):
        for ident in reversed(list(self.containers.values())):
            _quietly(self.engine.remove, ident)
        self.containers.clear()
        if self.network_created:
            # A detached one-off of the app may still be on the network: disconnect it
            # first, or the engine refuses to remove the network ("has active endpoints").
            info = self.network_info() or {}
            for ident in info.get("Containers") or {}:
                _quietly(self.engine.request, "POST", "/networks/%s/disconnect" % self.network,
                         None, {"Container": ident, "Force": True})
            _quietly(self.engine.request, "DELETE", "/networks/%s" % self.network)


def manifest_template(engine, app, service, environ, cwd=None):
    """run's last resort (SPEC §6): the service as the current folder's manifest declares
    it, with its last build (or its image), on the app's network when there is one.
    -> (template or None, the services the manifest declares)."""
    try:
        path = find_manifest(None, cwd)
    except ConvoxError:
        return None, ()
    manifest = load_manifest(path, dict(environ))
    if service not in manifest.services:
        return None, tuple(manifest.services)
    local = LocalApp(engine, app, manifest, release="")
    definition = manifest.services[service]
    if definition.build is not None:
        local.images[service] = local.last_build(service)
    else:
        local.images[service] = local.ensure_image(definition.image, LogPrinter([service], 2))
    network = local.network_info()
    if network is not None and local.made_by_start(network.get("Labels")):
        local.network = app  # a network of that name that start did not make is not joined
    return local.template(service), tuple(manifest.services)


class Follower:
    """Prints every service's output as it comes, from the moment the services are
    created: while start waits on a dependency's condition too, so that a dependency's
    output is neither held back nor left to fill the engine's buffers and stall it.

    ``streams`` maps service -> Hijacked (not TTY).  The first Ctrl-C/SIGTERM/SIGHUP asks
    the services to stop (``stopping``), a second one kills them at once.
    """

    def __init__(self, local, streams, printer, signal_fd):
        self.local = local
        self.printer = printer
        self.signal_fd = signal_fd
        self.demuxers = {name: Demuxer() for name in streams}
        self.by_sock = {}
        self.stopping = False
        self.stop_deadline = None
        self.first_failure = 0
        for name, stream in streams.items():
            stream.sock.setblocking(False)
            self.by_sock[stream.sock] = name
            if stream.early:
                self.print(name, stream.early)

    def print(self, name, data):
        for index, payload in self.demuxers[name].feed(data):
            self.printer.write(name, payload, (name, index))

    def pause(self, seconds):
        """Print what comes for ``seconds`` (await_condition's poll interval); False once a
        stop has been asked for."""
        give_up = time.monotonic() + seconds
        while not self.stopping and time.monotonic() < give_up:
            self.step(give_up)
        return not self.stopping

    def finish(self, names, patience=1.0):
        """Print the rest of what services ``names`` said: their streams end just after
        them, so that a failed dependency's last words come before start's error."""
        give_up = time.monotonic() + patience
        while set(names) & set(self.by_sock.values()) and time.monotonic() < give_up:
            self.step(give_up)

    def run(self, syncer=None):
        """Until all have exited or were stopped -> ``("exited", the first non-zero exit
        status)`` or ``("stopped", 0)``."""
        while self.by_sock:
            due = None if self.stopping or syncer is None else syncer.due
            self.step(min([t for t in (self.stop_deadline, due) if t is not None],
                          default=None))
            if syncer is not None and not self.stopping and time.monotonic() >= syncer.due:
                syncer.targets = [t for t in syncer.targets  # none into a service that ended
                                  if t.service in self.by_sock.values()]
                syncer.tick()
            if self.stop_deadline is not None and time.monotonic() >= self.stop_deadline:
                self.local.kill_all()
                self.stop_deadline = None
        return ("stopped", 0) if self.stopping else ("exited", self.first_failure)

    def step(self, wake=None):
        """One look at the streams and the signals, waiting until ``wake`` at most."""
        readable = list(self.by_sock) + ([self.signal_fd] if self.signal_fd is not None
                                         else [])
        timeout = None if wake is None else max(0, wake - time.monotonic())
        ready, _, _ = select.select(readable, [], [], timeout)
        if self.signal_fd in ready:
            for signum in _drain_signals(self.signal_fd):
                if signum not in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    continue
                if self.stopping:
                    self.printer.say("killing")
                    self.local.kill_all()
                else:
                    self.stopping = True
                    self.printer.say("stopping (press Ctrl-C again to force)")
                    self.local.term_all()
                    self.stop_deadline = time.monotonic() + STOP_GRACE
        for sock in [s for s in ready if s in self.by_sock]:
            name = self.by_sock[sock]
            try:
                data = sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                self.print(name, data)
                continue
            del self.by_sock[sock]
            sock.close()
            for index in (1, 2):
                self.printer.flush(name, (name, index))
            code = _exit_code(self.local.engine, self.local.containers[name])
            if not self.stopping:
                self.printer.say("%s exited with code %s" % (name, code))
                if code and not self.first_failure:
                    self.first_failure = code


def _exit_code(engine, ident, patience=5.0):
    give_up = time.monotonic() + patience
    while True:
        try:
            state = engine.inspect(ident)["State"]
        except ConvoxError:
            return None
        if not state.get("Running") or time.monotonic() > give_up:
            return state.get("ExitCode")
        time.sleep(0.05)


def cmd_start(ctx):
    """convox start [SERVICE [COMMAND...]]"""
    args = ctx.args
    path = find_manifest(args.manifest)
    manifest = load_manifest(path, dict(ctx.environ))
    for warning in manifest.warnings:
        notice(ctx.stderr, "WARNING", warning)
    app, _ = ctx.app()
    engine = ctx.engine
    words = [args.target] + args.command if args.target else []
    command = None
    if words and all(word in manifest.services for word in words):
        names = []  # `start web worker`: those services and what they depend on
        for word in words:
            names += [name for name in manifest.dependencies(word) if name not in names]
    elif words:
        names = manifest.dependencies(args.target)
        command = command_words(args.command) if args.command else None
    else:
        profiles = args.profile or manifest.variables.get("COMPOSE_PROFILES", "").split(",")
        names = manifest.selected(word.strip() for word in profiles if word.strip())
    local = LocalApp(engine, app, manifest, new_release())
    stdio = ctx.stdio
    colour = os.isatty(stdio.stdout_fd) and not ctx.environ.get("NO_COLOR")
    printer = LogPrinter(names, stdio.stdout_fd, colour)
    ctx.stdout.flush()
    local.claim(names)
    watches = {} if command is not None or args.no_sync else local.watches(names)
    try:
        local.build(names, printer, args.no_build, args.no_cache)
        local.ensure_network()
        if command is not None:
            return start_command(ctx, local, names, command, printer)
        return start_services(local, names, printer, watches)
    finally:
        local.remove_all()


def start_services(local, names, printer, watches):
    """Run every service, following their output and syncing their contexts (``watches``,
    see LocalApp.watches), until they exit or are stopped."""
    streams = {}
    with SignalPipe([signal.SIGINT, signal.SIGTERM, signal.SIGHUP]) as pipe:
        try:
            for name in names:
                ident = local.create(name)
                streams[name] = local.engine.hijack("/containers/%s/attach" % ident, query={
                    "stream": 1, "stdout": 1, "stderr": 1})
            follower = Follower(local, streams, printer, pipe.fd)
            for name in names:
                try:
                    ready = local.await_dependencies(name, printer, follower.pause)
                except ConvoxError:
                    follower.finish(local.manifest.services[name].conditions)
                    raise
                if not ready:
                    local.stop_all(grace=0)  # the follower said "stopping"
                    return 0
                printer.say("starting %s" % name)
                local.engine.start(local.containers[name])
            targets = [SyncTarget(name, local.containers[name], *watches[name])
                       for name in names if name in watches]
            syncer = Syncer(local.engine, printer, targets) if targets else None
            outcome, status = follower.run(syncer)
            if outcome == "stopped":
                local.stop_all(grace=0)
            return status
        finally:
            for stream in streams.values():
                stream.close()


def start_command(ctx, local, names, command, printer):
    """`start SERVICE COMMAND`: dependencies in the background, COMMAND as a one-off."""
    service = names[-1]
    for name in names[:-1]:
        local.await_dependencies(name, printer)
        printer.say("starting %s" % name)
        local.engine.start(local.create(name))
    try:
        local.await_dependencies(service, printer)
        return run_one_off(ctx, local.template(service), command, app=local.app,
                           service=service)
    finally:
        local.stop_all()


# ==========================================================================================
# CLI
# ==========================================================================================

def _common_options(parser, suppress):
    """-a/--app and -r/--rack, accepted before the verb and among its options (SPEC §1)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("-a", "--app", default=default, help="app name (default: inferred)")
    parser.add_argument("-r", "--rack", default=default,
                        help="engine URL: unix:///path, /path, tcp://host:port or "
                        "ssh://[user@]host[:port][/socket]")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help layout, as wide as the terminal as shutil.get_terminal_size finds it:
    argparse itself imports shutil (and bz2, lzma, fnmatch with it) for every option added,
    a few ms of every start for the rare --help.  An option whose value is optional shows
    as Convox shows it, ``-e, --entrypoint[=BOOL]``: its value is only ever attached with
    '=' (argparse would show ``-e [BOOL]``)."""

    def __init__(self, prog, **kwargs):
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 0
        kwargs.setdefault("width", (columns or 80) - 2)
        super().__init__(prog, **kwargs)

    def _format_action_invocation(self, action):  # argparse's hook (stable since 2.7)
        if action.nargs != "?" or not action.option_strings:
            return super()._format_action_invocation(action)
        return "%s[=%s]" % (", ".join(action.option_strings), action.metavar)


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns the status."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError("%s — see %s --help" % (message, self.prog))


def build_parser():
    """The argparse tree of every verb."""
    parser = _Parser(prog="convox", description="Convox's one-off commands for any host "
                     "with a Docker Engine API socket.")
    parser.add_argument("--version", action="version", version="convox.py " + __version__)
    _common_options(parser, suppress=False)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    ps = verbs.add_parser(
        "ps", help="list the app's processes (ps info ID, ps stop ID)",
        usage="convox ps [options] [info ID | stop ID]",
        description="List the app's running processes; ps info ID shows one, ps stop ID "
        "stops one (and removes it if it is a one-off).")
    _common_options(ps, suppress=True)
    ps.add_argument("-s", "--service", metavar="SERVICE",
                    help="only this service (one-offs included)")
    ps.add_argument("--release", metavar="R", help="only this release")
    ps.add_argument("--all", action="store_true", help="stopped processes too")
    ps.add_argument("--format", choices=("table", "json"), default="table",
                    help="table (default) or json")
    ps.add_argument("words", nargs="*", metavar="info ID | stop ID",
                    help="info ID: show one process; stop ID: stop one")
    ps.set_defaults(handler=cmd_ps)

    exec_ = verbs.add_parser(
        "exec", help="run a command in a running process",
        usage="convox exec [options] TARGET COMMAND...",
        description="Run COMMAND in a running process: TARGET is a container ID, ID prefix "
        "or name, or a service of the app.")
    _common_options(exec_, suppress=True)
    _session_options(exec_, "-e", "--env")
    exec_.add_argument("-w", "--workdir", help="working directory inside the container")
    exec_.add_argument("-u", "--user", help="user (name or UID[:GID]) to run as")
    exec_.add_argument("--detach-keys", metavar="KEYS",
                       help="keys that detach from a TTY session (default ctrl-p,ctrl-q)")
    exec_.set_defaults(handler=cmd_exec)

    run = verbs.add_parser(
        "run", help="run a command in a new one-off process of a service",
        usage="convox run [options] SERVICE COMMAND...",
        description="Run COMMAND in a new process of SERVICE, with the service's image, "
        "environment, volumes and networks.")
    _common_options(run, suppress=True)
    _session_options(run, "--env")  # -e is Convox's --entrypoint here
    run.add_argument("-d", "--detach", action="store_true",
                     help="run in the background; output goes to the process's logs")
    run.add_argument("-t", "--timeout", type=int, metavar="SECONDS",
                     help="stop the process after this long (default 3600, 0 = never; "
                     "not with --detach)")
    run.add_argument("--release", metavar="R", help="use release R's image")
    # Convox's boolean: its value only ever attached (-e=false), so -e never eats a word.
    run.add_argument("-e", "--entrypoint", nargs="?", const=True, default=True,
                     type=_bool_word, metavar="BOOL",
                     help="keep the image's ENTRYPOINT (default); -e=false bypasses it")
    run.add_argument("--no-entrypoint", dest="entrypoint", action="store_false",
                     help="bypass the image's ENTRYPOINT (as --entrypoint=false)")
    for flag, metavar, text in (
            ("--cpu", "M", "CPU request in millicores (a relative weight)"),
            ("--cpu-limit", "M", "CPU limit in millicores"),
            ("--memory", "MB", "memory request in MB (reserved, not a limit)"),
            ("--memory-limit", "MB", "memory limit in MB")):
        run.add_argument(flag, type=_positive_int, metavar=metavar,
                         help=text + " (default: the service's)")
    run.add_argument("--node-labels", metavar="K=V,...",
                     help="run on Swarm nodes with these labels (Swarm racks only)")
    run.set_defaults(handler=cmd_run)

    logs = verbs.add_parser(
        "logs", help="print the app's logs, merged in time order, and follow them",
        usage="convox logs [options] [PID]",
        description="Print the logs of every process of the app (or of process PID), "
        "merged in the order of the engine's timestamps, and follow them.")
    _common_options(logs, suppress=True)
    logs.add_argument("pid", nargs="?", metavar="PID",
                      help="one process (ID, ID prefix or name): its whole output")
    logs.add_argument("-s", "--service", action="append", metavar="SERVICE",
                      help="only this service (repeatable)")
    logs.add_argument("--since", metavar="WHEN", help="from this time or this long ago "
                      "(90s, 1h30m, 2d, RFC 3339, 2026-12-02T10:00, UNIX seconds; "
                      "default 2m, with PID its start)")
    logs.add_argument("--until", metavar="WHEN", help="up to this time (forms as --since)")
    logs.add_argument("--tail", type=int, metavar="N", help="the last N lines of each process")
    follow = logs.add_mutually_exclusive_group()
    follow.add_argument("-f", "--follow", dest="follow", action="store_true", default=True,
                        help="keep printing new lines (the default)")
    follow.add_argument("--no-follow", dest="follow", action="store_false",
                        help="print what is there and exit")
    logs.add_argument("--filter", metavar="TEXT", help="only lines that contain TEXT")
    logs.add_argument("--format", choices=tuple(LOG_FORMATS), default="convox",
                      help="convox (default): TIME service/NAME/ID line; compose: NAME-ID | "
                      "line; json: one object per line")
    logs.add_argument("--no-color", action="store_true", help="no colours (compose format)")
    logs.set_defaults(handler=cmd_logs)

    start = verbs.add_parser(
        "start", help="run the app locally from convox.yml or docker-compose.yml",
        usage="convox start [options] [SERVICE...] | [SERVICE COMMAND...]",
        description="Build and run the app's services locally, syncing edited files into "
        "them; with SERVICE..., only those and what they depend on; with SERVICE COMMAND, "
        "run COMMAND in a new process of SERVICE.")
    _common_options(start, suppress=True)
    _session_options(start, "-e", "--env")
    start.add_argument("-m", "--manifest", metavar="FILE",
                       help="manifest (default: convox.yml, else docker-compose.yml)")
    start.add_argument("--no-build", action="store_true", help="use the last build")
    start.add_argument("--no-cache", action="store_true", help="build without cache")
    start.add_argument("--no-sync", action="store_true",
                       help="do not copy changed files into the running services")
    start.add_argument("--profile", action="append", metavar="P",
                       help="also start compose services of this profile (repeatable; "
                       "default: COMPOSE_PROFILES)")
    start.set_defaults(handler=cmd_start, detach=False, timeout=None)
    return parser


def _session_options(parser, *env_flags):
    """Options shared by the verbs that attach to a process."""
    parser.add_argument(*env_flags, dest="env", action="append", type=_env_word,
                        metavar="K[=V]", help="set K to V in the process's environment; "
                        "K alone passes the local value of K (repeatable)")
    tty = parser.add_mutually_exclusive_group()
    tty.add_argument("--tty", dest="tty", action="store_true", default=None,
                     help="force a TTY")
    tty.add_argument("--no-tty", dest="tty", action="store_false",
                     help="never use a TTY")


def _bool_word(text):
    """A boolean flag's value, as Go's strconv.ParseBool reads it (Convox's flags)."""
    if text in ("1", "t", "T", "true", "TRUE", "True"):
        return True
    if text in ("0", "f", "F", "false", "FALSE", "False"):
        return False
    raise argparse.ArgumentTypeError("takes true or false, attached with '=', not %r" % text)


def _positive_int(text):
    """A count above 0: 0 or less cannot be a resource anyone means."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError("takes a whole number above 0, not %r" % text)
    return value


def _env_word(text):
    """--env K=V or K (SPEC §5); an empty name is refused, as docker refuses it."""
    if not text.partition("=")[0]:
        raise argparse.ArgumentTypeError("takes K=V or K, not %r" % text)
    return text


#: Verbs whose first positional word names a target and the words after it are a command.
COMMAND_VERBS = ("exec", "run", "start")


def split_command_line(parser, words):
    """Split a verb's words into (option words, target or None, command words).

    Options may stand before or after the target; the first word after it that is not an
    option starts the command, whose own options are left alone (``exec ID ls -la``).
    ``--`` ends options.  Which options take a value is read from the verb's parser.
    """
    takes_value = {}
    for action in parser._actions:  # argparse's own table of options (stable since 2.7)
        for option in action.option_strings:
            takes_value[option] = action.nargs not in (0, "?")  # "?": only with "="
    options, target = [], None
    index = 0
    while index < len(words):
        word = words[index]
        if word == "--":
            rest = words[index + 1:]
            if target is None and rest:
                target, rest = rest[0], rest[1:]
            return options, target, rest
        if word.startswith("-") and word != "-":
            options.append(word)
            name = word.split("=", 1)[0]
            if "=" not in word and takes_value.get(name) and index + 1 < len(words):
                options.append(words[index + 1])
                index += 1
            index += 1
            continue
        if target is not None:
            return options, target, words[index:]
        target = word
        index += 1
    return options, target, []


def parse_command_line(parser, argv):
    """argparse, plus SPEC §5's word rules for the verbs that take a command."""
    index = 0
    top_values = ("-a", "--app", "-r", "--rack")
    while index < len(argv) and argv[index].startswith("-"):
        index += 2 if argv[index] in top_values else 1
    if index >= len(argv) or argv[index] not in COMMAND_VERBS:
        args = parser.parse_args(argv)
        return args
    verb = argv[index]
    verb_parser = parser._subparsers._group_actions[0].choices[verb]
    options, target, command = split_command_line(verb_parser, argv[index + 1:])
    args = parser.parse_args(argv[:index + 1] + options)
    args.target, args.command = target, command
    return args


def main(argv=None, environ=None, stdio=None):
    """Run the CLI; return the exit status (only the __main__ guard exits).

    ``stdio`` (a Stdio) gives sessions other fds than 0, 1 and 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    if argv[:1] == ["--watchdog"] and len(argv) == 4:  # run's watchdog, not a person
        try:
            watchdog(*argv[1:], environ=environ)
        except BaseException:
            pass  # nobody to tell: its output is /dev/null
        return 0
    verb = args = None
    ctx = None
    try:
        if _SIGINT_DEFERRED and signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # see the imports
        parser = build_parser()
        args = parse_command_line(parser, argv)
        verb = args.verb
        if verb is None:
            parser.print_help()
            return 2
        ctx = Context(args, environ, stdio=stdio)
        with TerminationAsInterrupt():
            return args.handler(ctx)
    except SystemExit as exc:  # argparse's --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        return _report(environ, "interrupted", 128 + signum)
    except ConvoxError as exc:
        status = exc.status
        if status is None:
            status = STATUS_FAILED if _attached(verb, args) else 1
        return _report(environ, str(exc), status)
    except BrokenPipeError:
        return 141  # our stdout went away (| head): end quietly, as a shell pipeline does
    except Exception as exc:  # a bug: still one line, the traceback only when asked
        return _report(environ, "%s: %s — set CONVOX_DEBUG=1 for details and report it" %
                       (type(exc).__name__, exc), STATUS_FAILED if _attached(verb, args)
                       else 1)
    finally:
        if ctx is not None:
            ctx.close()


def _attached(verb, args):
    """True for the verbs whose failures are 125 (run, exec, start SERVICE COMMAND)."""
    return verb in ("exec", "run") or (verb == "start" and bool(getattr(args, "command", None)))


def _report(environ, message, status):
    if environ.get("CONVOX_DEBUG"):
        import traceback  # its lines carry the message's foreign text too: escaped
        try:
            sys.stderr.write("".join(printable(line) + "\n"
                                     for line in traceback.format_exc().splitlines()))
        except (OSError, ValueError):
            pass
    notice(sys.stderr, "ERROR", message)
    return status


def notice(stream, kind, message):
    """Write ``KIND: message``: the one way ERROR: and WARNING: lines are printed.

    Messages carry foreign text -- labels of any container on the host (``apps here: …``),
    the engine's error text, manifest keys -- so they go through one_line: an escape
    sequence in them would set the title, write the clipboard (OSC 52) or hide text.
    """
    try:
        stream.write("%s: %s\n" % (kind, one_line(message)))
        stream.flush()
    except (OSError, ValueError):
        pass


def exit_now(status):
    """Exit with ``status`` once stdout and stderr are flushed, without the interpreter's
    teardown (freeing every module and object: ~6 ms, a tenth of a ``ps``).  Nothing is
    left for it: threads are daemons, and main() has closed what it opened.  A flush that
    fails is left to Python to report, as at any exit."""
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:  # None: the fd was closed when Python started
                stream.flush()
    except (OSError, ValueError):
        sys.exit(status)
    os._exit(status)


def _zipapp_main():
    """Entry point of the zipapp (python3 -m zipapp DIR -m convox:_zipapp_main)."""
    exit_now(main())


if __name__ == "__main__":
    exit_now(main())
