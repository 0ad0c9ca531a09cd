#!/usr/bin/env bash
# Vendor NiiVue (the review app's in-page viewer) from the npm registry: one self-contained
# ES module (dist/index.js, no imports, no eval) and its licence, pinned and checked by sha256.
# Usage: tools/vendor-niivue.sh   (needs npm and network once; the app then works offline)
set -euo pipefail
VERSION=0.69.0
TGZ_SHA256=6e9a6a471b428eb3b258a0086beca9187d95e43a781a39e8a519c6da246af485
JS_SHA256=d6c2be4feb1ad53b2ac76b4196da8d8fd2263b662b511c55ca0fd127eb6a6532
DEST="$(cd "$(dirname "$0")/.." && pwd)/pipeline/review/static/niivue"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm pack --silent "@niivue/niivue@${VERSION}" >/dev/null)
echo "${TGZ_SHA256}  ${WORK}/niivue-niivue-${VERSION}.tgz" | sha256sum -c --quiet
tar -xzf "${WORK}/niivue-niivue-${VERSION}.tgz" -C "$WORK" package/dist/index.js package/package.json
echo "${JS_SHA256}  ${WORK}/package/dist/index.js" | sha256sum -c --quiet
mkdir -p "$DEST"
cp "${WORK}/package/dist/index.js" "${DEST}/niivue-${VERSION}.js"
# the npm package ships no LICENSE file: the BSD-2-Clause text of github.com/niivue/niivue
# (its package.json says "license": "BSD-2-Clause") is kept beside it as LICENSE
grep -q '"license": "BSD-2-Clause"' "${WORK}/package/package.json"
echo "vendored NiiVue ${VERSION} into ${DEST} ($(du -h "${DEST}/niivue-${VERSION}.js" | cut -f1))"
