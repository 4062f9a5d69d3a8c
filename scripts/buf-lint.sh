#!/usr/bin/env bash
# Lints proto/ with buf (the CLI comes from the npm package @bufbuild/buf, installed under .cache/buf).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=.cache/buf/node_modules/.bin/buf
if [ ! -x "$BUF" ]; then
  npm install --silent --no-audit --no-fund --prefix .cache/buf @bufbuild/buf@1.75.0 >/dev/null
fi
"$BUF" lint
echo "buf lint: clean"
