"""Runs inside the sandbox subprocess (`python -I -S sandbox_harness.py spec.json`): sets resource
limits, installs the sandbox policy (an audit hook), executes the candidate code, then each test, and
prints one JSON result line.

The policy (`_install_policy`), installed right before the candidate runs, denies with a PermissionError
("sandbox: ... is not allowed (<event>)"): network (any socket operation; only local AF_UNIX socket
pairs may be created, which asyncio needs), process spawning (subprocess, os.system / exec* / spawn* /
posix_spawn / fork / forkpty, and `_posixsubprocess.fork_exec`, which raises no audit event), signals to
other processes, ctypes and native modules loaded from the sandbox dir (they would bypass the hook), and
any write / create / remove / rename / mkdir / rmdir / chmod / chown / utime / link outside the sandbox
dir (the cwd the parent sets; symlinks are resolved). Reading stays allowed (imports need it). Audit
hooks cannot be removed; the hook's helpers are bound at install time and guarded against rebinding.
It is a policy against accidents and careless code, not a proof against a determined attacker.

Stdlib only: it runs isolated from the venv's site-packages and from forge itself.
"""

import ast
import io
import json
import os
import stat
import sys

_RESULT_MARK = "@@FORGE_RESULT@@"

_PROCESS_EVENTS = frozenset({
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.startfile", "pty.spawn",
})
# event -> ((path index, dir_fd index or None), ...): the paths it writes, creates, removes or changes
_WRITE_EVENTS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),), "os.chmod": ((0, 2),),
    "os.chown": ((0, 3),), "os.utime": ((0, 3),), "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)),
    "os.symlink": ((1, 2),), "os.truncate": ((0, None),), "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),), "shutil.copyfile": ((1, None),),
    "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),), "shutil.copytree": ((1, None),),
    "shutil.move": ((0, None), (1, None)), "shutil.chown": ((0, None),), "shutil.make_archive": ((0, None),),
    "shutil.unpack_archive": ((1, None),), "tempfile.mkstemp": ((0, None),), "tempfile.mkdtemp": ((0, None),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _limit(resource_mod, name, value):
    kind = getattr(resource_mod, name, None)
    if kind is None or value is None:
        return
    try:
        resource_mod.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass  # not permitted or not supported on this platform: the parent's timeout still holds


def _apply_limits(limits):
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    _limit(resource, "RLIMIT_AS", limits.get("memory_bytes"))
    _limit(resource, "RLIMIT_CPU", limits.get("cpu_seconds"))
    _limit(resource, "RLIMIT_FSIZE", limits.get("file_bytes"))
    _limit(resource, "RLIMIT_CORE", 0)


def _resolve(path, base, _fspath=os.fspath, _fsdecode=os.fsdecode, _lstat=os.lstat, _readlink=os.readlink,
             _islink=stat.S_ISLNK):
    """The absolute path `path` (relative to `base`) names, symlinks resolved: os.path.realpath from C-level
    functions bound here, so rebinding os / posixpath attributes cannot fool the policy."""
    path = _fsdecode(_fspath(path))
    todo = (path if path.startswith("/") else base + "/" + path).split("/")[::-1]
    parts, hops = [], 0
    while todo:
        name = todo.pop()
        if name in ("", "."):
            continue
        if name == "..":
            if parts:
                parts.pop()
            continue
        here = "/" + "/".join([*parts, name])
        try:
            mode = _lstat(here).st_mode
        except OSError:  # missing (the OS fails the call anyway) or not searchable: lexical from here
            parts.append(name)
            continue
        if not _islink(mode):
            parts.append(name)
            continue
        hops += 1
        if hops > 40:
            raise OSError("too many levels of symbolic links")
        target = _readlink(here)
        if target.startswith("/"):
            parts = []
        todo.extend(target.split("/")[::-1])
    return "/" + "/".join(parts)


def _fd_path(fd, _readlink=os.readlink):
    """The path an open fd refers to (Linux /proc), or None."""
    try:
        path = _readlink(f"/proc/self/fd/{int(fd)}")
    except (OSError, ValueError, TypeError):
        return None
    return path if path.startswith("/") else None


def _is_dir(path, _stat=os.stat, _isdir=stat.S_ISDIR):
    try:
        return _isdir(_stat(path).st_mode)
    except (OSError, ValueError, TypeError):
        return False


def _open_dirs(_listdir=os.listdir, _fd_path=_fd_path, _is_dir=_is_dir):
    """Directories this process holds open (os.open(relative, dir_fd=fd) resolves against one of them, and
    the `open` audit event does not say which)."""
    try:
        fds = _listdir("/proc/self/fd")
    except OSError:
        return []
    return [path for path in map(_fd_path, fds) if path is not None and _is_dir(path)]


def _where_to(path, dir_fd, bases, _resolve=_resolve, _fd_path=_fd_path, _getcwd=os.getcwd,
              _isinstance=isinstance, _int=int):
    """Every absolute path `path` may name: an fd names its file; a relative path resolves against dir_fd if
    one is given, else against the cwd and any `bases`. None where that cannot be told."""
    try:
        if _isinstance(path, _int):
            return [_fd_path(path)]
        if _isinstance(dir_fd, _int) and dir_fd >= 0:
            base = _fd_path(dir_fd)
            return [None if base is None else _resolve(path, base)]
        return [_resolve(path, base) for base in [_getcwd(), *bases]]
    except (OSError, ValueError, TypeError):
        return [None]


def _check(event, args, root, _where_to=_where_to, _open_dirs=_open_dirs, _is_dir=_is_dir,
           _process=_PROCESS_EVENTS, _writes=_WRITE_EVENTS, _write_flags=_WRITE_FLAGS, _getpid=os.getpid,
           _isinstance=isinstance, _str=str, _int=int, _len=len, _any=any):
    """What the policy denies for one audit event (a phrase for the error message), or None."""
    prefix = root + "/"

    def outside(path, dir_fd=None, bases=()):
        where = _where_to(path, dir_fd, bases)
        return _any(w is None or (w != root and not w.startswith(prefix)) for w in where)

    if event == "open":
        path, mode, flags = args
        if path is None or _isinstance(path, _int):
            return None  # open(fd): the fd was checked when it was opened
        if _isinstance(mode, _str):
            writes = _any(c in mode for c in "wax+")
        else:  # os.open: mode is None, flags tell
            writes = _isinstance(flags, _int) and bool(flags & _write_flags)
        if writes:
            relative_os_open = mode is None and not _str(path).startswith("/")
            if path != "/dev/null" and outside(path, bases=_open_dirs() if relative_os_open else ()):
                return f"writing {_str(path)!r} outside the sandbox dir"
        elif mode is None and outside(path) and _is_dir(path):
            # a directory fd from outside would let os.open(name, dir_fd=fd) write there unseen
            return f"opening the directory {_str(path)!r} outside the sandbox dir"
        return None
    spec = _writes.get(event)
    if spec is not None:
        for i, j in spec:
            if i < _len(args) and args[i] is not None:
                dir_fd = args[j] if j is not None and j < _len(args) else None
                if outside(args[i], dir_fd):
                    return f"changing {_str(args[i])!r} outside the sandbox dir"
        if event == "os.symlink":  # a link out of the sandbox would let later writes escape through it
            target, link = _str(args[0]), _str(args[1])
            if not target.startswith("/"):
                target = (link.rsplit("/", 1)[0] if "/" in link else ".") + "/" + target
            if outside(target, args[2]):
                return f"a symlink to {_str(args[0])!r} outside the sandbox dir"
        return None
    if event.startswith("socket."):
        if event == "socket.__new__" and _len(args) > 1 and args[1] == 1:  # AF_UNIX
            return None  # local socket pairs (asyncio's self-pipe): connect / bind / send stay denied
        return "network access"
    if event in _process:
        return "process spawning"
    if event in ("os.kill", "os.killpg"):
        return None if args[0] in (0, _getpid()) else "signalling other processes"
    if event.startswith("ctypes.") or (event == "import" and args[0] in ("ctypes", "_ctypes")):
        return "ctypes"
    if event == "import" and args[0] == "_posixsubprocess":
        return "process spawning"
    if event == "import" and _isinstance(args[1], _str) and not outside(args[1]):
        return "loading native code from the sandbox dir"
    if event in ("gc.get_objects", "gc.get_referrers", "gc.get_referents"):
        return "inspecting the interpreter's objects"  # the only way back to the hook itself
    return None


def _install_policy(root):
    """Install the sandbox audit hook: from here on, `root` (the sandbox dir) is the only place to write."""
    import _posixsubprocess  # replaced before the candidate can hold the original (it raises no audit event)

    def fork_exec(*args, **kwargs):
        raise PermissionError("sandbox: process spawning is not allowed (_posixsubprocess.fork_exec)")

    _posixsubprocess.fork_exec = fork_exec
    root = _resolve(root, "/")
    guarded = (_resolve, _fd_path, _is_dir, _open_dirs, _where_to, _check, fork_exec)

    def hook(event, args, _root=root, _check=_check, _guarded=guarded, _any=any, _Error=PermissionError):
        if event == "object.__setattr__" and _any(args[0] is g for g in _guarded):
            raise _Error(f"sandbox: rebinding the sandbox policy is not allowed ({event})")
        denied = _check(event, args, _root)
        if denied is not None:
            raise _Error(f"sandbox: {denied} is not allowed ({event})")

    sys.addaudithook(hook)


def _got_value(test, namespace):
    """For `assert X == Y`, the value X actually had: makes the failure detail useful."""
    try:
        node = ast.parse(test).body[0]
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare):
            left = compile(ast.Expression(node.test.left), "<test>", "eval")
            return f" (got {eval(left, namespace)!r})"[:200]
    except BaseException:
        pass
    return ""


