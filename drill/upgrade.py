"""The other install an upgrade drill restarts onto: given (``--upgrade-to``) or built from a
git ref (``--upgrade-ref``) side by side, without touching the checkout.

A ref is exported with ``git archive`` (read-only: no worktree, no index, no HEAD moves),
installed with ``pip install --no-deps`` into its own venv, and given this venv's
site-packages for its dependencies through a ``.pth`` file: the drill upgrades trioxy's code,
not its libraries. (To upgrade libraries too, build that venv yourself and pass
``--upgrade-to``.) Builds are cached by commit under the temp dir.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from drill.agent import Target


class UpgradeError(Exception):
    pass


def target_from_bin(trioxy_bin: str) -> Target:
    """``--upgrade-to PATH``: a ``trioxy`` console script; its interpreter sits beside it."""
    path = Path(trioxy_bin).absolute()
    if not os.access(path, os.X_OK):
        raise UpgradeError(f"--upgrade-to {trioxy_bin}: not an executable")
    python = path.parent / "python"
    if not os.access(python, os.X_OK):
        raise UpgradeError(f"--upgrade-to {trioxy_bin}: no python beside it ({python})")
    root = path.parent.parent
    return Target(f"{path}", str(python), (str(path),), str(root))


def repo_root(start: Path) -> Path:
    r = subprocess.run(["git", "-C", str(start), "rev-parse", "--show-toplevel"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise UpgradeError(f"--upgrade-ref needs a git checkout: {r.stderr.strip()}")
    return Path(r.stdout.strip())


def resolve_commit(repo: Path, ref: str) -> str:
    r = subprocess.run(["git", "-C", str(repo), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise UpgradeError(f"--upgrade-ref {ref}: {r.stderr.strip()}")
    return r.stdout.strip()


def build_ref(repo: Path, ref: str, say: Callable[[str], None],
              cache_dir: Path | None = None) -> Target:
    commit = resolve_commit(repo, ref)
    base = (cache_dir or Path(tempfile.gettempdir())) / f"trioxy-drill-upgrade-{commit[:12]}"
    venv = base / "venv"
    python = venv / "bin" / "python"
    stamp = base / ".installed"
    label = f"{ref} ({commit[:10]})"
    if stamp.exists() and os.access(python, os.X_OK):
        say(f"upgrade target {label}: reusing {venv}")
        return Target(label, str(python), (str(venv / "bin" / "trioxy"),), str(venv))
    say(f"upgrade target {label}: building {venv} (git archive + pip install --no-deps)")
    src = base / "src"
    src.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", commit],
                             capture_output=True, timeout=120)
    if archive.returncode != 0:
        raise UpgradeError(f"git archive {commit}: {archive.stderr.decode()[-500:]}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(src, filter="data")
    _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(src)], "pip install")
    purelib = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=60).stdout.strip())
    # After its own site-packages: its trioxy wins, our libraries fill in the rest.
    ours_purelib = sysconfig.get_paths()["purelib"]
    (purelib / "zz-trioxy-drill-deps.pth").write_text(ours_purelib + "\n")
    check = subprocess.run([str(python), "-c", "import proxy, trio, h2; print(proxy.__file__)"],
                           capture_output=True, text=True, cwd=base, timeout=60)
    if check.returncode != 0 or not check.stdout.startswith(str(venv)):
        raise UpgradeError(f"the built venv does not import its own trioxy: "
                           f"{check.stdout.strip()} {check.stderr[-500:]}")
    stamp.write_text(commit + "\n")
    return Target(label, str(python), (str(venv / "bin" / "trioxy"),), str(venv))


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise UpgradeError(f"{what} failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
