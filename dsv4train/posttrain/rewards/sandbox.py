"""Run untrusted Python in a sandbox: the contained, kill-able path that code rewards take (`run_python`).

`run_python(runner, files, stdin, ...)` writes `files` into a fresh temporary directory, starts a fresh interpreter
there behind the layers below, and runs `runner` (Python source, e.g. the code judge's test harness) as its main
program. It returns a `SandboxResult`: the exit status, whether the wall timeout or the output limit ended the run,
the captured output, the first action the sandbox refused, which isolation applied, and the files the runner left.
Each layer stands on its own, so that a gap in one is covered by another:

1. Session and directory. The child starts a new session (`start_new_session`): its own process group, which one
   `killpg` ends. It runs in a directory made for it and removed afterwards, with an environment of PATH, a UTF-8
   locale and TMPDIR (the sandbox directory) only, under `python -I -S -B`: no user site, no PYTHON* variables, no
   site-packages (only the standard library imports), no .pyc files written. Stops: leftover files, secrets in the
   parent's environment, the parent's installed packages. Stops nothing done on purpose.
2. Namespaces (Linux). A small bootstrap interpreter calls `unshare(CLONE_NEWNET | CLONE_NEWPID)` through ctypes (as
   root; otherwise together with CLONE_NEWUSER, mapping only the user's own uid and gid), forks an init process (PID 1
   of the new PID namespace), and init starts the sandboxed interpreter with `exec`: the interpreter that runs the
   untrusted code never loads ctypes. The new network namespace has one loopback device, down: no connection can be
   made to the host's 127.0.0.1 or anywhere else, and `network` is "namespace". The PID namespace hides every process
   outside it, so no signal, pidfd or priority change reaches the judge, the trainer or anything else, whatever
   function is used; when init exits the kernel kills all that is left inside. Where the kernel refuses (neither
   CAP_SYS_ADMIN nor unprivileged user namespaces, as in some containers), the run goes on without them: `network` is
   "blocked", sockets are then refused by the audit hook (4) alone, and other processes are protected by its signal
   rule alone. Which one applied is in every result and logged once per process (`isolation` says how, or why not).
   Does not stop: Unix sockets bound to a path (a network namespace does not cover the file system; the hook refuses
   creating any socket), file access (there is no mount namespace).
3. Resource limits, soft and hard, set by the sandboxed interpreter on itself before anything else (`SandboxLimits`):
   CPU seconds (SIGXCPU, SIGKILL a second later), address space, file size, open files, processes (RLIMIT_NPROC 0:
   no fork, no thread), no core files. Stops infinite loops, memory bombs, disk fills, descriptor leaks and, for users
   other than root, fork bombs. Does not stop: forks by root (Linux does not apply RLIMIT_NPROC to uid 0), memory the
   address space does not count (no cgroup). Raising a limit again is refused by the hook (root could).
4. A CPython audit hook (`sys.addaudithook`, which cannot be removed), installed before the runner is compiled. It
   refuses, by raising PermissionError in the sandboxed code and reporting the first refusal to the parent:
   - sockets: every `socket.*` event (creation, connect, bind, name lookups);
   - new processes: `os.fork`, `os.forkpty`, `os.posix_spawn`, `os.spawn*`, `os.exec*`, `os.system`,
     `subprocess.Popen` (and `_posixsubprocess.fork_exec`, which has no event, is replaced by a refusing stub);
   - signals: `os.kill` of any pid but its own, every `os.killpg`;
   - ctypes: every `ctypes.*` event and the import of `ctypes`/`_ctypes` (under any package name); native extension
     modules from outside the Python installation (a library written into the sandbox would run unchecked);
   - files: `open` (builtin, `os.open`, `io.open_code`) for reading outside the sandbox directory and the standard
     library, or for writing outside the sandbox directory (`/dev/null` is allowed, `/dev/urandom` can be read);
     `os.listdir`/`os.scandir` outside those; `os.chdir` out of the sandbox directory; `os.mkdir`, `os.remove`,
     `os.rename`, `os.link`, `os.chmod`, `os.chown`, `os.truncate`, `os.utime` and the xattr calls outside it; every
     `os.symlink`; directories outside the sandbox opened as descriptors; `..` inside the sandbox directory (a
     concurrent rename could move it, and a `dir_fd`, which the `open` event does not show, could start it elsewhere).
     The events carry the path after `os.fspath`, as the kernel gets it; it is resolved as the kernel does, symlinks
     included, with functions bound when the hook was made, so patching `os.path` or builtins changes nothing it
     calls; anything but str, bytes or a descriptor number is refused;
   - what would disarm it or the limits: `resource.setrlimit`/`prlimit`, `sys.settrace`/`setprofile`,
     `sys._current_frames`, `gc.get_objects`/`get_referrers`/`get_referents`, `fcntl.ioctl` (e.g. an immutable flag
     that would keep the directory from being removed), a new interpreter (`cpython.PyInterpreterState_New`: a
     subinterpreter has no audit hook);
   - C modules that reach files, devices, sockets or a new interpreter below the audited functions (`readline`'s
     history files, `spwd`, `nis`, `syslog`, `_sqlite3`, `_dbm`, `_tkinter`, `_posixshmem`, `_multiprocessing`,
     `_xxsubinterpreters`, CPython's `_test*` modules): their import is refused;
   - functions with no audit event in Python 3.11 that reach other processes, devices or paths (`os.setsid`,
     `os.setpgid`, `os.setpgrp`, `os.pidfd_open`, `signal.pidfd_send_signal`, `os.setpriority`, `os.sched_set*`,
     `os.chroot`, `os.mknod`, `os.mkfifo`, `_posixsubprocess.fork_exec`) are replaced by refusing stubs. So that no
     fresh `posix` or `_signal` brings the originals back, every built-in module is imported first and
     `_imp.create_builtin`/`exec_builtin` are stubbed too, and re-importing those modules or `_imp` is refused.
   Stops what Python's own functions do. Does not stop code that corrupts the interpreter's memory (crafted bytecode
   through `marshal`): CPython is not a security boundary, which is why layers 2, 3, 5 and 6 are the kernel's and the
   parent's. Threads have no audit event in 3.11: for root they are allowed (RLIMIT_NPROC stops them otherwise).
5. Output. Threads drain stdout and stderr (the pipes never fill, so the child never blocks on them), keeping the
   first `max_output_bytes` of each; past `max_total_output_bytes` of both together the group is killed, so printing
   gigabytes ends within a fraction of a second (`output_exceeded`) instead of at the wall timeout.
6. Wall clock and cleanup. After `timeout_s` the whole process group is killed, and after a normal exit too, so
   nothing the runner started outlives it (SIGKILL takes effect within milliseconds; only the group's leader is
   awaited). The exit is awaited without reaping, so the group id cannot be reused before that kill; an exception
   in the parent (KeyboardInterrupt included) kills the group too. The directory is then removed (with
   `chmod -R u+rwx` and `rm -rf` as a fallback, e.g. for a tree deeper than `shutil.rmtree` recurses); a failure is
   logged with its path.

What remains where a layer does not hold:
- A process that left the process group survives the group kill unless the PID namespace holds it (then the kernel
  ends it when init exits). Leaving needs a new process, which the hook refuses; with `allow_processes` (tests only)
  it is possible, and the output readers then stop waiting after 2 s.
- Without namespaces, the hook alone keeps sockets closed and other processes unsignalled: code that gets past it
  (memory corruption, see 4) can then signal any process the user may signal, pidfds included.
- As root, files are protected by the hook alone (no mount namespace, no privilege drop), and forks too.
- What has no audit event is not refused: `os.stat`, `os.access` and `os.readlink` tell whether any path exists and
  its metadata; `pwd` and `grp` read the account database through libc.
- A judging process that is itself killed leaves its sandbox directory behind.
- A candidate can read and rewrite anything inside its own interpreter: the harness's frames, globals and result.
  The sandbox contains the damage; it does not make a hostile candidate's score trustworthy.
- No cgroup: memory is bounded per process by its address space; CPU by its own limit and the wall timeout.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

_LOG = logging.getLogger("dsv4train.rewards")

Network = Literal["namespace", "blocked"]
UserNamespace = Literal["auto", "always", "never"]

REPORT_CAP_BYTES = 65536  # the side channel carries a few short lines; more is the candidate writing to it
READER_JOIN_S = 2.0  # how long to wait for the output readers once the group is dead (longer: an escaped process)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-process limits the sandboxed interpreter sets on itself, hard limits included, so that it cannot raise
    them (the CPU hard limit is one second above the soft one, which sends SIGXCPU first). None leaves a limit as
    inherited. `cpu_s=None` means: the wall timeout rounded up, plus one second."""

    cpu_s: int | None = None
    address_space_bytes: int | None = 1 << 30  # 1 GiB: far above a small function, stops a runaway allocation
    file_size_bytes: int | None = 16 << 20
    processes: int | None = 0  # no fork or thread at all (RLIMIT_NPROC counts the user's tasks; root ignores it)
    open_files: int | None = 64  # the harness needs a handful; stops a descriptor leak from exhausting the host's


