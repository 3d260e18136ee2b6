"""Apply, revert and inspect the version-checked patches that sglang-forkkv makes to SGLang's installed files.

Patches live in ``patches/<group>/NNNN-name.patch`` (group ``common``: applied everywhere; group ``cpu``: only on
CPU-only machines). Each is a unified diff against the site-packages directory (``patch -p1 -d SITE``) preceded by
header lines that name SGLang 0.5.17 and say why the patch is needed; GNU patch skips such leading text.

State lives only in the patched files themselves: a patch counts as applied when it reverses cleanly
(``patch --dry-run -R``). That makes ``apply`` and ``revert`` idempotent and needs no bookkeeping file that could
drift from reality (e.g. after ``pip install --force-reinstall sglang``).
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REQUIRED_SGLANG_VERSION = "0.5.17"
GROUPS = ("common", "cpu")
# Fuzz 0: context must match exactly, so a patch never lands on a file it was not written for.
_PATCH_FLAGS = ("-p1", "--force", "--fuzz=0", "--no-backup-if-mismatch", "--reject-file=-")


class PatchError(RuntimeError):
    """A patch cannot be applied or reverted, or the environment cannot be patched at all."""


class VersionMismatch(PatchError):
    """The installed SGLang is not the version the patches were written against."""


@dataclass(frozen=True)
class Patch:
    group: str
    path: Path

    @property
    def name(self) -> str:
        return f"{self.group}/{self.path.name}"

    def _file_pairs(self) -> list[tuple[str, str]]:
        """(old, new) paths of each file section, as written in the ``---`` / ``+++`` lines."""
        lines = self.path.read_text().splitlines()
        pairs = []
        for prev, line in zip(lines, lines[1:]):
            if prev.startswith("--- ") and line.startswith("+++ "):
                pairs.append((_header_path(prev), _header_path(line)))
        return pairs

    def files(self) -> list[str]:
        """Paths (relative to site-packages) this patch touches."""
        return [_strip_one(new) for _, new in self._file_pairs()]

    def created_files(self) -> list[str]:
        """Paths this patch creates (old side ``/dev/null``); revert must remove them and their leftovers."""
        return [_strip_one(new) for old, new in self._file_pairs() if old == "/dev/null"]


def _header_path(line: str) -> str:
    # "--- a/x/y.py<TAB>timestamp" -> "a/x/y.py"
    return line[4:].split("\t")[0].strip()


def _strip_one(path: str) -> str:
    """What ``-p1`` does: drop the leading ``a/`` or ``b/`` component."""
    return path.split("/", 1)[1] if "/" in path else path


# ---------------------------------------------------------------------------------------------------------------------
# Locating patches and the installation to patch


def patches_root() -> Path:
    """The patches directory: packaged data in a regular install, else ``patches/`` beside the package in a source
    checkout (editable install: the package data mapping does not exist on disk there)."""
    packaged = Path(__file__).resolve().parent / "_patches"
    if packaged.is_dir():
        return packaged
    repo_patches = Path(__file__).resolve().parent.parent / "patches"
    if repo_patches.is_dir():
        return repo_patches
    raise PatchError(f"patches directory not found (looked at {packaged} and {repo_patches})")


def list_patches(cpu: bool, root: Path | None = None) -> list[Patch]:
    """Patches in application order: every ``common`` patch, then (with ``cpu``) every ``cpu`` patch, by name.

    ``common`` comes first so that it applies to the same pristine files on GPU and CPU machines alike.
    """
    root = root or patches_root()
    groups = GROUPS if cpu else ("common",)
    found = []
    for group in groups:
        group_dir = root / group
        if group_dir.is_dir():  # an empty or missing group is fine: nothing to do
            found += [Patch(group, p) for p in sorted(group_dir.glob("*.patch"))]
    return found


def site_dir() -> Path:
    """The site-packages directory that holds the importable ``sglang`` (found without importing it)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("sglang is not installed in this Python environment")
    return Path(list(spec.submodule_search_locations)[0]).parent


_VERSION_RE = re.compile(r"""^__version__\s*=\s*(?:version\s*=\s*)?["']([^"']+)["']""", re.MULTILINE)


def installed_sglang_version(site: Path) -> str | None:
    """SGLang's version from its source files in ``site``: ``_version.py`` (wheels) or a literal in ``version.py``."""
    for name in ("_version.py", "version.py"):
        path = site / "sglang" / name
        if path.is_file():
            match = _VERSION_RE.search(path.read_text())
            if match:
                return match.group(1)
    return None


def require_sglang_version(site: Path) -> None:
    found = installed_sglang_version(site)
    if found != REQUIRED_SGLANG_VERSION:
        raise VersionMismatch(
            f"sglang-forkkv patches are written for SGLang {REQUIRED_SGLANG_VERSION}, but the SGLang in {site} is "
            f"{found or 'of unknown version'}; install sglang=={REQUIRED_SGLANG_VERSION} (see .ci/requirements-cpu.txt)"
        )


def _patch_program() -> str:
    program = shutil.which("patch")
    if program is None:
        raise PatchError("the `patch` program is missing; install it (Debian: apt-get install patch)")
    return program


# ---------------------------------------------------------------------------------------------------------------------
# One patch


def _run_patch(patch: Patch, site: Path, *, reverse: bool, dry_run: bool) -> subprocess.CompletedProcess:
    cmd = [_patch_program(), *_PATCH_FLAGS, "-d", str(site)]
    if reverse:
        cmd.append("--reverse")
    if dry_run:
        cmd.append("--dry-run")
    with patch.path.open("rb") as stdin:
        return subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, check=False)


