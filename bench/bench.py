#!/usr/bin/env python3
"""bench.py -- convox.py side by side with the Docker CLI, docker-py and floors.

    python3 bench/bench.py                  # the full run (15-20 minutes)
    python3 bench/bench.py --quick          # fewer pairs, smaller sizes: a few minutes
    python3 bench/bench.py --only exec,run  # some workloads (names below)
    python3 bench/bench.py --json out.json  # the figures as JSON too
    python3 bench/bench.py --python /usr/bin/python3.6 ...  # start-up under other Pythons

It uses the engine convox.py would find (CONVOX_RACK, DOCKER_HOST, the default sockets),
builds its own image from the local /bin/busybox through the engine's build API, starts
labelled fixture containers of a bench-only app, and removes all it made at the end (also
on Ctrl-C, SIGTERM and errors).

The machines these run on are shared and noisy: absolute times drift, ratios taken A B A B
hold.  So every workload runs its contenders alternately -- convox, peer, peer', convox,
peer, peer' ... -- the first round is a warm-up and is discarded, and the figure that
counts is the median of the pair-by-pair ratios convox / peer (below 1: convox is faster).
Medians of the absolute figures and the peak RSS of each contender (``ru_maxrss`` from
``os.wait4``) are printed beside them.

Peak RSS: a child forked from this bench would inherit its RSS in ru_maxrss, so children
are started through a ~2 MiB busybox launcher and reaped as re-parented orphans (see
Child); that costs every contender the same ~2 ms.

Workloads (names for --only):

    ps      convox ps with 10 (and, in a full run, 200 and 1,000) containers, in every
            form it runs in: by name (the launcher, code compiled once), the zipapp built as
            the README says, ``python3 -m convox`` without __pycache__, ``python3
            convox.py`` (compiles every run), a .pyc compiled beforehand; peers: docker ps
            --filter label=..., docker-py's containers.list, a raw stdlib client that
            inspects each container in turn; floors: the interpreter importing the modules
            convox.py imports at start-up, with and without site (-S, as the launcher runs)
    startup convox ps (10 containers) by name under each Python given with --python (default:
            the one running the bench), with PYTHONDONTWRITEBYTECODE=1, against that
            Python's floor with and without site
    exec    exec round trip: exec ID true
    stdout  exec stdout throughput: head -c SIZE /dev/zero inside, to /dev/null, no TTY;
            floor: a raw reader of the hijacked stream that discards bytes unread
    stdin   exec stdin throughput: SIZE bytes into sh -c 'cat >/dev/null';
            floor: a raw writer of the hijacked stream
    run     run SERVICE true vs docker run --rm IMAGE true
    tty     keystroke echo latency through exec under a pty (into cat), p50/p95
    rss     peak RSS of the stdout workload at a small and a big size (64 MiB and 1 GiB;
            must be flat)
    logs    convox logs --no-follow ID of one process that printed N lines (seq 1 N) vs
            docker logs ID, at 100,000 and 1,000,000 lines (--quick: 10,000 and 100,000);
            peak RSS must not grow with N
    ssh     over an ssh:// rack: ps, exec ID true and exec stdout (256 MiB; 16 with
            --quick), convox -r ssh://... vs docker -H ssh://... (which runs docker system
            dial-stdio on the far side), and the stream beside convox on the local socket.
            It starts test_convox.py's private sshd on 127.0.0.1 (root and openssh-server
            needed; otherwise skipped with a note)

Only when named (about 3 minutes, most of it waiting on purpose):

    start-sync
            convox start's file sync: time from a file written in the build context to
            its change seen inside the running container (median of 20; a loop in the
            container looks every 10 ms), and the CPU share of an idle `convox start`
            whose context holds 10,000 files, with sync and with --no-sync (the
            difference is the watcher's), beside the cost of one look at the tree

Only when named (they bring up a Swarm of three private dockerds in network namespaces,
as the tests do: root, ip, nsenter, unshare; the host's engine is not touched):

    swarm-ps    convox ps of a service with 50 tasks on 3 nodes vs docker service ps
    swarm-exec  convox exec ID true into a task on a worker node, through the manager's
                rack, vs docker -H tcp://NODE:2375 exec CONTAINER true

docker-py is installed with pip into a throwaway venv under the temp folder (reused by later
runs; never inside the repository), made with --system-site-packages so that it starts up as
the interpreter running convox.py does.  When that fails it is skipped with a note; --quick
uses it only when an earlier run left the venv behind.  Standard library only otherwise;
runs on CPython 3.6+.
"""

import argparse
import ast
import fcntl
import io
import json
import os
import platform
import pty
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CONVOX = os.path.join(ROOT, "convox.py")
sys.path.insert(0, ROOT)
import convox  # noqa: E402  (the engine client; the tool under test runs as a subprocess)

BENCH_LABEL = "convox.bench"
MIB = 1024 * 1024
WORKLOADS = ("ps", "startup", "exec", "stdout", "stdin", "run", "tty", "rss", "logs", "ssh",
             "start-sync", "swarm-ps", "swarm-exec")
#: What a run without --only runs.
DEFAULT_WORKLOADS = WORKLOADS[:10]


class BenchError(Exception):
    """A contender failed, or the bench could not set itself up."""


# ==========================================================================================
# Settings of a run
# ==========================================================================================

class Settings:
    """Sizes and repetitions of a full or a --quick run."""

    def __init__(self, quick, pairs=None):
        self.quick = quick
        self.warmup = 1
        self.pairs = pairs or (3 if quick else 10)
        self.stream_pairs = pairs or (3 if quick else 7)
        self.ps_counts = (10,) if quick else (10, 200, 1000)
        # ps of 1,000 takes seconds a round for some peers (docker-py inspects one by one)
        self.big_ps_pairs = pairs or 5
        self.stream_size = 16 * MIB if quick else 512 * MIB
        self.rss_sizes = (4 * MIB, 16 * MIB) if quick else (64 * MIB, 1024 * MIB)
        self.rss_pairs = pairs or (2 if quick else 5)
        self.keystrokes = 50 if quick else 200
        self.log_lines = (10000, 100000) if quick else (100000, 1000000)
        self.log_pairs = pairs or (3 if quick else 5)
        self.sync_probes = 5 if quick else 20
        self.sync_files = 10000
        self.cpu_window = 5.0 if quick else 20.0
        self.ssh_stream_size = 16 * MIB if quick else 256 * MIB


# ==========================================================================================
# Child processes: wall time and peak RSS from os.wait4
# ==========================================================================================

#: Children still running, killed on the way out (Ctrl-C, errors).
LIVE = set()


class Sample:
    """One measured run of one contender."""

    def __init__(self, wall, rss_kib, status, cpu=0.0, extra=None):
        self.wall = wall
        self.rss_kib = rss_kib
        self.status = status
        self.cpu = cpu          # user + system seconds of the process (its own, from wait4)
        self.extra = extra or {}


class Child:
    """A subprocess reaped with os.wait4, for its exit status and ru_maxrss.

    ru_maxrss is a max over the process's life *including* the memory it was forked
    from: a child forked (or vforked) straight from this bench would report the bench's
    own RSS (tens of MiB) whatever it used.  So, where the kernel allows it, the bench is
    a child subreaper and starts each child through a busybox launcher of ~2 MiB: ``setsid``
    vforks, the child (``sh``) writes its PID on a pipe and execs the program, the launcher
    exits and the program becomes our child, reaped here with os.wait4.  That costs ~2 ms
    of wall time, the same for every contender.
    """

    def __init__(self, argv, env, stdin=None, stdout=None, stderr=None, ctty=False):
        self.argv = argv
        self.done = False
        self._lock = threading.Lock()
        self.start = time.perf_counter()
        if LAUNCHER:
            self.pid = self._launch(argv, env, stdin, stdout, stderr, ctty)
        else:
            proc = subprocess.Popen(argv, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                                    preexec_fn=_controlling_terminal if ctty else None,
                                    close_fds=True)
            proc.returncode = 0  # reaped by os.wait4 below, never by Popen
            self.pid = proc.pid
        LIVE.add(self)

    @staticmethod
    def _launch(argv, env, stdin, stdout, stderr, ctty):
        read_fd, write_fd = os.pipe()
        script = 'echo $$ >&%d; exec "$@" %d>&-' % (write_fd, write_fd)
        launch = [LAUNCHER, "setsid"] + (["-c"] if ctty else []) + \
            [LAUNCHER, "sh", "-c", script, "sh"] + list(argv)
        try:
            # A session leader's setsid() fails, so busybox setsid vforks: what it runs is
            # then its child, and ours once it exits.
            launcher = subprocess.Popen(launch, env=env, stdin=stdin, stdout=stdout,
                                        stderr=stderr, pass_fds=(write_fd,),
                                        start_new_session=True)
        finally:
            os.close(write_fd)
        try:
            text = b""
            while True:
                chunk = os.read(read_fd, 64)
                if not chunk:
                    break
                text += chunk
        finally:
            os.close(read_fd)
        launcher.wait()
        if not text.strip().isdigit():
            raise BenchError("could not start %s (launcher status %s)" % (
                " ".join(argv[:4]), launcher.returncode))
        return int(text)

    def kill(self):
        with self._lock:
            if not self.done:
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except OSError:
                    pass

    def _reaped(self, status, usage):
        end = time.perf_counter()
        with self._lock:
            self.done = True
        LIVE.discard(self)
        if os.WIFEXITED(status):
            code = os.WEXITSTATUS(status)
        else:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else -1
        return Sample(end - self.start, usage.ru_maxrss, code,
                      cpu=usage.ru_utime + usage.ru_stime)

    def poll(self):
        """The Sample when it has exited, else None."""
        pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        return self._reaped(status, usage) if pid else None

    def wait(self, timeout):
        killer = threading.Timer(timeout, self.kill)
        killer.daemon = True
        killer.start()
        try:
            _, status, usage = os.wait4(self.pid, 0)
        finally:
            killer.cancel()
        return self._reaped(status, usage)


