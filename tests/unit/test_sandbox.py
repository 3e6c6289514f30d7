"""The sandbox for code rewards (dsv4train/posttrain/rewards/sandbox.py) through the code judge, one test per hostile
case, and safe_reward (dsv4train/posttrain/rewards/reward_fn.py).

Each hostile test asserts what the issue asks: reward 0, a reason that names the cause, a run that ends within a
bound, and a host left as it was (the file not written, the listener not reached, the judging process alive, no
process left over). Expected reasons are typed here from the rule each case breaks, not copied from a run. Where a
layer cannot be exercised here (a namespace the kernel refuses, RLIMIT_NPROC as root), the test is skipped with
the reason, and the layer that stands instead is tested. CPU and wall limits are small: hostile code runs for at
most a few seconds.
"""

import json
import logging
import math
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dsv4train.data.tasks.code import CodeSample, SandboxLimits, SandboxPolicy, judge
from dsv4train.posttrain.rewards import sandbox
from dsv4train.posttrain.rewards.reward_fn import safe_reward
from dsv4train.posttrain.rewards.sandbox import run_python

SUM_EVENS = CodeSample(
    id="sandbox-sum-evens",
    prompt="Write a Python function `sum_evens(nums)` that returns the sum of the even numbers in nums.",
    entry_point="sum_evens",
    reference_solution=None,
    visible_examples=(),
    hidden_tests=(
        "assert sum_evens([]) == 0",
        "assert sum_evens([1, 2, 3, 4]) == 6",
        "assert sum_evens([-2, 7]) == -2",
    ),
)
SOLUTION = "def sum_evens(nums):\n    return sum(x for x in nums if x % 2 == 0)\n"
NO_NAMESPACES = SandboxPolicy(network_namespace=False, pid_namespace=False)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="namespaces and /proc checks are Linux's")


def block(source: str) -> str:
    return f"```python\n{source}\n```"


def judged(prelude: str, **kwargs):
    """(verdict, seconds) for hostile module-level code followed by a correct solution: only the hostile part can
    make it score 0."""
    started = time.monotonic()
    verdict = judge(block(prelude + "\n" + SOLUTION), SUM_EVENS, **kwargs)
    return verdict, time.monotonic() - started


def assert_refused(verdict, *words: str) -> None:
    assert (verdict.reward, verdict.status) == (0.0, "refused"), verdict.reason
    assert verdict.reason.startswith("refused: "), verdict.reason
    for word in words:
        assert word in verdict.reason, verdict.reason


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is `pgid`."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def gone_soon(find, *args, within_s: float = 2.0) -> list[int]:
    """`find(*args)` polled until it finds nothing or `within_s` passes (SIGKILL takes effect asynchronously: the
    sandbox's init and interpreter may still be exiting when the run returns). What is still found at the end."""
    deadline = time.monotonic() + within_s
    while (found := find(*args)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def processes_in(workdir: str) -> list[int]:
    """Processes whose current directory is (or was, before it was removed) inside `workdir`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(workdir):
                found.append(int(entry))
    return found


# Asks the kernel directly whether this user may create network + PID namespaces (as root plainly, else with a user
# namespace), so that a sandbox that stopped creating them fails its tests instead of skipping them.
KERNEL_PROBE = r"""
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
NEWUSER, NEWPID, NEWNET = 0x10000000, 0x20000000, 0x40000000
errors = []
for flags in ((NEWNET | NEWPID,) if os.geteuid() == 0 else ()) + (NEWUSER | NEWNET | NEWPID,):
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.unshare(flags) == 0 else ctypes.get_errno())
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code == 0:
        print("allowed")
        break
    errors.append(os.strerror(code))
else:
    print("; ".join(errors))