@dataclass(frozen=True)
class SandboxPolicy:
    """What the sandbox allows beyond computing in its own directory. The defaults are the hardened ones; the
    switches exist to test one layer without another, and for trusted callers.

    `allow_network` and `allow_processes` switch off the hook's socket and process rules (the namespaces and
    RLIMIT_NPROC still apply). A program started with `allow_processes` that is not this interpreter is not under the
    hook at all. `readable_paths`/`writable_paths` add directories (absolute, not "/") to what `open` may read or
    write. `network_namespace`/`pid_namespace` say whether to try those namespaces; `user_namespace` whether to add
    CLONE_NEWUSER: "auto" (only when not root, or as root when the plain call fails), "always" or "never"."""

    allow_network: bool = False
    allow_processes: bool = False
    readable_paths: tuple[str, ...] = ()
    writable_paths: tuple[str, ...] = ()
    network_namespace: bool = True
    pid_namespace: bool = True
    user_namespace: UserNamespace = "auto"

    def __post_init__(self):
        for path in (*self.readable_paths, *self.writable_paths):
            if not os.path.isabs(path) or os.path.realpath(path) == "/":
                raise ValueError(f"sandbox paths must be absolute directories other than '/', got {path!r}")
        if self.user_namespace not in ("auto", "always", "never"):
            raise ValueError(f"user_namespace must be 'auto', 'always' or 'never', got {self.user_namespace!r}")


