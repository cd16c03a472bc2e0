#!/usr/bin/env python3
"""convox.py -- Convox's one-off commands for any host with a Docker Engine API socket.

    convox ps                       list the app's processes
    convox exec TARGET COMMAND...   run a command in a running process
    convox run SERVICE COMMAND...   run a command in a new one-off process of a service
    convox start [SERVICE [COMMAND...]]
                                    run the app locally from convox.yml or docker-compose.yml

One file, standard library only, CPython 3.6+.  It speaks the Docker Engine API itself
(``http.client`` over the engine's UNIX socket, or TCP/TLS), so it works where there is a
socket but no Docker CLI.

Lifecycle of an attached session (``exec``; ``run`` differs only where noted)::

    POST /containers/ID/exec ........ create the exec (run: POST /containers/create,
         |                             then attach and POST .../wait before start)
    POST /exec/EID/start ............ Connection: Upgrade, Upgrade: tcp
         |  101 Switching Protocols    -- the socket is now a raw byte stream
         v
    pump <-----------------------+    stdin -> socket; socket -> stdout/stderr
     |  SIGWINCH (self-pipe) ----+--> POST /exec/EID/resize on the control connection
     |  detach keys ------------------> leave it running, status 0
     |  stdin EOF -------------------> shutdown(SHUT_WR): the process sees EOF
     v
    socket EOF
    GET /exec/EID/json .............. ExitCode (polled briefly while still null)

Without a TTY the stream carries 8-byte frame headers ([stream, 0, 0, 0, size32]) that
``Demuxer`` splits back into stdout and stderr; with a TTY it is raw terminal bytes.
"""

import argparse
import errno
import http.client
import json
import os
import select
import signal
import socket
import sys
import time

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

#: The newest Engine API version this tool knows; the engine's own is used when lower.
API_VERSION_MAX = "1.45"

#: Where the engine is looked for when no rack is named (SPEC §2), in order.
DEFAULT_SOCKETS = (
    "/var/run/docker.sock",
    "${XDG_RUNTIME_DIR}/podman/podman.sock",
    "/run/podman/podman.sock",
)

#: Seconds a control request (anything but a stream, a build or a wait) may take.
CONTROL_TIMEOUT = 60.0

#: Bytes read from a socket or a local fd at once, and the most held for a slow peer.
CHUNK = 64 * 1024
BUFFER_LIMIT = 1024 * 1024

#: Docker's default detach sequence: ctrl-p, ctrl-q.
DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"

#: Exit statuses of run and exec (SPEC §6).
STATUS_TIMEOUT = 124
STATUS_FAILED = 125
STATUS_NOT_EXECUTABLE = 126
STATUS_NOT_FOUND = 127

DEFAULT_RUN_TIMEOUT = 3600
STOP_GRACE = 10


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


class ExitStatus(Exception):
    """Not an error: unwinds to ``main()`` with the remote process's exit status."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


# ==========================================================================================
# Transport
# ==========================================================================================

class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a UNIX socket: only ``connect()`` differs from the base class."""

    def __init__(self, path, timeout=None):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class Rack:
    """Where the engine is: ``kind`` is ``unix``, ``tcp`` or ``tls``; ``address`` a path
    or a ``(host, port)`` pair; ``url`` is what the user wrote, for messages."""

    def __init__(self, kind, address, url, cert_path=None):
        self.kind = kind
        self.address = address
        self.url = url
        self.cert_path = cert_path

    def __repr__(self):
        return "Rack(%r, %r)" % (self.kind, self.address)

    def connection(self, timeout):
        """A new, not yet connected, ``http.client`` connection to the engine."""
        if self.kind == "unix":
            return UnixHTTPConnection(self.address, timeout=timeout)
        host, port = self.address
        if self.kind == "tcp":
            return http.client.HTTPConnection(host, port, timeout=timeout)
        return http.client.HTTPSConnection(host, port, timeout=timeout,
                                           context=self.tls_context())

    def tls_context(self):
        """Client TLS as the Docker CLI does it: ca.pem, cert.pem, key.pem in DOCKER_CERT_PATH."""
        import ssl  # only TLS racks pay for it
        folder = self.cert_path or os.path.expanduser("~/.docker")
        try:
            context = ssl.create_default_context(cafile=os.path.join(folder, "ca.pem"))
            context.load_cert_chain(os.path.join(folder, "cert.pem"),
                                    os.path.join(folder, "key.pem"))
        except (OSError, ssl.SSLError) as exc:
            raise EngineUnavailable(
                "cannot load the TLS certificates in %s (%s) — set DOCKER_CERT_PATH to the "
                "folder with ca.pem, cert.pem and key.pem" % (folder, exc))
        return context


def parse_rack(url, environ=None):
    """Parse a rack URL: ``unix:///path``, ``/path``, ``tcp://host:port``."""
    environ = os.environ if environ is None else environ
    malformed = UsageError(
        "malformed rack URL %r — use unix:///path/to/docker.sock or tcp://host:port" % url)
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
        tls = scheme == "https" or environ.get("DOCKER_TLS_VERIFY", "") not in ("", "0")
        if not _:
            host, port = port, "2376" if tls else "2375"
        if not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise malformed
        return Rack("tls" if tls else "tcp", (host, int(port)), url,
                    cert_path=environ.get("DOCKER_CERT_PATH"))
    if scheme == "ssh":
        raise UsageError("ssh:// racks are not supported yet — use a unix:// or tcp:// rack")
    raise malformed


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
    if not server_version:
        return "1.24"  # the engine predates the header; 1.24 is Docker 1.12's API
    return min(server_version, API_VERSION_MAX, key=_version_tuple)


