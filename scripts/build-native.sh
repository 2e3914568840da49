#!/usr/bin/env bash
# Builds native/ (the addon) against this machine's Node headers, never downloading them.
set -euo pipefail
cd "$(dirname "$0")/../native"
gyp="$(dirname "$(command -v npm)")/../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js"
[ -f "$gyp" ] || gyp="$(npm root -g)/npm/node_modules/node-gyp/bin/node-gyp.js"
args=(rebuild --loglevel=warn)
# Debian's nodejs ships its headers in /usr/include/node; point node-gyp there instead of the network.
prefix="$(dirname "$(dirname "$(command -v node)")")"
if [ -f "$prefix/include/node/node_api.h" ]; then args+=(--nodedir="$prefix"); fi
node "$gyp" "${args[@]}"

# The capture agent (native/agent/): pushed to capture sources over SSH, so it must run on a stock Linux
# server with nothing installed. Linked statically, zstd included; built after the addon because
# node-gyp rebuild starts by wiping native/build.
zstd_static="$(gcc -print-file-name=libzstd.a)"
if [ ! -f "$zstd_static" ]; then
  echo "build-native: libzstd.a not found: install the Debian package libzstd-dev" >&2
  exit 1
fi
gcc -static -O2 -std=gnu11 -Wall -Wextra -D_FILE_OFFSET_BITS=64 -o build/ferry-agent agent/ferry-agent.c "$zstd_static"
strip build/ferry-agent
