"""The patch tool against the real venv (read-only) and against scratch copies of the files it patches."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sglang_forkkv import cli, patching

LORA_PATCH = "cpu/0001-lora-pin-memory.patch"
STUB_PATCH = "cpu/0003-sgl-kernel-stub.patch"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def scratch_site(tmp_path) -> Path:
    """A fake site-packages holding copies of the real files every patch touches, all patches applied."""
    real, site = patching.site_dir(), tmp_path / "site"
    wanted = {"sglang/_version.py", "sglang/version.py"}
    for patch in patching.list_patches(cpu=True):
        wanted.update(patch.files())
    for rel in wanted:
        if (real / rel).is_file():  # files a patch creates may be absent in the real venv
            (site / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real / rel, site / rel)
    patching.apply_patches(cpu=True, site=site)
    return site


def test_every_patch_has_a_header_naming_the_version():
    patches = patching.list_patches(cpu=True)
    assert any(p.group == "cpu" for p in patches)
    for patch in patches:
        header = []
        for line in patch.path.read_text().splitlines():
            if line.startswith(("diff ", "--- ")):
                break
            header.append(line)
        assert "SGLang 0.5.17" in "\n".join(header), f"{patch.name} lacks a header naming SGLang 0.5.17"


def test_status_reports_all_applied_in_this_venv():
    out = subprocess.run(
        [sys.executable, "-m", "sglang_forkkv.cli", "status"], capture_output=True, text=True, check=True
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith(("common/", "cpu/"))]
    assert lines, out
    assert all(line.endswith(": applied") for line in lines), f"run `sglang-forkkv apply --cpu`:\n{out}"
    assert patching.check_applied(cpu=True) == []


def test_apply_refuses_another_sglang_version(tmp_path, capsys):
    site = tmp_path / "site"
    (site / "sglang").mkdir(parents=True)
    (site / "sglang" / "version.py").write_text('__version__ = "0.5.16"\n')
    for command in ("apply", "revert"):
        assert cli.main([command, "--cpu", "--site", str(site)]) == cli.EXIT_WRONG_VERSION
        err = capsys.readouterr().err
        assert "0.5.16" in err and "0.5.17" in err
    assert sorted(p.relative_to(site).as_posix() for p in site.rglob("*")) == ["sglang", "sglang/version.py"]


def test_apply_twice_is_a_noop(scratch_site):
    before = _snapshot(scratch_site)
    results = patching.apply_patches(cpu=True, site=scratch_site)
    assert results and not any(changed for _, changed in results)
    assert _snapshot(scratch_site) == before


def test_revert_then_apply_restores_identical_bytes(scratch_site):
    applied = _snapshot(scratch_site)
    # bytecode of the created stub must not keep sgl_kernel/ alive as a namespace package after revert
    (scratch_site / "sgl_kernel" / "__pycache__").mkdir()
    (scratch_site / "sgl_kernel" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"stale")

    reverted = patching.revert_patches(cpu=True, site=scratch_site)
    assert [name for name, _ in reverted] == [p.name for p in reversed(patching.list_patches(cpu=True))]
    assert all(changed for _, changed in reverted)
    assert not (scratch_site / "sgl_kernel").exists()
    assert _snapshot(scratch_site) != applied
    assert sorted(patching.check_applied(cpu=True, site=scratch_site)) == sorted(n for n, _ in reverted)
    assert not any(changed for _, changed in patching.revert_patches(cpu=True, site=scratch_site))

    patching.apply_patches(cpu=True, site=scratch_site)
    assert _snapshot(scratch_site) == applied


def test_common_only_leaves_cpu_patches_alone(scratch_site):
    patching.revert_patches(cpu=False, site=scratch_site)
    status = dict(patching.patch_status(site=scratch_site))
    assert all(applied == name.startswith("cpu/") for name, applied in status.items())


def test_drifted_file_fails_loudly_naming_patch_and_file(scratch_site, capsys):
    layers = scratch_site / "sglang/srt/lora/layers.py"
    text = layers.read_text()
    layers.write_text(text.replace("pin_memory=torch.cuda.is_available()", "pin_memory=False", 1))

    with pytest.raises(patching.PatchError) as info:
        patching.revert_patches(cpu=True, site=scratch_site)
    assert LORA_PATCH in str(info.value) and "sglang/srt/lora/layers.py" in str(info.value)

    assert cli.main(["apply", "--cpu", "--site", str(scratch_site)]) == cli.EXIT_FAILED
    err = capsys.readouterr().err
    assert LORA_PATCH in err and "sglang/srt/lora/layers.py" in err


def test_created_file_is_detected_as_applied_only_with_its_content(scratch_site):
    stub = next(p for p in patching.list_patches(cpu=True) if p.name == STUB_PATCH)
    assert patching.is_applied(stub, scratch_site)
    (scratch_site / "sgl_kernel" / "__init__.py").write_text("# someone else's sgl_kernel\n")
    assert not patching.is_applied(stub, scratch_site)
    with pytest.raises(patching.PatchError, match="sgl_kernel/__init__.py"):
        patching.apply_one(stub, scratch_site)


def test_empty_patch_groups_are_fine(tmp_path, scratch_site):
    (tmp_path / "patches" / "common").mkdir(parents=True)
    root = tmp_path / "patches"
    assert patching.list_patches(cpu=True, root=root) == []
    assert patching.apply_patches(cpu=True, site=scratch_site, root=root) == []
    assert patching.check_applied(cpu=True, site=scratch_site, root=root) == []