def is_applied(patch: Patch, site: Path) -> bool:
    return _run_patch(patch, site, reverse=True, dry_run=True).returncode == 0


def _failed_files(output: str) -> list[str]:
    """Files that made GNU patch fail, each with why, parsed from its ``checking file X`` / ``Hunk #n FAILED`` lines
    and, for files it cannot find, the quoted ``|+++ b/X`` header followed by ``No file to patch``."""
    failed, current = {}, None
    for line in output.splitlines():
        if match := re.match(r"(?:checking|patching) file (.+)", line):
            current = match.group(1).strip()
        elif line.startswith("|+++ "):
            current = _strip_one(_header_path(line[1:]))
        elif "No file to patch" in line and current:
            failed[current] = "missing"
        elif "FAILED" in line and current:
            failed.setdefault(current, "hunks do not match")
    return [f"{path} ({why})" for path, why in failed.items()]


def _mismatch_error(patch: Patch, site: Path, result: subprocess.CompletedProcess, action: str) -> PatchError:
    output = (result.stdout + result.stderr).strip()
    files = _failed_files(output) or patch.files()
    return PatchError(
        f"patch {patch.name} can neither be {action} nor is it already in that state in {site}; "
        f"file(s) differ from what the patch expects: {', '.join(files)}. "
        f"Is this a different SGLang/torchvision build, or were the files edited?\n{output}"
    )


def _remove_created_leftovers(patch: Patch, site: Path) -> None:
    """After reverting a patch that created files: drop their bytecode and any directory left empty.

    GNU patch deletes the file itself but leaves ``__pycache__`` behind, which would keep e.g. ``sgl_kernel/``
    importable as a namespace package.
    """
    for rel in patch.created_files():
        path = site / rel
        cache = path.parent / "__pycache__"
        for pyc in cache.glob(f"{path.stem}.*.pyc"):
            pyc.unlink()
        _remove_empty_dirs(cache, stop=site)
        _remove_empty_dirs(path.parent, stop=site)


def _remove_empty_dirs(directory: Path, stop: Path) -> None:
    """Remove ``directory`` and its parents while they are empty, never ``stop`` or above."""
    while directory != stop and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent


def apply_one(patch: Patch, site: Path) -> bool:
    """Apply ``patch``; return False if it was already applied."""
    if is_applied(patch, site):
        logger.info("%s: already applied, skipped", patch.name)
        return False
    check = _run_patch(patch, site, reverse=False, dry_run=True)
    if check.returncode != 0:
        raise _mismatch_error(patch, site, check, "applied")
    result = _run_patch(patch, site, reverse=False, dry_run=False)
    if result.returncode != 0:  # the dry run passed, so this means the tree changed under us
        raise _mismatch_error(patch, site, result, "applied")
    logger.info("%s: applied", patch.name)
    return True


def revert_one(patch: Patch, site: Path) -> bool:
    """Revert ``patch``; return False if it was not applied."""
    if not is_applied(patch, site):
        forward = _run_patch(patch, site, reverse=False, dry_run=True)
        if forward.returncode != 0:  # neither applied nor cleanly applicable: the files are in an unknown state
            raise _mismatch_error(patch, site, forward, "reverted")
        logger.info("%s: not applied, skipped", patch.name)
        return False
    result = _run_patch(patch, site, reverse=True, dry_run=False)
    if result.returncode != 0:
        raise _mismatch_error(patch, site, result, "reverted")
    _remove_created_leftovers(patch, site)
    logger.info("%s: reverted", patch.name)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# All patches


def apply_patches(cpu: bool, site: Path | None = None, root: Path | None = None) -> list[tuple[str, bool]]:
    """Apply every patch in order; returns (name, changed) pairs. Stops at the first patch that fails."""
    site = site or site_dir()
    require_sglang_version(site)
    return [(p.name, apply_one(p, site)) for p in list_patches(cpu, root)]


def revert_patches(cpu: bool, site: Path | None = None, root: Path | None = None) -> list[tuple[str, bool]]:
    """Revert every patch in reverse application order; returns (name, changed) pairs."""
    site = site or site_dir()
    require_sglang_version(site)
    return [(p.name, revert_one(p, site)) for p in reversed(list_patches(cpu, root))]


def patch_status(site: Path | None = None, root: Path | None = None) -> list[tuple[str, bool]]:
    """(name, applied) for every patch of every group."""
    site = site or site_dir()
    return [(p.name, is_applied(p, site)) for p in list_patches(cpu=True, root=root)]


def _cpu_only_machine() -> bool:
    import torch  # lazy: the CLI must stay fast; callers inside SGLang have torch loaded already

    return not torch.cuda.is_available()


def check_applied(cpu: bool | None = None, site: Path | None = None, root: Path | None = None) -> list[str]:
    """Names of the patches this environment needs but lacks (empty list: all good).

    ``cpu=None`` decides by the machine: the ``cpu`` group is required when torch sees no CUDA device.
    A wrong SGLang version shows up as every patch missing; call ``require_sglang_version`` for a clearer error.
    """
    if cpu is None:
        cpu = _cpu_only_machine()
    site = site or site_dir()
    return [p.name for p in list_patches(cpu, root) if not is_applied(p, site)]


def ensure_applied(cpu: bool | None = None) -> None:
    """Raise a PatchError that says how to fix it if SGLang is the wrong version or a needed patch is missing."""
    site = site_dir()
    require_sglang_version(site)
    if cpu is None:
        cpu = _cpu_only_machine()
    missing = check_applied(cpu, site)
    if missing:
        fix = "sglang-forkkv apply" + (" --cpu" if cpu else "")
        raise PatchError(f"SGLang in {site} lacks sglang-forkkv patches {', '.join(missing)}; run `{fix}`")