@dataclass(frozen=True)
class SandboxResult:
    """What one sandboxed run did. `returncode` follows subprocess: negative for the signal that ended the sandboxed
    interpreter. `refused` is the first action the audit hook refused (e.g. "os.fork: ..."), None when none was.
    `files` holds the requested files the run left in its directory, when they are regular files under the size cap.
    `pid` is the process group the run had and `workdir` its directory; both are gone when this is returned."""

    returncode: int
    timed_out: bool
    output_exceeded: bool
    refused: str | None
    stdout: str
    stderr: str
    output_truncated: bool
    network: Network
    pid_namespace: bool
    isolation: str
    files: dict[str, bytes] = field(default_factory=dict)
    pid: int = 0
    workdir: str = ""
    wall_s: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# The child side: two programs, run with `python -I -S -B -c`
# ----------------------------------------------------------------------------------------------------------------

# The bootstrap: namespaces (through ctypes), then init and the sandboxed interpreter. argv: report fd, what to try
# (JSON), the prelude's source. It writes one line `sandbox {json}` to the report pipe; init adds `status N` (the
# sandboxed interpreter's raw wait status) when it has ended, since init itself cannot die of the same signal.
_BOOTSTRAP = r"""
import json, os, sys

CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000


def unshare(flags):
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(flags) == 0:
            return None
        return os.strerror(ctypes.get_errno())
    except Exception as exc:  # no libc unshare (not Linux), no ctypes
        return f"{type(exc).__name__}: {exc}"


def map_own_ids(uid, gid):
    # an unprivileged user may map only its own ids (read before unshare: inside, unmapped ids read as 65534), and
    # must give up setgroups first
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)


def attempts(want):
    wanted = (CLONE_NEWNET if want["net"] else 0) | (CLONE_NEWPID if want["pid"] else 0)
    if not wanted or not sys.platform.startswith("linux"):
        return []
    fallbacks = [wanted] + ([CLONE_NEWNET] if wanted == CLONE_NEWNET | CLONE_NEWPID else [])
    user = want["user"]
    tries = []
    for flags in fallbacks:
        if user == "never" or (user == "auto" and os.geteuid() == 0):
            tries.append(flags)
        if user == "always" or (user == "auto"):
            tries.append(flags | CLONE_NEWUSER)
    return tries


def describe(flags):
    known = (("NEWUSER", CLONE_NEWUSER), ("NEWNET", CLONE_NEWNET), ("NEWPID", CLONE_NEWPID))
    return "unshare(" + "|".join("CLONE_" + name for name, flag in known if flags & flag) + ")"


def run_init(command, report):
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    child = os.fork()
    if child == 0:
        try:
            os.execv(command[0], command)
        finally:
            os._exit(127)
    while True:
        pid, status = os.waitpid(-1, 0)  # also reaps what the sandboxed process leaves behind
        if pid == child:
            break
    os.write(report, f"\nstatus {status}\n".encode())
    os._exit(0)


def main():
    report, want, prelude = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    command = [sys.executable, "-I", "-S", "-B", "-c", prelude, sys.argv[1]]
    applied, errors = 0, []
    uid, gid = os.getuid(), os.getgid()
    for flags in attempts(want):
        error = unshare(flags)
        if error is None:
            applied = flags
            if flags & CLONE_NEWUSER:
                map_own_ids(uid, gid)
            break
        errors.append(f"{describe(flags)}: {error}")
    if applied:
        how = describe(applied)
    elif errors:
        how = "the kernel refused every namespace: " + "; ".join(errors)
    else:
        how = "namespaces not requested" if sys.platform.startswith("linux") else f"no namespaces on {sys.platform}"
    info = {"network": "namespace" if applied & CLONE_NEWNET else "blocked", "pid": bool(applied & CLONE_NEWPID)}
    info["how"] = how
    os.write(report, ("sandbox " + json.dumps(info) + "\n").encode())
    if not applied & CLONE_NEWPID:
        os.execv(command[0], command)
    init = os.fork()  # the first child after unshare(CLONE_NEWPID) is PID 1 of the new namespace
    if init == 0:
        run_init(command, report)
    _, status = os.waitpid(init, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)


main()
"""