def _error_message(body, status, reason):
    """The engine's message: JSON ``message`` when there is one, else the plain text."""
    text = body.decode("utf-8", "replace").strip()
    try:
        message = json.loads(text).get("message")
    except (ValueError, AttributeError):
        message = None
    return message or text or "%d %s" % (status, reason)


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
        self.connections = 0
        self._conn = None

    # -- plumbing --------------------------------------------------------------------------

    def connect(self, timeout=CONTROL_TIMEOUT):
        """A new connected HTTP connection; connection failures become EngineUnavailable."""
        conn = self.rack.connection(timeout)
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise unreachable(self.rack, exc)
        self.connections += 1
        return conn

    def close(self):
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def api_version(self):
        """Negotiate once per Engine: GET /_ping, header API-Version (SPEC §2)."""
        if self.version is None:
            response = self._roundtrip("GET", "/_ping", None, {}, CONTROL_TIMEOUT)
            self.version = negotiate_version(response[1].get("API-Version"))
        return self.version

    def url(self, path, query=None):
        """The versioned URL of an API path, with a query string from a dict."""
        from urllib.parse import urlencode
        url = "/v%s%s" % (self.api_version(), path)
        if query:
            pairs = [(k, v) for k, v in query.items() if v is not None]
            pairs = [(k, json.dumps(v) if isinstance(v, dict) else
                      (str(v).lower() if isinstance(v, bool) else v)) for k, v in pairs]
            url += "?" + urlencode(pairs)
        return url

    def _roundtrip(self, method, url, body, headers, timeout):
        """One request on the keep-alive connection -> (status, headers, body bytes)."""
        for attempt in (1, 2):
            fresh = self._conn is None
            if fresh:
                self._conn = self.connect(timeout)
            conn = self._conn
            conn.sock.settimeout(timeout)
            try:
                conn.request(method, url, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                # An idle keep-alive connection the engine closed: the request never reached
                # it, so one retry on a new connection is safe.
                self.close()
                if fresh or attempt == 2:
                    raise StreamError("the engine closed the connection (%s) — check that "
                                      "it is healthy and try again" % exc)
                continue
            except socket.timeout:
                self.close()
                raise EngineUnavailable(
                    "the engine at %s did not answer %s %s within %d s — check that it is "
                    "healthy" % (self.rack.url, method, url.split("?")[0], timeout))
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise unreachable(self.rack, exc)
            if response.will_close:
                self.close()
            return response.status, response.headers, data

    def request(self, method, path, query=None, body=None, timeout=CONTROL_TIMEOUT):
        """Send a control request; return its decoded JSON (or None); raise on HTTP errors."""
        headers = {}
        if body is not None:
            body = json.dumps(body).encode("utf-8")
            headers["Content-Type"] = "application/json"
        status, response_headers, data = self._roundtrip(
            method, self.url(path, query), body, headers, timeout)
        if status >= 400:
            message = _error_message(data, status, "")
            error = NotFound if status == 404 else EngineError
            raise error(message, status)
        if not data:
            return None
        if "json" not in (response_headers.get("Content-Type") or "json"):
            return data.decode("utf-8", "replace")
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError:
            raise EngineError("the engine sent a response that is not JSON for %s %s" %
                              (method, path))

    def hijack(self, path, body=None, query=None):
        """POST with ``Upgrade: tcp`` and take over the socket once the engine answers 101.

        ``http.client`` would read ahead into its buffer, so the response head is read here
        byte-exactly from the socket and whatever follows it is handed back as ``early``.
        """
        conn = self.connect()
        payload = json.dumps(body if body is not None else {}).encode("utf-8")
        conn.putrequest("POST", self.url(path, query), skip_accept_encoding=True)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Connection", "Upgrade")
        conn.putheader("Upgrade", "tcp")
        conn.putheader("Content-Length", str(len(payload)))
        sock = conn.sock
        try:
            conn.endheaders(payload)
            head, rest = _read_head(sock)
        except socket.timeout:
            sock.close()
            raise EngineUnavailable("the engine did not answer the stream request for %s "
                                    "within %d s — check that it is healthy"
                                    % (path, CONTROL_TIMEOUT))
        except OSError as exc:
            sock.close()
            raise StreamError("the engine closed the stream before it started (%s) — try "
                              "again" % (exc.strerror or exc))
        conn.sock = None  # the socket is ours now; conn.close() must not close it
        status, reason, headers = _parse_head(head)
        content_type = headers.get("Content-Type", "")
        if status >= 400:
            data = _read_body(sock, rest, headers)
            sock.close()
            error = NotFound if status == 404 else EngineError
            raise error(_error_message(data, status, reason), status)
        if status != 101 and not (status == 200 and "vnd.docker" in content_type):
            sock.close()
            raise StreamError("the engine answered %d %s instead of switching protocols — "
                              "is the rack a Docker Engine API?" % (status, reason))
        sock.settimeout(None)  # a timeout on a quiet stream would look like its end
        return Hijacked(sock, rest, content_type)

    def send_only(self, method, path, query=None):
        """Send a request on its own connection and return it unread (for long waits)."""
        conn = self.connect()
        conn.request(method, self.url(path, query), body=b"")
        return conn

    # -- containers ------------------------------------------------------------------------

    def ping(self):
        return self.api_version()

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
        try:
            return self.request("POST", "/containers/%s/stop" % ident, {"t": grace},
                                timeout=grace + CONTROL_TIMEOUT)
        except EngineError as exc:
            if exc.code != 304:
                raise

    def kill(self, ident, signal_name="KILL"):
        return self.request("POST", "/containers/%s/kill" % ident, {"signal": signal_name})

    def remove(self, ident, force=True, missing_ok=True):
        """Remove a container; a missing one (or one already being removed) is fine."""
        try:
            return self.request("DELETE", "/containers/%s" % ident,
                                {"force": "1" if force else "0", "v": "0"})
        except EngineError as exc:
            if not (missing_ok and (exc.code == 404 or
                                    (exc.code == 409 and "in progress" in str(exc)))):
                raise

    def resize(self, kind, ident, rows, cols):
        return self.request("POST", "/%s/%s/resize" % (kind, ident), {"h": rows, "w": cols})

    def connect_network(self, network, ident, aliases=None):
        body = {"Container": ident, "EndpointConfig": {"Aliases": aliases or None}}
        return self.request("POST", "/networks/%s/connect" % network, body=body)

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
                raise EngineError(_error_message(response.read(), response.status,
                                                 response.reason), response.status)
            decoder = json.JSONDecoder()
            buffered = ""
            for line in response:
                buffered += line.decode("utf-8", "replace")
                while buffered.strip():
                    try:
                        message, end = decoder.raw_decode(buffered.lstrip())
                    except ValueError:
                        break  # a message split across lines: read on
                    buffered = buffered.lstrip()[end:]
                    if message.get("error"):
                        raise EngineError(message.get("error").strip())
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


def _read_head(sock):
    """Read an HTTP response head from a socket; return (head bytes, the bytes after it)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(CHUNK)
        if not chunk:
            raise ConnectionResetError(errno.ECONNRESET, "connection closed")
        data += chunk
        if len(data) > 1024 * 1024:
            raise ConnectionResetError(errno.EPROTO, "response head too long")
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


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
    """The rest of a (small) error body after a response head."""
    length = headers.get("Content-Length")
    data = rest
    sock.settimeout(5)
    try:
        while length is None or len(data) < int(length):
            chunk = sock.recv(CHUNK)
            if not chunk:
                break
            data += chunk
    except (OSError, ValueError):
        pass
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
# Streams
# ==========================================================================================

class Demuxer:
    """Split Docker's multiplexed stream ([stream, 0, 0, 0, size32] + payload) incrementally.

    ``feed(data)`` returns ``[(fd_index, bytes), ...]`` with 1 = stdout, 2 = stderr; frames
    may be split anywhere across calls.  Stream 0 (stdin echo) goes to stdout as in Docker's
    stdcopy; stream 3 carries an engine error; anything else is a protocol error.
    """

    def __init__(self):
        self._pending = bytearray()
        self._stream = None
        self._left = 0

    def feed(self, data):
        out = []
        view = memoryview(data)
        while len(view):
            if self._left:
                piece = view[:self._left]
                self._left -= len(piece)
                view = view[len(piece):]
                if self._stream == 3:
                    self._pending += piece
                    if not self._left:
                        raise StreamError("the engine reported: %s" % bytes(
                            self._pending).decode("utf-8", "replace").strip())
                else:
                    out.append((self._stream, bytes(piece)))
                continue
            need = 8 - len(self._pending)
            self._pending += view[:need]
            view = view[need:]
            if len(self._pending) < 8:
                break
            header = bytes(self._pending)
            self._pending = bytearray()
            stream = header[0]
            if stream not in (0, 1, 2, 3) or header[1:4] != b"\0\0\0":
                raise StreamError("the engine sent a malformed stream frame header %r — the "
                                  "output is incomplete" % header)
            self._stream = 1 if stream == 0 else stream
            self._left = int.from_bytes(header[4:8], "big")
        return out

    def partial(self):
        """True when the stream stopped inside a frame."""
        return bool(self._pending) or self._left > 0


def parse_detach_keys(spec):
    """Docker's --detach-keys format ("ctrl-p,ctrl-q", "ctrl-@", "a") -> bytes."""
    keys = bytearray()
    for part in spec.split(","):
        part = part.strip()
        if len(part) == 1:
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
    """Tell the engine there is no more input (Docker's CloseWrite)."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


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
    to_engine = bytearray()
    stdin_open = stdin_fd is not None
    outputs = {1: stdout_fd, 2: stderr_fd}

    def deliver(data):
        if len(stream.first_output) < 512:
            stream.first_output += data[:512]
        if demux is None:
            _write_all(stdout_fd, data)
            return
        for index, payload in demux.feed(data):
            _write_all(outputs[index], payload)

    try:
        if stream.early:
            deliver(stream.early)
        if not stdin_open:
            _half_close(sock)
        while True:
            readable = [sock]
            if stdin_open and len(to_engine) < BUFFER_LIMIT:
                readable.append(stdin_fd)
            if signal_fd is not None:
                readable.append(signal_fd)
            timeout = None
            if deadline is not None:
                timeout = max(0.0, deadline - time.monotonic())
            ready, writable, _ = select.select(readable, [sock] if to_engine else [], [],
                                               timeout)
            if not ready and not writable:
                return "timeout"
            if signal_fd is not None and signal_fd in ready:
                for signum in _drain_signals(signal_fd):
                    outcome = on_signal(signum) if on_signal else None
                    if outcome:
                        return outcome
            if writable:
                try:
                    sent = sock.send(to_engine)
                except (BlockingIOError, InterruptedError):
                    sent = 0
                except OSError:
                    # The engine stopped taking input (process gone); output may remain.
                    sent, stdin_open = len(to_engine), False
                del to_engine[:sent]
                if not to_engine and not stdin_open:
                    _half_close(sock)
            if stdin_open and stdin_fd in ready:
                try:
                    data = os.read(stdin_fd, CHUNK)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    data = b""
                if data == b"":
                    stdin_open = False
                    if not to_engine:
                        _half_close(sock)
                elif data:
                    if matcher is not None:
                        data, detached = matcher.feed(data)
                        to_engine += data
                        if detached:
                            return "detached"
                    else:
                        to_engine += data
            if sock in ready:
                try:
                    data = sock.recv(CHUNK)
                except (BlockingIOError, InterruptedError):
                    continue
                except (ConnectionResetError, ConnectionAbortedError):
                    data = b""
                except OSError as exc:
                    raise StreamError("the stream from the engine broke (%s)" %
                                      (exc.strerror or exc))
                if not data:
                    if demux is not None and demux.partial():
                        raise StreamError("the stream from the engine ended inside a frame — "
                                          "the output is incomplete")
                    return "eof"
                deliver(data)
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
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self
        self.fd, self._write_fd = os.pipe()
        for fd in (self.fd, self._write_fd):
            os.set_blocking(fd, False)
        self._saved_wakeup = signal.set_wakeup_fd(self._write_fd)
        for signum in self.signums:
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


def _note_signal(signum, frame):
    """Handler for signals that SignalPipe delivers through its pipe: nothing to do here."""


# ==========================================================================================
# Apps and processes
# ==========================================================================================

def identity(labels):
    """(app, service, release, type) of a container from its Convox or Compose labels."""
    labels = labels or {}
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


def resolve_app(option=None, environ=None, cwd=None):
    """-> (app, inferred): -a, CONVOX_APP, .convox/app, then the current folder's name."""
    environ = os.environ if environ is None else environ
    if option:
        return option, False
    if environ.get("CONVOX_APP"):
        return environ["CONVOX_APP"], False
    cwd = cwd or os.getcwd()
    try:
        with open(os.path.join(cwd, ".convox", "app")) as handle:
            name = handle.read().strip()
        if name:
            return name, False
    except OSError:
        pass
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
        if self.command == [""]:
            self.command = []
        self.image = config.get("Image") or info.get("Image") or ""
        self.created = info.get("Created") or ""

    def as_json(self):
        return {
            "id": self.id, "name": self.service, "app": self.app,
            "release": self.release or None, "size": self.size, "started": self.started,
            "status": self.status, "exit_code": self.exit_code, "command": self.command,
            "type": self.type,
        }


class Apps:
    """The engine's containers grouped by app; a list of all containers, read once."""

    def __init__(self, engine):
        self.engine = engine
        self.summaries = engine.containers(all=True)

    def names(self):
        return sorted({identity(c.get("Labels"))[0] for c in self.summaries} - {""})

    def summaries_of(self, app, service=None, running_only=False):
        found = []
        for summary in self.summaries:
            c_app, c_service, _, _ = identity(summary.get("Labels"))
            if c_app != app or (service is not None and c_service != service):
                continue
            if running_only and summary.get("State") != "running":
                continue
            found.append(summary)
        return found

    def services(self, app):
        return sorted({identity(c.get("Labels"))[1] for c in self.summaries_of(app)} - {""})

    def require_app(self, app, inferred):
        """Raise a helpful error when nothing carries this app's name."""
        if self.summaries_of(app):
            return
        names = self.names()
        where = " (from the current directory)" if inferred else ""
        here = ("apps here: %s" % ", ".join(names)) if names else "no apps here"
        raise ConvoxError('no processes for app "%s"%s; %s — use -a APP' % (app, where, here))

    def processes(self, app, service=None, running_only=False):
        """Inspect each matching container (over the one keep-alive connection)."""
        result = []
        for summary in self.summaries_of(app, service, running_only):
            try:
                result.append(Process(self.engine.inspect(summary["Id"])))
            except NotFound:
                continue  # removed between the list and the inspect
        return result


def find_process(engine, app, ident):
    """A container by ID, ID prefix or name, checked to be a process of ``app``."""
    try:
        process = Process(engine.inspect(ident))
    except NotFound:
        raise ConvoxError("no such process: %s (app %s) — see convox ps" % (ident, app))
    if process.app != app:
        owner = ('it belongs to app "%s"' % process.app) if process.app else \
            "it belongs to no app"
        raise ConvoxError("process %s is not part of app %s (%s) — use -a APP" %
                          (ident, app, owner))
    return process


def newest(summaries):
    """The newest container summary (by creation time), or None."""
    return max(summaries, key=lambda s: (s.get("Created") or 0, s["Id"]), default=None)


def service_template(engine, apps, app, service):
    """Inspect of the container a one-off of ``service`` copies: the newest running one of
    the service, else its newest of any state (services before earlier one-offs)."""
    candidates = apps.summaries_of(app, service)
    if not candidates:
        return None
    services = [s for s in candidates if identity(s.get("Labels"))[3] == "service"]
    pool = services or candidates
    running = [s for s in pool if s.get("State") == "running"]
    return engine.inspect(newest(running or pool)["Id"])


def release_image(engine, apps, app, service, release):
    """The image of release R of a service: from any container of it, or a labelled image."""
    for summary in apps.summaries_of(app, service):
        if identity(summary.get("Labels"))[2] == release:
            return summary["ImageID"] if summary.get("ImageID") else summary["Image"]
    labels = ["%s=%s" % (LABEL_APP, app), "%s=%s" % (LABEL_SERVICE, service),
              "%s=%s" % (LABEL_RELEASE, release)]
    images = engine.request("GET", "/images/json", {"filters": {"label": labels}}) or []
    if images:
        return max(images, key=lambda i: i.get("Created") or 0)["Id"]
    known = sorted({identity(s.get("Labels"))[2] for s in apps.summaries_of(app, service)}
                   - {""})
    raise ConvoxError("no such release: %s (app %s, service %s)%s — see convox ps --all" %
                      (release, app, service,
                       "; releases: " + ", ".join(known) if known else ""))


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


def one_off_config(template, command, *, app, service, image=None, env=(), memory=None,
                   entrypoint=True, tty=False, stdin=False, detach=False, console=None):
    """The create body of a one-off process of a service (SPEC §6), and the extra networks
    to connect before start: ``(config, [(network, aliases), ...])``.

    It copies the service's image, environment, working directory, user, mounts, networks
    with aliases, DNS, extra hosts and memory limit; not its ports, name or restart policy.
    """
    config = template.get("Config") or {}
    host = template.get("HostConfig") or {}
    release = identity(config.get("Labels"))[2]
    body = {
        "Image": image or template.get("Image") or config.get("Image"),
        "Cmd": command,
        "Env": list(config.get("Env") or []) + list(env),
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
    memory_bytes = memory * 1024 * 1024 if memory else host.get("Memory") or 0
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
        "Memory": memory_bytes,
        # An init process as PID 1 passes signals on and reaps: a one-off's command then
        # dies of SIGINT/SIGTERM as it would in a shell (PID 1 ignores them otherwise).
        "Init": True,
        "AutoRemove": not detach,
    }
    if memory_bytes and host.get("MemorySwap") and not memory:
        host_config["MemorySwap"] = host["MemorySwap"]
    if console:
        host_config["ConsoleSize"] = list(console)
    body["HostConfig"] = host_config
    networks = []
    mode = host_config["NetworkMode"]
    if not mode.startswith("container:") and mode not in ("host", "none"):
        short_id = template.get("Id", "")[:12]
        for name, endpoint in sorted(((template.get("NetworkSettings") or {})
                                      .get("Networks") or {}).items(),
                                     key=lambda item: item[0] != mode):
            aliases = [a for a in (endpoint or {}).get("Aliases") or [] if a != short_id]
            networks.append((name, aliases))
    if networks:
        first, aliases = networks[0]
        body["NetworkingConfig"] = {"EndpointsConfig": {first: {"Aliases": aliases or None}}}
        if mode in ("default", "bridge") and first != "bridge":
            host_config["NetworkMode"] = first
    return body, networks[1:]


def find_target(engine, apps, app, target):
    """exec's TARGET: a running process of service TARGET of the app, else a container by
    ID, ID prefix or name."""
    running = apps.summaries_of(app, target, running_only=True)
    if running:
        return newest(running)["Id"]
    try:
        info = engine.inspect(target)
    except NotFound:
        services = apps.services(app)
        raise ConvoxError("no such process or service: %s (app %s)%s — see convox ps" %
                          (target, app, "; services: " + ", ".join(services)
                           if services else ""))
    if not (info.get("State") or {}).get("Running"):
        raise ConvoxError("process %s is not running (%s) — see convox ps --all" %
                          (target, status_text(info.get("State") or {})))
    return info["Id"]


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


def parse_timestamp(text):
    """RFC 3339 (with nanoseconds, as the engine writes) -> POSIX seconds, or None."""
    import calendar
    if not text or text.startswith("0001-"):
        return None
    main_part, _, rest = text.partition(".")
    fraction, offset = 0.0, 0
    zone = rest if rest else main_part[19:]
    main_part = main_part[:19]
    digits = ""
    for index, char in enumerate(zone):
        if char.isdigit():
            digits += char
            continue
        if char in "+-":
            sign = 1 if char == "+" else -1
            hours, _, minutes = zone[index + 1:].partition(":")
            offset = sign * (int(hours or 0) * 3600 + int(minutes or 0) * 60)
        break
    if digits:
        fraction = float("0." + digits)
    try:
        parsed = time.strptime(main_part, "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        return None
    return calendar.timegm(parsed) + fraction - offset


def format_table(headers, rows):
    """Left-aligned columns two spaces apart, the last one unpadded (Convox's tables)."""
    rows = [list(map(str, row)) for row in rows]
    widths = [max([len(headers[i])] + [len(row[i]) for row in rows])
              for i in range(len(headers))]
    lines = []
    for row in [list(headers)] + rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def shell_join(words):
    import shlex
    return " ".join(shlex.quote(word) for word in words)


# ==========================================================================================
# Commands
# ==========================================================================================

class Context:
    """What every verb needs: the engine, the app and the standard streams."""

    def __init__(self, args, environ=None, stdin=None, stdout=None, stderr=None):
        self.args = args
        self.environ = os.environ if environ is None else environ
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.stdio = Stdio()
        self._engine = None

    @property
    def engine(self):
        if self._engine is None:
            self._engine = Engine(resolve_rack(getattr(self.args, "rack", None), self.environ),
                                  self.environ)
        return self._engine

    def app(self):
        return resolve_app(getattr(self.args, "app", None), self.environ)

    def out(self, text):
        self.stdout.write(text)
        self.stdout.flush()

    def close(self):
        if self._engine is not None:
            self._engine.close()


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
    apps = Apps(ctx.engine)
    apps.require_app(app, inferred)
    # -s lists every process of the service, one-offs and stopped ones included.
    processes = apps.processes(app, args.service, running_only=not (args.all or args.service))
    if args.release:
        processes = [p for p in processes if p.release == args.release]
    processes.sort(key=lambda p: (p.service, p.id))
    if args.format == "json":
        ctx.out(json.dumps([p.as_json() for p in processes], indent=2) + "\n")
        return 0
    now = time.time()
    headers = ["ID", "NAME"] + (["STATUS"] if args.all else []) + \
        ["RELEASE", "SIZE", "STARTED", "COMMAND"]
    rows = []
    for p in processes:
        started = parse_timestamp(p.started)
        row = [p.id[:12], p.service or "-"] + ([p.status] if args.all else [])
        row += [p.release or "-", "-" if p.size is None else p.size,
                "-" if started is None else humanize_since(now - started),
                shell_join(p.command)]
        rows.append(row)
    ctx.out(format_table(headers, rows))
    return 0


def ps_info(ctx, ident):
    app, _ = ctx.app()
    p = find_process(ctx.engine, app, ident)
    started = parse_timestamp(p.started)
    fields = [
        ("Id", p.id), ("App", p.app), ("Name", p.service), ("Release", p.release or "-"),
        ("Size", "-" if p.size is None else p.size), ("Status", p.status),
        ("Started", "-" if started is None else humanize_since(time.time() - started)),
        ("Command", shell_join(p.command)), ("Image", p.image),
    ]
    width = max(len(key) for key, _ in fields)
    ctx.out("".join("%s  %s\n" % (key.ljust(width), value) for key, value in fields))
    return 0


def ps_stop(ctx, ident):
    app, _ = ctx.app()
    p = find_process(ctx.engine, app, ident)
    ctx.out("Stopping %s... " % ident)
    ctx.engine.stop(p.id)
    if p.type == "process":
        ctx.engine.remove(p.id)
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
            deadline=None):
    """Run an attached session: raw terminal, resizes, signals, then the pump.

    ``resize(rows, cols)`` is called at start and on every SIGWINCH (from the loop, never
    from a handler).  ``forward(signum)`` passes SIGINT/SIGTERM/SIGHUP to the process (run);
    without it such a signal ends the session as ``("signal", signum)`` (exec).
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
        pipe = stack.enter_context(SignalPipe(signums))
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
    if code in (126, 127, None) and first_output:
        text = first_output.lower()
        if b"executable file not found" in text or b"no such file or directory" in text:
            return STATUS_NOT_FOUND
        if b"permission denied" in text:
            return STATUS_NOT_EXECUTABLE
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
    detach_keys = parse_detach_keys(keys_text)
    engine = ctx.engine
    app, _ = ctx.app()
    container = find_target(engine, Apps(engine), app, args.target)
    stdio = ctx.stdio
    tty = stdio.wants_tty(args.tty)
    config = {
        "AttachStdin": stdio.stdin_fd is not None, "AttachStdout": True,
        "AttachStderr": True, "Tty": tty, "Cmd": command, "Env": args.env or None,
        "WorkingDir": args.workdir or "", "User": args.user or "",
        "DetachKeys": keys_text,
    }
    exec_id = engine.exec_create(container, config)["Id"]
    stream = engine.hijack("/exec/%s/start" % exec_id, {"Detach": False, "Tty": tty})
    try:
        outcome = session(stream, stdio, tty=tty, detach_keys=detach_keys,
                          resize=lambda rows, cols: engine.resize("exec", exec_id, rows, cols))
    finally:
        stream.close()
    if outcome == "detached":
        return 0
    if outcome == "broken-pipe":
        return 141
    if isinstance(outcome, tuple):
        return 128 + outcome[1]
    return exit_status(exec_exit_code(engine, exec_id), stream.first_output)


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
    if args.timeout is not None and args.timeout < 0:
        raise UsageError("--timeout must be 0 (none) or a number of seconds")
    entrypoint = not args.no_entrypoint
    if args.entrypoint is not None:
        if args.entrypoint.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise UsageError("--entrypoint takes true or false — use --no-entrypoint to "
                             "bypass the image's ENTRYPOINT")
        entrypoint = entrypoint and args.entrypoint.lower() in ("true", "1", "yes")
    engine = ctx.engine
    app, inferred = ctx.app()
    service = args.target
    apps = Apps(engine)
    template = service_template(engine, apps, app, service)
    if template is None:
        apps.require_app(app, inferred)
        raise ConvoxError("no such service: %s (app %s); services: %s" %
                          (service, app, ", ".join(apps.services(app)) or "none"))
    image = release_image(engine, apps, app, service, args.release) if args.release else None
    return run_one_off(ctx, template, command, app=app, service=service, image=image,
                       entrypoint=entrypoint)


def run_one_off(ctx, template, command, *, app, service, image=None, entrypoint=True):
    """Create, attach, start and follow a one-off process; return its exit status.

    Attached, the container is removed when it ends whatever happens (AutoRemove, and a
    removal by name on every way out: the name is known before create returns, so even
    Ctrl-C during create leaves nothing).  ``--timeout`` is enforced twice: by this client,
    and by a watchdog process that outlives it (SIGKILL, a lost terminal).
    """
    args = ctx.args
    engine = ctx.engine
    stdio = ctx.stdio
    detach = bool(args.detach)
    tty = False if detach else stdio.wants_tty(args.tty)
    terminal = stdio.terminal_fd() if tty else None
    console = terminal_size(terminal) if terminal is not None else None
    attach_stdin = not detach and stdio.stdin_fd is not None
    config, extra_networks = one_off_config(
        template, command, app=app, service=service, image=image, env=args.env or (),
        memory=args.memory, entrypoint=entrypoint, tty=tty, stdin=attach_stdin,
        detach=detach, console=console)
    name = _container_name(app, service)
    timeout = DEFAULT_RUN_TIMEOUT if args.timeout is None else args.timeout
    if detach:
        try:
            container = engine.create_container(config, name)["Id"]
            for network, aliases in extra_networks:
                engine.connect_network(network, container, aliases)
            engine.start(container)
        except BaseException as exc:
            _quietly(engine.remove, name)
            raise _start_failure(exc) if isinstance(exc, EngineError) else exc
        ctx.out("Running detached process... OK, %s\n" % container[:12])
        return 0

    import contextlib
    stream = waiter = None
    detached = False
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(lambda: detached or _quietly(engine.remove, name))
        pending = cleanup.enter_context(SignalPipe(
            [getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP")]))
        container = engine.create_container(config, name)["Id"]
        for network, aliases in extra_networks:
            engine.connect_network(network, container, aliases)
        if timeout:
            spawn_watchdog(engine, container, timeout)
        stream = engine.hijack("/containers/%s/attach" % container, query={
            "stream": 1, "stdin": int(attach_stdin), "stdout": 1, "stderr": 1})
        cleanup.callback(stream.close)
        # Set the wait up before start, and read its headers: then the engine is known to
        # be waiting, so a process that exits at once cannot be missed.
        waiter = engine.send_only("POST", "/containers/%s/wait" % container,
                                  {"condition": "next-exit"})
        cleanup.callback(waiter.close)
        wait_response = waiter.getresponse()
        if pending.fd is not None and _drain_signals(pending.fd):
            raise KeyboardInterrupt  # a signal before start: never start it
        try:
            engine.start(container)
        except EngineError as exc:
            raise _start_failure(exc)
        deadline = time.monotonic() + timeout if timeout else None
        forwarded = []

        def forward(signum):
            forwarded.append(signum)
            name_ = "KILL" if forwarded.count(signum) > 1 else signal.Signals(signum).name
            _quietly(engine.kill, container, name_)

        outcome = session(stream, stdio, tty=tty, detach_keys=parse_detach_keys(
            DEFAULT_DETACH_KEYS) if tty else b"", forward=forward, deadline=deadline,
            resize=lambda rows, cols: engine.resize("containers", container, rows, cols))
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


def _wait_status(response):
    """StatusCode from a /wait response, or None when it broke off."""
    try:
        body = json.loads(response.read().decode("utf-8") or "{}")
    except (OSError, ValueError, http.client.HTTPException):
        return None
    if (body.get("Error") or {}).get("Message"):
        raise StreamError("the engine could not wait for the process: %s" %
                          body["Error"]["Message"])
    return body.get("StatusCode")


def spawn_watchdog(engine, container, timeout):
    """Enforce --timeout even if this client dies: a detached grandchild process waits for
    the container to be removed, and past the deadline stops and removes it."""
    try:
        child = os.fork()
    except OSError:
        return  # the client still enforces the timeout while it lives
    if child:
        os.waitpid(child, 0)
        return
    try:
        os.setsid()
        if os.fork():
            os._exit(0)
        _become_daemon()
        watcher = Engine(engine.rack, {"DOCKER_API_VERSION": engine.api_version()})
        conn = watcher.connect(timeout=timeout + 2)
        try:
            conn.request("POST", watcher.url("/containers/%s/wait" % container,
                                             {"condition": "removed"}), body=b"")
            conn.getresponse().read()
        except socket.timeout:
            watcher.stop(container)
            watcher.remove(container)
    except BaseException:
        pass
    os._exit(0)


def _become_daemon():
    """Drop everything the watchdog inherited: fds (sockets, the terminal) and handlers."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH):
        signal.signal(signum, signal.SIG_IGN if signum != signal.SIGTERM else signal.SIG_DFL)
    try:
        signal.set_wakeup_fd(-1)
    except ValueError:
        pass
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, _max_fd())


