#!/usr/bin/env python3
"""Tests of convox.py, cheap to expensive: pure functions, the CLI in-process, the real
engine, real terminals.

    python3 test_convox.py                 # everything this machine can run
    python3 test_convox.py -k Demux        # unittest's usual selection

The real-engine tests use the engine convox.py would find (CONVOX_RACK, DOCKER_HOST, the
default sockets).  When none answers and ``dockerd`` is installed (and we are root), a
private one is started for the run, with its own data root and socket, and stopped after.
CONVOX_TEST_REQUIRE_ENGINE=1 turns "no engine" into a failure instead of a skip (CI sets it).
CONVOX_TEST_SLOW=1 adds the slow group (hundreds of containers, long soaks).
Everything a test creates carries the label convox.test=RUN_ID and is removed at the end.
"""

import contextlib
import errno
import hashlib
import io
import json
import os
import pty
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import fcntl
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
CONVOX = os.path.join(HERE, "convox.py")
sys.path.insert(0, HERE)
import convox  # noqa: E402

RUN_ID = "%x%s" % (os.getpid(), os.urandom(2).hex())
TEST_LABEL = "convox.test"
REQUIRE_ENGINE = os.environ.get("CONVOX_TEST_REQUIRE_ENGINE") == "1"
SLOW = os.environ.get("CONVOX_TEST_SLOW") == "1"
INSTALL_HINT = "apt-get install -y docker.io busybox-static tmux"


def app_name(suffix):
    """An app name of this run only, so that parallel runs never meet."""
    return "t%s-%s" % (RUN_ID, suffix)