def _controlling_terminal():
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


#: The busybox binary that launches children (see Child), or None: RSS then includes ours.
LAUNCHER = None
PR_SET_CHILD_SUBREAPER = 36


def enable_launcher(notes):
    """Become a child subreaper and use busybox as the launcher, when both can be had."""
    global LAUNCHER
    busybox = shutil.which("busybox") or "/bin/busybox"
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        ok = os.path.exists(busybox) and libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        ok = False
    if ok:
        LAUNCHER = busybox
    else:
        notes.append("peak RSS figures include the bench's own RSS (no busybox launcher or "
                     "no PR_SET_CHILD_SUBREAPER here): compare them with care")


def reap_orphans():
    """Reap what was re-parented to us and has ended (convox run's watchdogs)."""
    if LIVE:
        return  # waitpid(-1) could take a measured child's status
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return


def kill_children():
    """Kill and reap what still runs; -> how many there were."""
    killed = len(LIVE)
    for child in list(LIVE):
        child.kill()
        try:
            child.wait(10)
        except ChildProcessError:
            LIVE.discard(child)
    reap_orphans()
    return killed


def measure(argv, env, stdin_path=None, timeout=600):
    """Run argv with stdout to /dev/null; -> Sample.  A failure raises with its stderr."""
    with tempfile.TemporaryFile() as errors:
        stdin = open(stdin_path, "rb") if stdin_path else subprocess.DEVNULL
        try:
            child = Child(argv, env, stdin=stdin, stdout=subprocess.DEVNULL, stderr=errors)
        finally:
            if stdin_path:
                stdin.close()
        sample = child.wait(timeout)
        if sample.status != 0:
            errors.seek(0)
            text = errors.read()[-1500:].decode("utf-8", "replace").strip()
            raise BenchError("%s exited with %d: %s" % (" ".join(argv[:6]), sample.status,
                                                        text or "(no output)"))
    return sample


def tty_session(argv, env, keystrokes, timeout=60):
    """Run argv on a new pty (as a person at a terminal) with ``cat`` at the far end; type
    ``keystrokes`` characters one by one and time each until its echo comes back."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))

    child = Child(argv, env, stdin=slave, stdout=slave, stderr=slave, ctty=True)
    output = bytearray()
    deadline = time.monotonic() + timeout

    def read_some(wait):
        ready, _, _ = select.select([master], [], [], max(0.0, wait))
        if not ready:
            return False
        try:
            output.extend(os.read(master, 65536))
        except OSError:
            return False
        return True

    def expect(byte, within):
        give_up = min(deadline, time.monotonic() + within)
        while True:
            at = output.find(byte)
            if at >= 0:
                del output[:at + 1]
                return
            if not read_some(give_up - time.monotonic()) and time.monotonic() >= give_up:
                raise BenchError("%s: no echo of %r within %ss; output %r" % (
                    " ".join(argv[:4]), byte, within, bytes(output[-300:])))

    try:
        # The client puts the terminal in raw mode once it is attached: before that the
        # local line discipline would echo, and the figure would be meaningless.
        while termios.tcgetattr(slave)[3] & termios.ECHO:
            sample = child.poll()
            if sample is not None:
                read_some(0.1)
                raise BenchError("%s exited with %d before raw mode: %r" % (
                    " ".join(argv[:4]), sample.status, bytes(output[-300:])))
            if time.monotonic() > deadline:
                raise BenchError("%s never put the terminal in raw mode" % argv[0])
            time.sleep(0.002)
        os.write(master, b"z")  # the first echo says that the remote cat is there
        expect(b"z", 30)
        while read_some(0.05):
            pass
        del output[:]
        latencies = []
        for index in range(keystrokes):
            key = bytes((ord("a") + index % 25,))
            start = time.perf_counter()
            os.write(master, key)
            expect(key, 10)
            latencies.append(time.perf_counter() - start)
            time.sleep(0.002)
        os.write(master, b"\x04\x04")  # flush cat's line, then EOF: cat exits 0
        while True:
            sample = child.poll()
            if sample is not None:
                break
            if time.monotonic() > deadline:
                child.kill()
                sample = child.wait(10)
                break
            read_some(0.01)
    finally:
        if not child.done:
            child.kill()
            child.wait(10)
        os.close(master)
        os.close(slave)
    latencies.sort()
    sample.extra = {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95)}
    return sample


def percentile(values, pct):
    """Nearest-rank percentile of sorted values."""
    if not values:
        return None
    rank = max(1, -(-len(values) * pct // 100))
    return values[int(rank) - 1]


# ==========================================================================================
# Peers: docker-py in a throwaway venv, the interpreter floor, raw stream readers/writers
# ==========================================================================================

#: The floor of exec stdout: hijack the exec's stream and discard what comes, undemuxed.
RAW_READER = r"""
import sys
sys.path.insert(0, sys.argv[1])
import convox
engine = convox.Engine(convox.resolve_rack())
exec_id = engine.exec_create(sys.argv[2], {"AttachStdout": True, "AttachStderr": True,
                                            "Cmd": sys.argv[3:]})["Id"]
stream = engine.hijack("/exec/%s/start" % exec_id, {"Detach": False, "Tty": False})
sock = stream.sock
view = memoryview(bytearray(1 << 20))
while sock.recv_into(view):
    pass
"""

#: The floor of exec stdin: copy fd 0 onto the hijacked stream, then wait for its end.
RAW_WRITER = r"""
import os, socket, sys
sys.path.insert(0, sys.argv[1])
import convox
engine = convox.Engine(convox.resolve_rack())
exec_id = engine.exec_create(sys.argv[2], {"AttachStdin": True, "AttachStdout": True,
                                            "AttachStderr": True, "Cmd": sys.argv[3:]})["Id"]
stream = engine.hijack("/exec/%s/start" % exec_id, {"Detach": False, "Tty": False})
sock = stream.sock
buffer = bytearray(1 << 20)
view = memoryview(buffer)
source = open(0, "rb", buffering=0)
while True:
    count = source.readinto(buffer)
    if not count:
        break
    sock.sendall(view[:count])
sock.shutdown(socket.SHUT_WR)
while sock.recv(65536):
    pass
"""

#: A plain stdlib client, as one would write it: list the app's containers, then inspect
#: each in turn on one keep-alive connection, and print a line per container.
RAW_PS = r"""
import http.client, json, socket, sys