# The prelude: limits, stubs, the audit hook, then the runner. argv: the report fd. stdin: one JSON header line
# (limits, policy, runner source), then whatever the runner reads.
_PRELUDE = r"""
import json, os, resource, sys
from _stat import S_ISDIR, S_ISLNK

UNAUDITED_OS = {"pidfd_open": "it can signal other processes", "setpriority": "it can slow other processes down",
                "sched_setaffinity": "it can reschedule other processes", "sched_setscheduler": "it can reschedule "
                "other processes", "sched_setparam": "it can reschedule other processes", "chroot": "it would change "
                "what paths mean to the audit hook", "mknod": "it can create device nodes", "mkfifo": "it can "
                "create a FIFO anywhere, unseen by the audit hook", "setns": "it can enter other namespaces",
                "unshare": "it can leave the sandbox's namespaces"}
UNAUDITED_OS_PROCESSES = {"setsid": "it would leave the process group the sandbox kills",
                          "setpgid": "it would leave the process group the sandbox kills",
                          "setpgrp": "it would leave the process group the sandbox kills"}
PROCESS_EVENTS = frozenset(("os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                            "subprocess.Popen", "os.startfile"))
DISARMING_EVENTS = frozenset(("resource.setrlimit", "resource.prlimit", "sys.settrace", "sys.setprofile",
                              "sys._current_frames", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
                              "fcntl.ioctl"))
# Modules that must not load (again), and why: the stubbed ones and `_imp` (which would rebuild them), C modules that
# reach files, devices, sockets or a new interpreter below Python's audited functions, CPython's test modules.
BRINGS_BACK = "it would bring back functions the sandbox replaced"
BELOW_AUDIT = "it opens files, devices or sockets without the audited functions"
REFUSED_MODULES = {
    **dict.fromkeys(("posix", "_signal", "_posixsubprocess", "_imp"), BRINGS_BACK),
    **dict.fromkeys(("_sqlite3", "_dbm", "_gdbm", "readline", "_curses", "_curses_panel", "ossaudiodev", "spwd",
                     "nis", "syslog", "_tkinter", "_posixshmem", "_multiprocessing"), BELOW_AUDIT),
    **dict.fromkeys(("_xxsubinterpreters", "_xxinterpchannels", "_interpreters", "_interpchannels",
                     "_interpqueues"), "a new interpreter would run without the audit hook"),
    **dict.fromkeys(("_ctypes_test", "_xxtestfuzz"), "a CPython test module, which can corrupt memory"),
}
MODIFYING_EVENTS = {"os.mkdir": (0,), "os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1),
                    "os.chmod": (0,), "os.lchmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,),
                    "os.setxattr": (0,), "os.removexattr": (0,), "os.chflags": (0,), "os.lchflags": (0,)}
LISTING_EVENTS = {"os.listdir": (0,), "os.scandir": (0,), "os.getxattr": (0,), "os.listxattr": (0,)}


def set_limit(name, value):
    if value is None or not hasattr(resource, name):
        return
    which = getattr(resource, name)
    _, hard = resource.getrlimit(which)
    soft = value if hard == resource.RLIM_INFINITY else min(value, hard)
    # CPU: the hard limit one second later, so that SIGXCPU (reported as a timeout) comes before SIGKILL
    new_hard = soft + 1 if name == "RLIMIT_CPU" else soft
    resource.setrlimit(which, (soft, new_hard if hard == resource.RLIM_INFINITY else min(new_hard, hard)))


def refusing_stub(label, audit=sys.audit, error=PermissionError):
    def refused(*args, **kwargs):
        audit("dsv4train.sandbox.refuse", label)  # the hook records and raises
        raise error("refused by the sandbox: " + label)
    refused.__name__ = label.rpartition(".")[2]
    return refused


def seal_builtin_modules():
    # Every built-in module is imported now, and `_imp` can then build no more of them: a fresh `posix` or `_signal`
    # would bring back the originals of the stubbed functions.
    import _imp
    for name in sys.builtin_module_names:
        __import__(name)
    why = "it would rebuild a module the sandbox changed"
    _imp.create_builtin = refusing_stub(f"_imp.create_builtin: {why}")
    _imp.exec_builtin = refusing_stub(f"_imp.exec_builtin: {why}")


def replace_unaudited(allow_processes):
    # Functions that reach other processes or devices with no audit event (Python 3.11); os and posix share them.
    import _posixsubprocess, _signal, signal
    names = dict(UNAUDITED_OS, **({} if allow_processes else UNAUDITED_OS_PROCESSES))
    for module in (os, sys.modules["posix"]):
        for name, why in names.items():
            if hasattr(module, name):
                setattr(module, name, refusing_stub(f"os.{name}: {why}"))
    for module in (signal, _signal):
        if hasattr(module, "pidfd_send_signal"):
            module.pidfd_send_signal = refusing_stub("signal.pidfd_send_signal: it can signal other processes")
    if not allow_processes:
        _posixsubprocess.fork_exec = refusing_stub("_posixsubprocess.fork_exec: no new processes in the sandbox")


def make_hook(sandbox, writable, readable, code_roots, allow_network, allow_processes, report_fd):
    # Every function the hook calls is bound here, once: replacing os.lstat, os.path, builtins or a str subclass's
    # methods later changes nothing it does. Values from the audited call are copied into exact str/int first and
    # never formatted, compared or hashed before that (a subclass's __eq__ or __repr__ would run inside the hook).
    lstat, stat_, readlink, getcwd, write = os.lstat, os.stat, os.readlink, os.getcwd, os.write
    is_dir, is_link = S_ISDIR, S_ISLNK
    str_t, bytes_t, int_t, type_of, subclass = str, bytes, int, type, issubclass
    str_join, str_split, str_starts, str_encode = str.join, str.split, str.startswith, str.encode
    str_rpartition = str.rpartition
    bytes_join, bytes_decode, int_repr = bytes.join, bytes.decode, int.__repr__
    Refused, Error, NotFound = PermissionError, BaseException, OSError
    len_, repr_ = len, repr
    refused_modules = dict(REFUSED_MODULES)  # a copy: the prelude's globals can be rewritten
    own_pid = os.getpid()
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    roots_w = tuple(writable)
    roots_r = tuple(readable)
    roots_code = tuple(code_roots)
    special_rw = ("/dev/null",)
    special_r = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
    reported = []

    def refuse(description):
        if not reported:
            reported.append(description)
            try:
                write(report_fd, str_encode("\nrefused " + description + "\n", "utf-8", "replace"))
            except Error:
                pass  # the candidate closed the report pipe: the refusal still stands
        raise Refused("refused by the sandbox: " + description)

    def as_text(value):
        kind = type_of(value)
        if subclass(kind, str_t):
            return str_join("", (value,))  # an exact str with the same characters
        if subclass(kind, bytes_t):
            return bytes_decode(bytes_join(b"", (value,)), "utf-8", "surrogateescape")
        return None

    def as_int(value):
        return int_repr(value) if subclass(type_of(value), int_t) else "?"

    def short(text):
        return repr_(text if len_(text) <= 200 else text[:200] + "...")

    def within(path, roots):
        for root in roots:
            if path == root or str_starts(path, root + "/"):
                return True
        return False

    def resolve(path):
        # (the absolute path the kernel would reach, None) or (None, why it is refused)
        if "\x00" in path:
            return None, "a NUL character in the path"
        if not str_starts(path, "/"):
            path = getcwd() + "/" + path
        todo = str_split(path, "/")
        todo.reverse()
        parts, hops = [], 0
        while todo:
            name = todo.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                if within("/" + str_join("/", parts), roots_w):
                    return None, "'..' inside the sandbox directory"
                if parts:
                    parts.pop()
                continue
            parts.append(name)
            here = "/" + str_join("/", parts)
            try:
                mode = lstat(here).st_mode
            except NotFound:
                continue  # does not exist (yet): the rest is taken as written
            if is_link(mode):
                hops += 1
                if hops > 40:
                    return None, "too many symbolic links"
                target = readlink(here)
                parts.pop()
                if str_starts(target, "/"):
                    parts = []
                more = str_split(target, "/")
                more.reverse()
                todo.extend(more)
        return "/" + str_join("/", parts), None

    def is_directory(path):
        try:
            return is_dir(stat_(path).st_mode)
        except NotFound:
            return False

    def checked_path(value, what):
        # (resolved path, None), or (None, why): fds and None (the current directory) are (None, None)
        if value is None or subclass(type_of(value), int_t):
            return None, None
        text = as_text(value)
        if text is None:
            return None, f"{what} of a path that is not str, bytes or a descriptor"
        resolved, why = resolve(text)
        if resolved is None:
            return None, f"{what} {short(text)}: {why}"
        return resolved, None

    def check_open(args):
        path, why = checked_path(args[0], "open")
        if why is not None or path is None:
            return why
        flags = args[2]
        writing = subclass(type_of(flags), int_t) and int_t.__and__(flags, write_flags) != 0
        if path in special_rw or within(path, roots_w):
            return None
        if writing:
            return f"open {short(path)} for writing: outside the sandbox directory"
        if path in special_r:
            return None
        if within(path, roots_r):
            return f"open {short(path)}: a directory outside the sandbox" if is_directory(path) else None
        return f"open {short(path)} for reading: outside the sandbox directory and the standard library"

    def check_paths(event, indexes, roots, outside):
        def check(args):
            for index in indexes:
                path, why = checked_path(args[index], event)
                if why is not None:
                    return why
                if path is not None and not within(path, roots):
                    return f"{event} {short(path)}: {outside}"
            return None
        return check

    def check_import(args):
        name = as_text(args[0]) or ""
        last = str_rpartition(name, ".")[2]  # `_imp.create_dynamic` loads _ctypes as "anything._ctypes" too
        if last in ("ctypes", "_ctypes"):
            return f"import {name}: ctypes can call any C function, past every other rule"
        if str_starts(last, "_test"):
            return f"import {name}: a CPython test module, which can corrupt memory"
        why = refused_modules.get(last)
        if why is not None:
            return f"import {name}: {why}"
        filename = as_text(args[1]) if len_(args) > 1 else None
        if filename is not None:  # a native extension module being loaded
            path, why = resolve(filename)
            if path is None or not within(path, roots_code) or within(path, roots_w):
                return f"import {name} from {short(filename)}: native code from outside the Python installation"
        return None

    def check_kill(args):
        if type_of(args[0]) is int_t and args[0] == own_pid:
            return None
        pid, sig = as_int(args[0]), as_int(args[1])
        return f"os.kill(pid {pid}, signal {sig}): only the sandboxed process itself may be signalled"

    def refuse_always(reason):
        return lambda args: reason

    def check_killpg(args):
        return f"os.killpg({as_int(args[0])}, {as_int(args[1])}): process groups may not be signalled"

    checks = {
        "open": check_open,
        "import": check_import,
        "os.kill": check_kill,
        "os.killpg": check_killpg,
        "os.symlink": refuse_always("os.symlink: a link could point outside the sandbox directory"),
        "os.chdir": check_paths("os.chdir", (0,), roots_w, "outside the sandbox directory"),
        "dsv4train.sandbox.refuse": lambda args: as_text(args[0]) or "a refused function",
    }
    for event, indexes in MODIFYING_EVENTS.items():
        checks[event] = check_paths(event, indexes, roots_w, "outside the sandbox directory")
    outside_readable = "outside the sandbox directory and the standard library"
    for event, indexes in LISTING_EVENTS.items():
        checks[event] = check_paths(event, indexes, roots_r + roots_w, outside_readable)
    for event in DISARMING_EVENTS:
        checks[event] = refuse_always(f"{event}: it would disarm the sandbox's limits or audit hook")
    new_interpreter = "cpython.PyInterpreterState_New"
    checks[new_interpreter] = refuse_always(f"{new_interpreter}: a new interpreter would run without the audit hook")
    if not allow_processes:
        for event in PROCESS_EVENTS:
            checks[event] = refuse_always(f"{event}: no new processes in the sandbox")

    def hook(event, args):
        check = checks.get(event)
        if check is None:
            if str_starts(event, "ctypes."):
                refuse(f"{event}: ctypes can call any C function, past every other rule")
            if str_starts(event, "socket.") and not allow_network:
                refuse(f"{event}: the sandbox has no network")
            return
        try:
            why = check(args)
        except Error:
            why = f"{event}: the sandbox could not check its arguments"  # fail closed
        if why is not None:
            refuse(why)

    return hook


def main():
    report_fd = int(sys.argv[1])
    header = json.loads(sys.stdin.readline())
    for name, value in header["limits"].items():
        set_limit(name, value)
    policy = header["policy"]
    realpath = os.path.realpath
    sandbox = realpath(os.getcwd())
    writable = [sandbox] + [realpath(p) for p in policy["writable_paths"]]
    code_roots = [realpath(p) for p in sys.path if p]  # -S: the standard library and its extension modules only
    readable = code_roots + [realpath(p) for p in policy["readable_paths"]]
    replace_unaudited(policy["allow_processes"])
    seal_builtin_modules()
    sys.addaudithook(make_hook(sandbox, writable, readable, code_roots, policy["allow_network"],
                               policy["allow_processes"], report_fd))
    runner = compile(header.pop("runner"), "<sandbox runner>", "exec")
    exec(runner, {"__name__": "__main__", "__builtins__": __builtins__})


main()
"""