def _max_fd():
    try:
        return min(os.sysconf("SC_OPEN_MAX"), 65536)
    except (ValueError, OSError):
        return 4096



# -- start ----------------------------------------------------------------------------------

#: Manifest file names `start` looks for, in order (SPEC §7).
MANIFEST_NAMES = ("convox.yml", "convox.yaml", "docker-compose.yml", "docker-compose.yaml",
                  "compose.yml", "compose.yaml")

#: ANSI colours of the service prefixes, in turn.
PREFIX_COLOURS = (36, 33, 32, 35, 34, 31, 96, 93, 92, 95, 94, 91)


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
    service on a terminal, whole lines only (partial lines wait for their end)."""

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
        data = self.partial.pop(key, b"") + data
        lines = data.split(b"\n")
        if lines[-1]:
            self.partial[key] = lines[-1]
        prefix = self.prefix(name).encode("utf-8")
        out = b"".join(prefix + line.rstrip(b"\r") + b"\n" for line in lines[:-1])
        if out:
            _write_all(self.fd, out)

    def flush(self, name, key=None):
        rest = self.partial.pop(key or name, b"")
        if rest:
            self.write(name, rest + b"\n", key)

    def say(self, text, name="convox"):
        self.write(name, text.encode("utf-8") + b"\n")


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

    def build_service(self, service, printer, no_cache):
        build = service.build
        tag = "%s:%s" % (self.repository(service.name), self.release)
        printer.say("building %s" % service.name, "build")
        labels = {LABEL_APP: self.app, LABEL_SERVICE: service.name,
                  LABEL_RELEASE: self.release}
        query = {"t": tag, "dockerfile": build.get("dockerfile") or "Dockerfile",
                 "labels": json.dumps(labels), "rm": "1", "forcerm": "1",
                 "buildargs": json.dumps(build.get("args") or {}),
                 "nocache": "1" if no_cache else None}
        chunks = tar_context(build["context"], build.get("dockerfile") or "Dockerfile")
        try:
            for message in self.engine.build(chunks, query):
                text = message.get("stream") or message.get("status") or ""
                for line in text.splitlines():
                    if line.strip():
                        printer.say(line.rstrip(), "build")
        except EngineError as exc:
            raise ConvoxError("build of %s failed: %s — fix the Dockerfile or the build "
                              "context" % (service.name, exc))
        return tag

    def last_build(self, name):
        labels = ["%s=%s" % (LABEL_APP, self.app), "%s=%s" % (LABEL_SERVICE, name)]
        images = self.engine.request("GET", "/images/json",
                                     {"filters": {"label": labels}}) or []
        if not images:
            raise ConvoxError("no build of %s yet — run convox start without --no-build" %
                              name)
        return max(images, key=lambda image: image.get("Created") or 0)["Id"]

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
        name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else \
            (image, "", "latest")
        conn = self.engine.connect(timeout=None)
        try:
            conn.request("POST", self.engine.url("/images/create",
                                                 {"fromImage": name, "tag": tag}), body=b"")
            response = conn.getresponse()
            body = response.read().decode("utf-8", "replace")
        finally:
            conn.close()
        for line in body.splitlines():
            try:
                message = json.loads(line)
            except ValueError:
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

    def ensure_network(self):
        self.network = self.app
        try:
            self.engine.request("GET", "/networks/%s" % self.network)
        except NotFound:
            self.engine.request("POST", "/networks/create", body={
                "Name": self.network, "CheckDuplicate": True,
                "Labels": {LABEL_APP: self.app}})
            self.network_created = True

    def container_config(self, name, command=None):
        """The create body of service ``name`` from the manifest."""
        service = self.manifest.services[name]
        labels = dict(service.labels or {})
        labels.update({LABEL_APP: self.app, LABEL_SERVICE: name,
                       LABEL_RELEASE: self.release, LABEL_TYPE: "service"})
        config = {
            "Image": self.images[name],
            "Env": ["%s=%s" % item for item in sorted(service.environment.items())],
            "Labels": labels,
            "HostConfig": {"NetworkMode": self.network,
                           "Memory": (service.memory or 0) * 1024 * 1024},
            "NetworkingConfig": {"EndpointsConfig": {self.network: {"Aliases": [name]}}},
            "AttachStdout": True, "AttachStderr": True,
        }
        if command is not None or service.command is not None:
            config["Cmd"] = command if command is not None else service.command
        if service.entrypoint is not None:
            config["Entrypoint"] = service.entrypoint
        binds, anonymous = [], {}
        for volume in service.volumes:
            if volume["type"] == "bind" or volume["source"]:
                source = volume["source"]
                if volume["type"] == "volume":
                    source = "%s-%s" % (self.app, source)
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
                       "Entrypoint": config.get("Entrypoint"), "WorkingDir": "", "User": ""},
            "HostConfig": config["HostConfig"],
            "Mounts": mounts,
            "NetworkSettings": {"Networks": {self.network: {"Aliases": [name]}}},
        }

    def create(self, name):
        """Create service ``name`` as container APP-SERVICE, replacing a stale one."""
        container_name = "%s-%s" % (self.app, name)
        self.engine.remove(container_name)
        ident = self.engine.create_container(self.container_config(name),
                                             container_name)["Id"]
        self.containers[name] = ident
        return ident

    def stop_all(self, grace=STOP_GRACE):
        for ident in self.containers.values():
            _quietly(self.engine.kill, ident, "TERM")
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
            try:
                self.engine.request("DELETE", "/networks/%s" % self.network)
            except ConvoxError:
                pass


def follow(local, streams, printer, signal_fd):
    """Print every service's output until all have exited or a stop is asked for.

    ``streams`` maps service -> Hijacked (not TTY).  Returns ``("exited", status)`` with the
    first non-zero exit status, or ``("stopped", 0)`` after Ctrl-C/SIGTERM (a second one
    kills at once).
    """
    demuxers = {name: Demuxer() for name in streams}
    by_sock = {}
    for name, stream in streams.items():
        stream.sock.setblocking(False)
        by_sock[stream.sock] = name
        if stream.early:
            for index, payload in demuxers[name].feed(stream.early):
                printer.write(name, payload, (name, index))
    first_failure = 0
    stopping = False
    stop_deadline = None
    while by_sock:
        readable = list(by_sock) + ([signal_fd] if signal_fd is not None else [])
        timeout = None if stop_deadline is None else max(0, stop_deadline - time.monotonic())
        ready, _, _ = select.select(readable, [], [], timeout)
        if signal_fd is not None and signal_fd in ready:
            for signum in _drain_signals(signal_fd):
                if signum not in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                    continue
                if stopping:
                    printer.say("killing")
                    local.kill_all()
                else:
                    stopping = True
                    printer.say("stopping")
                    for ident in local.containers.values():
                        _quietly(local.engine.kill, ident, "TERM")
                    stop_deadline = time.monotonic() + STOP_GRACE
        if not ready and stop_deadline is not None:
            local.kill_all()
            stop_deadline = None
            continue
        for sock in [s for s in ready if s in by_sock]:
            name = by_sock[sock]
            try:
                data = sock.recv(CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data:
                for index, payload in demuxers[name].feed(data):
                    printer.write(name, payload, (name, index))
                continue
            del by_sock[sock]
            sock.close()
            for index in (1, 2):
                printer.flush(name, (name, index))
            code = _exit_code(local.engine, local.containers[name])
            if not stopping:
                printer.say("%s exited with code %s" % (name, code))
                if code and not first_failure:
                    first_failure = code
    return ("stopped", 0) if stopping else ("exited", first_failure)


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
        ctx.stderr.write("WARNING: %s\n" % warning)
    app, _ = ctx.app()
    engine = ctx.engine
    if args.target:
        names = manifest.dependencies(args.target)
    else:
        names = []
        for name in manifest.services:
            names += [n for n in manifest.dependencies(name) if n not in names]
    command = command_words(args.command) if args.command else None
    local = LocalApp(engine, app, manifest, new_release())
    stdio = ctx.stdio
    colour = os.isatty(stdio.stdout_fd) and not ctx.environ.get("NO_COLOR")
    printer = LogPrinter(names, stdio.stdout_fd, colour)
    ctx.stdout.flush()
    try:
        local.build(names, printer, args.no_build, args.no_cache)
        local.ensure_network()
        if command is not None:
            return start_command(ctx, local, names, command, printer)
        return start_services(local, names, printer)
    finally:
        local.remove_all()


def start_services(local, names, printer):
    """Run every service, following their output, until they exit or are stopped."""
    streams = {}
    with SignalPipe([signal.SIGINT, signal.SIGTERM, signal.SIGHUP]) as pipe:
        try:
            for name in names:
                ident = local.create(name)
                streams[name] = local.engine.hijack("/containers/%s/attach" % ident, query={
                    "stream": 1, "stdout": 1, "stderr": 1})
            for name in names:
                printer.say("starting %s" % name)
                local.engine.start(local.containers[name])
            outcome, status = follow(local, streams, printer, pipe.fd)
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
        printer.say("starting %s" % name)
        local.engine.start(local.create(name))
    try:
        return run_one_off(ctx, local.template(service), command, app=local.app,
                           service=service)
    finally:
        local.stop_all()


# ==========================================================================================
# CLI
# ==========================================================================================

VERBS = ("ps", "exec", "run", "start")


def _common_options(parser, suppress):
    """-a/--app and -r/--rack, accepted before the verb and among its options (SPEC §1)."""
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("-a", "--app", default=default, help="app name (default: inferred)")
    parser.add_argument("-r", "--rack", default=default,
                        help="engine URL: unix:///path, /path or tcp://host:port")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of exiting, so main() owns the status."""

    def error(self, message):
        raise UsageError("%s — see %s --help" % (message, self.prog))


