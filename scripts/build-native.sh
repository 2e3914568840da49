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
