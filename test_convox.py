#!/usr/bin/env python3
"""Tests of convox.py, cheap to expensive: pure functions, the CLI in-process, the real
engine, real terminals.

    python3 test_convox.py                 # everything this machine can run
    python3 test_convox.py -k Demux        # unittest's usual selection

The real-engine tests use the engine convox.py would find (CONVOX_RACK, DOCKER_HOST, the
default sockets).  When none answers and ``dockerd`` is installed (and we are root), a
private one is started for the run, with its own data root and socket, and stopped after.
CONVOX_TEST_REQUIRE_ENGINE=1 turns "no engine" (and a test that needs root or a missing tool)
into a failure instead of a skip (CI sets it).
CONVOX_TEST_SLOW=1 adds the slow group (hundreds of containers, long soaks, and the Swarm
tests, which bring up a Swarm of three private dockerds in network namespaces of their own).
Everything a test creates carries the label convox.test=RUN_ID and is removed at the end.
"""

import argparse
import atexit
import contextlib
import hashlib
import io
import json
import marshal
import os
import pty
import random
import re
import resource
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
import gc
import glob
import threading
import time
import types
import unittest
import http.server
import socketserver
import urllib.parse
import concurrent.futures

HERE = os.path.dirname(os.path.abspath(__file__))
CONVOX = os.path.join(HERE, "convox.py")
sys.path.insert(0, HERE)
import convox  # noqa: E402

RUN_ID = "%x%s" % (os.getpid(), os.urandom(2).hex())
TEST_LABEL = "convox.test"
REQUIRE_ENGINE = os.environ.get("CONVOX_TEST_REQUIRE_ENGINE") == "1"
SLOW = os.environ.get("CONVOX_TEST_SLOW") == "1"
INSTALL_HINT = "apt-get install -y docker.io busybox-static tmux"

# convox.py leaves alone a signal that its parent ignores (nohup; a shell script's
# background job ignores SIGINT).  The clients these tests start must see SIGINT and SIGHUP
# as a person's would, even when the suite itself runs under nohup or in the background.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def app_name(suffix):
    """An app name of this run only, so that parallel runs never meet."""
    return "t%s-%s" % (RUN_ID, suffix)


def limit_memory():
    """In a child before exec: at most 1 GiB of address space, so that a client that reads
    without end (a bug the test is after) fails instead of filling the shared host."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def skip_unless_required(test, message):
    """Skip a test this machine cannot run (not root, a tool missing), except where CI
    requires every test (CONVOX_TEST_REQUIRE_ENGINE=1): there a skip would pass unseen."""
    if REQUIRE_ENGINE:
        test.fail("%s (CONVOX_TEST_REQUIRE_ENGINE=1: required)" % message)
    test.skipTest(message)


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
            sys.stderr.write("test: the real-engine tests cannot run: %s\n" % exc)

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
        if not dockerd:
            raise RuntimeError("no Docker engine answers, and dockerd is not installed — "
                               "install it: " + INSTALL_HINT)
        if os.geteuid() != 0:
            raise RuntimeError("no Docker engine answers, and only root can start a private "
                               "dockerd — run the tests as root, or set DOCKER_HOST to an "
                               "engine's socket")
        self.private_dir = tempfile.mkdtemp(prefix="convox-test-dockerd-")
        os.chmod(self.private_dir, 0o711)  # the ssh tests' user reaches the socket in it
        sock = os.path.join(self.private_dir, "docker.sock")
        log = open(os.path.join(self.private_dir, "dockerd.log"), "wb")
        self.dockerd = subprocess.Popen(
            [dockerd, "--data-root", os.path.join(self.private_dir, "data"),
             "--exec-root", os.path.join(self.private_dir, "exec"),
             "--pidfile", os.path.join(self.private_dir, "dockerd.pid"),
             "-H", "unix://" + sock],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/")
        log.close()
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
        self.image = "convox-test:%s" % RUN_ID
        self.build(self.image, TEST_DOCKERFILE, {"busybox": busybox})

    def build(self, tag, dockerfile, files=None, labels=None):
        """Build an image through the API from a Dockerfile and {name: local path}."""
        return build_image(self.engine, tag, dockerfile, files, labels)

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
            self.engine = None  # once only: the end of the module, or the end of the run
            if self.dockerd is not None:
                self.dockerd.terminate()
                try:
                    self.dockerd.wait(30)
                except subprocess.TimeoutExpired:
                    self.dockerd.kill()
                # dockerd leaves its data root mounted (overlay, netns): unmount, then remove.
                with open("/proc/self/mounts") as handle:
                    mounts = [line.split()[1] for line in handle]
                for mount in sorted((m for m in mounts if m.startswith(self.private_dir)),
                                    reverse=True):
                    subprocess.run(["umount", "-l", mount], stderr=subprocess.DEVNULL,
                                   timeout=30)
                shutil.rmtree(self.private_dir, ignore_errors=True)


TEST_DOCKERFILE = ('FROM scratch\nCOPY busybox /bin/busybox\n'
                   'RUN ["/bin/busybox","--install","-s","/bin"]\n')


def build_image(engine, tag, dockerfile, files=None, labels=None):
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
    for _ in engine.build([buffer.getvalue()], query):
        pass
    return tag


class SwarmCluster:
    """A Swarm of our own: three private dockerds, each in a network namespace of its own,
    joined over a bridge in a fourth ("hub") namespace; one veth reaches the hub from here.

    Nothing touches the host's engine or its networks: addresses come from a private /24
    assigned only inside these namespaces and on our own veth, every name carries a token
    of this run, and ``close`` removes namespaces, links, cgroups and processes on every
    path.  Node 1 is the manager, the others are workers.
    """

    def __init__(self, nodes=3, token=None, folder=None):
        # 6 hex digits: every name of ours carries them (link names have 15 bytes at most).
        self.token = token or "%04x%s" % (os.getpid() & 0xffff, os.urandom(1).hex())
        self.folder = folder or tempfile.mkdtemp(prefix="convox-test-swarm-")
        self.hub = "cvx%s-hub" % self.token
        self.names = ["cvx%s-n%d" % (self.token, i) for i in range(1, nodes + 1)]
        self.link = "cvx%sr" % self.token  # our end of the veth into the hub (<= 15 bytes)
        self.cgroups = ["cvx%s-n%d" % (self.token, i) for i in range(1, nodes + 1)]
        self.prefix = None
        self.addrs = []
        self.procs = []
        self.engines = []
        self.hostnames = ["cvx%s-node%d" % (self.token, i) for i in range(1, nodes + 1)]

    # -- bring-up --------------------------------------------------------------------------

    def start(self, image_tag, dockerfile=TEST_DOCKERFILE, files=None):
        started = time.monotonic()
        with open(os.path.join(self.folder, "state.json"), "w") as handle:
            json.dump({"pid": os.getpid(), "token": self.token, "nodes": len(self.names)},
                      handle)
        try:
            self._network()
            for index in range(len(self.names)):
                self._start_node(index)
            for index in range(len(self.names)):
                self.engines.append(self._await_node(index))
            self._join()
            self._load_image(image_tag, dockerfile, files)
        except BaseException:
            self.close()
            raise
        self.bring_up = time.monotonic() - started

    @staticmethod
    def _ip(*args):
        subprocess.run(["ip"] + list(args), check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=30)

    def _free_prefix(self):
        """A 10.234.N /24 that nothing here routes yet (ours only inside the namespaces)."""
        routes = subprocess.run(["ip", "-4", "route", "show", "table", "all"],
                                stdout=subprocess.PIPE, timeout=30).stdout.decode()
        for _ in range(50):
            prefix = "10.234.%d" % random.randrange(1, 255)
            if prefix + "." not in routes:
                return prefix
        raise RuntimeError("no free 10.234.N.0/24 for the test Swarm")

    def _network(self):
        self.prefix = self._free_prefix()
        for name in [self.hub] + self.names:
            self._ip("netns", "add", name)
        self._ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self.hub, "link", "set", "br0", "up")
        for index, name in enumerate(self.names):
            addr = "%s.%d" % (self.prefix, index + 1)
            self.addrs.append(addr)
            self._ip("-n", self.hub, "link", "add", "v%d" % (index + 1), "type", "veth",
                     "peer", "name", "eth0", "netns", name)
            self._ip("-n", self.hub, "link", "set", "v%d" % (index + 1), "master", "br0", "up")
            self._ip("-n", name, "addr", "add", addr + "/24", "dev", "eth0")
            self._ip("-n", name, "link", "set", "eth0", "up")
            self._ip("-n", name, "link", "set", "lo", "up")
        self._ip("link", "add", self.link, "type", "veth", "peer", "name", "up0",
                 "netns", self.hub)
        self._ip("-n", self.hub, "link", "set", "up0", "master", "br0", "up")
        self._ip("addr", "add", self.prefix + ".254/24", "dev", self.link)
        self._ip("link", "set", self.link, "up")
        route = subprocess.run(["ip", "route", "get", self.addrs[0]], stdout=subprocess.PIPE,
                               timeout=30).stdout.decode()
        if " dev %s " % self.link not in route:
            raise RuntimeError("the route to the test Swarm does not go via %s: %s" %
                               (self.link, route.strip()))

    def _start_node(self, index):
        folder = os.path.join(self.folder, "n%d" % (index + 1))
        os.mkdir(folder)
        config = os.path.join(folder, "daemon.json")
        with open(config, "w") as handle:
            json.dump({
                # Without a key path of its own every node reports the same engine ID.
                "deprecated-key-path": os.path.join(folder, "key.json"),
                "cgroup-parent": "/" + self.cgroups[index],
                "shutdown-timeout": 2,
            }, handle)
        env = dict(os.environ, DOCKER_SERVICE_PREFER_OFFLINE_IMAGE="1")  # no registry here
        env.pop("NOTIFY_SOCKET", None)
        log = open(os.path.join(folder, "dockerd.log"), "wb")
        # `ip netns exec` remounts /sys, and dockerd then finds no devices cgroup: enter
        # the network namespace with nsenter and give dockerd a mount and UTS namespace.
        script = 'hostname "$1" && shift && exec "$@"'
        self.procs.append(subprocess.Popen(
            ["nsenter", "--net=/run/netns/" + self.names[index], "--",
             "unshare", "--mount", "--uts", "--propagation", "private", "--",
             "sh", "-c", script, "sh", self.hostnames[index], shutil.which("dockerd"),
             "--config-file", config,
             "--data-root", os.path.join(folder, "data"),
             "--exec-root", os.path.join(folder, "exec"),
             "--pidfile", os.path.join(folder, "dockerd.pid"),
             "-H", "unix://" + os.path.join(folder, "docker.sock"),
             "-H", "tcp://%s:2375" % self.addrs[index], "--tls=false"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd="/"))
        log.close()

    def socket_url(self, index):
        return "unix://" + os.path.join(self.folder, "n%d" % (index + 1), "docker.sock")

    def tcp_url(self, index):
        return "tcp://%s:2375" % self.addrs[index]

    def _await_node(self, index, timeout=60):
        engine = convox.Engine(convox.parse_rack(self.socket_url(index), {}), {})
        for _ in deadline_loop(timeout, 0.1):
            if self.procs[index].poll() is not None:
                break
            try:
                engine.api_version()
                return engine
            except convox.ConvoxError:
                engine.close()
        raise RuntimeError("node %d of the test Swarm did not start: %s" %
                           (index + 1, self.log_tail(index)))

    def log_tail(self, index):
        with open(os.path.join(self.folder, "n%d" % (index + 1), "dockerd.log"), "rb") as h:
            return h.read()[-1500:].decode("utf-8", "replace")

    def _join(self):
        manager = self.engines[0]
        manager.request("POST", "/swarm/init", body={
            "ListenAddr": "%s:2377" % self.addrs[0], "AdvertiseAddr": self.addrs[0],
            # Overlay subnets from a pool of our own, away from the nodes' /24.
            "DefaultAddrPool": ["10.235.0.0/16"], "SubnetSize": 24})
        token = manager.request("GET", "/swarm")["JoinTokens"]["Worker"]
        for index, engine in enumerate(self.engines[1:], 1):
            engine.request("POST", "/swarm/join", body={
                "ListenAddr": "%s:2377" % self.addrs[index],
                "AdvertiseAddr": self.addrs[index],
                "RemoteAddrs": ["%s:2377" % self.addrs[0]], "JoinToken": token})
        for _ in deadline_loop(60, 0.1):
            nodes = manager.request("GET", "/nodes")
            if len(nodes) == len(self.engines) and all(
                    n["Status"]["State"] == "ready" for n in nodes):
                self.nodes = {n["Description"]["Hostname"]: n for n in nodes}
                return
        raise RuntimeError("the test Swarm's nodes did not all become ready: %r" % nodes)

    def _load_image(self, tag, dockerfile, files):
        """Build once on the manager; the same image (same ID) is loaded onto the others."""
        build_image(self.engines[0], tag, dockerfile, files)
        manager = self.engines[0]
        conn = manager.connect(60)
        conn.request("GET", manager.url("/images/%s/get" % tag))
        archive = conn.getresponse().read()
        conn.close()
        for engine in self.engines[1:]:
            conn = engine.connect(60)
            conn.request("POST", engine.url("/images/load", {"quiet": "1"}), body=archive,
                         headers={"Content-Type": "application/x-tar"})
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status != 200:
                raise RuntimeError("loading the test image onto a node: %d" % response.status)
        self.image = tag

    # -- tear-down -------------------------------------------------------------------------

    @classmethod
    def left_by_killed_runs(cls):
        """The Swarms of runs that were killed (SIGKILL, a lost machine) before they could
        remove them: their folder's state names a process that is gone."""
        pattern = os.path.join(tempfile.gettempdir(), "convox-test-swarm-*", "state.json")
        for path in glob.glob(pattern):
            try:
                with open(path) as handle:
                    state = json.load(handle)
                os.kill(state["pid"], 0)
                continue  # its run is alive (another run of the suite, perhaps)
            except ProcessLookupError:
                yield cls(state["nodes"], state["token"], os.path.dirname(path))
            except (OSError, ValueError, KeyError):
                continue

    def close(self):
        """Stop everything and remove every trace; -> a list of what could not be removed."""
        for engine in self.engines:
            engine.close()
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for _ in range(2):
            for pid in self.processes():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for name in self.names + [self.hub]:
            subprocess.run(["ip", "netns", "del", name], stderr=subprocess.DEVNULL, timeout=30)
        subprocess.run(["ip", "link", "del", self.link], stderr=subprocess.DEVNULL, timeout=30)
        for path in self.cgroup_dirs():
            with contextlib.suppress(OSError):
                os.rmdir(path)
        for mount in sorted(self.mounts(), reverse=True):
            subprocess.run(["umount", "-l", mount], stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)
        return self.leftovers()

    def cgroup_dirs(self):
        """Our cgroup folders, deepest first."""
        found = []
        for controller in glob.glob("/sys/fs/cgroup/*"):
            for name in self.cgroups:
                top = os.path.join(controller, name)
                for root, _, _ in os.walk(top):
                    found.append(root)
        return sorted(found, key=len, reverse=True)

    def processes(self):
        """PIDs of what runs in our cgroups or names our folder (dockerds, containerds,
        shims, and the tasks' own processes)."""
        pids = set(pids_where(lambda words: any(self.folder.encode() in w for w in words)))
        for path in self.cgroup_dirs():
            with contextlib.suppress(OSError):
                with open(os.path.join(path, "cgroup.procs")) as handle:
                    pids.update(int(line) for line in handle if line.strip())
        return sorted(pids - {os.getpid()})

    def mounts(self):
        with open("/proc/self/mounts") as handle:
            return [line.split()[1] for line in handle
                    if line.split()[1].startswith(self.folder) or self.token in line]

    def leftovers(self):
        """What of this Swarm is still there (empty when all is gone)."""
        left = []
        netns = subprocess.run(["ip", "netns", "list"], stdout=subprocess.PIPE,
                               timeout=30).stdout.decode()
        left += ["netns " + n for n in netns.split() if self.token in n]
        links = subprocess.run(["ip", "-o", "link"], stdout=subprocess.PIPE,
                               timeout=30).stdout.decode()
        left += ["link " + line.split(":")[1].strip() for line in links.splitlines()
                 if self.token in line]
        left += ["mount " + m for m in self.mounts()]
        left += ["process %d" % pid for pid in self.processes()]
        left += ["cgroup " + path for path in self.cgroup_dirs()]
        if os.path.exists(self.folder):
            left.append("folder " + self.folder)
        return left

class SwarmHarness:
    """The one test Swarm of the run, started by the first Swarm test, removed at the end."""

    TOOLS = ("ip", "nsenter", "unshare", "dockerd")

    def __init__(self):
        self.cluster = None
        self.problem = None

    def setup(self):
        if self.cluster or self.problem:
            return
        missing = [tool for tool in self.TOOLS if not shutil.which(tool)]
        if os.geteuid() != 0 or missing:
            self.problem = "a test Swarm needs root and %s%s" % (
                ", ".join(self.TOOLS), " (missing: %s)" % ", ".join(missing) if missing else "")
            return
        for stale in SwarmCluster.left_by_killed_runs():
            left = stale.close()
            sys.stderr.write("test: removed the Swarm a killed run left in %s%s\n" % (
                stale.folder, " (still there: %s)" % ", ".join(left) if left else ""))
        busybox = shutil.which("busybox") or "/bin/busybox"
        cluster = SwarmCluster()
        try:
            cluster.start("convox-test:%s" % RUN_ID, files={"busybox": busybox})
        except Exception as exc:  # noqa: BLE001 - reported as the skip/failure reason
            self.problem = "the test Swarm did not come up: %s: %s" % (type(exc).__name__, exc)
            sys.stderr.write("test: %s\n" % self.problem)
            return
        self.cluster = cluster
        atexit.register(self.cleanup)  # also when the run ends in a way that skips the rest

    def cleanup(self):
        """Remove the Swarm; raise when anything of it is left."""
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            left = cluster.close()
            if left:
                raise RuntimeError("the test Swarm left: %s" % ", ".join(left))


HARNESS = Harness()
SWARM = SwarmHarness()


def tearDownModule():
    try:
        SSH.cleanup()
        HARNESS.cleanup()
    finally:
        SWARM.cleanup()


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
        """Create (and start) a labelled fixture container, as start (or Compose) would
        make it, a one-off with kind="process"; it is removed at the end."""
        all_labels = {TEST_LABEL: RUN_ID}
        if compose:
            all_labels.update({convox.COMPOSE_PROJECT: app, convox.COMPOSE_SERVICE: service,
                               convox.COMPOSE_ONEOFF: str(kind == "process")})
        else:
            all_labels.update({convox.LABEL_APP: app, convox.LABEL_SERVICE: service,
                               convox.LABEL_TYPE: kind or "service"})
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
        """The Docker CLI, as an oracle; skipped when it is not installed (unless required)."""
        docker = shutil.which("docker")
        if not docker:
            skip_unless_required(self, "the Docker CLI is not installed (used only as an "
                                       "oracle)")
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
        # Taken before convox starts, so that it cannot already be raw mode.
        self.initial_attrs = self.attrs()
        self.proc = subprocess.Popen(
            [sys.executable, CONVOX] + list(args), stdin=self.slave, stdout=self.slave,
            stderr=self.slave, env=HARNESS.env(**(env or {})), cwd=cwd or HERE,
            preexec_fn=self._controlling_terminal, close_fds=True)

    def _controlling_terminal(self):
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    def set_size(self, rows, cols):
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def resize(self, rows, cols):
        """Resize the terminal, then ask ``stty size`` at the shell until it says so (the
        SIGWINCH and the resize call race the next line); the caller asserts on output."""
        self.set_size(rows, cols)
        size = b"\r\n%d %d\r\n" % (rows, cols)
        for _ in deadline_loop(10, 0.2):
            self.send("stty size\r")
            try:
                self.expect(r"\r\n(\d+ \d+)\r\n", timeout=2)
            except AssertionError:
                continue
            if size in self.output:
                break

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

    def skip_pending(self, quiet=0.3):
        """Read what is on its way, so that the next expect sees only what comes after."""
        while self.read_some(quiet):
            pass
        self._mark = len(self.output)

    def wait(self, timeout=30):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            self.read_some(0.05)
            status = self.proc.poll()
            if status is not None:
                # The pty hands on the last writes a little later (a busy machine can take
                # a while): read until it has been quiet for half a second.
                while self.read_some(0.5):
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

    def test_tls_rule_is_dockers(self):
        """docker/cli: DOCKER_TLS_VERIFY set to anything means verified TLS; DOCKER_TLS
        alone, TLS that does not verify the engine; neither, plain TCP."""
        cases = [({"DOCKER_TLS_VERIFY": value}, ("tls", True, 2376))
                 for value in ("1", "0", "false", "no")]
        cases += [({"DOCKER_TLS": "1"}, ("tls", False, 2376)),
                  ({"DOCKER_TLS": "1", "DOCKER_TLS_VERIFY": "0"}, ("tls", True, 2376)),
                  ({"DOCKER_TLS_VERIFY": "", "DOCKER_TLS": ""}, ("tcp", True, 2375)),
                  ({}, ("tcp", True, 2375))]
        for environ, expected in cases:
            with self.subTest(environ):
                rack = convox.parse_rack("tcp://h", environ)
                self.assertEqual((rack.kind, rack.verify, rack.address[1]), expected)

    def test_malformed(self):
        for url in ("::garbage", "tcp://", "tcp://h:notaport", "tcp://h:99999", "unix://rel",
                    "ftp://x", "garbage"):
            with self.subTest(url=url):
                with self.assertRaises(convox.UsageError) as caught:
                    convox.parse_rack(url, {})
                self.assertIn("malformed rack URL", str(caught.exception))

    def test_ssh_forms(self):
        cases = [
            ("ssh://box", (None, "box", None, "/var/run/docker.sock")),
            ("ssh://ops@box:2222", ("ops", "box", 2222, "/var/run/docker.sock")),
            ("ssh://ops@box/run/podman/podman.sock", ("ops", "box", None,
                                                      "/run/podman/podman.sock")),
            ("SSH://[::1]:22/", (None, "::1", 22, "/var/run/docker.sock")),
        ]
        for url, address in cases:
            with self.subTest(url=url):
                rack = convox.parse_rack(url, {"CONVOX_SSH_COMMAND": "ssh -F cfg"})
                self.assertEqual((rack.kind, rack.address, rack.ssh_command),
                                 ("ssh", address, "ssh -F cfg"))
        tunnel = convox.SshTunnel(convox.parse_rack("ssh://ops@box:2222", {}))
        self.assertEqual(tunnel.destination(), ["-p", "2222", "-l", "ops", "--", "box"])
        refused = [("ssh://ops:pw@box", "password"), ("ssh://box?x=1", "query"),
                   ("ssh://box#top", "fragment"), ("ssh://-oProxyCommand=x", "'-'"),
                   ("ssh://", "malformed"), ("ssh://box:0", "malformed"),
                   ("ssh://box:99999", "malformed"), ("ssh://box/a:b", "malformed"),
                   ("ssh://b ox", "malformed"), ("ssh://[:x", "malformed"),
                   ("ssh://ops@[::1", "malformed")]
        for url, why in refused:
            with self.subTest(url=url):
                with self.assertRaises(convox.UsageError) as caught:
                    convox.parse_rack(url, {})
                self.assertIn(why, str(caught.exception))

    def test_ssh_bridge_command(self):
        """The far side runs the first bridge it has; each passes stdin's end on."""
        import shlex
        words = shlex.split(convox.ssh_bridge_command("/run/my engine.sock"))
        self.assertEqual(words[:2], ["sh", "-c"])
        script = words[2]
        order = [script.index(tool) for tool in (
            "docker -H 'unix:///run/my engine.sock' system dial-stdio",
            "socat -t 86400 STDIO 'UNIX-CONNECT:/run/my engine.sock'",
            "nc -N -U '/run/my engine.sock'", "python3 -c ")]
        self.assertEqual(order, sorted(order))
        self.assertNotIn("\n", script)  # one line, for any login shell

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


class SwarmPartsTest(unittest.TestCase):
    """The pure parts of Swarm racks (SPEC §10): node URLs, identities, the one-off spec."""

    def test_node_rack_defaults(self):
        cases = [
            ("tcp://manager:2375", "tcp://{addr}:2375"),
            ("tcp://10.0.0.1", "tcp://{addr}"),
            ("https://[::1]:2376", "https://{addr}:2376"),
            ("ssh://ops@manager", "ssh://ops@{addr}"),
            ("ssh://ops@manager:2222/run/docker.sock", "ssh://ops@{addr}:2222/run/docker.sock"),
            ("unix:///var/run/docker.sock", "ssh://{addr}"),
            ("/var/run/docker.sock", "ssh://{addr}"),
        ]
        for url, template in cases:
            with self.subTest(url=url):
                self.assertEqual(convox.node_rack_template(url), template)

    def test_node_rack_url(self):
        node = {"ID": "n1d", "Status": {"Addr": "10.1.2.3"},
                "Description": {"Hostname": "box-2"}}
        self.assertEqual(convox.node_rack_url("ssh://ops@{addr}/{hostname}/{id}/{x}", node),
                         "ssh://ops@10.1.2.3/box-2/n1d/{x}")

    def test_service_identity(self):
        convox_labels = {convox.LABEL_APP: "shop", convox.LABEL_SERVICE: "web",
                         convox.LABEL_RELEASE: "R1"}
        cases = [
            ({"Name": "x", "Labels": convox_labels}, ("shop", "web", "R1", "service")),
            ({"Name": "shop_api", "Labels": {convox.STACK_NAMESPACE: "shop"}},
             ("shop", "api", "", "service")),
            ({"Name": "lonely", "Labels": {}}, ("", "", "", "service")),
        ]
        for spec, expected in cases:
            with self.subTest(spec=spec):
                self.assertEqual(convox.service_identity(spec), expected)

    def test_node_labels(self):
        self.assertEqual(convox.parse_node_labels(None), [])
        self.assertEqual(convox.parse_node_labels("a=1, b = x"), [("a", "1"), ("b", "x")])
        for bad in ("", "a", "=1", "a=", "a=1,,b=2"):
            with self.subTest(bad=bad), self.assertRaises(convox.UsageError):
                convox.parse_node_labels(bad)

    def test_one_off_spec(self):
        spec = {
            "Name": "shop-web", "Labels": {convox.LABEL_APP: "shop",
                                           convox.LABEL_SERVICE: "web",
                                           convox.LABEL_RELEASE: "R1"},
            "TaskTemplate": {
                "ContainerSpec": {"Image": "img", "Args": ["web"], "Env": ["A=1"],
                                  "Healthcheck": {"Test": ["CMD", "check"]}},
                "Resources": {"Limits": {"MemoryBytes": 1 << 26}},
                "Placement": {"Constraints": ["node.role==worker"]},
                "Networks": [{"Target": "net1", "Aliases": ["web"]}],
                "RestartPolicy": {"Condition": "any"},
            },
            "Mode": {"Replicated": {"Replicas": 3}},
            "EndpointSpec": {"Mode": "vip", "Ports": [{"TargetPort": 80}]},
        }
        body = convox.swarm_one_off_spec(spec, ["bin/job", "x"], name="shop-web-run-1",
                                         app="shop", service="web", env=["B=2"],
                                         resources={"memory_limit": 128, "memory": 64,
                                                    "cpu": 250, "cpu_limit": None},
                                         node_labels=[("disk", "ssd")])
        task = body["TaskTemplate"]
        container = task["ContainerSpec"]
        self.assertEqual(body["Name"], "shop-web-run-1")
        self.assertEqual(body["Labels"][convox.LABEL_TYPE], "process")
        self.assertEqual(container["Labels"][convox.LABEL_RELEASE], "R1")
        self.assertEqual((container.get("Command"), container["Args"]), (None, ["bin/job", "x"]))
        self.assertEqual(container["Env"], ["A=1", "B=2"])
        self.assertEqual(container["Healthcheck"], {"Test": ["NONE"]})
        self.assertEqual(task["Resources"]["Limits"]["MemoryBytes"], 128 << 20)
        self.assertEqual(task["Resources"]["Reservations"], {"MemoryBytes": 64 << 20,
                                                             "NanoCPUs": 250000000})
        self.assertEqual(task["Placement"]["Constraints"],
                         ["node.role==worker", "node.labels.disk==ssd"])
        self.assertEqual(task["Networks"], [{"Target": "net1", "Aliases": None}])
        self.assertEqual(task["RestartPolicy"]["Condition"], "none")
        self.assertEqual(body["Mode"], {"ReplicatedJob": {"MaxConcurrent": 1,
                                                          "TotalCompletions": 1}})
        self.assertEqual(body["EndpointSpec"], {"Mode": "dnsrr"})  # no ports, no VIP
        self.assertEqual(spec["TaskTemplate"]["Networks"][0]["Aliases"], ["web"])  # a copy
        old = convox.swarm_one_off_spec(spec, ["sleep", "9"], name="n", app="shop",
                                        service="web", entrypoint=False, job=False)
        self.assertEqual(old["Mode"], {"Replicated": {"Replicas": 1}})
        self.assertEqual((old["TaskTemplate"]["ContainerSpec"]["Command"],
                          old["TaskTemplate"]["ContainerSpec"]["Args"]), (["sleep", "9"], []))


class VersionTest(unittest.TestCase):
    def test_negotiation(self):
        self.assertEqual(convox.negotiate_version("1.41"), "1.41")
        self.assertEqual(convox.negotiate_version("1.9"), "1.9")  # numeric, not string order
        self.assertEqual(convox.negotiate_version("1.99"), convox.API_VERSION_MAX)
        self.assertEqual(convox.negotiate_version("1.99", override="1.40"), "1.40")
        self.assertEqual(convox.negotiate_version(None), "1.24")


class PipelinedAnswerTest(unittest.TestCase):
    """The framing of pipelined answers (Engine._answer), as http.client reads it."""

    def answers(self, data):
        engine = convox.Engine(convox.parse_rack("unix:///nowhere.sock", {}), {})
        reader = io.BufferedReader(io.BytesIO(data))
        return lambda: engine._answer(reader, "/v1.41/containers/x/json")

    def test_lengths_chunks_and_the_end_of_the_connection(self):
        answer = self.answers(
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
            b"3;ext=1\r\n{\"m\r\n6\r\n\":\"x\"}\r\n0\r\nTrailer: 1\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n[]"
            b"HTTP/1.0 200 OK\r\n\r\nto the end")
        self.assertEqual(answer(), (200, b'{"a":1}', False))
        self.assertEqual(answer(), (404, b'{"m":"x"}', False))
        self.assertEqual(answer(), (204, b"", False))
        self.assertEqual(answer(), (200, b"[]", True))
        self.assertEqual(answer(), (200, b"to the end", True))
        with self.assertRaises(http.client.RemoteDisconnected):
            answer()

    def test_malformed_answers_are_http_errors(self):
        for data, error in (
                (b"SSH-2.0-OpenSSH\r\n", http.client.BadStatusLine),
                (b"HTTP/1.1 OK\r\n\r\n", http.client.BadStatusLine),
                (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort", http.client.IncompleteRead),
                (b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", http.client.IncompleteRead),
                (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                 http.client.IncompleteRead),
                (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nabc",
                 http.client.IncompleteRead),
                (b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n", http.client.LineTooLong),
                (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n", http.client.HTTPException)):
            with self.assertRaises(error, msg=data[:40]):
                self.answers(data)()

    def test_an_answer_over_the_cap_is_refused(self):
        too_big = convox.CONTROL_BODY_MAX + 1
        for head in (b"Content-Length: %d\r\n\r\n" % too_big,
                     b"Transfer-Encoding: chunked\r\n\r\n%x\r\n" % too_big):
            with self.assertRaisesRegex(convox.EngineError, "more than 64 MiB"):
                self.answers(b"HTTP/1.1 200 OK\r\n" + head + b"x" * 1000)()


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

    def test_image_labels_alone_are_no_identity(self):
        # What a container run by hand from an image `start` built carries (SPEC §3).
        inherited = {"convox.app": "shop", "convox.service": "web", "convox.release": "R1"}
        self.assertEqual(convox.identity(inherited), ("", "", "", "service"))
        self.assertEqual(convox.identity({"com.docker.compose.project": "blog",
                                          "com.docker.compose.service": "db"}),
                         ("", "", "", "service"))
        self.assertEqual(convox.identity(dict(inherited, **{"convox.type": "service"})),
                         ("shop", "web", "R1", "service"))
        self.assertEqual(convox.identity(inherited, own=True), ("shop", "web", "R1", "service"))
        self.assertEqual(convox.identity(dict(inherited, **{
            "com.docker.swarm.task.id": "t1"}))[:2], ("shop", "web"))

    def test_merge_env(self):
        base = ["A=1", "B=2", "C=3"]
        self.assertEqual(convox.merge_env(base, ["B=x", "D=4", "C"]), ["A=1", "B=x", "D=4"])
        self.assertEqual(convox.merge_env(base, []), base)

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

    def test_app_file_must_be_a_small_regular_file(self):
        """A fifo, a link to /dev/zero, a folder or a huge file as .convox/app: one ERROR
        line at once (each used to hang, or to read until memory ran out)."""
        with tempfile.TemporaryDirectory() as folder:
            app_file = os.path.join(folder, ".convox", "app")
            os.makedirs(os.path.dirname(app_file))

            def large():
                with open(app_file, "w") as handle:
                    handle.write("a" * 5000)
            makers = [("fifo", lambda: os.mkfifo(app_file)),
                      ("device", lambda: os.symlink("/dev/zero", app_file)),
                      ("folder", lambda: os.mkdir(app_file)),
                      ("larger than 1024 bytes", large)]
            for expected, make in makers:
                with self.subTest(expected):
                    make()
                    started = time.monotonic()
                    try:
                        result = subprocess.run(
                            [sys.executable, CONVOX, "ps"], cwd=folder, timeout=10,
                            env=client_env("unix:///nowhere.sock"), preexec_fn=limit_memory,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                    except subprocess.TimeoutExpired:
                        self.fail(".convox/app as a %s: no answer within 10 s" % expected)
                    finally:
                        shutil.rmtree(os.path.dirname(app_file))
                        os.makedirs(os.path.dirname(app_file))
                    err = result.stderr.decode()
                    self.assertLess(time.monotonic() - started, 5)
                    self.assertEqual(result.returncode, 1, err)
                    self.assertRegex(err, r"^ERROR: cannot read the app's name from \.convox/"
                                          r"app: it is (a )?%s.* — .*-a APP\n\Z" % expected)


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

    def test_run_flags_are_convox(self):
        # -e is --entrypoint (a boolean whose value is only attached), never --env.
        for words, want in ((["-e=false"], False), (["--entrypoint=false"], False),
                            (["-e=0"], False), (["-e"], True), (["--entrypoint"], True),
                            (["-e=true"], True), (["--no-entrypoint"], False), ([], True)):
            with self.subTest(words=words):
                args = self.parse(["run"] + words + ["web", "ls", "-e"])
                self.assertEqual((args.entrypoint, args.env, args.target, args.command),
                                 (want, None, "web", ["ls", "-e"]))
        args = self.parse(["run", "web", "--env", "A=1", "--env", "B", "--cpu", "250",
                           "--cpu-limit", "500", "--memory", "64", "--memory-limit", "128",
                           "--node-labels", "zone=a,disk=ssd", "x"])
        self.assertEqual((args.env, args.cpu, args.cpu_limit, args.memory, args.memory_limit,
                          args.node_labels),
                         (["A=1", "B"], 250, 500, 64, 128, "zone=a,disk=ssd"))
        self.assertEqual(self.parse(["exec", "-e", "K", "web", "env"]).env, ["K"])

    def test_run_refuses_what_cannot_be_meant(self):
        for words in (["-e=yes"], ["--entrypoint=maybe"], ["--env", "=x"], ["--env="],
                      ["--memory", "0"], ["--memory-limit", "-1"], ["--cpu", "0"],
                      ["--cpu-limit", "half"]):
            with self.subTest(words=words):
                with self.assertRaises(convox.UsageError) as caught:
                    self.parse(["run"] + words + ["web", "ls"])
                self.assertEqual(caught.exception.status, 2)

    def test_help_describes_every_option(self):
        parser = convox.build_parser()
        verbs = parser._subparsers._group_actions[0].choices
        for name, verb in verbs.items():
            for action in verb._actions:
                with self.subTest(verb=name, option=action.option_strings or action.dest):
                    self.assertTrue(action.help and action.help != argparse.SUPPRESS)
        ps_help = verbs["ps"].format_help()
        self.assertIn("info ID", ps_help)
        self.assertIn("stop ID", ps_help)
        run_help = verbs["run"].format_help()
        self.assertIn("-e, --entrypoint[=BOOL]", run_help)
        self.assertNotIn("-e K", run_help)


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


def log_frame(stream, stamp, text):
    """One log entry as the engine frames it without a TTY: STAMP SP text."""
    payload = stamp + b" " + text
    return struct.pack(">BxxxL", stream, len(payload)) + payload


class LogLinesTest(unittest.TestCase):
    """The lines of one process's log stream (SPEC §9), split at every awkward place."""

    S1 = b"2026-12-02T10:00:00.000000001Z"
    S2 = b"2026-12-02T10:00:00.000000002Z"
    S3 = b"2026-12-02T10:00:01.500000000Z"

    def collect(self, lines, pieces):
        out = []
        for piece in pieces:
            out += lines.feed(piece)
        return out + lines.end()

    def test_frames_split_at_every_byte(self):
        data = (log_frame(1, self.S1, b"one\n") + log_frame(2, self.S2, b"two \xff\xfe\n") +
                log_frame(1, self.S3, b"a long line cut") +  # Docker cuts lines at 16 KiB
                log_frame(1, b"2026-12-02T10:00:02.000000000Z", b" here\n") +
                log_frame(2, self.S3, b"last, no newline"))
        want = [(self.S1, 1, b"one"), (self.S2, 2, b"two \xff\xfe"),
                (self.S3, 1, b"a long line cut here"), (self.S3, 2, b"last, no newline")]
        for cut in range(len(data) + 1):
            for second in (cut, min(len(data), cut + 7), min(len(data), cut + 31)):
                pieces = [data[:cut], data[cut:second], data[second:]]
                self.assertEqual(self.collect(convox.LogLines(False), pieces), want,
                                 (cut, second))
        self.assertEqual(self.collect(convox.LogLines(False),
                                      [data[i:i + 1] for i in range(len(data))]), want)

    def test_tty_lines(self):
        data = (self.S1 + b" one\r\n" + self.S2 + b" \x1b[1mtwo\x1b[0m\r\n" + self.S3 +
                b" tail")
        want = [(self.S1, 1, b"one"), (self.S2, 1, b"\x1b[1mtwo\x1b[0m"),
                (self.S3, 1, b"tail")]
        for cut in range(len(data) + 1):
            self.assertEqual(self.collect(convox.LogLines(True), [data[:cut], data[cut:]]),
                             want, cut)

    def test_tty_cut_line_joined(self):
        # Docker cuts lines over 16 KiB; in a raw stream the pieces run together, each after
        # a stamp of its own.
        piece = b"y" * 16384
        data = (self.S1 + b" " + piece + self.S2 + b" " + piece + self.S3 + b" end\r\n" +
                self.S3 + b" short 2026-12-02T10:00:00.000000001Z kept\r\n")
        self.assertEqual(self.collect(convox.LogLines(True), [data]),
                         [(self.S1, 1, piece * 2 + b"end"),
                          (self.S3, 1, b"short 2026-12-02T10:00:00.000000001Z kept")])

    def test_a_line_that_never_ends_costs_bounded_memory(self):
        piece = b"z" * 16384
        data = b"".join(log_frame(1, self.S1, piece) for _ in range(200))  # 3.1 MiB, no end
        lines = convox.LogLines(False)
        out = lines.feed(data)
        self.assertTrue(out and all(len(text) <= convox.LOG_LINE_MAX + len(piece)
                                    for _, _, text in out), [len(t) for _, _, t in out])
        self.assertLessEqual(sum(len(p) for p in lines.cut[1][1]), convox.LOG_LINE_MAX)
        out += lines.end()
        self.assertEqual(b"".join(text for _, _, text in out), piece * 200)
        tty = convox.LogLines(True)
        out = tty.feed(self.S1 + b" " + b"z" * (3 * convox.LOG_LINE_MAX))
        self.assertLessEqual(len(tty.rest), convox.LOG_LINE_MAX)
        self.assertEqual(b"".join(t for _, _, t in out + tty.end()),
                         b"z" * (3 * convox.LOG_LINE_MAX))

    def test_other_stamp_forms(self):
        # Podman writes whole seconds; an engine may write an offset.
        data = (log_frame(1, b"2026-12-02T10:00:00Z", b"podman\n") +
                log_frame(1, b"2026-12-02T12:00:00.5+02:00", b"offset\n") +
                log_frame(1, b"garbage", b"no stamp\n"))
        self.assertEqual(self.collect(convox.LogLines(False), [data]), [
            (b"2026-12-02T10:00:00.000000000Z", 1, b"podman"),
            (b"2026-12-02T10:00:00.500000000Z", 1, b"offset"),
            (b"2026-12-02T10:00:00.500000000Z", 1, b"garbage no stamp")])

    def test_engine_error_frame(self):
        data = log_frame(1, self.S1, b"before\n") + struct.pack(">BxxxL", 3, 4) + b"boom"
        with self.assertRaises(convox.StreamError) as caught:
            convox.LogLines(False).feed(data)
        self.assertIn("boom", str(caught.exception))

    def test_stamps(self):
        self.assertEqual(convox.canonical_stamp(b"2026-12-02T10:00:00.1-01:30"),
                         b"2026-12-02T11:30:00.100000000Z")
        self.assertIsNone(convox.canonical_stamp(b"10:00"))
        self.assertEqual(convox.stamp_seconds(b"1970-01-02T00:00:00.000000123Z"),
                         "86400.000000123")


class LogMergeTest(unittest.TestCase):
    """The ordered merge: by stamp, a bounded hold, each process's own order kept."""

    def merge(self, hold=0.25):
        out = []
        merge = convox.LogMerge(lambda source, entries: out.extend(
            (source, text) for _, _, text in entries), hold)
        return merge, out

    def test_orders_by_stamp_once_every_source_has_a_line(self):
        merge, out = self.merge()
        for source in "ab":
            merge.join(source)
        merge.add("a", [(b"2", 1, b"a2"), (b"4", 1, b"a4")], now=0)
        self.assertAlmostEqual(merge.release(now=0.1), 0.15)
        self.assertEqual(out, [])   # b may still have an earlier line
        merge.add("b", [(b"1", 1, b"b1"), (b"3", 1, b"b3")], now=0.1)
        merge.release(now=0.1)
        self.assertEqual(out, [("b", b"b1"), ("a", b"a2"), ("b", b"b3")])  # a4 waits for b
        merge.release(now=0.25)
        self.assertEqual(out[-1], ("a", b"a4"))  # held for its 250 ms, then it goes

    def test_a_process_keeps_its_order(self):
        merge, out = self.merge()
        for source in "ab":
            merge.join(source)
        merge.add("a", [(b"5", 1, b"a-first"), (b"3", 2, b"a-second")], now=0)
        merge.add("b", [(b"4", 1, b"b")], now=0)
        merge.release(now=1)
        self.assertEqual([text for _, text in out], [b"b", b"a-first", b"a-second"])

    def test_one_source_goes_at_once_and_ended_sources_wait_for_nobody(self):
        merge, out = self.merge()
        merge.join("a")
        merge.add("a", [(b"1", 1, b"x")], now=0)
        self.assertEqual(out, [("a", b"x")])
        merge.join("b")
        merge.add("b", [(b"2", 1, b"y")], now=0)
        self.assertEqual(merge.release(now=0), 0.25)
        merge.leave("a")
        self.assertIsNone(merge.release(now=0))
        self.assertEqual(out, [("a", b"x"), ("b", b"y")])


class LogSourceTest(unittest.TestCase):
    def test_resume_skips_what_was_read(self):
        source = convox.LogSource(convox.Process({"Id": "c" * 64, "Config": {"Labels": {
            convox.LABEL_SERVICE: "web"}}}))
        first = [(b"1", 1, b"a"), (b"2", 1, b"b"), (b"2", 1, b"c")]
        self.assertEqual(source.take(first), first)
        self.assertEqual((source.last, source.repeats), (b"2", 2))
        source.skip = (source.last, source.repeats)   # as LogFollower.add on a resume
        again = [(b"2", 1, b"b")]
        self.assertEqual(source.take(again), [])
        self.assertEqual(source.take([(b"2", 1, b"c"), (b"2", 1, b"d"), (b"3", 1, b"e")]),
                         [(b"2", 1, b"d"), (b"3", 1, b"e")])
        self.assertEqual((source.last, source.repeats), (b"3", 1))


class WhenTest(unittest.TestCase):
    NOW = 1764669600.0  # 2025-12-02T10:00:00Z

    def when(self, text):
        return convox.parse_when(text, "--since", now=self.NOW)

    def test_forms(self):
        for text, want in (("90s", self.NOW - 90), ("10m", self.NOW - 600),
                           ("1h30m", self.NOW - 5400), ("2d", self.NOW - 172800),
                           ("1.5h", self.NOW - 5400), ("500ms", self.NOW - 0.5),
                           ("1764669600", self.NOW), ("1764669600.25", self.NOW + 0.25),
                           ("2025-12-02T10:00:00Z", self.NOW),
                           ("2025-12-02T11:00:00+01:00", self.NOW),
                           ("2025-12-02T10:00:00.123456789Z", self.NOW + 0.123456789)):
            self.assertAlmostEqual(float(self.when(text)), want, places=6, msg=text)
        self.assertEqual(self.when("2025-12-02T10:00:00.123456789Z"),
                         "1764669600.123456789")
        for text, fields in (("2025-12-02", (2025, 12, 2, 0, 0, 0)),
                             ("2025-12-02T10", (2025, 12, 2, 10, 0, 0)),
                             ("2025-12-02T10:05", (2025, 12, 2, 10, 5, 0)),
                             ("2025-12-02T10:05:07", (2025, 12, 2, 10, 5, 7))):
            local = time.mktime(fields + (0, 0, -1))
            self.assertEqual(float(self.when(text)), local, text)

    def test_malformed(self):
        for text in ("yesterday", "10x", "-5m", "2025-02-30", "2025-12-02T25:00", "",
                     "1h 30m"):
            with self.assertRaises(convox.UsageError, msg=text):
                self.when(text)

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


class JsonMessagesTest(unittest.TestCase):
    """The engine's streams of JSON messages (build): one a line, or one over several."""

    def messages(self, data):
        return list(convox._json_messages(io.BytesIO(data)))

    def test_messages(self):
        self.assertEqual(self.messages(b'{"stream": "a"}\n{"stream": "b"}{"c": 1}\n\n  \n'),
                         [{"stream": "a"}, {"stream": "b"}, {"c": 1}])
        self.assertEqual(self.messages(b'{"stream":\n "split"\n}\n{"d": 2}\n[3]\n7\n'),
                         [{"stream": "split"}, {"d": 2}])
        self.assertEqual(self.messages(b'{"last": "with no newline"}'),
                         [{"last": "with no newline"}])

    def test_hostile_messages(self):
        """A message over 200,000 lines that never ends parses in linear time; one over
        64 MiB is an error, not all of memory."""
        started = time.monotonic()
        self.assertEqual(self.messages(b"[" + b"1,\n" * 200000), [])
        self.assertLess(time.monotonic() - started, 5)
        with self.assertRaisesRegex(convox.EngineError, "more than 64 MiB"):
            self.messages(b"[" + b"1," * (33 << 20))


class LogPrinterTest(unittest.TestCase):
    """start's SERVICE | line printer: whole lines, and a line with no end in sight is
    printed in LINE_MAX pieces instead of held (in time and memory linear in its size)."""

    def printed(self, *writes):
        with tempfile.TemporaryFile() as handle:
            printer = convox.LogPrinter(["web"], handle.fileno())
            for data in writes:
                printer.write("web", data, ("web", 1))
            printer.flush("web", ("web", 1))
            handle.seek(0)
            return handle.read().split(b"\n")[:-1]

    def test_whole_lines_and_pieces(self):
        line = bytes(random.Random(8).choice(b"abc") for _ in range(3 * convox.LINE_MAX + 5))
        chunks = [line[k:k + 1000] for k in range(0, len(line), 1000)]
        lines = self.printed(b"first\r\nsec", b"ond\n", *(chunks + [b"\nlast"]))
        self.assertEqual(lines[:2], [b"web    | first", b"web    | second"])
        pieces = [l[len(b"web    | "):] for l in lines[2:-1]]
        self.assertEqual([len(p) for p in pieces], [convox.LINE_MAX] * 3 + [5])
        self.assertEqual(b"".join(pieces), line)
        self.assertEqual(lines[-1], b"web    | last")

    def test_pieces_end_between_characters(self):
        line = ("x" + "é€😀" * 40000).encode("utf-8")
        lines = self.printed(*[line[k:k + 777] for k in range(0, len(line), 777)])
        self.assertGreater(len(lines), 3)
        text = "".join(l.decode("utf-8")[len("web    | "):] for l in lines)  # each decodes
        self.assertEqual(text.encode("utf-8"), line)

    def test_long_line_in_linear_time(self):
        """64 MiB without a newline: under 3 s (a quadratic buffer took 13 s for 40 MB and
        never finished 100 MB)."""
        script = ("import os, sys, time; sys.path.insert(0, %r); import convox\n"
                  "p = convox.LogPrinter(['web'], os.open(os.devnull, os.O_WRONLY))\n"
                  "t = time.monotonic(); chunk = b'x' * 65536\n"
                  "for _ in range(1024): p.write('web', chunk, ('web', 1))\n"
                  "p.flush('web', ('web', 1)); print(time.monotonic() - t)\n" % HERE)
        try:
            result = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                    timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("64 MiB without a newline took over 20 s")
        self.assertLess(float(result.stdout), 3.0)


# ==========================================================================================
# Pure functions: the manifest (YAML subset, .env, interpolation, models, build context)
# ==========================================================================================

# ---------------------------------------------------------------- realistic YAML documents

CONVOX_STOREFRONT = """\
# convox.yml for the storefront
environment:
  - RAILS_ENV=production
  - SECRET_KEY_BASE        # required
  - WEB_CONCURRENCY=2
resources:
  database:
    type: postgres
    options:
      storage: 100
services:
  web:
    build: .
    command: bundle exec puma -C config/puma.rb
    domain: ${HOST}
    environment:
      - PORT=3000
    health:
      grace: 10
      path: /health
      interval: 5
    port: http:3000
    resources:
      - database
    scale:
      count: 1-3
      cpu: 256
      memory: 512
      targets:
        cpu: 70
  worker:
    build: .
    command: bundle exec sidekiq -q default -q mailers
    resources: [database]
    scale:
      memory: 1024
    links:
      - redis
  redis:
    image: redis:7-alpine
    internal: true
    port: 6379
"""

CONVOX_STOREFRONT_VALUE = {
    'environment': ['RAILS_ENV=production', 'SECRET_KEY_BASE', 'WEB_CONCURRENCY=2'],
    'resources': {'database': {'type': 'postgres', 'options': {'storage': 100}}},
    'services': {
        'web': {
            'build': '.',
            'command': 'bundle exec puma -C config/puma.rb',
            'domain': '${HOST}',
            'environment': ['PORT=3000'],
            'health': {'grace': 10, 'path': '/health', 'interval': 5},
            'port': 'http:3000',
            'resources': ['database'],
            'scale': {'count': '1-3', 'cpu': 256, 'memory': 512, 'targets': {'cpu': 70}},
        },
        'worker': {
            'build': '.',
            'command': 'bundle exec sidekiq -q default -q mailers',
            'resources': ['database'],
            'scale': {'memory': 1024},
            'links': ['redis'],
        },
        'redis': {'image': 'redis:7-alpine', 'internal': True, 'port': 6379},
    },
}

CONVOX_API = """\
services:
  api:
    build:
      path: ./api
      manifest: Dockerfile.prod
    command: ["node", "server.js", "--port", "4000"]
    port: https:4000
    volumes:
      - /var/cache/app
      - data:/data
      - ./config:/app/config
    environment:
      - "NODE_OPTIONS=--max-old-space-size=460"
      - 'GREETING=hello world'
    sticky: false
    termination:
      grace: 45
timers:
  cleanup:
    command: bin/cleanup
    schedule: "*/15 * * * ?"
    service: api
balancers:
  custom:
    service: api
    ports:
      5000: 3001
"""

CONVOX_API_VALUE = {
    'services': {'api': {
        'build': {'path': './api', 'manifest': 'Dockerfile.prod'},
        'command': ['node', 'server.js', '--port', '4000'],
        'port': 'https:4000',
        'volumes': ['/var/cache/app', 'data:/data', './config:/app/config'],
        'environment': ['NODE_OPTIONS=--max-old-space-size=460', 'GREETING=hello world'],
        'sticky': False,
        'termination': {'grace': 45},
    }},
    'timers': {'cleanup': {'command': 'bin/cleanup', 'schedule': '*/15 * * * ?', 'service': 'api'}},
    'balancers': {'custom': {'service': 'api', 'ports': {5000: 3001}}},
}

COMPOSE_FULL = """\
version: "3.9"

services:
  web:
    build:
      context: .
      dockerfile: docker/Dockerfile.dev
      args:
        - NODE_ENV=development
        - BUILD_NUMBER
    image: "myorg/web:dev"
    ports:
      - "3000:3000"
      - "127.0.0.1:9229:9229"
      - 8080
      - "5353:53/udp"
      - target: 443
        published: 8443
        protocol: tcp
        mode: host
    depends_on:
      db:
        condition: service_healthy
      cache:
        condition: service_started
    env_file:
      - .env.web
    environment:
      DATABASE_URL: postgres://app:app@db:5432/app
      DEBUG: "true"
      WORKERS: 4
      EMPTY:
    volumes:
      - .:/usr/src/app
      - node_modules:/usr/src/app/node_modules
      - type: bind
        source: ./logs
        target: /var/log/app
        read_only: true
    mem_limit: 512m
  db:
    image: postgres:15.3
    environment:
      - POSTGRES_USER=app
      - POSTGRES_PASSWORD=app
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U app"]
      interval: 5s
      timeout: 3s
      retries: 5
    volumes:
      - pgdata:/var/lib/postgresql/data
  cache:
    image: redis:7
    command: redis-server --appendonly yes
volumes:
  pgdata: {}
  node_modules:
"""

COMPOSE_FULL_VALUE = {
    'version': '3.9',
    'services': {
        'web': {
            'build': {'context': '.', 'dockerfile': 'docker/Dockerfile.dev',
                      'args': ['NODE_ENV=development', 'BUILD_NUMBER']},
            'image': 'myorg/web:dev',
            'ports': ['3000:3000', '127.0.0.1:9229:9229', 8080, '5353:53/udp',
                      {'target': 443, 'published': 8443, 'protocol': 'tcp', 'mode': 'host'}],
            'depends_on': {'db': {'condition': 'service_healthy'},
                           'cache': {'condition': 'service_started'}},
            'env_file': ['.env.web'],
            'environment': {'DATABASE_URL': 'postgres://app:app@db:5432/app', 'DEBUG': 'true',
                            'WORKERS': 4, 'EMPTY': None},
            'volumes': ['.:/usr/src/app', 'node_modules:/usr/src/app/node_modules',
                        {'type': 'bind', 'source': './logs', 'target': '/var/log/app',
                         'read_only': True}],
            'mem_limit': '512m',
        },
        'db': {
            'image': 'postgres:15.3',
            'environment': ['POSTGRES_USER=app', 'POSTGRES_PASSWORD=app'],
            'healthcheck': {'test': ['CMD-SHELL', 'pg_isready -U app'], 'interval': '5s',
                            'timeout': '3s', 'retries': 5},
            'volumes': ['pgdata:/var/lib/postgresql/data'],
        },
        'cache': {'image': 'redis:7', 'command': 'redis-server --appendonly yes'},
    },
    'volumes': {'pgdata': {}, 'node_modules': None},
}

COMPOSE_BLOCKS = """\
services:   # the app
  migrate:
    image: app:latest   # built elsewhere
    entrypoint: ["/bin/sh", "-c"]
    command:
      - |
        set -e
        bin/rails db:migrate
        bin/rails db:seed
    labels:
      com.example.team: "platform"
      com.example.tier: backend
  # a comment between services, at a shallower indent
  nginx:
    image: nginx:1.25
    command: >-
      nginx -g
      'daemon off;'
    ports: [ "80:80", "443:443" ]
    volumes: [ "./nginx.conf:/etc/nginx/nginx.conf:ro" ]
    labels: [ "traefik.enable=true", "traefik.http.routers.web.rule=Host(`example.com`)" ]
    extra_hosts: {"host.docker.internal": "host-gateway"}
"""

COMPOSE_BLOCKS_VALUE = {'services': {
    'migrate': {
        'image': 'app:latest',
        'entrypoint': ['/bin/sh', '-c'],
        'command': ['set -e\nbin/rails db:migrate\nbin/rails db:seed\n'],
        'labels': {'com.example.team': 'platform', 'com.example.tier': 'backend'},
    },
    'nginx': {
        'image': 'nginx:1.25',
        'command': "nginx -g 'daemon off;'",
        'ports': ['80:80', '443:443'],
        'volumes': ['./nginx.conf:/etc/nginx/nginx.conf:ro'],
        'labels': ['traefik.enable=true', 'traefik.http.routers.web.rule=Host(`example.com`)'],
        'extra_hosts': {'host.docker.internal': 'host-gateway'},
    },
}}

COMPOSE_FLAT_LISTS = """\
services:
  app:
    build: ./app
    links:
    - db:database
    - cache
    ports:
    - 8000:8000
    environment:
    - PYTHONUNBUFFERED=1
    - DJANGO_SETTINGS_MODULE=app.settings.dev
    entrypoint: /docker-entrypoint.sh --wait-for db:5432
  db:
    image: mysql:8
    command: --default-authentication-plugin=mysql_native_password
    restart: unless-stopped
  cache:
    image: memcached
"""

COMPOSE_FLAT_LISTS_VALUE = {'services': {
    'app': {
        'build': './app',
        'links': ['db:database', 'cache'],
        'ports': ['8000:8000'],
        'environment': ['PYTHONUNBUFFERED=1', 'DJANGO_SETTINGS_MODULE=app.settings.dev'],
        'entrypoint': '/docker-entrypoint.sh --wait-for db:5432',
    },
    'db': {'image': 'mysql:8', 'command': '--default-authentication-plugin=mysql_native_password',
           'restart': 'unless-stopped'},
    'cache': {'image': 'memcached'},
}}

QUOTED_AND_SCALARS = """\
---
"services":
  'worker':
    image: busybox
    command: ["sh", "-c", "while true; do echo \\"tick\\"; sleep 1; done"]
    environment:
      A: ~
      B: null
      C: ""
      D: 'it''s'
      E: 0o755
      F: 0x1F
      G: 1.5e3
      H: .inf
      I: -.Inf
      J: yes
      K: "yes"
      L: 010
"""

QUOTED_AND_SCALARS_VALUE = {'services': {'worker': {
    'image': 'busybox',
    'command': ['sh', '-c', 'while true; do echo "tick"; sleep 1; done'],
    'environment': {'A': None, 'B': None, 'C': '', 'D': "it's", 'E': 493, 'F': 31, 'G': 1500.0,
                    'H': float('inf'), 'I': float('-inf'), 'J': 'yes', 'K': 'yes', 'L': 10},
}}}

COMPOSE_DEPLOY = """\
services:
  api:
    image: api
    deploy:
      resources:
        limits:
          cpus: '0.50'
          memory: 256M
        reservations:
          devices:
            - driver: nvidia
              count: 1
              capabilities: [gpu]
"""

COMPOSE_DEPLOY_VALUE = {'services': {'api': {'image': 'api', 'deploy': {'resources': {
    'limits': {'cpus': '0.50', 'memory': '256M'},
    'reservations': {'devices': [{'driver': 'nvidia', 'count': 1, 'capabilities': ['gpu']}]},
}}}}}

COMPOSE_MULTILINE_FLOW = """\
services:
  job:
    image: alpine
    command: [
      "sh", "-c",
      "echo start && sleep 5"   # wait a bit
    ]
    environment: {
      LEVEL: debug,
      RETRIES: 3,
    }
    configs:
      - source: app_config
        target: /etc/app.conf
configs:
  app_config:
    content: |+
      key=value

"""

COMPOSE_MULTILINE_FLOW_VALUE = {
    'services': {'job': {
        'image': 'alpine',
        'command': ['sh', '-c', 'echo start && sleep 5'],
        'environment': {'LEVEL': 'debug', 'RETRIES': 3},
        'configs': [{'source': 'app_config', 'target': '/etc/app.conf'}],
    }},
    'configs': {'app_config': {'content': 'key=value\n\n'}},
}

TOP_LEVEL_SEQUENCE = """\
- name: first
  tags: [a, b]
- name: second
  nested:
    - - 1
      - 2
    - - 3
-   wide: indent
    after: dash
- just a string
- "quoted: with colon"
- key with spaces: value with spaces
-
  - under an empty dash
"""

TOP_LEVEL_SEQUENCE_VALUE = [
    {'name': 'first', 'tags': ['a', 'b']},
    {'name': 'second', 'nested': [[1, 2], [3]]},
    {'wide': 'indent', 'after': 'dash'},
    'just a string',
    'quoted: with colon',
    {'key with spaces': 'value with spaces'},
    ['under an empty dash'],
]

CRLF_DOC = 'services:\r\n  web:\r\n    image: nginx\r\n    port: 80\r\n'
CRLF_DOC_VALUE = {'services': {'web': {'image': 'nginx', 'port': 80}}}

COMPOSE_DNS = """\
services:
  dns:
    image: coredns/coredns
    hostname:\tdns-local
    ports:
      - "[::1]:5353:53/udp"
      - published: "8053"
        target: 53
        host_ip: 127.0.0.1
    command: ["-conf", "/etc/coredns/Corefile"]
    sysctls:
      net.ipv4.ip_unprivileged_port_start: 0
"""

COMPOSE_DNS_VALUE = {'services': {'dns': {
    'image': 'coredns/coredns',
    'hostname': 'dns-local',
    'ports': ['[::1]:5353:53/udp', {'published': '8053', 'target': 53, 'host_ip': '127.0.0.1'}],
    'command': ['-conf', '/etc/coredns/Corefile'],
    'sysctls': {'net.ipv4.ip_unprivileged_port_start': 0},
}}}

CONVOX_HASHES = """\
environment:
  - DATABASE_URL=postgres://u:p@host:5432/db?sslmode=require#frag
  - COLOR=#ff0000
services:
  web:
    image: "nginx:latest"
    command: echo "costs $$5" # comment
    agent: false
    labels:
      convox.com/team: web
"""

CONVOX_HASHES_VALUE = {
    'environment': ['DATABASE_URL=postgres://u:p@host:5432/db?sslmode=require#frag', 'COLOR=#ff0000'],
    'services': {'web': {'image': 'nginx:latest', 'command': 'echo "costs $$5"', 'agent': False,
                         'labels': {'convox.com/team': 'web'}}},
}

DOCUMENTS = [
    ('convox storefront', CONVOX_STOREFRONT, CONVOX_STOREFRONT_VALUE),
    ('convox api', CONVOX_API, CONVOX_API_VALUE),
    ('compose full', COMPOSE_FULL, COMPOSE_FULL_VALUE),
    ('compose blocks', COMPOSE_BLOCKS, COMPOSE_BLOCKS_VALUE),
    ('compose flat lists', COMPOSE_FLAT_LISTS, COMPOSE_FLAT_LISTS_VALUE),
    ('quoted and scalars', QUOTED_AND_SCALARS, QUOTED_AND_SCALARS_VALUE),
    ('compose deploy', COMPOSE_DEPLOY, COMPOSE_DEPLOY_VALUE),
    ('compose multi-line flow', COMPOSE_MULTILINE_FLOW, COMPOSE_MULTILINE_FLOW_VALUE),
    ('top-level sequence', TOP_LEVEL_SEQUENCE, TOP_LEVEL_SEQUENCE_VALUE),
    ('CRLF', CRLF_DOC, CRLF_DOC_VALUE),
    ('compose dns', COMPOSE_DNS, COMPOSE_DNS_VALUE),
    ('convox hashes', CONVOX_HASHES, CONVOX_HASHES_VALUE),
    ('empty', '', None),
    ('comments only', '# nothing here\n\n   # still nothing\n', None),
    ('marker only', '---\n# empty document\n', None),
    ('top-level scalar', 'just text\n', 'just text'),
]

# (document, expected line, text the message must contain)
REJECTED = [
    ('a: 1\nb: *base\n', 2, 'unknown alias *base — define &base before using it'),
    ('a:\n  - *x\n', 2, 'unknown alias *x'),
    ('a: [1, *x]\n', 1, 'unknown alias *x'),
    ('a: &x [*x]\n', 1, 'unknown alias *x'),  # an anchor's value cannot contain itself
    ('a: &x 1\nb: &y *x\n', 2, 'cannot follow &y'),  # yaml-test-suite SR86
    ('a: &x 1\n&y *x : 2\n', 2, 'on mapping keys'),  # SU74
    ('a: 1\nb:\n  <<: 5\n', 3, 'merge key (<<) takes a mapping'),
    ('a: &x [1]\nb:\n  <<: *x\n', 3, 'merge key (<<) takes a mapping'),
    ('a: &x {k: 1}\nb:\n  <<: *x\n  <<: *x\n', 4, "duplicate key '<<'"),
    ('- &a k: v\n', 1, 'anchor before a key'),
    ('a: &x {k: 1}\nb: {*x : 1}\n', 2, 'collections as mapping keys'),
    ('a: !Ref x\n', 1, 'tags other than the core ones'),
    ('a:\n  b: !reset []\n', 2, 'tags other than the core ones'),
    ('a: [!!binary x]\n', 1, 'tags other than the core ones'),
    ('a: !!int x\n', 1, 'does not fit its tag !!int'),
    ('a: [!!map [1]]\n', 1, 'does not fit its tag !!map'),
    ('a: 1\n---\nb: 2\n', 2, 'second document'),
    ('a: 1\n...\n', 2, "'...'"),
    ('a:\n\tb: 1\n', 2, 'tabs'),
    ('a:\n  b: 1\n\t  c: 2\n', 3, 'tabs'),
    ('a:\n    b: 1\n  c: 2\n', 3, 'bad indentation'),
    ('services:\n  web:\n    image: x\n     port: 3\n', 4, 'bad indentation'),
    ('- a\n - b\n', 2, 'bad indentation'),
    ('a: "never closed\nb: 2\n', 1, 'unterminated quoted string'),
    ("x: 1\ny: 'never closed\n", 2, 'unterminated quoted string'),
    ('a: 1\nb: 2\na: 3\n', 3, "duplicate key 'a'"),
    ('services:\n  web:\n    image: a\n    image: b\n', 4, "duplicate key 'image'"),
    ('a: {x: 1,\n  x: 2}\n', 2, "duplicate key 'x'"),
    ('? complex\n: value\n', 1, 'complex keys'),
    ('a: b: c\n', 1, 'quote values'),
    ('a: value # comment\n  continued here\n', 2, 'after a comment'),
    ('key: word1\n#  xxx\n  word2\n', 3, 'after a comment'),  # 8XDJ
    ('a: value\n  b: c\n', 2, 'bad indentation'),
    ('a: "one\ntwo"\n', 1, 'unterminated quoted string'),  # DK95: not deeper than its key
    ('a: [1, 2\nb: 3\n', 2, "missing?"),
    ('a: {x: 1\n', 1, "unclosed '{'"),
    ('%YAML 1.2\n---\na: 1\n', 1, 'directives'),
    ('a: - b\n', 1, 'same line'),
    ('a: "x" y\n', 1, 'after the closing quote'),
    ('a: |x\n  t\n', 1, 'block scalar header'),
    ('a: "\\q"\n', 1, 'invalid escape'),
    ('a: 1\n- b\n', 2, 'list item'),
    ('a: @x\n', 1, "cannot start with '@'"),
    ('list:\n  - a\nkey:value\n', 3, 'space after'),
    ('timers:\n  t:\n    schedule: */5 * * * *\n', 3, "starting with '*' must be quoted"),
]

# (document, expected value of key "a")
BLOCK_SCALARS = [
    ('a: |\n  one\n  two\n\n\nb: 1\n', 'one\ntwo\n'),
    ('a: |-\n  one\n  two\n\n\nb: 1\n', 'one\ntwo'),
    ('a: |+\n  one\n  two\n\n\nb: 1\n', 'one\ntwo\n\n\n'),
    ('a: >\n  one\n  two\n\n  three\n\n\nb: 1\n', 'one two\nthree\n'),
    ('a: >-\n  one\n  two\n\n\n', 'one two'),
    ('a: >+\n  one\n  two\n\n', 'one two\n\n'),
    ('a: >\n  text\n    indented\n    more\n  back\n', 'text\n  indented\n  more\nback\n'),
    ('a: |\n    deeper\n  # not a comment\n', None),  # second line is less indented: see below
    ('a: |2\n    two extra\n  base\n', '  two extra\nbase\n'),
    ('a: |-2\n    x\n', '  x'),
    ('a: |\n\n  after blank\n', '\nafter blank\n'),
    ('a: |\n  keep  trailing spaces  \n', 'keep  trailing spaces  \n'),
    ('a: |\n  no final newline', 'no final newline'),
    ('a: |\nb: 1\n', ''),
    ('a: | # comment on the header\n  x\n', 'x\n'),
    ('a: >\n  para one\n  continues\n\n\n  para two\n', 'para one continues\n\npara two\n'),
    ('a:\n  - |\n    in a list\n  - >-\n    folded\n    item\n', ['in a list\n', 'folded item']),
]

# Anchors, aliases and merge keys as real compose files write them (document -> value).
ANCHORS = [
    ('x-common: &common\n  image: app\n  environment:\n    A: 1\nservices:\n'
     '  web:\n    <<: *common\n    command: web\n  worker:\n    <<: *common\n'
     '    image: other\n',
     {'x-common': {'image': 'app', 'environment': {'A': 1}},
      'services': {'web': {'image': 'app', 'environment': {'A': 1}, 'command': 'web'},
                   'worker': {'image': 'other', 'environment': {'A': 1}}}}),
    # <<: [*a, *b]: the earlier mapping wins; keys given here win over both, before or after.
    ('a: &a {x: 1, y: 1}\nb: &b {y: 2, z: 2, w: 2}\nc:\n  w: 3\n  <<: [*a, *b]\n',
     {'a': {'x': 1, 'y': 1}, 'b': {'y': 2, 'z': 2, 'w': 2}, 'c': {'w': 3, 'x': 1, 'y': 1, 'z': 2}}),
    ('a: &a {x: 1}\nc:\n  <<:\n    - *a\n    - {x: 2, y: 2}\n  y: 3\n',
     {'a': {'x': 1}, 'c': {'x': 1, 'y': 3}}),
    ('a: &a {x: 1}\nc: {<<: *a, y: 2}\n', {'a': {'x': 1}, 'c': {'x': 1, 'y': 2}}),
    ('"<<": 1\n', {'<<': 1}),  # a quoted "<<" is an ordinary key
    # yaml-test-suite 3GZX: an anchor may be defined again; aliases take the latest.
    ('first: &anchor Foo\nsecond: *anchor\noverride: &anchor Bar\nreuse: *anchor\n',
     {'first': 'Foo', 'second': 'Foo', 'override': 'Bar', 'reuse': 'Bar'}),
    ('a: &anchor\nb: *anchor\n', {'a': None, 'b': None}),  # 6KGN: anchor on an empty value
    ('env: &env\n  - A=1\n  - B=2\nother: *env # comment\n',
     {'env': ['A=1', 'B=2'], 'other': ['A=1', 'B=2']}),
    ('list:\n  - &item\n    k: v\n  - *item\n  - &n 3\n  - [*n, &m 4, *m]\n',
     {'list': [{'k': 'v'}, {'k': 'v'}, 3, [3, 4, 4]]}),
    ('a: &x\n- 1\nb: *x\n', {'a': [1], 'b': [1]}),
    ('healthcheck: &hc\n  test: ["CMD", "true"]\n  interval: 5s\nservices:\n  db:\n'
     '    healthcheck: *hc\n',
     {'healthcheck': {'test': ['CMD', 'true'], 'interval': '5s'},
      'services': {'db': {'healthcheck': {'test': ['CMD', 'true'], 'interval': '5s'}}}}),
]

# yaml-test-suite cases (github.com/yaml/yaml-test-suite), in our own words: (id, document,
# value, or None when the document must be refused).
YAML_SUITE = [
    ('A984', 'a: b\n c\nd:\n e\n  f\n', {'a': 'b c', 'd': 'e f'}),
    ('36F6', 'plain: a\n b\n\n c\n', {'plain': 'a b\nc'}),
    ('9YRD', 'a\nb  \n  c\nd\n\ne\n', 'a b c d\ne'),
    ('HS5T', 'first\n\n second \n\tthird\n', 'first\nsecond third'),
    ('seq', '- long\n  value\n- next\n', ['long value', 'next']),
    ('DK95', 'foo: "bar\n  \tbaz"\n', {'foo': 'bar baz'}),
    ('DK95', 'foo: "bar\n \t \t baz \t \t "\n', {'foo': 'bar baz \t \t '}),
    ('quoted', "a: 'one\n\n  two'\nb: \"x\\\n  y\"\n", {'a': 'one\ntwo', 'b': 'xy'}),
    ('flow', 'a: [one\n  two, three]\n', {'a': ['one two', 'three']}),
    ('flow', 'a: ["one\n  two"]\n', {'a': ['one two']}),
    ('compose config', 'web:\n  command:\n    - -c\n    - echo a long line that was wrapped\n'
                       '      onto two\n  environment:\n    FOO: a long value\n      continued\n'
                       '    BAR: "quoted and\n      wrapped"\n',
     {'web': {'command': ['-c', 'echo a long line that was wrapped onto two'],
              'environment': {'FOO': 'a long value continued', 'BAR': 'quoted and wrapped'}}}),
    ('G5U8', '- [-, -]\n', None),
    ('CVW2', '[ a, b, c,#invalid\n]\n', None),
    ('5LLU', 'block scalar: >\n \n  \n   \n invalid\n', None),
    ('S98Z', 'empty block scalar: >\n \n  \n   \n # comment\n', None),
    ('W9L4', 'block scalar: |\n     \n  more spaces at the beginning\n  are invalid\n', None),
    ('Y79Y', 'foo: |\n\t\nbar: 1\n', None),
    ('Y79Y', 'foo: |\n \t\nbar: 1\n', {'foo': '\t\n', 'bar': 1}),
    ('8XDJ', 'key: word1\n#  xxx\n  word2\n', None),
    ('SR86', 'key1: &a value\nkey2: &b *a\n', None),
]

# plain or quoted scalar text -> exact value (type checked too)
SCALARS = [
    ('', None), ('~', None), ('null', None), ('Null', None), ('NULL', None),
    ('true', True), ('True', True), ('TRUE', True), ('false', False), ('False', False),
    ('FALSE', False), ('tRue', 'tRue'), ('yes', 'yes'), ('no', 'no'), ('on', 'on'), ('off', 'off'),
    ('0', 0), ('42', 42), ('-17', -17), ('+5', 5), ('007', 7), ('0o17', 15), ('0x1f', 31),
    ('0xFF', 255), ('0b101', '0b101'), ('1_000', '1_000'),
    ('1.5', 1.5), ('-0.25', -0.25), ('.5', 0.5), ('1.', 1.0), ('1e3', 1000.0), ('2.5E-1', 0.25),
    ('.inf', float('inf')), ('+.INF', float('inf')), ('-.Inf', float('-inf')),
    ('8080:80', '8080:80'), ('12:30', '12:30'), ('1.2.3', '1.2.3'), ('v1', 'v1'),
    ('"42"', '42'), ("'true'", 'true'), ('"null"', 'null'), ("''", ''), ('""', ''),
    ('"a\\tb\\nc"', 'a\tb\nc'), ('"\\x41\\u00e9\\U0001F600"', 'A\u00e9\U0001F600'),
    ('"\\"quoted\\" \\\\ back"', '"quoted" \\ back'), ("'it''s'", "it's"),
    ("'no \\n escapes'", 'no \\n escapes'), ('hello world', 'hello world'),
    ('http://x.io:80/a#b', 'http://x.io:80/a#b'), ('value # comment', 'value'),
    ('-dash', '-dash'), ('a,b', 'a,b'), ('[1, "2", [x]]', [1, '2', ['x']]),
    ('{a: 1, "b c": [true], d: }', {'a': 1, 'b c': [True], 'd': None}), ('[]', []), ('{}', {}),
    ('{x, y: 1}', {'x': None, 'y': 1}), ('[a, b, ]', ['a', 'b']), ('["x" , y]', ['x', 'y']),
    ('{"k":1}', {'k': 1}),
    # core-schema tags (YAML 1.2 §10.3): the value as tagged
    ('!!str 0x1F', '0x1F'), ('!!str yes # c', 'yes'), ('!!str', ''), ('!!int "3"', 3),
    ('!!float 1', 1.0), ('!!bool true', True), ('!!null ~', None),
    ('[!!str 1, !!null , !!bool "true"]', ['1', None, True]), ('!!map {a: 1}', {'a': 1}),
    ('!!seq [1]', [1]),
]


class YamlDocumentTest(unittest.TestCase):
    def test_documents(self):
        for label, text, expected in DOCUMENTS:
            with self.subTest(label):
                self.assertEqual(convox.parse_yaml(text, 'test.yml'), expected)

    def test_nan(self):
        value = convox.parse_yaml('a: .nan\nb: .NaN\n', 'f.yml')
        self.assertTrue(value['a'] != value['a'] and value['b'] != value['b'])

    def test_rejected(self):
        for text, line, fragment in REJECTED:
            with self.subTest(text):
                with self.assertRaises(convox.ManifestError) as caught:
                    convox.parse_yaml(text, 'convox.yml')
                message = str(caught.exception)
                self.assertTrue(message.startswith('convox.yml:%d: ' % line), message)
                self.assertIn(fragment, message)

    def test_anchors_aliases_and_merge_keys(self):
        for text, expected in ANCHORS:
            with self.subTest(text):
                self.assertEqual(convox.parse_yaml(text, 'f.yml'), expected)

    def test_alias_bomb_is_an_error(self):
        # "Billion laughs": nine levels of ten aliases stand for 10**9 strings.
        lines = ['a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]']
        for level in range(1, 10):
            lines.append('a%d: &a%d [%s]' % (level, level, ', '.join(['*a%d' % (level - 1)] * 10)))
        began = time.monotonic()
        with self.assertRaises(convox.ManifestError) as caught:
            convox.parse_yaml('\n'.join(lines) + '\n', 'compose.yaml')
        self.assertLess(time.monotonic() - began, 1.0)
        self.assertEqual(str(caught.exception),
                         'compose.yaml:5: aliases expand this file to more than 100000 values — '
                         'an alias bomb? write the values out instead')
        # The same with merge keys and block style.
        lines = ['b0: &b0 {%s}' % ', '.join('k%d: v' % k for k in range(10))]
        for level in range(1, 12):
            lines.append('b%d: &b%d' % (level, level))
            lines.extend('  k%d:\n    <<: *b%d' % (k, level - 1) for k in range(10))
        with self.assertRaises(convox.ManifestError) as caught:
            convox.parse_yaml('\n'.join(lines) + '\n', 'compose.yaml')
        self.assertIn('alias bomb', str(caught.exception))

    def test_yaml_test_suite(self):
        for case, text, expected in YAML_SUITE:
            with self.subTest(case, text=text):
                if expected is None:
                    with self.assertRaises(convox.ManifestError) as caught:
                        convox.parse_yaml(text, 'f.yml')
                    self.assertRegex(str(caught.exception), r'^f\.yml:\d+: ')
                else:
                    self.assertEqual(convox.parse_yaml(text, 'f.yml'), expected)

    def test_block_scalars(self):
        for text, expected in BLOCK_SCALARS:
            if expected is None:
                continue
            with self.subTest(text):
                self.assertEqual(convox.parse_yaml(text, 'f.yml')['a'], expected)

    def test_block_scalar_ends_at_less_indented_line(self):
        with self.assertRaises(convox.ManifestError) as caught:
            convox.parse_yaml('a: |\n    deeper\n  shallower\n', 'f.yml')
        self.assertTrue(str(caught.exception).startswith('f.yml:3: bad indentation'))

    def test_scalars(self):
        for text, expected in SCALARS:
            with self.subTest(text):
                value = convox.parse_yaml('v: ' + text + '\n', 'f.yml')['v']
                self.assertEqual((type(value), value), (type(expected), expected))

    def test_keys_resolve_like_values(self):
        self.assertEqual(convox.parse_yaml('1: a\n"1": b\nnull: c\non: d\n', 'f.yml'),
                         {1: 'a', '1': 'b', None: 'c', 'on': 'd'})

    def test_bom_and_leading_marker(self):
        self.assertEqual(convox.parse_yaml('\ufeff--- # start\na: 1\n', 'f.yml'), {'a': 1})


# ---------------------------------------------------------------- .env and interpolation

class EnvFileTest(unittest.TestCase):
    def test_parse(self):
        text = ('# comment\n'
                '\n'
                'PLAIN=value\n'
                'SPACED =  padded value   \n'
                'export EXPORTED=yes\n'
                "SINGLE='literal $HOME \\n # not a comment'\n"
                'DOUBLE="line1\\nline2 \\"q\\""  # comment\n'
                'TRAILING=abc # comment\n'
                'HASH=abc#def\n'
                'EMPTY=\n'
                'EQUALS=a=b=c\n'
                'MULTI="first\n'
                'second"\n'
                'dotted.key=1\n')
        self.assertEqual(convox.parse_env_file(text, '.env'), {
            'PLAIN': 'value', 'SPACED': 'padded value', 'EXPORTED': 'yes',
            'SINGLE': 'literal $HOME \\n # not a comment', 'DOUBLE': 'line1\nline2 "q"',
            'TRAILING': 'abc', 'HASH': 'abc#def', 'EMPTY': '', 'EQUALS': 'a=b=c',
            'MULTI': 'first\nsecond', 'dotted.key': '1',
        })

    def test_errors(self):
        for text, line, fragment in [
                ('A=1\nnot a pair\n', 2, "cannot contain a space ('not a pair')"),
                ('A=1\nlol$wut\n', 2, "unexpected character '$' in variable name 'lol$wut'"),
                ('A="unterminated\nB=2\n', 1, 'unterminated quoted value for A — add the closing "'),
                ('A=1\n\nB="${X:?needs X}"\n', 3, 'required variable X is missing a value: needs X')]:
            with self.subTest(text):
                with self.assertRaises(convox.ManifestError) as caught:
                    convox.parse_env_file(text, '.env')
                self.assertTrue(str(caught.exception).startswith('.env:%d: ' % line))
                self.assertIn(fragment, str(caught.exception))

    # compose-go's dotenv tests (dotenv/godotenv_test.go, parser_test.go and fixtures), in our
    # own words: (one .env text, key, expected value).
    COMPOSE_GO_LINES = [
        ('NAME=value', 'NAME', 'value'), ('NAME =value', 'NAME', 'value'),
        ('NAME= value', 'NAME', 'value'), ('NAME="value"', 'NAME', 'value'),
        ("NAME='value'", 'NAME', 'value'), ('NAME="say \\"hi\\""', 'NAME', 'say "hi"'),
        ('NAME="\\"all\\""', 'NAME', '"all"'), ('NAME="\'in\'"', 'NAME', "'in'"),
        ('A: 1', 'A', '1'), ('A: x=y', 'A', 'x=y'), ('A=1:B', 'A', '1:B'),
        ('export A=2', 'A', '2'), ("export B='\\n'", 'B', '\\n'),
        ('export exportA=2', 'exportA', '2'), ('exportA=2', 'exportA', '2'),
        ('export_A =2', 'export_A', '2'), ('export.A= 2', 'export.A', '2'),
        ('export\tA=2', 'A', '2'), ('  export A=2', 'A', '2'), ('\texport A=2', 'A', '2'),
        ('export A="export B"', 'A', 'export B'),
        ('A="one\\ntwo"', 'A', 'one\ntwo'), ('A=a\\tb', 'A', 'a\\tb'), ('A="a\\tb"', 'A', 'a\tb'),
        ('K="1\\a2\\b3\\f4\\n5\\r6\\t7\\v8\\\\9\\0123"', 'K', '1\a2\b3\f4\n5\r6\t7\v8\\9S'),
        ('A.B=x', 'A.B', 'x'), ('A=x=', 'A', 'x='), ('A=x ', 'A', 'x'),
        ('A=x # note', 'A', 'x'), ('A=x #note', 'A', 'x'), ('A=x #', 'A', 'x'),
        ('A=1#not-a-comment', 'A', '1#not-a-comment'), ('A="x#y"', 'A', 'x#y'),
        ('A="x#y"#', 'A', 'x#y'), ('A="x#y" # note', 'A', 'x#y'), ("A='x#y' # note", 'A', 'x#y'),
        ('A="x#y#z" # note', 'A', 'x#y#z'),
        ('A="x\\n\\ y\\az"', 'A', 'x\n\\ y\az'), ('A="x\\\\\\n\\ y\\az"', 'A', 'x\\\n\\ y\az'),
        ('A="x\\\\r\\ y"', 'A', 'x\\r\\ y'), ('A="x\\ny\\\\"', 'A', 'x\ny\\'),
        (' A =value', 'A', 'value'), ('   A=value', 'A', 'value'), ('\tA=value', 'A', 'value'),
        ('K="\\0123"', 'K', 'S'), ('K="\\x07"', 'K', '\\x07'), ('K="\\u12e4"', 'K', '\\u12e4'),
        ("K='Let\\'s go!'", 'K', "Let's go!"), ('A = "phrase with spaces"', 'A', 'phrase with spaces'),
        ('A = phrase with è', 'A', 'phrase with è'), ('456 = ABC', '456', 'ABC'),
        ('A[1]=c', 'A[1]', 'c'), ('árvíz-TŰRŐ=tükör', 'árvíz-TŰRŐ', 'tükör'),
        ('A="line one\nline two"', 'A', 'line one\nline two'),
        ("A = 'first\nsecond\nthird'", 'A', 'first\nsecond\nthird'),
        ('\ufeffA=1', 'A', '1'), ('A=1\r\nB=2\r\n', 'B', '2'),
        ('FOO="bar" B=1', 'B', '1'),
    ]

    def test_compose_go_lines(self):
        for text, key, expected in self.COMPOSE_GO_LINES:
            with self.subTest(text):
                self.assertEqual(convox.parse_env_file(text, '.env').get(key), expected)

    def test_ignored_lines(self):
        for text in ['\n', '\r\n', '\t\t ', '# comment', '\t # comment']:
            with self.subTest(text):
                self.assertEqual(convox.parse_env_file(text, '.env'), {})

    def test_unterminated_quotes(self):
        for text in ['K="', 'K="value', 'K="value\\"', "K=\"value'", "K='", "K='value",
                     "K='value\\'", "K='value\"", 'K="value\\']:
            with self.subTest(text):
                with self.assertRaises(convox.ManifestError) as caught:
                    convox.parse_env_file(text, '.env')
                self.assertIn('unterminated quoted value for K', str(caught.exception))

    def test_bare_keys_come_from_the_environment(self):
        text = 'foo=bar\nFROM_ENV\nbar=baz\nNOT_SET\nLAST'
        self.assertEqual(convox.parse_env_file(text, '.env', {'FROM_ENV': 'v', 'LAST': 'l'}),
                         {'foo': 'bar', 'FROM_ENV': 'v', 'bar': 'baz', 'LAST': 'l'})

    def test_expansion(self):
        cases = [
            ('FOO=test\nBAR=$FOO', {}, {'FOO': 'test', 'BAR': 'test'}),
            ('FOO=test\nBAR=${FOO}bar', {}, {'FOO': 'test', 'BAR': 'testbar'}),
            ('BAR=$FOO', {}, {'BAR': ''}),
            ('FOO=test\nBAR="quote $FOO"', {}, {'FOO': 'test', 'BAR': 'quote test'}),
            ("BAR='quote $FOO'", {}, {'BAR': 'quote $FOO'}),
            ('FOO="foo\\$BAR"', {}, {'FOO': 'foo$BAR'}),
            ('FOO="foo\\${BAR}"', {}, {'FOO': 'foo${BAR}'}),
            ('FOO=test\nBAR="foo\\${FOO} ${FOO}"', {}, {'FOO': 'test', 'BAR': 'foo${FOO} test'}),
            ('TEST=$ME', {'ME': 'YES'}, {'TEST': 'YES'}),
            ('URL=postgres://${USER}@db/${DB:-app}', {'USER': 'ann'},
             {'URL': 'postgres://ann@db/app'}),
            # fixtures/substitutions.env: earlier lines, and the environment before them
            ('A=1\nB=${A}\nC=$B\nD=${A}_${B}\nE=${NOT_DEFINED}', {},
             {'A': '1', 'B': '1', 'C': '1', 'D': '1_1', 'E': ''}),
            ('A=1\nB=${A}\nC=$B\nD=${A}_${B}\nE=${NOT_DEFINED}', {'A': '5'},
             {'A': '1', 'B': '5', 'C': '5', 'D': '5_5', 'E': ''}),
            ('A=${A:-1}\nB=${A}\nC=$B\nD=${A}_${B}', {'A': '5'},
             {'A': '5', 'B': '5', 'C': '5', 'D': '5_5'}),
            ('A=${A:-1}\nB=${A}\nC=$B\nD=${A}_${B}', {},
             {'A': '1', 'B': '1', 'C': '1', 'D': '1_1'}),
            ('TEST_URLS="tcp://a:3333\ntcp://a:443"', {}, {'TEST_URLS': 'tcp://a:3333\ntcp://a:443'}),
        ]
        for text, environ, expected in cases:
            with self.subTest(text):
                self.assertEqual(convox.parse_env_file(text, '.env', environ), expected)

    def test_unterminated_quote_is_linear(self):
        # 20,000 lines after an opening quote that never closes: one scan, not one per line
        # (the line-by-line retry took over 300 s).
        text = 'A="never closed\n' + 'KEY=value\n' * 20000
        began = time.monotonic()
        with self.assertRaises(convox.ManifestError) as caught:
            convox.parse_env_file(text, '.env')
        self.assertLess(time.monotonic() - began, 1.0)
        self.assertTrue(str(caught.exception).startswith('.env:1: unterminated quoted value for A'))
        began = time.monotonic()
        self.assertEqual(len(convox.parse_env_file('K%d="v\nw"\n' * 20000 % tuple(range(20000)),
                                                   '.env')), 20000)
        self.assertLess(time.monotonic() - began, 2.0)


class InterpolateTest(unittest.TestCase):
    VARS = {'NAME': 'web', 'EMPTY': '', 'PORT': '3000'}

    def run_case(self, text, **kwargs):
        return convox.interpolate(text, self.VARS, 'docker-compose.yml', **kwargs)

    def test_table(self):
        cases = [
            ('${NAME}', 'web'), ('$NAME', 'web'), ('pre-$NAME-post', 'pre-web-post'),
            ('$$NAME', '$NAME'), ('$${NAME}', '${NAME}'), ('cost: $$5', 'cost: $5'),
            ('${EMPTY:-dflt}', 'dflt'), ('${EMPTY-dflt}', ''), ('${UNSET-dflt}', 'dflt'),
            ('${UNSET:-dflt}', 'dflt'), ('${NAME:-dflt}', 'web'), ('${NAME:+alt}', 'alt'),
            ('${EMPTY:+alt}', ''), ('${EMPTY+alt}', 'alt'), ('${UNSET:-${PORT}}', '3000'),
            ('$1 and $ alone $', '$1 and $ alone $'), ('no vars', 'no vars'),
            ('${NAME:?must be set}', 'web'),
        ]
        for text, expected in cases:
            with self.subTest(text):
                self.assertEqual(self.run_case(text), (expected, []))

    def test_missing_names(self):
        value = {'$A': ['x${B}', '${A}$C', 1, None, True], 'k': {'n': '$B'}}
        self.assertEqual(convox.interpolate(value, {}, 'f.yml'),
                         ({'': ['x', '', 1, None, True], 'k': {'n': ''}}, ['A', 'B', 'C']))

    def test_required_errors(self):
        for text, fragment in [('${UNSET:?set UNSET first}', 'UNSET is missing a value: set UNSET first'),
                               ('${EMPTY:?}', 'EMPTY is missing a value'),
                               ('${UNSET?no}', 'UNSET is missing a value: no')]:
            with self.subTest(text):
                with self.assertRaises(convox.ManifestError) as caught:
                    self.run_case(text)
                self.assertIn(fragment, str(caught.exception))
        self.assertEqual(self.run_case('${EMPTY?never}'), ('', []))

    def test_malformed(self):
        for text in ['${NAME', '${}', '${1abc}', 'x ${bad name}']:
            with self.subTest(text):
                with self.assertRaises(convox.ManifestError) as caught:
                    self.run_case(text)
                self.assertTrue(str(caught.exception).startswith('docker-compose.yml: '))

    def test_deep_nesting_is_an_error(self):
        """${A:-${A:-...}} 100,000 deep: a ManifestError at once, not a RecursionError."""
        depth = 100000
        started = time.monotonic()
        with self.assertRaises(convox.ManifestError) as caught:
            self.run_case('${UNSET:-' * depth + 'x' + '}' * depth)
        self.assertLess(time.monotonic() - started, 2)
        self.assertIn('nested more than %d deep' % convox.INTERPOLATION_DEPTH,
                      str(caught.exception))
        nested = '${UNSET:-' * convox.INTERPOLATION_DEPTH + 'x' + '}' * convox.INTERPOLATION_DEPTH
        self.assertEqual(self.run_case(nested), ('x', []))

    def test_braces_only(self):
        self.assertEqual(self.run_case('sh -c "echo $HOME $$ ${NAME}"', braces_only=True),
                         ('sh -c "echo $HOME $$ web"', []))

    def test_convox_rule(self):
        # Convox replaces each ${...} (to the first "}") by the variable of that name or by
        # nothing: no operators, so a compose-style default is not applied.
        cases = [('${NAME}', 'web', []), ('${NAME:-x}', '', ['NAME:-x']), ('a${UNSET}b', 'ab', ['UNSET']),
                 ('${EMPTY}', '', []), ('${NAME', '${NAME', []), ('x ${} y', 'x  y', ['']),
                 ('{"a": "${PORT}"}', '{"a": "3000"}', [])]
        for text, expected, missing in cases:
            with self.subTest(text):
                self.assertEqual(self.run_case(text, braces_only=True), (expected, missing))

    # compose-go's template tests (template/template_test.go), in our own words.
    COMPOSE_VARS = {'FOO': 'first', 'BAR': '', 'JSON': '{"json":2}'}
    COMPOSE_GO = [
        ('$${foo}', '${foo}'), ('foo', 'foo'), ('a $ string', 'a $ string'),
        ('^REGEX$', '^REGEX$'), ('$}', '$}'), ('$', '$'), ('$FOO-bar', 'first-bar'),
        ('This ${missing} var', 'This  var'), ('This ${BAR} var', 'This  var'),
        ('This $FOO var', 'This first var'), ('This ${FOO} var', 'This first var'),
        ('ok ${missing:-def}', 'ok def'), ('ok ${missing-def}', 'ok def'),
        ('${A:+${A},}B', 'B'), ('${A:-${B}}', ''), ('ok ${BAR:-def}', 'ok def'),
        ('ok ${FOO:-def}', 'ok first'), ('ok ${BAR-def}', 'ok '),
        ('ok ${UNSET_VAR:+presence_value}', 'ok '), ('ok ${UNSET_VAR+presence_value}', 'ok '),
        ('ok ${FOO:+presence_value}', 'ok presence_value'),
        ('ok ${FOO+presence_value}', 'ok presence_value'),
        ('ok ${BAR+presence_value}', 'ok presence_value'), ('ok ${BAR:+presence_value}', 'ok '),
        ('ok ${BAR:-/non:-alphanumeric}', 'ok /non:-alphanumeric'),
        ('-ok ${BAR:-defaultValue}', '-ok defaultValue'), ('+ok ${UNSET:-${BAR-defaultValue}}', '+ok '),
        ('-ok ${FOO:-defaultValue}', '-ok first'), (':-ok ${UNSET-defaultValue}', ':-ok defaultValue'),
        (':-ok ${BAR-defaultValue}', ':-ok '), (':?ok ${BAR-defaultValue}', ':?ok '),
        (':?ok ${BAR:-defaultValue}', ':?ok defaultValue'), (':+ok ${BAR:-defaultValue}', ':+ok defaultValue'),
        ('+ok ${BAR-defaultValue}', '+ok '), ('?ok ${BAR:-defaultValue}', '?ok defaultValue'),
        ('ok ${UNSET_VAR-$FOO}', 'ok first'), ('ok ${UNSET_VAR-${FOO}}', 'ok first'),
        ('ok ${UNSET_VAR-${FOO} ${FOO}}', 'ok first first'), ('ok ${BAR:-$FOO}', 'ok first'),
        ('ok ${BAR:-${FOO}}', 'ok first'), ('ok ${BAR:-${FOO} ${FOO}}', 'ok first first'),
        ('ok ${BAR+$FOO}', 'ok first'), ('ok ${BAR+$FOO ${FOO:+second}}', 'ok first second'),
        ('ok ${FOO:?err}', 'ok first'), ('ok ${FOO?err}', 'ok first'), ('ok ${BAR?err}', 'ok '),
        ('${UNSET_VAR-myerror?msg}', 'myerror?msg'), ('${FOO?bar-baz}', 'first'),
        ('${BAR:-default_value_for_empty_var}', 'default_value_for_empty_var'),
        ('${UNSET_VAR-default_value_for_unset_var}', 'default_value_for_unset_var'),
        ('ok ${SUBDOMAIN:-redis}.${FOO:?}', 'ok redis.first'),
        ('ok ${missing:-{"json":1}}', 'ok {"json":1}'), ('ok ${missing-{"json":1}}', 'ok {"json":1}'),
        ('ok ${JSON:-{"json":1}}', 'ok {"json":2}'), ('ok ${JSON-{"json":1}}', 'ok {"json":2}'),
        ('${FOO:-{"a":{"b":1}}} tail}', 'first tail}'),
    ]

    def test_compose_go_templates(self):
        for text, expected in self.COMPOSE_GO:
            with self.subTest(text):
                self.assertEqual(convox.interpolate(text, self.COMPOSE_VARS, 'c.yml')[0], expected)

    def test_compose_go_errors(self):
        for text, message in [
                ('not ok ${UNSET_VAR:?Mandatory Variable Unset}',
                 'required variable UNSET_VAR is missing a value: Mandatory Variable Unset'),
                ('not ok ${BAR:?Mandatory Variable Empty}',
                 'required variable BAR is missing a value: Mandatory Variable Empty'),
                ('not ok ${UNSET_VAR:?}', 'required variable UNSET_VAR is missing a value'),
                ('not ok ${UNSET_VAR?}', 'required variable UNSET_VAR is missing a value'),
                ('not ok ${UNSET_VAR:?Mandatory Variable ${FOO}}',
                 'required variable UNSET_VAR is missing a value: Mandatory Variable first'),
                ('not ok ${UNSET_VAR?Mandatory Variable ${FOO}}',
                 'required variable UNSET_VAR is missing a value: Mandatory Variable first'),
                ('${', 'unterminated'), ('${}', 'invalid interpolation'),
                ('${ }', 'invalid interpolation'), ('${ foo}', 'invalid interpolation'),
                ('${foo }', 'invalid interpolation'), ('${foo!}', 'invalid interpolation')]:
            with self.subTest(text):
                with self.assertRaises(convox.ManifestError) as caught:
                    convox.interpolate(text, self.COMPOSE_VARS, 'c.yml')
                self.assertTrue(str(caught.exception).startswith('c.yml: '))
                self.assertIn(message, str(caught.exception))
        # a lazy message: ${A?${B}} with A set never looks at B
        self.assertEqual(convox.interpolate('${A?${B}}', {'A': 'value'}, 'c.yml'), ('value', []))


# ---------------------------------------------------------------- load_manifest

CONVOX_APP = """\
environment:
  - SECRET_KEY            # required
  - API_TOKEN             # required
  - RAILS_ENV=production
  - LOG_LEVEL=info
  - REGION=us-east-1
resources:
  database:
    type: postgres
services:
  web:
    build: .
    command: bin/rails server -p $PORT
    environment:
      - PORT=3000
      - LOG_LEVEL=debug
    health: /health
    port: http:3000
    scale:
      count: 2
      memory: 512
    links:
      - redis
    frobnicate: yes
  worker:
    build:
      path: ./worker
      manifest: Dockerfile.worker
    command: [bundle, exec, sidekiq]
    scale:
      memory: "1024"
    volumes:
      - /tmp/cache
      - uploads:/app/uploads
      - ./shared:/app/shared
    links: [redis, web]
  redis:
    image: redis:${REDIS_VERSION}
    port: 6379
"""

COMPOSE_APP = """\
version: '3.8'
services:
  web:
    build:
      context: ./web      # relative to this file
      dockerfile: Dockerfile.dev
      args:
        RUBY_VERSION: "3.2"
        BUNDLE_JOBS: 4
        FROM_ENV:
        NOT_SET:
    command: bundle exec rails s -b 0.0.0.0 -p "${PORT:-3000}"
    entrypoint: ./bin/docker-entrypoint
    env_file:
      - .env.web
      - path: .env.optional
        required: false
    environment:
      - RAILS_ENV=development
      - FROM_ENV
      - NOT_SET
      - OVERRIDDEN=from-environment
      - DOLLARS=$$HOME
    ports:
      - "3000:3000"
      - 127.0.0.1:9229:9229
      - "35729"
      - 6000-6001:7000-7001/udp
      - 4000
      - "[::1]:5353:53/udp"
      - target: 8443
        published: 443
        protocol: tcp
        mode: host
    volumes:
      - ./web:/app:ro
      - bundle:/usr/local/bundle
      - /app/tmp
      - type: volume
        source: logs
        target: /app/log
      - type: tmpfs
        target: /tmp
    depends_on:
      db:
        condition: service_healthy
    links:
      - cache:memcached
    mem_limit: 1g
    labels:
      - com.example.role=web
      - com.example.flag
    tty: true
    restart: unless-stopped
    x-custom: ignored
  db:
    image: postgres:${PG_VERSION}
    environment:
      POSTGRES_PASSWORD: ${DB_PASSWORD:-devpass}
      POSTGRES_DB: app
      PGDATA: null
    mem_limit: 268435456
    labels:
      backup: true
  cache:
    image: memcached:1.6
    command: ["memcached", "-m", "64"]
    depends_on: [db]
    deploy:
      resources:
        limits:
          memory: 64M
volumes:
  bundle:
  logs:
networks:
  default:
    name: app
x-defaults:
  something: 1
"""


class LoadManifestTest(unittest.TestCase):
    def setUp(self):
        self.old_cwd = os.getcwd()
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix='manifest-test-'))
        os.chdir(self.dir)

    def tearDown(self):
        os.chdir(self.old_cwd)
        shutil.rmtree(self.dir)

    def write(self, name, text):
        path = os.path.join(self.dir, name)
        with open(path, 'w') as f:
            f.write(text)
        return path

    def error(self, name, text, environ=None):
        self.write(name, text)
        with self.assertRaises(convox.ManifestError) as caught:
            convox.load_manifest(os.path.join(self.dir, name), environ or {})
        return str(caught.exception)

    def test_convox(self):
        self.write('convox.yml', CONVOX_APP)
        self.write('.env', 'SECRET_KEY=from-dotenv\nAPI_TOKEN=from-dotenv\nLOG_LEVEL=warn\n'
                           'REDIS_VERSION=6\nUNRELATED=x\n')
        m = convox.load_manifest(os.path.join(self.dir, 'convox.yml'),
                             {'API_TOKEN': 'from-environ', 'REDIS_VERSION': '7.2', 'PATH': '/bin'})
        self.assertEqual((m.kind, m.path, m.directory),
                         ('convox', os.path.join(self.dir, 'convox.yml'), self.dir))
        self.assertEqual(list(m.services), ['web', 'worker', 'redis'])
        web, worker, redis = m.services['web'], m.services['worker'], m.services['redis']
        base_env = {'SECRET_KEY': 'from-dotenv', 'API_TOKEN': 'from-environ', 'RAILS_ENV': 'production',
                    'LOG_LEVEL': 'warn', 'REGION': 'us-east-1'}
        self.assertEqual(vars(web), {
            'name': 'web',
            'build': {'context': self.dir, 'dockerfile': 'Dockerfile', 'args': {}},
            'image': None,
            'command': ['bin/rails', 'server', '-p', '$PORT'],
            'entrypoint': None,
            'environment': dict(base_env, PORT='3000'),
            'ports': [{'host_ip': '127.0.0.1', 'host_port': 3000, 'container_port': 3000,
                       'protocol': 'tcp'}],
            'memory': 512,
            'volumes': [],
            'links': ['redis'],
            'labels': {},
            'healthcheck': None, 'conditions': {}, 'profiles': [], 'working_dir': '', 'user': '',
        })
        self.assertEqual(vars(worker), {
            'name': 'worker',
            'build': {'context': os.path.join(self.dir, 'worker'), 'dockerfile': 'Dockerfile.worker',
                      'args': {}},
            'image': None,
            'command': ['bundle', 'exec', 'sidekiq'],
            'entrypoint': None,
            'environment': base_env,
            'ports': [],
            'memory': 1024,
            'volumes': [
                {'type': 'volume', 'source': '', 'target': '/tmp/cache', 'read_only': False},
                {'type': 'volume', 'source': 'uploads', 'target': '/app/uploads', 'read_only': False},
                {'type': 'bind', 'source': os.path.join(self.dir, 'shared'), 'target': '/app/shared',
                 'read_only': False},
            ],
            'links': ['redis', 'web'],
            'labels': {},
            'healthcheck': None, 'conditions': {}, 'profiles': [], 'working_dir': '', 'user': '',
        })
        self.assertEqual((redis.build, redis.image, redis.command, redis.environment, redis.ports),
                         (None, 'redis:7.2', None, base_env,
                          [{'host_ip': '127.0.0.1', 'host_port': 6379, 'container_port': 6379,
                            'protocol': 'tcp'}]))
        self.assertEqual(m.warnings, ['convox.yml: services.web.frobnicate is not supported and is ignored'])
        self.assertEqual(m.dependencies('worker'), ['redis', 'web', 'worker'])
        self.assertEqual(m.dependencies('redis'), ['redis'])

    def test_convox_required_env(self):
        message = self.error('convox.yml', CONVOX_APP, {'REDIS_VERSION': '7'})
        self.assertEqual(message, 'required env: API_TOKEN, SECRET_KEY')
        self.write('.env', 'SECRET_KEY=x\n')
        self.assertEqual(self.error('convox.yml', CONVOX_APP), 'required env: API_TOKEN')

    def test_convox_defaults_and_image_only(self):
        self.write('convox.yaml', 'services:\n  web: {}\n  db:\n    image: postgres\n')
        m = convox.load_manifest('convox.yaml', {})
        self.assertEqual(m.services['web'].build,
                         {'context': self.dir, 'dockerfile': 'Dockerfile', 'args': {}})
        self.assertIsNone(m.services['db'].build)
        self.assertEqual(m.kind, 'convox')

    def test_convox_port_schemes_and_commands(self):
        # Convox's own examples: port: grpc:50051; a string command is split into words
        # (shell quoting, no shell), so the image's ENTRYPOINT still runs it.
        self.write('convox.yml', 'services:\n  api:\n    image: x\n    port: grpc:50051\n'
                                 '    command: bin/server --name "my api" --flag=\'a b\' $PORT\n'
                                 '  web:\n    image: x\n    port: {port: https:8443}\n'
                                 '    command: ""\n')
        m = convox.load_manifest('convox.yml', {})
        api, web = m.services['api'], m.services['web']
        self.assertEqual(api.ports, [{'host_ip': '127.0.0.1', 'host_port': 50051,
                                      'container_port': 50051, 'protocol': 'tcp'}])
        self.assertEqual(api.command, ['bin/server', '--name', 'my api', '--flag=a b', '$PORT'])
        self.assertEqual((web.ports[0]['container_port'], web.command), (8443, None))
        self.assertEqual(self.error('convox.yml', 'services:\n  web:\n    image: x\n'
                                                  '    command: echo "unclosed\n'),
                         'convox.yml:4: services.web.command cannot be split into arguments: '
                         'No closing quotation')

    def test_convox_star_env_build_args_and_memory_limit(self):
        self.write('convox.yml', 'environment:\n  - "*"\n  - EXTRA=1\nservices:\n  web:\n'
                                 '    build:\n      path: .\n      args: [NODE_ENV, VERSION=2, UNSET]\n'
                                 '    scale:\n      memory: 256\n      limit:\n        memory: 1024\n')
        self.write('.env', 'A=1\nB=2\nNODE_ENV=production\n')
        m = convox.load_manifest('convox.yml', {'B': 'environ', 'HOME': '/root'})
        web = m.services['web']
        self.assertEqual(web.environment,
                         {'A': '1', 'B': 'environ', 'NODE_ENV': 'production', 'EXTRA': '1'})
        self.assertEqual(web.build['args'], {'NODE_ENV': 'production', 'VERSION': '2'})
        self.assertEqual(web.memory, 1024)
        self.assertEqual(m.warnings, [])

    def test_compose(self):
        self.write('docker-compose.yml', COMPOSE_APP)
        self.write('.env', 'PG_VERSION=15\nDB_PASSWORD=\nFROM_ENV=dotenv\n')
        self.write('.env.web', 'OVERRIDDEN=from-env-file\nWEB_ONLY=1\n')
        m = convox.load_manifest('docker-compose.yml', {'FROM_ENV': 'shell', 'PORT': '4000'})
        self.assertEqual((m.kind, list(m.services)), ('compose', ['web', 'db', 'cache']))
        web, db, cache = m.services['web'], m.services['db'], m.services['cache']
        self.assertEqual(vars(web), {
            'name': 'web',
            'build': {'context': os.path.join(self.dir, 'web'), 'dockerfile': 'Dockerfile.dev',
                      'args': {'RUBY_VERSION': '3.2', 'BUNDLE_JOBS': '4', 'FROM_ENV': 'shell'}},
            'image': None,
            'command': ['bundle', 'exec', 'rails', 's', '-b', '0.0.0.0', '-p', '4000'],
            'entrypoint': ['./bin/docker-entrypoint'],
            'environment': {'OVERRIDDEN': 'from-environment', 'WEB_ONLY': '1',
                            'RAILS_ENV': 'development', 'FROM_ENV': 'shell', 'DOLLARS': '$HOME'},
            'ports': [
                {'host_ip': '0.0.0.0', 'host_port': 3000, 'container_port': 3000, 'protocol': 'tcp'},
                {'host_ip': '127.0.0.1', 'host_port': 9229, 'container_port': 9229, 'protocol': 'tcp'},
                {'host_ip': '0.0.0.0', 'host_port': None, 'container_port': 35729, 'protocol': 'tcp'},
                {'host_ip': '0.0.0.0', 'host_port': 6000, 'container_port': 7000, 'protocol': 'udp'},
                {'host_ip': '0.0.0.0', 'host_port': 6001, 'container_port': 7001, 'protocol': 'udp'},
                {'host_ip': '0.0.0.0', 'host_port': None, 'container_port': 4000, 'protocol': 'tcp'},
                {'host_ip': '::1', 'host_port': 5353, 'container_port': 53, 'protocol': 'udp'},
                {'host_ip': '0.0.0.0', 'host_port': 443, 'container_port': 8443, 'protocol': 'tcp'},
            ],
            'memory': 1024,
            'volumes': [
                {'type': 'bind', 'source': os.path.join(self.dir, 'web'), 'target': '/app',
                 'read_only': True},
                {'type': 'volume', 'source': 'bundle', 'target': '/usr/local/bundle', 'read_only': False},
                {'type': 'volume', 'source': '', 'target': '/app/tmp', 'read_only': False},
                {'type': 'volume', 'source': 'logs', 'target': '/app/log', 'read_only': False},
            ],
            'links': ['db', 'cache'],
            'labels': {'com.example.role': 'web', 'com.example.flag': ''},
            'healthcheck': None, 'conditions': {'db': 'service_healthy'},
            'profiles': [], 'working_dir': '', 'user': '',
        })
        self.assertEqual((db.image, db.environment, db.memory, db.labels, db.build),
                         ('postgres:15', {'POSTGRES_PASSWORD': 'devpass', 'POSTGRES_DB': 'app'}, 256,
                          {'backup': 'true'}, None))
        self.assertEqual((cache.command, cache.links, cache.memory),
                         (['memcached', '-m', '64'], ['db'], 64))
        self.assertEqual(m.warnings, [
            'docker-compose.yml: services.web.volumes: volumes of type tmpfs are not supported '
            'and are ignored',
            'docker-compose.yml: services.web.tty is not supported and is ignored',
            'docker-compose.yml: services.web.restart is not supported and is ignored',
        ])
        self.assertEqual(m.dependencies('web'), ['db', 'cache', 'web'])

    def test_compose_missing_variable_warning_and_file_names(self):
        for name in ['compose.yaml', 'compose.yml', 'docker-compose.yaml', 'stack.yml']:
            with self.subTest(name):
                self.write(name, 'services:\n  app:\n    image: "app:${TAG}"\n')
                m = convox.load_manifest(name, {})
                self.assertEqual((m.kind, m.services['app'].image), ('compose', 'app:'))
                self.assertEqual(m.warnings,
                                 ['%s: variable TAG is not set; using an empty string' % name])

    def test_memory_sizes(self):
        cases = [('512m', 512), ('1g', 1024), (268435456, 256), ('512M', 512), ('1.5g', 1536),
                 ('2048k', 2), ('100000000', 96), ('1gb', 1024), ('64Mi', 64)]
        for value, expected in cases:
            with self.subTest(value):
                text = 'services:\n  a:\n    image: x\n    mem_limit: %s\n' % (
                    value if isinstance(value, int) else '"%s"' % value)
                self.write('docker-compose.yml', text)
                self.assertEqual(convox.load_manifest('docker-compose.yml', {}).services['a'].memory,
                                 expected)

    def test_type_errors(self):
        cases = [
            ('convox.yml', 'services: [a]\n', 'convox.yml:1: services must be a mapping of service names'),
            ('convox.yml', 'services:\n  web:\n    port: [1]\n',
             'convox.yml:3: services.web.port must be a number or "SCHEME:NUMBER" like http:3000 or '
             'grpc:50051'),
            ('convox.yml', 'services:\n  web:\n    environment: 5\n',
             'convox.yml:3: services.web.environment must be a list of KEY or KEY=default'),
            ('convox.yml', 'services:\n  web:\n    scale:\n      memory: lots\n',
             'convox.yml:4: services.web.scale.memory must be a number of megabytes'),
            ('convox.yml', 'services:\n  web:\n    links: [db]\n',
             "convox.yml:2: services.web depends on unknown service 'db' (services: web)"),
            ('convox.yml', 'services: {}\n', 'convox.yml: no services defined — add a "services:" section'),
            ('convox.yml', '# empty\n', 'convox.yml: the file is empty — add a "services:" section'),
            ('convox.yml', '- a\n', 'convox.yml: must be a mapping with a "services:" section'),
            ('convox.yml', 'services:\n  Web:\n    image: x\n',
             'convox.yml:2: services.Web is not a valid service name — use lowercase letters, '
             'digits, "-", "_" and "."'),
            ('docker-compose.yml', 'services:\n  web/app:\n    image: x\n',
             'docker-compose.yml:2: services.web/app is not a valid service name — use letters, '
             'digits, "-", "_" and "."'),
            ('docker-compose.yml', 'services:\n  web:\n    ports: ["80"]\n',
             'docker-compose.yml:2: services.web needs "image" or "build"'),
            ('docker-compose.yml', 'web:\n  image: nginx\n',
             'docker-compose.yml: this looks like a version 1 compose file; put the services under '
             '"services:" (compose file format 2 or later)'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    ports: ["99999:80"]\n',
             'docker-compose.yml:4: services.web.ports must be a port number between 1 and 65535'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    ports: "80"\n',
             'docker-compose.yml:4: services.web.ports must be a list'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    environment: 5\n',
             'docker-compose.yml:4: services.web.environment must be a list of KEY=VALUE or a mapping'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    volumes: ["data:relative"]\n',
             'docker-compose.yml:4: services.web.volumes has a bad volume \'data:relative\' — the target '
             'must be an absolute path'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    volumes:\n      - type: bind\n'
                                   '        target: /app\n',
             'docker-compose.yml:4: services.web.volumes.source is required for a bind mount'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    env_file: missing.env\n',
             'docker-compose.yml:4: services.web.env_file file missing.env not found'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    command: "echo \'oops"\n',
             'docker-compose.yml:4: services.web.command cannot be split into arguments: '
             'No closing quotation'),
            ('docker-compose.yml', 'services:\n  web:\n    image: x\n    mem_limit: huge\n',
             'docker-compose.yml:4: services.web.mem_limit must be a size like 512m or 1g'),
            ('docker-compose.yml', 'services:\n  web:\n    build: https://github.com/a/b.git\n',
             'docker-compose.yml:3: services.web.build.context is a remote URL; only local build '
             'folders are supported'),
        ]
        for name, text, expected in cases:
            with self.subTest(text):
                self.assertEqual(self.error(name, text), expected)
                os.remove(name)

    def test_interpolation_error_names_file_and_line(self):
        self.assertEqual(self.error('compose.yaml', 'services:\n  web:\n    image: x\n'
                                    '    # image: ${TAG:?not this line}\n'
                                    '    environment:\n      A: "${HOST:-${TAG:?set TAG}}"\n'),
                         'compose.yaml:6: required variable TAG is missing a value: set TAG')
        self.assertEqual(self.error('compose.yaml', 'services:\n  web:\n    image: x\n'
                                    '    command: echo ${oops\n'),
                         "compose.yaml:4: unterminated \"${\" in 'echo ${oops' — close it with \"}\" "
                         "or write $$ for a literal $")

    def test_yaml_error_names_file_and_line(self):
        self.assertEqual(self.error('convox.yml', 'services:\n  web:\n    image: *img\n'),
                         'convox.yml:3: unknown alias *img — define &img before using it')

    def test_bad_dotenv(self):
        self.write('.env', 'GOOD=1\nthis is wrong\n')
        message = self.error('convox.yml', 'services:\n  web: {}\n')
        self.assertEqual(message, ".env:2: a variable name cannot contain a space ('this is wrong') "
                                  "— use KEY=VALUE")

    def test_dependencies_errors(self):
        self.write('docker-compose.yml', 'services:\n  a:\n    image: x\n    depends_on: [b]\n'
                                         '  b:\n    image: x\n    links: [a]\n')
        m = convox.load_manifest('docker-compose.yml', {})
        with self.assertRaises(convox.ManifestError) as caught:
            m.dependencies('a')
        self.assertEqual(str(caught.exception), 'dependency cycle: a -> b -> a')
        with self.assertRaises(convox.ManifestError) as caught:
            m.dependencies('zzz')
        self.assertEqual(str(caught.exception), "no service named 'zzz' (services: a, b)")

    def test_missing_file(self):
        with self.assertRaises(convox.ManifestError) as caught:
            convox.load_manifest('nope/convox.yml', {})
        self.assertEqual(str(caught.exception), 'nope/convox.yml: file not found')


COMPOSE_RUNTIME_KEYS = """\
name: My_Shop
services:
  web:
    build:
      context: .
      target: app
    working_dir: /srv
    user: "1000:1000"
    healthcheck:
      test: curl -f http://localhost/
      interval: 1m30s
      timeout: 1.5s
      retries: 3
      start_period: 500ms
    depends_on:
      db:
        condition: service_healthy
        restart: true
      migrate:
        condition: service_completed_successfully
      cache:
    volumes: [data:/data, shared:/shared, ext:/ext]
  db:
    image: postgres
    healthcheck:
      test: [CMD, pg_isready]
  migrate:
    image: x
    healthcheck:
      disable: true
  cache:
    image: x
  debug:
    image: x
    profiles: [debug, tools]
    depends_on: [web]
  admin:
    image: x
    profiles: [admin]
    depends_on: [debug]
volumes:
  data:
  shared:
    name: team-shared
  ext:
    external: true
"""


class ComposeRuntimeKeysTest(unittest.TestCase):
    """Keys that change what runs: build.target, healthcheck, depends_on conditions,
    profiles, named volumes and the project name (SPEC §3, §7.1)."""

    def setUp(self):
        self.dir = os.path.realpath(tempfile.mkdtemp(prefix='manifest-test-'))
        self.addCleanup(shutil.rmtree, self.dir)

    def load(self, text, name='compose.yaml', environ=None, dotenv=None):
        with open(os.path.join(self.dir, name), 'w') as handle:
            handle.write(text)
        if dotenv is not None:
            with open(os.path.join(self.dir, '.env'), 'w') as handle:
                handle.write(dotenv)
        return convox.load_manifest(os.path.join(self.dir, name), environ or {})

    def test_keys(self):
        m = self.load(COMPOSE_RUNTIME_KEYS)
        web = m.services['web']
        self.assertEqual(m.warnings, [])
        self.assertEqual(m.name, 'my_shop')
        self.assertEqual(web.build['target'], 'app')
        self.assertEqual(web.healthcheck, {
            'Test': ['CMD-SHELL', 'curl -f http://localhost/'], 'Interval': 90 * 10 ** 9,
            'Timeout': 1500 * 10 ** 6, 'Retries': 3, 'StartPeriod': 500 * 10 ** 6})
        self.assertEqual(m.services['db'].healthcheck, {'Test': ['CMD', 'pg_isready']})
        self.assertEqual(m.services['migrate'].healthcheck, {'Test': ['NONE']})
        self.assertEqual(web.conditions, {'db': 'service_healthy',
                                          'migrate': 'service_completed_successfully',
                                          'cache': 'service_started'})
        self.assertEqual(m.volume_names, {'shared': 'team-shared', 'ext': 'ext'})
        local = convox.LocalApp(None, 'shop', m, 'R1')
        local.images = dict.fromkeys(m.services, 'img')
        config = local.container_config('web')
        self.assertEqual(config['HostConfig']['Binds'],
                         ['shop_data:/data', 'team-shared:/shared', 'ext:/ext'])
        self.assertEqual(config['Healthcheck'], web.healthcheck)
        self.assertEqual((config['WorkingDir'], config['User']), ('/srv', '1000:1000'))
        self.assertNotIn('Healthcheck', local.container_config('cache'))

    def test_what_real_files_write(self):
        # Sentry self-hosted: retries: $HEALTHCHECK_RETRIES; n8n: a service named initContainer;
        # NetBox: volumes with driver: local.
        m = self.load('x-check: &check\n  retries: $RETRIES\nservices:\n  initContainer:\n'
                      '    image: x\n    healthcheck:\n      <<: *check\n      test: "true"\n'
                      'volumes:\n  data:\n    driver: local\n', environ={'RETRIES': '7'})
        self.assertEqual(m.services['initContainer'].healthcheck,
                         {'Retries': 7, 'Test': ['CMD-SHELL', 'true']})
        self.assertEqual(m.warnings, [])
        # A key many services share is one WARNING line (Sentry's file has 57 restart:).
        m = self.load('services:\n' + ''.join('  s%d:\n    image: x\n    restart: always\n' % k
                                               for k in range(5)) + '    tty: true\n')
        self.assertEqual([w.split(': ', 1)[1] for w in m.warnings], [
            'services.*.restart is not supported and is ignored (5 services: s0, s1, s2, …)',
            'services.s4.tty is not supported and is ignored'])

    def test_convox_volumes_keep_their_names(self):
        m = self.load('services:\n  web:\n    image: x\n    volumes: [data:/data]\n',
                      'convox.yml')
        local = convox.LocalApp(None, 'shop', m, 'R1')
        local.images = {'web': 'img'}
        self.assertEqual(local.container_config('web')['HostConfig']['Binds'],
                         ['shop-data:/data'])

    def test_profiles(self):
        m = self.load(COMPOSE_RUNTIME_KEYS)
        self.assertEqual(m.selected([]), ['db', 'migrate', 'cache', 'web'])
        self.assertEqual(m.selected(['tools']), ['db', 'migrate', 'cache', 'web', 'debug'])
        self.assertEqual(m.selected(['*']), ['db', 'migrate', 'cache', 'web', 'debug', 'admin'])
        with self.assertRaises(convox.ManifestError) as caught:
            m.selected(['admin'])
        self.assertEqual(str(caught.exception), 'service admin depends on debug, which is only '
                                                'in profile debug, tools — add --profile debug')
        # A service named on the command line starts whatever its profiles (compose's rule).
        self.assertEqual(m.dependencies('debug'), ['db', 'migrate', 'cache', 'web', 'debug'])

    def test_errors(self):
        cases = [
            ('    depends_on:\n      db:\n        condition: service_ready\n',
             '6: services.web.depends_on.db.condition must be one of service_started, '
             'service_healthy, service_completed_successfully'),
            ('    healthcheck:\n      test: [RUN, x]\n',
             '5: services.web.healthcheck.test must start with CMD, CMD-SHELL or NONE'),
            ('    healthcheck:\n      interval: 10\n',
             '5: services.web.healthcheck.interval must be a duration like 30s, 1m30s or 500ms'),
            ('    healthcheck:\n      interval: 5 s\n',
             '5: services.web.healthcheck.interval must be a duration like 30s, 1m30s or 500ms'),
            ('    build:\n      target: [a]\n',
             '5: services.web.build.target must be the name of a build stage'),
        ]
        for text, expected in cases:
            with self.subTest(text):
                with self.assertRaises(convox.ManifestError) as caught:
                    self.load('services:\n  web:\n    image: x\n' + text +
                              '  db:\n    image: x\n')
                self.assertTrue(str(caught.exception).endswith('/compose.yaml:' + expected),
                                str(caught.exception))

    def test_env_file_expansion(self):
        # Compose's order: the shell, then .env, then the service's environment, then the
        # env_file's earlier lines; environment: entries win over env_file ones.
        with open(os.path.join(self.dir, 'web.env'), 'w') as handle:
            handle.write('DB_USER=admin\nURL="postgres://${DB_USER}@${HOST}/${DB:-app}"\n'
                         'FROM_SHELL=${SHELL_VAR}\nREGION=${REGION}\nLOCAL=${DOTENV}\n'
                         'MODE=file\n')
        m = self.load('services:\n  web:\n    image: x\n    env_file: web.env\n'
                      '    environment:\n      HOST: db\n      MODE: env\n',
                      environ={'SHELL_VAR': 'sh', 'REGION': 'eu'},
                      dotenv='DOTENV=from .env\nREGION=ignored\n')
        self.assertEqual(m.services['web'].environment, {
            'DB_USER': 'admin', 'URL': 'postgres://admin@db/app', 'FROM_SHELL': 'sh',
            'REGION': 'eu', 'LOCAL': 'from .env', 'MODE': 'env', 'HOST': 'db'})

    def test_project_name(self):
        self.load('name: ${TEAM:-x}-Shop\nservices:\n  web:\n    image: x\n')
        cases = [({}, None, ('x-shop', False)),
                 ({'TEAM': 'blue'}, None, ('blue-shop', False)),
                 ({}, 'COMPOSE_PROJECT_NAME=from-dotenv\n', ('from-dotenv', False)),
                 ({'COMPOSE_PROJECT_NAME': 'env'}, 'COMPOSE_PROJECT_NAME=dotenv\n', ('env', False)),
                 ({'CONVOX_APP': 'convox-app', 'COMPOSE_PROJECT_NAME': 'env'}, None,
                  ('convox-app', False))]
        for environ, dotenv, expected in cases:
            with self.subTest(environ=environ, dotenv=dotenv):
                with open(os.path.join(self.dir, '.env'), 'w') as handle:
                    handle.write(dotenv or '')
                self.assertEqual(convox.resolve_app(None, environ, self.dir), expected)
        with self.assertRaises(convox.ManifestError) as caught:
            convox.resolve_app(None, {'COMPOSE_PROJECT_NAME': 'Bad Name'}, self.dir)
        self.assertIn("'Bad Name' is not a valid project name", str(caught.exception))
        # No name anywhere: the folder's name; a convox.yml is not a compose project.
        os.remove(os.path.join(self.dir, 'compose.yaml'))
        self.load('services:\n  web:\n    image: x\n')
        folder = convox.normalize_app_name(os.path.basename(self.dir))
        self.assertEqual(convox.resolve_app(None, {}, self.dir), (folder, True))
        self.load('services:\n  web:\n    image: x\n', 'convox.yml')
        self.assertEqual(convox.resolve_app(None, {'COMPOSE_PROJECT_NAME': 'p'}, self.dir),
                         (folder, True))


# ---------------------------------------------------------------- .dockerignore

DOCKERIGNORE_TABLE = [
    (['*.md', '!README.md'], 'README.md', False),
    (['*.md', '!README.md'], 'CHANGELOG.md', True),
    (['*.md'], 'docs/guide.md', False),
    (['**/*.md'], 'docs/guide.md', True),
    (['**/*.md'], 'README.md', True),
    (['**/*.go'], 'a/b/c.go', True),
    (['**/*.go'], 'main.go', True),
    (['**/*.go'], 'main.goo', False),
    (['temp?'], 'temp1', True),
    (['temp?'], 'temp', False),
    (['temp?'], 'temp12', False),
    (['temp?'], 'tempa/file.txt', True),
    (['*/temp*'], 'somedir/temporary.txt', True),
    (['*/temp*'], 'temp.txt', False),
    (['*/temp*'], 'a/b/temp.txt', False),
    (['*/*/temp*'], 'a/b/temp.txt', True),
    (['node_modules'], 'node_modules', True),
    (['node_modules'], 'node_modules/lodash/index.js', True),
    (['node_modules'], 'src/node_modules/x.js', False),
    (['/build'], 'build/out.o', True),
    (['/build'], 'src/build', False),
    (['docs/**', '!docs/keep.md'], 'docs/keep.md', False),
    (['docs/**', '!docs/keep.md'], 'docs/other.md', True),
    (['docs/**'], 'docs', False),
    (['docs', '!docs/README.md'], 'docs/README.md', False),
    (['docs', '!docs/README.md'], 'docs/api/index.md', True),
    (['[a-c]*.txt'], 'b1.txt', True),
    (['[a-c]*.txt'], 'd1.txt', False),
    (['.git', '*.log'], '.git/HEAD', True),
    (['.git', '*.log'], 'server.log', True),
    (['**'], 'anything/at/all', True),
    (['**', '!src'], 'src/main.py', False),
    (['*', '!Dockerfile'], 'Dockerfile', False),
    (['*', '!Dockerfile'], 'app.py', True),
    (['./dist/'], 'dist/bundle.js', True),
    (['# just a comment', '', '   ', 'tmp'], 'tmp', True),
    (['#tmp'], 'tmp', False),
    (['  tmp  '], 'tmp', True),
    (['a/../b'], 'b', True),
    (['*.txt', '!important.txt', 'important.txt'], 'important.txt', True),
    (['**/temp'], 'a/temp/x', True),
    (['foo/**/bar'], 'foo/bar', True),
    (['foo/**/bar'], 'foo/x/y/bar', True),
    (['foo/**/bar'], 'foobar', False),
    (['\\#file'], '#file', True),
    (['!keep'], 'keep', False),
    (['*.pyc', '**/__pycache__'], 'pkg/__pycache__/mod.cpython-311.pyc', True),
    (['.env*', '!.env.example'], '.env.example', False),
    (['.env*', '!.env.example'], '.env.local', True),
    (['file.(x)'], 'file.(x)', True),
    (['file.txt'], 'fileXtxt', False),
]


# The cases of moby/patternmatcher's own tests (which include Go's filepath.Match table),
# restated as (pattern, path, excluded): a path is excluded when the pattern matches it or
# a folder above it.
DOCKERIGNORE_MOBY = [
    ('*', 'fileutils.go', True), ('*.go', 'fileutils.go', True), ('*.go', '.', False),
    ('**', 'file', True), ('**', 'file/', True), ('**/', 'file', True), ('**/', 'file/', True),
    ('**', '/', True), ('**/', '/', True), ('**', 'dir/file', True), ('**/', 'dir/file', True),
    ('**', 'dir/file/', True), ('**/', 'dir/file/', True), ('**/**', 'dir/file', True),
    ('**/**', 'dir/file/', True), ('dir/**', 'dir/file', True), ('dir/**', 'dir/file/', True),
    ('dir/**', 'dir/dir2/file', True), ('dir/**', 'dir/dir2/file/', True),
    ('**/dir', 'dir', True), ('**/dir', 'dir/file', True), ('**/dir2/*', 'dir/dir2/file', True),
    ('**/dir2/*', 'dir/dir2/file/', True), ('**/dir2/**', 'dir/dir2/dir3/file', True),
    ('**/dir2/**', 'dir/dir2/dir3/file/', True), ('**file', 'file', True),
    ('**file', 'dir/file', True), ('**/file', 'dir/file', True), ('**file', 'dir/dir/file', True),
    ('**/file', 'dir/dir/file', True), ('**/file*', 'dir/dir/file', True),
    ('**/file*', 'dir/dir/file.txt', True), ('**/file*txt', 'dir/dir/file.txt', True),
    ('**/file*.txt', 'dir/dir/file.txt', True), ('**/file*.txt*', 'dir/dir/file.txt', True),
    ('**/**/*.txt', 'dir/dir/file.txt', True), ('**/**/*.txt2', 'dir/dir/file.txt', False),
    ('**/*.txt', 'file.txt', True), ('**/**/*.txt', 'file.txt', True),
    ('a**/*.txt', 'a/file.txt', True), ('a**/*.txt', 'a/dir/file.txt', True),
    ('a**/*.txt', 'a/dir/dir/file.txt', True), ('a/*.txt', 'a/dir/file.txt', False),
    ('a/*.txt', 'a/file.txt', True), ('a/*.txt**', 'a/file.txt', True),
    ('a[b-d]e', 'ae', False), ('a[b-d]e', 'ace', True), ('a[b-d]e', 'aae', False),
    ('a[^b-d]e', 'aze', True), ('.*', '.foo', True), ('.*', 'foo', False),
    ('abc.def', 'abcdef', False), ('abc.def', 'abc.def', True), ('abc.def', 'abcZdef', False),
    ('abc?def', 'abcZdef', True), ('abc?def', 'abcdef', False), ('**/foo/bar', 'foo/bar', True),
    ('**/foo/bar', 'dir/foo/bar', True), ('**/foo/bar', 'dir/dir2/foo/bar', True),
    ('abc/**', 'abc', False), ('abc/**', 'abc/def', True), ('abc/**', 'abc/def/ghi', True),
    ('**/.foo', '.foo', True), ('**/.foo', 'bar.foo', False), ('a(b)c/def', 'a(b)c/def', True),
    ('a(b)c/def', 'a(b)c/xyz', False), ('a.|)$(}+{bc', 'a.|)$(}+{bc', True),
    ('dist/*.whl', 'dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl', True),
    ('a\\\\', 'a\\', True), ('a\\*b', 'a*b', True), ('a\\*b', 'ab', False),
    ('abc', 'abc', True), ('*c', 'abc', True), ('a*', 'a', True), ('a*', 'abc', True),
    ('a*', 'ab/c', True), ('a*/b', 'abc/b', True), ('a*/b', 'a/c/b', False),
    ('a*b*c*d*e*/f', 'axbxcxdxe/f', True), ('a*b*c*d*e*/f', 'axbxcxdxexxx/f', True),
    ('a*b*c*d*e*/f', 'axbxcxdxe/xxx/f', False), ('a*b*c*d*e*/f', 'axbxcxdxexxx/fff', False),
    ('a*b?c*x', 'abxbbxdbxebxczzx', True), ('a*b?c*x', 'abxbbxdbxebxczzy', False),
    ('ab[c]', 'abc', True), ('ab[b-d]', 'abc', True), ('ab[e-g]', 'abc', False),
    ('ab[^c]', 'abc', False), ('ab[^b-d]', 'abc', False), ('ab[^e-g]', 'abc', True),
    ('a?b', 'a\u263ab', True), ('a[^a]b', 'a\u263ab', True), ('a???b', 'a\u263ab', False),
    ('a[^a][^a][^a]b', 'a\u263ab', False), ('[a-\u03b6]*', '\u03b1', True),
    ('*[a-\u03b6]', 'A', False), ('a?b', 'a/b', False), ('a*b', 'a/b', False),
    ('[\\]a]', ']', True), ('[\\-]', '-', True), ('[x\\-]', 'x', True), ('[x\\-]', '-', True),
    ('[x\\-]', 'z', False), ('[\\-x]', 'x', True), ('[\\-x]', '-', True), ('[\\-x]', 'a', False),
    ('*x', 'xxx', True),
]

DOCKERIGNORE_MOBY_LISTS = [
    (['!fileutils.go', '*.go'], 'fileutils.go', True),
    (['docs', '!docs/README.md'], 'docs/README.md', False),
    (['docs/', '!docs/README.md'], 'docs/README.md', False),
    (['docs/*', '!docs/README.md'], 'docs/README.md', False),
    (['*.go', '!fileutils.go'], 'fileutils.go', False),
    ([], 'any/path/there', False),
    (['**', '!util/docker/web'], 'util/docker/web/foo', False),
    (['**', '!util/docker/web', 'util/docker/web/foo'], 'util/docker/web/foo', True),
    (['**', '!dist/*.whl'], 'dist/proxy.py-2.4.0rc3.dev36+g08acad9-py3-none-any.whl', False),
]

#: Patterns Docker refuses: Go's filepath.Match syntax (a class that is empty or unclosed,
#: "-" or "]" where a character is due, a lone "\"), and RE2's (a backwards range).
DOCKERIGNORE_REFUSED = ['!', '[', '[^', '[^bc', 'a[', '[]a]', '[-]', '[x-]', '[-x]', '\\',
                        '[a-b-c]', '[Local-Only]/', '**/[', '[unclosed']


class DockerignoreTest(unittest.TestCase):
    def test_table(self):
        for lines, path, expected in DOCKERIGNORE_TABLE:
            with self.subTest(lines=lines, path=path):
                self.assertEqual(convox.dockerignore_matcher(lines)(path), expected)

    def test_moby_cases(self):
        cases = [([pattern], path, expected) for pattern, path, expected in DOCKERIGNORE_MOBY]
        for lines, path, expected in cases + DOCKERIGNORE_MOBY_LISTS:
            with self.subTest(lines=lines, path=path):
                self.assertEqual(convox.dockerignore_matcher(lines)(path), expected)

    def test_bad_patterns(self):
        for pattern in DOCKERIGNORE_REFUSED:
            with self.subTest(pattern):
                with self.assertRaisesRegex(convox.ManifestError, r"^\.dockerignore: "):
                    convox.dockerignore_matcher(['ok', pattern])('x')

    def test_forgetful_automaton_agrees(self):
        """With room for 3 DFA states (so that they are forgotten over and over), a glob
        gives the answers of one that keeps them all."""
        rng = random.Random(6)
        paths = [''.join(rng.choice('ab/.') for _ in range(rng.randrange(1, 12))).strip('/')
                 or 'a' for _ in range(400)]
        for pattern in ('a*b?/**/.b*', '**/[^a]*b/a*', '*a*b*/**'):
            with self.subTest(pattern):
                keeps, forgets = (convox._dockerignore_pattern(pattern) for _ in range(2))
                forgets.max_states = 3
                self.assertEqual([forgets(p) for p in paths], [keeps(p) for p in paths])
                self.assertLessEqual(len(forgets.sets), 3)

    def test_linear_time(self):
        """Patterns that make a backtracking matcher take exponential time, against a tree
        25 folders deep, walked as start does it: under 2 s (today's re: minutes)."""
        script = ("import sys, time; sys.path.insert(0, %r); import convox\n"
                  "t = time.monotonic()\n"
                  "chunks = list(convox.tar_context(sys.argv[1]))\n"
                  "print(time.monotonic() - t)\n" % HERE)
        with tempfile.TemporaryDirectory() as context:
            deep = os.path.join(context, 'x', *['a'] * 25)
            os.makedirs(deep)
            for name in ('z', 'y', 'a' * 60):
                open(os.path.join(deep, name), 'w').close()
            with open(os.path.join(context, '.dockerignore'), 'w') as handle:
                handle.write('x/' + '**/' * 12 + 'y\n' + '*a' * 12 + 'b\n')
            try:
                result = subprocess.run([sys.executable, '-c', script, context], timeout=30,
                                        stdout=subprocess.PIPE)
            except subprocess.TimeoutExpired:
                self.fail('walking the context took over 30 s')
        self.assertLess(float(result.stdout), 2.0)

    def test_read_dockerignore(self):
        tmp = tempfile.mkdtemp()
        try:
            self.assertEqual(convox.read_dockerignore(tmp), [])
            with open(os.path.join(tmp, '.dockerignore'), 'w') as f:
                f.write('\ufeff*.log\r\n!keep.log\n')
            self.assertEqual(convox.read_dockerignore(tmp), ['*.log', '!keep.log'])
        finally:
            shutil.rmtree(tmp)


# ---------------------------------------------------------------- build context tar

class DockerfileCopiesTest(unittest.TestCase):
    """Where start's sync puts a context file: the final stage's COPY/ADD, as the builder."""

    DOCKERFILE = """\
# syntax=docker/dockerfile:1
FROM golang AS builder
COPY . /src
FROM busybox
ARG APP=/srv
ENV CONF=etc
WORKDIR $APP
COPY package.json yarn.lock ./
COPY --chown=app:app --chmod=640 src/ code/
WORKDIR sub
COPY ["a b.txt", "single"]
COPY --from=builder /src/bin /bin/x
ADD vendor.tar.gz https://example.com/x /opt/
ADD static/*.css ${CONF}/css/
COPY \\
  . /all
"""

    def test_final_stage(self):
        copies = convox.dockerfile_copies(self.DOCKERFILE)
        self.assertEqual([(c.sources, c.dest) for c in copies], [
            (["package.json", "yarn.lock"], "/srv/"), (["src"], "/srv/code/"),
            (["a b.txt"], "/srv/sub/single"), (["static/*.css"], "/srv/sub/etc/css/"),
            (["."], "/all")])
        self.assertEqual((copies[1].chown, copies[1].chmod), ("app:app", 0o640))
        builder = convox.dockerfile_copies(self.DOCKERFILE, target="builder")
        self.assertEqual([(c.sources, c.dest) for c in builder], [(["."], "/src")])
        args = convox.dockerfile_copies(self.DOCKERFILE, args={"APP": "/app"})
        self.assertEqual(args[0].dest, "/app/")

    def test_json_form_of_anything_but_strings(self):
        """A hostile repository's COPY ["…"] nested 100,000 deep, or with other values than
        strings, is read as the shell form, as the builder reads it (it was a
        RecursionError that start printed as "…report it")."""
        deep = "FROM x\nCOPY " + "[" * 100000 + "]" * 100000 + "\n"
        started = time.monotonic()
        self.assertEqual(convox.dockerfile_copies(deep), [])
        self.assertLess(time.monotonic() - started, 1)
        copies = convox.dockerfile_copies('FROM x\nCOPY ["a", {"b": 1}, 2] /app/\n')
        self.assertEqual([(c.sources, c.dest) for c in copies],
                         [(['["a",', '{"b":', '1},', '2]'], "/app/")])

    def test_destinations(self):
        copies = convox.dockerfile_copies(self.DOCKERFILE)
        table = [
            ("package.json", ["/srv/package.json", "/all/package.json"]),
            ("src/lib/x.js", ["/srv/code/lib/x.js", "/all/src/lib/x.js"]),
            ("src", ["/all/src"]),
            ("a b.txt", ["/srv/sub/single", "/all/a b.txt"]),
            ("static/site.css", ["/srv/sub/etc/css/site.css", "/all/static/site.css"]),
            ("static/deep/site.css", ["/all/static/deep/site.css"]),
            ("vendor.tar.gz", ["/all/vendor.tar.gz"]),
            ("srcs/x", ["/all/srcs/x"]),
        ]
        for rel, expected in table:
            with self.subTest(rel=rel):
                self.assertEqual([d for d, _ in convox.copy_destinations(
                    copies, rel, is_dir=rel == "src")], expected)

    def test_dockerfile_read_as_the_build_reads_it(self):
        """A Dockerfile that is a fifo (or a link out of the context) is not waited on or
        followed: no sync for that service, and the build reports it."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        with open(os.path.join(root, "convox.yml"), "w") as handle:
            handle.write("services:\n  web:\n    build: .\n  api:\n    build:\n"
                         "      path: .\n      manifest: Dockerfile.api\n")
        with open(os.path.join(root, "Dockerfile.api"), "w") as handle:
            handle.write("FROM x\nCOPY . /app\n")
        os.mkfifo(os.path.join(root, "Dockerfile"))
        manifest = convox.load_manifest(os.path.join(root, "convox.yml"), {})
        watches = convox.LocalApp(None, "app", manifest, "R").watches(["web", "api"])
        self.assertEqual(sorted(watches), ["api"])
        self.assertEqual(watches["api"][1][0].dest, "/app")

    def test_watch_sees_changes_and_honours_dockerignore(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        for name, text in (("a", "1"), ("dir/b", "2"), ("junk/c", "3"),
                           (".dockerignore", "junk\n")):
            os.makedirs(os.path.dirname(os.path.join(root, name)), exist_ok=True)
            with open(os.path.join(root, name), "w") as handle:
                handle.write(text)
        watch = convox.ContextWatch(root)
        self.assertEqual(sorted(os.path.relpath(path, root) for path in watch.snapshot),
                         [".dockerignore", "a", "dir", "dir/b"])
        self.assertEqual(watch.changes(), ({}, {}))
        with open(os.path.join(root, "a"), "w") as handle:
            handle.write("11")
        os.remove(os.path.join(root, "dir/b"))
        os.mkdir(os.path.join(root, "new"))
        with open(os.path.join(root, "new/d"), "w") as handle:
            handle.write("4")
        with open(os.path.join(root, "junk/e"), "w") as handle:
            handle.write("5")
        self.assertEqual(watch.changes(), ({"a": False, "new": True, "new/d": False},
                                           {"dir/b": False}))


class _ChunkReader(object):
    """A file-like reader over a chunk iterator, for tarfile's streaming mode."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.buf = b''

    def read(self, size=-1):
        while size < 0 or len(self.buf) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buf += chunk
        if size < 0:
            size = len(self.buf)
        data, self.buf = self.buf[:size], self.buf[size:]
        return data


class TarContextTest(unittest.TestCase):
    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix='context-test-')

    def tearDown(self):
        shutil.rmtree(self.dir)

    def write(self, rel, data=b'x'):
        path = os.path.join(self.dir, rel)
        if not os.path.isdir(os.path.dirname(path)):
            os.makedirs(os.path.dirname(path))
        with open(path, 'wb') as f:
            f.write(data)

    def members(self, **kwargs):
        data = b''.join(convox.tar_context(self.dir, **kwargs))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            return dict((m.name, m) for m in tar.getmembers()), data

    def test_tree(self):
        self.write('.dockerignore', b'*.log\nnode_modules\nDockerfile\n.dockerignore\n'
                                    b'docs\n!docs/keep.md\n**/*.tmp\n')
        self.write('Dockerfile', b'FROM scratch\n')
        self.write('app.py', b'print(1)\n')
        self.write('debug.log')
        self.write('node_modules/lib/x.js')
        self.write('docs/keep.md', b'keep')
        self.write('docs/drop.md')
        self.write('src/main.py')
        self.write('src/cache.tmp')
        os.mkdir(os.path.join(self.dir, 'emptydir'))
        os.symlink('app.py', os.path.join(self.dir, 'link'))
        members, data = self.members()
        self.assertEqual(sorted(members), ['.dockerignore', 'Dockerfile', 'app.py', 'docs/keep.md',
                                           'emptydir', 'link', 'src', 'src/main.py'])
        self.assertTrue(members['link'].issym() and members['link'].linkname == 'app.py')
        self.assertTrue(members['emptydir'].isdir())
        for member in members.values():
            self.assertEqual((member.uid, member.gid, member.uname, member.gname), (0, 0, '', ''))
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            self.assertEqual(tar.extractfile('docs/keep.md').read(), b'keep')
            names = tar.getnames()
        self.assertEqual(names, sorted(names))  # sorted, directories before their contents

    def test_custom_dockerfile_in_ignored_folder(self):
        self.write('.dockerignore', b'docker\n')
        self.write('docker/Dockerfile.dev', b'FROM scratch\n')
        self.write('docker/other')
        members, _ = self.members(dockerfile='docker/Dockerfile.dev')
        self.assertEqual(sorted(members), ['.dockerignore', 'docker/Dockerfile.dev'])

    def test_wildcard_exception_inside_ignored_folder(self):
        self.write('.dockerignore', b'vendor\n!**/LICENSE\n')
        self.write('vendor/pkg/LICENSE')
        self.write('vendor/pkg/code.go')
        members, _ = self.members()
        self.assertEqual(sorted(members), ['.dockerignore', 'vendor/pkg/LICENSE'])

    def test_large_file_streams(self):
        self.write('Dockerfile', b'FROM scratch\n')
        size = 20 * 1024 * 1024
        with open(os.path.join(self.dir, 'big.bin'), 'wb') as f:
            block = b'0123456789abcdef' * 4096
            for _ in range(size // len(block)):
                f.write(block)
        sizes = []

        def counted():
            for chunk in convox.tar_context(self.dir):
                sizes.append(len(chunk))
                yield chunk

        with tarfile.open(fileobj=_ChunkReader(counted()), mode='r|') as tar:
            seen = dict((m.name, m.size) for m in tar)
        self.assertEqual(seen, {'Dockerfile': 13, 'big.bin': size})
        self.assertGreater(len(sizes), 100)
        self.assertLessEqual(max(sizes), 256 * 1024)

    def test_missing_context(self):
        with self.assertRaises(convox.ManifestError):
            convox.tar_context(os.path.join(self.dir, 'nope'))  # raised at call time, not iteration

    # A process that swaps, over and over, 20 files of the context for links to a secret
    # outside it, and a folder for a link to the secret's folder.  A process, not a thread:
    # a thread only runs while the walk lets go of the GIL, and then hardly ever hits the
    # window between lstat and open (0 leaks in 1,000 walks, against 38 with a process).
    FLIPPER = r"""
import os, sys
top, ctx = sys.argv[1], os.path.join(sys.argv[1], "context")
secret = os.path.join(top, "outside")
while True:
    for k in range(20):
        os.symlink(os.path.join(secret, "f"), os.path.join(top, "link"))
        os.rename(os.path.join(top, "link"), os.path.join(ctx, "f%d" % k))
    os.rename(os.path.join(ctx, "d"), os.path.join(top, "real"))
    os.symlink(secret, os.path.join(top, "dlink"))
    os.rename(os.path.join(top, "dlink"), os.path.join(ctx, "d"))
    for k in range(20):
        open(os.path.join(top, "file"), "w").write("public")
        os.rename(os.path.join(top, "file"), os.path.join(ctx, "f%d" % k))
    os.unlink(os.path.join(ctx, "d"))
    os.rename(os.path.join(top, "real"), os.path.join(ctx, "d"))
"""

    def flipping_context(self):
        """A context whose files f0..f19 and folder d (with d/f) FLIPPER swaps; -> (context,
        the flipper process)."""
        top = tempfile.mkdtemp(prefix='context-race-')
        self.addCleanup(shutil.rmtree, top)
        context, outside = os.path.join(top, 'context'), os.path.join(top, 'outside')
        os.makedirs(os.path.join(context, 'd'))
        os.mkdir(outside)
        for path, text in [(os.path.join(outside, 'f'), 'SECRET'), (os.path.join(context, 'd', 'f'),
                           'public'), (os.path.join(context, 'Dockerfile'), 'FROM scratch\n')] + \
                [(os.path.join(context, 'f%d' % k), 'public') for k in range(20)]:
            with open(path, 'w') as handle:
                handle.write(text)  # as long as the secret: a leak is not cut short
        flipper = subprocess.Popen([sys.executable, '-c', self.FLIPPER, top])
        self.addCleanup(flipper.wait)
        self.addCleanup(flipper.kill)
        return context, flipper

    def test_swapped_files_never_leak(self):
        """1,000 walks while files and a folder are swapped for links to a secret: the
        secret is never in the tar, and a walk that meets a swap fails with a local error."""
        context, flipper = self.flipping_context()
        leaks, failures, errors = 0, 0, set()
        for _ in range(1000):
            try:
                leaks += b'SECRET' in b''.join(convox.tar_context(context))
            except convox.ManifestError as exc:
                failures += 1
                self.assertRegex(str(exc), r'(changed while the build context was read|'
                                           r'cannot read).* — ')
            except Exception as exc:  # not local: would read as a broken engine stream
                errors.add(repr(exc))
        self.assertIsNone(flipper.poll(), 'the flipper stopped')
        sys.stderr.write('test: 1000 walks, %d leaks, %d ended with a local error\n'
                         % (leaks, failures))
        self.assertEqual((leaks, sorted(errors)), (0, []))
        self.assertLess(failures, 500)

    def test_sync_never_uploads_what_is_outside(self):
        """start's sync: 1,000 uploads of the swapped files and of d/f while they flip: the
        secret never reaches the tar sent to the container."""
        context, flipper = self.flipping_context()
        sent = []
        engine = types.SimpleNamespace(put_archive=lambda container, path, data: sent.append(
            b'SECRET' in data))
        target = convox.SyncTarget('web', 'c0ffee', types.SimpleNamespace(root=context), [])
        copy = types.SimpleNamespace(chown=None, chmod=None)
        uploads = [('/app/' + rel, rel, copy) for rel in ['d/f'] + ['f%d' % k for k in range(20)]]
        syncer = convox.Syncer(engine, None, [target])
        for _ in range(1000):
            syncer.upload(target, uploads)
        self.assertIsNone(flipper.poll(), 'the flipper stopped')
        sys.stderr.write('test: 1000 uploads, %d with the secret\n' % sum(sent))
        self.assertEqual((len(sent), sum(sent)), (1000, 0))

    def test_walk_errors_are_local(self):
        """A folder the user may list but not enter: the build fails naming it, as a local
        error, not as "the build stream from the engine broke"."""
        if os.geteuid() != 0:
            skip_unless_required(self, 'needs root to run the walk as another user')
        os.chmod(self.dir, 0o755)
        self.write('Dockerfile', b'FROM scratch\n')
        self.write('locked/file')
        os.chmod(os.path.join(self.dir, 'locked'), 0o644)  # r without x: lstat inside fails
        engine = FakeEngine()
        self.addCleanup(engine.close)
        os.chmod(engine.folder, 0o755)
        os.chmod(engine.url[len('unix://'):], 0o777)
        folder = tempfile.mkdtemp()  # nobody can read neither root's pyenv nor a 0700 folder
        self.addCleanup(shutil.rmtree, folder)
        os.chmod(folder, 0o755)
        shutil.copy(CONVOX, folder)
        python = '/usr/bin/python3' if os.path.exists('/usr/bin/python3') else sys.executable
        script = ('import sys; sys.path.insert(0, %r); import convox\n'
                  'engine = convox.Engine(convox.parse_rack(%r), {})\n'
                  'try:\n'
                  '    list(engine.build(convox.tar_context(%r), {}))\n'
                  'except convox.ConvoxError as exc:\n'
                  '    print(type(exc).__name__, exc)\n' % (folder, engine.url, self.dir))
        result = subprocess.run(['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups',
                                 python, '-c', script], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=60)
        self.assertRegex(result.stdout.decode(), r'^ManifestError cannot read .*locked/file: '
                                                 r'Permission denied — ', result.stderr)




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

    def test_detach_with_timeout_is_a_usage_error(self):
        """A detached one-off has no timeout: --timeout with --detach is refused, not
        silently ignored (it used to start a process that ran on past it)."""
        for argv in (["run", "--detach", "--timeout", "5", "web", "sleep", "60"],
                     ["run", "web", "-t", "0", "-d", "true"]):
            with self.subTest(argv=argv):
                status, out, err = self.main(argv, {"CONVOX_RACK": "unix:///nowhere.sock"})
                self.assertEqual((status, out), (2, ""))
                self.assertEqual(err, "ERROR: --timeout does not apply to --detach: a "
                                      "detached one-off runs until it ends or convox ps stop "
                                      "— leave one of them out\n")

    def test_permission_denied(self):
        if os.geteuid() != 0:
            skip_unless_required(self, "needs root to make a socket nobody may open")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "engine.sock")
        server = socket.socket(socket.AF_UNIX)
        server.bind(path)
        server.listen(1)
        self.addCleanup(server.close)
        os.chmod(path, 0o600)
        os.chmod(folder, 0o755)
        # nobody can run neither root's pyenv Pythons nor files in a 0700 folder: a copy of
        # convox.py in an open folder, and the system's python3 where there is one.
        shutil.copy(CONVOX, folder)
        os.chmod(os.path.join(folder, "convox.py"), 0o755)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        result = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python,
             os.path.join(folder, "convox.py"), "--rack", "unix://" + path, "ps"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(result.returncode, 1)
        err = result.stderr.decode()
        self.assertRegex(err, r"^ERROR: permission denied on unix://.*engine.sock — run as root")
        self.assertEqual(err.count("\n"), 1)


#: What a hostile neighbour puts in a label, an engine in its errors, a repository in its
#: manifest: OSC 52 (write the clipboard), OSC 0 (the title), conceal, a C1 CSI, a bidi
#: override, a line break.
HOSTILE = "\x1b]52;c;cHduZWQ=\x07\x1b]0;owned\x07\x1b[8mhidden\x9b0m\u202eevil\rX\nY"
TERMINAL_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class HostileTextTest(unittest.TestCase):
    """Foreign text reaches ERROR:, WARNING: and status lines escaped, never raw."""

    def main(self, argv, environ):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = convox.main(argv, environ)
        return status, err.getvalue()

    def assertSafe(self, text, kind="ERROR"):
        self.assertEqual(TERMINAL_CONTROL.findall(text), [], repr(text))
        self.assertIn("\\x1b]52;c;cHduZWQ=\\x07", text)
        self.assertIn("%s: " % kind, text)

    def fake(self, engine_class=None):
        engine = (engine_class or FakeEngine)()
        self.addCleanup(engine.close)
        return engine

    def test_label_in_apps_here(self):
        engine = self.fake()
        engine.add_container("evil" + HOSTILE, "web")
        status, err = self.main(["-a", "nosuch", "ps"], {"CONVOX_RACK": engine.url})
        self.assertEqual(status, 1)
        self.assertIn("apps here: evil", err)
        self.assertSafe(err)
        self.assertEqual(err.count("\n"), 1)

    def test_engine_error_text(self):
        class Hostile(FakeEngine):
            def route(self, handler, method, path, query, body):
                return self.reply(handler, 500, {"message": HOSTILE})
        url = self.fake(Hostile).url
        for debug in ("", "1"):  # CONVOX_DEBUG's traceback carries the message too
            status, err = self.main(["-a", "shop", "ps"], {"CONVOX_RACK": url,
                                                           "CONVOX_DEBUG": debug})
            self.assertEqual(status, 1)
            self.assertSafe(err)

    def test_manifest_key_warning(self):
        folder = tempfile.mkdtemp(prefix="convox-hostile-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "docker-compose.yml")
        with open(path, "w") as handle:
            handle.write('services:\n  web:\n    image: busybox\n'
                         '    "x\\e]52;c;cHduZWQ=\\a\\e]0;owned\\a": 1\n')
        status, err = self.main(["-a", "shop", "start", "-m", path],
                                {"CONVOX_RACK": "unix:///nowhere.sock"})
        self.assertEqual(status, 1)
        warning = [line for line in err.splitlines() if line.startswith("WARNING: ")]
        self.assertEqual(len(warning), 1, err)
        self.assertSafe(warning[0], "WARNING")

    def test_status_line(self):
        read, write = os.pipe()
        self.addCleanup(os.close, read)
        with open(write, "wb", closefd=True) as handle:
            convox.LogPrinter(["web"], handle.fileno()).say("web%s exited with code 3" % HOSTILE)
        line = os.read(read, 4096).decode("utf-8")
        self.assertTrue(line.startswith("convox | web") and line.endswith(" exited with code 3\n"))
        self.assertEqual(TERMINAL_CONTROL.findall(line[:-1]), [], repr(line))


class LauncherTest(unittest.TestCase):
    """Run by name, convox.py starts under /bin/sh and runs code compiled once per Python
    and version of the file, kept in $XDG_CACHE_HOME/convox."""

    def setUp(self):
        self.folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.folder)
        self.script = os.path.join(self.folder, "bin", "convox")
        os.mkdir(os.path.dirname(self.script))
        shutil.copy(CONVOX, self.script)
        os.chmod(self.script, 0o755)
        self.cache = os.path.join(self.folder, "cache")
        self.env = dict(os.environ, XDG_CACHE_HOME=self.cache, CONVOX_PYTHON=sys.executable)

    def launch(self, *args, **kwargs):
        return subprocess.run([self.script] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=kwargs.get("env", self.env),
                              cwd=kwargs.get("cwd", self.folder), timeout=60)

    def cached(self):
        folder = os.path.join(self.cache, "convox")
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    def test_compiles_once_then_runs_the_cached_code(self):
        first = self.launch("--version")
        self.assertEqual((first.returncode, first.stdout, first.stderr),
                         (0, ("convox.py %s\n" % convox.__version__).encode(), b""))
        [name] = self.cached()
        self.assertEqual(os.stat(os.path.join(self.cache, "convox")).st_mode & 0o777, 0o700)
        # The second run takes the cache's code, not the file's: replace it to see which ran.
        with open(os.path.join(self.cache, "convox", name), "wb") as handle:
            marshal.dump(compile("import sys; print('from cache', sys.argv[1:])", "x", "exec"),
                         handle)
        second = self.launch("ps", "--all")
        self.assertEqual(second.stdout, b"from cache ['ps', '--all']\n")

    def test_a_changed_file_replaces_its_cached_code(self):
        self.launch("--version")
        [old] = self.cached()
        with open(self.script, "a") as handle:
            handle.write("\n# changed\n")
        self.assertEqual(self.launch("--version").returncode, 0)
        [new] = self.cached()
        self.assertNotEqual(old, new)

    def test_runs_where_nothing_can_be_written(self):
        env = dict(self.env, XDG_CACHE_HOME="/proc/no-such-folder")
        result = self.launch("--version", env=env)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        self.assertEqual(self.cached(), [])

    def test_a_module_in_the_current_folder_does_not_shadow_the_standard_library(self):
        with open(os.path.join(self.folder, "json.py"), "w") as handle:
            handle.write("raise SystemExit('json.py from the current folder ran')\n")
        result = self.launch("--version")
        self.assertEqual((result.returncode, result.stderr), (0, b""))

    def test_start_up_leaves_ssl_to_tls_racks(self):
        # http.client would import ssl at every start; only TLS racks load it (ExecTLSTest).
        probe = ("import sys; sys.path.insert(0, %r); import convox, http.client; "
                 "print('ssl' in sys.modules, hasattr(http.client, 'HTTPSConnection'))" % HERE)
        result = subprocess.run([sys.executable, "-c", probe], stdout=subprocess.PIPE,
                                timeout=60)
        self.assertEqual(result.stdout, b"False False\n")

    def test_the_parser_does_not_load_what_only_help_needs(self):
        # argparse imports shutil (bz2, lzma, fnmatch) for every option it adds; ps parses
        # its times without time.strptime's module.  (Python 3.8's argparse imports shutil
        # as it loads: only what convox's use of it adds counts.)
        probe = ("import sys, argparse; before = set(sys.modules); "
                 "sys.path.insert(0, %r); import convox; "
                 "convox.parse_command_line(convox.build_parser(), ['exec', 'ID', 'true']); "
                 "convox.parse_timestamp('2026-12-02T10:00:00.5Z'); "
                 "print(sorted({'shutil', 'threading', '_strptime'} & set(sys.modules) - before))"
                 % HERE)
        result = subprocess.run([sys.executable, "-S", "-c", probe], stdout=subprocess.PIPE,
                                timeout=60)
        self.assertEqual(result.stdout, b"[]\n")
        usage = subprocess.run([sys.executable, CONVOX, "ps", "--help"], stdout=subprocess.PIPE,
                               env=dict(os.environ, COLUMNS="50"), timeout=60).stdout
        self.assertLessEqual(max(len(line) for line in usage.splitlines()), 48)
        self.assertGreater(len(usage.splitlines()), 12)  # wrapped at 48 columns

    def test_site_packages_hooks_do_not_run(self):
        # A .pth file in site-packages runs code at every start of the interpreter (some
        # import a package or two); convox.py needs nothing from there.
        user_base = os.path.join(self.folder, "user")
        site = subprocess.run(
            [sys.executable, "-c", "import site; print(site.getusersitepackages())"],
            stdout=subprocess.PIPE, env=dict(self.env, PYTHONUSERBASE=user_base),
            timeout=60).stdout.decode().strip()
        os.makedirs(site)
        with open(os.path.join(site, "hook.pth"), "w") as handle:
            handle.write("import sys; sys.stderr.write('the .pth hook ran\\n')\n")
        env = dict(self.env, PYTHONUSERBASE=user_base)
        hooked = subprocess.run([sys.executable, "-c", "pass"], stderr=subprocess.PIPE,
                                env=env, timeout=60)
        self.assertEqual(hooked.stderr, b"the .pth hook ran\n")  # the hook works
        result = self.launch("--version", env=env)
        self.assertEqual((result.returncode, result.stderr), (0, b""))

    def test_zipapp_with_the_loader_as_main_caches_its_code(self):
        # README's build: the launcher's loader lines are the zipapp's __main__.py.
        build = os.path.join(self.folder, "build")
        os.mkdir(build)
        shutil.copy(CONVOX, build)
        with open(CONVOX) as source, open(os.path.join(build, "__main__.py"), "w") as main:
            lines = source.read().splitlines(True)
            first = lines.index("import marshal, os, sys\n")
            main.writelines(lines[first:lines.index("exec(code)\n", first) + 1])
        pyz = os.path.join(self.folder, "convox.pyz")
        subprocess.run([sys.executable, "-m", "zipapp", build, "-o", pyz], check=True,
                       timeout=60)
        shutil.rmtree(build)

        def launch(*args, **kwargs):
            return subprocess.run([sys.executable, pyz] + list(args), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, env=kwargs.get("env", self.env),
                                  cwd=self.folder, timeout=60)

        result = launch("--version", env=dict(self.env, XDG_CACHE_HOME="/proc/no-such-folder"))
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, ("convox.py %s\n" % convox.__version__).encode(), b""))
        self.assertEqual(self.cached(), [])
        self.assertEqual(launch("--version").returncode, 0)
        [name] = self.cached()
        with open(os.path.join(self.cache, "convox", name), "wb") as handle:
            marshal.dump(compile("import sys; print('from cache', sys.argv[1:])", "x", "exec"),
                         handle)
        self.assertEqual(launch("ps", "--all").stdout, b"from cache ['ps', '--all']\n")

    def test_closed_stdout_and_stderr(self):
        # Python starts with sys.stdout (sys.stderr) None when its fd is closed.
        for fd in (1, 2):
            result = subprocess.run(
                ["sh", "-c", '"$0" --version %d>&-; echo "status $?" >&%d' % (fd, 3 - fd),
                 self.script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                cwd=self.folder, timeout=60)
            output = result.stderr if fd == 1 else result.stdout
            self.assertIn(b"status 0", output, result)
            self.assertNotIn(b"Traceback", result.stdout + result.stderr)

    def test_status_and_usage_errors_pass_through(self):
        result = self.launch("run")
        self.assertEqual(result.returncode, 2)
        self.assertRegex(result.stderr, b"^ERROR: run needs a service")


class HostileInputTest(unittest.TestCase):
    """Inputs that used to end in "…report it" (an uncaught exception): each is one clear
    ERROR: line now, found at once."""

    def main(self, argv, environ=None):
        err = io.StringIO()
        started = time.monotonic()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            status = convox.main(argv, environ or {"CONVOX_RACK": "unix:///nowhere.sock"})
        self.assertLess(time.monotonic() - started, 5)
        lines = err.getvalue().splitlines()
        self.assertEqual(len(lines), 1, err.getvalue())
        self.assertTrue(lines[0].startswith("ERROR: "), lines[0])
        self.assertNotIn("report it", lines[0])
        return status, lines[0]

    def engine(self, route):
        """A fake engine whose every control request after /_ping gets ``route``'s answer."""
        class Hostile(FakeEngine):
            def route(self, handler, method, path, query, body):
                return route(self, handler, path)
        engine = Hostile()
        engine.add_container("shop", "web")
        self.addCleanup(engine.close)
        return {"CONVOX_RACK": engine.url}

    def manifest(self, text):
        folder = tempfile.mkdtemp(prefix="convox-hostile-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "docker-compose.yml")
        with open(path, "w") as handle:
            handle.write(text)
        return path

    def test_redirect_to_a_control_request(self):
        environ = self.engine(lambda fake, handler, path: fake.reply(
            handler, 302, b"", headers={"Location": "http://elsewhere/"}))
        status, line = self.main(["-a", "shop", "ps"], environ)
        self.assertEqual(status, 1)
        self.assertRegex(line, r"answered 302 Found to GET /[a-z/]+ \(to http://elsewhere/\)")

    def test_json_nested_100000_deep(self):
        environ = self.engine(lambda fake, handler, path: fake.reply(
            handler, 200, b"[" * 100000 + b"]" * 100000))
        status, line = self.main(["-a", "shop", "ps"], environ)
        self.assertEqual(status, 1)
        self.assertIn("nested too deeply", line)

    def test_bad_started_at_offset(self):
        def route(fake, handler, path):
            if not re.match(r"/containers/[0-9a-f]+/json$", path):
                return FakeEngine.route(fake, handler, "GET", path, {}, {})
            info = fake.inspect(next(iter(fake.containers.values())))
            info["State"]["StartedAt"] = "2024-01-01T00:00:00.5+xx:yy"
            return fake.reply(handler, 200, info)
        status, line = self.main(["-a", "shop", "ps"], self.engine(route))
        self.assertEqual(status, 1)
        self.assertIn("malformed time", line)

    def test_manifests(self):
        depth = 100000
        cases = [
            ("services:\n  web: " + "[" * depth + "]" * depth + "\n", ":2: nested too deeply"),
            ("services:\n  web:\n    image: busybox\n    environment:\n      A: " +
             "${B:-" * depth + "x" + "}" * depth + "\n", "nested more than 32 deep"),
            ("services:\n  web:\n    image: busybox\n    mem_limit: .inf\n",
             "mem_limit must be a size"),
            ("services:\n  web:\n    image: busybox\n    mem_limit: .nan\n",
             "mem_limit must be a size"),
        ]
        for text, fragment in cases:
            with self.subTest(fragment):
                status, line = self.main(["-a", "shop", "start", "-m", self.manifest(text)])
                self.assertEqual(status, 1)
                self.assertIn(fragment, line)

    def test_run_timeout_beyond_what_select_takes(self):
        status, line = self.main(["-a", "shop", "run", "--timeout", "10000000000", "web", "true"])
        self.assertEqual(status, 2)
        self.assertIn("--timeout must be 0 (none) or a number of seconds up to 2147483647",
                      line)


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

    def test_inspects_are_pipelined_on_one_connection(self):
        app, ids = self.fixtures()
        engine = convox.Engine(convox.parse_rack(HARNESS.rack_url, {}), {})
        self.addCleanup(engine.close)
        idents = [ids["web"], "0" * 64, ids["worker"], ids["stopped"], "no such name"]
        found = engine.inspect_many(idents)
        self.assertEqual(list(found), idents)
        self.assertEqual([info and info["Id"] for info in found.values()],
                         [ids["web"], None, ids["worker"], ids["stopped"], None])
        self.assertEqual(found[ids["worker"]]["Args"], ["3601"])
        # The connection is left ready: the next request on it is answered.
        self.assertEqual(engine.inspect(ids["job"])["Id"], ids["job"])
        self.assertEqual(engine.connections, 1)
        # Windows of two over three connections: each window's answers from its own
        # connection, in order, the unknown ones too; the extra connections are closed.
        found = engine.inspect_many(idents + [ids["job"]], window=2, connections=3)
        self.assertEqual([info and info["Id"] for info in found.values()],
                         [ids["web"], None, ids["worker"], ids["stopped"], None, ids["job"]])
        self.assertEqual(engine.connections, 3)
        self.assertEqual(engine.inspect(ids["job"])["Id"], ids["job"])
        self.assertEqual(engine.connections, 3)

    def test_thousands_of_pipelined_inspects_do_not_jam(self):
        # 2,500 requests (~290 KB) are more than a socket holds: sent all at once, the
        # engine's answers would fill ours while it waits for us to read them.
        app, ids = self.fixtures()
        engine = convox.Engine(convox.parse_rack(HARNESS.rack_url, {}), {"CONVOX_TIMEOUT": "30"})
        self.addCleanup(engine.close)
        started = time.monotonic()
        found = engine.inspect_many([ids["web"]] * 2500)
        self.assertEqual([info["Id"] for info in found.values()], [ids["web"]])
        self.assertLess(time.monotonic() - started, 25)
        self.assertEqual(engine.connections, convox.PIPELINE_CONNECTIONS)

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
                      % convox.normalize_app_name(os.path.basename(folder)), message)
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
        self.assertEqual(engine.connections, min(  # the windows' connections
            convox.PIPELINE_CONNECTIONS, -(-count // convox.PIPELINE_WINDOW)))

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
    """A free port below the ephemeral range, so that no outgoing connection takes it
    between now and the engine publishing it."""
    while True:
        port = random.SystemRandom().randint(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


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
        # web logs its answer after sending it, so that line may still be on its way.
        for _ in deadline_loop(20, 0):
            plain = re.sub(r"\x1b\[\d+m", "", session.output.decode("utf-8", "replace"))
            if re.search(r"web    \| .*response:200", plain):
                break
            session.read_some(0.1)
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
        session.expect(r"convox \| (\x1b\[0m)?stopping \(press Ctrl-C again to force\)",
                       timeout=10)
        # Stopped and removed within 20 s; the services ignore SIGTERM (each is PID 1, as
        # in Compose), so that is the 10 s grace, a SIGKILL and the removal.
        self.assertEqual(session.wait(timeout=20), 0)
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
        # With no container of the app left, run falls back to the manifest and the last
        # build of the service (SPEC §6).
        result = self.convox("-a", app, "run", "web", "sh -c 'echo $GREETING; exit 5'",
                             cwd=folder, timeout=120)
        self.assertEqual((result.returncode, result.stdout), (5, b"from .env\n"),
                         result.stderr)
        self.assertEqual(self.processes_of(app), [])

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

    def test_line_with_no_end(self):
        """64 MiB with no newline from a service: printed in 64 KiB pieces, each a line,
        within 30 s (a quadratic buffer took 13.6 s for 40 MB and never ended 100 MB)."""
        app = app_name("longline")
        folder = self.app_dir("convox.yml", """\
services:
  long:
    image: {image}
    command: sh -c 'head -c 67108864 /dev/zero | tr "\\\\0" x; echo; echo end'
""".format(image=self.image))
        started = time.monotonic()
        try:
            result = self.convox("-a", app, "start", cwd=folder, timeout=90)
        except subprocess.TimeoutExpired:
            self.fail("no end within 90 s")
        seconds = time.monotonic() - started
        lines = result.stdout.split(b"\n")
        pieces = [line[len(b"long   | "):] for line in lines if line.startswith(b"long   | x")]
        self.assertEqual((len(pieces), sum(map(len, pieces)), max(map(len, pieces))),
                         (1024, 64 << 20, 64 << 10))
        self.assertEqual(set(b"".join(pieces)), {ord("x")})
        self.assertIn(b"long   | end", lines)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertLess(seconds, 30)
        sys.stderr.write("test: 64 MiB with no newline through start: %.1f s\n" % seconds)
        self.assertEqual(self.processes_of(app), [])

    COMPOSE_FEATURES = """\
x-common: &common
  environment:
    COMMON: shared by anchor
  labels:
    team: core
services:
  db:
    <<: *common
    image: {image}
    command: sh -c 'sleep 2; echo kept > /data/marker; touch /ready; echo db ready; sleep 3'
    healthcheck:
      test: ["CMD", "test", "-f", "/ready"]
      interval: 500ms
      retries: 60
    volumes:
      - vol:/data
  migrate:
    image: {image}
    command: sh -c 'sleep 1; echo done > /data/migrated'
    volumes: [vol:/data]
  web:
    <<: *common
    build:
      context: .
      target: app
    env_file: web.env
    command: sh -c 'echo "web= $$COMMON|$$URL|$$STAGE|$$(cat /data/marker /data/migrated)"'
    depends_on:
      db:
        condition: service_healthy
      migrate:
        condition: service_completed_successfully
    volumes: [vol:/data]
  debug:
    image: {image}
    profiles: [debug]
    command: echo debug ran
volumes:
  vol:
"""

    def test_compose_features(self):
        """An anchor + merge key, env_file with expansion, build.target, profiles, a named
        volume PROJECT_vol and depends_on service_healthy: web starts once db is healthy."""
        app = app_name("feat")
        volume = "%s_vol" % app
        self.addCleanup(lambda: self.engine.request("DELETE", "/volumes/%s" % volume,
                                                    {"force": "1"}))
        dockerfile = ("FROM {0} AS app\nENV STAGE=app-stage\n"
                      "FROM {0} AS other\nENV STAGE=wrong-stage\n").format(self.image)
        folder = self.app_dir("docker-compose.yml", self.COMPOSE_FEATURES.format(image=self.image), {
            "Dockerfile": dockerfile,
            "web.env": "DB_USER=admin\nURL=postgres://${DB_USER}@db/${DB_NAME:-app}\n"})
        result = self.convox("-a", app, "start", cwd=folder, timeout=120,
                             env={"COMPOSE_PROFILES": ""})
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 0, out + result.stderr.decode())
        self.assertIn("web     | web= shared by anchor|postgres://admin@db/app|app-stage|kept\n"
                      "web     | done\n", out)
        self.assertIn("convox  | migrate exited with code 0\n", out)
        # db writes the marker only just before it turns healthy, migrate its file just
        # before it ends: web, which prints both, started after that.
        self.assertLess(out.index("convox  | web waits for db (service_healthy)"),
                        out.index("convox  | starting web"))
        self.assertNotIn("debug", out)
        info = self.engine.request("GET", "/volumes/%s" % volume)
        self.assertEqual(info["Name"], volume)
        self.assertEqual(self.processes_of(app), [])

    def test_dependency_that_fails_its_condition(self):
        app = app_name("cond")
        folder = self.app_dir("compose.yaml", """\
services:
  tools:
    image: {image}
    profiles: [tools]
    command: echo tools ran
  migrate:
    image: {image}
    command: sh -c 'echo migrating; exit 3'
  web:
    image: {image}
    command: echo web ran
    depends_on:
      migrate: {{condition: service_completed_successfully}}
""".format(image=self.image))
        result = self.convox("-a", app, "start", cwd=folder, timeout=60)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertOneErrorLine(result)
        self.assertIn("ERROR: migrate exited with code 3, but web needs it to complete "
                      "successfully", result.stderr.decode())
        self.assertNotIn(b"web ran", result.stdout)
        # What the dependency said before it failed is there to read (not cut off).
        self.assertIn(b"migrate | migrating\n", result.stdout)
        self.assertNotIn(b"starting tools", result.stdout)  # not in an active profile
        self.assertEqual(self.processes_of(app), [])
        # --profile (or COMPOSE_PROFILES) starts the services of that profile too.
        for args, env in ((["--profile", "tools"], {}), ([], {"COMPOSE_PROFILES": "x,tools"})):
            result = self.convox("-a", app, "start", *args, cwd=folder, timeout=60, env=env)
            self.assertIn(b"convox  | starting tools\n", result.stdout)
            self.assertEqual(self.processes_of(app), [])

    def test_output_of_a_dependency_flows_while_it_is_waited_for(self):
        """A dependency that prints 1.3 MB before it turns healthy: its lines come as it
        prints them, before the service that waits for it starts (held back until every
        service had started, they filled the engine's buffers and stalled the dependency)."""
        app = app_name("chatty")
        folder = self.app_dir("compose.yaml", """\
services:
  chatty:
    image: {image}
    command: sh -c 'seq 1 200000; touch /ready; echo chatty ready; sleep 1'
    healthcheck:
      test: ["CMD", "test", "-f", "/ready"]
      interval: 500ms
      retries: 40
  web:
    image: {image}
    command: echo web ran
    depends_on:
      chatty: {{condition: service_healthy}}
""".format(image=self.image))
        result = self.convox("-a", app, "start", cwd=folder, timeout=60)
        out = result.stdout.decode()
        self.assertEqual(result.returncode, 0, out[-2000:] + result.stderr.decode())
        starting = out.index("convox | starting web\n")
        self.assertLess(out.index("chatty | 1\n"), starting)
        self.assertLess(out.index("chatty | 200000\n"), starting)
        self.assertLess(starting, out.index("web    | web ran\n"))
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


class StartOwnershipTest(EngineTestCase):
    """start removes and joins only what its own app's start made (never a neighbour's)."""

    app_dir = StartTest.app_dir

    MANIFEST = """\
services:
  db:
    image: {image}
    command: sh -c 'trap "exit 0" TERM; while true; do sleep 0.2; done'
"""

    def foreign_container(self, name):
        """Like `docker run -d --name NAME busybox sleep`: no convox labels at all."""
        ident = self.engine.create_container({
            "Image": self.image, "Cmd": ["sleep", "3600"], "Labels": {TEST_LABEL: RUN_ID}},
            name)["Id"]
        self.addCleanup(self.engine.remove, ident)
        self.engine.start(ident)
        return ident

    def network_names(self):
        return [n["Name"] for n in self.engine.request("GET", "/networks")]

    def first_start(self, app, folder, output):
        """A `convox start` left running; -> (its Popen, [the ID of its one service])."""
        first = subprocess.Popen([sys.executable, CONVOX, "-a", app, "start"], cwd=folder,
                                 env=HARNESS.env(), stdout=output, stderr=output)
        self.addCleanup(lambda: first.poll() is None and first.kill())
        for _ in deadline_loop(60, 0.2):
            running = [s["Id"] for s in self.processes_of(app) if s["State"] == "running"]
            if running:
                break
        self.assertEqual(len(running), 1)
        return first, running

    def test_foreign_container_named_like_a_service_survives(self):
        app = app_name("victim")
        victim = self.foreign_container(app + "-db")
        folder = self.app_dir("convox.yml", self.MANIFEST.format(image=self.image))
        result = self.convox("-a", app, "start", cwd=folder, timeout=60)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertOneErrorLine(result)
        self.assertIn("a container named %s-db exists that convox start did not make" % app,
                      result.stderr.decode())
        self.assertTrue(self.engine.inspect(victim)["State"]["Running"])
        self.assertNotIn(app, self.network_names())

    def test_foreign_network_is_not_joined(self):
        app = self.network("foreignnet")
        folder = self.app_dir("convox.yml", self.MANIFEST.format(image=self.image))
        result = self.convox("-a", app, "start", cwd=folder, timeout=60)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertOneErrorLine(result)
        self.assertIn("a network named %s exists that convox start did not make" % app,
                      result.stderr.decode())
        self.assertEqual(self.engine.request("GET", "/networks/%s" % app)["Containers"], {})
        self.assertEqual(self.processes_of(app), [])

    def test_run_from_the_manifest_does_not_join_a_foreign_network(self):
        """run's fallback to the manifest (no process of the app) joins the app's network
        only when start made it."""
        app = self.network("foreignrun")
        folder = self.app_dir("convox.yml", self.MANIFEST.format(image=self.image))
        result = self.convox("-a", app, "run", "--detach", "db", "sleep", "30", cwd=folder)
        self.assertEqual(result.returncode, 0, result.stderr)
        one_off = result.stdout.decode().split()[-1]
        self.addCleanup(self.engine.remove, one_off)
        self.assertNotIn(app, self.engine.inspect(one_off)["NetworkSettings"]["Networks"])
        self.assertEqual(self.engine.request("GET", "/networks/%s" % app)["Containers"], {})

    def test_second_start_says_running_and_touches_nothing(self):
        app = app_name("twice")
        folder = self.app_dir("convox.yml", self.MANIFEST.format(image=self.image))
        first, running = self.first_start(app, folder, subprocess.PIPE)
        result = self.convox("-a", app, "start", cwd=folder, timeout=60)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertOneErrorLine(result)
        self.assertIn("app %s is already running (%s-db" % (app, app), result.stderr.decode())
        self.assertEqual([s["Id"] for s in self.processes_of(app)], running)
        self.assertTrue(self.engine.inspect(running[0])["State"]["Running"])
        self.assertIn(app, self.network_names())
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=30)
        self.assertEqual(first.returncode, 0, out + err)
        self.assertEqual(self.processes_of(app), [])
        self.assertNotIn(app, self.network_names())

    def test_second_start_during_the_first_ones_build(self):
        """Both pass the check before their builds; the one whose build ends second says
        the app is running and leaves the network (and so the first one's services) alone."""
        app = app_name("race")
        folder = self.app_dir("convox.yml", "services:\n  db:\n    build: .\n"
                              "    command: %s\n" % StartLoopTest.LOOP, {
                                  "Dockerfile": "FROM %s\nRUN sleep 4 # %s\n" % (
                                      self.image, os.urandom(4).hex())})
        first = subprocess.Popen([sys.executable, CONVOX, "-a", app, "start"], cwd=folder,
                                 env=HARNESS.env(), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT)
        self.addCleanup(lambda: first.poll() is None and first.kill())
        time.sleep(2)
        result = self.convox("-a", app, "start", cwd=folder, timeout=60)
        self.assertEqual(result.returncode, 1, result.stdout)
        self.assertOneErrorLine(result)
        self.assertIn("app %s is already running (%s-db" % (app, app), result.stderr.decode())
        db = self.engine.inspect("%s-db" % app)
        self.assertTrue(db["State"]["Running"])
        self.assertEqual(list(db["NetworkSettings"]["Networks"]), [app])
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=30)
        self.assertEqual(first.returncode, 0, out)
        self.assertEqual(self.processes_of(app), [])
        self.assertNotIn(app, self.network_names())

    def test_leftovers_of_a_killed_start_are_replaced(self):
        app = app_name("leftover")
        folder = self.app_dir("convox.yml", self.MANIFEST.format(image=self.image))
        first, running = self.first_start(app, folder, subprocess.DEVNULL)
        first.kill()
        first.wait()
        self.engine.stop(running[0], grace=1)  # what `convox ps stop` does
        result = self.convox("-a", app, "start", "db", "true", cwd=folder, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.processes_of(app), [])
        self.assertNotIn(app, self.network_names())


class StartLoopTest(EngineTestCase):
    """start as a development loop: services by name, nothing left behind, sync."""

    app_dir = StartTest.app_dir

    #: A service that ends at once on SIGTERM (a busybox sleep as PID 1 would ignore it).
    LOOP = "sh -c 'trap \"exit 0\" TERM; while true; do sleep 0.2; done'"

    def start(self, app, folder, *words, running=1, env=None):
        """`convox start` in the background, once ``running`` services of it run."""
        proc = subprocess.Popen([sys.executable, CONVOX, "-a", app, "start"] + list(words),
                                cwd=folder, env=HARNESS.env(**(env or {})),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        proc.lines, proc.times = [], []  # each line, and when it came

        def read():
            for line in iter(proc.stdout.readline, b""):
                proc.times.append(time.monotonic())
                proc.lines.append(line)
        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        proc.reader = reader
        for _ in deadline_loop(120, 0.1):
            summaries = [s for s in self.processes_of(app, "service")
                         if s["State"] == "running"]
            if len(summaries) >= running or proc.poll() is not None:
                break
        self.assertGreaterEqual(len(summaries), running, b"".join(proc.lines))
        return proc

    def stop(self, proc):
        """Ctrl-C; -> everything it printed, as text."""
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(30), 0, b"".join(proc.lines))
        proc.reader.join(10)
        proc.stdout.close()
        return b"".join(proc.lines).decode("utf-8", "replace")

    def network_names(self):
        return [n["Name"] for n in self.engine.request("GET", "/networks")]

    def test_services_by_name(self):
        app = app_name("named")
        folder = self.app_dir("convox.yml", "services:\n" + "".join(
            "  %s:\n    image: %s\n    command: %s\n" % (name, self.image, self.LOOP)
            for name in ("web", "worker", "cron")))
        proc = self.start(app, folder, "web", "worker", running=2)
        time.sleep(0.5)
        services = sorted(convox.identity(s["Labels"])[1] for s in self.processes_of(app))
        self.assertEqual(services, ["web", "worker"])
        out = self.stop(proc)
        self.assertIn("convox | stopping (press Ctrl-C again to force)\n", out)
        self.assertEqual(self.processes_of(app), [])

    def test_network_removed_with_a_detached_one_off_on_it(self):
        app = app_name("netoff")
        folder = self.app_dir("convox.yml", "services:\n  web:\n    image: %s\n"
                              "    command: %s\n" % (self.image, self.LOOP))
        proc = self.start(app, folder)
        result = self.convox("-a", app, "run", "--detach", "web", "sleep", "60", cwd=folder)
        self.assertEqual(result.returncode, 0, result.stderr)
        one_off = result.stdout.decode().split()[-1]
        self.addCleanup(self.engine.remove, one_off)
        self.assertIn(app, self.engine.inspect(one_off)["NetworkSettings"]["Networks"])
        self.stop(proc)
        self.assertNotIn(app, self.network_names())
        self.assertTrue(self.engine.inspect(one_off)["State"]["Running"])

    def test_three_rounds_keep_two_tags(self):
        app = app_name("tags")
        folder = self.app_dir("convox.yml", "services:\n  web:\n    build: .\n"
                              "    command: %s\n" % self.LOOP)
        releases = []
        for _ in range(3):
            proc = self.start(app, folder)
            releases.append(self.processes_of(app)[0]["Labels"]["convox.release"])
            self.stop(proc)
        tags = [tag for image in self.engine.request("GET", "/images/json")
                for tag in image.get("RepoTags") or [] if tag.startswith(app + "/web:")]
        self.assertEqual(sorted(tags), sorted("%s/web:%s" % (app, r) for r in releases[1:]))

    SYNC_DOCKERFILE = """\
FROM {image}
RUN mkdir -p /etc && echo app:x:1234:1234::/:/bin/sh > /etc/passwd && \\
    echo app:x:1234: > /etc/group
WORKDIR /app
COPY src/ ./code/
COPY --chown=app:app conf.txt settings/
"""

    def sync_app(self, suffix, *words):
        """A started app whose web service copies src/ to /app/code and conf.txt."""
        app = app_name(suffix)
        folder = self.app_dir("convox.yml", "services:\n  web:\n    build: .\n"
                              "    command: %s\n" % self.LOOP, {
                                  "Dockerfile": self.SYNC_DOCKERFILE.format(image=self.image),
                                  "conf.txt": "conf-1\n"})
        os.mkdir(os.path.join(folder, "src"))
        for name, text in (("a.txt", "one\n"), ("c.txt", "gone soon\n"),
                           ("old/d.txt", "gone with its folder\n")):
            self.write(folder, "src/" + name, text)
        proc = self.start(app, folder, *words)
        container = self.processes_of(app)[0]["Id"]
        return proc, folder, container

    def write(self, folder, rel, text):
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)

    def inside(self, container, *command):
        """(status, stdout) of a command in the container, through the Docker CLI."""
        result = self.docker("exec", container, *command)
        return result.returncode, result.stdout.decode()

    def sync_lines(self, proc):
        return [line.decode() for line in proc.lines if b"convox | sync " in line]

    def test_sync_edit_add_delete(self):
        proc, folder, container = self.sync_app("sync")
        time.sleep(1.2)  # the build's files are where the Dockerfile put them, unsynced
        self.assertEqual(self.inside(container, "cat", "/app/code/a.txt"), (0, "one\n"))
        self.assertEqual(self.sync_lines(proc), [])
        began = time.monotonic()
        self.write(folder, "src/a.txt", "two\n")
        self.write(folder, "src/new/b.txt", "bee\n")
        os.remove(os.path.join(folder, "src/c.txt"))
        shutil.rmtree(os.path.join(folder, "src/old"))  # a folder and a file: one file
        self.write(folder, "conf.txt", "conf-2\n")
        for _ in deadline_loop(3, 0.02):
            if self.sync_lines(proc):
                break
        self.assertEqual(self.sync_lines(proc), ["convox | sync web: 5 files\n"])
        # The line is printed once the engine has unpacked the files.
        came = proc.times[[line.decode() for line in proc.lines].index(
            "convox | sync web: 5 files\n")]
        self.assertLess(came - began, 3.0)
        self.assertEqual(self.inside(container, "cat", "/app/code/a.txt"), (0, "two\n"))
        self.assertEqual(self.inside(container, "cat", "/app/code/new/b.txt"), (0, "bee\n"))
        self.assertEqual(self.inside(container, "ls", "/app/code"), (0, "a.txt\nnew\n"))
        self.assertEqual(self.inside(container, "stat", "-c", "%u:%g %n",
                                     "/app/settings/conf.txt"),
                         (0, "1234:1234 /app/settings/conf.txt\n"))
        self.assertEqual(self.inside(container, "cat", "/app/settings/conf.txt"),
                         (0, "conf-2\n"))
        self.stop(proc)

    def test_no_sync(self):
        proc, folder, container = self.sync_app("nosync", "--no-sync")
        self.write(folder, "src/a.txt", "two\n")
        time.sleep(4)
        self.assertEqual(self.inside(container, "cat", "/app/code/a.txt"), (0, "one\n"))
        self.stop(proc)
        self.assertEqual(self.sync_lines(proc), [])

    def test_burst_of_500_files_in_one_sync(self):
        proc, folder, container = self.sync_app("burst")
        time.sleep(1.2)
        for index in range(500):
            self.write(folder, "src/burst/f%03d" % index, "%d\n" % index)
        for _ in deadline_loop(5, 0.1):
            if self.sync_lines(proc):
                break
        time.sleep(1.5)  # a second line would come within this
        self.assertEqual(self.sync_lines(proc), ["convox | sync web: 500 files\n"])
        status, out = self.inside(container, "sh", "-c", "cat /app/code/burst/*")
        self.assertEqual(out, "".join("%d\n" % index for index in range(500)))
        self.stop(proc)

    def test_interrupted_build_leaves_no_container(self):
        app = app_name("buildint")
        marker = "m%s" % os.urandom(4).hex()
        folder = self.app_dir("convox.yml", "services:\n  web:\n    build: .\n",
                              {"Dockerfile": "FROM %s\nRUN sleep 30 # %s\n" % (self.image,
                                                                              marker)})
        proc = subprocess.Popen([sys.executable, CONVOX, "-a", app, "start"], cwd=folder,
                                env=HARNESS.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())

        def building():
            return [c for c in self.engine.containers(all=True)
                    if marker in (c.get("Command") or "")]
        for _ in deadline_loop(60, 0.1):
            if building():
                break
        self.assertTrue(building(), "the build's RUN step never started")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 130)
        for _ in deadline_loop(20, 0.2):
            if not building():
                break
        self.assertEqual(building(), [])
        self.assertEqual(self.processes_of(app), [])


# ==========================================================================================
# The real engine and real terminals: exec
# ==========================================================================================

# ==========================================================================================
# exec's stream ends and statuses, on socketpairs and pipes
# ==========================================================================================

class ExecStreamEndTest(unittest.TestCase):
    """What the engine side of the socket sees when our stdin ends, and the 126/127 rule."""

    def pump_with_input(self, data, tty):
        """Run pump over a socketpair with ``data`` then EOF on stdin; the engine side
        answers once it has read what it expects -> (bytes it read, our stdout, outcome)."""
        ours, engine = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(engine.close)
        stdin_r, stdin_w = os.pipe()
        out_r, out_w = os.pipe()
        for fd in (stdin_r, out_r, out_w):
            self.addCleanup(os.close, fd)
        os.write(stdin_w, data)
        os.close(stdin_w)
        received = []

        def engine_side():
            got = b""
            try:
                engine.settimeout(10)
                want = len(data) + (1 if tty and data.endswith(b"\n") else 2 if tty else 0)
                while len(got) < want or not tty:
                    chunk = engine.recv(100)
                    if not chunk:
                        received.append("half-closed")
                        break
                    got += chunk
                payload = b"out" if tty else struct.pack(">BxxxL", 1, 3) + b"out"
                engine.sendall(payload)
            finally:
                received.insert(0, got)
                engine.close()

        thread = threading.Thread(target=engine_side)
        thread.start()
        outcome = convox.pump(convox.Hijacked(ours, b"", ""), tty=tty, stdin_fd=stdin_r,
                              stdout_fd=out_w, deadline=time.monotonic() + 15)
        thread.join(15)
        return received, os.read(out_r, 100), outcome

    def test_tty_eof_is_ctrl_d(self):
        # A half-close would make the engine hang the far terminal up and drop its output.
        self.assertEqual(self.pump_with_input(b"hi\n", tty=True),
                         ([b"hi\n\x04"], b"out", "eof"))
        self.assertEqual(self.pump_with_input(b"hi", tty=True),  # flush the line, then EOF
                         ([b"hi\x04\x04"], b"out", "eof"))

    def test_pipe_eof_is_half_close(self):
        self.assertEqual(self.pump_with_input(b"hi\n", tty=False),
                         ([b"hi\n", "half-closed"], b"out", "eof"))

    def test_cannot_run_statuses(self):
        docker = (b"OCI runtime exec failed: exec failed: unable to start container process: "
                  b"exec: \"%s\": %s: unknown\r\n")
        cases = [
            (126, docker % (b"x", b"executable file not found in $PATH"), 127),
            (126, docker % (b"/x", b"stat /x: no such file or directory"), 127),
            (126, docker % (b"/etc", b"permission denied"), 126),
            (126, b"cat: can't open '/x': No such file or directory\n", 126),
            (127, b"sh: permission denied\n", 127),
            (1, docker % (b"x", b"executable file not found in $PATH"), 1),
            (0, b"", 0),
        ]
        for code, output, status in cases:
            with self.subTest(output=output):
                self.assertEqual(convox.exit_status(code, output), status)


# ==========================================================================================
# The real engine: exec without a TTY, the Docker CLI as oracle
# ==========================================================================================

class ExecFixtures:
    """Mixed into the exec tests' engine test cases."""

    def process(self, app, service, *args, **options):
        """A fixture container without networking: exec needs none, and it starts faster."""
        return self.container(app, service, *args, network="none", **options)


class ExecPipeTest(ExecFixtures, EngineTestCase):
    """``convox exec`` over pipes, side by side with ``docker exec -i`` doing the same."""

    def target(self, suffix, **options):
        """(app, container ID) of a fresh running process of service web."""
        app = app_name(suffix)
        return app, self.process(app, "web", **options)

    def both(self, app, ident, command, input=b"", options=(), timeout=60):
        """The same command through convox and through docker exec -i -> (convox, docker).

        ``input`` is always given: an inherited stdin (the runner's terminal) would be
        forwarded to the process.
        """
        mine = self.convox("-a", app, "exec", *options, ident, *command, input=input,
                           timeout=timeout)
        theirs = self.docker("exec", "-i", *options, ident, *command, input=input,
                             timeout=timeout)
        return mine, theirs

    def test_stdout_and_stderr_stay_apart(self):
        app, ident = self.target("xsep")
        script = ("printf 'o1\\n'; printf 'e1\\n' >&2; printf '\\000\\001\\377o2'; "
                  "printf 'e2\\000' >&2; printf '\\r\\n'")
        mine, theirs = self.both(app, ident, ["sh", "-c", script])
        self.assertEqual((mine.returncode, mine.stdout, mine.stderr),
                         (0, b"o1\n\0\1\xffo2\r\n", b"e1\ne2\0"))
        self.assertEqual((theirs.returncode, theirs.stdout, theirs.stderr),
                         (mine.returncode, mine.stdout, mine.stderr))

    def test_exit_statuses(self):
        app, ident = self.target("xstatus")
        for code in (0, 1, 7, 126, 127, 255):
            with self.subTest(code=code):
                mine, theirs = self.both(app, ident, ["sh", "-c", "exit %d" % code])
                self.assertEqual((mine.returncode, theirs.returncode), (code, code))
                self.assertEqual(mine.stderr, b"")
        # A process's own 126/127 stays its own, even when its output reads like an
        # engine's "cannot run" message.
        for script, code in (("cat /nowhere; exit 126", 126),
                             ("echo permission denied >&2; exit 127", 127),
                             ("echo executable file not found; exit 126", 126)):
            with self.subTest(script=script):
                mine, theirs = self.both(app, ident, ["sh", "-c", script])
                self.assertEqual((mine.returncode, theirs.returncode), (code, code))
                self.assertEqual((mine.stdout, mine.stderr), (theirs.stdout, theirs.stderr))

    def test_cannot_run(self):
        app, ident = self.target("xnoexec")
        made = self.convox("-a", app, "exec", ident,
                           "printf '#!/bin/sh\\necho ran\\n' >/script && chmod 644 /script",
                           input=b"")
        self.assertEqual(made.returncode, 0, made.stderr)
        # SPEC §6: 127 not found, 126 not executable.  docker exec says 126 for both (its
        # message tells them apart); what it said is kept in the failure message.
        for command, code in ((["nosuchcommand"], 127), (["/nowhere/cmd", "x"], 127),
                              (["/script"], 126), (["/bin"], 126)):
            with self.subTest(command=command):
                mine, theirs = self.both(app, ident, command)
                self.assertEqual(mine.returncode, code, (mine, "docker: %r" % (theirs,)))
                self.assertNotEqual(theirs.returncode, 0)
                self.assertEqual(mine.stdout + mine.stderr, theirs.stdout + theirs.stderr)
                self.assertNotIn(b"Traceback", mine.stderr)

    def test_binary_both_directions(self):
        app, ident = self.target("xbinary")
        data = os.urandom(16 * 1024 * 1024)
        digest = hashlib.sha256(data).hexdigest()
        # Up and back through cat.
        mine, theirs = self.both(app, ident, ["cat"], input=data)
        self.assertEqual(mine.returncode, 0, mine.stderr)
        self.assertEqual(hashlib.sha256(mine.stdout).hexdigest(), digest)
        self.assertEqual(hashlib.sha256(theirs.stdout).hexdigest(), digest)
        # Up: the file the process wrote has the same digest inside the container.
        up = self.convox("-a", app, "exec", ident, "sh", "-c", "cat >/blob && sha256sum /blob",
                         input=data)
        self.assertEqual((up.returncode, up.stdout.split()[:1]), (0, [digest.encode()]))
        # Down: read back from the file, by us and by docker.
        mine, theirs = self.both(app, ident, ["cat", "/blob"])
        self.assertEqual(hashlib.sha256(mine.stdout).hexdigest(), digest)
        self.assertEqual(mine.stdout, theirs.stdout)
        # A reader that stalls for a while loses nothing: the engine is slowed, not dropped.
        slow = subprocess.Popen([sys.executable, CONVOX, "-a", app, "exec", ident, "cat",
                                 "/blob"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                env=HARNESS.env())
        try:
            time.sleep(1)
            received = hashlib.sha256()
            for _ in range(len(data) // 65536 + 2):
                piece = slow.stdout.read(65536)
                if not piece:
                    break
                received.update(piece)
                time.sleep(0.0005)
            self.assertEqual((slow.wait(30), received.hexdigest()), (0, digest))
        finally:
            if slow.poll() is None:
                slow.kill()
                slow.wait()
            slow.stdout.close()

    def test_stdin_eof_reaches_the_process(self):
        app, ident = self.target("xeof")
        shell = subprocess.run(
            ["sh", "-c", 'echo hi | "$0" "$1" -a "$2" exec "$3" cat',
             sys.executable, CONVOX, app, ident],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30, env=HARNESS.env())
        self.assertEqual((shell.returncode, shell.stdout, shell.stderr), (0, b"hi\n", b""))
        mine, theirs = self.both(app, ident, ["wc", "-c"], input=b"abc")
        self.assertEqual((mine.returncode, mine.stdout.strip()), (0, b"3"))
        self.assertEqual(mine.stdout, theirs.stdout)
        # No stdin at all (closed fd 0): the process sees EOF at once.
        closed = subprocess.run([sys.executable, CONVOX, "-a", app, "exec", ident, "cat"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, timeout=30, env=HARNESS.env())
        self.assertEqual((closed.returncode, closed.stdout), (0, b""))

    def test_stdin_from_a_file_goes_by_sendfile(self):
        app, ident = self.target("xfile")
        data = os.urandom(3 * 1024 * 1024 + 17)
        with tempfile.NamedTemporaryFile() as handle:
            handle.write(data)
            handle.flush()
            argv = [sys.executable, CONVOX, "-a", app, "exec", ident]
            # From where the file's offset stands, as a read would: a script that read its
            # first bytes itself hands on the rest.
            with open(handle.name, "rb") as source:
                source.seek(1000)
                result = subprocess.run(argv + ["sha256sum"], stdin=source,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        timeout=60, env=HARNESS.env())
                self.assertEqual(source.tell(), len(data))
            self.assertEqual((result.returncode, result.stderr), (0, b""))
            self.assertEqual(result.stdout.split()[0].decode(),
                             hashlib.sha256(data[1000:]).hexdigest())
            # A process that reads a little and exits: no hang, its status.
            with open(handle.name, "rb") as source:
                result = subprocess.run(argv + ["sh", "-c", "head -c 5 >/dev/null; exit 3"],
                                        stdin=source, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, timeout=60, env=HARNESS.env())
            self.assertEqual((result.returncode, result.stderr), (3, b""))
            if shutil.which("strace"):
                log = os.path.join(tempfile.mkdtemp(), "log")
                self.addCleanup(shutil.rmtree, os.path.dirname(log))
                with open(handle.name, "rb") as source:
                    subprocess.run(["strace", "-f", "-o", log, "-e", "trace=sendfile,readv"]
                                   + argv + ["sh", "-c", "cat >/dev/null"], stdin=source,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   timeout=60, env=HARNESS.env(), check=True)
                with open(log) as trace:
                    calls = trace.read()
                self.assertIn("sendfile(", calls)
                self.assertNotIn("readv(0,", calls)

    def test_forced_tty_over_pipes(self):
        app, ident = self.target("xforced")
        script = "tty >/dev/null && echo x; sleep 0.5; echo y; exit 3"
        mine = self.convox("-a", app, "exec", "--tty", ident, "sh", "-c", script, input=b"")
        theirs = self.docker("exec", "-t", ident, "sh", "-c", script, input=b"")
        self.assertEqual((mine.returncode, mine.stdout, mine.stderr), (3, b"x\r\ny\r\n", b""))
        self.assertEqual((theirs.returncode, theirs.stdout), (mine.returncode, mine.stdout))
        # Input that ends: the terminal's EOF (^D) reaches the process, the echo stays.
        for data, out in ((b"hi\n", b"hi\r\nhi\r\n"), (b"hi", b"hihi")):
            with self.subTest(data=data):
                result = self.convox("-a", app, "exec", "--tty", ident, "cat", input=data,
                                     timeout=30)
                self.assertEqual((result.returncode, result.stdout), (0, out))

    def test_fast_exit_keeps_every_byte(self):
        app, ident = self.target("xfast")
        command = ["sh", "-c", "head -c 1000000 /dev/urandom; head -c 999 /dev/zero >&2"]
        failures = []

        def one(run):
            result = self.convox("-a", app, "exec", ident, *command, input=b"", timeout=30)
            got = (result.returncode, len(result.stdout), len(result.stderr))
            if got != (0, 1000000, 999):
                failures.append((run, got, result.stderr[-300:]))

        runs = list(range(20))
        while runs:  # four at a time: quicker, and the engine is busier
            threads = [threading.Thread(target=one, args=(run,)) for run in runs[:4]]
            del runs[:4]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
        self.assertEqual(failures, [])

    def test_interleaved_lines(self):
        app, ident = self.target("xlines")
        # 200,000 lines, odd ones to stdout and even ones to stderr, flushed in small bursts.
        script = ('seq 1 200000 | awk \'{ if ($1 % 2) print "out " $1; '
                  'else print "err " $1 > "/dev/stderr"; if ($1 % 500 == 0) fflush() }\'')
        mine, theirs = self.both(app, ident, ["sh", "-c", script])
        want_out = b"".join(b"out %d\n" % n for n in range(1, 200001, 2))
        want_err = b"".join(b"err %d\n" % n for n in range(2, 200001, 2))
        self.assertEqual(mine.returncode, 0, mine.stderr[-300:])
        self.assertTrue(mine.stdout == want_out, "stdout: %d bytes, %r..." % (
            len(mine.stdout), mine.stdout[-60:]))
        self.assertTrue(mine.stderr == want_err, "stderr: %d bytes, %r..." % (
            len(mine.stderr), mine.stderr[-60:]))
        self.assertTrue(theirs.stdout == want_out and theirs.stderr == want_err)

    def test_closed_pipe_ends_quietly(self):
        app, ident = self.target("xhead")
        for command in (["yes"], ["cat", "/dev/zero"]):
            with self.subTest(command=command):
                producer = subprocess.Popen(
                    [sys.executable, CONVOX, "-a", app, "exec", ident] + command,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env=HARNESS.env())
                head = subprocess.Popen(["head", "-c", "10"], stdin=producer.stdout,
                                        stdout=subprocess.PIPE)
                producer.stdout.close()
                try:
                    out, _ = head.communicate(timeout=20)
                    err = producer.stderr.read()
                    status = producer.wait(timeout=20)
                finally:
                    for proc in (producer, head):
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
                    producer.stderr.close()
                self.assertEqual(len(out), 10)
                self.assertEqual(err, b"")
                self.assertIn(status, (141, -signal.SIGPIPE))

    def test_targets(self):
        app = app_name("xtarget")
        self.process(app, "web", env=["WHO=web"])
        worker = self.process(app, "worker", env=["WHO=worker"])
        named = app_name("xtarget-named")
        self.process(app, "cron", env=["WHO=named"], name=named)
        for target, who in (("web", b"web\n"), (worker[:12], b"worker\n"),
                            (worker, b"worker\n"), (named, b"named\n")):
            with self.subTest(target=target):
                result = self.convox("-a", app, "exec", target, "sh", "-c", "echo $WHO",
                                     input=b"")
                self.assertEqual((result.returncode, result.stdout, result.stderr),
                                 (0, who, b""))
        # One word with whitespace runs in sh -c; several words are argv, never re-joined.
        result = self.convox("-a", app, "exec", "web", "echo $WHO && echo two", input=b"")
        self.assertEqual(result.stdout, b"web\ntwo\n")
        result = self.convox("-a", app, "exec", "web", "printf", "[%s]", "a b", "$WHO",
                             input=b"")
        self.assertEqual(result.stdout, b"[a b][$WHO]")
        # Options after TARGET, and the command's own options left alone.
        result = self.convox("-a", app, "exec", "web", "-e", "X=1", "sh", "-c", "echo $X",
                             input=b"")
        self.assertEqual(result.stdout, b"1\n")

    def test_bad_input(self):
        app, ident = self.target("xbad")
        stopped = self.process(app, "cron", ("true",))
        for _ in deadline_loop(20):
            if not self.engine.inspect(stopped)["State"]["Running"]:
                break
        created = self.process(app, "idle", start=False)
        cases = [
            (["nosuchcontainer", "ls"], 125, "no such process or service"),
            ([stopped[:12], "ls"], 125, "not running"),
            ([created, "ls"], 125, "not running"),
            (["nosuchservice", "ls"], 125, "nosuchservice"),
            ([ident], 2, "needs a process and a command"),
            ([ident, "--"], 2, "needs a process and a command"),
            (["--bogus", ident, "ls"], 2, "--bogus"),
            (["--detach-keys", "meta-x", ident, "ls"], 2, "invalid detach keys"),
        ]
        for words, status, text in cases:
            with self.subTest(words=words):
                result = self.convox("-a", app, "exec", *words, input=b"", timeout=30)
                self.assertEqual(result.returncode, status, result.stderr)
                self.assertOneErrorLine(result)
                self.assertIn(text, result.stderr.decode())
                self.assertEqual(result.stdout, b"")

    def test_env_workdir_user(self):
        app, ident = self.target("xopts", env=["B=from-image"])
        script = 'echo "$A|$B|$C|$(pwd)|$(id -u):$(id -g)"'
        options = ["--env", "A=1", "-e", "C=x y", "-w", "/bin", "-u", "1234:5678"]
        mine, theirs = self.both(app, ident, ["sh", "-c", script], options=options)
        self.assertEqual((mine.returncode, mine.stdout),
                         (0, b"1|from-image|x y|/bin|1234:5678\n"))
        self.assertEqual(mine.stdout, theirs.stdout)
        mine, theirs = self.both(app, ident, ["sh", "-c", script],
                                 options=["--env", "B=override", "--user", "7"])
        self.assertEqual(mine.stdout, b"|override||/|7:0\n")
        self.assertEqual(mine.stdout, theirs.stdout)


# ==========================================================================================
# Real terminals: exec with a TTY
# ==========================================================================================

class TLSEngine:
    """A TLS endpoint for the real engine, made for the test: certificates from ``openssl``
    (a CA, the engine's for 127.0.0.1, a client's, and a stranger CA), and a proxy that
    requires the client's certificate and passes bytes to the engine's UNIX socket, each
    direction's end included (close_notify <-> shutdown(SHUT_WR)), as dockerd's own TLS
    listener does.  ``close()`` stops it and removes the folder."""

    def __init__(self, engine_socket):
        self.engine_socket = engine_socket
        self.folder = tempfile.mkdtemp(prefix="convox-test-tls-")
        try:
            self._certificates()
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.path("server-cert.pem"), self.path("server-key.pem"))
            context.load_verify_locations(self.path("ca.pem"))
            context.verify_mode = ssl.CERT_REQUIRED
            self.context = context
            self.listener = socket.socket()
            self.listener.bind(("127.0.0.1", 0))
            self.listener.listen(16)
            self.url = "tcp://127.0.0.1:%d" % self.listener.getsockname()[1]
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.stopping = threading.Event()
        self.threads = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def path(self, name):
        return os.path.join(self.folder, name)

    def _openssl(self, *args):
        subprocess.run(["openssl"] + list(args), cwd=self.folder, check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _certificates(self):
        key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        for ca in ("ca", "stranger-ca"):
            self._openssl("req", "-x509", *key, "-keyout", ca + "-key.pem", "-out", ca + ".pem",
                          "-days", "2", "-subj", "/CN=convox test " + ca)
        for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"),
                                ("client", "extendedKeyUsage=clientAuth\n")):
            with open(self.path(name + ".ext"), "w") as handle:
                handle.write(extension)
            self._openssl("req", *key, "-keyout", name + "-key.pem", "-out", name + ".csr",
                          "-subj", "/CN=" + name)
            self._openssl("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey",
                          "ca-key.pem", "-set_serial", str(len(name)), "-days", "2",
                          "-extfile", name + ".ext", "-out", name + "-cert.pem")

    def cert_path(self, ca="ca.pem"):
        """A DOCKER_CERT_PATH folder: ``ca`` as ca.pem, the client's cert.pem and key.pem."""
        folder = tempfile.mkdtemp(dir=self.folder)
        shutil.copy(self.path(ca), os.path.join(folder, "ca.pem"))
        shutil.copy(self.path("client-cert.pem"), os.path.join(folder, "cert.pem"))
        shutil.copy(self.path("client-key.pem"), os.path.join(folder, "key.pem"))
        return folder

    def _serve(self):
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._relay, args=(client,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _relay(self, client):
        """One connection, in one thread (an SSL object is not for two at once)."""
        import ssl
        engine = socket.socket(socket.AF_UNIX)
        try:
            client.settimeout(10)
            tls = self.context.wrap_socket(client, server_side=True)
            engine.connect(self.engine_socket)
        except (OSError, ssl.SSLError):
            client.close()
            engine.close()
            return
        tls.setblocking(False)
        engine.setblocking(False)
        to_engine, to_client = b"", b""
        client_open = engine_open = True
        try:
            while not self.stopping.is_set() and (engine_open or to_client):
                readable = [s for s, is_open, backlog in ((tls, client_open, to_engine),
                                                           (engine, engine_open, to_client))
                            if is_open and not backlog]
                writable = ([engine] if to_engine else []) + ([tls] if to_client else [])
                if tls in readable and tls.pending():
                    ready = [tls]
                else:
                    ready, ready_w, _ = select.select(readable, writable, [], 0.1)
                    for sock in ready_w:
                        if sock is engine:
                            to_engine = to_engine[engine.send(to_engine):]
                            if not to_engine and not client_open:
                                engine.shutdown(socket.SHUT_WR)
                        else:
                            with contextlib.suppress(ssl.SSLWantWriteError,
                                                     ssl.SSLWantReadError):
                                to_client = to_client[tls.send(to_client):]
                if tls in ready:
                    try:
                        data = tls.recv(65536)
                    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                        data = None
                    except (ssl.SSLZeroReturnError, ConnectionResetError):
                        data = b""
                    if data == b"":  # the client's close_notify: the engine's stdin ends
                        client_open = False
                        if not to_engine:
                            engine.shutdown(socket.SHUT_WR)
                    elif data:
                        to_engine += data
                if engine in ready:
                    data = engine.recv(65536)
                    if data:
                        to_client += data
                    else:
                        engine_open = False
            with contextlib.suppress(OSError):
                tls.unwrap()  # close_notify, as Go's tls.Conn.Close sends it
        except OSError:
            pass
        finally:
            tls.close()
            engine.close()

    def close(self):
        self.stopping.set()
        self.listener.close()
        self.thread.join(10)
        for thread in self.threads:
            thread.join(10)
        shutil.rmtree(self.folder, ignore_errors=True)


class ExecTLSTest(ExecFixtures, EngineTestCase):
    """The engine over TLS, as the Docker CLI reaches it: DOCKER_TLS_VERIFY (any value) and
    DOCKER_TLS, and the end of piped stdin passed on as TLS's close_notify."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        if not shutil.which("openssl"):
            message = "openssl is not installed — apt-get install -y openssl"
            if REQUIRE_ENGINE:
                raise RuntimeError(message)
            raise unittest.SkipTest(message)
        rack = convox.parse_rack(HARNESS.rack_url, {})
        cls.tls = TLSEngine(rack.address)

    @classmethod
    def tearDownClass(cls):
        cls.tls.close()
        super().tearDownClass()

    def run_tls(self, args, input=b"", timeout=30, **env):
        """convox over the TLS endpoint; a hang is a failure, not a stuck suite."""
        environ = dict(HARNESS.env(CONVOX_RACK=self.tls.url, DOCKER_HOST=self.tls.url), **env)
        for key in ("DOCKER_TLS_VERIFY", "DOCKER_TLS", "DOCKER_CERT_PATH"):
            if key not in env:
                environ.pop(key, None)
        try:
            return subprocess.run([sys.executable, CONVOX] + list(args), input=input,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ,
                                  cwd=HERE, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail("convox %s over TLS did not end within %d s" % (" ".join(args), timeout))

    def test_docker_tls_verify_of_any_value_means_verified_tls(self):
        app = app_name("tlsverify")
        ident = self.process(app, "web")
        for value in ("1", "0", "false"):
            with self.subTest(DOCKER_TLS_VERIFY=value):
                result = self.run_tls(["-a", app, "ps"], DOCKER_TLS_VERIFY=value,
                                      DOCKER_CERT_PATH=self.tls.cert_path())
                self.assertEqual(result.returncode, 0, result.stderr)
                self.assertIn(ident[:12].encode(), result.stdout)
        # Verified means verified: an engine certificate from another CA is refused.
        result = self.run_tls(["-a", app, "ps"], DOCKER_TLS_VERIFY="0",
                              DOCKER_CERT_PATH=self.tls.cert_path("stranger-ca.pem"))
        self.assertEqual(result.returncode, 1)
        self.assertRegex(result.stderr, b"^ERROR: cannot reach the engine at tcp://.*CERTIFICATE_VERIFY_FAILED")

    def test_docker_tls_means_tls_without_verifying_the_engine(self):
        app = app_name("tlsnoverify")
        ident = self.process(app, "web")
        result = self.run_tls(["-a", app, "ps"], DOCKER_TLS="1",
                              DOCKER_CERT_PATH=self.tls.cert_path("stranger-ca.pem"))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(ident[:12].encode(), result.stdout)

    def test_piped_stdin_ends_over_tls(self):
        app = app_name("tlsstdin")
        ident = self.process(app, "web")
        certs = {"DOCKER_TLS_VERIFY": "1", "DOCKER_CERT_PATH": self.tls.cert_path()}
        result = self.run_tls(["-a", app, "exec", ident, "cat"], input=b"hi\n", **certs)
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"hi\n", b""))
        # Output still in flight when stdin ends: 8 MiB through cat, every byte back.
        data = os.urandom(8 * 1024 * 1024)
        result = self.run_tls(["-a", app, "exec", ident, "cat"], input=data, timeout=60,
                              **certs)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.stdout).hexdigest(),
                         hashlib.sha256(data).hexdigest())
        result = self.run_tls(["-a", app, "run", "--no-tty", "web", "sh", "-c", "wc -c"],
                              input=b"12345", **certs)
        self.assertEqual((result.returncode, result.stdout.strip()), (0, b"5"), result.stderr)
        self.assertNoneLeft(app)

    def test_watchdog_reaches_a_tls_engine_on_its_own(self):
        """The watchdog gets the rack URL and the TLS settings, nothing else, and enforces
        the timeout through TLS after the client is SIGKILLed."""
        app = app_name("tlsdog")
        self.process(app, "web")
        environ = client_env(self.tls.url, DOCKER_TLS_VERIFY="1",
                             DOCKER_CERT_PATH=self.tls.cert_path())
        proc = subprocess.Popen([sys.executable, CONVOX, "-a", app, "run", "--timeout", "3",
                                 "web", "sleep", "600"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env=environ, cwd=HERE)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        for _ in deadline_loop(20, 0.1):
            if any(s.get("State") == "running" for s in self.processes_of(app, "process")):
                break
        proc.kill()
        proc.wait(10)
        self.assertTrue(self.processes_of(app, "process"))  # the client died; not the process
        self.assertNoneLeft(app, within=20)

    def test_piped_stdin_ends_over_dockerds_own_tls(self):
        """As above, against dockerd's own TLS listener (Go's crypto/tls, --tlsverify): a
        private dockerd in a network namespace of its own, convox run inside it."""
        tools = ("dockerd", "unshare", "nsenter", "ip")
        if os.geteuid() != 0 or not all(shutil.which(tool) for tool in tools):
            skip_unless_required(self, "needs root and dockerd, unshare, nsenter, ip: " +
                                 INSTALL_HINT)
        tls = self.tls
        private = PrivateDockerd([
            "-H", "tcp://127.0.0.1:2376", "--tlsverify", "--tlscacert", tls.path("ca.pem"),
            "--tlscert", tls.path("server-cert.pem"), "--tlskey", tls.path("server-key.pem")])
        self.addCleanup(private.cleanup)
        builder = Harness()
        builder.engine = private.start()
        inside = ["nsenter", "--net=/proc/%d/ns/net" % private.proc.pid]
        subprocess.run(inside + ["ip", "link", "set", "lo", "up"], check=True, timeout=30)
        builder._build_image()
        app = app_name("tlsdockerd")
        ident = builder.engine.create_container({
            "Image": builder.image, "Cmd": ["sleep", "3600"],
            "Labels": {TEST_LABEL: RUN_ID, convox.LABEL_APP: app, convox.LABEL_SERVICE: "web",
                       convox.LABEL_TYPE: "service"},
            "HostConfig": {"Init": True, "NetworkMode": "none"}})["Id"]
        builder.engine.start(ident)
        env = client_env("tcp://127.0.0.1:2376", DOCKER_TLS_VERIFY="1",
                         DOCKER_CERT_PATH=tls.cert_path())
        for payload in (b"hi\n", os.urandom(8 * 1024 * 1024)):
            try:
                result = subprocess.run(
                    inside + [sys.executable, CONVOX, "-a", app, "exec", ident, "cat"],
                    input=payload, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                    timeout=60)
            except subprocess.TimeoutExpired:
                self.fail("exec over dockerd's TLS did not end within 60 s")
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(hashlib.sha256(result.stdout).hexdigest(),
                             hashlib.sha256(payload).hexdigest())


class ExecTerminalTest(ExecFixtures, TerminalTestCase):
    """``convox exec`` at a terminal (a pty of 100x30), as a person would use it."""

    PROMPT = r"/ # "

    def shell(self, suffix, *options):
        app = app_name(suffix)
        ident = self.process(app, "web")
        session = self.pty("-a", app, "exec", *options, ident, "sh")
        session.expect(self.PROMPT)
        return ident, session

    def assertRestored(self, session):
        self.assertEqual(session.attrs(), session.initial_attrs)

    def wait_for_process(self, ident, cmd, within=10):
        """Wait until the container runs a process with this command line (engine's top)."""
        for _ in deadline_loop(within, 0.05):
            top = self.engine.request("GET", "/containers/%s/top" % ident)
            if any(row[-1] == cmd for row in top["Processes"]):
                return
        self.fail("%r never ran in %s" % (cmd, ident))

    def running_execs(self, ident, argv0):
        found = []
        for exec_id in self.engine.inspect(ident).get("ExecIDs") or []:
            info = self.engine.exec_inspect(exec_id)
            if info.get("Running") and info["ProcessConfig"]["entrypoint"] == argv0:
                found.append(exec_id)
        return found

    def test_prompt_size_interrupt_and_status(self):
        ident, session = self.shell("tsize")
        session.send("stty size\r")
        session.expect(r"\r\n30 100\r\n")
        session.resize(40, 120)
        self.assertIn(b"\r\n40 120\r\n", session.output)
        # Keys typed while the shell still starts the command go to the shell: wait until
        # sleep runs (in the foreground of the far terminal) before typing ^C.
        session.send("sleep 100\r")
        self.wait_for_process(ident, "sleep 100")
        session.skip_pending()  # the prompts the stty loop left: the next one follows ^C
        started = time.monotonic()
        session.send("\x03")
        session.expect(self.PROMPT, timeout=20)
        self.assertLess(time.monotonic() - started, 10)
        session.send("exit 3\r")
        self.assertEqual(session.wait(20), 3)
        self.assertRestored(session)

    def test_interrupt_and_engine_errors(self):
        app = app_name("tint")
        ident = self.process(app, "web")
        session = self.pty("-a", app, "exec", ident, "sh", "-c", "echo go; sleep 100")
        session.expect(r"go\r\n")
        session.send("\x03")  # the remote terminal makes it SIGINT, as docker exec -it does
        self.assertEqual(session.wait(10), 130)
        self.assertRestored(session)
        for command, status in ((["nosuchcommand"], 127), (["/bin"], 126)):
            session = self.pty("-a", app, "exec", ident, *command)
            self.assertEqual(session.wait(20), status, session.output)
            self.assertRestored(session)
            self.assertIn(b"OCI runtime exec failed", session.output)
        # --no-tty at a terminal: pipes on the far side, our terminal left as it is.
        session = self.pty("-a", app, "exec", "--no-tty", ident, "sh", "-c",
                           "test -t 0 && echo tty || echo no-tty")
        self.assertEqual(session.wait(20), 0)
        self.assertIn(b"no-tty", session.output)
        self.assertRestored(session)

    def test_ctrl_d_is_a_byte(self):
        ident, session = self.shell("tctrld")
        session.send("echo go; cat >/typed\r")
        session.expect(r"\r\ngo\r\n")
        session.send("abc\r\x04")
        session.expect(self.PROMPT)
        session.send("\x04")
        self.assertEqual(session.wait(20), 0)
        self.assertRestored(session)
        result = self.convox("exec", ident, "cat", "/typed", input=b"")
        self.assertEqual(result.stdout, b"abc\n")

    def test_container_killed_mid_session(self):
        ident, session = self.shell("tkill")
        session.send("stty size\r")
        session.expect(r"30 100")
        self.engine.kill(ident)
        status = session.wait(20)
        self.assertNotEqual(status, 0)
        self.assertRestored(session)
        self.assertNotIn(b"Traceback", session.output)

    def test_signals_to_the_client(self):
        for signum in (signal.SIGTERM, signal.SIGHUP):
            with self.subTest(signal=signum):
                ident, session = self.shell("tsig%d" % signum)
                session.proc.send_signal(signum)
                status = session.wait(20)
                self.assertNotEqual(status, 0)
                self.assertRestored(session)
                self.assertNotIn(b"Traceback", session.output)

    def test_detach_leaves_it_running(self):
        ident, session = self.shell("tdetach")
        session.send("sleep 4242\r")
        self.wait_for_process(ident, "sleep 4242")
        session.send("\x10\x11")
        self.assertEqual(session.wait(20), 0)
        self.assertRestored(session)
        self.assertEqual(len(self.running_execs(ident, "sh")), 1)
        time.sleep(0.5)  # still there a moment later: closing our end did not hang it up
        self.wait_for_process(ident, "sleep 4242", within=0.5)
        self.assertEqual(len(self.running_execs(ident, "sh")), 1)

    def test_custom_detach_keys(self):
        app = app_name("tkeys")
        ident = self.process(app, "web")
        # With ctrl-x,x the default keys are just bytes to the process.
        session = self.pty("-a", app, "exec", "--detach-keys", "ctrl-x,x", ident, "sh", "-c",
                           "stty raw -echo; echo ready; head -c 4 | od -An -tx1; stty sane")
        session.expect(r"ready")  # the remote stty first: in cooked mode ctrl-q is XON
        session.send("\x10\x11\x18y")  # ctrl-x without its x is sent after all
        session.expect(r"10 11 18 79")
        self.assertEqual(session.wait(20), 0)
        self.assertRestored(session)
        # And ctrl-x, x detaches, leaving the process running.  (A shell idle at its prompt
        # may read EOF when the stream closes: the engine's race, docker exec -it's too.)
        session = self.pty("-a", app, "exec", "--detach-keys", "ctrl-x,x", ident, "sh")
        session.expect(self.PROMPT)
        session.send("sleep 4343\r")
        self.wait_for_process(ident, "sleep 4343")
        session.send("\x18x")
        self.assertEqual(session.wait(20), 0)
        self.assertRestored(session)
        self.assertEqual(len(self.running_execs(ident, "sh")), 1)
        self.wait_for_process(ident, "sleep 4343", within=0.5)

    def test_bad_target_leaves_terminal_alone(self):
        app = app_name("tbad")
        self.process(app, "web")
        session = self.pty("-a", app, "exec", "nosuchprocess", "sh")
        self.assertEqual(session.wait(20), 125)
        self.assertRestored(session)
        text = session.output.decode("utf-8", "replace")
        self.assertEqual([l for l in text.splitlines() if l.strip()][-1:],
                         [l for l in text.splitlines() if l.startswith("ERROR: ")])
        self.assertNotIn("Traceback", text)


# ==========================================================================================
# The real engine: run
# ==========================================================================================

def pids_where(matches):
    """PIDs of the processes whose command line (words, as bytes) ``matches``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if matches(words):
            found.append(int(entry))
    return found


def convox_processes(app):
    """PIDs of convox.py processes whose command names ``app``: clients (-a APP) and their
    watchdogs (--watchdog RACK APP-SERVICE-run-XXXX DEADLINE)."""
    name = app.encode()
    return pids_where(lambda words: any(w == name or w.startswith(name + b"-") for w in words)
                      and any(w.endswith(b"convox.py") for w in words))


def executable_file(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o755)
    return path


class RunTestCase(EngineTestCase):
    """Helpers for the tests of convox run."""

    def running_one_off(self, app, within=20):
        """The summary of the app's running one-off, once there is one."""
        for _ in deadline_loop(within, 0.1):
            running = [s for s in self.processes_of(app, "process")
                       if s.get("State") == "running"]
            if running:
                return running[0]
        self.fail("no one-off of %s started within %ss" % (app, within))

    def client(self, *args):
        """convox.py in the background, as a user's shell would start it."""
        proc = subprocess.Popen([sys.executable, CONVOX] + list(args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=HARNESS.env(), cwd=HERE)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stderr.close)
        return proc

    def detached(self, *args):
        """convox run --detach ...; -> the one-off's inspect (removed at the end)."""
        result = self.convox(*args)
        self.assertEqual(result.returncode, 0, result.stderr)
        match = re.match(br"^Running detached process\.\.\. OK, ([0-9a-f]{12})\n\Z",
                         result.stdout)
        self.assertTrue(match, result.stdout)
        info = self.engine.inspect(match.group(1).decode())
        self.addCleanup(self.engine.remove, info["Id"])
        return info

    def assertNoWatchdog(self, app, within=10):
        for _ in deadline_loop(within, 0.1):
            if not convox_processes(app):
                return
        self.fail("convox processes of %s linger: %r" % (app, convox_processes(app)))


class RunTest(RunTestCase):
    def test_env_image_and_working_dir(self):
        app = app_name("runenv")
        web = self.container(app, "web", env=["GREETING=hello there", "A=1"],
                             workdir="/srv/app", release="RENV")
        result = self.convox("-a", app, "run", "web", "env")
        self.assertEqual(result.returncode, 0, result.stderr)
        env = result.stdout.decode().splitlines()
        self.assertIn("GREETING=hello there", env)
        self.assertIn("A=1", env)
        result = self.convox("-a", app, "run", "--env", "A=2", "web", "pwd")
        self.assertEqual((result.returncode, result.stdout), (0, b"/srv/app\n"), result.stderr)
        info = self.detached("-a", app, "run", "--detach", "--env", "A=2", "web", "sleep",
                             "30")
        self.assertEqual(info["Image"], self.engine.inspect(web)["Image"])
        self.assertEqual(info["Config"]["WorkingDir"], "/srv/app")
        self.assertIn("A=2", info["Config"]["Env"])
        self.assertEqual(info["Name"].lstrip("/")[:len(app) + 9], app + "-web-run-")

    def test_exit_statuses(self):
        app = app_name("runexit")
        self.container(app, "web")
        for command, status in ((["true"], 0), (["sh", "-c", "exit 3"], 3),
                                (["no-such-command"], 127), (["/dev/null"], 126),
                                (["exit 5"], 5), (["sh", "-c", "kill -9 $$"], 137)):
            with self.subTest(command=command):
                result = self.convox("-a", app, "run", "web", *command)
                self.assertEqual(result.returncode, status, result.stderr)
        self.assertNoneLeft(app)
        self.assertNoWatchdog(app)

    def test_node_labels_need_a_swarm(self):
        app = app_name("runnodes")
        self.container(app, "web")
        result = self.convox("-a", app, "run", "--node-labels", "disk=ssd", "web", "true")
        self.assertEqual(result.returncode, 2, result.stderr)
        self.assertIn(b"--node-labels places a one-off on Swarm nodes", result.stderr)
        self.assertNoneLeft(app)

    def test_gone_when_the_command_returns(self):
        # As after docker run --rm: when run returns, its one-off no longer exists (the
        # engine's AutoRemove may still be at work when the process's status arrives).
        # Four clients at a time load the engine, as a busy server would.
        app = app_name("rungone")
        self.container(app, "web")

        def run_and_look(attempt):
            result = self.convox("-a", app, "run", "web", "sh", "-c", "exit 3; #%d" % attempt)
            engine = convox.Engine(self.engine.rack, {})  # one connection per thread
            try:
                left = [s["Names"] for s in engine.containers(all=True)
                        if s["Labels"].get("convox.app") == app
                        and re.search(r"#%d\b" % attempt, s["Command"])]
            finally:
                engine.close()
            return result.returncode, result.stderr, left

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            outcomes = list(pool.map(run_and_look, range(24)))
        for status, stderr, left in outcomes:
            self.assertEqual(status, 3, stderr)
            self.assertEqual(left, [])

    def test_signals_to_the_client_end_the_process(self):
        app = app_name("runsig")
        self.container(app, "web")
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            with self.subTest(signal=signum):
                proc = self.client("-a", app, "run", "web", "sleep", "600")
                self.running_one_off(app)
                started = time.monotonic()
                proc.send_signal(signum)
                status = proc.wait(20)
                # The signal reaches the command (through the one-off's init), which dies
                # of it: the shell's 128 + N.
                self.assertEqual(status, 128 + signum, proc.stderr.read())
                self.assertLess(time.monotonic() - started, 10)
                self.assertNoneLeft(app)
        self.assertNoWatchdog(app)

    def test_nohup_keeps_sighup_ignored(self):
        # Started under nohup (SIGHUP ignored), the client keeps ignoring it: the one-off
        # runs to its end instead of being hung up.
        app = app_name("runnohup")
        self.container(app, "web")
        proc = subprocess.Popen(
            [sys.executable, CONVOX, "-a", app, "run", "web", "sh", "-c", "sleep 2; echo done"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=HARNESS.env(), cwd=HERE,
            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        for _ in deadline_loop(20, 0.1):
            if any(s.get("State") == "running" for s in self.processes_of(app, "process")):
                break
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
        self.assertEqual((proc.returncode, out), (0, b"done\n"), err)
        self.assertNoneLeft(app)

    def test_interrupt_at_any_moment(self):
        # Ctrl-C while the one-off is being looked up, created, attached or started: the
        # client ends and nothing is left behind.
        app = app_name("runint")
        self.container(app, "web")
        for delay in (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0):
            with self.subTest(delay=delay):
                proc = self.client("-a", app, "run", "web", "sleep", "600")
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                try:
                    status = proc.wait(20)
                except subprocess.TimeoutExpired:
                    self.fail("SIGINT after %ss did not end the client" % delay)
                # 130 from convox; before convox.py is even imported, Python's own
                # KeyboardInterrupt (status 1 on 3.6, -SIGINT since 3.8).
                self.assertIn(status, (130, 1, -signal.SIGINT), proc.stderr.read())
        self.assertNoneLeft(app)
        self.assertNoWatchdog(app)

    def test_early_output_is_complete(self):
        app = app_name("runearly")
        self.container(app, "web")
        want = "".join("%d\n" % n for n in range(1, 5001)).encode()

        def once(_):
            return self.convox("-a", app, "run", "web", "seq", "1", "5000")

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(once, range(20)))
        for result in results:
            self.assertEqual((result.returncode, result.stdout, result.stderr),
                             (0, want, b""))
        result = self.convox("-a", app, "run", "web", "echo out; echo err >&2")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, b"out\n", b"err\n"))
        self.assertNoneLeft(app)

    def test_stdin_is_piped_through(self):
        app = app_name("runstdin")
        self.container(app, "web")
        result = self.convox("-a", app, "run", "web", "cat", input=b"x")
        self.assertEqual((result.returncode, result.stdout), (0, b"x"), result.stderr)
        data = os.urandom(4 * 1024 * 1024)
        result = self.convox("-a", app, "run", "web", "sha256sum", input=data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout.split()[0].decode(), hashlib.sha256(data).hexdigest())
        result = self.convox("-a", app, "run", "web", "cat", input=data)
        self.assertEqual((result.returncode, len(result.stdout)), (0, len(data)))
        self.assertTrue(result.stdout == data)
        self.assertNoneLeft(app)

    def test_detached(self):
        app = app_name("rundetach")
        self.container(app, "web", release="RDET")
        started = time.monotonic()
        info = self.detached("-a", app, "run", "--detach", "web", "sh", "-c",
                             "echo out; sleep 1; exit 4")
        self.assertLess(time.monotonic() - started, 10)
        labels = info["Config"]["Labels"]
        self.assertEqual({k: labels.get(k) for k in (convox.LABEL_APP, convox.LABEL_SERVICE,
                                                     convox.LABEL_RELEASE, convox.LABEL_TYPE)},
                         {convox.LABEL_APP: app, convox.LABEL_SERVICE: "web",
                          convox.LABEL_RELEASE: "RDET", convox.LABEL_TYPE: "process"})
        self.assertNoWatchdog(app)  # no timeout for a detached process
        for _ in deadline_loop(20, 0.1):
            state = self.engine.inspect(info["Id"])["State"]
            if state["Status"] == "exited":
                break
        self.assertEqual((state["Status"], state["ExitCode"]), ("exited", 4))
        result = self.convox("-a", app, "ps", "--all")
        rows = [re.split(r"\s{2,}", line) for line in result.stdout.decode().splitlines()]
        mine = [row for row in rows if row[0] == info["Id"][:12]]
        self.assertEqual(mine and mine[0][1:4], ["web", "exited (4)", "RDET"], rows)
        self.assertEqual(self.docker("logs", info["Id"]).stdout, b"out\n")

    def test_options_after_service_and_double_dash(self):
        app = app_name("runopts")
        self.container(app, "web")
        info = self.detached("-a", app, "run", "web", "--detach", "sleep", "5")
        self.assertEqual(info["Config"]["Cmd"], ["sleep", "5"])
        self.assertTrue(info["State"]["Running"])
        result = self.convox("-a", app, "run", "web", "--env", "X=1", "--timeout", "30", "sh",
                             "-c", "echo $X")
        self.assertEqual((result.returncode, result.stdout), (0, b"1\n"), result.stderr)
        result = self.convox("-a", app, "run", "web", "--", "echo", "--detach")
        self.assertEqual((result.returncode, result.stdout), (0, b"--detach\n"), result.stderr)
        result = self.convox("-a", app, "run", "--no-tty", "--", "web", "echo", "-t", "1")
        self.assertEqual((result.returncode, result.stdout), (0, b"-t 1\n"), result.stderr)
        result = self.convox("-a", app, "run", "web", "echo", "--timeout", "x")
        self.assertEqual((result.returncode, result.stdout), (0, b"--timeout x\n"))
        for _ in deadline_loop(10, 0.1):  # only the detached one stays
            if len(self.processes_of(app, "process")) == 1:
                break
        self.assertEqual([s["Id"] for s in self.processes_of(app, "process")], [info["Id"]])

    def test_unknown_service(self):
        app = app_name("rununknown")
        self.container(app, "web")
        self.container(app, "worker")
        result = self.convox("-a", app, "run", "nope", "true")
        self.assertEqual(result.returncode, 125)
        self.assertOneErrorLine(result)
        self.assertEqual(result.stderr.decode(), "ERROR: no such service: nope (app %s); "
                                                 "services: web, worker\n" % app)
        self.assertNoneLeft(app)

    def test_compose_service(self):
        app = app_name("runcompose")
        self.container(app, "web", compose=True, env=["FROM_COMPOSE=yes"])
        result = self.convox("-a", app, "run", "web", "sh", "-c", "echo $FROM_COMPOSE")
        self.assertEqual((result.returncode, result.stdout), (0, b"yes\n"), result.stderr)
        info = self.detached("-a", app, "run", "--detach", "web", "sleep", "30")
        self.assertEqual(convox.identity(info["Config"]["Labels"])[:2], (app, "web"))
        self.assertEqual(info["Config"]["Labels"][convox.LABEL_TYPE], "process")

    def test_two_networks(self):
        app = app_name("runnets")
        hosts = app_name("runhosts")
        one, two = self.network("net1"), self.network("net2")
        self.container(hosts, "alpha", network=one, aliases=["alpha"])
        self.container(hosts, "beta", network=two, aliases=["beta"])
        web = self.container(app, "web", network=one, aliases=["web-one"])
        self.engine.connect_network(two, web, ["web-two"])
        result = self.convox("-a", app, "run", "web", "sh", "-c",
                             # a fresh interface may drop the first packet: three tries
                             "for h in alpha beta; do for i in 1 2 3; do "
                             "ping -c1 -W2 $h >/dev/null && continue 2; done; "
                             "echo $h unreachable; exit 1; done")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        info = self.detached("-a", app, "run", "--detach", "web", "sleep", "30")
        networks = info["NetworkSettings"]["Networks"]
        self.assertEqual(sorted(networks), sorted([one, two]))
        for network in (one, two):  # the service's aliases are not the one-off's
            self.assertFalse({"web-one", "web-two"} & set(networks[network]["Aliases"] or []))


class RunReleaseTest(RunTestCase):
    """--release and ENTRYPOINT, on images built for the test."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.app = app_name("runrel")
        folder = tempfile.mkdtemp()
        try:
            cls.images = {}
            for release in ("R1", "R2"):
                marker = os.path.join(folder, release)
                with open(marker, "w") as handle:
                    handle.write(release + "\n")
                cls.images[release] = HARNESS.build(
                    "%s:%s" % (app_name("img"), release.lower()),
                    "FROM %s\nCOPY %s /release\n" % (cls.image, release), {release: marker},
                    labels={convox.LABEL_APP: cls.app, convox.LABEL_SERVICE: "web",
                            convox.LABEL_RELEASE: release})
            script = executable_file(folder, "ep.sh", '#!/bin/sh\necho ep\nexec "$@"\n')
            cls.entrypoint_image = HARNESS.build(
                "%s:ep" % app_name("img"),
                'FROM %s\nCOPY ep.sh /ep.sh\nENTRYPOINT ["/ep.sh"]\n' % cls.image,
                {"ep.sh": script})
        finally:
            shutil.rmtree(folder)

    def test_release_picks_its_image(self):
        app = self.app
        old = self.container(app, "web", release="R1", image=self.images["R1"])
        self.container(app, "web", release="R2", image=self.images["R2"])
        result = self.convox("-a", app, "run", "web", "cat", "/release")
        self.assertEqual((result.returncode, result.stdout), (0, b"R2\n"), result.stderr)
        result = self.convox("-a", app, "run", "--release", "R1", "web", "cat", "/release")
        self.assertEqual((result.returncode, result.stdout), (0, b"R1\n"), result.stderr)
        info = self.detached("-a", app, "run", "web", "--release", "R1", "--detach", "sleep",
                             "30")
        self.assertEqual(info["Image"], self.engine.inspect(old)["Image"])
        self.assertEqual(info["Config"]["Labels"][convox.LABEL_RELEASE], "R1")
        # With no container of R1 left, the image labelled with it still names it.
        self.engine.remove(old)
        self.engine.remove(info["Id"])
        result = self.convox("-a", app, "run", "--release", "R1", "web", "cat", "/release")
        self.assertEqual((result.returncode, result.stdout), (0, b"R1\n"), result.stderr)

        result = self.convox("-a", app, "run", "--release", "RNOPE", "web", "true")
        self.assertEqual(result.returncode, 125)
        self.assertOneErrorLine(result)
        self.assertIn("no such release: RNOPE", result.stderr.decode())
        self.assertNoneLeft(app)

    def test_entrypoint(self):
        app = app_name("runep")
        self.container(app, "web", image=self.entrypoint_image)
        cases = [((), b"ep\nhi\n"), (("--no-entrypoint",), b"hi\n"),
                 (("--entrypoint=false",), b"hi\n"), (("--entrypoint=true",), b"ep\nhi\n")]
        for options, want in cases:
            with self.subTest(options=options):
                result = self.convox("-a", app, "run", *(options + ("web", "echo", "hi")))
                self.assertEqual((result.returncode, result.stdout), (0, want), result.stderr)
        result = self.convox("-a", app, "run", "web", "--no-entrypoint", "echo", "hi")
        self.assertEqual((result.returncode, result.stdout), (0, b"hi\n"), result.stderr)
        self.assertNoneLeft(app)



def _quietly_remove_image(engine, tag):
    with contextlib.suppress(convox.ConvoxError):
        engine.request("DELETE", "/images/%s" % tag, {"force": "1"})


class ProcessModelChecks:
    """What a process is (SPEC §3, §5, §6): one-offs off the service's DNS name, exec's
    choice, identity only from labels a container was created with, Convox's run flags.
    Mixed into a Docker and a Podman test case: both engines pass the same checks."""

    def built(self, name, dockerfile, files=None, labels=None):
        """An image built for this check on the test's engine; removed at the end."""
        harness = getattr(self, "podman", HARNESS)
        tag = harness.build("%s:%s" % (app_name("pm"), name), dockerfile, files, labels)
        self.addCleanup(_quietly_remove_image, self.engine, tag)
        return tag

    def test_one_off_does_not_answer_to_the_service_name(self):
        """A one-off joins the service's networks, never its aliases (SPEC §6): the service
        name resolves, from another container on the app network, to the service only."""
        app = app_name("runalias")
        network = self.network("alias")
        web = self.container(app, "web", network=network, aliases=["web"])
        worker = self.container(app, "worker", network=network, aliases=["worker"])
        for _ in range(2):
            info = self.detached("-a", app, "run", "--detach", "web", "sleep", "60")
            self.assertIn(network, info["NetworkSettings"]["Networks"])
        address = self.engine.inspect(web)["NetworkSettings"]["Networks"][network]["IPAddress"]
        result = self.convox("-a", app, "exec", worker, "nslookup", "web")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        answers = re.findall(r"Address(?: \d+)?: *([0-9.]+)\s*$",
                             result.stdout.decode().split("Name:", 1)[-1], re.M)
        self.assertEqual(answers, [address], result.stdout)

    def test_exec_service_name_enters_the_longest_running_service_process(self):
        """exec SERVICE never lands in a one-off, and lands in the same process each time:
        the service's that has run longest (SPEC §5)."""
        app = app_name("xchoice")
        oldest = self.container(app, "web")
        self.container(app, "web")
        result = self.convox("-a", app, "run", "--detach", "web", "sleep", "120")
        self.assertEqual(result.returncode, 0, result.stderr)
        one_off = result.stdout.decode().split()[-1]
        self.addCleanup(self.engine.remove, one_off)
        hostnames = [self.convox("-a", app, "exec", "web", "hostname", input=b"").stdout
                     for _ in range(5)]
        self.assertEqual(hostnames, [oldest[:12].encode() + b"\n"] * 5)
        lonely = app_name("xonlyoneoff")
        self.container(lonely, "web", kind="process")
        result = self.convox("-a", lonely, "exec", "web", "true", input=b"")
        self.assertEqual(result.returncode, 125)
        self.assertOneErrorLine(result)
        self.assertIn(b"no running service process", result.stderr)

    def test_hand_run_container_of_a_built_image_is_no_process(self):
        """The images start builds carry the app's labels, and containers inherit them: a
        container run by hand from one is still not a process (SPEC §3)."""
        app = app_name("impostor")
        image = self.built("labelled", "FROM %s\n" % self.image, labels={
            convox.LABEL_APP: app, convox.LABEL_SERVICE: "web", convox.LABEL_RELEASE: "R2"})
        web = self.container(app, "web", release="R2", image=image)
        impostor = self.engine.create_container({
            "Image": image, "Cmd": ["sleep", "60"],
            "Labels": {TEST_LABEL: RUN_ID}, "HostConfig": {"Init": True}})["Id"]
        self.addCleanup(self.engine.remove, impostor)
        self.engine.start(impostor)
        self.assertEqual(self.engine.inspect(impostor)["Config"]["Labels"][convox.LABEL_APP],
                         app)  # inherited from the image
        listed = json.loads(self.convox("-a", app, "ps", "--all", "--format",
                                        "json").stdout.decode())
        self.assertEqual([p["id"] for p in listed], [web])
        for _ in range(3):
            result = self.convox("-a", app, "exec", "web", "hostname", input=b"")
            self.assertEqual((result.returncode, result.stdout.decode().strip()),
                             (0, web[:12]), result.stderr)
        result = self.convox("-a", app, "ps", "info", impostor[:12])
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"belongs to no app", result.stderr)

    def test_resources(self):
        """--cpu, --cpu-limit, --memory (a request) and --memory-limit each set their own
        field; every other is the service's (SPEC §6)."""
        app = app_name("runres")
        self.container(app, "web", memory=128)
        mib = 1024 * 1024
        fields = ("CpuShares", "NanoCpus", "MemoryReservation", "Memory")
        cases = [([], (0, 0, 0, 128 * mib)),
                 (["--memory", "64"], (0, 0, 64 * mib, 128 * mib)),
                 (["--memory-limit", "96"], (0, 0, 0, 96 * mib)),
                 (["--cpu", "500", "--cpu-limit", "250", "--memory", "32",
                   "--memory-limit", "256"], (512, 250000000, 32 * mib, 256 * mib))]
        for options, want in cases:
            with self.subTest(options=options):
                info = self.detached("-a", app, "run", "--detach", *options, "web", "sleep",
                                     "30")
                host = info["HostConfig"]
                self.assertEqual(tuple(host.get(field) or 0 for field in fields), want)
        rows = self.convox("-a", app, "ps", "-s", "web").stdout.decode().splitlines()
        self.assertIn(["96"], [[c for c in re.split(r"\s{2,}", r) if c == "96"]
                               for r in rows[1:]])

    def test_flags_that_cannot_be_meant_are_usage_errors(self):
        app = app_name("runbad")
        self.container(app, "web")
        for options in (["-e=yes"], ["--memory", "0"], ["--env", "=x"],
                        ["--node-labels", "zone=a"], ["--detach", "--timeout", "5"]):
            with self.subTest(options=options):
                result = self.convox("-a", app, "run", *options, "web", "true")
                self.assertEqual(result.returncode, 2, result.stderr)
                self.assertOneErrorLine(result)
                self.assertEqual(result.stdout, b"")
        result = self.convox("-a", app, "run", "--node-labels", "zone=a", "web", "true")
        self.assertIn(b"Swarm", result.stderr)
        self.assertNoneLeft(app)

    def test_env_without_value_takes_the_local_one(self):
        app = app_name("runenvk")
        self.container(app, "web", env=["KEEP=service", "DROP=service"])
        script = 'echo "$FROM_HERE|$KEEP|${DROP-unset}"'
        result = self.convox("-a", app, "run", "--env", "FROM_HERE", "--env", "DROP", "web",
                             "sh", "-c", script, env={"FROM_HERE": "local value"})
        self.assertEqual((result.returncode, result.stdout), (0, b"local value|service|unset\n"),
                         result.stderr)
        result = self.convox("-a", app, "exec", "web", "-e", "FROM_HERE", "sh", "-c",
                             'echo "$FROM_HERE"', env={"FROM_HERE": "local value"}, input=b"")
        self.assertEqual((result.returncode, result.stdout), (0, b"local value\n"),
                         result.stderr)

    def test_unknown_service_of_the_manifest(self):
        app = app_name("runmanifest")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        with open(os.path.join(folder, "convox.yml"), "w") as handle:
            handle.write("services:\n  web:\n    image: %s\n  worker:\n    image: %s\n"
                         % (self.image, self.image))
        result = self.convox("-a", app, "run", "nosuch", "true", cwd=folder)
        self.assertEqual(result.returncode, 125)
        self.assertEqual(result.stderr.decode(), "ERROR: no such service: nosuch (app %s); "
                                                 "services: web, worker\n" % app)
        self.assertNoneLeft(app)

    def test_entrypoint_flag(self):
        """-e is --entrypoint, Convox's boolean: -e=false bypasses the image's ENTRYPOINT."""
        app = app_name("pmep")
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        script = executable_file(folder, "ep.sh", '#!/bin/sh\necho ep\nexec "$@"\n')
        image = self.built("ep", 'FROM %s\nCOPY ep.sh /ep.sh\nENTRYPOINT ["/ep.sh"]\n'
                           % self.image, {"ep.sh": script})
        self.container(app, "web", image=image)
        for options, want in ((("-e=false",), b"hi\n"), (("-e",), b"ep\nhi\n"),
                              (("--entrypoint=false",), b"hi\n"), ((), b"ep\nhi\n")):
            with self.subTest(options=options):
                result = self.convox("-a", app, "run", *(options + ("web", "echo", "hi")))
                self.assertEqual((result.returncode, result.stdout), (0, want), result.stderr)
        info = self.detached("-a", app, "run", "-e=false", "--detach", "web", "sleep", "30")
        self.assertIn(info["Config"]["Entrypoint"], (None, [], [""]))
        self.assertEqual(convox.Process(info).command, ["sleep", "30"])  # Podman: init hidden


class ProcessModelTest(ProcessModelChecks, RunTestCase):
    """The process model on Docker."""


class RunTimeoutTest(RunTestCase):
    def test_timeout(self):
        app = app_name("runtimeout")
        self.container(app, "web")
        started = time.monotonic()
        result = self.convox("-a", app, "run", "--timeout", "3", "web", "sleep", "60",
                             timeout=30)
        elapsed = time.monotonic() - started
        self.assertEqual(result.returncode, 124, result.stderr)
        self.assertEqual(result.stderr, b"ERROR: timeout after 3 seconds\n")
        self.assertTrue(3 <= elapsed < 15, elapsed)
        self.assertNoneLeft(app, within=5)
        self.assertNoWatchdog(app)

    def test_timeout_survives_sigkill_of_the_client(self):
        app = app_name("runkill")
        self.container(app, "web")
        proc = self.client("-a", app, "run", "--timeout", "5", "web", "sleep", "600")
        self.running_one_off(app)
        # Its deadline is at most 5 s from now (the client counts from start, which was
        # before): SPEC §6 has it gone within 15 s of that.
        started = time.monotonic()
        proc.kill()
        proc.wait(10)
        self.assertTrue(self.processes_of(app, "process"))  # the client died; not the process
        self.assertNoneLeft(app, within=20 - (time.monotonic() - started))
        self.assertNoWatchdog(app)

    def test_watchdog_gets_only_the_rack_and_the_container(self):
        """Not the client's command line (--env DBPASS=…) nor its environment."""
        app = app_name("rundogsecret")
        self.container(app, "web")
        secret = "s3cret-%s" % RUN_ID
        proc = subprocess.Popen(
            [sys.executable, CONVOX, "-a", app, "run", "--env", "DBPASS=" + secret,
             "--timeout", "600", "web", "sleep", "600"], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HERE,
            env=HARNESS.env(CONVOX_TEST_SECRET=secret))
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        one_off = self.running_one_off(app)
        for _ in deadline_loop(10, 0.1):
            dogs = [pid for pid in convox_processes(app) if pid != proc.pid]
            if dogs:
                break
        self.assertEqual(len(dogs), 1, dogs)
        with open("/proc/%d/cmdline" % dogs[0], "rb") as handle:
            argv = handle.read().decode().split("\0")[:-1]
        with open("/proc/%d/environ" % dogs[0], "rb") as handle:
            environ = dict(line.split("=", 1) for line in
                           handle.read().decode().split("\0")[:-1])
        # It runs through the launcher (python [OPTIONS] -c LOADER convox.py …): the code
        # compiled once, not a compile of the whole file beside every run.
        at = argv.index(CONVOX)
        self.assertEqual(argv[at - 2], "-c", argv[:at])
        self.assertEqual(argv[at:], [CONVOX, "--watchdog", HARNESS.rack_url,
                                     one_off["Names"][0].lstrip("/"), argv[-1]])
        self.assertTrue(0 < int(argv[-1]) - time.time() <= 602, argv)
        self.assertLessEqual(set(environ), set(convox.WATCHDOG_ENVIRON) |
                             {"DOCKER_API_VERSION", "CONVOX_PYTHON", "PWD"})  # sh's PWD
        self.assertNotIn(secret, "\0".join(argv) + repr(environ))
        proc.kill()
        proc.wait(10)
        self.engine.remove(one_off["Id"])
        self.assertNoWatchdog(app)

    def test_no_watchdog_after_a_normal_run(self):
        app = app_name("rundog")
        self.container(app, "web")
        for options in ((), ("--timeout", "30")):
            result = self.convox("-a", app, "run", *(options + ("web", "true")))
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertNoWatchdog(app, within=5)


class RunTerminalTest(TerminalTestCase):
    def one_off_running(self, app, within=20):
        for _ in deadline_loop(within, 0.1):
            if any(s.get("State") == "running" for s in self.processes_of(app, "process")):
                return
        self.fail("no one-off of %s started" % app)

    def test_terminal_size(self):
        app = app_name("runsize")
        self.container(app, "web")
        if convox._version_tuple(self.engine.api_version()) >= (1, 42):
            first = "stty size"  # the size is part of the create request (ConsoleSize)
        else:
            # Older engines can resize only once the process runs (as docker run does):
            # wait for that first resize (busybox stty prints no size while it is 0 x 0).
            first = 'until [ -n "$(stty size 2>/dev/null)" ]; do sleep 0.05; done; stty size'
        session = self.pty("-a", app, "run", "--timeout", "60", "web",
                           first + "; while read line; do stty size; done", rows=33, cols=97)
        session.expect(r"\b33 97\r\n")
        # SIGWINCH -> the resize request; the remote terminal reports it on each Enter (the
        # engine applies a resize on its own time, so ask until it shows, within a deadline).
        session.set_size(41, 120)
        for _ in deadline_loop(15, 0.3):
            session.send("\r")
            if re.search(rb"\b41 120\r\n", session.output):
                break
            session.read_some(0.2)
        session.expect(r"\b41 120\r\n")
        session.send("\x04")
        self.assertEqual(session.wait(), 0)
        self.assertEqual(session.attrs(), session.initial_attrs)
        self.assertNoneLeft(app)

    def test_ctrl_c(self):
        app = app_name("runctrlc")
        self.container(app, "web")
        session = self.pty("-a", app, "run", "web", "sleep", "600")
        self.one_off_running(app)
        time.sleep(0.3)  # the session is up: raw mode, so ^C is the remote terminal's
        session.send("\x03")
        self.assertEqual(session.wait(20), 130)
        self.assertEqual(session.attrs(), session.initial_attrs)
        self.assertNoneLeft(app)

    def test_lost_terminal(self):
        app = app_name("runhup")
        self.container(app, "web")
        session = self.pty("-a", app, "run", "web", "sleep", "600")
        self.one_off_running(app)
        # Closing the master end hangs the terminal up: the kernel sends SIGHUP.
        os.close(session.master)
        session.master = os.open(os.devnull, os.O_RDONLY)
        session.proc.wait(20)
        self.assertNoneLeft(app)


# ==========================================================================================
# The real engine over ssh:// (SPEC §2.1)
# ==========================================================================================

SSH_INSTALL_HINT = "apt-get install -y openssh-server openssh-client"


class SshServer:
    """Two private sshd on 127.0.0.1 in front of the engine the tests use, and the ssh
    client set-up to reach them (CONVOX_SSH_COMMAND); everything removed afterwards.

    Own ports, config and host key; a temporary key-only user (password field ``*``, which
    ``UsePAM no`` needs) in the engine socket's group.  ``forward`` allows stream-local
    forwarding as sshd does by default; ``refuse`` sets ``AllowStreamLocalForwarding no``
    and a PATH with only sh and python3, so that convox must bridge with python3.
    """

    def __init__(self, user=None):
        self.ready = False
        self.problem = None
        self.folder = self.user = None
        self.user_name = user or "cvx%s" % RUN_ID
        self.procs = {}

    def setup(self, socket_path):
        if self.ready or self.problem:
            return
        try:
            self._start(socket_path)
            self.ready = True
        except Exception as exc:  # noqa: BLE001 - reported as the skip/failure reason
            self.problem = "%s — they need root and: %s" % (exc, SSH_INSTALL_HINT)
            sys.stderr.write("test: the ssh tests cannot run: %s\n" % self.problem)
            self.cleanup()

    def _start(self, socket_path):
        import grp
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        for program in (sshd, shutil.which("ssh"), shutil.which("ssh-keygen"),
                        shutil.which("useradd")):
            if not program or not os.path.exists(program):
                raise RuntimeError("sshd, ssh, ssh-keygen or useradd is missing")
        if os.geteuid() != 0:
            raise RuntimeError("not root (a test sshd needs its own user)")
        self.sweep()
        self.folder = tempfile.mkdtemp(prefix="convox-test-ssh-")
        os.chmod(self.folder, 0o711)  # sshd reads authorized_keys as the user
        path = lambda *names: os.path.join(self.folder, *names)  # noqa: E731
        for key in ("host_key", "user_key", "other_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path(key)],
                           check=True, stdout=subprocess.DEVNULL, timeout=30)
        self.user = self.user_name
        group = grp.getgrgid(os.stat(socket_path).st_gid).gr_name
        os.makedirs(path("home", ".ssh"))
        shutil.copy(path("user_key.pub"), path("home", ".ssh", "authorized_keys"))
        subprocess.run(["useradd", "-M", "-d", path("home"), "-s", "/bin/sh", "-G", group,
                        "-p", "*", self.user], check=True, timeout=30)
        subprocess.run(["chown", "-R", self.user, path("home")], check=True, timeout=30)
        # Servers that refuse forwarding, each with sh and one bridge on its PATH: python3,
        # and those of docker, socat and nc that this machine has.
        servers = [("forward", "")]
        for bridge in ("python3", "docker", "socat", "nc"):
            found = shutil.which(bridge, path="/usr/local/bin:/usr/bin:/bin")
            if not found:
                continue
            folder = path("bin-" + bridge)
            os.makedirs(folder)
            os.symlink("/bin/sh", os.path.join(folder, "sh"))
            os.symlink(found, os.path.join(folder, bridge))
            os.chmod(folder, 0o755)
            servers.append(("refuse" if bridge == "python3" else "refuse-" + bridge,
                            "AllowStreamLocalForwarding no\nSetEnv PATH=%s\n" % folder))
        # sshd's privilege separation directory, as its service makes it; left in place
        # (another run's sshd may be using it).
        os.makedirs("/run/sshd", 0o755, exist_ok=True)
        with open(path("host_key.pub")) as handle:
            host_key = " ".join(handle.read().split()[:2])
        with open(path("other_key.pub")) as handle:
            other_key = " ".join(handle.read().split()[:2])
        self.ports = {}
        known, wrong = [], []
        for name, extra in servers:
            port = free_port()
            self.ports[name] = port
            known.append("[127.0.0.1]:%d %s\n" % (port, host_key))
            wrong.append("[127.0.0.1]:%d %s\n" % (port, other_key))
            with open(path("sshd_%s.conf" % name), "w") as handle:
                handle.write(
                    "Port %d\nListenAddress 127.0.0.1\nHostKey %s\nPidFile none\nUsePAM no\n"
                    "AuthenticationMethods publickey\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nStrictModes no\nAllowUsers %s\n"
                    "AuthorizedKeysFile %s\n%s" % (
                        port, path("host_key"), self.user,
                        path("home", ".ssh", "authorized_keys"), extra))
        for name, lines in (("known_hosts", known), ("wrong_known_hosts", wrong)):
            with open(path(name), "w") as handle:
                handle.writelines(lines)
        # The client's configs: ours; a wrong host key; a key the server does not know.
        for config, key, hosts in (("ssh_config", "user_key", "known_hosts"),
                                   ("ssh_config_wrong", "user_key", "wrong_known_hosts"),
                                   ("ssh_config_nokey", "other_key", "known_hosts")):
            with open(path(config), "w") as handle:
                handle.write("Host *\n  IdentityFile %s\n  IdentitiesOnly yes\n"
                             "  UserKnownHostsFile %s\n  GlobalKnownHostsFile /dev/null\n"
                             "  BatchMode yes\n  StrictHostKeyChecking yes\n"
                             % (path(key), path(hosts)))
        for name, port in self.ports.items():
            log = open(path("sshd_%s.log" % name), "wb")
            self.procs[name] = subprocess.Popen(
                [sshd, "-D", "-e", "-f", path("sshd_%s.conf" % name)], stdout=log,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd="/")
            log.close()
        self.socket_path = socket_path
        for name, port in self.ports.items():
            for _ in deadline_loop(15, 0.05):
                if self.procs[name].poll() is not None:
                    break
                with socket.socket() as probe:
                    if probe.connect_ex(("127.0.0.1", port)) == 0:
                        break
            else:
                raise RuntimeError("sshd did not listen on port %d" % port)
            if self.procs[name].poll() is not None:
                with open(path("sshd_%s.log" % name), "rb") as handle:
                    raise RuntimeError("sshd did not start: %s" %
                                       handle.read()[-500:].decode("utf-8", "replace"))

    @staticmethod
    def sweep():
        """Remove what a killed run left: a test user whose folder no sshd serves."""
        import pwd
        prefix = os.path.join(tempfile.gettempdir(), "convox-test-ssh-")
        for entry in pwd.getpwall():
            folder = os.path.dirname(entry.pw_dir)
            if not (entry.pw_name.startswith("cvx") and folder.startswith(prefix)):
                continue
            marker = folder.encode()
            with contextlib.suppress(OSError):
                if time.time() - os.stat(folder).st_mtime < 120:
                    continue  # a run setting up: its sshd has not started yet
            if pids_where(lambda words: any(marker in word for word in words)):
                continue  # a run in progress
            for pid in pids_of_user(entry.pw_uid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["userdel", "-f", entry.pw_name], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
            shutil.rmtree(folder, ignore_errors=True)

    def url(self, name="forward", path=None):
        """The rack URL of a server; the engine's socket in it unless it is the default."""
        if path is None:
            path = "" if self.socket_path == convox.SSH_DEFAULT_SOCKET else self.socket_path
        return "ssh://%s@127.0.0.1:%d%s" % (self.user, self.ports[name], path)

    def command(self, config="ssh_config"):
        return "ssh -F %s" % os.path.join(self.folder, config)

    def ssh_processes(self):
        """Our ssh clients still running: every one names our ssh config."""
        marker = self.folder.encode()
        return pids_where(lambda words: words[0].endswith(b"ssh") and
                          any(marker in word for word in words))

    def cleanup(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.procs = {}
        for pid in self.ssh_processes() if self.folder else ():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if self.user:
            # What runs as the user on the far side (a bridge whose client went away).
            with contextlib.suppress(KeyError):
                import pwd
                uid = pwd.getpwnam(self.user).pw_uid
                for pid in pids_of_user(uid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
            # -f: a session that still closes must not keep the user.
            subprocess.run(["userdel", "-f", self.user], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)
            self.user = None
        if self.folder:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.ready = False


def pids_of_user(uid):
    """PIDs of the processes that run as ``uid``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.stat("/proc/" + entry).st_uid == uid:
                found.append(int(entry))
        except OSError:
            continue  # gone meanwhile
    return found


SSH = SshServer()


class SshTestCase(TerminalTestCase):
    """A test through the private sshd: each client gets its own TMPDIR, which must be
    empty at the end (no socket file left), and no ssh of ours may outlive the test."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        rack = convox.parse_rack(HARNESS.rack_url, {})
        if rack.kind != "unix":
            raise unittest.SkipTest("the ssh tests need an engine on a UNIX socket")
        SSH.setup(rack.address)
        if not SSH.ready:
            message = "ssh tests unavailable: %s" % SSH.problem
            if REQUIRE_ENGINE:
                raise RuntimeError(message)
            raise unittest.SkipTest(message)

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="convox-test-sshtmp-")
        self.addCleanup(shutil.rmtree, self.tmp, True)

    def ssh_env(self, name="forward", url=None, config="ssh_config"):
        url = url or SSH.url(name)
        return {"CONVOX_RACK": url, "DOCKER_HOST": url, "TMPDIR": self.tmp,
                "CONVOX_SSH_COMMAND": SSH.command(config)}

    def over_ssh(self, *args, name="forward", input=None, timeout=120, url=None,
                 config="ssh_config", cwd=None):
        return self.convox(*args, input=input, timeout=timeout, cwd=cwd,
                           env=self.ssh_env(name, url, config))

    def ssh_client(self, *args, name="forward"):
        """convox.py over ssh in the background."""
        proc = subprocess.Popen([sys.executable, CONVOX] + list(args),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=HARNESS.env(**self.ssh_env(name)),
                                cwd=HERE)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.stderr.close)
        return proc

    def assertNothingLeft(self, within=10):
        """No ssh process of ours and no file in the clients' TMPDIR."""
        for _ in deadline_loop(within, 0.05):
            if not SSH.ssh_processes() and not os.listdir(self.tmp):
                return
        self.fail("left behind: ssh processes %r, files %r" % (
            SSH.ssh_processes(), os.listdir(self.tmp)))


class SshRackTest(ExecFixtures, SshTestCase):
    """Every verb over an ssh:// rack whose sshd forwards the engine's socket."""

    def test_ps_matches_the_local_socket(self):
        app = app_name("sshps")
        self.process(app, "web", memory=64)
        self.process(app, "worker")
        local = self.convox("-a", app, "ps", "--format", "json")
        remote = self.over_ssh("-a", app, "ps", "--format", "json")
        self.assertEqual(remote.returncode, 0, remote.stderr)
        self.assertEqual(json.loads(remote.stdout.decode()), json.loads(local.stdout.decode()))
        remote = self.over_ssh("-a", app, "ps")
        self.assertEqual(remote.returncode, 0, remote.stderr)
        self.assertRegex(remote.stdout.decode(), r"\AID  +NAME  +RELEASE  +SIZE  +STARTED  +"
                         r"COMMAND\n[0-9a-f]{12}  web  .*  64  .*\n[0-9a-f]{12}  worker  ")
        self.assertEqual(remote.stderr, b"")
        self.assertNothingLeft()

    def test_exec_pipes_and_statuses(self):
        app = app_name("sshexec")
        ident = self.process(app, "web")
        data = os.urandom(8 * 1024 * 1024)
        result = self.over_ssh("exec", ident, "sh", "-c", "cat; echo done >&2", input=data)
        self.assertEqual(result.returncode, 0, result.stderr[-500:])
        self.assertEqual(hashlib.sha256(result.stdout).hexdigest(),
                         hashlib.sha256(data).hexdigest())
        self.assertEqual(result.stderr, b"done\n")
        for command, status in ((["sh", "-c", "exit 3"], 3), (["nosuchcommand"], 127),
                                (["/bin"], 126)):
            result = self.over_ssh("exec", ident, *command, input=b"")
            self.assertEqual(result.returncode, status, result.stderr)
        self.assertNothingLeft()

    def test_exec_at_a_terminal(self):
        app = app_name("sshtty")
        ident = self.process(app, "web")
        session = self.pty("exec", ident, "sh", env=self.ssh_env())
        session.expect(r"/ # ")
        session.send("stty size\r")
        session.expect(r"\r\n30 100\r\n")
        session.resize(40, 120)
        self.assertIn(b"\r\n40 120\r\n", session.output)
        session.send("sleep 100\r")
        ExecTerminalTest.wait_for_process(self, ident, "sleep 100")
        session.skip_pending()
        session.send("\x03")
        session.expect(r"/ # ", timeout=20)
        session.send("exit 3\r")
        self.assertEqual(session.wait(20), 3)
        self.assertEqual(session.attrs(), session.initial_attrs)
        self.assertNothingLeft()

    def test_run_attached_detached_and_interrupted(self):
        app = app_name("sshrun")
        self.process(app, "web")
        result = self.over_ssh("-a", app, "run", "web", "sh", "-c", "cat; exit 7",
                               input=b"through ssh\n")
        self.assertEqual((result.returncode, result.stdout), (7, b"through ssh\n"),
                         result.stderr)
        self.assertNoneLeft(app)
        result = self.over_ssh("-a", app, "run", "--detach", "web", "echo", "later")
        self.assertEqual(result.returncode, 0, result.stderr)
        ident = re.match(br"Running detached process\.\.\. OK, ([0-9a-f]{12})\n\Z",
                         result.stdout).group(1).decode()
        self.addCleanup(self.engine.remove, ident)
        for _ in deadline_loop(20, 0.1):
            if self.engine.inspect(ident)["State"]["Status"] == "exited":
                break
        self.assertEqual(self.engine.inspect(ident)["State"]["ExitCode"], 0)
        self.engine.remove(ident)
        # Ctrl-C at a terminal reaches the whole foreground group, ssh included: ssh must
        # live on, for convox passes the signal on and removes the one-off through it.
        session = self.pty("-a", app, "run", "--no-tty", "web", "sh", "-c",
                           "echo go; sleep 100", env=self.ssh_env())
        session.expect(r"go\r\n")
        session.send("\x03")
        self.assertEqual(session.wait(30), 130, session.output)
        self.assertNoneLeft(app)
        # SIGTERM to the client: the same clean end.
        proc = self.ssh_client("-a", app, "run", "web", "sh", "-c", "echo go; sleep 100")
        read_until(proc, b"go")
        # Meanwhile: the forwarded socket is in a folder only we can open (the client's, and
        # its watchdog's, which may still be connecting).
        import stat
        folders = [os.path.join(self.tmp, name) for name in os.listdir(self.tmp)]
        self.assertTrue(any(stat.S_ISSOCK(os.lstat(os.path.join(f, "engine.sock")).st_mode)
                            for f in folders if os.path.exists(os.path.join(f, "engine.sock"))))
        for folder in folders:
            self.assertEqual(os.stat(folder).st_mode & 0o777, 0o700)
        proc.terminate()
        proc.communicate(timeout=30)
        self.assertEqual(proc.returncode, 143)
        self.assertNoneLeft(app)
        self.assertNothingLeft()

    def test_logs_of_a_detached_one_off(self):
        app = app_name("sshlogs")
        self.process(app, "web")
        result = self.over_ssh("-a", app, "run", "--detach", "web", "sh", "-c",
                               "echo first; sleep 0.3; echo second >&2")
        self.assertEqual(result.returncode, 0, result.stderr)
        ident = result.stdout.split()[-1].decode()
        self.addCleanup(self.engine.remove, ident)
        for _ in deadline_loop(20, 0.1):
            if self.engine.inspect(ident)["State"]["Status"] == "exited":
                break
        remote = self.over_ssh("-a", app, "logs", "--no-follow", ident)
        self.assertEqual(remote.returncode, 0, remote.stderr)
        self.assertRegex(remote.stdout.decode(), r"\A\S+Z service/web/%s first\n"
                         r"\S+Z service/web/%s second\n\Z" % (ident, ident))
        self.assertEqual(remote.stdout, self.convox("-a", app, "logs", "--no-follow",
                                                    ident).stdout)
        self.assertNothingLeft()

    def test_timeout_holds_when_the_client_is_killed(self):
        app = app_name("sshkill")
        self.process(app, "web")
        proc = self.ssh_client("-a", app, "run", "--timeout", "5", "web", "sleep", "600")
        RunTestCase.running_one_off(self, app)
        started = time.monotonic()
        proc.kill()
        proc.wait(10)
        self.assertTrue(self.processes_of(app, "process"))
        self.assertNoneLeft(app, within=20 - (time.monotonic() - started))
        # The watchdog's own ssh ends with it, and the client's with the client.
        self.assertNothingLeft(within=15)

    @unittest.skipUnless(SLOW, "in the slow group (CONVOX_TEST_SLOW=1)")
    def test_timeout_holds_when_the_watchdogs_ssh_breaks(self):
        """An hour is long for one ssh connection: when the watchdog's breaks, it still
        stops the one-off at the deadline, through a new one."""
        app = app_name("sshdog")
        self.process(app, "web")
        proc = self.ssh_client("-a", app, "run", "--timeout", "6", "web", "sleep", "600")
        RunTestCase.running_one_off(self, app)
        started = time.monotonic()
        proc.kill()
        proc.wait(10)
        def parent_words(pid):
            with contextlib.suppress(OSError, ValueError):
                with open("/proc/%d/stat" % pid) as handle:
                    ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
                with open("/proc/%d/cmdline" % ppid, "rb") as handle:
                    return handle.read().split(b"\0")
            return []
        for _ in deadline_loop(10, 0.1):  # the client's ssh goes; the watchdog's stays
            ours = SSH.ssh_processes()
            watchdogs = [pid for pid in ours if b"--watchdog" in parent_words(pid)]
            if watchdogs and len(ours) == 1:
                break
        self.assertEqual(len(watchdogs), 1, ours)
        os.kill(watchdogs[0], signal.SIGKILL)
        self.assertTrue(self.processes_of(app, "process"))
        self.assertNoneLeft(app, within=21 - (time.monotonic() - started))
        self.assertNothingLeft(within=15)

    def test_start_builds_over_ssh(self):
        folder = tempfile.mkdtemp(prefix="convox-start-ssh-")
        self.addCleanup(shutil.rmtree, folder, True)
        files = {"Dockerfile": "FROM %s\nCOPY payload /payload\n" % self.image,
                 "convox.yml": "services:\n  web:\n    build: .\n    command: sleep 3600\n",
                 "payload": "built from the context\n"}
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as handle:
                handle.write(text)
        app = app_name("sshstart")
        result = self.over_ssh("-a", app, "start", "web", "cat", "/payload", cwd=folder,
                               timeout=180)
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        self.assertIn(b"built from the context\n", result.stdout)
        self.assertNoneLeft(app, kind=None)
        self.assertNothingLeft()

    def test_failures_are_one_error_line(self):
        cases = [
            ("wrong port", dict(url="ssh://%s@127.0.0.1:%d" % (SSH.user, free_port())), 1,
             "Connection refused"),
            ("bad host key", dict(config="ssh_config_wrong"), 1,
             "Host key verification failed"),
            ("a key the server refuses", dict(config="ssh_config_nokey"), 1,
             "Permission denied (publickey)"),
            ("no socket there", dict(url=SSH.url(path="/nowhere/docker.sock")), 1,
             "no socket at /nowhere/docker.sock"),
            ("a password", dict(url="ssh://%s:secret@127.0.0.1:22" % SSH.user), 2,
             "carries a password"),
            ("an option for a host", dict(url="ssh://-oProxyCommand=touch%20x"), 2,
             "starts with '-'"),
        ]
        for what, options, status, text in cases:
            with self.subTest(what):
                result = self.over_ssh("-a", "x", "ps", **options)
                self.assertEqual(result.returncode, status, result.stderr)
                self.assertOneErrorLine(result)
                self.assertIn(text, result.stderr.decode())
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertNothingLeft()


    def test_interrupted_while_ssh_connects(self):
        """Ctrl-C (to the whole foreground group, as a terminal sends it) or SIGTERM while
        ssh still connects: convox ends, and its ssh and folder go with it."""
        env = HARNESS.env(**self.ssh_env())
        # A proxy that never answers, and ends when ssh does (its stdin ends).
        env["CONVOX_SSH_COMMAND"] += " -o 'ProxyCommand=cat 3>&1 >&2'"
        for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
            with self.subTest(signal=signum.name):
                proc = subprocess.Popen([sys.executable, CONVOX, "-a", "x", "ps"], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, start_new_session=True)
                self.addCleanup(lambda p=proc: p.poll() is None and (p.kill(), p.wait()))
                for _ in deadline_loop(20, 0.05):
                    if SSH.ssh_processes():
                        break
                time.sleep(0.3)
                if signum == signal.SIGINT:
                    os.killpg(proc.pid, signum)
                else:
                    proc.send_signal(signum)
                _, err = proc.communicate(timeout=30)
                self.assertEqual(proc.returncode, status, err)
                self.assertEqual(err, b"ERROR: interrupted\n")
                self.assertNothingLeft()


class SshBridgeTest(ExecFixtures, SshTestCase):
    """A server that refuses forwarding (AllowStreamLocalForwarding no), with only sh and
    python3 on its PATH: convox bridges each connection through python3 on the far side."""

    def test_ps_exec_and_run_through_the_python3_bridge(self):
        app = app_name("sshbridge")
        ident = self.process(app, "web")
        remote = self.over_ssh("-a", app, "ps", "--format", "json", name="refuse")
        self.assertEqual(remote.returncode, 0, remote.stderr)
        self.assertEqual([p["id"] for p in json.loads(remote.stdout.decode())], [ident])
        # 4 MiB out before it reads its 8 MiB in: a bridge that blocks one way while the
        # other way is full deadlocks here.
        data = os.urandom(8 * 1024 * 1024)
        result = self.over_ssh("exec", ident, "sh", "-c", "head -c 4194304 /dev/zero; cat",
                               input=data, name="refuse", timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr[-500:])
        self.assertTrue(result.stdout == bytes(4194304) + data, "the bytes came back changed")
        result = self.over_ssh("-a", app, "run", "web", "sh", "-c", "cat; exit 5",
                               input=b"bridged\n", name="refuse")
        self.assertEqual((result.returncode, result.stdout), (5, b"bridged\n"), result.stderr)
        self.assertNoneLeft(app)
        self.assertNothingLeft()

    @unittest.skipUnless(SLOW, "in the slow group (CONVOX_TEST_SLOW=1)")
    def test_the_other_bridges(self):
        """docker system dial-stdio, socat -t 86400 and nc -N, where the far side has them:
        stdin's end reaches the process, and output that follows it is not lost."""
        ident = self.process(app_name("sshbridges"), "web")
        data = os.urandom(1024 * 1024)
        bridges = sorted(name for name in SSH.ports if name.startswith("refuse-"))
        self.assertTrue(bridges or not REQUIRE_ENGINE, "CI has docker, socat and nc")
        for name in bridges:
            with self.subTest(name):
                result = self.over_ssh("exec", ident, "sh", "-c", "head -c 1048576 /dev/zero;"
                                       " cat; sleep 0.3; echo late", input=data, name=name,
                                       timeout=60)
                self.assertEqual(result.returncode, 0, result.stderr[-500:])
                self.assertTrue(result.stdout == bytes(1048576) + data + b"late\n",
                                "the bytes came back changed")
        self.assertNothingLeft()

    def test_no_socket_there(self):
        result = self.over_ssh("-a", "x", "ps", name="refuse",
                               url=SSH.url("refuse", path="/nowhere/docker.sock"))
        self.assertEqual(result.returncode, 1, result.stderr)
        self.assertOneErrorLine(result)
        self.assertIn(b"no socket at /nowhere/docker.sock", result.stderr)
        self.assertNothingLeft()


# ==========================================================================================
# Swarm racks: the run's own 3-node Swarm
# ==========================================================================================

class SwarmTestCase(unittest.TestCase):
    """A test against the run's own Swarm (node 1 manages, nodes 2 and 3 work), reached as
    a user would reach it: the manager's tcp://ADDR:2375."""

    @classmethod
    def setUpClass(cls):
        if not SLOW:
            raise unittest.SkipTest("the Swarm tests run in the slow group (CONVOX_TEST_SLOW=1)")
        SWARM.setup()
        if SWARM.cluster is None:
            message = "Swarm unavailable: %s" % SWARM.problem
            if REQUIRE_ENGINE:
                raise RuntimeError(message)
            raise unittest.SkipTest(message)
        cls.cluster = SWARM.cluster
        cls.manager = cls.cluster.engines[0]
        cls.image = cls.cluster.image
        cls.rack_url = cls.cluster.tcp_url(0)

    def env(self, **extra):
        env = {"CONVOX_RACK": self.rack_url, "DOCKER_HOST": self.rack_url}
        env.update(extra)
        return HARNESS.env(**env)

    def convox(self, *args, input=None, timeout=120, env=None):
        """Run convox.py against the Swarm's manager; -> CompletedProcess with bytes."""
        return subprocess.run([sys.executable, CONVOX] + list(args), input=input,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, env=self.env(**(env or {})), cwd=HERE)

    def pty(self, *args, rows=30, cols=100, env=None):
        session = PtySession(args, rows=rows, cols=cols, env=self.env(**(env or {})))
        self.addCleanup(session.close)
        return session

    @classmethod
    def create_service(cls, app, name, replicas=3, command=("sleep", "3600"), memory=None,
                       stack=False, constraints=None, env=None, release=None):
        """A labelled Swarm service of the app (``stack``: as `docker stack deploy`
        labels it); -> its ID once ``replicas`` tasks run.  The caller removes it."""
        labels = {TEST_LABEL: RUN_ID}
        if stack:
            labels[convox.STACK_NAMESPACE] = app
            full_name = "%s_%s" % (app, name)
        else:
            labels.update({convox.LABEL_APP: app, convox.LABEL_SERVICE: name})
            if release:
                labels[convox.LABEL_RELEASE] = release
            full_name = "%s-%s" % (app, name)
        spec = {
            "Name": full_name, "Labels": labels,
            "TaskTemplate": {
                "ContainerSpec": {"Image": cls.image, "Args": list(command), "Init": True,
                                  "Env": list(env or []), "Labels": dict(labels)},
                "Resources": {"Limits": {"MemoryBytes": (memory or 0) * 1024 * 1024}},
                "Placement": {"Constraints": list(constraints or [])},
            },
            "Mode": {"Replicated": {"Replicas": replicas}},
            "EndpointSpec": {"Mode": "dnsrr"},  # no VIPs in these namespaces
        }
        ident = cls.manager.request("POST", "/services/create", body=spec)["ID"]
        try:
            cls.running_tasks(ident, replicas)
        except BaseException:
            cls.remove_service(ident)
            raise
        return ident

    def service(self, *args, **kwargs):
        """create_service, removed at the end of the test."""
        ident = self.create_service(*args, **kwargs)
        self.addCleanup(self.remove_service, ident)
        return ident

    @classmethod
    def remove_service(cls, ident):
        with contextlib.suppress(convox.NotFound):
            cls.manager.request("DELETE", "/services/%s" % ident)

    @classmethod
    def running_tasks(cls, service, count, within=60):
        """The service's tasks once ``count`` of them run (a deadline, as every wait)."""
        for _ in deadline_loop(within, 0.1):
            tasks = cls.manager.request("GET", "/tasks", {"filters": {
                "service": [service], "desired-state": ["running"]}})
            running = [t for t in tasks if t["Status"]["State"] == "running"]
            if len(running) >= count:
                return running
        raise AssertionError("%d tasks of %s not running within %ss: %r" % (
            count, service, within, [t["Status"] for t in tasks]))

    def services_of(self, app):
        """Swarm services labelled with the app (one-offs included)."""
        return self.manager.request("GET", "/services", {"filters": {
            "label": ["%s=%s" % (convox.LABEL_APP, app)]}})

    def one_offs_of(self, app):
        """The app's one-off services (the app's own services are not among them)."""
        return [s for s in self.services_of(app)
                if s["Spec"]["Labels"].get(convox.LABEL_TYPE) == "process"]

    def assertNoServiceLeft(self, app, within=20):
        for _ in deadline_loop(within, 0.2):
            left = self.one_offs_of(app)
            if not left:
                return
        self.fail("one-off services of %s remain: %r" % (app, [s["Spec"]["Name"] for s in left]))

    assertOneErrorLine = EngineTestCase.assertOneErrorLine

    def node_of(self, task):
        """The index (0 = manager) of the node a task runs on."""
        hostname = [h for h, n in self.cluster.nodes.items() if n["ID"] == task["NodeID"]][0]
        return self.cluster.hostnames.index(hostname)


class SwarmHarnessTest(SwarmTestCase):
    def test_three_nodes_of_their_own(self):
        nodes = self.manager.request("GET", "/nodes")
        self.assertEqual(sorted(n["Spec"]["Role"] for n in nodes),
                         ["manager", "worker", "worker"])
        self.assertTrue(all(n["Status"]["State"] == "ready" for n in nodes))
        infos = [engine.request("GET", "/info") for engine in self.cluster.engines]
        self.assertEqual(len({info["ID"] for info in infos}), 3)  # engine IDs differ
        self.assertEqual([info["Swarm"]["ControlAvailable"] for info in infos],
                         [True, False, False])
        # The same image, by ID, on every node: no node tries a registry.
        ids = {engine.request("GET", "/images/%s/json" % self.image)["Id"]
               for engine in self.cluster.engines}
        self.assertEqual(len(ids), 1)

    def test_the_host_engine_stays_out(self):
        rack = convox.resolve_rack(None, os.environ)
        engine = convox.Engine(rack, {})
        self.addCleanup(engine.close)
        try:
            info = engine.request("GET", "/info")
        except convox.ConvoxError:
            self.skipTest("no host engine answers at %s" % rack.url)
        ours = {node["ID"] for node in self.manager.request("GET", "/nodes")}
        self.assertNotIn((info.get("Swarm") or {}).get("NodeID"), ours)

    def test_what_a_killed_run_left_is_removed_by_the_next(self):
        script = ("import sys, time; sys.path.insert(0, %r); import test_convox as t; "
                  "c = t.SwarmCluster(nodes=1); c.start('convox-test:%s-killed', "
                  "files={'busybox': %r}); print(c.folder, flush=True); time.sleep(600)"
                  % (HERE, RUN_ID, shutil.which("busybox") or "/bin/busybox"))
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        folder = read_until(proc, b"\n", timeout=60).decode().strip()
        proc.kill()
        proc.communicate(timeout=10)
        stale = [c for c in SwarmCluster.left_by_killed_runs() if c.folder == folder]
        self.assertEqual(len(stale), 1)
        self.assertTrue(stale[0].processes())  # its dockerd outlived the run
        self.assertEqual(stale[0].close(), [])

    def test_tear_down_leaves_nothing(self):
        cluster = SwarmCluster(nodes=1)
        try:
            cluster.start("convox-test:%s-teardown" % RUN_ID,
                          files={"busybox": shutil.which("busybox") or "/bin/busybox"})
            engine = cluster.engines[0]
            engine.request("POST", "/services/create", body={
                "Name": "left", "TaskTemplate": {"ContainerSpec": {
                    "Image": cluster.image, "Command": ["sleep", "3600"]}},
                "Mode": {"Replicated": {"Replicas": 1}}, "EndpointSpec": {"Mode": "dnsrr"}})
            for _ in deadline_loop(30, 0.1):
                tasks = engine.request("GET", "/tasks")
                if tasks and tasks[0]["Status"]["State"] == "running":
                    break
            self.assertEqual(tasks[0]["Status"]["State"], "running")
            self.assertTrue(cluster.processes())
        finally:
            left = cluster.close()
        self.assertEqual(left, [])


class SwarmAppTestCase(SwarmTestCase):
    """Tests around one app whose service web runs a task on each of the three nodes."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.app = app_name("sw-" + cls.__name__[5:].lower())
        cls.web = cls.create_service(cls.app, "web", memory=64)

    @classmethod
    def tearDownClass(cls):
        for service in cls.manager.request("GET", "/services", {"filters": {
                "label": ["%s=%s" % (convox.LABEL_APP, cls.app)]}}):
            cls.remove_service(service["ID"])

    def worker_task(self):
        """A running task of web on a node other than the manager's."""
        tasks = self.running_tasks(self.web, 3)
        return [t for t in tasks if self.node_of(t) != 0][0]

    def ps_json(self, *args):
        result = self.convox("-a", self.app, "ps", "--format", "json", *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return json.loads(result.stdout.decode())


class SwarmPsTest(SwarmAppTestCase):
    def test_one_line_per_task_with_its_node(self):
        tasks = self.running_tasks(self.web, 3)
        result = self.convox("-a", self.app, "ps")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.decode().splitlines()
        self.assertEqual(lines[0].split(), ["ID", "NAME", "NODE", "RELEASE", "SIZE", "STARTED",
                                            "COMMAND"])
        rows = [line.split(None, 5) for line in lines[1:]]
        expected = sorted((t["Status"]["ContainerStatus"]["ContainerID"][:12],
                           self.cluster.hostnames[self.node_of(t)]) for t in tasks)
        self.assertEqual(sorted((row[0], row[2]) for row in rows), expected)
        self.assertEqual({row[2] for row in rows}, set(self.cluster.hostnames))  # 3 nodes
        for row in rows:
            self.assertEqual(row[1], "web")
            self.assertEqual(row[3:5], ["-", "64"])
            self.assertTrue(row[5].endswith("ago  sleep 3600") or
                            row[5].endswith("now  sleep 3600"), row)

    def test_json_and_info_name_node_and_task(self):
        processes = self.ps_json()
        self.assertEqual(len(processes), 3)
        task = self.worker_task()
        container = task["Status"]["ContainerStatus"]["ContainerID"]
        mine = [p for p in processes if p["id"] == container][0]
        self.assertEqual((mine["node"], mine["task"], mine["size"], mine["command"]),
                         (self.cluster.hostnames[self.node_of(task)], task["ID"], 64,
                          ["sleep", "3600"]))
        result = self.convox("-a", self.app, "ps", "info", task["ID"][:10])
        self.assertEqual(result.returncode, 0, result.stderr)
        info = dict(line.split(None, 1) for line in result.stdout.decode().splitlines())
        self.assertEqual((info["Id"], info["Node"], info["Task"], info["Name"]),
                         (container, self.cluster.hostnames[self.node_of(task)], task["ID"],
                          "web"))

    def test_a_stack_deployed_app(self):
        stack = app_name("stack")
        self.service(stack, "api", replicas=2, command=("sleep", "3601"), stack=True)
        processes = self.convox("-a", stack, "ps", "--format", "json")
        self.assertEqual(processes.returncode, 0, processes.stderr)
        found = json.loads(processes.stdout.decode())
        self.assertEqual([(p["app"], p["name"]) for p in found], [(stack, "api")] * 2)
        result = self.convox("-a", stack, "run", "api", "sh", "-c", "echo $((6*7))")
        self.assertEqual((result.returncode, result.stdout), (0, b"42\n"), result.stderr)
        result = self.convox("-a", stack, "exec", "api", "echo", "in-stack")
        self.assertEqual((result.returncode, result.stdout), (0, b"in-stack\n"), result.stderr)

    def test_ps_stop_replaces_a_service_task(self):
        app = app_name("sw-stop")
        service = self.service(app, "web", replicas=1)
        task = self.running_tasks(service, 1)[0]
        container = task["Status"]["ContainerStatus"]["ContainerID"]
        result = self.convox("-a", app, "ps", "stop", container[:12])
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"Stopping %s... OK\n" % container[:12].encode())
        for _ in deadline_loop(30, 0.2):
            tasks = self.running_tasks(service, 1)
            if tasks[0]["ID"] != task["ID"]:
                break
        self.assertNotEqual(tasks[0]["ID"], task["ID"])  # Swarm started a new one


class SwarmExecTest(SwarmAppTestCase):
    def test_byte_exact_through_cat_on_a_worker(self):
        task = self.worker_task()
        container = task["Status"]["ContainerStatus"]["ContainerID"]
        data = os.urandom(4 * 1024 * 1024)
        result = self.convox("-a", self.app, "exec", container[:12], "cat", input=data)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(hashlib.sha256(result.stdout).hexdigest(),
                         hashlib.sha256(data).hexdigest())
        self.assertEqual(len(result.stdout), len(data))

    def test_status_stderr_and_stdin_end_by_task_id(self):
        task = self.worker_task()
        result = self.convox("-a", self.app, "exec", task["ID"][:8], "sh", "-c",
                             "wc -c; hostname; echo oops >&2; exit 7", input=b"abc")
        self.assertEqual(result.returncode, 7, result.stderr)
        container = task["Status"]["ContainerStatus"]["ContainerID"]
        self.assertEqual(result.stdout.split(), [b"3", container[:12].encode()])
        self.assertEqual(result.stderr, b"oops\n")

    def test_node_rack_template(self):
        # A template that names each node's own socket through {hostname}.
        folder = tempfile.mkdtemp(prefix="convox-test-noderack-")
        self.addCleanup(shutil.rmtree, folder, True)
        for index, hostname in enumerate(self.cluster.hostnames):
            os.symlink(self.cluster.socket_url(index)[len("unix://"):],
                       os.path.join(folder, hostname + ".sock"))
        task = self.worker_task()
        result = self.convox("-a", self.app, "exec", task["ID"][:8], "hostname",
                             env={"CONVOX_NODE_RACK": "unix://%s/{hostname}.sock" % folder})
        self.assertEqual(result.returncode, 0, result.stderr)
        container = task["Status"]["ContainerStatus"]["ContainerID"]
        self.assertEqual(result.stdout, container[:12].encode() + b"\n")

    def test_unreachable_node_is_one_error_line(self):
        task = self.worker_task()
        hostname = self.cluster.hostnames[self.node_of(task)]
        result = self.convox("-a", self.app, "exec", task["ID"][:8], "true",
                             env={"CONVOX_NODE_RACK": "tcp://{addr}:1"})
        self.assertEqual(result.returncode, 125, result.stderr)
        self.assertOneErrorLine(result)
        error = result.stderr.decode()
        self.assertIn("node %s" % hostname, error)
        self.assertIn("tcp://%s:1" % self.cluster.addrs[self.node_of(task)], error)

    def test_a_socket_rack_reaches_nodes_over_ssh(self):
        task = self.worker_task()
        result = self.convox("-a", self.app, "exec", task["ID"][:8], "true",
                             env={"CONVOX_RACK": self.cluster.socket_url(0),
                                  "DOCKER_HOST": self.cluster.socket_url(0)})
        self.assertEqual(result.returncode, 125, result.stderr)  # no sshd on the nodes
        self.assertOneErrorLine(result)
        self.assertIn("node %s: " % self.cluster.hostnames[self.node_of(task)],
                      result.stderr.decode())
        self.assertIn("ssh://%s " % self.cluster.addrs[self.node_of(task)],
                      result.stderr.decode())

    def test_tty_under_a_pty(self):
        task = self.worker_task()
        session = self.pty("-a", self.app, "exec", task["ID"][:8], "sh", rows=33, cols=77)
        session.send("tty; stty size; exit 5\r")
        session.expect(r"/dev/pts/\d+")
        session.expect(r"33 77")
        self.assertEqual(session.wait(), 5)
        self.assertEqual(session.attrs(), session.initial_attrs)


class SwarmRunTest(SwarmAppTestCase):
    def test_attached_status_and_stdin_end(self):
        result = self.convox("-a", self.app, "run", "web", "sh", "-c",
                             "cat; echo err >&2; exit 3", input=b"from stdin\n")
        self.assertEqual(result.returncode, 3, result.stderr)
        self.assertEqual((result.stdout, result.stderr), (b"from stdin\n", b"err\n"))
        self.assertNoServiceLeft(self.app, within=0.5)

    def test_release(self):
        app = app_name("sw-release")
        self.service(app, "web", replicas=1, release="RONE")
        result = self.convox("-a", app, "run", "--release", "RONE", "web", "echo", "ok")
        self.assertEqual((result.returncode, result.stdout), (0, b"ok\n"), result.stderr)
        result = self.convox("-a", app, "run", "--release", "RTWO", "web", "true")
        self.assertEqual(result.returncode, 125, result.stderr)
        self.assertOneErrorLine(result)
        self.assertIn(b"no such release: RTWO (app %s, service web); releases: RONE"
                      % app.encode(), result.stderr)
        self.assertNoServiceLeft(app, within=0.5)

    def test_command_not_found(self):
        result = self.convox("-a", self.app, "run", "web", "no-such-command")
        self.assertEqual(result.returncode, 127, result.stderr)
        self.assertNoServiceLeft(self.app, within=0.5)

    def test_detached_prints_the_id_and_stays_listed(self):
        result = self.convox("-a", self.app, "run", "--detach", "web", "sh", "-c",
                             "echo detached-$((40+2))")
        self.assertEqual(result.returncode, 0, result.stderr)
        match = re.match(rb"Running detached process\.\.\. OK, ([0-9a-f]{12})\n\Z",
                         result.stdout)
        self.assertTrue(match, result.stdout)
        ident = match.group(1).decode()
        for _ in deadline_loop(30, 0.2):
            found = [p for p in self.ps_json("--all") if p["id"].startswith(ident)]
            if found and found[0]["status"] == "exited (0)":
                break
        self.assertEqual((found[0]["type"], found[0]["status"]), ("process", "exited (0)"))
        stop = self.convox("-a", self.app, "ps", "stop", ident)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertNoServiceLeft(self.app, within=2)

    def test_timeout(self):
        started = time.monotonic()
        result = self.convox("-a", self.app, "run", "--timeout", "2", "web", "sleep", "60")
        self.assertEqual(result.returncode, 124, result.stderr)
        self.assertEqual(result.stderr, b"ERROR: timeout after 2 seconds\n")
        self.assertLess(time.monotonic() - started, 20)
        self.assertNoServiceLeft(self.app, within=0.5)

    def test_timeout_holds_when_the_client_is_killed(self):
        proc = subprocess.Popen(
            [sys.executable, CONVOX, "-a", self.app, "run", "--timeout", "2", "web", "sh",
             "-c", "echo ready; sleep 120"], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env())
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        read_until(proc, b"ready")
        deadline = time.monotonic() + 2
        proc.kill()
        proc.communicate(timeout=10)
        self.assertTrue(self.one_offs_of(self.app))  # still there: the client is gone
        self.assertNoServiceLeft(self.app, within=deadline - time.monotonic() + 15)

    def test_node_labels_place_the_one_off(self):
        node = [n for n in self.cluster.nodes.values()
                if n["Description"]["Hostname"] == self.cluster.hostnames[2]][0]
        label = "convox-test-%s" % RUN_ID
        self.label_node(node["ID"], {label: "yes"})
        result = self.convox("-a", self.app, "run", "--detach", "--node-labels",
                             "%s=yes" % label, "web", "true")
        self.assertEqual(result.returncode, 0, result.stderr)
        ident = result.stdout.split()[-1].decode()
        found = [p for p in self.ps_json("--all") if p["id"].startswith(ident)]
        self.assertEqual(found[0]["node"], self.cluster.hostnames[2])
        self.convox("-a", self.app, "ps", "stop", ident)
        # No node has it: one error line, nothing left behind.
        result = self.convox("-a", self.app, "run", "--node-labels", "%s=no" % label,
                             "web", "true")
        self.assertEqual(result.returncode, 125, result.stderr)
        self.assertIn(b"no node can run the one-off", result.stderr)
        self.assertNoServiceLeft(self.app, within=2)

    def label_node(self, node_id, labels):
        def update(new):
            node = self.manager.request("GET", "/nodes/%s" % node_id)
            spec = node["Spec"]
            spec["Labels"] = new
            self.manager.request("POST", "/nodes/%s/update" % node_id,
                                 {"version": node["Version"]["Index"]}, body=spec)
        old = dict(self.manager.request("GET", "/nodes/%s" % node_id)["Spec"].get("Labels")
                   or {})
        update(dict(old, **labels))
        self.addCleanup(update, old)

    def test_ctrl_c_reaches_the_command_and_leaves_no_service(self):
        session = self.pty("-a", self.app, "run", "--no-tty", "web", "sh", "-c",
                           'trap "echo got-int; exit 7" INT; echo ready; '
                           'while :; do sleep 0.1; done')
        session.expect("ready")
        self.assertTrue(self.one_offs_of(self.app))
        session.send("\x03")
        session.expect("got-int")
        self.assertEqual(session.wait(), 7)
        self.assertNoServiceLeft(self.app, within=0.5)

    def test_sigterm_reaches_the_command(self):
        proc = subprocess.Popen(
            [sys.executable, CONVOX, "-a", self.app, "run", "web", "sh", "-c",
             'trap "echo got-term; exit 8" TERM; echo ready; while :; do sleep 0.1; done'],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env())
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        read_until(proc, b"ready")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, out), (8, b"got-term\n"), err)
        self.assertNoServiceLeft(self.app, within=0.5)

    def test_tty_under_a_pty(self):
        session = self.pty("-a", self.app, "run", "web", "sh", rows=21, cols=66)
        session.send("tty; stty size; exit 6\r")
        session.expect(r"/dev/pts/\d+")
        session.expect(r"21 66")
        self.assertEqual(session.wait(), 6)
        self.assertEqual(session.attrs(), session.initial_attrs)
        self.assertNoServiceLeft(self.app, within=0.5)


class SwarmLogsTest(SwarmAppTestCase):
    def test_merged_from_three_nodes(self):
        app = app_name("sw-logs")
        service = self.service(app, "web", command=(
            "sh", "-c", 'for i in 1 2 3; do echo "$(hostname) line $i"; sleep 0.2; done; '
            'sleep 3600'))
        tasks = self.running_tasks(service, 3)
        self.assertEqual(len({t["NodeID"] for t in tasks}), 3)
        containers = {t["Status"]["ContainerStatus"]["ContainerID"] for t in tasks}
        for _ in deadline_loop(20, 0.2):
            result = self.convox("-a", app, "logs", "--no-follow", "--format", "json")
            entries = [json.loads(line) for line in result.stdout.decode().splitlines()]
            if len(entries) >= 9:
                break
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(entries), 9, entries)
        self.assertEqual({e["id"] for e in entries}, containers)
        for entry in entries:
            self.assertEqual(entry["line"].split()[0], entry["id"][:12])  # its own line
        times = [e["time"] for e in entries]
        self.assertEqual(times, sorted(times))  # merged by the engine's stamps
        text = self.convox("-a", app, "logs", "--no-follow")
        lines = text.stdout.decode().splitlines()
        self.assertEqual(len(lines), 9, text.stderr)
        for line, entry in zip(lines, entries):
            self.assertEqual(line, "%sZ service/web/%s %s" % (
                entry["time"][:19], entry["id"][:12], entry["line"]))

    def test_a_detached_one_off_by_its_id(self):
        result = self.convox("-a", self.app, "run", "--detach", "web", "sh", "-c",
                             "echo detached-$((40+2)); echo to-stderr >&2")
        self.assertEqual(result.returncode, 0, result.stderr)
        ident = result.stdout.split()[-1].decode()
        for _ in deadline_loop(20, 0.2):
            logs = self.convox("-a", self.app, "logs", ident, "--no-follow")
            if logs.stdout.count(b"\n") >= 2:
                break
        self.assertEqual(logs.returncode, 0, logs.stderr)
        lines = logs.stdout.decode().splitlines()
        # (Its stdout and stderr are stamped apart: either may come first.)
        self.assertEqual(sorted(line.split(" ", 2)[1:] for line in lines),
                         [["service/web/" + ident, "detached-42"],
                          ["service/web/" + ident, "to-stderr"]])
        self.convox("-a", self.app, "ps", "stop", ident)

    def test_following_picks_up_a_new_one_off(self):
        proc = subprocess.Popen(
            [sys.executable, CONVOX, "-a", self.app, "logs", "--since", "1s"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env())
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        time.sleep(1.5)  # following (its first look at the tasks is done by then)
        result = self.convox("-a", self.app, "run", "--detach", "web", "sh", "-c",
                             "sleep 1; echo picked-up")
        self.assertEqual(result.returncode, 0, result.stderr)
        ident = result.stdout.split()[-1].decode()
        read_until(proc, b"service/web/%s picked-up\n" % ident.encode(), timeout=20)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 0, err)
        self.convox("-a", self.app, "ps", "stop", ident)


# ==========================================================================================
# The real engine: logs
# ==========================================================================================

class LogsTest(RunTestCase):
    """convox logs against the real engine (SPEC §9), the Docker CLI as the oracle."""

    def logged(self, app, service, script, tty=False, kind=None, driver=None):
        """A process of ``app`` that runs ``script`` in sh; -> its ID."""
        labels = {TEST_LABEL: RUN_ID, convox.LABEL_APP: app, convox.LABEL_SERVICE: service,
                  convox.LABEL_TYPE: kind or "service"}  # as start or run makes it
        ident = self.engine.create_container({
            "Image": self.image, "Cmd": ["sh", "-c", script], "Tty": tty, "Labels": labels,
            "HostConfig": {"Init": True, "NetworkMode": "none",
                           "LogConfig": {"Type": driver} if driver else None}})["Id"]
        self.addCleanup(self.engine.remove, ident)
        self.engine.start(ident)
        return ident

    def engine_lines(self, ident, service):
        """(stamp, convox line) of each line, from `docker logs -t` (stdout and stderr in
        the order the engine sent them)."""
        docker = shutil.which("docker")
        if not docker:
            skip_unless_required(self, "the Docker CLI is not installed (used only as an "
                                       "oracle)")
        result = subprocess.run([docker, "logs", "-t", ident], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=HARNESS.env(), timeout=60)
        output = result.stdout[:-1] if result.stdout.endswith(b"\n") else result.stdout
        lines = []
        for line in output.split(b"\n") if output else []:  # the last may have no newline
            stamp, _, text = line.partition(b" ")
            lines.append((stamp, b"%sZ service/%s/%s %s" % (
                stamp[:19], service.encode(), ident[:12].encode(), text.rstrip(b"\r"))))
        return lines

    def wait_exited(self, *idents, within=30):
        for ident in idents:
            for _ in deadline_loop(within, 0.1):
                if not self.engine.inspect(ident)["State"]["Running"]:
                    break
            else:
                self.fail("%s still runs after %s s" % (ident, within))

    def logs(self, *args, **kwargs):
        result = self.convox("logs", *args, **kwargs)
        self.assertEqual((result.returncode, result.stderr), (0, b""), result.stdout[-500:])
        return result.stdout.split(b"\n")[:-1]

    def test_two_services_merged_in_the_engine_order(self):
        app = app_name("logsmerge")
        web = self.logged(app, "web", "for i in 1 2 3 4 5 6; do echo web out $i; sleep 0.05; "
                                      "echo web err $i >&2; sleep 0.05; done")
        worker = self.logged(app, "worker", "for i in 1 2 3 4 5 6; do echo worker $i; "
                                            "sleep 0.07; done", tty=True)
        self.wait_exited(web, worker)
        expected = sorted(self.engine_lines(web, "web") + self.engine_lines(worker, "worker"))
        self.assertEqual(len(expected), 18)
        output = self.logs("-a", app, "--no-follow")
        self.assertEqual(output, [line for _, line in expected])
        # -s keeps a service, PID one process (its whole output), each in the engine order
        self.assertEqual(self.logs("-a", app, "--no-follow", "-s", "worker"),
                         [line for _, line in self.engine_lines(worker, "worker")])
        self.assertEqual(self.logs("-a", app, "--no-follow", web[:12]),
                         [line for _, line in self.engine_lines(web, "web")])
        self.assertEqual(self.logs("-a", app, "--no-follow", "-s", "web", "-s", "worker"),
                         output)
        # --tail N: the last N lines of each process; --filter TEXT: lines with TEXT
        self.assertEqual(self.logs("-a", app, "--no-follow", "--tail", "1"),
                         [line for _, line in sorted([self.engine_lines(web, "web")[-1],
                                                     self.engine_lines(worker, "worker")[-1]])])
        self.assertEqual(self.logs("-a", app, "--no-follow", "--filter", "err 3"),
                         [line for _, line in expected if line.endswith(b"err 3")])

    def test_formats(self):
        app = app_name("logsformat")
        # json-file, Docker's default, stores U+FFFD for bytes that are not UTF-8; "local"
        # keeps them, and convox passes them through.
        web = self.logged(app, "web", "echo out; echo err >&2; printf '\\377\\376 bytes\\n'; "
                          "printf 'the end'", driver="local")
        self.wait_exited(web)
        stamps = {line.split(b" ", 2)[2]: stamp for stamp, line in self.engine_lines(web, "web")}
        records = [json.loads(line.decode()) for line in
                   self.logs("-a", app, "--no-follow", "--format", "json", "--filter", "e")]
        self.assertEqual(sorted((r["line"], r["stream"]) for r in records),
                         sorted([("\ufffd\ufffd bytes", "stdout"), ("err", "stderr"),
                                 ("the end", "stdout")]))
        for record in records:
            self.assertEqual(set(record), {"time", "service", "id", "stream", "line"})
            self.assertEqual((record["service"], record["id"]), ("web", web))
            text = record["line"].encode().replace(b"\xef\xbf\xbd", b"\xff", 1).replace(
                b"\xef\xbf\xbd", b"\xfe", 1)
            self.assertEqual(record["time"].encode(), stamps[text])
        # compose's prefix, no colour off a terminal; bytes that are not UTF-8 unchanged; a
        # last line without a newline printed whole at the end
        output = self.logs("-a", app, "--no-follow", "--format", "compose")
        self.assertEqual(sorted(output[:3]), sorted([b"web-%s | out" % web[:8].encode(),
                                                     b"web-%s | err" % web[:8].encode(),
                                                     b"web-%s | \xff\xfe bytes" %
                                                     web[:8].encode()]))
        self.assertEqual(output[3:], [b"web-%s | the end" % web[:8].encode()])

    def test_since_and_until_forms(self):
        app = app_name("logssince")
        web = self.logged(app, "web", "echo early; sleep 4; echo late; sleep 3600")
        for _ in deadline_loop(30, 0.1):
            lines = self.engine_lines(web, "web")
            if len(lines) == 2:
                break
        (_, early), (late_stamp, late) = lines
        late_at = convox.parse_timestamp(late_stamp.decode())
        since = late_at - 2  # early was 4 s before late
        forms = {
            "RFC 3339": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
            "RFC 3339 with an offset": time.strftime("%Y-%m-%dT%H:%M:%S+00:00",
                                                     time.gmtime(since)),
            "UNIX seconds": "%.3f" % since,
            "local date and time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since)),
        }
        for name, when in list(forms.items()) + [("duration", None)]:
            with self.subTest(form=name):
                if when is None:  # just before the run: a duration counts from now
                    when = "%ds" % (time.time() - since)
                self.assertEqual(self.logs("-a", app, "--no-follow", "--since", when), [late])
        self.assertEqual(self.logs("-a", app, "--no-follow", "--since", "1d"), [early, late])
        self.assertEqual(self.logs("-a", app, "--no-follow", "--since",
                                   time.strftime("%Y-%m-%d", time.localtime(since - 86400))),
                         [early, late])
        self.assertEqual(self.logs("-a", app, "--no-follow", web[:12], "--until",
                                   "%.3f" % since), [early])
        # the default is the last 2 minutes
        self.assertEqual(self.logs("-a", app, "--no-follow"), [early, late])

    def test_detached_one_off_during_and_after(self):
        app = app_name("logsdetach")
        self.container(app, "web")
        info = self.detached("-a", app, "run", "--detach", "web", "sh", "-c",
                             "echo first; sleep 2; echo second; exit 3")
        proc = self.client("-a", app, "logs", info["Id"][:12])
        read_until(proc, b" first\n", timeout=10)
        self.assertTrue(self.engine.inspect(info["Id"])["State"]["Running"])
        out, err = proc.communicate(timeout=30)  # the process's end ends its stream
        self.assertEqual(proc.returncode, 0, err)
        after = self.logs("-a", app, "--no-follow", info["Id"][:12])
        label = b"service/web/%s " % info["Id"][:12].encode()
        self.assertEqual([line.split(b" ", 1)[1] for line in after],
                         [label + b"first", label + b"second"])

    def test_follow_picks_up_lines_and_new_processes(self):
        app = app_name("logsfollow")
        web = self.logged(app, "web", "echo ready; while true; do if [ -f /go ]; then "
                                      "echo go-line; rm /go; fi; sleep 0.05; done")
        proc = self.client("-a", app, "logs")
        read_until(proc, b"ready\n", timeout=15)
        started = time.monotonic()
        self.docker("exec", web, "touch", "/go")
        read_until(proc, b"service/web/%s go-line\n" % web[:12].encode(), timeout=2)
        line_after = time.monotonic() - started
        info = self.detached("-a", app, "run", "--detach", "web", "echo", "from the one-off")
        started = time.monotonic()
        read_until(proc, b"service/web/%s from the one-off\n" % info["Id"][:12].encode(),
                   timeout=3)
        one_off_after = time.monotonic() - started
        proc.send_signal(signal.SIGINT)  # Ctrl-C ends it: status 0, quietly
        out, err = proc.communicate(timeout=10)
        self.assertEqual((proc.returncode, err), (0, b""))
        sys.stderr.write("figures: logs follow: a new line after %.2f s, a new one-off's line "
                         "%.2f s after run --detach returned\n" % (line_after, one_off_after))

    def test_a_process_that_starts_again_goes_on_after_its_last_line(self):
        app = app_name("logsrestart")
        job = self.logged(app, "job", "echo ran")
        self.wait_exited(job)
        proc = self.client("-a", app, "logs")
        output = read_until(proc, b" ran\n", timeout=15)
        self.engine.start(job)  # the same container again: its old lines are not repeated
        self.wait_exited(job)
        output += read_until(proc, b" ran\n", timeout=5)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
        self.assertEqual((proc.returncode, err), (0, b""))
        self.assertEqual((output + rest).count(b"service/job/%s ran\n" % job[:12].encode()), 2,
                         output + rest)

    def test_long_line_whole_and_closed_pipe(self):
        app = app_name("logslong")
        web = self.logged(app, "web", "head -c 100000 /dev/zero | tr '\\0' x; echo; "
                                      "seq 1 50000")
        tty = self.logged(app, "tty", "head -c 100000 /dev/zero | tr '\\0' y; echo",
                          tty=True)
        self.wait_exited(web, tty)
        output = self.logs("-a", app, "--no-follow", web[:12])
        self.assertEqual(len(output), 50001)
        self.assertTrue(output[0].endswith(b" service/web/%s %s" % (
            web[:12].encode(), b"x" * 100000)), output[0][:100])
        self.assertEqual(output[-1].split(b" ")[-1], b"50000")
        output = self.logs("-a", app, "--no-follow", tty[:12])
        self.assertEqual(len(output), 1)
        self.assertTrue(output[0].endswith(b" service/tty/%s %s" % (
            tty[:12].encode(), b"y" * 100000)), output[0][:100])
        # | head -n1: the pipe closes under it; quiet, 141 -- also while no line comes
        quiet = self.logged(app, "quiet", "echo one; sleep 3600")
        for ident in (web, quiet):
            proc = self.client("-a", app, "logs", ident[:12])
            proc.stdout.readline()
            proc.stdout.close()
            proc.wait(timeout=10)  # not communicate(): on 3.6 it cannot take a closed stdout
            self.assertEqual((proc.returncode, proc.stderr.read()), (141, b""))

    def test_bad_input(self):
        app = app_name("logsbad")
        self.logged(app, "web", "echo hi")
        for args, status in ((("--since", "yesterday"), 2), (("--tail", "-3"), 2),
                             (("--until", "2026-02-30"), 2), (("nosuchprocess",), 1),
                             (("-s", "nosuchservice"), 1), (("--format", "xml"), 2)):
            with self.subTest(args=args):
                result = self.convox("-a", app, "logs", "--no-follow", *args)
                self.assertEqual(result.returncode, status, result.stderr)
                self.assertOneErrorLine(result)
        result = self.convox("-a", app_name("logsnone"), "logs")
        self.assertEqual(result.returncode, 1)
        self.assertOneErrorLine(result)
        result = self.convox("-a", app, "logs", "web")  # a service, not a process
        self.assertEqual(result.returncode, 1)
        self.assertIn(b"web is a service \xe2\x80\x94 use convox logs -s web", result.stderr)


class LogsTerminalTest(TerminalTestCase):
    """convox logs at a terminal: compose's colours per process, Ctrl-C ends it with 0."""

    def test_colours_and_ctrl_c(self):
        app = app_name("logstty")
        web = self.container(app, "web", ("sh", "-c", "echo hello from web; sleep 3600"))
        job = self.container(app, "job", ("sh", "-c", "echo hello from job; sleep 3600"))
        term = self.pty("-a", app, "logs", "--format", "compose")
        term.expect(rb"hello from \w+\r\n[\s\S]*hello from \w+\r\n")
        colours = {name: colour for colour, name in re.findall(
            rb"\x1b\[(\d+)m((?:web|job)-[0-9a-f]{8}) \| \x1b\[0mhello from \w+\r\n",
            term.output)}
        self.assertEqual(sorted(colours), sorted([b"web-" + web[:8].encode(),
                                                  b"job-" + job[:8].encode()]), term.output)
        self.assertEqual(len(set(colours.values())), 2, term.output)  # one each
        term.send(b"\x03")
        self.assertEqual(term.wait(10), 0, term.output)
        self.assertNotIn(b"ERROR", term.output)
        self.assertEqual(term.attrs(), term.initial_attrs)
        for option, env in ((("--no-color",), None), ((), {"NO_COLOR": "1"})):
            term = self.pty("-a", app, "logs", "--no-follow", "--format", "compose", *option,
                            env=env)
            self.assertEqual(term.wait(20), 0, term.output)
            self.assertNotIn(b"\x1b[", term.output)
            self.assertIn(b"%s | hello from web\r\n" % ("web-" + web[:8]).encode(),
                          term.output)


class SwarmSshTest(SwarmAppTestCase):
    """Nodes reached over ssh, as most Swarms are: an sshd in each worker's network
    namespace (key-only user, host keys checked), CONVOX_NODE_RACK=ssh://USER@{addr}/…"""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.ssh = SshServer(user="cvn%s" % RUN_ID)
        cls.sshd = []
        try:
            cls._start_sshd()
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def _start_sshd(cls):
        cls.ssh.setup(cls.cluster.socket_url(0)[len("unix://"):])
        if not cls.ssh.ready:
            message = "ssh tests unavailable: %s" % cls.ssh.problem
            if REQUIRE_ENGINE:
                raise RuntimeError(message)
            raise unittest.SkipTest(message)
        folder = cls.ssh.folder
        os.chmod(cls.cluster.folder, 0o711)  # the user's sshd reaches the nodes' sockets
        with open(os.path.join(folder, "host_key.pub")) as handle:
            host_key = " ".join(handle.read().split()[:2])
        known = []
        for index in (1, 2):
            addr = cls.cluster.addrs[index]
            config = os.path.join(folder, "sshd_node%d.conf" % index)
            with open(config, "w") as handle:
                handle.write(
                    "Port 22\nListenAddress %s\nHostKey %s\nPidFile none\nUsePAM no\n"
                    "AuthenticationMethods publickey\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nStrictModes no\nAllowUsers %s\n"
                    "AuthorizedKeysFile %s\n" % (
                        addr, os.path.join(folder, "host_key"), cls.ssh.user,
                        os.path.join(folder, "home", ".ssh", "authorized_keys")))
            cls.sshd.append(subprocess.Popen(
                ["nsenter", "--net=/run/netns/" + cls.cluster.names[index], "--",
                 shutil.which("sshd") or "/usr/sbin/sshd", "-D", "-e", "-f", config],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                stdin=subprocess.DEVNULL, cwd="/"))
            known.append("%s %s\n" % (addr, host_key))
            for _ in deadline_loop(15, 0.05):
                with socket.socket() as probe:
                    if probe.connect_ex((addr, 22)) == 0:
                        break
        with open(os.path.join(folder, "nodes_known_hosts"), "w") as handle:
            handle.writelines(known)
        with open(os.path.join(folder, "ssh_config_nodes"), "w") as handle:
            handle.write("Host *\n  IdentityFile %s\n  IdentitiesOnly yes\n"
                         "  UserKnownHostsFile %s\n  GlobalKnownHostsFile /dev/null\n"
                         "  BatchMode yes\n  StrictHostKeyChecking yes\n" % (
                             os.path.join(folder, "user_key"),
                             os.path.join(folder, "nodes_known_hosts")))

    @classmethod
    def tearDownClass(cls):
        for proc in cls.sshd:
            proc.terminate()
            proc.wait(10)
        cls.ssh.cleanup()
        os.chmod(cls.cluster.folder, 0o700)
        super().tearDownClass()

    def node_env(self):
        # Each node's own socket, by {hostname}: a link in the cluster's folder.
        for index, hostname in enumerate(self.cluster.hostnames):
            link = os.path.join(self.cluster.folder, hostname + ".sock")
            if not os.path.lexists(link):
                os.symlink(self.cluster.socket_url(index)[len("unix://"):], link)
        return {"CONVOX_NODE_RACK": "ssh://%s@{addr}%s/{hostname}.sock" % (
                    self.ssh.user, self.cluster.folder),
                "CONVOX_SSH_COMMAND": "ssh -F %s" % os.path.join(self.ssh.folder,
                                                                  "ssh_config_nodes")}

    def test_exec_on_a_worker_over_ssh(self):
        task = self.worker_task()
        data = os.urandom(1024 * 1024)
        result = self.convox("-a", self.app, "exec", task["ID"][:8], "sh", "-c",
                             "cat; exit 9", input=data, env=self.node_env())
        self.assertEqual(result.returncode, 9, result.stderr)
        self.assertEqual(hashlib.sha256(result.stdout).digest(), hashlib.sha256(data).digest())
        for _ in deadline_loop(10, 0.1):  # its ssh ended with it
            if not self.ssh.ssh_processes():
                break
        self.assertEqual(self.ssh.ssh_processes(), [])

    def test_run_attached_over_ssh(self):
        worker = "node.hostname==%s" % self.cluster.hostnames[1]
        app = app_name("sw-sshrun")
        self.service(app, "web", replicas=1, constraints=[worker])
        result = self.convox("-a", app, "run", "web", "sh", "-c", "cat; exit 4",
                             input=b"over ssh\n", env=self.node_env())
        self.assertEqual((result.returncode, result.stdout), (4, b"over ssh\n"),
                         result.stderr)
        self.assertNoServiceLeft(app, within=0.5)


# ==========================================================================================
# Benchmarks: a smoke run of bench/bench.py --quick
# ==========================================================================================

class BenchSmokeTest(EngineTestCase):
    """bench/bench.py --quick runs against the real engine, prints every workload, exits 0
    and leaves nothing behind.  No timing assertions: figures go to the README."""

    WORKLOADS = ("ps", "startup", "exec", "stdout", "stdin", "run", "tty", "rss", "logs", "ssh")

    def test_quick_run_prints_every_workload(self):
        bench = os.path.join(HERE, "bench", "bench.py")
        with tempfile.TemporaryDirectory() as folder:
            figures = os.path.join(folder, "bench.json")
            result = subprocess.run([sys.executable, bench, "--quick", "--json", figures],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, env=HARNESS.env(),
                                    cwd=HERE, timeout=300)
            self.assertEqual(result.returncode, 0, result.stderr[-3000:])
            output = result.stdout.decode("utf-8", "replace")
            printed = {line.split()[0] for line in output.splitlines() if line.strip()}
            for name in self.WORKLOADS:
                self.assertIn(name, printed, output)
            with open(figures) as handle:
                data = json.load(handle)
        self.assertEqual(data["failures"], [])
        expected = set(self.WORKLOADS)
        if any(note.startswith("ssh workloads skipped") for note in data["notes"]):
            self.assertFalse(REQUIRE_ENGINE, data["notes"])  # CI has sshd
            expected.discard("ssh")
        self.assertEqual({row["workload"] for row in data["rows"]}, expected)
        for label in ("convox.bench=" + data["run_id"], "convox.app=" + data["app"]):
            self.assertEqual(self.engine.containers(all=True, filters={"label": [label]}),
                             [], "containers left behind with " + label)
        images = self.engine.request("GET", "/images/json", {
            "filters": {"label": ["convox.bench=" + data["run_id"]]}})
        self.assertEqual(images, [], "bench image left behind")


# ==========================================================================================
# Reliability: faults, bad input, load, Podman
# ==========================================================================================

def printed_seed(name):
    """A seed for a randomised test: CONVOX_TEST_SEED, else fresh; printed so that a
    failure can be replayed."""
    seed = int(os.environ.get("CONVOX_TEST_SEED") or random.randrange(1 << 32))
    sys.stderr.write("test: %s seed %d (CONVOX_TEST_SEED=%d replays it)\n" % (name, seed, seed))
    return seed


def client_env(rack, **extra):
    """The environment of a convox subprocess aimed at ``rack``, none of ours inherited."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CONVOX_", "DOCKER_"))}
    env.update({"CONVOX_RACK": rack, "DOCKER_HOST": rack})
    env.update(extra)
    return env


def frame(stream, payload):
    """One frame of Docker's multiplexed stream."""
    return struct.pack(">BxxxL", stream, len(payload)) + payload


class ReliabilityChecks:
    """Assertions shared by the reliability tests (a mixin for unittest.TestCase)."""

    def assertCleanFailure(self, status, stderr, expected=125):
        """One ``ERROR:`` line last, no traceback, no "report it" (the catch-all for bugs),
        and the status the verb owes (never 0)."""
        text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
        lines = text.splitlines()
        self.assertNotIn("Traceback", text)
        self.assertTrue(lines and lines[-1].startswith("ERROR: "), text)
        self.assertEqual(len([l for l in lines if l.startswith("ERROR: ")]), 1, text)
        self.assertNotIn("report it", text)
        self.assertNotEqual(status, 0, text)
        if expected is not None:
            self.assertEqual(status, expected, text)


# -- a fake engine for faults the real one can't produce on demand --------------------------

class FakeEngineHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as the engine speaks it; every request goes to ``fake``."""
    protocol_version = "HTTP/1.1"
    rbufsize = 0  # unbuffered: a body left unread stays in the socket, so closing resets
    fake = None

    def log_message(self, *args):
        pass  # the client's output is what the tests read

    def do_GET(self):
        self.fake.handle(self, "GET")

    def do_POST(self):
        self.fake.handle(self, "POST")

    def do_DELETE(self):
        self.fake.handle(self, "DELETE")


class FakeEngine:
    """Enough of the Engine API for ps, exec and run, on a UNIX socket (or TCP), in a thread.

    ``faults`` names what goes wrong (see ``handle``); ``api_version`` is the /_ping header
    (None: no header) and versions outside [min_version, api_version] are refused as
    Docker refuses them.  ``requests`` records (method, version, path) of every request.
    """

    def __init__(self, faults=(), api_version="1.41", min_version="1.12", tcp=False,
                 exec_code=0, output=b"hello from the fake\n", ping_headers=None):
        self.faults = set(faults)
        self.ping_headers = ping_headers or {}
        self.api_version = api_version
        self.min_version = min_version
        self.exec_code = exec_code
        self.output = output
        self.requests = []
        self.containers = {}
        self.execs = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.folder = tempfile.mkdtemp(prefix="convox-fake-")
        handler = type("Handler", (FakeEngineHandler,), {"fake": self})
        if tcp:
            self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
            self.url = "tcp://127.0.0.1:%d" % self.server.server_address[1]
        else:
            path = os.path.join(self.folder, "engine.sock")
            self.server = socketserver.ThreadingUnixStreamServer(path, handler)
            self.url = "unix://" + path
        self.server.daemon_threads = True
        # A client that goes away mid-reply is what these tests do; not worth a traceback
        # (which would land in the stderr a fuzz case captures).
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.daemon = True
        self.thread.start()

    def close(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        shutil.rmtree(self.folder, ignore_errors=True)

    # -- state -----------------------------------------------------------------------------

    def add_container(self, app, service, labels=None, name=None, running=True,
                      command=("sleep", "3600"), memory=0, kind=None):
        ident = os.urandom(32).hex()
        all_labels = {convox.LABEL_APP: app, convox.LABEL_SERVICE: service,
                      convox.LABEL_TYPE: kind or "service"}
        all_labels.update(labels or {})
        self.containers[ident] = self._container(ident, name or "fake-%s" % ident[:6], {
            "Image": "busybox", "Cmd": list(command), "Labels": all_labels, "Env": [],
            "HostConfig": {"Memory": memory}}, running)
        return ident

    def _container(self, ident, name, config, running=False):
        return {"Id": ident, "Name": name, "Config": config, "Running": running,
                "Started": threading.Event(), "Exited": threading.Event(),
                "Removed": threading.Event(), "ExitCode": None, "Created": time.time()}

    def find(self, ref):
        with self.lock:
            for ident, c in self.containers.items():
                if ref in (ident, c["Name"]) or (len(ref) >= 3 and ident.startswith(ref)):
                    return c
        return None

    def summary(self, c):
        config = c["Config"]
        return {"Id": c["Id"], "Names": ["/" + c["Name"]], "Image": config.get("Image"),
                "ImageID": "sha256:" + "0" * 64, "Command": " ".join(config.get("Cmd") or []),
                "Created": int(c["Created"]), "Labels": config.get("Labels") or {},
                "State": "running" if c["Running"] else "exited",
                "Status": "Up" if c["Running"] else "Exited (%s)" % c["ExitCode"]}

    def inspect(self, c):
        config = dict(c["Config"])
        command = list(config.get("Entrypoint") or []) + list(config.get("Cmd") or [])
        started = "2024-01-01T00:00:00.000000000Z" if c["Started"].is_set() or \
            c["Running"] else "0001-01-01T00:00:00Z"
        return {"Id": c["Id"], "Name": "/" + c["Name"], "Image": "sha256:" + "0" * 64,
                "Path": command[0] if command else "", "Args": command[1:],
                "Created": "2024-01-01T00:00:00Z", "Config": config,
                "HostConfig": config.get("HostConfig") or {},
                "NetworkSettings": {"Networks": {}}, "Mounts": [],
                "State": {"Status": "running" if c["Running"] else "exited",
                          "Running": c["Running"], "ExitCode": c["ExitCode"] or 0,
                          "StartedAt": started}}

    # -- the protocol ----------------------------------------------------------------------

    def reply(self, handler, status, body=None, content_type="application/json",
              headers=None):
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode("utf-8")
        elif isinstance(body, str):
            data = body.encode("utf-8")
        else:
            data = body or b""
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        if data or status not in (204, 304):
            handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def upgrade(self, handler, tty=False):
        """101 Switching Protocols: from here on the socket is a raw stream."""
        kind = "raw-stream" if tty else "multiplexed-stream"
        handler.connection.sendall(
            b"HTTP/1.1 101 UPGRADED\r\nContent-Type: application/vnd.docker." +
            kind.encode() + b"\r\nConnection: Upgrade\r\nUpgrade: tcp\r\n\r\n")
        handler.close_connection = True

    def reset(self, handler):
        """Close at once, the request body unread: the client sees ECONNRESET (UNIX) or a
        TCP RST (SO_LINGER 0), not an orderly end."""
        sock = handler.connection
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        handler.rfile.close()
        handler.wfile.close()
        sock.close()  # the last reference: the socket really closes, and resets
        handler.wfile = io.BytesIO()  # what http.server still flushes goes nowhere
        handler.close_connection = True

    def hang(self, handler):
        """A response that never comes (until the fake is closed)."""
        self.stopping.wait(120)
        handler.close_connection = True

    def hostile(self, handler, fault):
        """Answers no engine gives: a body announced as 10 GB or one with no end, sent as
        fast as the client reads; a head or a body at one byte a second."""
        handler.close_connection = True
        sock = handler.connection
        head = {"huge-body": b"Content-Length: 10000000000\r\n",
                "endless-body": b"Connection: close\r\n",
                "trickle-body": b"Content-Length: 100\r\n",
                "trickle-head": b"X-Slow: "}[fault]
        with contextlib.suppress(OSError):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + head +
                         (b"" if fault == "trickle-head" else b"\r\n"))
            while not self.stopping.is_set():
                if fault.startswith("trickle"):
                    sock.sendall(b" ")
                    self.stopping.wait(1)
                else:
                    sock.sendall(b" " * (1 << 20))

    def handle(self, handler, method):
        parts = urllib.parse.urlsplit(handler.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        match = re.match(r"/v([0-9][0-9.]*)(/.*)", parts.path)
        version, path = match.groups() if match else (None, parts.path)
        self.requests.append((method, version, path))
        fault = lambda name: name in self.faults  # noqa: E731
        if fault("reset-upgrade") and path.endswith("/start") and path.startswith("/exec/"):
            return self.reset(handler)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw.decode("utf-8")) if raw else {}
        except ValueError:
            body = {}
        if version is not None:
            number = convox._version_tuple(version)
            if number < convox._version_tuple(self.min_version):
                return self.reply(handler, 400, {"message": "client version %s is too old. "
                                  "Minimum supported API version is %s, please upgrade your "
                                  "client to a newer version" % (version, self.min_version)})
            newest = convox._version_tuple(self.api_version or "")
            if newest != (0,) and number > newest:
                return self.reply(handler, 400, {"message": "client version %s is too new. "
                                  "Maximum supported API version is %s" %
                                  (version, self.api_version)})
        if path == "/_ping":
            if fault("never-ping"):
                return self.hang(handler)
            headers = {"API-Version": self.api_version} if self.api_version else {}
            headers.update(self.ping_headers)
            return self.reply(handler, 200, "OK", "text/plain; charset=utf-8", headers)
        for hostile in self.faults & {"huge-body", "endless-body", "trickle-body",
                                      "trickle-head"}:
            return self.hostile(handler, hostile)
        if fault("500-json") and method == "POST" and path.endswith("/exec"):
            return self.reply(handler, 500, {"message": "cannot exec in a paused container"})
        if fault("500-text") and method == "POST" and path.endswith("/exec"):
            return self.reply(handler, 500, "<html>\n<h1>502 Bad Gateway</h1>\n</html>\n",
                              "text/html")
        if fault("never-exec-create") and method == "POST" and path.endswith("/exec"):
            return self.hang(handler)
        return self.route(handler, method, path, query, body)

    def route(self, handler, method, path, query, body):
        fault = lambda name: name in self.faults  # noqa: E731
        if method == "GET" and path == "/containers/json":
            with self.lock:
                found = [self.summary(c) for c in self.containers.values()
                         if query.get("all") == "1" or c["Running"]]
            return self.reply(handler, 200, found)
        if method == "POST" and path == "/containers/create":
            if fault("no-create"):
                return self.reply(handler, 500, {"message": "the fake makes no containers"})
            ident = os.urandom(32).hex()
            name = query.get("name") or "fake-" + ident[:6]
            with self.lock:
                self.containers[ident] = self._container(ident, name, body)
            return self.reply(handler, 201, {"Id": ident, "Warnings": []})
        match = re.match(r"/containers/([^/]+)(/[a-z]+)?$", path)
        if match:
            c = self.find(match.group(1))
            if c is None:
                return self.reply(handler, 404, {"message": "No such container: %s" %
                                                 match.group(1)})
            return self.container_route(handler, method, match.group(2) or "", c, query, body)
        match = re.match(r"/exec/([^/]+)/([a-z]+)$", path)
        if match and match.group(1) in self.execs:
            record = self.execs[match.group(1)]
            action = match.group(2)
            if action == "start":
                return self.exec_start(handler, record)
            if action == "json":
                if fault("500-inspect"):
                    return self.reply(handler, 500, {"message": "exec inspect exploded"})
                if fault("null-exit") or fault("running-forever"):
                    return self.reply(handler, 200, {"ID": match.group(1), "ExitCode": None,
                                                     "Running": fault("running-forever")})
                return self.reply(handler, 200, {"ID": match.group(1), "Running": False,
                                                 "ExitCode": self.exec_code})
            if action == "resize":
                return self.reply(handler, 201)
        if re.match(r"/networks/", path):
            return self.reply(handler, 200, {})
        return self.reply(handler, 404, {"message": "page not found"})

    def container_route(self, handler, method, action, c, query, body):
        if method == "GET" and action == "/json":
            return self.reply(handler, 200, self.inspect(c))
        if method == "DELETE" and action == "":
            if c.get("Removing"):
                return self.reply(handler, 409, {"message": "removal of container %s is "
                                                 "already in progress" % c["Id"]})
            with self.lock:
                self.containers.pop(c["Id"], None)
            c["Removed"].set()
            c["Exited"].set()
            return self.reply(handler, 204)
        if method == "POST" and action == "/exec":
            eid = os.urandom(32).hex()
            self.execs[eid] = {"Id": eid, "Config": body, "Container": c}
            return self.reply(handler, 201, {"Id": eid})
        if method == "POST" and action == "/start":
            c["Running"] = True
            c["Started"].set()
            return self.reply(handler, 204)
        if method == "POST" and action in ("/kill", "/stop"):
            number = getattr(signal, "SIG" + query.get("signal", "KILL"), signal.SIGKILL) \
                if action == "/kill" else signal.SIGTERM
            self.exit(c, 128 + int(number))
            return self.reply(handler, 204)
        if method == "POST" and action == "/resize":
            return self.reply(handler, 200)
        if method == "POST" and action == "/attach":
            return self.attach(handler, c)
        if method == "POST" and action == "/wait":
            return self.wait(handler, c, query.get("condition"))
        return self.reply(handler, 404, {"message": "page not found"})

    def exit(self, c, code):
        if c["ExitCode"] is None:
            c["ExitCode"] = code
        c["Running"] = False
        c["Exited"].set()
        if (c["Config"].get("HostConfig") or {}).get("AutoRemove"):
            if "slow-autoremove" in self.faults and not c.get("Removing"):
                # A busy engine: removal takes a while, and a DELETE meanwhile gets a 409.
                c["Removing"] = True
                timer = threading.Timer(1.0, self.exit, (c, code))
                timer.daemon = True
                timer.start()
                return
            with self.lock:
                self.containers.pop(c["Id"], None)
            c["Removed"].set()

    def stream_faults(self, handler, tty):
        """The stream faults shared by exec and attach; True when one was played."""
        sock = handler.connection
        if "trickle-upgrade" in self.faults or "huge-error" in self.faults:
            handler.close_connection = True
            with contextlib.suppress(OSError):
                if "huge-error" in self.faults:
                    sock.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/"
                                 b"plain\r\nContent-Length: 10000000000\r\n\r\nit broke")
                else:
                    sock.sendall(b"HTTP/1.1 101 UPGRADED\r\nX-Slow: ")
                while not self.stopping.is_set():
                    if "huge-error" in self.faults:
                        sock.sendall(b" " * (1 << 20))
                    else:
                        sock.sendall(b"x")
                        self.stopping.wait(1)
            return True
        if "cut-mid-frame" in self.faults:
            self.upgrade(handler, tty)
            sock.sendall(frame(1, b"complete\n") + struct.pack(">BxxxL", 1, 100) + b"0123456789")
            return True
        if "bad-header" in self.faults:
            self.upgrade(handler, tty)
            sock.sendall(frame(1, b"fine so far\n") + b"\x07\0\0\0\0\0\0\x01x")
            return True
        if "error-frame" in self.faults:
            self.upgrade(handler, tty)
            sock.sendall(frame(3, b"OCI runtime exec failed: boom\n"))
            return True
        if "reset-mid-stream" in self.faults:
            self.upgrade(handler, tty)
            sock.sendall(b"partial output" if tty else frame(1, b"partial output\n"))
            time.sleep(0.2)
            self.reset(handler)
            return True
        if "partial-head" in self.faults:
            sock.sendall(b"HTTP/1.1 101 UPGR")
            self.reset(handler)
            return True
        if "never-upgrade" in self.faults:
            self.hang(handler)
            return True
        if "500-start" in self.faults:
            self.reply(handler, 500, {"message": "container is restarting: wait until the "
                                      "container is running"})
            return True
        return False

    def exec_start(self, handler, record):
        tty = bool(record["Config"].get("Tty"))
        if self.stream_faults(handler, tty):
            return
        self.upgrade(handler, tty)
        handler.connection.sendall(self.output if tty else frame(1, self.output))

    def attach(self, handler, c):
        tty = bool(c["Config"].get("Tty"))
        if self.stream_faults(handler, tty):
            if "cut-mid-frame" in self.faults:
                c["Started"].wait(10)
            return
        self.upgrade(handler, tty)
        # Until started; a client that gives up first removes it (and the test closes the
        # fake): then let go of the connection at once, not 30 s later.
        while not c["Started"].wait(0.1):
            if self.stopping.is_set() or c["Removed"].is_set():
                return
        handler.connection.sendall(self.output if tty else frame(1, self.output))
        if (c["Config"].get("Cmd") or [""])[0] == "sleep":
            while not c["Exited"].wait(0.1) and not self.stopping.is_set():
                pass  # until killed
        self.exit(c, 0)

    def wait(self, handler, c, condition):
        if "wait-never" in self.faults and condition != "removed":
            return self.hang(handler)
        # As Docker does: the head goes out at once (the wait is set up), the body at exit.
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        handler.close_connection = True
        if "wait-broken" in self.faults and condition != "removed":
            return
        if "wait-endless" in self.faults and condition != "removed":
            with contextlib.suppress(OSError):
                while not self.stopping.is_set():  # a body with no end, as fast as read
                    handler.wfile.write(b"100000\r\n" + b" " * 0x100000 + b"\r\n")
            return
        event = c["Removed"] if condition == "removed" else c["Exited"]
        while not event.wait(0.1):
            if self.stopping.is_set():
                return
        data = json.dumps({"StatusCode": c["ExitCode"] or 0, "Error": None}).encode()
        with contextlib.suppress(OSError):
            handler.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data))


class FakeEngineTest(ReliabilityChecks, unittest.TestCase):
    """Faults of the engine (SPEC §8), from a fake one: each ends with one ERROR line and
    status 125, never a traceback, never a hang, the terminal restored."""

    APP = "fakeapp"

    def fake(self, *faults, **options):
        engine = FakeEngine(faults, **options)
        self.addCleanup(engine.close)
        engine.add_container(self.APP, "web")
        return engine

    def client(self, engine, *args, timeout=30, **env):
        """convox.py as a subprocess against the fake; -> (status, stdout, stderr, seconds)."""
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, CONVOX, "-a", self.APP] + list(args), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
            env=client_env(engine.url, **env), cwd=HERE, preexec_fn=limit_memory)
        return result.returncode, result.stdout, result.stderr, time.monotonic() - started

    def exec_fault(self, *faults, expect=125, tcp=False, args=("--no-tty", "web", "ls"),
                   timeout=30, **env):
        engine = self.fake(*faults, tcp=tcp)
        status, out, err, seconds = self.client(engine, "exec", *args, timeout=timeout, **env)
        self.assertCleanFailure(status, err, expect)
        return engine, out, err, seconds

    def test_a_single_engine_is_told_from_a_swarm_manager_without_info(self):
        # GET /info takes tens of ms on a busy engine: every command would pay for it.
        for ping_headers, asked in (({}, ["/_ping", "/swarm"]),  # Docker 20.10: no header
                                    ({"Swarm": "inactive"}, ["/_ping"])):
            engine = FakeEngine(ping_headers=ping_headers)
            self.addCleanup(engine.close)
            engine.add_container(self.APP, "web")
            status, out, err, _ = self.client(engine, "ps")
            self.assertEqual((status, err), (0, b""))
            self.assertEqual(len(out.splitlines()), 2)
            paths = [path for _, _, path in engine.requests]
            self.assertEqual(paths[:len(asked)], asked)
            self.assertNotIn("/info", paths)

    def test_stream_cut_mid_frame(self):
        _, out, err, _ = self.exec_fault("cut-mid-frame")
        self.assertEqual(out, b"complete\n0123456789")  # what arrived is not lost
        self.assertIn(b"inside a frame", err)

    def test_malformed_frame_header(self):
        _, out, err, _ = self.exec_fault("bad-header")
        self.assertEqual(out, b"fine so far\n")
        self.assertIn(b"malformed stream frame header", err)

    def test_engine_error_frame(self):
        _, _, err, _ = self.exec_fault("error-frame")
        self.assertIn(b"OCI runtime exec failed: boom", err)

    def test_reset_during_upgrade(self):
        for tcp in (False, True):
            for fault in ("reset-upgrade", "partial-head"):
                with self.subTest(fault=fault, tcp=tcp):
                    self.exec_fault(fault, tcp=tcp)

    def test_reset_mid_stream(self):
        # A reset looks like an end; the exit code then decides (here the engine is fine).
        for tcp in (False, True):
            with self.subTest(tcp=tcp):
                engine = self.fake("reset-mid-stream", "null-exit", tcp=tcp)
                status, out, err, _ = self.client(engine, "exec", "--no-tty", "web", "ls")
                self.assertCleanFailure(status, err)
                self.assertEqual(out, b"partial output\n")

    def test_exit_code_stays_null(self):
        for fault in ("null-exit", "running-forever"):
            with self.subTest(fault=fault):
                _, out, err, seconds = self.exec_fault(fault)
                self.assertEqual(out, b"hello from the fake\n")
                self.assertIn(b"no exit status", err)
                self.assertLess(seconds, 20)

    def test_500_json_and_text(self):
        _, _, err, _ = self.exec_fault("500-json")
        self.assertEqual(err, b"ERROR: cannot exec in a paused container\n")
        _, _, err, _ = self.exec_fault("500-text")
        self.assertIn(b"502 Bad Gateway", err)
        _, _, err, _ = self.exec_fault("500-start")
        self.assertIn(b"container is restarting", err)
        _, _, err, _ = self.exec_fault("500-inspect")
        self.assertIn(b"exec inspect exploded", err)

    def test_response_never_comes(self):
        for fault in ("never-ping", "never-exec-create", "never-upgrade"):
            with self.subTest(fault=fault):
                _, _, err, seconds = self.exec_fault(fault, CONVOX_TIMEOUT="1.5")
                self.assertIn(b"did not answer", err)
                self.assertLess(seconds, 15)

    def test_hostile_control_answers(self):
        """CONVOX_TIMEOUT bounds a whole control request and a control body is capped: a
        body announced as 10 GB, one that never ends, a head and a body at one byte a second
        each end in one ERROR line, in time and in little memory (under a 1 GiB address-space
        limit, so that a client that reads on fails instead of filling the host)."""
        for fault, budget, message in (
                ("huge-body", 3, b"with more than 64 MiB"),
                ("endless-body", 5, b"(with more than 64 MiB|did not answer)"),
                ("trickle-head", 5, b"did not answer GET .* within 2 s"),
                ("trickle-body", 5, b"did not answer GET .* within 2 s")):
            with self.subTest(fault):
                engine = self.fake(fault)
                started = time.monotonic()
                with tempfile.TemporaryFile() as err:
                    proc = subprocess.Popen(
                        [sys.executable, CONVOX, "-a", self.APP, "ps"], preexec_fn=limit_memory,
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                        env=client_env(engine.url, CONVOX_TIMEOUT="2"))
                    pid = 0
                    while not pid and time.monotonic() < started + 20:
                        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                        time.sleep(0.01)
                    if not pid:
                        proc.kill()
                        proc.wait()
                        self.fail("%s: no end within 20 s" % fault)
                    proc.returncode = os.waitstatus_to_exitcode(status) if hasattr(
                        os, "waitstatus_to_exitcode") else status >> 8
                    seconds = time.monotonic() - started
                    err.seek(0)
                    text = err.read()
                sys.stderr.write("test: %s: %.2f s, peak RSS %d MiB\n"
                                 % (fault, seconds, usage.ru_maxrss >> 10))
                self.assertCleanFailure(proc.returncode, text, 1)
                self.assertRegex(text, message)
                self.assertLess(seconds, budget)
                self.assertLess(usage.ru_maxrss >> 10, 200)  # MiB

    def test_endless_build_output(self):
        """A build answered by output with no newline and no end: an error once a message
        passes 64 MiB (under a 1 GiB address-space limit, which reading on would hit)."""
        engine = self.fake("endless-body")
        context = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, context)
        with open(os.path.join(context, "Dockerfile"), "w") as handle:
            handle.write("FROM scratch\n")
        script = ("import sys; sys.path.insert(0, %r); import convox\n"
                  "engine = convox.Engine(convox.parse_rack(%r), {})\n"
                  "try:\n"
                  "    list(engine.build(convox.tar_context(%r), {}))\n"
                  "except convox.ConvoxError as exc:\n"
                  "    print(type(exc).__name__, exc)\n" % (HERE, engine.url, context))
        started = time.monotonic()
        try:
            result = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=30, preexec_fn=limit_memory)
        except subprocess.TimeoutExpired:
            self.fail("no end within 30 s")
        self.assertRegex(result.stdout.decode(), r"^EngineError the engine sent a message of "
                                                 r"more than 64 MiB", result.stderr[-500:])
        self.assertLess(time.monotonic() - started, 10)

    def test_hostile_stream_heads(self):
        """The head of a stream request is read by CONVOX_TIMEOUT in all (one byte a second
        held exec forever), and an error body is read up to 64 KiB (one announced as 10 GB
        was read to the end, in quadratic time)."""
        for fault, message in (("trickle-upgrade", b"did not answer the stream request"),
                               ("huge-error", b"it broke")):
            with self.subTest(fault):
                try:
                    _, _, err, seconds = self.exec_fault(fault, CONVOX_TIMEOUT="2", timeout=20)
                except subprocess.TimeoutExpired:
                    self.fail("%s: no end within 20 s" % fault)
                self.assertIn(message, err)
                self.assertLess(seconds, 5)

    def test_keepalive_on_tcp(self):
        """Streams and builds have no deadline, but on a tcp:// rack the socket has TCP
        keepalive, so that one to a host that is gone ends."""
        engine = self.fake(tcp=True)
        client = convox.Engine(convox.parse_rack(engine.url), {})
        self.addCleanup(client.close)
        conn = client.connect(None)
        self.addCleanup(conn.close)
        options = [conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)] + [
            conn.sock.getsockopt(socket.IPPROTO_TCP, getattr(socket, name))
            for name in ("TCP_KEEPIDLE", "TCP_KEEPINTVL", "TCP_KEEPCNT")]
        self.assertEqual(options, [1, 30, 10, 3])

    def test_timeout_setting(self):
        engine = self.fake()
        status, _, err, _ = self.client(engine, "ps", CONVOX_TIMEOUT="soon")
        self.assertCleanFailure(status, err, 2)
        self.assertIn(b"CONVOX_TIMEOUT", err)

    def test_api_versions(self):
        # Newer than we know, and still serving ours: it works, at our newest version.
        engine = self.fake(api_version="1.99")
        status, out, err, _ = self.client(engine, "exec", "--no-tty", "web", "ls")
        self.assertEqual((status, out, err), (0, b"hello from the fake\n", b""))
        self.assertEqual({v for _, v, p in engine.requests if p != "/_ping"},
                         {convox.API_VERSION_MAX})
        # A header that is not a version is no header: 1.24, the oldest, not "/vbanana/".
        engine = self.fake(api_version="banäna")
        status, out, err, _ = self.client(engine, "exec", "--no-tty", "web", "ls")
        self.assertEqual((status, out, err), (0, b"hello from the fake\n", b""))
        self.assertEqual({v for _, v, p in engine.requests if p != "/_ping"}, {"1.24"})
        # Newer, and no longer serving ours; no header at all (1.24) on an engine whose
        # minimum is above it; garbage on an engine that serves only new versions.
        for api, minimum in (("1.99", "1.50"), (None, "1.40"), ("x.y", "1.40")):
            with self.subTest(api=api, minimum=minimum):
                engine = self.fake(api_version=api, min_version=minimum)
                status, _, err, _ = self.client(engine, "exec", "--no-tty", "web", "ls")
                self.assertCleanFailure(status, err)
                status, _, err, _ = self.client(engine, "ps")
                self.assertCleanFailure(status, err, 1)

    def test_run_faults(self):
        for faults in (("cut-mid-frame",), ("wait-broken",), ("wait-never",),
                       ("wait-endless",), ("bad-header",), ("reset-mid-stream",)):
            with self.subTest(faults=faults):
                engine = self.fake(*faults)
                status, _, err, seconds = self.client(
                    engine, "run", "--no-tty", "--timeout", "0", "web", "echo", "hi",
                    CONVOX_TIMEOUT="1.5")
                self.assertCleanFailure(status, err)
                self.assertLess(seconds, 15)
                # The one-off is removed on the way out.
                created = [p for m, _, p in engine.requests if p == "/containers/create"]
                self.assertEqual(len(created), 1)
                removed = [c for c in engine.containers.values()
                           if c["Config"].get("Labels", {}).get(convox.LABEL_TYPE) == "process"]
                self.assertEqual(removed, [])

    def test_run_returns_once_autoremove_is_done(self):
        # The engine may still be removing the one-off when its status arrives (a 409 to
        # the DELETE): run waits for that, so the one-off is gone when it returns.
        engine = self.fake("slow-autoremove")
        status, out, err, seconds = self.client(engine, "run", "--no-tty", "web", "true")
        self.assertEqual((status, out, err), (0, b"hello from the fake\n", b""))
        left = [c["Name"] for c in engine.containers.values()
                if c["Config"].get("Labels", {}).get(convox.LABEL_TYPE) == "process"]
        self.assertEqual(left, [])
        self.assertGreater(seconds, 1.0)

    def test_run_works_against_the_fake(self):
        engine = self.fake()
        status, out, err, _ = self.client(engine, "run", "--no-tty", "web", "echo", "hi")
        self.assertEqual((status, out, err), (0, b"hello from the fake\n", b""))

    def test_terminal_restored_after_faults(self):
        for faults in (("null-exit",), ("500-start",), ("reset-mid-stream", "500-inspect")):
            with self.subTest(faults=faults):
                engine = self.fake(*faults)
                env = {"CONVOX_RACK": engine.url, "DOCKER_HOST": engine.url}
                term = PtySession(["-a", self.APP, "exec", "--tty", "web", "sh"], env=env)
                self.addCleanup(term.close)
                status = term.wait(30)
                self.assertEqual(term.attrs(), term.initial_attrs)
                text = term.output.decode("utf-8", "replace")
                self.assertNotIn("Traceback", text)
                self.assertEqual(status, 125, text)
                # Raw output may leave the cursor mid-line, as with docker exec: the error
                # is the one last thing printed, not necessarily at a line's start.
                self.assertEqual(text.count("ERROR: "), 1, text)
                self.assertRegex(text, r"ERROR: [^\n]+\r?\n$")


class LogsFakeEngineTest(ReliabilityChecks, unittest.TestCase):
    """Log-stream faults the real engine can't produce on demand (SPEC §9): a stream cut
    mid-entry while the process runs is resumed from its last stamp, without duplicates;
    an engine error frame is one ERROR line."""

    STAMPS = [b"2026-12-02T10:00:0%d.000000000Z" % second for second in (1, 2, 2, 2, 3, 4)]

    def fake(self, first_answer):
        test = self

        class LogEngine(FakeEngine):
            def route(self, handler, method, path, query, body):
                if not re.match(r"/containers/[^/]+/logs$", path):
                    return super().route(handler, method, path, query, body)
                test.queries.append(query)
                handler.close_connection = True
                handler.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: "
                                    b"application/vnd.docker.raw-stream\r\n\r\n")
                if len(test.queries) == 1:
                    handler.wfile.write(first_answer)
                    return  # cut: the connection closes, the process still runs
                # since is inclusive, as Docker's: the lines of the last stamp come again
                since = query.get("since")
                handler.wfile.write(b"".join(
                    log_frame(1, stamp, b"line %d\n" % index)
                    for index, stamp in enumerate(test.STAMPS)
                    if convox.stamp_seconds(stamp) >= since))
                handler.wfile.flush()
                self.stopping.wait(30)  # following: the stream stays open

        self.queries = []
        engine = LogEngine()
        self.addCleanup(engine.close)
        return engine, engine.add_container("shop", "web")

    def test_cut_stream_resumes_without_duplicates(self):
        entries = b"".join(log_frame(1, stamp, b"line %d\n" % index)
                           for index, stamp in enumerate(self.STAMPS))
        cut = entries.index(b"line 4") - 5  # inside the fifth entry's stamp
        engine, ident = self.fake(entries[:cut])
        proc = subprocess.Popen([sys.executable, CONVOX, "-a", "shop", "logs", ident[:12]],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=client_env(engine.url))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        output = read_until(proc, b"line 5\n", timeout=20)
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
        self.assertEqual((proc.returncode, err), (0, b""))
        self.assertEqual([line.split(b" ", 2)[2] for line in (output + rest).splitlines()],
                         [b"line %d" % index for index in range(6)])
        self.assertEqual([q.get("since") for q in self.queries],
                         [None, convox.stamp_seconds(self.STAMPS[3])])

    def test_events_that_are_not_events(self):
        """An engine whose event stream sends JSON nested 100,000 deep, or values that are
        not objects: those lines are passed over, and logs follows on (it ended in a
        RecursionError, "…report it")."""
        class EventEngine(FakeEngine):
            def route(self, handler, method, path, query, body):
                if path != "/events" and not re.match(r"/containers/[^/]+/logs$", path):
                    return super().route(handler, method, path, query, body)
                handler.close_connection = True
                handler.wfile.write(b"HTTP/1.0 200 OK\r\n\r\n")
                if path == "/events":
                    handler.wfile.write(b"[" * 100000 + b"]" * 100000 + b"\n1\n[]\nnull\n")
                else:
                    handler.wfile.write(log_frame(1, LogsFakeEngineTest.STAMPS[0], b"line\n"))
                handler.wfile.flush()
                self.stopping.wait(30)  # following: the streams stay open
        engine = EventEngine()
        self.addCleanup(engine.close)
        engine.add_container("shop", "web")
        proc = subprocess.Popen([sys.executable, CONVOX, "-a", "shop", "logs"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=client_env(engine.url))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        output = read_until(proc, b"line\n", timeout=20)
        time.sleep(1)  # the events read meanwhile
        self.assertIsNone(proc.poll())
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
        self.assertEqual((proc.returncode, err), (0, b""))
        self.assertEqual((output + rest).count(b"\n"), 1)

    def test_engine_error_frame(self):
        engine, ident = self.fake(log_frame(1, self.STAMPS[0], b"before\n") +
                                  struct.pack(">BxxxL", 3, 18) + b"log file corrupted")
        result = subprocess.run([sys.executable, CONVOX, "-a", "shop", "logs", "--no-follow",
                                 ident[:12]], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                timeout=30, env=client_env(engine.url))
        self.assertCleanFailure(result.returncode, result.stderr, 1)
        self.assertIn(b"log file corrupted", result.stderr)
        self.assertEqual(result.stdout.split(b" ", 2)[2], b"before\n")  # never lost


# -- real faults: the engine killed, the kernel's OOM killer, a container killed -------------

class PrivateDockerd:
    """A second dockerd of our own, to kill mid-session.

    It runs in a network namespace of its own (``unshare --net``): with --bridge=none a
    dockerd deletes the host's docker0, which would cut off the engine everyone else uses.
    """

    def __init__(self, args=()):
        self.args = list(args)  # more of dockerd's options (another -H, TLS)
        self.folder = tempfile.mkdtemp(prefix="convox-test-dockerd2-")
        self.sock = os.path.join(self.folder, "docker.sock")
        self.rack_url = "unix://" + self.sock
        self.proc = None
        self.engine = None

    def start(self, timeout=60):
        log = open(os.path.join(self.folder, "dockerd.log"), "ab")
        self.proc = subprocess.Popen(
            ["unshare", "--net", "--", shutil.which("dockerd"),
             "--data-root", os.path.join(self.folder, "data"),
             "--exec-root", os.path.join(self.folder, "exec"),
             "--pidfile", os.path.join(self.folder, "dockerd.pid"),
             "-H", self.rack_url, "--bridge=none", "--iptables=false"] + self.args,
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        for _ in deadline_loop(timeout, 0.2):
            if self.proc.poll() is not None:
                break
            if os.path.exists(self.sock):
                engine = convox.Engine(convox.parse_rack(self.rack_url, {}), {})
                try:
                    engine.api_version()
                    self.engine = engine
                    return engine
                except convox.ConvoxError:
                    engine.close()
        raise RuntimeError("the private dockerd did not start: %s" % self.log_tail())

    def log_tail(self):
        with open(os.path.join(self.folder, "dockerd.log"), "rb") as handle:
            return handle.read()[-2000:].decode("utf-8", "replace")

    def kill(self):
        """SIGKILL, as an OOM killer or a crash would end it."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.engine.close()
        # Its containerd dies with it (parent-death signal), but may linger as a zombie
        # that nobody reaps; a restart would take that for a live containerd and wait for it.
        pidfile = os.path.join(self.folder, "exec", "containerd", "containerd.pid")
        with contextlib.suppress(OSError, ValueError):
            with open(pidfile) as handle:
                os.kill(int(handle.read().strip()), signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.unlink(pidfile)

    def cleanup(self):
        """Leave nothing: restarted, it stops what ran (no live-restore), then the
        containers go through the API, the daemon stops, and stragglers are killed."""
        try:
            if self.proc is None or self.proc.poll() is not None:
                self.start()
            for summary in self.engine.containers(all=True):
                self.engine.remove(summary["Id"])
            self.engine.close()
            self.proc.terminate()
            self.proc.wait(30)
        except Exception as exc:  # noqa: BLE001 - fall back to killing what is left
            sys.stderr.write("test: private dockerd cleanup: %s\n" % exc)
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(10)
        for pid in self.stragglers():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with open("/proc/self/mounts") as handle:
            mounts = [line.split()[1] for line in handle]
        for mount in sorted((m for m in mounts if m.startswith(self.folder)), reverse=True):
            subprocess.run(["umount", "-l", mount], stderr=subprocess.DEVNULL, timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)

    def stragglers(self):
        """Processes that name our folder: its containerd and shims, if any outlived it."""
        folder = self.folder.encode()
        return pids_where(lambda words: any(folder in word for word in words))


def read_until(proc, needle, timeout=30):
    """Read a subprocess's stdout until ``needle`` shows; -> what was read."""
    data = b""
    fd = proc.stdout.fileno()
    for _ in deadline_loop(timeout, 0):
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            if needle in data:
                return data
    raise AssertionError("%r not seen within %ss; got %r" % (needle, timeout, data))


class EngineDeathTest(ReliabilityChecks, TerminalTestCase):
    """Real faults on real engines (SPEC §8): the engine dies, the kernel kills."""

    def test_engine_killed_mid_session(self):
        if os.geteuid() != 0:
            skip_unless_required(self, "needs root to start a second dockerd")
        if not (shutil.which("dockerd") and shutil.which("unshare")):
            skip_unless_required(self, "needs dockerd and unshare: " + INSTALL_HINT)
        private = PrivateDockerd()
        self.addCleanup(private.cleanup)
        builder = Harness()
        builder.engine = private.start()
        builder._build_image()
        app = app_name("death")
        ident = builder.engine.create_container({
            "Image": builder.image, "Cmd": ["sleep", "3600"],
            "Labels": {TEST_LABEL: RUN_ID, convox.LABEL_APP: app, convox.LABEL_SERVICE: "web",
                       convox.LABEL_TYPE: "service"},
            "HostConfig": {"Init": True, "NetworkMode": "none"}})["Id"]
        builder.engine.start(ident)
        for verb in ("exec", "run"):
            with self.subTest(verb=verb):
                if private.proc.poll() is not None:
                    private.start()
                proc = subprocess.Popen(
                    [sys.executable, CONVOX, "-a", app, verb, "--no-tty", "web", "sh", "-c",
                     "echo started; exec cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, env=client_env(private.rack_url))
                self.addCleanup(lambda p=proc: p.poll() is None and p.kill())
                read_until(proc, b"started")
                private.kill()
                started = time.monotonic()
                try:
                    _, err = proc.communicate(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    self.fail("%s did not end within 10 s of the engine's death" % verb)
                sys.stderr.write("figures: engine killed mid-%s: client ended in %.2f s\n"
                                 % (verb, time.monotonic() - started))
                self.assertCleanFailure(proc.returncode, err)
        with self.subTest(verb="logs"):  # following: one ERROR line, status 1
            if private.proc.poll() is not None:
                private.start()
            worker = private.engine.create_container({
                "Image": builder.image, "Cmd": ["sh", "-c", "echo started; sleep 3600"],
                "Labels": {TEST_LABEL: RUN_ID, convox.LABEL_APP: app,
                           convox.LABEL_SERVICE: "worker", convox.LABEL_TYPE: "service"},
                "HostConfig": {"Init": True, "NetworkMode": "none"}})["Id"]
            private.engine.start(worker)
            proc = subprocess.Popen([sys.executable, CONVOX, "-a", app, "logs"],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=client_env(private.rack_url))
            self.addCleanup(lambda p=proc: p.poll() is None and p.kill())
            read_until(proc, b"service/worker/%s started\n" % worker[:12].encode())
            private.kill()
            started = time.monotonic()
            try:
                _, err = proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                self.fail("logs did not end within 10 s of the engine's death")
            sys.stderr.write("figures: engine killed mid-follow: logs ended in %.2f s\n"
                             % (time.monotonic() - started))
            self.assertCleanFailure(proc.returncode, err, expected=1)

    def test_oom_killed_mid_stream(self):
        app = app_name("oom")
        self.container(app, "web", memory=16)
        script = "echo before; exec tail /dev/zero"  # tail keeps one endless line in memory
        for argv in (["exec", "web"], ["run", "--memory-limit", "16", "web"]):
            with self.subTest(argv=argv):
                result = self.convox("-a", app, *argv, "sh", "-c", script)
                self.assertEqual((result.returncode, result.stdout), (137, b"before\n"),
                                 result.stderr)
                self.assertNotIn(b"ERROR", result.stderr)
        self.assertNoneLeft(app)

    def test_container_killed_in_tty_mode(self):
        app = app_name("ttykill")
        ident = self.container(app, "web")
        for verb in ("exec", "run"):
            with self.subTest(verb=verb):
                term = self.pty("-a", app, verb, "--tty", "web", "sh")
                term.expect(r"# ")
                self.assertNotEqual(term.attrs(), term.initial_attrs)  # raw while attached
                if verb == "exec":
                    self.engine.kill(ident)
                else:
                    for summary in self.processes_of(app, "process"):
                        self.engine.kill(summary["Id"])
                status = term.wait(30)
                self.assertEqual(term.attrs(), term.initial_attrs)
                self.assertNotEqual(status, 0, term.output)
                self.assertNotIn(b"Traceback", term.output)
                self.assertLessEqual(term.output.count(b"ERROR: "), 1, term.output)
        self.assertNoneLeft(app)


# -- signals at random moments --------------------------------------------------------------

class SignalTrialsTest(ReliabilityChecks, TerminalTestCase):
    """SIGINT, SIGTERM and SIGHUP sent to an attached ``convox run`` at random moments
    (while it starts up, creates, starts, streams): nothing left behind, a non-zero
    status, the terminal as it was."""

    TRIALS = 30 if SLOW else 5
    SCRIPT = "echo ready; sleep 10"  # long enough that a lost signal shows as a 0 status

    def trial(self, app, signum, delay, under_pty):
        """-> (status, output) of one run signalled after ``delay`` seconds."""
        argv = ["-a", app, "run", "web", "sh", "-c", self.SCRIPT]
        if under_pty:
            term = self.pty(*argv)
            time.sleep(delay)
            with contextlib.suppress(ProcessLookupError):
                os.kill(term.proc.pid, signum)
            status = term.wait(40)
            self.assertEqual(term.attrs(), term.initial_attrs, term.output)
            return status, term.output
        proc = subprocess.Popen([sys.executable, CONVOX] + argv[:3] + ["--no-tty"] + argv[3:],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, env=HARNESS.env(), cwd=HERE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        time.sleep(delay)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)
        output, _ = proc.communicate(timeout=40)
        return proc.returncode, output

    def test_signals_at_random_moments(self):
        rng = random.Random(printed_seed("signal trials"))
        app = app_name("signals")
        self.container(app, "web")
        outcomes = {}
        interrupted_at_startup = 0
        for name in ("SIGINT", "SIGTERM", "SIGHUP"):
            signum = getattr(signal, name)
            for number in range(self.TRIALS):
                delay = round(rng.uniform(0.0, 1.5), 3)
                under_pty = number % 2 == 0
                with self.subTest(signal=name, trial=number, delay=delay, pty=under_pty):
                    status, output = self.trial(app, signum, delay, under_pty)
                    outcomes.setdefault(name, []).append(status)
                    self.assertNotEqual(status, 0, output)
                    if b"Traceback" in output:
                        self.assertStartupInterrupt(output)
                        interrupted_at_startup += 1
                    self.assertNotIn(b"report it", output)
                    self.assertNoneLeft(app)
        sys.stderr.write("figures: signal trials: %s; %d interrupted Python's startup\n" % (
            ", ".join("%s %d (statuses %s)" % (k, len(v), sorted(set(v)))
                      for k, v in outcomes.items()), interrupted_at_startup))

    def assertStartupInterrupt(self, output):
        """A traceback is Python's own only: a SIGINT while it compiles convox.py, before
        the file's first lines set Ctrl-C aside until main() runs."""
        with open(CONVOX) as handle:
            guard = next(number for number, line in enumerate(handle, 1)
                         if "signal.signal(signal.SIGINT, signal.SIG_DFL)" in line)
        self.assertIn(b"KeyboardInterrupt", output)
        lines = [int(n) for n in re.findall(rb'convox\.py", line (\d+)', output)]
        self.assertTrue(all(n <= guard for n in lines), output)


# -- bad input, generated -------------------------------------------------------------------

class CaseHung(BaseException):
    """Raised by SIGALRM in a fuzz case that ran past its limit (BaseException: main()
    must not turn it into an ERROR line)."""


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


#: Seeds for the manifest mutations: the manifests of SPEC §7, both kinds.
CONVOX_YML_SEED = """\
environment:
  - GREETING=hello
  - SECRET
services:
  web:
    build: .
    port: 5000
    command: bin/web --port 5000
    environment:
      - MODE=web
    scale:
      memory: 256
    volumes:
      - /data
  worker:
    image: busybox
    command: ["sh", "-c", "echo ${GREETING}"]
    links:
      - web
    environment: [A=1, B]
"""

COMPOSE_SEED = """\
services:
  web:
    build:
      context: .
      dockerfile: Dockerfile
      args:
        VERSION: "1.0"
    ports:
      - "127.0.0.1:8080:80"
    command: >
      httpd -f
      -p 80
    environment:
      MODE: web
      QUOTED: 'it''s'
    env_file: .env
    depends_on: [db]
    mem_limit: 64m
  db:
    image: "busybox:latest"
    entrypoint: |
      sh -c
    command: {a: 1}
"""


class FuzzTest(ReliabilityChecks, EngineTestCase):
    """Generated bad input (SPEC §8): the tool works or prints one ERROR line; never a
    traceback, never a hang.  Most cases run in-process through main()."""

    CASES = 2000 if SLOW else 200
    BUDGET = 300 if SLOW else 90  # seconds for all of a test's cases
    CASE_LIMIT = 20               # seconds for one case: past it, a hang

    @classmethod
    def setUpClass(cls):
        try:
            super().setUpClass()
        except unittest.SkipTest:
            cls.engine = None  # only the label fuzz needs the real engine

    def setUp(self):
        self.rng = random.Random(printed_seed(self.id().rsplit(".", 1)[-1]))
        null = os.open(os.devnull, os.O_RDWR)
        self.addCleanup(os.close, null)
        self.stdio = convox.Stdio(null, null, null)
        folder = tempfile.mkdtemp(prefix="convox-fuzz-")  # no manifest, no .convox/app
        self.addCleanup(shutil.rmtree, folder, True)
        cwd = os.getcwd()
        os.chdir(folder)
        self.addCleanup(os.chdir, cwd)
        self.folder = folder
        self.started = time.monotonic()
        self.counts = {}
        previous = signal.signal(signal.SIGALRM, self._hung)
        self.addCleanup(signal.signal, signal.SIGALRM, previous)

    def _hung(self, signum, frame):
        raise CaseHung()

    def main(self, argv, environ):
        """One case in-process: -> (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        signal.setitimer(signal.ITIMER_REAL, self.CASE_LIMIT)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                status = convox.main(argv, environ, stdio=self.stdio)
        except CaseHung:
            self.fail("hung: main(%r) with %r" % (argv, environ))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        return status, out.getvalue(), err.getvalue()

    def check(self, kind, argv, environ, status, out, err):
        """Works (no ERROR) or fails with one ERROR line last and a non-zero status."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        short = [os.fsdecode(w) for w in argv]
        short = [w[:60] + ("...(%d)" % len(w) if len(w) > 60 else "") for w in short]
        where = "%s case: argv=%r env=%r -> %r\nstdout=%r\nstderr=%r" % (
            kind, short, environ, status, out[-500:], err[-1000:])
        self.assertNotIn("Traceback", err, where)
        self.assertNotIn("report it", err, where)
        self.assertIsInstance(status, int, where)
        if "ERROR: " in err:
            lines = err.splitlines()
            self.assertTrue(lines[-1].startswith("ERROR: "), where)
            self.assertEqual(sum(l.startswith("ERROR: ") for l in lines), 1, where)
            self.assertNotEqual(status, 0, where)
        else:
            self.assertIn(status, (0, 2), where)  # 2: no verb, help printed
        self.assertLess(time.monotonic() - self.started, self.BUDGET, "fuzz budget spent")

    def report(self, name):
        sys.stderr.write("figures: %s: %s cases in %.1f s\n" % (
            name, ", ".join("%s %d" % kv for kv in sorted(self.counts.items())),
            time.monotonic() - self.started))

    # -- generators ------------------------------------------------------------------------

    ODD = ["", " ", "-", "--", "---", "=", "-=", "--=x", "web", "worker", "WEB", "0", "-1",
           "99999999999999999999999", "1e3", "nan", "inf", "٣", "²", "ünïcödé", "🚀",
           "\u202eevil", "a b", "a\tb", "a\nb", "\x1b[31m", "%s%n", "{}", "${HOME}", "../..",
           "/", "?x=1", "#frag", "a/b", "\udcff", "'", '"', "\\", "*", "web:1", "ctrl-p,x"]

    def word(self):
        rng = self.rng
        pick = rng.random()
        if pick < 0.45:
            return rng.choice(self.ODD)
        if pick < 0.7:
            return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789-_.")
                           for _ in range(rng.randint(1, 12)))
        if pick < 0.9:
            return "".join(chr(rng.choice([rng.randint(32, 126), rng.randint(0xa0, 0x2fff),
                                           rng.randint(0x1f300, 0x1f6ff), rng.randint(1, 31)]))
                           for _ in range(rng.randint(1, 8)))
        return rng.choice("xé🚀") * rng.choice([1000, 100000, 1000000])  # huge

    def options(self):
        if not hasattr(self, "_options"):
            parser = convox.build_parser()
            found = set()
            for sub in [parser] + list(parser._subparsers._group_actions[0].choices.values()):
                for action in sub._actions:
                    found.update(action.option_strings)
            self._options = sorted(found) + ["--no-such-option", "-Z", "-aweb", "--app=",
                                             "--rack=", "--timeout=-5", "--memory=0",
                                             "--entrypoint=maybe", "--format=xml"]
        return self._options

    def argv(self):
        rng = self.rng
        words = []
        for _ in range(rng.randint(0, 2)):
            words += [rng.choice(["-a", "--app", "-r", "--rack"]), self.word()]
        words.append(rng.choice(["ps", "exec", "run", "start", "ps", "exec", "run",
                                 self.word()]) if rng.random() < 0.95 else "--help")
        for _ in range(rng.randint(0, 6)):
            roll = rng.random()
            if roll < 0.4:
                words.append(rng.choice(self.options()))
            elif roll < 0.5:
                words += ["info", self.word()] if rng.random() < 0.5 else ["stop", self.word()]
            else:
                words.append(self.word())
        return words

    def environ(self, rack):
        rng = self.rng
        env = {"CONVOX_RACK": rack}
        for key, values in (("CONVOX_APP", ["fakeapp", "", None]),
                            ("DOCKER_API_VERSION", ["1.41", "1.24", "9.99", "banana", "",
                                                    "1.4\u00b9", "1/../2", None]),
                            ("CONVOX_TIMEOUT", ["5", "0", "-1", "nan", "inf", "1e-9", "x",
                                                None]),
                            ("NO_COLOR", ["1", None])):
            value = rng.choice(values + [None] * 6)
            if value is None:
                continue
            env[key] = value if value != "" else self.word()
        return env

    def rack_url(self):
        rng = self.rng
        scheme = rng.choice(["unix", "tcp", "http", "https", "ssh", "ftp", "TCP", "", "unix:",
                             "tcp:/", self.word()])
        sep = rng.choice(["://", "://", ":/", "//", ":", ""])
        host = rng.choice(["127.0.0.1", "[::1]", "localhost", "", "[", "::1", "[::1",
                           "256.256.256.256", "ünï.invalid", "xn--.invalid", "a..b.invalid",
                           "a" * 300 + ".invalid", "host.invalid", "/tmp/nowhere.sock",
                           "/tmp/\0nul.sock", "/" + "x" * 200, "\udcff.invalid"])
        port = rng.choice(["", ":1", ":0", ":65536", ":²", ":٣", ":-1", ":abc", ":2375",
                           ":99999999999999999999", ":" + self.word()])
        tail = rng.choice(["", "", "/", "/path", "?x", "#y", " "])
        return scheme + sep + host + port + tail

    # -- the fuzz loops --------------------------------------------------------------------

    def fake_for_fuzz(self):
        fake = FakeEngine(faults={"no-create"})
        self.addCleanup(fake.close)
        fake.add_container("fakeapp", "web")
        fake.add_container("fakeapp", "worker", labels={convox.LABEL_RELEASE: "RABC"})
        fake.add_container("fakeapp", "web", kind="process", name="fakeapp-web-run-1")
        return fake

    def test_argv_and_environment(self):
        gc.collect()  # what earlier tests left to the collector goes before the count
        before = open_fds()  # before the fake, whose own sockets live in this process
        fake = self.fake_for_fuzz()
        count = self.CASES * 6 // 10
        for _ in range(count):
            argv, env = self.argv(), self.environ(fake.url)
            self.check("argv", argv, env, *self.main(argv, env))
        fake.close()
        # A leak is a new fd: the fake's last handler threads close their sockets meanwhile,
        # and the collector may close older ones.
        for _ in deadline_loop(5):
            gc.collect()
            if not set(open_fds()) - set(before):
                break
        self.assertEqual(sorted(set(open_fds()) - set(before)), [], "file descriptors leaked")
        self.report("argv fuzz")

    def test_rack_urls(self):
        count = self.CASES * 2 // 10
        for _ in range(count):
            url = self.rack_url()
            argv = ["--rack", url, self.rng.choice(["ps", "exec", "run"]), "web", "true"]
            if argv[2] == "ps":
                argv = argv[:3]
            env = {"DOCKER_TLS_VERIFY": self.rng.choice(["", "1"]),
                   "DOCKER_CERT_PATH": self.folder, "CONVOX_TIMEOUT": "5"}
            self.check("rack", argv, env, *self.main(argv, env))
        self.report("rack fuzz")

    def test_argv_bytes_in_a_subprocess(self):
        # What only a real process shows: argv that is not UTF-8, a C locale, real pipes.
        fake = self.fake_for_fuzz()
        count = max(10, self.CASES // 20)
        for _ in range(count):
            argv = [w if len(w) < 10000 else w[:10000] for w in self.argv()]
            args = [os.fsencode(w) if "\udcff" in w else w.encode("utf-8", "surrogatepass")
                    for w in argv]
            args = [a.replace(b"\0", b"") for a in args]
            env = client_env(fake.url, LC_ALL="C", LANG="C", PYTHONIOENCODING="",
                             CONVOX_TIMEOUT="5")
            result = subprocess.run([sys.executable.encode(), os.fsencode(CONVOX)] + args,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, timeout=60, env=env,
                                    cwd=self.folder)
            self.check("subprocess", args, {}, result.returncode,
                       result.stdout.decode("utf-8", "replace"),
                       result.stderr.decode("utf-8", "replace"))
        self.report("subprocess fuzz")

    def mutate(self, text):
        rng = self.rng
        lines = text.splitlines()
        tokens = [":", "-", "- ", "[", "]", "{", "}", "'", '"', "|", ">", "&a", "*a", "!!str",
                  "%YAML", "${", "${A:-x}", "${A?}", "\t", "ü", "#", "---", "...", "? ",
                  "key: value", "  - item", "\\", "0o7", "0x", ".inf", "~", ": :", "\x00"]
        for _ in range(rng.randint(1, 4)):
            if not lines:
                lines = [rng.choice(tokens)]
            index = rng.randrange(len(lines))
            op = rng.randrange(8)
            if op == 0:
                del lines[index]
            elif op == 1:
                lines.insert(index, lines[index])
            elif op == 2:
                lines[index] = rng.choice(["  ", " ", "\t", "    "]) + lines[index]
            elif op == 3:
                lines[index] = lines[index].lstrip()
            elif op == 4:
                other = rng.randrange(len(lines))
                lines[index], lines[other] = lines[other], lines[index]
            elif op == 5:
                at = rng.randint(0, len(lines[index]))
                lines[index] = lines[index][:at] + rng.choice(tokens) + lines[index][at:]
            elif op == 6:
                lines[index] = lines[index][:rng.randint(0, len(lines[index]))]
            else:
                lines.insert(index, self.word()[:200])
        return "\n".join(lines) + rng.choice(["\n", "", "\n\n", "\r\n"])

    def test_mutated_manifests(self):
        count = self.CASES * 2 // 10
        with open(os.path.join(self.folder, "Dockerfile"), "w") as handle:
            handle.write("FROM busybox\n")
        with open(os.path.join(self.folder, ".env"), "w") as handle:
            handle.write("SECRET=s\n")
        for number in range(count):
            seed = CONVOX_YML_SEED if number % 2 else COMPOSE_SEED
            text = self.mutate(seed)
            name = "convox.yml" if number % 2 else "docker-compose.yml"
            path = os.path.join(self.folder, name)
            with open(path, "w", encoding="utf-8", errors="surrogatepass") as handle:
                handle.write(text)
            # No engine answers: the manifest is all there is to go wrong, and nothing
            # can run.
            argv = ["-a", "fuzzapp", "start", "-m", path]
            env = {"CONVOX_RACK": "unix://%s/no-engine.sock" % self.folder}
            self.check("manifest", argv, env, *self.main(argv, env))
        self.report("manifest fuzz (start)")

    ODD_LABELS = ["", " ", "web\nworker", "tab\there", "\x1b]0;pwned\x07", "\x1b[2J",
                  "ünïcödé", "🚀🚀", "\u202eright-to-left", "a" * 300, "=", "a=b=c",
                  "null", "true", "0", "-", "--all", "'quoted'", '"dq"', "\\", "\r", "\x00x"]

    def test_odd_label_values(self):
        if self.engine is None:
            self.skipTest("real engine unavailable: %s" % HARNESS.problem)
        rng = self.rng
        app = app_name("labels")
        made = []
        for index in range(12):
            def odd():
                return rng.choice(self.ODD_LABELS + [self.word()[:300]]).replace("\0", "")
            labels = {convox.LABEL_RELEASE: odd(),
                      convox.LABEL_TYPE: rng.choice(["process", "service", "", odd()]),
                      odd() or "empty-key": odd(), "x.%d" % index: odd()}
            service = odd() if index % 3 else rng.choice(["web", ""])
            if rng.random() < 0.3:
                ident = self.container(app, service or "svc", compose=True, labels=labels,
                                       memory=rng.choice([None, 7, 4096]))
            else:
                labels[convox.LABEL_SERVICE] = service
                ident = self.container(app, "placeholder", labels=labels,
                                       memory=rng.choice([None, 7, 4096]))
            made.append(ident)
        env = {"CONVOX_RACK": HARNESS.rack_url}
        cases = max(20, self.CASES // 10)
        for number in range(cases):
            variant = rng.choice([[], ["--all"], ["--format", "json"], ["--all", "--format",
                                 "json"], ["info", rng.choice(made)[:12]],
                                  ["-s", rng.choice(self.ODD_LABELS + ["web"])],
                                  ["--release", rng.choice(self.ODD_LABELS)]])
            argv = ["-a", app, "ps"] + variant
            status, out, err = self.main(argv, env)
            self.check("labels", argv, env, status, out, err)
            if status:
                continue
            if variant[:1] == ["info"]:
                self.assertEqual(len(out.splitlines()), 9, out)
                self.assertFalse(re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), out)
                continue
            if "json" in variant:
                data = json.loads(out)
                for entry in data:
                    info = self.engine.inspect(entry["id"])
                    self.assertEqual(entry["name"], convox.identity(
                        info["Config"]["Labels"])[1])
                continue
            lines = out.splitlines()
            shown = self.processes_of(app) if "--all" in variant else [
                s for s in self.processes_of(app) if s["State"] == "running"]
            if len(variant) <= 1:  # all of the app's processes, one line each
                self.assertEqual(len(lines), len(shown) + 1, out)
            self.assertFalse(re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), out)
        self.report("label fuzz")


# -- load -----------------------------------------------------------------------------------

class LoadTest(ReliabilityChecks, EngineTestCase):
    """Many clients at once, many sessions in a row: every byte arrives, nothing leaks."""

    CLIENTS = 50 if SLOW else 8
    PAYLOAD = 4 * 1024 * 1024
    ROUND_TRIPS = 500 if SLOW else 100

    def test_concurrent_exec_clients(self):
        app = app_name("load")
        ident = self.container(app, "web")
        folder = tempfile.mkdtemp(prefix="convox-load-")
        self.addCleanup(shutil.rmtree, folder, True)
        clients = []
        for number in range(self.CLIENTS):
            data = os.urandom(self.PAYLOAD)
            paths = [os.path.join(folder, "%d.%s" % (number, k)) for k in ("in", "out", "err")]
            with open(paths[0], "wb") as handle:
                handle.write(data)
            clients.append((hashlib.sha256(data).hexdigest(), paths))
        started = time.monotonic()
        procs = []
        for _, (source, target, errors) in clients:
            with open(source, "rb") as stdin, open(target, "wb") as stdout, \
                    open(errors, "wb") as stderr:
                procs.append(subprocess.Popen(
                    [sys.executable, CONVOX, "-a", app, "exec", "--no-tty", ident[:12], "cat"],
                    stdin=stdin, stdout=stdout, stderr=stderr, env=HARNESS.env(), cwd=HERE))
        for proc in procs:
            self.addCleanup(lambda p=proc: p.poll() is None and p.kill())
        deadline = time.monotonic() + (900 if SLOW else 300)
        for proc in procs:
            proc.wait(max(1, deadline - time.monotonic()))
        seconds = time.monotonic() - started
        for proc, (digest, (_, target, errors)) in zip(procs, clients):
            with open(errors, "rb") as handle:
                self.assertEqual((proc.returncode, handle.read()), (0, b""))
            with open(target, "rb") as handle:
                self.assertEqual(hashlib.sha256(handle.read()).hexdigest(), digest)
        sys.stderr.write("figures: load: %d concurrent exec clients moved %d MiB each way in "
                         "%.1f s, all sha256-equal\n" % (
                             self.CLIENTS, self.CLIENTS * self.PAYLOAD >> 20, seconds))

    def test_sequential_round_trips_leak_nothing(self):
        app = app_name("trips")
        ident = self.container(app, "web")
        null = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, null)
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        stdio = convox.Stdio(null, write_end, write_end)
        env = {"CONVOX_RACK": HARNESS.rack_url}

        def round_trip(number):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                status = convox.main(["-a", app, "exec", "--no-tty", ident, "sh", "-c",
                                      "echo out %d; echo err >&2" % number], env, stdio=stdio)
            self.assertEqual((status, err.getvalue()), (0, ""))
            received = b""
            for _ in deadline_loop(10, 0):
                ready, _, _ = select.select([read_end], [], [], 0.1)
                if ready:
                    received += os.read(read_end, 65536)
                if received.count(b"\n") >= 2:
                    break
            self.assertEqual(sorted(received.splitlines()), [b"err", b"out %d" % number])

        round_trip(0)  # the first may load modules lazily; count from after it
        gc.collect()  # what earlier tests left to the collector goes before the count
        before = open_fds()
        started = time.monotonic()
        for number in range(1, self.ROUND_TRIPS + 1):
            round_trip(number)
        gc.collect()
        after = open_fds()
        self.assertEqual(sorted(set(after) - set(before)), [], "file descriptors leaked")
        sys.stderr.write("figures: load: %d sequential exec round trips through main() in "
                         "%.1f s; open fds %d before, %d after\n" % (
                             self.ROUND_TRIPS, time.monotonic() - started, len(before),
                             len(after)))


# -- Podman, a second engine ----------------------------------------------------------------

class PodmanTest(ReliabilityChecks, TerminalTestCase):
    """ps, exec and run against Podman's Docker API, through --rack.

    Runs when CONVOX_TEST_PODMAN names Podman's socket (.ci/run starts
    ``podman system service``); the busybox image is built there as for Docker.
    """

    @classmethod
    def setUpClass(cls):
        url = os.environ.get("CONVOX_TEST_PODMAN")
        if not url:
            raise unittest.SkipTest("the Podman tests need CONVOX_TEST_PODMAN=unix:///PATH "
                                    "(the socket of `podman system service`)")
        cls.podman = Harness()
        cls.podman.rack_url = convox.parse_rack(url, {}).url
        cls.podman.engine = convox.Engine(convox.parse_rack(url, {}), {})
        cls.podman._build_image()
        cls.engine, cls.image = cls.podman.engine, cls.podman.image

    @classmethod
    def tearDownClass(cls):
        cls.podman.cleanup()

    def convox(self, *args, input=None, timeout=120, env=None, cwd=None):
        return subprocess.run(
            [sys.executable, CONVOX, "--rack", self.podman.rack_url] + list(args),
            input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
            env=client_env("unix:///nowhere.sock", **(env or {})), cwd=cwd or HERE)

    def pty(self, *args, rows=30, cols=100, env=None, cwd=None):
        url = self.podman.rack_url
        return super().pty("--rack", url, *args, rows=rows, cols=cols, cwd=cwd,
                           env=dict(env or {}, CONVOX_RACK=url, DOCKER_HOST=url))

    def test_ps(self):
        app = app_name("pps")
        web = self.container(app, "web", release="RPODMAN", memory=64)
        job = self.container(app, "web", ("sleep", "3602"), kind="process")
        result = self.convox("-a", app, "ps")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.decode().splitlines()
        self.assertEqual(re.split(r"\s{2,}", lines[0]),
                         ["ID", "NAME", "RELEASE", "SIZE", "STARTED", "COMMAND"])
        rows = sorted(re.split(r"\s{2,}", line) for line in lines[1:])
        self.assertEqual([(r[0], r[1], r[2], r[3], r[5]) for r in rows], sorted([
            (web[:12], "web", "RPODMAN", "64", "sleep 3600"),
            (job[:12], "web", "-", "-", "sleep 3602")]))
        data = json.loads(self.convox("-a", app, "ps", "--format", "json").stdout.decode())
        self.assertEqual({(e["id"], e["type"], tuple(e["command"])) for e in data},
                         {(web, "service", ("sleep", "3600")),
                          (job, "process", ("sleep", "3602"))})
        result = self.convox("-a", app, "ps", "info", web[:12])
        self.assertIn("Command  sleep 3600\n", result.stdout.decode())

    def test_exec_pipes_and_status(self):
        app = app_name("pexec")
        ident = self.container(app, "web")
        result = self.convox("-a", app, "exec", "web", "cat", input=b"hi\n")
        self.assertEqual((result.returncode, result.stdout, result.stderr), (0, b"hi\n", b""))
        payload = bytes(range(256)) * 4096
        result = self.convox("-a", app, "exec", ident[:12], "cat", input=payload)
        self.assertEqual((result.returncode, len(result.stdout)), (0, len(payload)))
        self.assertTrue(result.stdout == payload)
        for code in (0, 1, 3, 42, 255):
            result = self.convox("-a", app, "exec", "web", "sh", "-c",
                                 "echo out; echo err >&2; exit %d" % code)
            self.assertEqual((result.returncode, result.stdout, result.stderr),
                             (code, b"out\n", b"err\n"))
        result = self.convox("-a", app, "exec", "web", "no-such-command")
        self.assertEqual(result.returncode, 127, result.stderr)

    def test_exec_tty(self):
        app = app_name("ptty")
        self.container(app, "web")
        term = self.pty("-a", app, "exec", "web", "sh", rows=33, cols=111)
        term.expect(r"# ")
        term.send("stty size; tty; exit 7\r")
        term.expect(r"33 111")
        self.assertEqual(term.wait(30), 7, term.output)
        self.assertEqual(term.attrs(), term.initial_attrs)

    def test_run(self):
        app = app_name("prun")
        self.container(app, "web", env=["FROM_SERVICE=yes"])
        result = self.convox("-a", app, "run", "web", "sh", "-c",
                             "echo $FROM_SERVICE; echo err >&2; exit 5")
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (5, b"yes\n", b"err\n"))
        result = self.convox("-a", app, "run", "web", "cat", input=b"piped\n")
        self.assertEqual((result.returncode, result.stdout), (0, b"piped\n"), result.stderr)
        result = self.convox("-a", app, "run", "web", "no-such-command")
        self.assertEqual(result.returncode, 127, result.stderr)
        term = self.pty("-a", app, "run", "web", "sh")
        term.expect(r"# ")
        term.send("tty; exit 6\r")
        term.expect(r"/dev/pts/")
        self.assertEqual(term.wait(30), 6, term.output)
        self.assertEqual(term.attrs(), term.initial_attrs)
        self.assertNoneLeft(app)
        result = self.convox("-a", app, "run", "--detach", "web", "echo", "detached")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertRegex(result.stdout.decode(), r"^Running detached process\.\.\. OK, "
                                                 r"[0-9a-f]{12}\n$")


    def test_logs(self):
        app = app_name("plogs")
        web = self.container(app, "web", ("sh", "-c", "echo one; echo two >&2; sleep 1; "
                                                      "echo three"))
        label = b"service/web/%s " % web[:12].encode()
        # PID follows the process until it ends: its whole output, then status 0
        result = self.convox("-a", app, "logs", web[:12], timeout=60)
        self.assertEqual((result.returncode, result.stderr), (0, b""))
        lines = result.stdout.splitlines()
        self.assertEqual([line.split(b" ", 1)[1] for line in lines],
                         [label + b"one", label + b"two", label + b"three"])
        self.assertRegex(lines[0].decode(), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ ")
        result = self.convox("-a", app, "logs", "--no-follow", "--format", "json")
        records = [json.loads(line) for line in result.stdout.decode().splitlines()]
        self.assertEqual([(r["line"], r["stream"]) for r in records],
                         [("one", "stdout"), ("two", "stderr"), ("three", "stdout")])
        # following the app picks up a process that starts later (Podman's events)
        proc = subprocess.Popen(
            [sys.executable, CONVOX, "--rack", self.podman.rack_url, "-a", app, "logs"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=client_env("unix:///nowhere.sock"))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        read_until(proc, b"three\n")
        worker = self.container(app, "worker", ("echo", "late worker"))
        read_until(proc, b"service/worker/%s late worker\n" % worker[:12].encode(), timeout=5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        self.assertEqual((proc.returncode, err), (0, b""))

    def test_run_passes_signals_on(self):
        app = app_name("psig")
        self.container(app, "web")
        for name, status in (("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)):
            with self.subTest(signal=name):
                proc = subprocess.Popen(
                    [sys.executable, CONVOX, "--rack", self.podman.rack_url, "-a", app, "run",
                     "--no-tty", "web", "sh", "-c", "echo ready; sleep 30"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    env=client_env("unix:///nowhere.sock"))
                self.addCleanup(lambda p=proc: p.poll() is None and p.kill())
                read_until(proc, b"ready")
                proc.send_signal(getattr(signal, name))
                _, err = proc.communicate(timeout=20)
                self.assertEqual(proc.returncode, status, err)
                self.assertNoneLeft(app)

    def test_start_syncs_prunes_and_cleans_up(self):
        app = app_name("pstart")
        folder = tempfile.mkdtemp(prefix="convox-podman-start-")
        self.addCleanup(shutil.rmtree, folder, True)
        os.mkdir(os.path.join(folder, "src"))
        for rel, text in (("Dockerfile", "FROM %s\nWORKDIR /app\nCOPY src/ ./code/\n" %
                           self.image),
                          ("convox.yml", "services:\n  web:\n    build: .\n    command: %s\n"
                           % StartLoopTest.LOOP), ("src/a.txt", "one\n")):
            with open(os.path.join(folder, rel), "w") as handle:
                handle.write(text)
        releases = []
        for round_ in range(3):
            proc = subprocess.Popen(
                [sys.executable, CONVOX, "--rack", self.podman.rack_url, "-a", app, "start"],
                cwd=folder, env=client_env("unix:///nowhere.sock"), stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT)
            self.addCleanup(lambda proc=proc: proc.poll() is None and proc.kill())
            read_until(proc, b"convox | starting web", timeout=180)
            releases.append(self.processes_of(app)[0]["Labels"]["convox.release"])
            if round_ == 0:
                time.sleep(0.5)
                with open(os.path.join(folder, "src/a.txt"), "w") as handle:
                    handle.write("two\n")
                read_until(proc, b"convox | sync web: 1 file\n", timeout=5)
                result = self.convox("-a", app, "exec", "web", "cat", "/app/code/a.txt")
                self.assertEqual((result.returncode, result.stdout), (0, b"two\n"),
                                 result.stderr)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=30)
            self.assertEqual(proc.returncode, 0, out)
            self.assertEqual(self.processes_of(app), [])
            names = [n["Name"] for n in self.engine.request("GET", "/networks")]
            self.assertNotIn(app, names)
        tags = [tag.rpartition(":")[2] for image in self.engine.request("GET", "/images/json")
                for tag in image.get("RepoTags") or [] if "%s/web:" % app in tag]
        self.assertEqual(sorted(tags), sorted(releases[1:]))


class PodmanProcessModelTest(ProcessModelChecks, RunTestCase):
    """The process model's checks on Podman, through --rack (as PodmanTest)."""

    setUpClass = classmethod(PodmanTest.setUpClass.__func__)
    tearDownClass = classmethod(PodmanTest.tearDownClass.__func__)
    convox = PodmanTest.convox


def _stopped(signum, frame):
    raise KeyboardInterrupt  # unittest lets it through (and nothing else) to the clean-up


if __name__ == "__main__":
    # A run stopped with SIGTERM or SIGHUP (a CI job cancelled, a closed terminal) still
    # removes what it made, as one stopped with Ctrl-C does.
    for _signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(_signum) == signal.SIG_DFL:
            signal.signal(_signum, _stopped)
    try:
        unittest.main()
    except KeyboardInterrupt:
        sys.stderr.write("\ntest: stopped; removing what this run made\n")
        sys.exit(130)
    finally:
        try:
            SSH.cleanup()
            HARNESS.cleanup()
        finally:
            SWARM.cleanup()