# ----------------------------------------------------------------------------------------------------------------
# The parent side
# ----------------------------------------------------------------------------------------------------------------


def _rlimits(limits: SandboxLimits, timeout_s: float) -> dict[str, int | None]:
    cpu_s = limits.cpu_s if limits.cpu_s is not None else math.ceil(timeout_s) + 1
    return {
        "RLIMIT_CORE": 0,  # a crash must not write a core file the size of the address space
        "RLIMIT_CPU": cpu_s,
        "RLIMIT_AS": limits.address_space_bytes,
        "RLIMIT_FSIZE": limits.file_size_bytes,
        "RLIMIT_NOFILE": limits.open_files,
        "RLIMIT_NPROC": limits.processes,
    }


def _policy_header(policy: SandboxPolicy) -> dict[str, object]:
    return {
        "allow_network": policy.allow_network,
        "allow_processes": policy.allow_processes,
        "readable_paths": list(policy.readable_paths),
        "writable_paths": list(policy.writable_paths),
    }


def _environment(workdir: str) -> dict[str, str]:
    """Nothing of the parent's environment: the path to basic tools, a UTF-8 locale, and TMPDIR inside the sandbox
    (`tempfile` then works without touching the shared /tmp, which the hook refuses)."""
    return {"PATH": os.defpath, "LC_ALL": "C.UTF-8", "TMPDIR": workdir}