def deadline_loop(seconds, interval=0.05):
    """Yield until ``seconds`` have passed (every wait in these tests has a deadline)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield
        time.sleep(interval)


# ==========================================================================================
# The engine the tests run against
# ==========================================================================================

class Harness:
    """Finds (or starts) an engine, builds the busybox test image, cleans up after the run."""

    def __init__(self):
        self.ready = False
        self.problem = None
        self.rack_url = None
        self.engine = None
        self.image = None
        self.dockerd = None
        self.private_dir = None

    def setup(self):
        if self.ready or self.problem:
            return
        try:
            self._find_engine()
            self._build_image()
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - reported as the skip/failure reason
            self.problem = "%s: %s" % (type(exc).__name__, exc)

    def _answers(self, rack):
        engine = convox.Engine(rack, {})
        try:
            conn = engine.connect(timeout=5)
            conn.request("GET", "/_ping")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except (convox.ConvoxError, OSError):
            return False

    def _find_engine(self):
        rack = convox.resolve_rack(None, os.environ)
        if not self._answers(rack):
            rack = self._start_private_dockerd()
        self.rack_url = rack.url
        self.engine = convox.Engine(rack, {})
        self.engine.api_version()

    def _start_private_dockerd(self):
        dockerd = shutil.which("dockerd")
        if not dockerd or os.geteuid() != 0:
            raise RuntimeError("no Docker engine answers, and dockerd is not installed (or "
                               "not root) — install it: " + INSTALL_HINT)
        self.private_dir = tempfile.mkdtemp(prefix="convox-test-dockerd-")
        sock = os.path.join(self.private_dir, "docker.sock")
        log = open(os.path.join(self.private_dir, "dockerd.log"), "wb")
        self.dockerd = subprocess.Popen(
            [dockerd, "--data-root", os.path.join(self.private_dir, "data"),
             "--exec-root", os.path.join(self.private_dir, "exec"),
             "--pidfile", os.path.join(self.private_dir, "dockerd.pid"),
             "-H", "unix://" + sock],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        rack = convox.parse_rack("unix://" + sock, {})
        for _ in deadline_loop(60, 0.2):
            if self.dockerd.poll() is not None:
                break
            if os.path.exists(sock) and self._answers(rack):
                sys.stderr.write("test: started a private dockerd at %s\n" % sock)
                return rack
        raise RuntimeError("the private dockerd did not start; see %s/dockerd.log" %
                           self.private_dir)

    def _build_image(self):
        busybox = shutil.which("busybox") or "/bin/busybox"
        if not os.path.exists(busybox):
            raise RuntimeError("busybox is not installed — install it: " + INSTALL_HINT)
        dockerfile = ('FROM scratch\nCOPY busybox /bin/busybox\n'
                      'RUN ["/bin/busybox","--install","-s","/bin"]\n')
        self.image = "convox-test:%s" % RUN_ID
        self.build(self.image, dockerfile, {"busybox": busybox})

    def build(self, tag, dockerfile, files=None, labels=None):
        """Build an image through the API from a Dockerfile and {name: local path}."""
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            data = dockerfile.encode("utf-8")
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for name, path in (files or {}).items():
                tar.add(path, arcname=name)
        all_labels = {TEST_LABEL: RUN_ID}
        all_labels.update(labels or {})
        query = {"t": tag, "rm": "1", "forcerm": "1", "labels": json.dumps(all_labels)}
        for _ in self.engine.build([buffer.getvalue()], query):
            pass
        return tag

    def env(self, **extra):
        """The environment a convox subprocess gets: this engine, no inferred app."""
        env = dict(os.environ)
        env.pop("CONVOX_APP", None)
        env["CONVOX_RACK"] = self.rack_url
        env["DOCKER_HOST"] = self.rack_url
        env.update(extra)
        return env

    def cleanup(self):
        if self.engine is None:
            return
        engine = self.engine
        prefix = "t%s-" % RUN_ID
        try:
            for summary in engine.containers(all=True):
                labels = summary.get("Labels") or {}
                app = convox.identity(labels)[0]
                if labels.get(TEST_LABEL) == RUN_ID or app.startswith(prefix):
                    engine.remove(summary["Id"])
            networks = engine.request("GET", "/networks") or []
            for network in networks:
                labels = network.get("Labels") or {}
                if labels.get(TEST_LABEL) == RUN_ID or network["Name"].startswith(prefix):
                    with contextlib.suppress(convox.ConvoxError):
                        engine.request("DELETE", "/networks/%s" % network["Id"])
            images = engine.request("GET", "/images/json") or []
            for image in images:
                labels = image.get("Labels") or {}
                tags = image.get("RepoTags") or []
                if labels.get(TEST_LABEL) == RUN_ID or any(t.startswith(prefix) for t in tags):
                    for tag in tags or [image["Id"]]:
                        with contextlib.suppress(convox.ConvoxError):
                            engine.request("DELETE", "/images/%s" % tag, {"force": "1"})
        finally:
            engine.close()
            if self.dockerd is not None:
                self.dockerd.terminate()
                try:
                    self.dockerd.wait(30)
                except subprocess.TimeoutExpired:
                    self.dockerd.kill()
                shutil.rmtree(self.private_dir, ignore_errors=True)


HARNESS = Harness()


def tearDownModule():
    HARNESS.cleanup()


class EngineTestCase(unittest.TestCase):
    """A test against the real engine: skipped without one, unless CI requires it."""

    @classmethod
    def setUpClass(cls):
        HARNESS.setup()
        if not HARNESS.ready:
            message = "real engine unavailable: %s" % HARNESS.problem
            if REQUIRE_ENGINE:
                raise RuntimeError(message)
            raise unittest.SkipTest(message)
        cls.engine = HARNESS.engine
        cls.image = HARNESS.image

    # -- fixtures --------------------------------------------------------------------------

    def container(self, app, service, command=("sleep", "3600"), release=None, memory=None,
                  compose=False, kind=None, env=None, workdir=None, image=None,
                  entrypoint=None, network=None, aliases=None, start=True, name=None,
                  labels=None):
        """Create (and start) a labelled fixture container; it is removed at the end."""
        all_labels = {TEST_LABEL: RUN_ID}
        if compose:
            all_labels.update({convox.COMPOSE_PROJECT: app, convox.COMPOSE_SERVICE: service})
        else:
            all_labels.update({convox.LABEL_APP: app, convox.LABEL_SERVICE: service})
            if kind:
                all_labels[convox.LABEL_TYPE] = kind
            if release:
                all_labels[convox.LABEL_RELEASE] = release
        all_labels.update(labels or {})
        config = {"Image": image or self.image, "Cmd": list(command), "Labels": all_labels,
                  "Env": env or [], "WorkingDir": workdir or "",
                  "HostConfig": {"Memory": (memory or 0) * 1024 * 1024, "Init": True}}
        if entrypoint is not None:
            config["Entrypoint"] = entrypoint
        if network:
            config["HostConfig"]["NetworkMode"] = network
            config["NetworkingConfig"] = {"EndpointsConfig": {network: {
                "Aliases": aliases}}}
        ident = self.engine.create_container(config, name)["Id"]
        self.addCleanup(self.engine.remove, ident)
        if start:
            self.engine.start(ident)
        return ident

    def network(self, suffix):
        name = app_name(suffix)
        info = self.engine.request("POST", "/networks/create", body={
            "Name": name, "Labels": {TEST_LABEL: RUN_ID}, "CheckDuplicate": True})
        self.addCleanup(lambda: self._remove_network(info["Id"]))
        return name

    def _remove_network(self, ident):
        with contextlib.suppress(convox.ConvoxError):
            self.engine.request("DELETE", "/networks/%s" % ident)

    def convox(self, *args, input=None, timeout=120, env=None, cwd=None):
        """Run convox.py as a user would; -> CompletedProcess with bytes."""
        return subprocess.run([sys.executable, CONVOX] + list(args), input=input,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, env=HARNESS.env(**(env or {})),
                              cwd=cwd or HERE)

    def docker(self, *args, input=None, timeout=120):
        """The Docker CLI, as an oracle; skipped when it is not installed."""
        docker = shutil.which("docker")
        if not docker:
            self.skipTest("the Docker CLI is not installed (used only as an oracle)")
        return subprocess.run([docker] + list(args), input=input, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, env=HARNESS.env())

    def processes_of(self, app, kind=None):
        """Containers of an app (any state), optionally of one convox.type."""
        found = []
        for summary in self.engine.containers(all=True):
            c_app, _, _, c_kind = convox.identity(summary.get("Labels"))
            if c_app == app and (kind is None or c_kind == kind):
                found.append(summary)
        return found

    def assertNoneLeft(self, app, kind="process", within=20):
        for _ in deadline_loop(within, 0.2):
            if not self.processes_of(app, kind):
                return
        self.fail("%s containers of %s remain: %r" % (
            kind, app, [s["Names"] for s in self.processes_of(app, kind)]))

    def assertOneErrorLine(self, result):
        lines = result.stderr.decode("utf-8", "replace").splitlines()
        self.assertTrue(lines and lines[-1].startswith("ERROR: "), result.stderr)
        self.assertNotIn("Traceback", result.stderr.decode("utf-8", "replace"))
        errors = [line for line in lines if line.startswith("ERROR: ")]
        self.assertEqual(len(errors), 1, result.stderr)


# ==========================================================================================
# Real terminals
# ==========================================================================================

class PtySession:
    """convox.py run under a new pty, as a person at a terminal would run it."""

    def __init__(self, args, rows=30, cols=100, env=None, cwd=None):
        self.master, self.slave = pty.openpty()
        self.set_size(rows, cols)
        self.output = b""
        self.proc = subprocess.Popen(
            [sys.executable, CONVOX] + list(args), stdin=self.slave, stdout=self.slave,
            stderr=self.slave, env=HARNESS.env(**(env or {})), cwd=cwd or HERE,
            preexec_fn=self._controlling_terminal, close_fds=True)
        self.initial_attrs = None

    def _controlling_terminal(self):
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def set_size(self, rows, cols):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def attrs(self):
        """The outer terminal's settings (what ``stty -g`` prints)."""
        return termios.tcgetattr(self.slave)

    def send(self, data):
        os.write(self.master, data.encode("utf-8") if isinstance(data, str) else data)

    def read_some(self, timeout=0.1):
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:
                data = b""
            self.output += data
            return data
        return None

    def expect(self, pattern, timeout=20):
        """Wait for a regex (bytes) in the output since the last expect; return the match."""
        regex = re.compile(pattern.encode("utf-8") if isinstance(pattern, str) else pattern)
        start = getattr(self, "_mark", 0)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            match = regex.search(self.output, start)
            if match:
                self._mark = match.end()
                return match
            self.read_some(0.1)
        raise AssertionError("%r not seen within %ss; output: %r" %
                             (pattern, timeout, self.output[-2000:]))

    def wait(self, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.read_some(0.05)
            status = self.proc.poll()
            if status is not None:
                while self.read_some(0.05):
                    pass
                return status
        raise AssertionError("convox did not exit within %ss; output: %r" %
                             (timeout, self.output[-2000:]))

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class TerminalTestCase(EngineTestCase):
    def pty(self, *args, rows=30, cols=100, env=None, cwd=None):
        session = PtySession(args, rows=rows, cols=cols, env=env, cwd=cwd)
        self.addCleanup(session.close)
        session.initial_attrs = session.attrs()
        return session


# ==========================================================================================
# Pure functions
# ==========================================================================================

class HumanizeTest(unittest.TestCase):
    """go-humanize's RelTime thresholds, as Convox's ps prints STARTED."""

    TABLE = [
        (0, "now"), (0.999, "now"), (1, "1 second ago"), (1.999, "1 second ago"),
        (2, "2 seconds ago"), (59.9, "59 seconds ago"), (60, "1 minute ago"),
        (119, "1 minute ago"), (120, "2 minutes ago"), (3599, "59 minutes ago"),
        (3600, "1 hour ago"), (7199, "1 hour ago"), (7200, "2 hours ago"),
        (86399, "23 hours ago"), (86400, "1 day ago"), (2 * 86400 - 1, "1 day ago"),
        (2 * 86400, "2 days ago"), (7 * 86400 - 1, "6 days ago"), (7 * 86400, "1 week ago"),
        (14 * 86400 - 1, "1 week ago"), (14 * 86400, "2 weeks ago"),
        (30 * 86400 - 1, "4 weeks ago"), (30 * 86400, "1 month ago"),
        (60 * 86400 - 1, "1 month ago"), (60 * 86400, "2 months ago"),
        (360 * 86400 - 1, "11 months ago"), (360 * 86400, "1 year ago"),
        (540 * 86400 - 1, "1 year ago"), (540 * 86400, "2 years ago"),
        (720 * 86400 - 1, "2 years ago"), (720 * 86400, "2 years ago"),
        (1080 * 86400, "3 years ago"), (37 * 360 * 86400 - 1, "36 years ago"),
        (37 * 360 * 86400, "a long while ago"), (-5, "5 seconds from now"),
    ]

    def test_thresholds(self):
        for seconds, text in self.TABLE:
            with self.subTest(seconds=seconds):
                self.assertEqual(convox.humanize_since(seconds), text)

    def test_timestamps(self):
        self.assertEqual(convox.parse_timestamp("1970-01-01T00:00:10Z"), 10)
        self.assertAlmostEqual(convox.parse_timestamp("1970-01-01T00:00:10.5Z"), 10.5)
        self.assertAlmostEqual(
            convox.parse_timestamp("1970-01-01T01:00:10.123456789+01:00"), 10.123456789)
        self.assertIsNone(convox.parse_timestamp("0001-01-01T00:00:00Z"))
        self.assertIsNone(convox.parse_timestamp(""))


class TableTest(unittest.TestCase):
    def test_layout(self):
        text = convox.format_table(["ID", "NAME", "COMMAND"],
                                   [["abc", "web", "bin/web"], ["abcdef", "w", "x y"]])
        self.assertEqual(text, "ID      NAME  COMMAND\nabc     web   bin/web\n"
                               "abcdef  w     x y\n")

    def test_empty(self):
        self.assertEqual(convox.format_table(["ID", "NAME"], []), "ID  NAME\n")


class RackTest(unittest.TestCase):
    def test_forms(self):
        cases = [
            ("unix:///var/run/docker.sock", ("unix", "/var/run/docker.sock")),
            ("/tmp/x.sock", ("unix", "/tmp/x.sock")),
            ("tcp://127.0.0.1:2375", ("tcp", ("127.0.0.1", 2375))),
            ("tcp://example:1234/", ("tcp", ("example", 1234))),
            ("tcp://[::1]:2375", ("tcp", ("::1", 2375))),
            ("tcp://docker", ("tcp", ("docker", 2375))),
        ]
        for url, (kind, address) in cases:
            with self.subTest(url=url):
                rack = convox.parse_rack(url, {})
                self.assertEqual((rack.kind, rack.address), (kind, address))

    def test_tls(self):
        rack = convox.parse_rack("tcp://h:2376", {"DOCKER_TLS_VERIFY": "1",
                                                  "DOCKER_CERT_PATH": "/certs"})
        self.assertEqual((rack.kind, rack.cert_path), ("tls", "/certs"))

    def test_malformed(self):
        for url in ("::garbage", "tcp://", "tcp://h:notaport", "tcp://h:99999", "unix://rel",
                    "ftp://x", "garbage"):
            with self.subTest(url=url):
                with self.assertRaises(convox.UsageError) as caught:
                    convox.parse_rack(url, {})
                self.assertIn("malformed rack URL", str(caught.exception))

    def test_resolution_order(self):
        exists = {"/var/run/docker.sock"}.__contains__
        resolve = convox.resolve_rack
        self.assertEqual(resolve("/a", {"CONVOX_RACK": "/b", "DOCKER_HOST": "/c"}).address, "/a")
        self.assertEqual(resolve(None, {"CONVOX_RACK": "/b", "DOCKER_HOST": "/c"}).address, "/b")
        self.assertEqual(resolve(None, {"DOCKER_HOST": "/c"}).address, "/c")
        self.assertEqual(resolve(None, {}, exists).address, "/var/run/docker.sock")
        podman = {"/run/user/7/podman/podman.sock"}.__contains__
        self.assertEqual(resolve(None, {"XDG_RUNTIME_DIR": "/run/user/7"}, podman).address,
                         "/run/user/7/podman/podman.sock")
        system = {"/run/podman/podman.sock"}.__contains__
        self.assertEqual(resolve(None, {}, system).address, "/run/podman/podman.sock")
        # Nothing exists: the Docker socket is named, so the error says where we looked.
        self.assertEqual(resolve(None, {}, lambda p: False).address, "/var/run/docker.sock")


class VersionTest(unittest.TestCase):
    def test_negotiation(self):
        self.assertEqual(convox.negotiate_version("1.41"), "1.41")
        self.assertEqual(convox.negotiate_version("1.9"), "1.9")  # numeric, not string order
        self.assertEqual(convox.negotiate_version("1.99"), convox.API_VERSION_MAX)
        self.assertEqual(convox.negotiate_version("1.99", override="1.40"), "1.40")
        self.assertEqual(convox.negotiate_version(None), "1.24")


class IdentityTest(unittest.TestCase):
    def test_labels(self):
        self.assertEqual(convox.identity({"convox.app": "shop", "convox.service": "web",
                                          "convox.release": "R1", "convox.type": "process"}),
                         ("shop", "web", "R1", "process"))
        self.assertEqual(convox.identity({"com.docker.compose.project": "blog",
                                          "com.docker.compose.service": "db",
                                          "com.docker.compose.oneoff": "False"}),
                         ("blog", "db", "", "service"))
        self.assertEqual(convox.identity({"com.docker.compose.project": "blog",
                                          "com.docker.compose.service": "db",
                                          "com.docker.compose.oneoff": "True"}),
                         ("blog", "db", "", "process"))
        self.assertEqual(convox.identity(None), ("", "", "", "service"))

    def test_app_resolution(self):
        with tempfile.TemporaryDirectory() as root:
            folder = os.path.join(root, "My_Shop.app")
            os.makedirs(os.path.join(folder, ".convox"))
            self.assertEqual(convox.resolve_app(None, {}, folder), ("my-shop-app", True))
            with open(os.path.join(folder, ".convox", "app"), "w") as handle:
                handle.write("shop\n")
            self.assertEqual(convox.resolve_app(None, {}, folder), ("shop", False))
            self.assertEqual(convox.resolve_app(None, {"CONVOX_APP": "env"}, folder),
                             ("env", False))
            self.assertEqual(convox.resolve_app("opt", {"CONVOX_APP": "env"}, folder),
                             ("opt", False))


class ArgvTest(unittest.TestCase):
    def parse(self, argv):
        return convox.parse_command_line(convox.build_parser(), argv)

    def test_command_words(self):
        self.assertEqual(convox.command_words(["ls", "-la"]), ["ls", "-la"])
        self.assertEqual(convox.command_words(["a && b"]), ["sh", "-c", "a && b"])
        self.assertEqual(convox.command_words(["a b", "c"]), ["a b", "c"])
        self.assertEqual(convox.command_words(["ls"]), ["ls"])

    def test_options_around_target(self):
        args = self.parse(["exec", "--no-tty", "web", "-e", "A=1", "ls", "-la"])
        self.assertEqual((args.target, args.command, args.env, args.tty),
                         ("web", ["ls", "-la"], ["A=1"], False))
        args = self.parse(["-a", "shop", "run", "web", "--detach", "bin/job", "--detach"])
        self.assertEqual((args.app, args.target, args.detach, args.command),
                         ("shop", "web", True, ["bin/job", "--detach"]))
        args = self.parse(["run", "-a", "shop", "--timeout=5", "web", "-t", "7", "x"])
        self.assertEqual((args.app, args.timeout, args.command), ("shop", 7, ["x"]))

    def test_double_dash(self):
        args = self.parse(["exec", "--", "web", "--tty"])
        self.assertEqual((args.target, args.command, args.tty), ("web", ["--tty"], None))
        args = self.parse(["exec", "web", "--", "-x"])
        self.assertEqual((args.target, args.command), ("web", ["-x"]))

    def test_app_before_and_after_verb(self):
        self.assertEqual(self.parse(["-a", "x", "ps"]).app, "x")
        self.assertEqual(self.parse(["ps", "-a", "y"]).app, "y")
        self.assertEqual(self.parse(["-a", "x", "ps", "--app", "y"]).app, "y")
        self.assertEqual(self.parse(["-r", "/s", "exec", "w", "ls"]).rack, "/s")

    def test_unknown_option_is_usage_error(self):
        with self.assertRaises(convox.UsageError):
            self.parse(["exec", "--bogus", "web", "ls"])


class DemuxTest(unittest.TestCase):
    FRAMES = [(1, b"hello "), (2, b"oops\n"), (1, b""), (1, b"world\n" * 3), (2, b"\0\1\2")]

    def encoded(self):
        return b"".join(struct.pack(">BxxxL", s, len(p)) + p for s, p in self.FRAMES)

    def collect(self, pieces):
        demux = convox.Demuxer()
        out = {1: b"", 2: b""}
        for piece in pieces:
            for index, payload in demux.feed(piece):
                out[index] += payload
        self.assertFalse(demux.partial())
        return out

    def test_every_split_point(self):
        data = self.encoded()
        want = {1: b"hello " + b"world\n" * 3, 2: b"oops\n\0\1\2"}
        for cut in range(len(data) + 1):
            self.assertEqual(self.collect([data[:cut], data[cut:]]), want, cut)
        for first in range(0, len(data), 3):
            for second in range(first, len(data), 5):
                self.assertEqual(
                    self.collect([data[:first], data[first:second], data[second:]]), want)

    def test_byte_at_a_time(self):
        data = self.encoded()
        self.assertEqual(self.collect([data[i:i + 1] for i in range(len(data))]),
                         {1: b"hello " + b"world\n" * 3, 2: b"oops\n\0\1\2"})

    def test_partial_frame(self):
        demux = convox.Demuxer()
        demux.feed(struct.pack(">BxxxL", 1, 10) + b"abc")
        self.assertTrue(demux.partial())

    def test_malformed_header(self):
        with self.assertRaises(convox.StreamError):
            convox.Demuxer().feed(b"\x07\0\0\0\0\0\0\x01x")
        with self.assertRaises(convox.StreamError):
            convox.Demuxer().feed(b"\x01\x01\0\0\0\0\0\x01x")

    def test_engine_error_frame(self):
        with self.assertRaises(convox.StreamError) as caught:
            convox.Demuxer().feed(struct.pack(">BxxxL", 3, 4) + b"boom")
        self.assertIn("boom", str(caught.exception))


class DetachKeysTest(unittest.TestCase):
    def test_parse(self):
        self.assertEqual(convox.parse_detach_keys("ctrl-p,ctrl-q"), b"\x10\x11")
        self.assertEqual(convox.parse_detach_keys("ctrl-@,a,ctrl-[,ctrl-_"), b"\x00a\x1b\x1f")
        for bad in ("ctrl-", "ctrl-1", "alt-x", "ab"):
            with self.assertRaises(convox.UsageError):
                convox.parse_detach_keys(bad)

    def feed_all(self, keys, pieces):
        matcher = convox.DetachMatcher(keys)
        sent = b""
        for piece in pieces:
            out, detached = matcher.feed(piece)
            sent += out
            if detached:
                return sent, True
        return sent, False

    def test_across_reads(self):
        keys = b"\x10\x11"
        self.assertEqual(self.feed_all(keys, [b"ab\x10", b"\x11cd"]), (b"ab", True))
        self.assertEqual(self.feed_all(keys, [b"ab\x10", b"x"]), (b"ab\x10x", False))
        self.assertEqual(self.feed_all(keys, [b"\x10", b"\x10", b"\x11"]), (b"\x10", True))
        self.assertEqual(self.feed_all(keys, [b"\x11\x10"]), (b"\x11", False))
        three = b"abc"
        for cut in range(6):
            data = b"xxabyabc"
            self.assertEqual(self.feed_all(three, [data[:cut], data[cut:]]), (b"xxaby", True))


# ==========================================================================================
# The CLI in-process
# ==========================================================================================

class CliTest(unittest.TestCase):
    def main(self, argv, environ=None):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = convox.main(argv, environ if environ is not None else {})
        return status, out.getvalue(), err.getvalue()

    def test_version_and_help(self):
        status, out, _ = self.main(["--version"])
        self.assertEqual((status, out.strip()), (0, "convox.py " + convox.__version__))
        status, out, _ = self.main(["--help"])
        self.assertEqual(status, 0)
        for verb in ("ps", "exec", "run", "start"):
            self.assertIn(verb, out)

    def test_no_verb(self):
        status, out, _ = self.main([])
        self.assertEqual(status, 2)
        self.assertIn("usage", out)

    def test_engine_not_running(self):
        status, out, err = self.main(["ps"], {"CONVOX_RACK": "unix:///nowhere.sock"})
        self.assertEqual(status, 1)
        self.assertEqual(err.count("\n"), 1)
        self.assertRegex(err, r"^ERROR: cannot reach the engine at unix:///nowhere.sock .* — ")

    def test_exec_failure_is_125(self):
        status, _, err = self.main(["exec", "web", "ls"], {"CONVOX_RACK": "/nowhere.sock"})
        self.assertEqual(status, 125)
        self.assertTrue(err.startswith("ERROR: cannot reach"))

    def test_refused_tcp(self):
        status, _, err = self.main(["--rack", "tcp://127.0.0.1:1", "ps"])
        self.assertEqual(status, 1)
        self.assertRegex(err, r"^ERROR: cannot reach the engine at tcp://127.0.0.1:1 \(.*\) — ")

    def test_malformed_rack(self):
        status, _, err = self.main(["--rack", "::garbage", "ps"])
        self.assertEqual(status, 2)
        self.assertEqual(err, "ERROR: malformed rack URL '::garbage' — use "
                              "unix:///path/to/docker.sock or tcp://host:port\n")

    def test_usage_errors(self):
        for argv in (["ps", "--bogus"], ["exec"], ["exec", "web"], ["run", "web"],
                     ["ps", "frobnicate"], ["exec", "--detach-keys", "alt-x", "w", "ls"]):
            with self.subTest(argv=argv):
                status, _, err = self.main(argv, {"CONVOX_RACK": "/nowhere.sock"})
                self.assertEqual(status, 2, err)
                self.assertTrue(err.splitlines()[-1].startswith("ERROR: "), err)
                self.assertNotIn("Traceback", err)

    def test_permission_denied(self):
        if os.geteuid() != 0:
            self.skipTest("needs root to make a socket nobody may open")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "engine.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        self.addCleanup(server.close)
        os.chmod(path, 0o600)
        os.chmod(folder, 0o755)
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
             CONVOX, "--rack", "unix://" + path, "ps"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(result.returncode, 1)
        err = result.stderr.decode()
        self.assertRegex(err, r"^ERROR: permission denied on unix://.*engine.sock — run as root")
        self.assertEqual(err.count("\n"), 1)


# ==========================================================================================
# The real engine: ps
# ==========================================================================================

class PsTest(EngineTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()

    def fixtures(self):
        app = app_name("ps%d" % random.randrange(1 << 30))
        ids = {
            "web": self.container(app, "web", release="RSPZQWVWGOP", memory=256),
            "web2": self.container(app, "web", ("sh", "-c", "sleep 3600 # it's"),
                                   release="RSPZQWVWGOP", memory=256),
            "worker": self.container(app, "worker", ("sleep", "3601"), release="RBBB"),
            "job": self.container(app, "web", ("sleep", "3602"), release="RSPZQWVWGOP",
                                  kind="process"),
            "stopped": self.container(app, "cron", ("sh", "-c", "exit 3"), release="RBBB"),
        }
        for _ in deadline_loop(20):
            if self.engine.inspect(ids["stopped"])["State"]["Status"] == "exited":
                break
        return app, ids

    def test_table_matches_engine(self):
        app, ids = self.fixtures()
        result = self.convox("-a", app, "ps")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.decode().splitlines()
        self.assertEqual(re.split(r"\s{2,}", lines[0]),
                         ["ID", "NAME", "RELEASE", "SIZE", "STARTED", "COMMAND"])
        running = [i for k, i in ids.items() if k != "stopped"]
        expected = []
        for ident in running:
            info = self.engine.inspect(ident)
            labels = info["Config"]["Labels"]
            memory = info["HostConfig"]["Memory"]
            expected.append((labels["convox.service"], ident[:12],
                             labels.get("convox.release") or "-",
                             str(memory // 1048576) if memory else "-",
                             " ".join(convox.shell_join([a]) for a in
                                      [info["Path"]] + info["Args"])))
        expected.sort()
        rows = []
        for line in lines[1:]:
            cells = re.split(r"\s{2,}", line, maxsplit=5)
            rows.append((cells[1], cells[0], cells[2], cells[3], cells[5]))
            self.assertIn(cells[4], ("now", "1 second ago") + tuple(
                "%d seconds ago" % n for n in range(2, 60)))
        self.assertEqual(rows, expected)
        self.assertIn("sh -c 'sleep 3600 # it'\"'\"'s'", result.stdout.decode())
        # Columns line up: every cell starts where its header does.
        starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
        for line in lines[1:]:
            for start in starts[1:5]:
                self.assertEqual(line[start - 2:start], "  ", line)
                self.assertNotEqual(line[start], " ", line)

    def test_all_service_release_json(self):
        app, ids = self.fixtures()
        result = self.convox("-a", app, "ps", "--all")
        lines = result.stdout.decode().splitlines()
        self.assertEqual(re.split(r"\s{2,}", lines[0])[:3], ["ID", "NAME", "STATUS"])
        self.assertEqual(len(lines), 6)
        stopped = [l for l in lines if l.startswith(ids["stopped"][:12])]
        self.assertEqual(re.split(r"\s{2,}", stopped[0])[1:4], ["cron", "exited (3)", "RBBB"])

        result = self.convox("ps", "-a", app, "-s", "web")
        self.assertEqual(sorted(l[:12] for l in result.stdout.decode().splitlines()[1:]),
                         sorted(ids[k][:12] for k in ("web", "web2", "job")))
        result = self.convox("ps", "-a", app, "--release", "RBBB")
        self.assertEqual([l[:12] for l in result.stdout.decode().splitlines()[1:]],
                         [ids["worker"][:12]])

        result = self.convox("ps", "-a", app, "--all", "--format", "json")
        data = json.loads(result.stdout.decode())
        by_id = {entry["id"]: entry for entry in data}
        self.assertEqual(set(by_id), set(ids.values()))
        job = by_id[ids["job"]]
        self.assertEqual((job["name"], job["app"], job["release"], job["size"], job["type"],
                          job["status"], job["exit_code"], job["command"]),
                         ("web", app, "RSPZQWVWGOP", None, "process", "running", None,
                          ["sleep", "3602"]))
        self.assertEqual(by_id[ids["web"]]["size"], 256)
        self.assertEqual((by_id[ids["stopped"]]["status"], by_id[ids["stopped"]]["exit_code"]),
                         ("exited (3)", 3))
        started = self.engine.inspect(ids["web"])["State"]["StartedAt"]
        self.assertEqual(by_id[ids["web"]]["started"], started)
        names = [entry["name"] for entry in data]
        self.assertEqual(names, sorted(names))

    def test_compose_fallback(self):
        app = app_name("compose")
        db = self.container(app, "db", compose=True)
        oneoff = self.container(app, "db", ("sleep", "3599"), compose=True,
                                labels={convox.COMPOSE_ONEOFF: "True"})
        result = self.convox("-a", app, "ps", "--format", "json")
        data = {e["id"]: e for e in json.loads(result.stdout.decode())}
        self.assertEqual((data[db]["name"], data[db]["type"], data[db]["release"]),
                         ("db", "service", None))
        self.assertEqual(data[oneoff]["type"], "process")
        table = self.convox("-a", app, "ps").stdout.decode()
        self.assertRegex(table, r"\n%s  db    -        -     " % db[:12])

    def test_info_and_stop(self):
        app, ids = self.fixtures()
        result = self.convox("-a", app, "ps", "info", ids["web"][:12])
        self.assertEqual(result.returncode, 0, result.stderr)
        fields = dict(re.split(r"\s{2,}", line, maxsplit=1)
                      for line in result.stdout.decode().splitlines())
        self.assertEqual(list(fields), ["Id", "App", "Name", "Release", "Size", "Status",
                                        "Started", "Command", "Image"])
        self.assertEqual((fields["Id"], fields["App"], fields["Name"], fields["Release"],
                          fields["Size"], fields["Status"], fields["Command"], fields["Image"]),
                         (ids["web"], app, "web", "RSPZQWVWGOP", "256", "running",
                          "sleep 3600", self.image))

        result = self.convox("-a", app, "ps", "stop", ids["job"][:12])
        self.assertEqual(result.stdout.decode(), "Stopping %s... OK\n" % ids["job"][:12])
        with self.assertRaises(convox.NotFound):  # a one-off is removed once stopped
            self.engine.inspect(ids["job"])
        result = self.convox("-a", app, "ps", "stop", ids["worker"])
        self.assertEqual(result.returncode, 0)
        self.assertFalse(self.engine.inspect(ids["worker"])["State"]["Running"])

        other = app_name("other")
        foreign = self.container(other, "web")
        result = self.convox("-a", app, "ps", "stop", foreign[:12])
        self.assertEqual(result.returncode, 1)
        self.assertOneErrorLine(result)
        self.assertIn('belongs to app "%s"' % other, result.stderr.decode())
        self.assertTrue(self.engine.inspect(foreign)["State"]["Running"])

    def test_inferred_app_lists_apps(self):
        app = app_name("here")
        self.container(app, "web")
        folder = tempfile.mkdtemp(prefix="nosuchapp")
        self.addCleanup(shutil.rmtree, folder)
        result = self.convox("ps", cwd=folder)
        self.assertEqual(result.returncode, 1)
        self.assertOneErrorLine(result)
        message = result.stderr.decode()
        self.assertIn('no processes for app "%s" (from the current directory); apps here: '
                      % os.path.basename(folder).lower(), message)
        self.assertIn(app, message)
        self.assertTrue(message.rstrip().endswith("— use -a APP"))

    def test_one_connection_for_many_containers(self):
        count = 200 if SLOW else 25
        app = app_name("many")
        for index in range(count):
            self.container(app, "web", ("sleep", str(3600 + index)))
        engine = convox.Engine(self.engine.rack, {})
        self.addCleanup(engine.close)
        out = io.StringIO()
        ctx_args = convox.parse_command_line(convox.build_parser(), ["-a", app, "ps"])
        ctx = convox.Context(ctx_args, {"CONVOX_RACK": HARNESS.rack_url}, stdout=out)
        ctx._engine = engine
        self.assertEqual(convox.cmd_ps(ctx), 0)
        self.assertEqual(len(out.getvalue().splitlines()), count + 1)
        self.assertEqual(engine.connections, 1)

    def test_zipapp_and_module_forms(self):
        app, ids = self.fixtures()
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        source = os.path.join(folder, "src")
        os.mkdir(source)
        shutil.copy(CONVOX, source)
        pyz = os.path.join(folder, "convox.pyz")
        subprocess.run([sys.executable, "-m", "zipapp", source, "-o", pyz, "-m",
                        "convox:_zipapp_main"], check=True)
        direct = self.convox("-a", app, "ps", "--format", "json").stdout
        for argv, cwd in (([sys.executable, pyz], HERE), ([sys.executable, "-m", "convox"], HERE),
                          ([CONVOX], HERE)):
            result = subprocess.run(argv + ["-a", app, "ps", "--format", "json"],
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=HARNESS.env(), cwd=cwd,
                                    timeout=60)
            self.assertEqual((result.returncode, result.stdout), (0, direct), argv)
        result = subprocess.run([sys.executable, pyz, "-a", app, "ps", "info", "nope"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=HARNESS.env(), timeout=60)
        self.assertEqual(result.returncode, 1)


# ==========================================================================================
# The real engine: start
# ==========================================================================================

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StartTest(TerminalTestCase):
    """`convox start` end to end: build, services on a network, logs, Ctrl-C."""

    CONVOX_YML = """\
environment:
  - GREETING=hello from the manifest
services:
  web:
    build: .
    port: {port}
    command: httpd -f -v -p {port} -h /www
  worker:
    build:
      path: .
    command: sh -c 'while true; do wget -q -O - http://web:{port}/ && sleep 1; done'
    links:
      - web
"""

    COMPOSE_YML = """\
services:
  web:
    build: .
    ports:
      - "127.0.0.1:{port}:{port}"
    command: ["httpd", "-f", "-v", "-p", "{port}", "-h", "/www"]
  worker:
    build:
      context: .
      dockerfile: Dockerfile
    command: sh -c 'while true; do wget -q -O - http://web:{port}/ && sleep 1; done'
    depends_on:
      - web
"""

    def app_dir(self, manifest_name, manifest, extra=None):
        folder = tempfile.mkdtemp(prefix="convox-start-")
        self.addCleanup(shutil.rmtree, folder, True)
        files = {
            "Dockerfile": "FROM %s\nRUN mkdir /www && echo page-ok > /www/index.html\n"
                          % self.image,
            manifest_name: manifest,
            ".dockerignore": "junk\n",
            "junk": "x" * 1000,
        }
        files.update(extra or {})
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(text)
        return folder

    def check_running_app(self, manifest_name, template):
        port = free_port()
        app = app_name("start%d" % port)
        folder = self.app_dir(manifest_name, template.format(port=port))
        began = time.monotonic()
        session = self.pty("-a", app, "start", cwd=folder)
        # On a terminal each prefix has its colour (SPEC §7); the build lines come first.
        session.expect(r"build\s+\| ", timeout=120)
        session.expect(r"\x1b\[\d+mworker \| \x1b\[0mpage-ok", timeout=120)
        answered = time.monotonic() - began
        # The page is published on the host, the worker reached web by its service name.
        import urllib.request
        with urllib.request.urlopen("http://127.0.0.1:%d/" % port, timeout=10) as page:
            self.assertEqual(page.read(), b"page-ok\n")
        plain = re.sub(r"\x1b\[\d+m", "", session.output.decode("utf-8", "replace"))
        self.assertIn("convox | starting web", plain)
        self.assertRegex(plain, r"web    \| .*response:200")
        containers = {convox.identity(s["Labels"])[1]: s for s in self.processes_of(app)}
        self.assertEqual(sorted(containers), ["web", "worker"])
        releases = set()
        for service, summary in containers.items():
            labels = summary["Labels"]
            self.assertEqual((labels["convox.app"], labels["convox.service"],
                              labels["convox.type"]), (app, service, "service"))
            self.assertRegex(labels["convox.release"], r"^R[A-Z]{10}$")
            releases.add(labels["convox.release"])
            self.assertEqual(summary["Names"], ["/%s-%s" % (app, service)])
        self.assertEqual(len(releases), 1)
        ps = self.convox("-a", app, "ps").stdout.decode()
        self.assertIn("  web  ", ps.replace("web     ", "web  "))
        # Ctrl-C: graceful stop, everything removed, status 0.
        session.send(b"\x03")
        session.expect(r"convox \| (\x1b\[0m)?stopping", timeout=10)
        self.assertEqual(session.wait(timeout=30), 0)
        self.assertEqual(self.processes_of(app), [])
        names = [n["Name"] for n in self.engine.request("GET", "/networks")]
        self.assertNotIn(app, names)
        self.assertEqual(session.attrs(), session.initial_attrs)
        return answered

    def test_convox_yml(self):
        self.check_running_app("convox.yml", self.CONVOX_YML)

    def test_compose_yml(self):
        self.check_running_app("docker-compose.yml", self.COMPOSE_YML)

    def test_command_with_dotenv(self):
        port = free_port()
        app = app_name("cmd%d" % port)
        folder = self.app_dir("convox.yml", self.CONVOX_YML.format(port=port),
                              {".env": "# local settings\nGREETING='from .env'\n"})
        result = self.convox("-a", app, "start", "web", "sh", "-c", "echo $GREETING; exit 4",
                             cwd=folder, timeout=180)
        self.assertEqual(result.returncode, 4, result.stderr)
        self.assertIn(b"from .env\n", result.stdout)
        self.assertEqual(self.processes_of(app), [])
        names = [n["Name"] for n in self.engine.request("GET", "/networks")]
        self.assertNotIn(app, names)

    def test_exit_status_of_services(self):
        app = app_name("exits")
        folder = self.app_dir("convox.yml", """\
services:
  ok:
    image: {image}
    command: sh -c 'echo fine'
  bad:
    image: {image}
    command: sh -c 'sleep 1; echo broken >&2; exit 3'
""".format(image=self.image))
        result = self.convox("-a", app, "start", cwd=folder, timeout=120)
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 3, out + result.stderr.decode())
        self.assertIn("ok     | fine\n", out)
        self.assertIn("bad    | broken\n", out)
        self.assertIn("convox | bad exited with code 3\n", out)
        self.assertIn("convox | ok exited with code 0\n", out)
        self.assertEqual(self.processes_of(app), [])

    def test_syntax_error_names_line(self):
        folder = self.app_dir("convox.yml", "services:\n  web:\n    image: x\n  bad: [\n")
        result = self.convox("-a", app_name("bad"), "start", cwd=folder)
        self.assertEqual(result.returncode, 1)
        self.assertOneErrorLine(result)
        self.assertRegex(result.stderr.decode(), r"^ERROR: convox.yml:4: ")

    def test_required_env(self):
        folder = self.app_dir("convox.yml", "environment:\n  - SECRET\n  - TOKEN\n"
                              "services:\n  web:\n    image: x\n")
        env = HARNESS.env()
        env.pop("SECRET", None)
        env.pop("TOKEN", None)
        result = subprocess.run([sys.executable, CONVOX, "-a", app_name("req"), "start"],
                                cwd=folder, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr.decode(), "ERROR: required env: SECRET, TOKEN\n")

    def test_build_failure(self):
        folder = self.app_dir("convox.yml", "services:\n  web:\n    build: .\n",
                              {"Dockerfile": "FROM %s\nRUN exit 7\n" % self.image})
        app = app_name("buildfail")
        result = self.convox("-a", app, "start", cwd=folder, timeout=120)
        self.assertEqual(result.returncode, 1)
        self.assertOneErrorLine(result)
        self.assertIn("build of web failed", result.stderr.decode())
        self.assertIn("build  | ", result.stdout.decode())
        self.assertEqual(self.processes_of(app), [])


if __name__ == "__main__":
    unittest.main()
