"""Import every module of the package with the standard library names Windows has.

Run as a script (``python windows_namespace.py``): the POSIX-only names that CPython's Windows
build does not have are removed from ``asyncio``, ``os``, ``signal``, ``select`` and
``selectors``, the POSIX-only modules cannot be imported, and ``sys.platform`` says ``win32``;
then every ``prismq_subprocess`` module is imported. Prints one ``FAIL <module> <error>`` line
per module that cannot be imported, then ``OK``. Not a test module: test_windows.py runs it in a
subprocess of its own, since the changes cannot be undone.

The lists follow CPython's own Windows build: ``asyncio/__init__.py`` takes its platform names
from ``windows_events`` instead of ``unix_events`` (no child watchers: ``AbstractChildWatcher``
and the rest exist only on POSIX), ``signal`` has six SIG* names plus SIGBREAK and the two
CTRL_* events, and ``os.get_blocking``/``os.set_blocking`` exist on Windows only from 3.12
(gh-101881).
"""

from __future__ import annotations

import ast
import asyncio
import asyncio.unix_events
import contextlib
import importlib
import os
import pkgutil
import platform
import select
import selectors
import signal
import sys
from pathlib import Path
from typing import Any

import psutil  # noqa: F401  (a dependency, not what is under test)

_POSIX_MODULES = {"fcntl", "termios", "tty", "pty", "resource", "pwd", "grp", "syslog"}
_WINDOWS_SIGNALS = {"SIGABRT", "SIGFPE", "SIGILL", "SIGINT", "SIGSEGV", "SIGTERM"}
_POSIX_OS = [
    "fork",
    "forkpty",
    "setsid",
    "getsid",
    "killpg",
    "getpgid",
    "setpgid",
    "getpgrp",
    "setpgrp",
    "register_at_fork",
    "pidfd_open",
    "waitid",
    "WNOHANG",
    "WEXITED",
    "WNOWAIT",
    "P_PIDFD",
    "P_PID",
    "P_ALL",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getgroups",
    "uname",
    "sysconf",
    "statvfs",
    "getloadavg",
    "pipe2",
    "mkfifo",
    "openpty",
    "wait",
    "wait3",
    "wait4",
    "WIFEXITED",
    "WEXITSTATUS",
    "WIFSIGNALED",
    "WTERMSIG",
    "sync",
    "fchown",
    "chown",
    "lchown",
    "getpriority",
    "nice",
    "O_NONBLOCK",
    "O_CLOEXEC",
    "EX_OK",
    "sched_getaffinity",
    "setuid",
    "setgid",
    "PIPE_BUF",
    "eventfd",
    "memfd_create",
]
_POSIX_SELECT = [
    "poll",
    "epoll",
    "kqueue",
    "devpoll",
    "POLLIN",
    "POLLOUT",
    "POLLHUP",
    "POLLERR",
    "PIPE_BUF",
]
_OPTIONAL = {"distributed", "dask", "uvicorn", "fastapi", "starlette", "anyio", "trio", "pytest"}


class _NoPosixModules:
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name in _POSIX_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r} (Windows)", name=name)


def import_the_standard_library_first() -> None:
    """Import, with the real names, the standard modules the package imports: several of them
    (``subprocess``, ``shutil``, ...) choose their own implementation by ``sys.platform``, and
    Windows' cannot run here. Only the package's own decisions are under test."""
    root = Path(__file__).resolve().parents[2] / "prismq_subprocess"
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in sys.stdlib_module_names - _POSIX_MODULES:
                    with contextlib.suppress(ImportError):
                        importlib.import_module(name)


def become_windows() -> None:
    """Make the standard library look as it does on Windows (as far as the package can tell)."""
    for name in list(sys.modules):
        if name in _POSIX_MODULES:
            del sys.modules[name]
    sys.meta_path.insert(0, _NoPosixModules())
    for name in asyncio.unix_events.__all__:
        if name not in {"DefaultEventLoopPolicy", "SelectorEventLoop"} and hasattr(asyncio, name):
            delattr(asyncio, name)
    for name in list(vars(signal)):
        if name.startswith("SIG") and not name.startswith("SIG_") and name not in _WINDOWS_SIGNALS:
            delattr(signal, name)
    signal.SIGBREAK = 21  # type: ignore[attr-defined]
    signal.CTRL_C_EVENT = 0  # type: ignore[attr-defined]
    signal.CTRL_BREAK_EVENT = 1  # type: ignore[attr-defined]
    blocking = ["get_blocking", "set_blocking"] if sys.version_info < (3, 12) else []
    for name in [*_POSIX_OS, *blocking]:
        if hasattr(os, name):
            delattr(os, name)
    for name in _POSIX_SELECT:
        if hasattr(select, name):
            delattr(select, name)
    for name in ("PollSelector", "EpollSelector", "DevpollSelector", "KqueueSelector"):
        if hasattr(selectors, name):
            delattr(selectors, name)
    selectors.DefaultSelector = selectors.SelectSelector  # type: ignore[misc]
    # (platform.platform() would run `ver` through a shell once sys.platform says win32)
    platform.platform = lambda *args, **kwargs: "Windows-10-emulated"  # type: ignore[assignment]
    sys.platform = "win32"


def main() -> int:
    import_the_standard_library_first()
    become_windows()
    try:
        import prismq_subprocess
    except Exception as exc:
        print(f"FAIL prismq_subprocess {exc!r}")
        return 1
    failures = []
    packages = pkgutil.walk_packages(
        prismq_subprocess.__path__, "prismq_subprocess.", onerror=lambda name: None
    )
    for info in packages:
        if info.name.startswith("prismq_subprocess.dask"):
            continue  # needs Dask distributed, which itself needs POSIX names we removed
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in _OPTIONAL:
                failures.append((info.name, exc))
        except Exception as exc:
            failures.append((info.name, exc))
    for name, exc in failures:
        print(f"FAIL {name} {exc!r}")
    print("OK" if not failures else "FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