class _OutputBudget:
    """stdout and stderr together: past `limit` bytes the process group is killed, once, and only while its leader
    has not been reaped (after that the group id may belong to someone else)."""

    def __init__(self, limit: int, pgid: int):
        self._left = limit
        self._pgid = pgid
        self._lock = threading.Lock()
        self._reaped = False
        self.exceeded = False

    def spend(self, n: int) -> None:
        with self._lock:
            self._left -= n
            if self._left < 0 and not self.exceeded:
                self.exceeded = True
                if not self._reaped:
                    _kill_group(self._pgid)

    def before_reaping(self) -> None:
        with self._lock:
            self._reaped = True


def _drain(stream, cap: int, sink: dict, budget: _OutputBudget | None) -> None:
    """Read `stream` to its end, keeping the first `cap` bytes: the pipe never fills, so the child never blocks."""
    kept = bytearray()
    total = 0
    for chunk in iter(lambda: stream.read1(1 << 18), b""):
        total += len(chunk)
        if len(kept) < cap:
            kept += chunk[: cap - len(kept)]
        if budget is not None:
            budget.spend(len(chunk))
    stream.close()
    sink["bytes"] = bytes(kept)
    sink["truncated"] = total > cap


def _feed(stream, data: bytes) -> None:
    """Write stdin from a thread: a runner that never reads it must not block the parent past the timeout."""
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass  # it died or closed stdin; the exit status says how