def build_parser():
    """The argparse tree of every verb."""
    parser = _Parser(prog="convox", description="Convox's one-off commands for any host "
                     "with a Docker Engine API socket.")
    parser.add_argument("--version", action="version", version="convox.py " + __version__)
    _common_options(parser, suppress=False)
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    ps = verbs.add_parser("ps", help="list the app's processes (ps info ID, ps stop ID)")
    _common_options(ps, suppress=True)
    ps.add_argument("-s", "--service", help="only this service (one-offs included)")
    ps.add_argument("--release", help="only this release")
    ps.add_argument("--all", action="store_true", help="stopped processes too")
    ps.add_argument("--format", choices=("table", "json"), default="table")
    ps.add_argument("words", nargs="*", metavar="info|stop ID", help=argparse.SUPPRESS)
    ps.set_defaults(handler=cmd_ps)

    exec_ = verbs.add_parser(
        "exec", help="run a command in a running process",
        usage="convox exec [options] TARGET COMMAND...",
        description="Run COMMAND in a running process: TARGET is a container ID, ID prefix "
        "or name, or a service of the app.")
    _common_options(exec_, suppress=True)
    _session_options(exec_)
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
    _session_options(run)
    run.add_argument("-d", "--detach", action="store_true",
                     help="run in the background; output goes to the process's logs")
    run.add_argument("-t", "--timeout", type=int, metavar="SECONDS",
                     help="stop the process after this long (default 3600, 0 = never)")
    run.add_argument("--release", help="use this release's image")
    run.add_argument("--no-entrypoint", action="store_true",
                     help="bypass the image's ENTRYPOINT")
    run.add_argument("--entrypoint", metavar="true|false", help=argparse.SUPPRESS)
    run.add_argument("--memory", type=int, metavar="MB", help="memory limit in MiB")
    run.set_defaults(handler=cmd_run)

    start = verbs.add_parser(
        "start", help="run the app locally from convox.yml or docker-compose.yml",
        usage="convox start [options] [SERVICE [COMMAND...]]",
        description="Build and run the app's services locally; with SERVICE, only it and "
        "what it links to; with COMMAND, run COMMAND in a new process of SERVICE.")
    _common_options(start, suppress=True)
    _session_options(start)
    start.add_argument("-m", "--manifest", metavar="FILE",
                       help="manifest (default: convox.yml, else docker-compose.yml)")
    start.add_argument("--no-build", action="store_true", help="use the last build")
    start.add_argument("--no-cache", action="store_true", help="build without cache")
    start.set_defaults(handler=cmd_start, detach=False, timeout=None, memory=None)
    return parser