"""


@pytest.fixture(scope="module")
def kernel_namespaces() -> str:
    """ "allowed", or why the kernel refuses network and PID namespaces to this user."""
    done = subprocess.run([sys.executable, "-I", "-c", KERNEL_PROBE], capture_output=True, text=True, timeout=30)
    return done.stdout.strip() or f"the probe failed: {done.stderr[-300:]}"


def skip_without_namespaces(kernel_namespaces: str) -> None:
    if kernel_namespaces != "allowed":
        pytest.skip(f"the kernel refuses network and PID namespaces to this user here ({kernel_namespaces})")


# ----------------------------------------------------------------------------------------------------------------
# What still works
# ----------------------------------------------------------------------------------------------------------------


def test_a_correct_solution_using_the_standard_library_scores_one():
    source = (
        "import bisect, collections, copy, dataclasses, datetime, decimal, fractions, functools, heapq, itertools\n"
        "import json, math, operator, random, re, statistics, string, tempfile, typing\n"
        "def sum_evens(nums):\n"
        "    with tempfile.TemporaryDirectory() as scratch:  # TMPDIR is the sandbox directory\n"
        "        open(scratch + '/note', 'w').write(json.dumps(nums))\n"
        "    evens = [x for x in itertools.chain(nums) if re.fullmatch(r'-?[0-9]+', str(x)) and x % 2 == 0]\n"
        "    assert collections.Counter(evens) is not None and random.random() < 1 and math.isfinite(1.0)\n"
        "    return functools.reduce(operator.add, evens, 0) + int(fractions.Fraction(0))\n"
    )
    verdict = judge(block(source), SUM_EVENS)
    assert (verdict.reward, verdict.status) == (1.0, "passed"), verdict.reason


def test_a_wrong_solution_scores_zero_with_test_failed():
    verdict = judge(block("def sum_evens(nums):\n    return sum(x for x in nums if x % 2)"), SUM_EVENS)
    assert (verdict.reward, verdict.status, verdict.failed_test) == (0.0, "test_failed", 1)
    assert verdict.reason.startswith("test failed: hidden test 1 "), verdict.reason


def test_the_isolation_is_reported_and_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_ISOLATION_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="dsv4train.rewards"):
        first, second = run_python("pass"), run_python("pass")
    assert first.network == second.network and first.network in ("namespace", "blocked")
    records = [r for r in caplog.records if "network" in r.getMessage()]
    assert len(records) == 1, [r.getMessage() for r in records]
    expected = "isolated by a namespace" if first.network == "namespace" else "no network namespace"
    assert expected in records[0].getMessage() and first.isolation in records[0].getMessage()


def test_the_namespaces_apply_wherever_the_kernel_allows_them(kernel_namespaces):
    result = run_python("pass")
    if kernel_namespaces == "allowed":
        assert (result.network, result.pid_namespace) == ("namespace", True), result.isolation
    else:
        assert (result.network, result.pid_namespace) == ("blocked", False)
        assert result.isolation.startswith("the kernel refused every namespace: "), result.isolation


def test_the_fallback_without_namespaces_is_reported_as_blocked():
    result = run_python("print('ran')", policy=NO_NAMESPACES)
    assert (result.network, result.pid_namespace, result.stdout) == ("blocked", False, "ran\n")
    assert result.isolation == "namespaces not requested"


# ----------------------------------------------------------------------------------------------------------------
# Hostile code: one test per case
# ----------------------------------------------------------------------------------------------------------------


def test_a_fork_bomb_is_refused_and_leaves_no_process():
    verdict, elapsed = judged("import os\nwhile True:\n    os.fork()", timeout_s=3.0)
    assert_refused(verdict, "os.fork")
    assert elapsed < 3.0  # refused at the first fork, long before the wall timeout
    assert gone_soon(group_members, verdict.extra["pid"]) == []


@pytest.mark.skipif(
    os.geteuid() == 0,
    reason="as root, Linux does not apply RLIMIT_NPROC (uid 0 is exempt), so only the audit hook stops a fork here: "
    "test_a_fork_bomb_is_refused_and_leaves_no_process covers that",
)
def test_rlimit_nproc_alone_stops_a_fork():
    # the hook's process rule off: one fork attempt, which RLIMIT_NPROC 0 must refuse (no loop: no bomb if it did not)
    source = "import os\nif os.fork() == 0:\n    os._exit(0)"
    verdict, _ = judged(source, policy=SandboxPolicy(allow_processes=True), timeout_s=3.0)
    assert verdict.status == "crashed" and "BlockingIOError" in verdict.reason, verdict.reason


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"timeout_s": 1.0}, "timeout: still running after 1 s (the process group was killed)"),
        ({"timeout_s": 10.0, "limits": SandboxLimits(cpu_s=1)}, "timeout: the CPU time limit was reached (SIGXCPU)"),
    ],
    ids=["wall-clock", "cpu-limit"],
)
def test_an_infinite_loop_ends_at_its_limit(kwargs, reason):
    verdict, elapsed = judged("while True:\n    pass", **kwargs)
    assert (verdict.reward, verdict.status, verdict.reason) == (0.0, "timeout", reason)
    assert elapsed < 8.0  # 1 s of wall or CPU time, plus start-up and clean-up on a loaded machine
    assert gone_soon(group_members, verdict.extra["pid"]) == []


@pytest.mark.parametrize(
    "bomb",
    ["x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(b'1' * 10**7)"],
    ids=["one-huge-allocation", "growing-list"],
)
def test_a_memory_bomb_fails_within_the_address_space(bomb):
    before_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    verdict, elapsed = judged(bomb, timeout_s=10.0)
    assert (verdict.reward, verdict.status) == (0.0, "crashed") and "MemoryError" in verdict.reason, verdict.reason
    assert elapsed < 10.0
    # RUSAGE_CHILDREN's maxrss is the largest of every child this process ever reaped: in a shared pytest worker an
    # earlier test's child (a torchrun worker) may already hold it above 1 GiB. If this sandbox's child grew past
    # the 1 GiB address space it raised the maximum to more than 1 GiB; otherwise the maximum is unchanged or below.
    after_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert after_kib == before_kib or after_kib * 1024 < (1 << 30)


@pytest.fixture
def secret(tmp_path):
    """A file outside the sandbox, with content and a name that appear nowhere else."""
    path = tmp_path / f"name-{secrets.token_hex(4)}.txt"
    path.write_text(f"content-{secrets.token_hex(8)}")
    return path


READS = {
    "etc-passwd": ("print(open('/etc/passwd').read())", "open '/etc/passwd' for reading"),
    "absolute": ("print(open(SECRET).read())", "for reading: outside the sandbox directory"),
    "os-open": ("import os\nprint(os.read(os.open(SECRET, os.O_RDONLY), 100))", "for reading"),
    "open-code": ("import io\nprint(io.open_code(SECRET).read())", "for reading"),
    "relative-climb": ("print(open('../' * 30 + SECRET[1:]).read())", "'..' inside the sandbox directory"),
    "proc-root": ("print(open('/proc/self/root' + SECRET).read())", "for reading: outside the sandbox directory"),
    "symlink": ("import os\nos.symlink(SECRET, 'link')\nprint(open('link').read())", "os.symlink"),
    "listdir": ("import os\nprint(os.listdir(os.path.dirname(SECRET)))", "os.listdir"),
    "pathlib": ("import pathlib\nprint(pathlib.Path(SECRET).read_text())", "for reading: outside"),
}


@pytest.mark.parametrize("case", READS, ids=list(READS))
def test_reading_outside_the_sandbox_is_refused(case, secret):
    source, words = READS[case]
    verdict, _ = judged(f"SECRET = {str(secret)!r}\n{source}")
    assert_refused(verdict, words)
    assert secret.read_text() not in verdict.stdout and secret.name not in verdict.stdout


OUTSIDE = "outside the sandbox directory"
WRITES = {
    "open": ("open(TARGET, 'w').write('x')", OUTSIDE),
    "os-open": ("import os\nos.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))", OUTSIDE),
    "rename": ("import os\nos.rename('solution.py', TARGET)", OUTSIDE),
    "link": ("import os\nos.link('solution.py', TARGET)", OUTSIDE),
    "mkdir": ("import os\nos.mkdir(TARGET)", OUTSIDE),
    "copy": ("import shutil\nshutil.copy('solution.py', TARGET)", OUTSIDE),
    "relative-climb": ("open('../' * 30 + TARGET[1:], 'w').write('x')", "'..'"),
    "mkfifo": ("import os\nos.mkfifo(TARGET)", "os.mkfifo: it can create a FIFO anywhere"),  # no audit event
}


@pytest.mark.parametrize("case", WRITES, ids=list(WRITES))
def test_writing_outside_the_sandbox_is_refused(case, tmp_path):
    target = tmp_path / "written-by-the-candidate"
    source, words = WRITES[case]
    verdict, _ = judged(f"TARGET = {str(target)!r}\n{source}")
    assert_refused(verdict, words)
    assert not os.path.lexists(target)


@pytest.fixture
def listener():
    """A listening socket on the host's 127.0.0.1 that the candidate is told about."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        yield server


