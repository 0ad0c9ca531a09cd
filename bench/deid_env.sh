#!/usr/bin/env bash
# Create the virtual environments of the de-identification peers for bench/deid.py.
#
#   bash bench/deid_env.sh            # create (or complete) both environments
#   bash bench/deid_env.sh --force    # delete and recreate them
#
# Two environments, because idiscore 1.2.0 needs pydicom < 3 (through dicomgenerator 0.9.0)
# while dicognito 0.19.0 needs pydicom >= 3.0.1:
#
#   bench/.venv-deid           pydicom 3.0.2 (as the project), dcmanon, dicognito, deid,
#                              dicom-anonymizer
#   bench/.venv-deid-idiscore  idiscore 1.2.0 with pydicom 2.4.5
#
# pacsflow itself runs from the project's .venv; nothing here touches it. Each environment gets
# a `.gitignore` of `*` (what `python -m venv` writes since Python 3.13), so git ignores it
# without an entry in the repository's .gitignore.
#
# Pins: the versions this benchmark was last run with (2026-11-28), all from PyPI wheels.
# dcmanon is the Python binding (PyO3 wheel, Rust inside) of the Rust crate
# `dicom-anonymization` (github.com/carecoders/dicom-anonymization); its CLI `dcmanon` is a
# cargo install from crates.io, not on PyPI, and is not needed here.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python3.11}"
MAIN="$here/.venv-deid"
IDIS="$here/.venv-deid-idiscore"

MAIN_PINS=(
  "pydicom==3.0.2"
  "numpy==2.4.6"
  "dcmanon==0.3.1"
  "dicognito==0.19.0"
  "deid==0.4.13"
  "dicom-anonymizer==2.1.0"
)
IDIS_PINS=(
  "idiscore==1.2.0"
  "pydicom==2.4.5"
  "numpy==1.26.4"
)

if [[ "${1:-}" == "--force" ]]; then
  rm -rf "$MAIN" "$IDIS"
fi

make_env() {  # make_env DIR PIN...
  local dir="$1"
  shift
  if [[ ! -x "$dir/bin/python" ]]; then
    "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), sys.version'
    "$PYTHON" -m venv "$dir"
    printf '*\n' >"$dir/.gitignore"
    "$dir/bin/python" -m pip install --quiet --upgrade pip
  fi
  "$dir/bin/python" -m pip install --quiet "$@"
  "$dir/bin/python" -m pip check
}

make_env "$MAIN" "${MAIN_PINS[@]}"
make_env "$IDIS" "${IDIS_PINS[@]}"

"$MAIN/bin/python" - <<'EOF'
import importlib.metadata as md
print("bench/.venv-deid:", ", ".join(
    f"{p} {md.version(p)}" for p in ("pydicom", "dcmanon", "dicognito", "deid", "dicom-anonymizer")))
EOF
"$IDIS/bin/python" - <<'EOF'
import importlib.metadata as md
print("bench/.venv-deid-idiscore:", ", ".join(f"{p} {md.version(p)}" for p in ("pydicom", "idiscore")))
EOF