def _session_options(parser):
    """Options shared by the verbs that attach to a process."""
    parser.add_argument("-e", "--env", action="append", metavar="K=V",
                        help="set an environment variable (repeatable)")
    tty = parser.add_mutually_exclusive_group()
    tty.add_argument("--tty", dest="tty", action="store_true", default=None,
                     help="force a TTY")
    tty.add_argument("--no-tty", dest="tty", action="store_false",
                     help="never use a TTY")


#: Verbs whose first positional word names a target and the words after it are a command.
COMMAND_VERBS = {"exec": True, "run": True, "start": False}


def split_command_line(parser, words, target_required=True):
    """Split a verb's words into (option words, target or None, command words).

    Options may stand before or after the target; the first word after it that is not an
    option starts the command, whose own options are left alone (``exec ID ls -la``).
    ``--`` ends options.  Which options take a value is read from the verb's parser.
    """
    takes_value = {}
    for action in parser._actions:  # argparse's own table of options (stable since 2.7)
        for option in action.option_strings:
            takes_value[option] = action.nargs != 0
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


def main(argv=None, environ=None):
    """Run the CLI; return the exit status (only the __main__ guard exits)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    verb = args = None
    ctx = None
    try:
        parser = build_parser()
        args = parse_command_line(parser, argv)
        verb = args.verb
        if verb is None:
            parser.print_help()
            return 2
        ctx = Context(args, environ)
        return args.handler(ctx)
    except ExitStatus as exc:
        return exc.status
    except SystemExit as exc:  # argparse's --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except KeyboardInterrupt:
        return _report(environ, "interrupted", 130)
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
        import traceback
        traceback.print_exc()
    try:
        sys.stderr.write("ERROR: %s\n" % message)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return status


def _zipapp_main():
    """Entry point of the zipapp (python3 -m zipapp DIR -m convox:_zipapp_main)."""
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
