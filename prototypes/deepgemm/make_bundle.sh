#!/usr/bin/env bash
# Rebuild .deepgemm/ (git-ignored): DeepGEMM's source tree with its fmt submodule filled in, ready to
# be carried to the GPU machine (which has no network) by run(carry=[".whl", ".deepgemm"]).
#
#   bash prototypes/deepgemm/make_bundle.sh            # from the repo root
#
# Sources (local bare git mirrors; the `fetch` tool of the session brings them, or `git clone --bare`):
#   DG_MIRROR   github:deepseek-ai/DeepGEMM  (default /work/.mirror/deepseek-ai+DeepGEMM/repo), at HEAD
#               (DG_REV overrides; the bundle of 2026-12 was 54e22612409371d6364144b69086735beb54e98b,
#               "Multiple updates and refactorings (#364)", version 2.6.1)
#   FMT_MIRROR  github:fmtlib/fmt (default /work/.mirror/fmtlib+fmt/repo), at the commit DeepGEMM pins
#               for third-party/fmt (read from the DeepGEMM tree; 553ec11e... for the revision above).
#               fmt is used header-only (FMT_HEADER_ONLY), so only include/ is copied.
# CUTLASS (third-party/cutlass, pinned f3fde583...) is NOT bundled: the nvidia-cutlass 4.2.0.0 wheel's
# headers (cutlass_library/source/include, in .whl/ and installed by run_gpu.sh) compile DeepGEMM's
# sm90 kernels and its _C extension (checked locally, prototypes/deepgemm/README.md). run_gpu.sh links
# cute/ and cutlass/ into .deepgemm/deep_gemm/include/ (where DeepGEMM's JIT looks for them) and
# .deepgemm/third-party/cutlass/include (the extension build) on the GPU machine.
# The tests/, scripts/ and .github/ folders are kept (tests/generators.py documents the layouts);
# third-party/tilelang_ops is dropped (not needed for the GEMMs).
set -euo pipefail
cd "$(dirname "$0")/../.."
DG_MIRROR=${DG_MIRROR:-/work/.mirror/deepseek-ai+DeepGEMM/repo}
FMT_MIRROR=${FMT_MIRROR:-/work/.mirror/fmtlib+fmt/repo}
DG_REV=${DG_REV:-HEAD}
DEST=.deepgemm

dg_commit=$(git -C "$DG_MIRROR" rev-parse "$DG_REV^{commit}")
fmt_commit=$(git -C "$DG_MIRROR" ls-tree "$dg_commit" third-party/fmt | awk '{print $3}')
cutlass_commit=$(git -C "$DG_MIRROR" ls-tree "$dg_commit" third-party/cutlass | awk '{print $3}')
if ! git -C "$FMT_MIRROR" cat-file -e "$fmt_commit^{commit}" 2>/dev/null; then
  echo "make_bundle: fmt commit $fmt_commit not in $FMT_MIRROR; using its HEAD (any recent fmt works)" >&2
  fmt_commit=$(git -C "$FMT_MIRROR" rev-parse HEAD)
fi

rm -rf "$DEST"
mkdir -p "$DEST"
git -C "$DG_MIRROR" archive "$dg_commit" | tar -x -C "$DEST"
rm -rf "$DEST/third-party/tilelang_ops"
mkdir -p "$DEST/third-party/fmt" "$DEST/third-party/cutlass"
git -C "$FMT_MIRROR" archive "$fmt_commit" include | tar -x -C "$DEST/third-party/fmt"
cat >"$DEST/BUNDLE_INFO" <<INFO
DeepGEMM $dg_commit (from $DG_MIRROR)
fmt $fmt_commit include/ (from $FMT_MIRROR)
cutlass: not bundled (DeepGEMM pins $cutlass_commit); headers of the nvidia-cutlass 4.2.0.0 wheel are linked in by prototypes/deepgemm/run_gpu.sh
made $(date -u +%Y-%m-%dT%H:%M:%SZ) by prototypes/deepgemm/make_bundle.sh
INFO
cat "$DEST/BUNDLE_INFO"
du -sh "$DEST"