def assert_nobody_connected(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()[0].close()


CONNECTS = {
    "socket": "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
    "urllib": "import urllib.request\nurllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=2)",
}


@pytest.mark.parametrize("case", CONNECTS, ids=list(CONNECTS))
def test_a_socket_is_refused_and_the_listener_sees_nothing(case, listener):
    verdict, _ = judged(f"PORT = {listener.getsockname()[1]}\n{CONNECTS[case]}", timeout_s=5.0)
    assert_refused(verdict, "socket.", "no network")
    assert_nobody_connected(listener)


def test_without_namespaces_sockets_are_still_refused(listener):
    """The fallback where the kernel allows no namespace: the audit hook alone."""
    verdict, _ = judged(f"PORT = {listener.getsockname()[1]}\n{CONNECTS['socket']}", policy=NO_NAMESPACES)
    assert verdict.extra["network"] == "blocked"
    assert_refused(verdict, "socket.")
    assert_nobody_connected(listener)


def test_the_network_namespace_alone_stops_a_connection(kernel_namespaces, listener):
    """The hook's socket rule off: the namespace has no route to the host's loopback."""
    skip_without_namespaces(kernel_namespaces)
    source = f"import socket\nsocket.create_connection(('127.0.0.1', {listener.getsockname()[1]}), timeout=2)"
    verdict, _ = judged(source, policy=SandboxPolicy(allow_network=True))
    assert verdict.status == "crashed" and "OSError" in verdict.reason, verdict.reason  # ENETUNREACH
    assert_nobody_connected(listener)


def test_printing_gigabytes_ends_fast_with_truncated_output():
    source = "import sys\nchunk = 'x' * (1 << 20)\nwhile True:\n    sys.stdout.write(chunk)"
    verdict, elapsed = judged(source, timeout_s=30.0, max_output_bytes=1000)
    assert (verdict.reward, verdict.status) == (0.0, "output_limit")
    assert verdict.reason == "output limit: it printed too much (the process group was killed)"
    assert elapsed < 5.0  # 64 MiB drained and the group killed, far before the 30 s wall timeout
    assert verdict.stdout == "x" * 1000 and verdict.output_truncated


# The judging process: a separate interpreter that judges each source (JUDGE_PID and JUDGE_PGID replaced by its own
# pid and process group) and prints the verdicts. If a candidate could signal it, it would not print them.
JUDGE_PROCESS = r"""
import json, os, sys
from dsv4train.data.tasks.code import CodeSample, SandboxLimits, SandboxPolicy, judge
sample = CodeSample("s", "", "f", None, (), ("assert f() == 1",))
settings = json.loads(sys.argv[2])
policy, limits = SandboxPolicy(**settings["policy"]), SandboxLimits(**settings["limits"])
verdicts = []
for source in json.loads(sys.argv[1]):
    source = source.replace("JUDGE_PID", str(os.getpid())).replace("JUDGE_PGID", str(os.getpgid(0)))
    completion = "```python\n" + source + "\ndef f():\n    return 1\n```"
    verdict = judge(completion, sample, timeout_s=5.0, limits=limits, policy=policy)
    verdicts.append([verdict.reward, verdict.status, verdict.reason])
print(json.dumps(verdicts))
"""


def judge_in_a_process(sources: list[str], policy=None, limits=None) -> list[list]:
    settings = json.dumps({"policy": policy or {}, "limits": limits or {}})
    done = subprocess.run(
        [sys.executable, "-c", JUDGE_PROCESS, json.dumps(sources), settings],
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # its own group: a killpg that got through would end it, not pytest
    )
    assert done.returncode == 0, f"the judging process died ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout)


def test_signalling_the_parent_or_the_judge_is_refused_and_both_survive():
    sources = [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal\nos.kill(JUDGE_PID, signal.SIGKILL)",
        "import os, signal\nos.killpg(JUDGE_PGID, signal.SIGKILL)",
    ]
    verdicts = judge_in_a_process(sources)  # returning at all: the judging process survived; so did this one
    for (reward, status, reason), event in zip(verdicts, ["os.kill", "os.kill", "os.killpg"]):
        assert (reward, status) == (0.0, "refused") and reason.startswith(f"refused: {event}("), reason


def test_a_pidfd_signal_is_refused():
    source = "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(JUDGE_PID), signal.SIGKILL)"
    ((reward, status, reason),) = judge_in_a_process([source])
    assert (reward, status) == (0.0, "refused") and reason.startswith("refused: os.pidfd_open"), reason


def test_the_pid_namespace_alone_keeps_the_judge_out_of_reach(kernel_namespaces):
    """The hook's process rule and RLIMIT_NPROC off, so that a program the hook does not watch (`kill`) tries: the
    judging process is outside the namespace, so there is no such process to signal."""
    skip_without_namespaces(kernel_namespaces)
    source = "import subprocess\nsubprocess.run(['kill', '-KILL', 'JUDGE_PID'], check=True, capture_output=True)"
    ((reward, status, reason),) = judge_in_a_process([source], {"allow_processes": True}, {"processes": None})
    assert (reward, status) == (0.0, "crashed") and "CalledProcessError" in reason, reason


CTYPES = {
    "import": "import ctypes\nctypes.CDLL(None).kill(0, 9)",
    "import-_ctypes": "import _ctypes",
    "import-module": "import importlib\nimportlib.import_module('ctypes.util')",
    "renamed-extension": (
        "import _imp, importlib.machinery, os, sys\n"
        "dynload = [p for p in sys.path if p.endswith('lib-dynload')][0]\n"
        "so = [n for n in os.listdir(dynload) if n.startswith('_ctypes.')][0]\n"
        "_imp.create_dynamic(importlib.machinery.ModuleSpec('x._ctypes', None, origin=os.path.join(dynload, so)))"
    ),
}


@pytest.mark.parametrize("case", CTYPES, ids=list(CTYPES))
def test_ctypes_is_refused(case):
    verdict, _ = judged(CTYPES[case])
    assert_refused(verdict, "import ", "ctypes can call any C function")


def test_native_code_from_the_sandbox_directory_is_refused():
    source = (
        "import _imp, importlib.machinery, os, shutil, sys\n"
        "dynload = [p for p in sys.path if p.endswith('lib-dynload')][0]\n"
        "so = sorted(n for n in os.listdir(dynload) if n.startswith('_json.') or n.startswith('_bisect.'))[0]\n"
        "shutil.copy(os.path.join(dynload, so), 'mine.so')\n"
        "_imp.create_dynamic(importlib.machinery.ModuleSpec(so.split('.')[0], None, origin='mine.so'))"
    )
    verdict, _ = judged(source)
    assert_refused(verdict, "native code from outside the Python installation")


PROCESSES = {
    "subprocess-run": ("import subprocess\nsubprocess.run(['sh', '-c', f'echo pwned > {TARGET}'])", "subprocess.Popen"),
    "os-system": ("import os\nos.system(f'echo pwned > {TARGET}')", "os.system"),
    "posix-spawn": (
        "import os\nos.posix_spawn('/bin/sh', ['sh', '-c', f'echo pwned > {TARGET}'], {})",
        "os.posix_spawn",
    ),
    "exec": ("import os\nos.execv('/bin/sh', ['sh', '-c', f'echo pwned > {TARGET}'])", "os.exec"),
    "fork-exec": ("import _posixsubprocess\n_posixsubprocess.fork_exec()", "_posixsubprocess.fork_exec"),
    "pty": ("import pty\npty.fork()", "os.forkpty"),
}


@pytest.mark.parametrize("case", PROCESSES, ids=list(PROCESSES))
def test_starting_a_program_is_refused(case, tmp_path):
    target = tmp_path / "pwned"
    source, event = PROCESSES[case]
    verdict, _ = judged(f"TARGET = {str(target)!r}\n{source}")
    assert_refused(verdict, event, "no new processes")
    assert not target.exists()


# Attempts to talk the hook out of a rule: each must still be refused, by the rule named.
FOOLING = {
    "patched-os-path-and-builtins": (
        "import builtins, os, posixpath\n"
        "os.path.realpath = posixpath.realpath = lambda p, **k: '/tmp/nothing'\n"
        "os.lstat = os.stat = lambda p: (_ for _ in ()).throw(FileNotFoundError())\n"
        "builtins.len, builtins.repr, builtins.isinstance = (lambda x: 0), (lambda x: ''), (lambda *a: True)\n"
        "print(open('/etc/passwd').read())",
        "open '/etc/passwd' for reading",
    ),
    "patched-prelude-globals": (
        "import __main__\n__main__.REFUSED_MODULES = frozenset()\nimport _posixsubprocess, sys\n"
        "del sys.modules['_posixsubprocess']\nimport _posixsubprocess",
        "import _posixsubprocess",
    ),
    "lying-str-subclass": (
        "class P(str):\n"
        "    def startswith(self, *a): return True\n"
        "    def __eq__(self, other): return True\n"
        "    __hash__ = str.__hash__\n"
        "print(open(P('/etc/passwd')).read())",
        "open '/etc/passwd' for reading",
    ),
    "fspath-that-changes-its-answer": (
        "class Flip:\n"
        "    calls = 0\n"
        "    def __fspath__(self):\n"
        "        Flip.calls += 1\n"
        "        return '/etc/passwd' if Flip.calls == 1 else 'solution.py'\n"
        "print(open(Flip()).read())",
        "open '/etc/passwd' for reading",  # the event carries os.fspath's answer, the one the kernel gets
    ),
    "settrace": ("import sys\nsys.settrace(lambda *a: None)", "sys.settrace"),
    "gc-walk": ("import gc\ngc.get_objects()", "gc.get_objects"),
    "raise-a-limit": ("import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1000, 1000))", "resource.setrlimit"),
    "reimport-posix": ("import sys\ndel sys.modules['posix']\nimport posix", "import posix"),
    "leave-the-group": ("import os\nos.setsid()", "os.setsid"),
    "rebuild-posix": (
        "import _imp, sys\nposix = _imp.create_builtin(sys.modules['posix'].__spec__)\nposix.pidfd_open(1)",
        "_imp.create_builtin",
    ),
    "subinterpreter": ("import _xxsubinterpreters as s\ns.run_string(s.create(), 'import os')", "import _xxsub"),
    "capi-test-module": ("import _testcapi", "import _testcapi"),
    "history-file": ("import readline\nreadline.write_history_file('/tmp/history')", "import readline"),
}


@pytest.mark.parametrize("case", FOOLING, ids=list(FOOLING))
def test_the_audit_hook_cannot_be_talked_out_of_a_rule(case):
    source, words = FOOLING[case]
    verdict, _ = judged(source)
    assert_refused(verdict, words)


def test_a_refusal_scores_zero_even_when_the_candidate_catches_it():
    verdict, _ = judged("try:\n    open('/etc/passwd')\nexcept PermissionError:\n    pass")
    assert_refused(verdict, "open '/etc/passwd'")


def test_reading_back_takes_regular_files_only_and_never_blocks(tmp_path):
    """What a run left under a result's name may be anything a process there could make: a FIFO (opening it for
    reading would wait for a writer forever), a symlink, a file too large."""
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big").write_bytes(b"x" * 101)
    (tmp_path / "link").symlink_to(tmp_path / "big")
    (tmp_path / "ok").write_bytes(b"{}")
    started = time.monotonic()
    read = {name: sandbox._read_regular_file(tmp_path / name, 100) for name in ("fifo", "big", "link", "ok", "none")}
    assert read == {"fifo": None, "big": None, "link": None, "ok": b"{}", "none": None}
    assert time.monotonic() - started < 1.0


# ----------------------------------------------------------------------------------------------------------------
# Cleanup: every child, every directory
# ----------------------------------------------------------------------------------------------------------------

LINGERING_CHILD = "import os, time\nif os.fork() == 0:\n{escape}    time.sleep(30)\n    os._exit(0)\ntime.sleep(0.2)\n"


@pytest.mark.parametrize("ending", ["exits", "times-out"])
def test_the_group_kill_ends_what_the_runner_started(ending):
    """Without the PID namespace (which would end them anyway) and with forks allowed: the group kill alone."""
    runner = LINGERING_CHILD.format(escape="") + ("while True:\n    pass\n" if ending == "times-out" else "")
    result = run_python(runner, policy=SandboxPolicy(allow_processes=True, pid_namespace=False), timeout_s=1.5)
    try:
        assert result.timed_out == (ending == "times-out")
        assert gone_soon(processes_in, result.workdir) == []
    finally:
        for pid in processes_in(result.workdir):
            os.kill(pid, 9)


def test_the_pid_namespace_ends_a_child_that_left_the_group(kernel_namespaces):
    """A child that called setsid() escapes the group kill; init's exit takes it down with the namespace."""
    skip_without_namespaces(kernel_namespaces)
    runner = LINGERING_CHILD.format(escape="    os.setsid()\n")
    result = run_python(runner, policy=SandboxPolicy(allow_processes=True), timeout_s=3.0)
    try:
        assert not result.timed_out and result.returncode == 0, result.stderr
        assert gone_soon(processes_in, result.workdir) == []
    finally:
        for pid in processes_in(result.workdir):
            os.kill(pid, 9)


def test_an_interrupted_parent_still_kills_the_group_and_removes_the_directory(monkeypatch):
    """A KeyboardInterrupt (or any exception) in the judging process while the sandboxed code runs."""
    started = []
    spawn = sandbox._spawn

    def recording_spawn(workdir, want):
        proc, report_r = spawn(workdir, want)
        started.append((proc.pid, workdir))
        return proc, report_r

    def interrupted(proc, timeout_s):
        time.sleep(0.3)  # the sandboxed interpreter is up and sleeping
        raise KeyboardInterrupt

    monkeypatch.setattr(sandbox, "_spawn", recording_spawn)
    monkeypatch.setattr(sandbox, "_exited_without_reaping", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_python("import time\ntime.sleep(30)", timeout_s=30.0)
    ((pgid, workdir),) = started
    assert gone_soon(group_members, pgid) == [] and not os.path.lexists(workdir)


def test_no_directory_is_left_behind():
    ended = [
        run_python("open('a', 'w').write('x')"),
        run_python("while True:\n    pass", timeout_s=0.5),
        run_python("import os\nos.mkfifo('fifo')\nos.makedirs('a/b/c')\nos.chmod('a', 0)"),
    ]
    assert [os.path.lexists(r.workdir) for r in ended] == [False, False, False]


def test_a_tree_too_deep_for_rmtree_is_still_removed(tmp_path):
    top = tmp_path / "sandbox-like"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(1100):  # deeper than shutil.rmtree's recursion (the default limit is 1000)
        os.mkdir("d", dir_fd=fd)
        fd, parent = os.open("d", os.O_RDONLY, dir_fd=fd), fd
        os.close(parent)
    os.close(fd)
    (top / "d").chmod(0)
    sandbox._remove_tree(str(top))
    assert not top.exists()


# ----------------------------------------------------------------------------------------------------------------
# safe_reward
# ----------------------------------------------------------------------------------------------------------------


def test_safe_reward_passes_a_number_or_a_pair_through():
    assert safe_reward(lambda: 0.5, timeout_s=5) == (0.5, "reward function returned 0.5")
    assert safe_reward(lambda a, b: (1.0, f"{a}+{b}"), 1, b=2, timeout_s=5) == (1.0, "1+2")
    assert safe_reward(lambda: True, timeout_s=5) == (1.0, "reward function returned 1")
    np = pytest.importorskip("numpy")
    assert safe_reward(lambda: np.float32(0.25), timeout_s=5) == (0.25, "reward function returned 0.25")


def test_safe_reward_turns_an_exception_into_zero_and_logs_the_traceback(caplog):
    def broken_reward(text):
        raise ValueError(f"cannot parse {text!r}")

    with caplog.at_level(logging.ERROR, logger="dsv4train.rewards"):
        assert safe_reward(broken_reward, "abc", timeout_s=5) == (
            0.0,
            "reward function raised ValueError: cannot parse 'abc'",
        )
    (record,) = caplog.records
    assert record.exc_info is not None and "broken_reward" in caplog.text and "Traceback" in caplog.text
    assert safe_reward(lambda: sys.exit(3), timeout_s=5) == (0.0, "reward function raised SystemExit: 3")


def test_safe_reward_gives_up_on_a_function_that_does_not_return(caplog):
    release = threading.Event()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="dsv4train.rewards"):
        outcome = safe_reward(lambda: release.wait(30) and 1.0, timeout_s=0.2)
    elapsed = time.monotonic() - started
    release.set()  # let the worker thread finish
    assert outcome == (0.0, "reward function timed out after 0.2 s")
    assert elapsed < 2.0  # 0.2 s plus thread start on a loaded machine
    assert "timed out after 0.2 s" in caplog.text


@pytest.mark.parametrize(
    "value, reason",
    [
        (math.nan, "reward function returned nan, not a finite number"),
        (-math.inf, "reward function returned -inf, not a finite number"),
        (None, "reward function returned None, not a number"),
        ("1.0", "reward function returned '1.0', not a number"),
        ([1.0, 0.0], "reward function returned [1.0, 0.0], not a number"),
        ((math.nan, "looked fine"), "reward function returned nan, not a finite number"),
        ((1.0, 5), "reward function returned a reason that is not a string: 5"),
    ],
    ids=["nan", "inf", "none", "string", "list", "nan-in-pair", "bad-reason"],
)
def test_safe_reward_rejects_what_is_not_a_finite_reward(value, reason):
    assert safe_reward(lambda: value, timeout_s=5) == (0.0, reason)