def _exited_without_reaping(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for `proc` to exit but leave it a zombie, so its process-group id cannot be reused by
    another process before the group is killed. Without `os.waitid` (macOS before Python 3.13) it reaps: the
    group kill that follows then has a (tiny) chance of a reused id."""
    if not hasattr(os, "waitid"):
        try:
            proc.wait(timeout=timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while True:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if info is not None:
            return True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        time.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty


def _read_regular_file(path: Path, cap: int) -> bytes | None:
    """The file's bytes when it is a regular file of at most `cap` bytes, else None. Opened without following a
    symlink and without blocking: the candidate may have left a FIFO or a device node under that name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > cap:
            return None
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 16):
            size += len(chunk)
            if size > cap:
                return None
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _remove_tree(path: str) -> None:
    """Remove the sandbox directory whatever the candidate left in it: shutil first (fast), then chmod + rm for
    what it cannot do (a directory without permissions for a non-root user, a tree deeper than its recursion)."""
    try:
        shutil.rmtree(path)
        return
    except (OSError, RecursionError):
        pass
    for command in (["chmod", "-R", "u+rwx", "--", path], ["rm", "-rf", "--", path]):
        try:
            subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if os.path.lexists(path):
        _LOG.warning("sandbox: could not remove its directory %s; remove it by hand", path)


def _parse_report(data: bytes, returncode: int, timed_out: bool) -> tuple[dict, str | None, int]:
    """(the bootstrap's isolation line, the first refusal, the sandboxed interpreter's exit status) from the report
    pipe. The isolation line is the first (written before any untrusted code exists), `status` lines count only from
    init (the last one: it writes after the sandboxed process is gone); a refusal line can only lower a reward."""
    info, refused, status = None, None, None
    for line in data.decode("utf-8", errors="replace").splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "sandbox" and info is None:
            try:
                info = json.loads(rest)
            except ValueError:
                info = None
        elif kind == "refused" and refused is None:
            refused = rest
        elif kind == "status" and rest.lstrip("-").isdigit():
            status = int(rest)
    if not isinstance(info, dict):
        info = {"network": "blocked", "pid": False, "how": "the bootstrap reported nothing (it failed to start)"}
    if info.get("pid") and status is not None and not timed_out:
        returncode = os.waitstatus_to_exitcode(status)
    return info, refused, returncode


_ISOLATION_LOGGED: set[tuple] = set()


def _log_isolation_once(network: str, pid_namespace: bool, how: str) -> None:
    key = (network, pid_namespace, how)
    if key in _ISOLATION_LOGGED:
        return
    _ISOLATION_LOGGED.add(key)
    if network == "namespace":
        _LOG.info("sandbox: network isolated by a namespace, pid namespace %s (%s)", pid_namespace, how)
    else:
        _LOG.warning("sandbox: no network namespace (%s); sockets are refused by the audit hook only", how)