def _where(exc, code):
    """` (solution.py line N: <source>)` for the innermost frame of the candidate's code, if any."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "solution.py":
            line = tb.tb_lineno
        tb = tb.tb_next
    if line is None:
        return ""
    lines = code.splitlines()
    source = lines[line - 1].strip()[:160] if 0 < line <= len(lines) else ""
    return f" (solution.py line {line}: {source})"


def _run(spec):
    namespace = {"__name__": "__solution__"}
    captured = io.StringIO()
    real_stdout = sys.stdout
    sys.stdout = captured  # the candidate's prints must not mix with our result line
    tests = spec["tests"]
    stage = "defining the code" if tests else "running the program"
    try:
        try:
            code = compile(spec["code"], "solution.py", "exec")
            _install_policy(os.getcwd())
            exec(code, namespace)
        except BaseException as exc:
            message = f"{type(exc).__name__}: {exc}".rstrip(": ")
            detail = f"exception while {stage}: {message}{_where(exc, spec['code'])}"
            return {"correct": False, "detail": detail}
        for test in tests:
            try:
                exec(compile(test, "<test>", "exec"), namespace)
            except AssertionError:
                return {"correct": False, "detail": f"test failed: {test}{_got_value(test, namespace)}"}
            except BaseException as exc:
                detail = f"exception in test {test!r}: {type(exc).__name__}: {exc}"
                return {"correct": False, "detail": detail}
        return {"correct": True, "detail": f"{len(tests)} tests passed" if tests else "ran to completion"}
    finally:
        sys.stdout = real_stdout


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    os.remove(sys.argv[1])  # the token goes with it: the candidate cannot read it back
    mark = f"{_RESULT_MARK}{spec.pop('token', '')}@@"
    _apply_limits(spec.get("limits", {}))
    result = _run(spec)
    sys.stdout.write("\n" + mark + json.dumps(result)[:2000] + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