class Connection(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(sys.argv[1])

def get(conn, path):
    conn.request("GET", "/v1.41" + path)
    response = conn.getresponse()
    return json.loads(response.read())

conn = Connection("localhost")
query = json.dumps({"label": ["convox.app=" + sys.argv[2]]}, separators=(",", ":"))
for summary in get(conn, "/containers/json?filters=" + query.replace('"', "%22")):
    c = get(conn, "/containers/%s/json" % summary["Id"])
    print(c["Id"][:12], c["Config"]["Labels"].get("convox.service"), c["State"]["StartedAt"],
          c["Path"], " ".join(c["Args"]))
"""

DOCKER_PY_PS = r"""
import sys, docker
client = docker.from_env()
for c in client.containers.list(filters={"label": "convox.app=" + sys.argv[1]}):
    print(c.short_id, c.labels.get("convox.service"), c.attrs["State"]["StartedAt"],
          c.attrs["Path"], c.attrs["Args"])
"""

DOCKER_PY_EXEC = r"""
import sys, docker
api = docker.from_env().api
exec_id = api.exec_create(sys.argv[1], sys.argv[2:])["Id"]
api.exec_start(exec_id)
sys.exit(api.exec_inspect(exec_id)["ExitCode"])
"""

DOCKER_PY_STREAM = r"""
import sys, docker
api = docker.from_env().api
exec_id = api.exec_create(sys.argv[1], sys.argv[2:])["Id"]
for chunk in api.exec_start(exec_id, stream=True):
    pass
sys.exit(api.exec_inspect(exec_id)["ExitCode"])
"""

DOCKER_PY_RUN = r"""
import sys, docker
docker.from_env().containers.run(sys.argv[1], sys.argv[3:], remove=True,
                                 labels={"convox.bench": sys.argv[2]})
"""


#: The floor: what convox.py imports at start-up, http.client without ssl as it does.
FLOOR = ("import sys; sys.modules['ssl'] = None; import %s, http.client; "
         "del sys.modules['ssl']")


def startup_imports(path=CONVOX):
    """The modules a file imports at its top level (what its start-up pays for)."""
    with open(path) as handle:
        tree = ast.parse(handle.read())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and \
                node.module != "__future__":
            names.append(node.module)
    return sorted(set(names), key=names.index)


def docker_py_venv(allow_install, notes):
    """The python of a venv that has docker-py, or None (with a note saying why)."""
    folder = os.path.join(tempfile.gettempdir(),
                          "convox-bench-docker-py-%d.%d-system" % sys.version_info[:2])
    python = os.path.join(folder, "bin", "python")

    def works():
        return os.path.exists(python) and subprocess.call(
            [python, "-c", "import docker"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL) == 0

    if works():
        return python
    if not allow_install:
        notes.append("docker-py skipped: --quick installs nothing (a full run leaves a venv "
                     "in %s that later --quick runs use)" % folder)
        return None
    progress("installing docker-py into %s" % folder)
    shutil.rmtree(folder, ignore_errors=True)
    try:
        # --system-site-packages: the venv starts up exactly as the interpreter convox.py
        # runs on does (same site-packages, same .pth hooks), so that start-up costs match.
        subprocess.check_call([sys.executable, "-m", "venv", "--system-site-packages", folder],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=120)
        subprocess.check_call([python, "-m", "pip", "install", "-q",
                               "--disable-pip-version-check", "docker"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        notes.append("docker-py skipped: could not pip install docker into a venv (%s)" % exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    if not works():
        notes.append("docker-py skipped: the venv in %s cannot import docker" % folder)
        return None
    return python


# ==========================================================================================
# The engine side: image, fixtures, cleanup
# ==========================================================================================

class Bench:
    """What a run holds: the engine, its image and fixtures, the peers it found."""

    def __init__(self, settings):
        self.settings = settings
        self.run_id = "%x%s" % (os.getpid(), os.urandom(2).hex())
        self.app = "bench-%s" % self.run_id
        self.sync_app = self.app + "-sync"  # what start-sync's convox start runs
        self.rack = convox.resolve_rack(None, os.environ)
        self.engine = convox.Engine(self.rack, os.environ)
        self.image = None
        self.fixtures = []
        self.notes = []
        self.tmp = tempfile.mkdtemp(prefix="convox-bench-")
        url = self.rack.url if self.rack.kind != "unix" else "unix://" + self.rack.address
        self.env = dict(os.environ)
        self.env.pop("CONVOX_APP", None)
        self.env.update({"CONVOX_RACK": url, "DOCKER_HOST": url,
                         # convox run by name uses this run's Python and keeps its
                         # compiled code in this run's folder (see convox.py's launcher).
                         "CONVOX_PYTHON": sys.executable,
                         "XDG_CACHE_HOME": os.path.join(self.tmp, "cache")})
        self.docker = shutil.which("docker")
        self.docker_py = None
        self.swarm = None  # a Swarm of our own, for the swarm-* workloads
        self.swarm_env = None
        self.sshd = None  # test_convox.py's private sshd, for the ssh workloads
        self.python = sys.executable
        # Read once: convox.py may change under a long run (others edit it).
        self.modules = startup_imports()

    # -- setup -----------------------------------------------------------------------------

    def labels(self, **extra):
        labels = {BENCH_LABEL: self.run_id}
        labels.update(extra)
        return labels

    def engine_for_thread(self):
        return convox.Engine(self.rack, {"DOCKER_API_VERSION": self.engine.api_version()})

    def build_image(self):
        busybox = shutil.which("busybox") or "/bin/busybox"
        if not os.path.exists(busybox):
            raise BenchError("busybox is not installed — apt-get install busybox-static")
        dockerfile = ('FROM scratch\nCOPY busybox /bin/busybox\n'
                      'RUN ["/bin/busybox","--install","-s","/bin"]\n').encode("utf-8")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(dockerfile)
            tar.addfile(info, io.BytesIO(dockerfile))
            tar.add(busybox, arcname="busybox")
        tag = "convox-bench:%s" % self.run_id
        query = {"t": tag, "rm": "1", "forcerm": "1", "labels": json.dumps(self.labels())}
        for _ in self.engine.build([buffer.getvalue()], query):
            pass
        self.image = tag

    def add_fixtures(self, total):
        """Bring the app's running fixture containers (service web) up to ``total``."""
        missing = total - len(self.fixtures)
        if missing <= 0:
            return
        progress("starting %d fixture containers" % missing)
        config = {"Image": self.image, "Cmd": ["sleep", "3600"],
                  "Labels": self.labels(**{convox.LABEL_APP: self.app,
                                           convox.LABEL_SERVICE: "web",
                                           convox.LABEL_TYPE: "service"}),
                  "HostConfig": {"Init": True}}
        made, errors = [], []
        stop = threading.Event()  # set on Ctrl-C: no container may appear after cleanup

        def worker(count):
            engine = self.engine_for_thread()
            try:
                for _ in range(count):
                    if stop.is_set():
                        return
                    ident = engine.create_container(config)["Id"]
                    made.append(ident)
                    engine.start(ident)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
            finally:
                engine.close()

        threads = [threading.Thread(target=worker, args=(missing // 8 + (i < missing % 8),))
                   for i in range(min(8, missing))]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                thread.join()
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        self.fixtures.extend(made)
        if errors:
            raise BenchError("could not start fixture containers: %s" % errors[0])

    def zero_file(self, size):
        """A sparse file of ``size`` zero bytes (stdin of the stdin workload)."""
        path = os.path.join(self.tmp, "zero-%d" % size)
        if not os.path.exists(path):
            with open(path, "wb") as handle:
                handle.truncate(size)
        return path

    # -- cleanup ---------------------------------------------------------------------------

    def cleanup(self):
        """Remove every container and image of this run (and the temp folder)."""
        killed = kill_children()
        if self.sshd is not None:
            self.sshd.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.swarm is not None:
            left = self.swarm.close()
            if left:
                sys.stderr.write("bench: the Swarm left: %s\n" % ", ".join(left))
        engine = self.engine_for_thread() if self.engine.version else self.engine
        # A client killed in the middle of a create (docker run, convox run) can leave a
        # container that shows up only after the first sweep: sweep again a moment later.
        for delay in (0, 1.0) if killed else (0,):
            time.sleep(delay)
            self.remove_containers(engine)
        try:
            images = {image["Id"]: image for label in (
                "%s=%s" % (convox.LABEL_APP, self.sync_app), "%s=%s" % (BENCH_LABEL, self.run_id))
                for image in engine.request("GET", "/images/json", {
                    "filters": {"label": [label]}}) or []}.values()
            for image in images:
                # By ID: its tags and, had a build been cut short, an untagged image too.
                try:
                    engine.request("DELETE", "/images/%s" % image["Id"], {"force": "1"})
                except convox.ConvoxError as exc:
                    sys.stderr.write("bench: could not remove image %s: %s\n" % (
                        image["Id"][7:19], exc))
        except convox.ConvoxError as exc:
            sys.stderr.write("bench: cleanup could not remove the image: %s\n" % exc)
        engine.close()
        self.engine.close()

    def remove_containers(self, engine):
        """Remove the containers labelled with this run or its app, eight at a time."""
        idents = set()
        try:
            for label in ("%s=%s" % (BENCH_LABEL, self.run_id),
                          "%s=%s" % (convox.LABEL_APP, self.app),
                          "%s=%s" % (convox.LABEL_APP, self.sync_app)):
                for summary in engine.containers(all=True, filters={"label": [label]}):
                    idents.add(summary["Id"])
        except convox.ConvoxError as exc:
            sys.stderr.write("bench: cleanup could not list containers: %s\n" % exc)
        idents = sorted(idents)

        def worker(part):
            own = self.engine_for_thread()
            try:
                for ident in part:
                    try:
                        own.remove(ident)
                    except convox.ConvoxError as exc:
                        sys.stderr.write("bench: could not remove %s: %s\n" % (ident[:12], exc))
            finally:
                own.close()

        threads = [threading.Thread(target=worker, args=(idents[i::8],)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    # -- the command lines of each contender -------------------------------------------------

    def convox(self, *words):
        """convox as an installed tool runs: by name, through its launcher, from code
        compiled once (the warm-up round compiles it)."""
        return [CONVOX, "-a", self.app] + list(words)

    def convox_script(self, *words):
        """``python3 convox.py``, typed by hand: compiles the file on every run."""
        return [self.python, CONVOX, "-a", self.app] + list(words)

    def convox_module(self, *words):
        """``python3 -m convox`` with PYTHONDONTWRITEBYTECODE=1 (no __pycache__)."""
        return [self.python, "-m", "convox", "-a", self.app] + list(words)

    def convox_pyz(self, *words):
        """``python3 convox.pyz``, the zipapp built as the README says: its __main__.py is
        the launcher's loader (code compiled once, cached as by name)."""
        path = os.path.join(self.tmp, "convox.pyz")
        if not os.path.exists(path):
            build = os.path.join(self.tmp, "pyz-build")
            os.mkdir(build)
            with open(CONVOX) as source:
                lines = source.read().splitlines(True)
            first = lines.index("import marshal, os, sys\n")
            with open(os.path.join(build, "__main__.py"), "w") as main:
                main.writelines(lines[first:lines.index("exec(code)\n", first) + 1])
            shutil.copy(CONVOX, build)
            subprocess.check_call([self.python, "-m", "zipapp", build, "-o", path],
                                  timeout=60)
        return [self.python, path, "-a", self.app] + list(words)

    def convox_pyc(self, *words):
        """convox.py run from bytecode compiled beforehand (as ``python3 -m convox`` with a
        __pycache__, or a zipapp that ships the .pyc): what start-up costs without the
        compile that ``python3 convox.py`` does on every run."""
        path = os.path.join(self.tmp, "convox.pyc")
        if not os.path.exists(path):
            import py_compile
            py_compile.compile(CONVOX, cfile=path, doraise=True)
        return [self.python, path, "-a", self.app] + list(words)

    def docker_cli(self, *words):
        return [self.docker] + list(words)

    def docker_py_script(self, script, *words):
        return [self.docker_py, "-c", script] + list(words)


def progress(text):
    sys.stderr.write("bench: %s\n" % text)
    sys.stderr.flush()


# ==========================================================================================
# Workloads
# ==========================================================================================

class Contender:
    """One side of a comparison: ``run()`` -> Sample."""

    def __init__(self, key, label, run, is_floor=False):
        self.key = key
        self.label = label
        self.run = run
        self.is_floor = is_floor


def alternate(title, contenders, pairs, warmup):
    """Run the contenders in turn (A B C A B C ...); drop the warm-up rounds."""
    samples = {c.key: [] for c in contenders}
    for round_ in range(warmup + pairs):
        progress("%s: round %d/%d%s" % (title, round_ + 1, warmup + pairs,
                                         " (warm-up)" if round_ < warmup else ""))
        for contender in contenders:
            sample = contender.run()
            if round_ >= warmup:
                samples[contender.key].append(sample)
        reap_orphans()
    return samples


def summarise(workload, case, contenders, samples, metric="wall", unit_bytes=None):
    """Rows of the table: medians, and the median of pair-by-pair ratios vs convox."""
    rows = []
    mine = samples["convox"]
    for contender in contenders:
        theirs = samples[contender.key]
        row = {
            "workload": workload, "case": case, "contender": contender.key,
            "label": contender.label, "pairs": len(theirs), "floor": contender.is_floor,
            "wall_s": statistics.median(s.wall for s in theirs),
            "cpu_s": statistics.median(s.cpu for s in theirs),
            "rss_kib": statistics.median(s.rss_kib for s in theirs),
            "ratio": None,
        }
        if metric != "wall":
            for key in theirs[0].extra:
                row[key + "_s"] = statistics.median(s.extra[key] for s in theirs)
        if unit_bytes:
            row["mib_per_s"] = unit_bytes / MIB / row["wall_s"]
        if contender.key != "convox":
            if metric == "wall":
                ratios = [a.wall / b.wall for a, b in zip(mine, theirs)]
            else:
                ratios = [a.extra[metric] / b.extra[metric] for a, b in zip(mine, theirs)]
                row["p50_diff_s"] = statistics.median(
                    a.extra[metric] - b.extra[metric] for a, b in zip(mine, theirs))
            row["ratio"] = statistics.median(ratios)
            if all(b.cpu > 0 for b in theirs):
                row["cpu_ratio"] = statistics.median(a.cpu / b.cpu for a, b in zip(mine, theirs))
            row["rss_ratio"] = statistics.median(a.rss_kib / b.rss_kib
                                                 for a, b in zip(mine, theirs))
            if "convox-pyc" in samples and contender.key != "convox-pyc" and metric == "wall":
                row["pyc_ratio"] = statistics.median(
                    a.wall / b.wall for a, b in zip(samples["convox-pyc"], theirs))
        rows.append(row)
    return rows


def peers(bench, docker_cli=None, docker_py=None, floor=None):
    """The peer contenders that this machine has."""
    found = []
    if docker_cli and bench.docker:
        found.append(Contender("docker", docker_cli[0], docker_cli[1]))
    if docker_py and bench.docker_py:
        found.append(Contender("docker-py", docker_py[0], docker_py[1]))
    if floor:
        found.append(Contender("floor", floor[0], floor[1], is_floor=True))
    return found


def workload_ps(bench, count=10):
    s = bench.settings
    bench.add_fixtures(count)
    env = bench.env
    label = "label=%s=%s" % (convox.LABEL_APP, bench.app)
    modules = bench.modules
    module_env = dict(env, PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=ROOT)
    floor = FLOOR % ", ".join(modules)
    contenders = [Contender("convox", "convox ps (by name: the launcher, compiled once)",
                            lambda: measure(bench.convox("ps"), env)),
                  Contender("convox-pyz", "python3 convox.pyz ps (zipapp, loader as __main__)",
                            lambda: measure(bench.convox_pyz("ps"), env)),
                  Contender("convox-module", "python3 -m convox ps, PYTHONDONTWRITEBYTECODE=1",
                            lambda: measure(bench.convox_module("ps"), module_env)),
                  Contender("convox-script", "python3 convox.py ps (compiles every run)",
                            lambda: measure(bench.convox_script("ps"), env)),
                  Contender("convox-pyc", "convox ps, precompiled (python convox.pyc)",
                            lambda: measure(bench.convox_pyc("ps"), env))]
    contenders += peers(
        bench,
        docker_cli=("docker ps --filter label=convox.app=APP",
                    lambda: measure(bench.docker_cli("ps", "--filter", label), env)),
        docker_py=("docker-py containers.list",
                   lambda: measure(bench.docker_py_script(DOCKER_PY_PS, bench.app), env)))
    if bench.rack.kind == "unix":
        contenders.append(Contender("raw", "raw stdlib client, inspects in turn", lambda: measure(
            [bench.python, "-c", RAW_PS, bench.rack.address, bench.app], env)))
    contenders += [
        Contender("floor", "interpreter importing convox.py's %d start-up modules"
                  % len(modules), lambda: measure([bench.python, "-c", floor], env),
                  is_floor=True),
        Contender("floor-S", "same, python -S (no site, as the launcher runs)",
                  lambda: measure([bench.python, "-S", "-c", floor], env), is_floor=True)]
    case = "%d containers" % count
    note = "ps floor: python [-S] -c %r" % floor
    if note not in bench.notes:
        bench.notes.append(note)
    pairs = s.big_ps_pairs if count > 200 else s.pairs
    samples = alternate("ps, " + case, contenders, pairs, s.warmup)
    rows = summarise("ps", case, contenders, samples)
    for row in rows:  # every form of convox against the floors, pair by pair
        if row["contender"].startswith("convox"):
            row["floor_ratios"] = {floor: statistics.median(
                a.wall / b.wall for a, b in zip(samples[row["contender"]], samples[floor]))
                for floor in ("floor", "floor-S")}
    return rows


def workload_startup(bench):
    """convox ps by name under each Python, against that Python's own floors."""
    s = bench.settings
    bench.add_fixtures(10)
    floor = FLOOR % ", ".join(bench.modules)
    contenders = []
    for python in bench.pythons:
        version = subprocess.check_output(
            [python, "-c", "import platform; print(platform.python_version())"],
            timeout=60).decode().strip()
        env = dict(bench.env, CONVOX_PYTHON=python, PYTHONDONTWRITEBYTECODE="1")
        contenders += [
            Contender("convox@" + version, "convox ps by name, Python %s" % version,
                      lambda env=env: measure(bench.convox("ps"), env)),
            Contender("floor@" + version, "floor, Python %s" % version,
                      lambda python=python, env=env: measure([python, "-c", floor], env),
                      is_floor=True),
            Contender("floor-S@" + version, "floor -S, Python %s" % version,
                      lambda python=python, env=env: measure([python, "-S", "-c", floor],
                                                             env),
                      is_floor=True)]
    samples = alternate("start-up by Python", contenders, s.pairs, s.warmup)
    rows = []
    for contender in contenders:
        theirs = samples[contender.key]
        row = {"workload": "startup", "case": "ps, 10 containers",
               "contender": contender.key, "label": contender.label, "pairs": len(theirs),
               "floor": contender.is_floor, "ratio": None,
               "wall_s": statistics.median(x.wall for x in theirs),
               "cpu_s": statistics.median(x.cpu for x in theirs),
               "rss_kib": statistics.median(x.rss_kib for x in theirs)}
        if contender.key.startswith("convox@"):
            version = contender.key.split("@")[1]
            row["floor_ratios"] = {floor: statistics.median(
                a.wall / b.wall for a, b in zip(theirs, samples["%s@%s" % (floor, version)]))
                for floor in ("floor", "floor-S")}
            row["cpu_floor_ratio"] = statistics.median(
                a.cpu / b.cpu for a, b in zip(theirs, samples["floor@" + version]))
        rows.append(row)
    return rows


def workload_exec(bench):
    s = bench.settings
    target, env = bench.fixtures[0], bench.env
    contenders = [Contender("convox", "convox exec ID true",
                            lambda: measure(bench.convox("exec", target, "true"), env))]
    contenders += peers(
        bench,
        docker_cli=("docker exec ID true",
                    lambda: measure(bench.docker_cli("exec", target, "true"), env)),
        docker_py=("docker-py exec_create/start",
                   lambda: measure(bench.docker_py_script(DOCKER_PY_EXEC, target, "true"),
                                   env)))
    samples = alternate("exec round trip", contenders, s.pairs, s.warmup)
    return summarise("exec", "round trip", contenders, samples)


def stdout_contenders(bench, size, docker_py=True, floor=True):
    target, env = bench.fixtures[0], bench.env
    command = ["head", "-c", str(size), "/dev/zero"]
    contenders = [Contender("convox", "convox exec ID head -c N /dev/zero",
                            lambda: measure(bench.convox("exec", target, *command), env))]
    contenders += peers(
        bench,
        docker_cli=("docker exec ID head ...",
                    lambda: measure(bench.docker_cli("exec", target, *command), env)),
        docker_py=docker_py and ("docker-py exec_start(stream=True)",
                                 lambda: measure(bench.docker_py_script(
                                     DOCKER_PY_STREAM, target, *command), env)),
        floor=floor and ("raw reader of the hijacked stream",
                         lambda: measure([bench.python, "-c", RAW_READER, ROOT, target] +
                                         command, env)))
    return contenders


def workload_stdout(bench):
    s = bench.settings
    size = s.stream_size
    contenders = stdout_contenders(bench, size)
    case = "%d MiB to /dev/null" % (size // MIB)
    samples = alternate("exec stdout, " + case, contenders, s.stream_pairs, s.warmup)
    return summarise("stdout", case, contenders, samples, unit_bytes=size)


def workload_stdin(bench):
    s = bench.settings
    size = s.stream_size
    target, env = bench.fixtures[0], bench.env
    source = bench.zero_file(size)
    command = ["sh", "-c", "cat >/dev/null"]
    contenders = [Contender("convox", "convox exec ID sh -c 'cat >/dev/null' <file",
                            lambda: measure(bench.convox("exec", target, *command), env,
                                            stdin_path=source))]
    contenders += peers(
        bench,
        docker_cli=("docker exec -i ID sh -c ...",
                    lambda: measure(bench.docker_cli("exec", "-i", target, *command), env,
                                    stdin_path=source)),
        floor=("raw writer of the hijacked stream",
               lambda: measure([bench.python, "-c", RAW_WRITER, ROOT, target] + command, env,
                               stdin_path=source)))
    case = "%d MiB from a file" % (size // MIB)
    samples = alternate("exec stdin, " + case, contenders, s.stream_pairs, s.warmup)
    return summarise("stdin", case, contenders, samples, unit_bytes=size)


def workload_run(bench):
    s = bench.settings
    env = bench.env
    contenders = [Contender("convox", "convox run web true",
                            lambda: measure(bench.convox("run", "web", "true"), env))]
    contenders += peers(
        bench,
        docker_cli=("docker run --rm IMAGE true",
                    lambda: measure(bench.docker_cli(
                        "run", "--rm", "--label", "%s=%s" % (BENCH_LABEL, bench.run_id),
                        bench.image, "true"), env)),
        docker_py=("docker-py containers.run(remove=True)",
                   lambda: measure(bench.docker_py_script(
                       DOCKER_PY_RUN, bench.image, bench.run_id, "true"), env)))
    samples = alternate("run", contenders, s.pairs, s.warmup)
    return summarise("run", "run SERVICE true", contenders, samples)


def workload_tty(bench):
    s = bench.settings
    target, env, keys = bench.fixtures[0], bench.env, s.keystrokes
    contenders = [Contender("convox", "convox exec ID cat (on a pty)",
                            lambda: tty_session(bench.convox("exec", target, "cat"), env,
                                                keys))]
    contenders += peers(
        bench,
        docker_cli=("docker exec -it ID cat",
                    lambda: tty_session(bench.docker_cli("exec", "-it", target, "cat"), env,
                                        keys)))
    case = "%d keystrokes" % keys
    samples = alternate("tty echo, " + case, contenders, s.pairs, s.warmup)
    return summarise("tty", case, contenders, samples, metric="p50")


def workload_rss(bench):
    """Peak RSS of the stdout workload at two sizes, for convox and the Docker CLI."""
    s = bench.settings
    small, big = s.rss_sizes
    contenders = []
    for size in (small, big):
        for contender in stdout_contenders(bench, size, docker_py=False, floor=False):
            contender.key = "%s@%d" % (contender.key, size // MIB)
            contender.label = "%s, %d MiB" % (contender.key.split("@")[0], size // MIB)
            contenders.append(contender)
    samples = alternate("stream RSS, %d vs %d MiB" % (small // MIB, big // MIB), contenders,
                        s.rss_pairs, s.warmup)
    rows = []
    for contender in contenders:
        theirs = samples[contender.key]
        rows.append({
            "workload": "rss", "case": "%d vs %d MiB" % (small // MIB, big // MIB),
            "contender": contender.key, "label": contender.label, "pairs": len(theirs),
            "floor": False, "wall_s": statistics.median(x.wall for x in theirs),
            "cpu_s": statistics.median(x.cpu for x in theirs),
            "rss_kib": statistics.median(x.rss_kib for x in theirs), "ratio": None,
        })
    by_key = {row["contender"]: row for row in rows}
    for who in ("convox", "docker"):
        key_small, key_big = "%s@%d" % (who, small // MIB), "%s@%d" % (who, big // MIB)
        if key_big in samples:
            by_key[key_big]["growth"] = statistics.median(
                b.rss_kib / a.rss_kib for a, b in zip(samples[key_small], samples[key_big]))
    for size in (small, big):
        mine, theirs = "convox@%d" % (size // MIB), "docker@%d" % (size // MIB)
        if theirs in samples:
            by_key[theirs]["rss_ratio"] = statistics.median(
                a.rss_kib / b.rss_kib for a, b in zip(samples[mine], samples[theirs]))
    return rows


def workload_logs(bench):
    """convox logs --no-follow ID vs docker logs ID, of a process that printed N lines."""
    s = bench.settings
    env = bench.env
    rows = []
    for lines in s.log_lines:
        progress("logs: a process prints %d lines" % lines)
        ident = bench.engine.create_container({
            "Image": bench.image, "Cmd": ["seq", "1", str(lines)],
            "Labels": bench.labels(**{convox.LABEL_APP: bench.app,
                                      convox.LABEL_SERVICE: "logger",
                                      convox.LABEL_TYPE: "service"}),
            "HostConfig": {"NetworkMode": "none"}})["Id"]
        bench.engine.start(ident)
        give_up = time.monotonic() + 600
        while bench.engine.inspect(ident)["State"]["Running"]:
            if time.monotonic() > give_up:
                raise BenchError("seq 1 %d did not end within 600 s" % lines)
            time.sleep(0.2)
        contenders = [Contender("convox", "convox logs --no-follow ID",
                                lambda: measure(bench.convox("logs", "--no-follow", ident),
                                                env))]
        contenders += peers(bench, docker_cli=(
            "docker logs ID", lambda: measure(bench.docker_cli("logs", ident), env)))
        case = "%d lines" % lines
        samples = alternate("logs, " + case, contenders, s.log_pairs, s.warmup)
        rows += summarise("logs", case, contenders, samples)
        bench.engine.remove(ident)
    small, big = [[r for r in rows if r["case"] == "%d lines" % n] for n in s.log_lines]
    for before, after in zip(small, big):
        after["growth"] = after["rss_kib"] / before["rss_kib"]
    return rows


class StartedApp:
    """`convox start` of a bench app in the background, its output read line by line."""

    def __init__(self, bench, folder, *words):
        self.bench = bench
        self.lines = []
        self.proc = subprocess.Popen(
            [bench.python, CONVOX, "-a", bench.sync_app, "start"] + list(words), cwd=folder,
            env=bench.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        give_up = time.monotonic() + 300
        while not any(b"convox | starting web" in line for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > give_up:
                self.stop()
                raise BenchError("convox start did not start: %s" % b"".join(
                    self.lines[-5:]).decode("utf-8", "replace"))
            time.sleep(0.05)

    def _read(self):
        for line in iter(self.proc.stdout.readline, b""):
            self.lines.append(line)

    def cpu_seconds(self):
        """user + system time of the convox process so far (/proc/PID/stat)."""
        with open("/proc/%d/stat" % self.proc.pid) as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self):
        with open("/proc/%d/status" % self.proc.pid) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        self.proc.stdout.close()


def sync_context(bench, name, files):
    """A build context: a Dockerfile copying everything to /app, a convox.yml whose web
    service prints each new content of /app/probe.txt, and ``files`` small files."""
    folder = os.path.join(bench.tmp, name)
    os.makedirs(folder)
    watcher = ("last=; while true; do v=$(cat /app/probe.txt 2>/dev/null); "
               "if [ \"$v\" != \"$last\" ]; then echo \"seen $v\"; last=$v; fi; "
               "usleep 10000; done")
    texts = {"Dockerfile": "FROM %s\nWORKDIR /app\nCOPY . .\n" % bench.image,
             "convox.yml": "services:\n  web:\n    build: .\n    command: [\"sh\", \"-c\", "
                           "%s]\n" % json.dumps(watcher),
             ".dockerignore": "convox.yml\n", "probe.txt": "start\n"}
    for index in range(files):
        texts["tree/d%03d/f%04d.txt" % (index // 100, index)] = "%d\n" % index
    for rel, text in texts.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            handle.write(text)
    return folder


def workload_start_sync(bench):
    import random
    s = bench.settings
    rows = []
    folder = sync_context(bench, "sync-latency", 0)
    app = StartedApp(bench, folder)
    try:
        latencies = []
        for probe in range(s.sync_probes + s.warmup):
            progress("start-sync: probe %d/%d%s" % (probe + 1, s.sync_probes + s.warmup,
                                                     " (warm-up)" if probe < s.warmup else ""))
            time.sleep(random.uniform(0.3, 1.3))  # writes land at any moment of the poll
            token = "p%d-%s" % (probe, os.urandom(3).hex())
            needle = ("web    | seen %s" % token).encode()
            began = time.monotonic()
            with open(os.path.join(folder, "probe.txt"), "w") as handle:
                handle.write(token + "\n")
            while not any(line.startswith(needle) for line in app.lines[-20:]):
                if time.monotonic() - began > 10:
                    raise BenchError("a change to probe.txt did not arrive within 10 s")
                time.sleep(0.002)
            if probe >= s.warmup:
                latencies.append(time.monotonic() - began)
        rss = app.rss_kib()
    finally:
        app.stop()
    rows.append({"workload": "start-sync", "case": "write -> seen in the container",
                 "contender": "convox", "label": "convox start", "pairs": len(latencies),
                 "floor": False, "wall_s": statistics.median(latencies), "cpu_s": None,
                 "rss_kib": rss, "ratio": None,
                 "note": "median of %d; min %s, max %s" % (
                     len(latencies), fmt_time(min(latencies)), fmt_time(max(latencies)))})
    folder = sync_context(bench, "sync-cpu", s.sync_files)
    watch = convox.ContextWatch(folder)
    looks = []
    for _ in range(10):
        began = time.process_time()
        watch.scan()
        looks.append(time.process_time() - began)
    shares = {}
    for words in ((), ("--no-sync",)):
        progress("start-sync: CPU of an idle start over %d files%s" % (
            s.sync_files, " ".join(("",) + words)))
        app = StartedApp(bench, folder, *words)
        try:
            time.sleep(2)  # past the start-up
            cpu, began = app.cpu_seconds(), time.monotonic()
            time.sleep(s.cpu_window)
            shares[words] = (app.cpu_seconds() - cpu) / (time.monotonic() - began)
            rss = app.rss_kib()
        finally:
            app.stop()
        rows.append({"workload": "start-sync", "case": "idle, %d files" % s.sync_files,
                     "contender": "convox" + "".join(words), "label": "convox start %s" % (
                         " ".join(words) or "(sync)"), "pairs": 1, "floor": False,
                     "wall_s": s.cpu_window, "cpu_s": shares[words] * s.cpu_window,
                     "rss_kib": rss, "ratio": None,
                     "cpu_share": shares[words],
                     "note": "%.2f%% of a core" % (shares[words] * 100) + (
                         "; one look at the tree %s (median of 10), every %g s" % (
                             fmt_time(statistics.median(looks)), convox.SYNC_INTERVAL)
                         if not words else "")})
    rows[-2]["watcher_share"] = shares[()] - shares[("--no-sync",)]
    return rows


def workload_ssh(bench):
    """The same rack reached over ssh: convox's one forward per invocation against the
    Docker CLI's ssh (and far-side docker) per connection."""
    if bench.rack.kind != "unix":
        raise BenchError("the ssh workloads need an engine on a UNIX socket")
    import test_convox  # its private sshd: own port, host key and temporary user
    bench.sshd = test_convox.SSH
    bench.sshd.setup(bench.rack.address)
    if not bench.sshd.ready:
        bench.notes.append("ssh workloads skipped: %s" % bench.sshd.problem)
        return []
    url = bench.sshd.url()
    convox_env = dict(bench.env, CONVOX_RACK=url, DOCKER_HOST=url,
                      CONVOX_SSH_COMMAND=bench.sshd.command())
    # docker runs the `ssh` on its PATH: one that reads the private sshd's client config.
    wrapper = os.path.join(bench.tmp, "ssh-bin")
    os.makedirs(wrapper, exist_ok=True)
    with open(os.path.join(wrapper, "ssh"), "w") as handle:
        handle.write('#!/bin/sh\nexec %s "$@"\n' % bench.sshd.command().replace(
            "ssh", shutil.which("ssh") or "/usr/bin/ssh", 1))
    os.chmod(os.path.join(wrapper, "ssh"), 0o755)
    docker_env = dict(bench.env, DOCKER_HOST=url,
                      PATH=wrapper + os.pathsep + bench.env.get("PATH", ""))
    if bench.rack.address != convox.SSH_DEFAULT_SOCKET:
        bench.docker = None  # its far side would dial the default socket, not this engine
        bench.notes.append("ssh: docker -H ssh:// left out (the engine is not at %s)" %
                           convox.SSH_DEFAULT_SOCKET)
    s = bench.settings
    target = bench.fixtures[0]
    size = s.ssh_stream_size
    stream = ["head", "-c", str(size), "/dev/zero"]
    label = "label=%s=%s" % (convox.LABEL_APP, bench.app)
    cases = [
        ("ps", ["ps"], ["ps", "--filter", label], False),
        ("exec ID true", ["exec", target, "true"], ["exec", target, "true"], False),
        ("stdout %d MiB" % (size // MIB), ["exec", target] + stream,
         ["exec", target] + stream, True),
    ]
    rows = []
    for case, words, docker_words, local in cases:
        contenders = [Contender("convox", "convox -r ssh://... " + case,
                                lambda w=words: measure(bench.convox(*w), convox_env))]
        contenders += peers(bench, docker_cli=(
            "docker -H ssh://... " + case,
            lambda w=docker_words: measure(bench.docker_cli(*w), docker_env)))
        if local:
            contenders.append(Contender(
                "local", "convox on the local socket", is_floor=True,
                run=lambda w=words: measure(bench.convox(*w), bench.env)))
        else:  # what one ssh set-up costs by itself: no client can do with less
            contenders.append(Contender(
                "ssh-floor", "ssh HOST true (one ssh set-up)", is_floor=True,
                run=lambda: measure([os.path.join(wrapper, "ssh"), "-p",
                                     str(bench.sshd.ports["forward"]), "-l", bench.sshd.user,
                                     "127.0.0.1", "true"], bench.env)))
        samples = alternate("ssh, " + case, contenders,
                            s.stream_pairs if local else s.pairs, s.warmup)
        rows.extend(summarise("ssh", case, contenders, samples,
                              unit_bytes=size if local else None))
    return rows


#: The workloads by name, in the order they run.
def swarm(bench):
    """The bench's Swarm (the tests' SwarmCluster), brought up on first use."""
    if bench.swarm is None:
        import test_convox
        progress("bringing up a Swarm of three private dockerds")
        cluster = test_convox.SwarmCluster()
        cluster.start("convox-bench:%s" % bench.run_id,
                      files={"busybox": shutil.which("busybox") or "/bin/busybox"})
        bench.swarm = cluster
        bench.swarm_env = dict(bench.env, CONVOX_RACK=cluster.tcp_url(0),
                               DOCKER_HOST=cluster.tcp_url(0))
        progress("Swarm up in %.1f s" % cluster.bring_up)
    return bench.swarm


def swarm_service(bench, replicas):
    """The app's service web with ``replicas`` running tasks; -> (ID, its running tasks)."""
    cluster = swarm(bench)
    manager = cluster.engines[0]
    name = "%s-web" % bench.app
    services = manager.request("GET", "/services", {"filters": {"name": [name]}})
    spec = {"Name": name, "Labels": {convox.LABEL_APP: bench.app,
                                     convox.LABEL_SERVICE: "web"},
            "TaskTemplate": {"ContainerSpec": {"Image": cluster.image,
                                               "Args": ["sleep", "3600"], "Init": True}},
            "Mode": {"Replicated": {"Replicas": replicas}}, "EndpointSpec": {"Mode": "dnsrr"}}
    if services:
        spec["TaskTemplate"]["ForceUpdate"] = 0
        manager.request("POST", "/services/%s/update" % services[0]["ID"],
                        {"version": services[0]["Version"]["Index"]}, body=spec)
        ident = services[0]["ID"]
    else:
        ident = manager.request("POST", "/services/create", body=spec)["ID"]
    end = time.monotonic() + 300
    while time.monotonic() < end:
        tasks = manager.request("GET", "/tasks", {"filters": {
            "service": [ident], "desired-state": ["running"]}})
        running = [t for t in tasks if t["Status"]["State"] == "running"]
        if len(running) == replicas == len(tasks):
            return ident, running
        time.sleep(0.2)
    raise BenchError("%d tasks did not start on the Swarm within 300 s" % replicas)


def workload_swarm_ps(bench, count=50):
    s = bench.settings
    _, tasks = swarm_service(bench, count)
    env = bench.swarm_env
    nodes = len({t["NodeID"] for t in tasks})
    contenders = [Contender("convox", "convox ps (by name), %d tasks" % count,
                            lambda: measure(bench.convox("ps"), env))]
    contenders += peers(bench, docker_cli=(
        "docker service ps APP-web --filter desired-state=running",
        lambda: measure(bench.docker_cli("service", "ps", "--filter",
                                         "desired-state=running", bench.app + "-web"), env)))
    case = "%d tasks on %d nodes" % (count, nodes)
    samples = alternate("swarm-ps, " + case, contenders, s.pairs, s.warmup)
    return summarise("swarm-ps", case, contenders, samples)


def workload_swarm_exec(bench):
    s = bench.settings
    _, tasks = swarm_service(bench, 3)
    cluster = bench.swarm
    manager_node = cluster.nodes[cluster.hostnames[0]]["ID"]
    task = [t for t in tasks if t["NodeID"] != manager_node][0]
    container = task["Status"]["ContainerStatus"]["ContainerID"]
    node_addr = [n["Status"]["Addr"] for n in cluster.nodes.values()
                 if n["ID"] == task["NodeID"]][0]
    env = bench.swarm_env
    contenders = [Contender("convox", "convox exec ID true (a worker's task, via the manager)",
                            lambda: measure(bench.convox("exec", container[:12], "true"), env))]
    contenders += peers(bench, docker_cli=(
        "docker -H tcp://NODE:2375 exec ID true",
        lambda: measure(bench.docker_cli("-H", "tcp://%s:2375" % node_addr, "exec",
                                         container, "true"), env)))
    samples = alternate("swarm-exec round trip", contenders, s.pairs, s.warmup)
    return summarise("swarm-exec", "cross-node round trip", contenders, samples)


RUNNERS = {"ps": workload_ps, "startup": workload_startup, "exec": workload_exec, "stdout": workload_stdout,
           "stdin": workload_stdin, "run": workload_run, "tty": workload_tty,
           "rss": workload_rss, "logs": workload_logs, "ssh": workload_ssh,
           "start-sync": workload_start_sync,
           "swarm-ps": workload_swarm_ps, "swarm-exec": workload_swarm_exec}


# ==========================================================================================
# Report
# ==========================================================================================

def machine_info(bench):
    version = bench.engine.request("GET", "/version") or {}
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": "%s %s" % (platform.python_implementation(), platform.python_version()),
        "engine": "%s %s (API %s)" % (
            "Podman" if "podman" in json.dumps(version.get("Components") or "").lower()
            else "Docker Engine", version.get("Version", "?"), version.get("ApiVersion", "?")),
        "docker_cli": None, "docker_py": None, "kernel": platform.release(),
    }
    if bench.docker:
        try:
            info["docker_cli"] = subprocess.check_output(
                [bench.docker, "version", "--format", "{{.Client.Version}}"], env=bench.env,
                stderr=subprocess.DEVNULL, timeout=30).decode().strip()
        except (OSError, subprocess.SubprocessError):
            pass
    if bench.docker_py:
        info["docker_py"] = subprocess.check_output(
            [bench.docker_py, "-c", "import docker; print(docker.__version__)"],
            timeout=60).decode().strip()
    return info


def cpu_model():
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def fmt_time(seconds):
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return "%.2f ms" % (seconds * 1000)
    if seconds < 1:
        return "%.1f ms" % (seconds * 1000)
    return "%.2f s" % seconds


def fmt_rss(kib):
    return "%.1f MiB" % (kib / 1024.0)


def row_note(row):
    notes = []
    if "p50_s" in row:
        notes.append("echo p50 %s, p95 %s" % (fmt_time(row["p50_s"]), fmt_time(row["p95_s"])))
    if row.get("p50_diff_s") is not None:
        notes.append("convox p50 %+.2f ms" % (row["p50_diff_s"] * 1000))
    if "mib_per_s" in row:
        notes.append("%.0f MiB/s" % row["mib_per_s"])
    if row.get("cpu_ratio") is not None:
        notes.append("CPU convox/this %.2f" % row["cpu_ratio"])
    if row.get("rss_ratio") is not None:
        notes.append("RSS convox/this %.2f" % row["rss_ratio"])
    if row.get("cpu_floor_ratio") is not None:
        notes.append("CPU ÷floor %.2f" % row["cpu_floor_ratio"])
    if row.get("floor_ratios"):
        notes.append("÷floor %.2f, ÷floor-S %.2f" % (row["floor_ratios"]["floor"],
                                                     row["floor_ratios"]["floor-S"]))
    if row.get("pyc_ratio") is not None:
        notes.append("precompiled/this %.2f" % row["pyc_ratio"])
    if row.get("growth") is not None:
        notes.append("RSS x%.2f from the small size" % row["growth"])
    if row.get("note"):
        notes.append(row["note"])
    return "; ".join(notes)


def render_table(info, settings, rows, notes, failures):
    head = ["WORKLOAD", "CASE", "CONTENDER", "WALL", "CPU", "PEAK RSS", "CONVOX/THIS", "NOTE"]
    lines = []
    for row in rows:
        lines.append([row["workload"], row["case"], row["label"], fmt_time(row["wall_s"]),
                      fmt_time(row["cpu_s"]), fmt_rss(row["rss_kib"]),
                      "-" if row["ratio"] is None else "%.2f" % row["ratio"], row_note(row)])
    widths = [max(len(head[i]), *(len(line[i]) for line in lines)) if lines else len(head[i])
              for i in range(len(head))]
    out = ["convox.py benchmark, %s" % info["date"],
           "machine: %s CPUs (%s), Linux %s; %s; %s; docker CLI %s; docker-py %s" % (
               info["nproc"], info["cpu"], info["kernel"], info["python"], info["engine"],
               info["docker_cli"] or "absent", info["docker_py"] or "absent"),
           "%s run: %d pairs (+%d warm-up discarded; streams %d, rss %d); figures are "
           "medians" % ("quick" if settings.quick else "full", settings.pairs, settings.warmup,
                        settings.stream_pairs, settings.rss_pairs),
           "CPU: user+system time of the process itself.  CONVOX/THIS: median of the "
           "pair-by-pair ratios of wall time (p50 for tty); below 1, convox is faster",
           ""]
    for line in [head] + lines:
        cells = [line[i].ljust(widths[i]) for i in range(len(head) - 1)] + [line[-1]]
        out.append("  ".join(cells).rstrip())
    for failure in failures:
        out.append("FAILED %s" % failure)
    for note in notes:
        out.append("note: %s" % note)
    return "\n".join(out) + "\n"


def evaluate(rows):
    """The performance targets against the figures: [(target, measured, met or None)]."""
    index = {(r["workload"], r["case"], r["contender"]): r for r in rows}
    targets = []

    def find(workload, contender):
        return [r for r in rows if r["workload"] == workload and r["contender"] == contender]

    for workload in ("stdout", "stdin"):
        for row in find(workload, "docker"):
            targets.append(("%s throughput <= docker CLI (%s)" % (workload, row["case"]),
                            "%.2f" % row["ratio"], row["ratio"] <= 1.0))
            convox_row = index[(workload, row["case"], "convox")]
            targets.append(("%s peak RSS <= docker CLI's" % workload, "%s vs %s" % (
                fmt_rss(convox_row["rss_kib"]), fmt_rss(row["rss_kib"])),
                row["rss_ratio"] <= 1.0))
        for row in find(workload, "floor"):
            targets.append(("%s within 15%% of the raw floor" % workload,
                            "%.2f" % row["ratio"], row["ratio"] <= 1.15))
    for row in rows:
        if row["workload"] == "rss" and row["contender"].startswith("convox@") and \
                row.get("growth") is not None:
            targets.append(("stream RSS flat with size (%s)" % row["case"],
                            "x%.2f" % row["growth"], row["growth"] <= 1.1))
        if row["workload"] == "rss" and row["contender"].startswith("docker@"):
            targets.append(("stream RSS <= docker CLI's (%s)" % row["label"].split(", ")[1],
                            "%.2f" % row["rss_ratio"], row["rss_ratio"] <= 1.0))
    # The target is for a long log (SPEC §9: 1,000,000 lines); below it start-up dominates.
    for row in find("logs", "docker")[-1:]:
        targets.append(("logs --no-follow <= 1.2x docker logs (%s)" % row["case"],
                        "%.2f" % row["ratio"], row["ratio"] <= 1.2))
    for row in find("logs", "convox"):
        if row.get("growth") is not None:
            targets.append(("logs peak RSS flat with lines (to %s)" % row["case"],
                            "x%.2f" % row["growth"], row["growth"] <= 1.1))
    for workload, bound in (("exec", 1.3), ("run", 1.2)):
        for row in find(workload, "docker"):
            targets.append(("%s round trip <= %.1fx docker CLI" % (workload, bound),
                            "%.2f" % row["ratio"], row["ratio"] <= bound))
    for row in rows:
        if row["workload"] == "startup" and row.get("floor_ratios"):
            targets.append(("ps within 1.3x of the floor: %s" % row["label"],
                            "%.2f (-S: %.2f)" % (row["floor_ratios"]["floor"],
                                                 row["floor_ratios"]["floor-S"]),
                            row["floor_ratios"]["floor"] <= 1.3))
        if row["workload"] == "ps" and row.get("floor_ratios") and \
                row["case"] == "10 containers":
            bound = 1.8 if row["contender"] == "convox-script" else 1.3
            if row["contender"] != "convox-pyc":
                targets.append(("ps within %.1fx of the floor: %s" % (
                    bound, row["label"].split(" (")[0].split(",")[0]),
                    "%.2f (-S: %.2f)" % (row["floor_ratios"]["floor"],
                                         row["floor_ratios"]["floor-S"]),
                    row["floor_ratios"]["floor"] <= bound))
    for row in find("ps", "docker"):
        if row["case"] != "10 containers":
            targets.append(("ps <= 2x docker CLI (%s)" % row["case"], "%.2f" % row["ratio"],
                            row["ratio"] <= 2.0))
    for row in find("ps", "raw"):
        if row["case"] != "10 containers":
            targets.append(("ps below the raw sequential client (%s)" % row["case"],
                            "%.2f" % row["ratio"], row["ratio"] < 1.0))
    ps_rows = sorted(find("ps", "convox"), key=lambda r: int(r["case"].split()[0]))
    for before, after in zip(ps_rows, ps_rows[1:]):
        low, high = int(before["case"].split()[0]), int(after["case"].split()[0])
        targets.append(("ps cost per extra container (%d -> %d)" % (low, high), fmt_time(
            (after["wall_s"] - before["wall_s"]) / (high - low)), None))
    for row in rows:
        if row["workload"] == "start-sync" and row["contender"] == "convox" and \
                "cpu_share" not in row:
            targets.append(("start sync: write -> seen in the container < 2 s",
                            fmt_time(row["wall_s"]), row["wall_s"] < 2.0))
        if row.get("watcher_share") is not None:
            targets.append(("start sync: watcher CPU < 2%% of a core (%s)" % row["case"],
                            "%.2f%%" % (row["watcher_share"] * 100),
                            row["watcher_share"] < 0.02))
    for row in find("ssh", "docker"):
        if not row["case"].startswith("stdout"):
            targets.append(("ssh %s <= 0.5x docker -H ssh://" % row["case"],
                            "%.2f" % row["ratio"], row["ratio"] <= 0.5))
    for row in find("ssh", "local"):
        targets.append(("ssh %s within 1.1x of the local socket" % row["case"],
                        "%.2f" % row["ratio"], row["ratio"] <= 1.1))
    for row in find("tty", "docker"):
        targets.append(("tty echo p50 within 1 ms of docker CLI", "%+.2f ms" % (
            row["p50_diff_s"] * 1000), row["p50_diff_s"] <= 0.001))
    return targets


def render_targets(targets):
    if not targets:
        return ""
    width = max(len(t[0]) for t in targets)
    out = ["", "TARGETS"]
    for target, measured, met in targets:
        out.append("%s  %-14s %s" % (target.ljust(width), measured,
                                     {True: "met", False: "MISSED", None: ""}[met]))
    return "\n".join(out) + "\n"


# ==========================================================================================
# CLI
# ==========================================================================================

def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench.py", description="convox.py side by side with the Docker CLI, docker-py "
        "and floors, as A/B ratios.")
    parser.add_argument("--quick", action="store_true",
                        help="fewer pairs, smaller sizes, 10 containers (under a minute)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only these workloads (repeatable or comma-separated): "
                        + ", ".join(WORKLOADS))
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    parser.add_argument("--pairs", type=int, metavar="N", help="measured pairs per workload")
    parser.add_argument("--no-docker-py", action="store_true", help="skip the docker-py peer")
    parser.add_argument("--python", action="append", metavar="PATH",
                        help="the startup workload also runs convox under this Python "
                        "(repeatable)")
    args = parser.parse_args(argv)
    only = []
    for item in args.only or []:
        only.extend(name.strip() for name in item.split(",") if name.strip())
    unknown = [name for name in only if name not in WORKLOADS]
    if unknown:
        parser.error("unknown workload %s; the workloads are %s" % (
            ", ".join(unknown), ", ".join(WORKLOADS)))
    args.only = only or list(DEFAULT_WORKLOADS)
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = Settings(args.quick, args.pairs)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    bench = Bench(settings)
    bench.pythons = [sys.executable] + [p for p in args.python or [] if p != sys.executable]
    enable_launcher(bench.notes)
    rows, failures = [], []
    status = 0
    try:
        try:
            bench.engine.api_version()
        except convox.ConvoxError as exc:
            raise BenchError(str(exc))
        if not bench.docker:
            bench.notes.append("the Docker CLI is not installed: its columns are missing")
        if not args.no_docker_py and set(args.only) & {"ps", "exec", "stdout", "run"}:
            bench.docker_py = docker_py_venv(not settings.quick, bench.notes)
        progress("building the image from busybox")
        bench.build_image()
        bench.add_fixtures(10)
        info = machine_info(bench)
        plan = [(name, RUNNERS[name]) for name in WORKLOADS if name in args.only]
        if "ps" in args.only:  # last: 200 containers would slow every other workload
            plan += [("ps", lambda bench, count=count: workload_ps(bench, count))
                     for count in settings.ps_counts[1:]]
        for name, work in plan:
            try:
                rows.extend(work(bench))
            except BenchError as exc:
                failures.append("%s: %s" % (name, exc))
                progress("FAILED %s: %s" % (name, exc))
                status = 1
        report = render_table(info, settings, rows, bench.notes, failures)
        targets = evaluate(rows)
        report += render_targets(targets)
        report += "\n(%.0f s)\n" % (time.monotonic() - started)
        sys.stdout.write(report)
        sys.stdout.flush()
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"machine": info, "run_id": bench.run_id, "app": bench.app,
                           "image": bench.image, "quick": settings.quick,
                           "pairs": settings.pairs,
                           "rows": rows, "notes": bench.notes, "failures": failures,
                           "targets": [{"target": t, "measured": m, "met": ok}
                                       for t, m, ok in targets]}, handle, indent=2)
                handle.write("\n")
    except KeyboardInterrupt:
        sys.stderr.write("bench: interrupted; cleaning up\n")
        status = 130
    except (BenchError, convox.ConvoxError) as exc:
        sys.stderr.write("bench: ERROR: %s\n" % exc)
        status = 1
    finally:
        # Let the cleanup finish: a second Ctrl-C or a SIGTERM must not leave anything.
        signums = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = [signal.signal(signum, signal.SIG_IGN) for signum in signums]
        try:
            bench.cleanup()
        finally:
            for signum, handler in zip(signums, previous):
                signal.signal(signum, handler)
    return status


if __name__ == "__main__":
    sys.exit(main())