def _validate_files(files: Mapping[str, str | bytes], read_back: Sequence[str]) -> None:
    for name in (*files, *read_back):
        if not name or "/" in name or name in (".", "..") or "\x00" in name:
            raise ValueError(f"sandbox file names must be plain names inside its directory, got {name!r}")


def _spawn(workdir: str, want: dict) -> tuple[subprocess.Popen, int]:
    """The bootstrap in its own session and process group (so that one killpg reaches everything it starts), with
    the write end of the report pipe as its only extra descriptor. Returns it and the read end."""
    report_r, report_w = os.pipe()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", "-c", _BOOTSTRAP, str(report_w), json.dumps(want), _PRELUDE],
            cwd=workdir,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_environment(workdir),
            start_new_session=True,
            pass_fds=(report_w,),
        )
    except BaseException:
        os.close(report_r)
        raise
    finally:
        os.close(report_w)
    return proc, report_r


def _start_io(proc, report_r: int, stdin: bytes, cap: int, budget: _OutputBudget) -> tuple[list, list]:
    """Threads that drain stdout, stderr and the report pipe into sinks, and one that writes stdin. Returns the
    sinks and the draining threads."""
    sinks: list[dict] = [{}, {}, {}]
    streams = ((proc.stdout, cap, budget), (proc.stderr, cap, budget), (open(report_r, "rb"), REPORT_CAP_BYTES, None))
    readers = [
        threading.Thread(target=_drain, args=(stream, limit, sink, spend), daemon=True)
        for (stream, limit, spend), sink in zip(streams, sinks)
    ]
    for thread in [*readers, threading.Thread(target=_feed, args=(proc.stdin, stdin), daemon=True)]:
        thread.start()
    return sinks, readers


def run_python(
    runner: str,
    files: Mapping[str, str | bytes] | None = None,
    stdin: bytes = b"",
    *,
    limits: SandboxLimits = SandboxLimits(),
    policy: SandboxPolicy = SandboxPolicy(),
    timeout_s: float = 5.0,
    max_output_bytes: int = 16384,
    max_total_output_bytes: int = 64 << 20,
    read_back: Sequence[str] = (),
    max_file_bytes: int = 1 << 20,
    prefix: str = "dsv4-sandbox-",
) -> SandboxResult:
    """Run `runner` (Python source) as the main program of a sandboxed interpreter (module docstring: the layers,
    what each stops and what it does not), in a fresh directory holding `files`, with `stdin` on its standard input.
    Returns when it has exited, or after `timeout_s`, or once it printed more than `max_total_output_bytes`, with
    its whole process group killed and its directory removed; `read_back` names the files to return from it."""
    files = dict(files or {})
    _validate_files(files, read_back)
    header = {"limits": _rlimits(limits, timeout_s), "policy": _policy_header(policy), "runner": runner}
    want = {"net": policy.network_namespace, "pid": policy.pid_namespace, "user": policy.user_namespace}
    workdir = tempfile.mkdtemp(prefix=prefix)
    started = time.monotonic()
    try:
        for name, content in files.items():
            Path(workdir, name).write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
        proc, report_r = _spawn(workdir, want)
        budget = _OutputBudget(max_total_output_bytes, proc.pid)
        timed_out = True
        try:
            stdin_data = (json.dumps(header) + "\n").encode() + stdin
            sinks, readers = _start_io(proc, report_r, stdin_data, max_output_bytes, budget)
            timed_out = not _exited_without_reaping(proc, timeout_s)
        finally:  # also when interrupted: nothing it started may outlive this call
            _kill_group(proc.pid)  # on time-out the whole group; after an exit whatever it left running
            budget.before_reaping()
            proc.kill()  # the group kill already did it, unless the leader left the group
            returncode = proc.wait()
        for thread in readers:
            thread.join(timeout=READER_JOIN_S)  # a process that left the group may still hold the pipes
        returned = {name: _read_regular_file(Path(workdir, name), max_file_bytes) for name in read_back}
    finally:
        _remove_tree(workdir)
    info, refused, returncode = _parse_report(sinks[2].get("bytes", b""), returncode, timed_out)
    network = "namespace" if info.get("network") == "namespace" else "blocked"
    how = str(info.get("how", ""))
    _log_isolation_once(network, bool(info.get("pid")), how)
    return SandboxResult(
        returncode=returncode,
        timed_out=timed_out,
        output_exceeded=budget.exceeded,
        refused=refused,
        stdout=sinks[0].get("bytes", b"").decode("utf-8", errors="replace"),
        stderr=sinks[1].get("bytes", b"").decode("utf-8", errors="replace"),
        output_truncated=any(s.get("truncated", False) for s in sinks[:2]),
        network=network,
        pid_namespace=bool(info.get("pid")),
        isolation=how,
        files={name: data for name, data in returned.items() if data is not None},
        pid=proc.pid,
        workdir=workdir,
        wall_s=time.monotonic() - started,
    )
